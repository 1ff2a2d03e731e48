"""Every ISA copy of the CPU kernels this machine can run (csrc/cpu/isa.h: base, and avx2 where the CPU has AVX2 +
FMA; small_mm.h and sema_core.inc users: spectral, sema, token_attention, distill; channel_conv's direct convolution; and avx512,
which small_mm.h, sema_core.inc, the direct convolution, the quant family's block loops and the prox family's
elementwise loops have) agrees with the references; the prox family's copies agree with the base copy bit for bit, the
direct convolution's AVX-512 copy with its AVX2 copy.
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
    from slimops.ops import feature_affinity_loss
    fs = torch.randn(2, 6, 20, 17, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(2, 5, 20, 17, dtype=torch.float64)
    for proj in (None, torch.randn(340, 37, dtype=torch.float64)):  # 340 pixels: 2 panels; k 37: a partial vector
        for norm in ("l1", "l2sq"):
            res = []
            for backend in ("cpu", "reference"):
                loss = feature_affinity_loss(fs, ft, fast=proj is not None, proj=proj, norm=norm, backend=backend)
                res.append((loss.detach(), *torch.autograd.grad(loss, fs)))
            err = max(((a - b).abs().max() / (b.abs().max() + 1e-30)).item() for a, b in zip(*res))
            assert err < 1e-10, ("feature_affinity_loss", proj is not None, norm, err)
    print("ok", worst)
""")


# The prox family's elementwise loops (fused_apply.h's isa_for_range) round the same way in every copy: no FMA
# contraction, the same conversions. Each op, penalty and dtype runs on values around the thresholds and the
# specials (+-0, +-inf, NaN, bf16/fp16 ties); the results are saved and compared bit for bit with the base copy's.
_PROX_STEPS = textwrap.dedent("""
    import sys
    import torch
    import slimops
    from slimops.ops import palm_slimming_, penalty_grad_, prox, prox_adamw_, prox_backward, prox_sgd_, split_step_
    from slimops.penalties import GRAD as GRAD_PENALTIES, PROX as PROX_PENALTIES, STEP as STEP_PENALTIES
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 0.1, -0.1, 0.10001, 0.0999, float("inf"), float("-inf"), float("nan"), 1e-30])
    def data(dt, shape=(7, 1301)):  # 1301: a vector body and a remainder in every copy
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.2
        x.view(-1)[: special.numel()] = special.double()
        return x.to(dt)
    out = {}
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        name = str(dt).split(".")[1]
        for pen in PROX_PENALTIES:
            x, g = data(dt), data(dt)
            out[f"prox/{name}/{pen}"] = prox(x, pen, 0.01, a=0.5, backend="cpu")
            out[f"prox_backward/{name}/{pen}"] = prox_backward(g, x, pen, 0.01, a=0.5, backend="cpu")
        for pen in STEP_PENALTIES:
            for mom, nest, init in ((0.0, False, False), (0.9, False, True), (0.9, False, False), (0.9, True, False)):
                p, g, b = [data(dt)], [data(dt)], [data(dt)]
                prox_sgd_(p, g, b, lr=0.1, momentum=mom, weight_decay=1e-4, nesterov=nest, init_momentum=init,
                          penalty=pen, lam=0.01, a=0.5, backend="cpu")
                out[f"prox_sgd_/{name}/{pen}/{mom}/{nest}/{init}"] = torch.cat([p[0], b[0]])
            if dt == torch.float16:
                continue  # AdamW's moments in float16 overflow; the kernel is the same template
            for ams, b1 in ((False, 0.9), (True, 0.9), (False, 0.2)):  # b1 0.2: the other lerp form
                p, g, m, v = [data(dt)], [data(dt)], [data(dt)], [data(dt).abs()]
                vm = [data(dt).abs()] if ams else []
                prox_adamw_(p, g, m, v, vm, [torch.zeros(())], lr=1e-2, beta1=b1, amsgrad=ams, penalty=pen,
                            lam=0.5, a=0.5, backend="cpu")
                out[f"prox_adamw_/{name}/{pen}/{ams}/{b1}"] = torch.cat([p[0], m[0], v[0]] + vm)
            if pen == "none":
                continue  # palm_slimming_ and split_step_ take prox penalties
            gam, xi = [data(dt)], [data(dt)]
            palm_slimming_(gam, xi, alpha=10.0, beta=100.0, lam=0.5, penalty=pen, a=0.5, backend="cpu")
            out[f"palm_slimming_/{name}/{pen}"] = torch.cat([gam[0], xi[0]])
            w, g, u = [data(dt)], [data(dt)], [data(dt)]
            split_step_(w, g, u, lr=0.1, beta=1.0, penalty=pen, lam=1e-3, a=0.5, backend="cpu")
            out[f"split_step_/{name}/{pen}"] = torch.cat([w[0], u[0]])
        for pen in GRAD_PENALTIES:
            g, w = [data(dt)], [data(dt)]
            penalty_grad_(g, w, penalty=pen, s=1e-2, a=0.5, backend="cpu")
            out[f"penalty_grad_/{name}/{pen}"] = g[0]
    torch.save(out, sys.argv[1])
""")


def _results_per_isa(script: str, isas, tmp_path, **extra_env) -> dict:
    """{isa: the dict of tensors ``script`` saves to the path it is given} from one fresh process per ISA copy."""
    import torch

    results = {}
    for isa in isas:
        env = dict(os.environ, SLIMOPS_CPU_ISA=isa, OMP_NUM_THREADS="1", **extra_env)
        env.pop("SLIMOPS_CPU_BASE_ISA", None)
        path = str(tmp_path / f"{isa}.pt")
        res = run_with_deadline([sys.executable, "-c", script, path], env=env, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        results[isa] = torch.load(path, weights_only=True)
    return results


def test_prox_family_copies_are_bit_identical(tmp_path):
    if DETECTED == "base":
        pytest.skip("this CPU runs the base copy only")
    import torch

    results = _results_per_isa(_PROX_STEPS, ORDER[: ORDER.index(DETECTED) + 1], tmp_path)
    base = results["base"]
    assert len(base) > 100
    for isa, got in results.items():
        assert got.keys() == base.keys()
        for key, want in base.items():
            # bit patterns (-0.0 != 0.0 here), except that a NaN matches any NaN: x86 propagates the first operand's
            # NaN, and the copies may order a commutative product differently (inf - inf gave -nan in one, nan in
            # the other)
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[want.element_size()]
            same = (got[key].view(bits) == want.view(bits)) | (got[key].isnan() & want.isnan())
            assert bool(same.all()), (isa, key)


# channel_conv's direct convolution (csrc/cpu/direct_conv.h): the AVX2 copy (16-pixel blocks) and the AVX-512 copy
# (32-pixel blocks, or 16 on short rows) sum every output pixel in the same order, so they agree bit for bit, in the
# forward and in grad_x (the transposed convolution); so do grad_w's direct 3x3 kernels (rows of 8 or 16 output
# channels in the lanes, on output rows of 4 pixels or more, with dilation and strides: 7, 14, 17, 28, 112 pixels and
# 7 and 56 strided here; the other shapes take im2col + GEMM in both), each also checked against the reference. The
# cases cover rows that fill their last pixel block or not (1, 7, 14, 17, 28, 33, 56, 112 pixels), every row-block
# size 1..6 (1..13 kept output channels), the unrolled tap counts (1, 9, 25) and another (2x3), dilation, vertical
# and horizontal stride 2 (14x14 3x3, 5x33 5x5 and 3x112 3x3: the forward's phase-split rows), float32 and bfloat16
# inputs, static and per-sample (masked) channels, and enough input channels that the flat
# AVX-512 kernel (direct_flat) cuts its positions into one-block chunks.
_DIRECT_CONV = textwrap.dedent("""
    import sys
    import torch
    import slimops
    from slimops.ops import channel_conv2d, masked_conv2d
    from slimops.reference import channel_conv as cref
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    out = {}
    cases = [(1, 3, 3, 1), (7, 7, 3, 3), (14, 14, 3, 3), (9, 17, 3, 3), (28, 28, 3, 3), (5, 33, 5, 5), (56, 56, 1, 1),
             (3, 112, 3, 3), (6, 20, 2, 3)]
    for i, (h, w, kh, kw) in enumerate(cases):
        # 7..13 rows: every pair of blocks the flat AVX-512 kernel runs ((4, 3), (4, 4), (5, 4), (5, 5), (6, 5), and
        # 13 = (4, 3) + (3, 3)), against the AVX2 copy's unpaired blocks
        for nout in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13):
            if nout not in (1, 6, 13) and i % 3:
                continue  # every row count on a third of the shapes
            for dt in (torch.float32, torch.bfloat16):
                x, wt, b = rnd(2, 10, h, w).to(dt), rnd(16, 10, kh, kw).to(dt), rnd(16).to(dt)
                ii = torch.tensor([0, 2, 3, 7, 9])
                oo = torch.randperm(16, generator=gen)[:nout].sort().values
                dil, st = (2, 1) if i == 1 else (1, 2) if i == 4 else (1, 1)
                sw = 2 if i in (2, 5, 7) else 1  # horizontal stride 2: the forward reads phase-split rows
                pad = (kh // 2 * dil, kw // 2 * dil)
                key = f"{h}x{w}/{kh}x{kw}/{nout}/{str(dt)[6:]}"
                y = channel_conv2d(x, wt, b, ii, oo, stride=(st, sw), padding=pad, dilation=dil, backend="cpu")
                want = cref.channel_conv2d(x.double(), wt.double(), b.double(), ii, oo, (st, sw), pad, dil)
                tol = 1e-4 if dt == torch.float32 else 2e-2 * (want.abs().max().item() + 1)
                assert (y.double() - want).abs().max().item() < tol, key
                mask = torch.rand(2, 16, generator=gen) < nout / 16
                out[key] = y
                out[key + "/masked"] = masked_conv2d(x, wt, b, mask, stride=(st, sw), padding=pad, dilation=dil,
                                                     backend="cpu")
                # the backward: grad_x by the transposed direct convolution (stride 1), grad_w by the direct 3x3
                # kernel, in both copies: against the reference
                g = rnd(*y.shape).to(dt)
                args = ((st, sw), pad, dil)
                gx, gw, _ = torch.ops.slimops.channel_conv2d_backward(g, x, wt, ii, oo, *args, False,
                                                                      [True, True, False])
                want = cref.channel_conv2d_backward(g.double(), x.double(), wt.double(), ii, oo, *args, False,
                                                    [True, True, False])
                for name, a, e in (("gx", gx, want[0]), ("gw", gw, want[1])):
                    assert (a.double() - e).abs().max().item() < tol * (e.abs().max().item() + 1), (key, name)
                out[key + "/gx"] = gx
                out[key + "/gw"] = gw
                gm = rnd(*y.shape[:1], 16, *y.shape[2:]).to(dt)
                mgx, mgw, _ = torch.ops.slimops.masked_conv2d_backward(gm, x, wt, mask, *args, [True, True, False])
                mwant = cref.masked_conv2d_backward(gm.double(), x.double(), wt.double(), mask, *args,
                                                    [True, True, False])
                for name, a, e in (("masked gx", mgx, mwant[0]), ("masked gw", mgw, mwant[1])):
                    assert (a.double() - e).abs().max().item() < tol * (e.abs().max().item() + 1), (key, name)
                out[key + "/masked/gx"] = mgx
                out[key + "/masked/gw"] = mgw
    # 700 kept input channels: the flat AVX-512 kernel's chunks shrink to one 32-pixel block, ending mid-row
    x, wt = rnd(2, 700, 9, 13), rnd(8, 700, 3, 3) * 0.05
    ii, oo = torch.arange(700), torch.arange(8)
    y = channel_conv2d(x, wt, None, ii, oo, padding=1, backend="cpu")
    assert (y.double() - cref.channel_conv2d(x, wt, None, ii, oo, 1, 1, 1)).abs().max() < 1e-4
    out["700 channels"] = y
    torch.save(out, sys.argv[1])
""")


def test_direct_conv_copies_are_bit_identical(tmp_path):
    if ORDER.index(DETECTED) < ORDER.index("avx512"):
        pytest.skip(f"this CPU runs {DETECTED} at most: one direct-conv copy")
    import torch

    # bf16 through the direct kernel on an AMX CPU too (csrc/cpu/channel_conv_onednn.h sends it to oneDNN there), and
    # float32 never through Winograd (csrc/cpu/winograd.h; these shapes keep too few channels for it anyway)
    results = _results_per_isa(_DIRECT_CONV, ("avx2", "avx512"), tmp_path, SLIMOPS_CPU_BF16_CONV="direct",
                               SLIMOPS_CPU_CONV="direct")
    assert len(results["avx2"]) > 100 and results["avx2"].keys() == results["avx512"].keys()
    for key, want in results["avx2"].items():
        assert torch.equal(results["avx512"][key], want), key


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


# kept_token_attention's bfloat16 forward on AVX512-BF16 dot products (csrc/cpu/bf16_dot.h; SLIMOPS_CPU_AMX=0), and
# forward and backward on AMX tiles where the CPU has them (csrc/cpu/amx_bf16.h), against its float path (the same CPU with
# SLIMOPS_CPU_BF16_DOT=0) and the float64 oracle: head dims odd and even (the pair padding), key
# counts odd (a zero key to pair with), not a multiple of 16 and above the 32-column block, more queries than one
# chunk, per-sample indices, strided views. Both paths must be within the bf16 tolerance of the oracle
# (flash-attention's rule: 2x the reference's own error); on a CPU with the instructions, the dot path must really
# have run (the outputs differ: P is rounded to bf16 there).
_BF16_TOKENS = textwrap.dedent("""
    import sys
    import torch
    import slimops
    from slimops.info import cpu_amx_bf16, cpu_bf16_dot
    from slimops.ops import kept_token_attention
    torch.set_num_threads(1)
    out = {"_on": torch.tensor(cpu_bf16_dot()), "_amx": torch.tensor(cpu_amx_bf16())}
    cases = [(2, 3, 40, 37, 64, 30, 29, False), (1, 2, 150, 150, 33, 130, 97, True), (2, 1, 9, 70, 5, 9, 1, False),
             (1, 2, 20, 50, 80, 17, 50, True), (1, 1, 8, 8, 2, 8, 8, False)]
    for n, (b, h, lq, lk, d, nq, nk, per) in enumerate(cases):
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(b, h, l, d, generator=g, dtype=torch.float64) for l in (lq, lk, lk))
        if per:
            qi = torch.stack([torch.randperm(lq, generator=g)[:nq] for _ in range(b)])
            ki = torch.stack([torch.randperm(lk, generator=g)[:nk] for _ in range(b)])
        else:
            qi, ki = torch.randperm(lq, generator=g)[:nq], torch.randperm(lk, generator=g)[:nk]
        qb, kb, vb = (t.bfloat16() for t in (q, k, v))
        if n == 3:  # strided: views of a fused (b, l, 3, h, d) projection
            fused = torch.stack([kb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2)], 2)
            kb, vb = fused[:, :, 1].transpose(1, 2), fused[:, :, 2].transpose(1, 2)
        go = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64).bfloat16()
        for name, dt, backend in (("got", None, "cpu"), ("f64", torch.float64, "reference"), ("ref", None, "reference")):
            ins = [(t if dt is None else t.to(dt)).detach().requires_grad_() for t in (qb, kb, vb)]
            y = kept_token_attention(*ins, qi, ki, backend=backend)
            y.backward(go if dt is None else go.to(dt))
            out[f"{n}/{name}"] = y.detach()
            for t, which in zip(ins, "qkv"):
                out[f"{n}g{which}/{name}"] = t.grad
    torch.save(out, sys.argv[1])
""")


def test_bf16_dot_attention_matches_the_float_path_and_the_oracle(tmp_path):
    import torch

    from tests.conftest import assert_close_lowp

    runs = {}
    for name, env in (("dot", {"SLIMOPS_CPU_AMX": "0"}), ("amx", {}), ("float", {"SLIMOPS_CPU_BF16_DOT": "0"})):
        path = str(tmp_path / f"{name}.pt")
        res = run_with_deadline([sys.executable, "-c", _BF16_TOKENS, path],
                                env=dict(os.environ, OMP_NUM_THREADS="1", **env), timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        runs[name] = torch.load(path, weights_only=True)
    assert not runs["float"]["_on"] and not runs["dot"]["_amx"]
    if not runs["amx"]["_amx"]:  # no AMX here: that run is the dot path again (or the float path)
        del runs["amx"]
    if not runs["dot"]["_on"]:
        pytest.skip("this CPU has no AVX512_BF16 (or runs below the avx512 copies): the float path only")
    cases = sorted({k.split("/")[0] for k in runs["dot"] if "/" in k})  # "3" (the output), "3gq" (grad q), ...
    differ = 0
    for c in cases:
        for name, got in runs.items():
            assert_close_lowp(got[f"{c}/got"], got[f"{c}/ref"], got[f"{c}/f64"], msg=f"case {c}, {name} path")
        if "g" not in c:
            differ += int(not torch.equal(runs["dot"][f"{c}/got"], runs["float"][f"{c}/got"]))
    assert differ >= len([c for c in cases if "g" not in c]) - 1  # the dot path ran (a tiny case may round alike)
    if "amx" in runs:  # the backward on tiles ran: its gradients are not the float path's
        assert any(not torch.equal(runs["amx"][f"{c}/got"], runs["float"][f"{c}/got"]) for c in cases if "g" in c)
