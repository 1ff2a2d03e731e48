"""channel_conv2d's float32 forward by Winograd F(2x2, 3x3) (csrc/cpu/winograd.h: stride 1, 3x3, padding 1, with
at least 24 kept channels in and out on the AVX2 copy, 48² of them on AVX-512).

1. Against the float64 reference within the float32 tolerance of test_channel_conv_ops.py (scaled by sum |term|):
   planes of even and odd sizes down to 4 x 4 (the last tile row or column half outside), one tile row per chunk
   and several, with and without bias, input_gathered, a non-contiguous x.
2. NaN in every channel and weight the kernel must not read changes nothing.
3. One thread and two give the same bits (a sample is one thread's), and the AVX2 and AVX-512 copies too (small_mm's
   two copies agree bit for bit and the transforms are additions).
4. SLIMOPS_CPU_CONV=direct turns it off, and the direct result is within the same tolerance.
5. masked_conv2d: samples that keep at least 3/4 of the rows take it (all rows computed, the kept written, the
   others exactly 0), the others the direct kernel, in one call.
6. grad_x of both ops (the "same" conv of dy with the flipped filters) by Winograd where the forward of that shape
   would run it: against the reference, and bit for bit across threads and ISA copies.
Each ISA copy runs in its own process (SLIMOPS_CPU_ISA and SLIMOPS_CPU_CONV are read once)."""
import os
import sys
import textwrap

import pytest
import torch

from _proc import run_with_deadline

_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import slimops
    from slimops import _C
    import torch.nn.functional as F
    from slimops.ops import channel_conv2d, masked_conv2d
    from slimops.reference import channel_conv as cref
    torch.set_num_threads(int(sys.argv[2]))
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    out, wino, masked_wino, gx_wino = {}, 0, 0, 0
    # (n, c_in, c_out, kept in, kept out, h, w)
    cases = [(3, 60, 64, 50, 48, 28, 28), (2, 100, 110, 97, 96, 9, 13), (1, 100, 100, 96, 100, 4, 4),
             (2, 130, 120, 128, 100, 7, 7), (2, 100, 100, 100, 96, 15, 6), (2, 40, 40, 34, 32, 5, 64),
             (2, 100, 100, 96, 96, 64, 40)]
    for n, ci, co, nc, nr, h, w in cases:
        x, wt, b = rnd(n, ci, h, w), rnd(co, ci, 3, 3) * 0.1, rnd(co)
        ii = torch.randperm(ci, generator=gen)[:nc].sort().values
        oo = torch.randperm(co, generator=gen)[:nr].sort().values
        wino += _C.cpu_conv_winograd(h, w, nc, nr)
        for bias in (b, None):
            key = f"{n}x{ci}x{h}x{w}/{nc}->{nr}/{'bias' if bias is not None else 'none'}"
            y = channel_conv2d(x, wt, bias, ii, oo, padding=1, backend="cpu")
            e = cref.channel_conv2d(x.double(), wt.double(), None if bias is None else bias.double(), ii, oo, 1, 1, 1)
            s = cref.channel_conv2d(x.abs().double(), wt.abs().double(), None if bias is None else bias.abs().double(),
                                    ii, oo, 1, 1, 1)
            err = ((y.double() - e).abs() - 1e-6 * (1 + e.abs() + s)).max().item()
            assert err <= 0, (key, err)
            out[key] = y
        # x already gathered, and a non-contiguous x (channels_last): the same bits
        y = out[f"{n}x{ci}x{h}x{w}/{nc}->{nr}/bias"]
        yg = channel_conv2d(x[:, ii].contiguous(), wt, b, ii, oo, padding=1, input_gathered=True, backend="cpu")
        assert torch.equal(yg, y), "input_gathered"
        ycl = channel_conv2d(x.to(memory_format=torch.channels_last), wt, b, ii, oo, padding=1, backend="cpu")
        assert torch.equal(ycl, y), "channels_last"
        # NaN wherever the kernel must not read
        xn, wn, bn = x.clone(), wt.clone(), b.clone()
        drop_in = torch.ones(ci, dtype=torch.bool); drop_in[ii] = False
        drop_out = torch.ones(co, dtype=torch.bool); drop_out[oo] = False
        xn[:, drop_in] = float("nan"); wn[drop_out] = float("nan"); wn[:, drop_in] = float("nan")
        bn[drop_out] = float("nan")
        assert torch.equal(channel_conv2d(xn, wn, bn, ii, oo, padding=1, backend="cpu"), y), "NaN read"
        # masked_conv2d: samples that keep every row and 80% (Winograd over all rows where the shape takes it, the
        # kept ones written) and 50% (the direct kernel)
        mask = torch.zeros(n, co, dtype=torch.bool)
        for i, f in enumerate((1.0, 0.8, 0.5)[:n]):
            mask[i, torch.randperm(co, generator=gen)[:int(co * f)]] = True
        ym = masked_conv2d(x, wt, b, mask, padding=1, backend="cpu")
        m4 = mask[:, :, None, None]
        em = F.conv2d(x.double(), wt.double(), b.double(), padding=1) * m4
        sm = F.conv2d(x.abs().double(), wt.abs().double(), b.abs().double(), padding=1) * m4
        err = ((ym.double() - em).abs() - 1e-6 * (1 + em.abs() + sm)).max().item()
        assert err <= 0 and bool((ym[~mask] == 0).all()), ("masked", err)
        masked_wino += sum(int(_C.cpu_conv_winograd(h, w, ci, co) and 4 * int(k) >= 3 * co) for k in mask.sum(1))
        out[f"{n}x{ci}x{h}x{w}/masked"] = ym
        # grad_x: the "same" conv of dy with the flipped filters (Winograd where the forward of nr -> nc would run)
        gy = rnd(n, nr, h, w)
        gx = torch.ops.slimops.channel_conv2d_backward(gy, x, wt, ii, oo, [1, 1], [1, 1], [1, 1], False,
                                                       [True, False, False])[0]
        ex = cref.channel_conv2d_backward(gy.double(), x.double(), wt.double(), ii, oo, (1, 1), (1, 1), 1, False,
                                          [True, False, False])[0]
        sx = cref.channel_conv2d_backward(gy.abs().double(), x.abs().double(), wt.abs().double(), ii, oo, (1, 1),
                                          (1, 1), 1, False, [True, False, False])[0]
        err = ((gx.double() - ex).abs() - 1e-6 * (1 + ex.abs() + sx)).max().item()
        assert err <= 0, ("grad_x", err)
        gx_wino += int(_C.cpu_conv_winograd(h, w, nr, nc))
        out[f"{n}x{ci}x{h}x{w}/gx"] = gx
        gm = rnd(n, co, h, w)
        mgx = torch.ops.slimops.masked_conv2d_backward(gm, x, wt, mask, [1, 1], [1, 1], [1, 1], [True, False, False])[0]
        emx = cref.masked_conv2d_backward(gm.double(), x.double(), wt.double(), mask, (1, 1), (1, 1), 1,
                                          [True, False, False])[0]
        smx = cref.masked_conv2d_backward(gm.abs().double(), x.abs().double(), wt.abs().double(), mask, (1, 1), (1, 1),
                                          1, [True, False, False])[0]
        err = ((mgx.double() - emx).abs() - 1e-6 * (1 + emx.abs() + smx)).max().item()
        assert err <= 0, ("masked grad_x", err)
        out[f"{n}x{ci}x{h}x{w}/masked/gx"] = mgx
    print("winograd cases", wino, "masked samples", masked_wino, "grad_x", gx_wino)
    torch.save(out, sys.argv[1])
""")


def _isas():
    from slimops.info import cpu_isa

    order = ["base", "avx2", "avx512"]
    return [isa for isa in ("avx2", "avx512") if order.index(isa) <= order.index(cpu_isa())]


def _run(tmp_path, isa, threads, **env_extra):
    path = tmp_path / f"{isa}-{threads}-{'-'.join(env_extra.values()) or 'auto'}.pt"
    env = dict(os.environ, SLIMOPS_CPU_ISA=isa, OMP_NUM_THREADS=str(threads), **env_extra)
    env.pop("SLIMOPS_CPU_BASE_ISA", None)
    res = run_with_deadline([sys.executable, "-c", _SCRIPT, str(path), str(threads)], env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    words = res.stdout.split("winograd cases")[1].split()
    return torch.load(path), (int(words[0]), int(words[3]), int(words[5]))


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_winograd_matches_the_reference_on_one_and_two_threads(tmp_path, isa):
    if isa not in _isas():
        pytest.skip(f"this CPU has no {isa}")
    one, wino = _run(tmp_path, isa, 1)
    # every case takes Winograd on AVX2, on AVX-512 those with 48² kept channels or more; masked_conv2d's samples
    # that keep 100% or 80% of the rows (13 of 14 on AVX2, 11 on AVX-512)
    assert wino == ((7, 13, 7) if isa == "avx2" else (6, 11, 6))
    two, _ = _run(tmp_path, isa, 2)
    for key, y in one.items():
        assert torch.equal(two[key], y), key


def test_winograd_copies_agree_bit_for_bit(tmp_path):
    if "avx512" not in _isas():
        pytest.skip("this CPU runs one Winograd copy")
    a, _ = _run(tmp_path, "avx2", 1)
    b, _ = _run(tmp_path, "avx512", 1)
    # the cases both copies run through Winograd (on AVX-512: 48² kept channels or more)
    both = [k for k in a if not k.startswith("2x40x")]
    assert len(both) == 30
    for key in both:
        assert torch.equal(a[key], b[key]), key


def test_the_direct_switch_turns_winograd_off(tmp_path):
    isa = _isas()[0] if _isas() else pytest.skip("no AVX2: the Winograd path never runs")
    direct, wino = _run(tmp_path, isa, 1, SLIMOPS_CPU_CONV="direct")
    assert wino == (0, 0, 0)  # and the direct kernels meet the same tolerance (asserted in the script)
    auto, _ = _run(tmp_path, isa, 1)
    assert any(not torch.equal(auto[k], direct[k]) for k in auto)  # a different sum: not the same path
