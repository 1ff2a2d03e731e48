"""The direct forward that reads a float input in place (csrc/cpu/direct_unpadded.h: stride 1, 3x3 with padding 1
or 1x1 without) sums what the padded-buffer path sums, in the same order: bit for bit.

The padded path is reached through an equivalent convolution the in-place path does not take: a 3x3 conv with
padding 1 of x is the "valid" conv (padding 0) of x zero-padded by one pixel, and a 1x1 conv of x is the interior of
its 1x1 conv with padding 1. Both sum the same products (zeros included) over (channel, tap) in the same order, so
the results must agree exactly, in the forward (channel_conv2d, masked_conv2d) and in grad_x (the transposed
convolution of dy, itself a stride-1 3x3 conv with padding 1). The geometries are the edge cases of the masks:
planes narrower than a vector, one row, one column, planes whose size is not a multiple of 16 or 32, and row-block
counts 1..13 (every lone and paired block of the AVX-512 kernel). Each ISA copy the CPU has runs in its own process
(SLIMOPS_CPU_ISA is read once)."""
import os
import sys
import textwrap

import pytest

from _proc import run_with_deadline

_SCRIPT = textwrap.dedent("""
    import itertools
    import torch
    import torch.nn.functional as F
    import slimops
    from slimops.info import cpu_isa
    ops = torch.ops.slimops
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    checked = 0
    from slimops import _C
    # in place on both ISA copies (3x3 and 1x1): planes narrower than a vector (5, 1), widths that are not a
    # multiple of 16, plane sizes that are not a multiple of 16 or 32; and small planes that keep the padded buffer
    sizes = [(28, 28), (20, 20), (16, 16), (64, 5), (45, 17), (24, 40), (300, 1), (14, 14), (7, 7), (1, 5), (2, 3)]
    in_place = 0
    for (h, w), k, nc, nr in itertools.product(sizes, (1, 3), (1, 5), (1, 4, 6, 7, 11, 13)):
        x, wt = rnd(2, nc + 2, h, w), rnd(nr + 3, nc + 2, k, k)
        ii = torch.randperm(nc + 2, generator=gen)[:nc].sort().values
        oi = torch.randperm(nr + 3, generator=gen)[:nr].sort().values
        p = k // 2
        key = f"{h}x{w} k{k} nc{nc} nr{nr}"
        in_place += _C.cpu_conv_in_place(h, w, k)
        y = ops.channel_conv2d(x, wt, None, ii, oi, [1, 1], [p, p], [1, 1], False)
        if k == 3:  # the valid conv of the padded input
            same = ops.channel_conv2d(F.pad(x, (1, 1, 1, 1)), wt, None, ii, oi, [1, 1], [0, 0], [1, 1], False)
        else:  # the interior of the conv with padding 1
            same = ops.channel_conv2d(x, wt, None, ii, oi, [1, 1], [1, 1], [1, 1], False)[..., 1:-1, 1:-1]
        assert torch.equal(y, same), key
        want = F.conv2d(x[:, ii].double(), wt[oi][:, ii].double(), padding=p)
        assert (y.double() - want).abs().max().item() < 1e-4 * (1 + want.abs().max().item()), key
        # per-sample rows (masked_conv2d) through the same kernels
        mask = torch.rand(2, nr + 3, generator=gen) < 0.6
        ym = ops.masked_conv2d(x, wt, None, mask, [1, 1], [p, p], [1, 1])
        if k == 3:
            sm = ops.masked_conv2d(F.pad(x, (1, 1, 1, 1)), wt, None, mask, [1, 1], [0, 0], [1, 1])
        else:
            sm = ops.masked_conv2d(x, wt, None, mask, [1, 1], [1, 1], [1, 1])[..., 1:-1, 1:-1]
        assert torch.equal(ym, sm), key + " masked"
        if k == 3:  # grad_x: dy (h x w) through the transposed conv, in place, against the valid conv's
            g = rnd(2, nr, h, w)
            gx = ops.channel_conv2d_backward(g, x, wt, ii, oi, [1, 1], [1, 1], [1, 1], False, [True, False, False])[0]
            gxp = ops.channel_conv2d_backward(g, F.pad(x, (1, 1, 1, 1)), wt, ii, oi, [1, 1], [0, 0], [1, 1], False,
                                              [True, False, False])[0]
            assert torch.equal(gx, gxp[..., 1:-1, 1:-1]), key + " grad_x"
        checked += 1
    print(cpu_isa(), checked, in_place)
""")

ORDER = ("avx2", "avx512")


@pytest.mark.parametrize("isa", ORDER)
def test_in_place_forward_matches_the_padded_path_bit_for_bit(isa):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMOPS_CPU_")}
    env.update(SLIMOPS_CPU_ISA=isa, OMP_NUM_THREADS="1")
    res = run_with_deadline([sys.executable, "-c", _SCRIPT], env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    ran, count, in_place = res.stdout.split()
    if ran != isa:
        pytest.skip(f"this CPU runs {ran} at most")
    assert int(count) == 11 * 2 * 2 * 6
    # 7 sizes in place at 3x3 and 8 (or 9 with AVX2's narrower blocks: 14² at 3x3 too) at 1x1, 12 calls each
    assert int(in_place) == 12 * (15 if isa == "avx512" else 17), in_place


def test_the_route_follows_the_interior_share():
    """Small planes keep the padded buffer (mostly border blocks); larger ones, 3x3 "same" and 1x1, read in place."""
    import slimops  # noqa: F401
    from slimops import _C
    from slimops.info import cpu_isa

    if cpu_isa() == "base":
        assert not _C.cpu_conv_in_place(28, 28, 3)
        return
    assert _C.cpu_conv_in_place(28, 28, 3) and _C.cpu_conv_in_place(56, 56, 1) and _C.cpu_conv_in_place(112, 112, 3)
    assert not _C.cpu_conv_in_place(7, 7, 3) and not _C.cpu_conv_in_place(1, 300, 3)
    assert not _C.cpu_conv_in_place(28, 28, 5)  # 5x5 keeps the padded buffer
