"""The base-ISA copies of the CPU kernels that have an AVX2 + FMA copy (small_mm.h users: spectral; sema's
inner loops) agree with the references too. On an AVX2 machine only the AVX2 copies run by default, so this runs
the checks in a subprocess with SLIMOPS_CPU_BASE_ISA=1 (read once by the extension)."""
import os
import sys
import textwrap

from _proc import run_with_deadline


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
    x = torch.randn(2, 14, 14, 40)
    w = torch.randn(14, 8, 40, 2)
    err = (spectral_filter(x, w, backend="cpu") - fref.spectral_filter(x, w)).abs().max().item()
    assert err < 1e-4, err
    print("ok", worst)
""")


def test_base_isa_kernels_match_the_references():
    env = dict(os.environ, SLIMOPS_CPU_BASE_ISA="1", OMP_NUM_THREADS="1")
    res = run_with_deadline([sys.executable, "-c", _CHECKS], env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("ok"), res.stdout
