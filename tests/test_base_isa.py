"""Every ISA copy of the CPU kernels this machine can run (csrc/cpu/isa.h: base, and avx2 where the CPU has AVX2 +
FMA; small_mm.h and sema_core.inc users: spectral, sema, token_attention; channel_conv's direct convolution; and avx512,
which small_mm.h, sema_core.inc and the quant family's block loops have) agrees with the references.
Only the best copy runs by default, so each is checked in a subprocess with SLIMOPS_CPU_ISA set (read once by the
extension)."""
import os
import sys
import textwrap

import pytest

from _proc import run_with_deadline

ORDER = ("base", "avx2", "avx512")


def _isa(env_extra):
    """What a fresh process reports as its CPU ISA under ``env_extra`` (the finished process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMOPS_CPU_")}
    env.update(OMP_NUM_THREADS="1", **env_extra)
    return run_with_deadline([sys.executable, "-c", "from slimops.info import cpu_isa; print(cpu_isa())"], env=env,
                             timeout=120)


DETECTED = _isa({"SLIMOPS_CPU_ISA": "avx512"}).stdout.strip()


_CHECKS = textwrap.dedent("""
    import torch
    import slimops
    from slimops.ops import sema_attention, spectral_filter
    from slimops.reference import sema as sref, spectral as fref
    torch.manual_seed(0)
    torch.set_num_threads(1)
    worst = 0.0
    for grid, win, nb, d in [((14, 14), (7, 7), False, 32), ((9, 11), (7, 7), False, 24), ((5, 3), (2, 2), True, 16),
                             ((6, 7), (3, 4), True, 5), ((4, 5), (4, 5), False, 64)]:
        for dt, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
            q, k, v = (torch.randn(2, 2, grid[0] * grid[1], d, dtype=dt, requires_grad=True) for _ in range(3))
            out = sema_attention(q, k, v, grid, win, neighborhood=nb, backend="cpu")
            want = sref.sema_attention(q, k, v, grid, win, nb)
            g = torch.randn_like(out)
            got = torch.autograd.grad(out, (q, k, v), g)
            exp = torch.autograd.grad(want, (q, k, v), g)
            err = max([(out - want).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(got, exp)])
            assert err < tol, (grid, win, nb, d, dt, err)
            worst = max(worst, err / tol)
    from slimops.ops import kept_token_attention
    from slimops.reference import token_attention as kref
    for dt, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        q, k, v = (torch.randn(2, 3, 70, 24, dtype=dt, requires_grad=True) for _ in range(3))
        qi, ki = torch.randperm(70)[:66], torch.stack([torch.randperm(70)[:37] for _ in range(2)])
        out = kept_token_attention(q, k, v, qi, ki, backend="cpu")
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), g)
        exp = kref.kept_token_attention_backward(g, q, k, v, qi, ki, None, [True, True, True])
        err = max([(out - kref.kept_token_attention(q, k, v, qi, ki)).abs().max().item()] +
                  [(a - b).abs().max().item() for a, b in zip(got, exp)])
        assert err < tol, ("kept_token", dt, err)
    x = torch.randn(2, 14, 14, 40)
    w = torch.randn(14, 8, 40, 2)
    err = (spectral_filter(x, w, backend="cpu") - fref.spectral_filter(x, w)).abs().max().item()
    assert err < 1e-4, err
    from slimops.ops import channel_conv2d
    from slimops.reference import channel_conv as cref
    x = torch.randn(2, 24, 13, 17)
    w = torch.randn(20, 24, 3, 3)
    ii, oo = torch.arange(0, 24, 2), torch.arange(1, 20, 3)
    y = channel_conv2d(x, w, None, ii, oo, stride=1, padding=1, backend="cpu")
    err = (y - cref.channel_conv2d(x, w, None, ii, oo, 1, 1, 1)).abs().max().item()
    assert err < 1e-4, err
    from slimops.ops import fake_quantize, fda_sign
    from slimops.reference import quant as qref
    for dt in (torch.float32, torch.float64, torch.bfloat16):
        x = (torch.randn(6, 1000, dtype=torch.float64) * 2).to(dt)
        g = torch.randn(6, 1000, dtype=torch.float64).to(dt)
        s = torch.rand(6) * 0.2 + 0.05
        z = torch.rand(6) * 6 + 1
        for bits, signed, zp in ((4, True, None), (3, False, z), (1, True, None)):
            assert torch.equal(fake_quantize(x, s, zp, bits=bits, per_channel_axis=0, signed=signed, backend="cpu"),
                               qref.fake_quantize(x, s, zp, bits, 0, signed))
            got = torch.ops.slimops.fake_quantize_backward(g, x, s, zp, bits, 0, signed, 0.5, [True, True, True])
            exp = qref.fake_quantize_backward(g, x, s, zp, bits, 0, signed, 0.5, [True, True, True])
            assert torch.equal(got[0], exp[0])
            for a, b in zip(got[1:], exp[1:]):
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-3), (a, b)
        for sur in ("ste", "approx_sign", "tanh", "fda"):
            got = torch.ops.slimops.fda_sign_backward(g, x, 10, 0.3, sur, 1.5).double()
            exp = qref.fda_sign_backward(g.double(), x.double(), 10, 0.3, sur, 1.5)
            tol = (2.0 ** -7 if dt == torch.bfloat16 else 1e-5) * (exp.abs().max().item() + 1)  # one storage rounding
            assert (got - exp).abs().max().item() <= tol, (sur, dt, (got - exp).abs().max().item())
        assert torch.equal(fda_sign(x, backend="cpu"), qref.fda_sign(x))
    print("ok", worst)
""")


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_each_isa_copy_matches_the_references(isa):
    if ORDER.index(isa) > ORDER.index(DETECTED):
        pytest.skip(f"this CPU runs {DETECTED} at most")
    env = dict(os.environ, SLIMOPS_CPU_ISA=isa, OMP_NUM_THREADS="1")
    env.pop("SLIMOPS_CPU_BASE_ISA", None)
    res = run_with_deadline([sys.executable, "-c", "from slimops.info import cpu_isa; print(cpu_isa())\n" + _CHECKS],
                            env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.splitlines()[0] == isa and res.stdout.splitlines()[1].startswith("ok"), res.stdout


def test_the_isa_variable_caps_and_is_checked():
    assert DETECTED in ORDER
    assert _isa({"SLIMOPS_CPU_ISA": "base"}).stdout.strip() == "base"
    assert _isa({"SLIMOPS_CPU_BASE_ISA": "1"}).stdout.strip() == "base"  # the older name
    bad = _isa({"SLIMOPS_CPU_ISA": "sse9"})
    assert bad.returncode != 0 and "SLIMOPS_CPU_ISA must be base, avx2 or avx512, got 'sse9'" in bad.stderr
    info = run_with_deadline([sys.executable, "-m", "slimops", "info"], env=dict(os.environ, SLIMOPS_CPU_ISA="base"),
                             timeout=120)
    assert "cpu ISA base (SLIMOPS_CPU_ISA=base): slimops runs its base kernel copies" in info.stdout, \
        info.stdout + info.stderr
