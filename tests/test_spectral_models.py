"""Tests of the Fourier-domain modules (``slimops.nn.spectral``) and backbones (AFIDAF-T, AFIDAF, GFNet-Ti).

- parameter counts at 1000 classes, exact and within 10% of the papers' (docs/algorithms.md §7);
- forward shapes at 32x32 and 224x224 and on a non-square grid other than the training one;
- gradients reach every parameter;
- every module equals a straightforward composition of ``slimops.reference.spectral`` and ``torch.nn.functional``
  (float64, eval mode);
- the slim groups are what the compaction engine cuts: compact(model, plan) reproduces the masked dense
  model exactly (eval and train mode, removed channels with beta != 0 folded), and so does sparsify;
- a one-epoch ``slim --model afidaf_t`` run through the CLI trains, plans, compacts and writes its files.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimops.models import MODELS, AFIDAFNet, GFNet, arch_summary, build
from slimops.models.afidaf import InvertedResidual, divisible
from slimops.nn import (AdaptiveFrequencyFilter, AFIDAFBlock, GlobalFilter, GlobalFilterBlock,
                        ImageDomainAdaptiveFilter, set_spectral_backend)
from slimops.nn.spectral import GridCroppedConv2d
from slimops.pruning import Plan, build_pruned, compact, plan_from_bn, sparsify
from slimops.reference import spectral as R

SPECTRAL = ("afidaf_t", "afidaf", "gfnet_ti")
# Exact parameter counts at 1000 classes / 3 input channels / width 1, and the published ones.
PARAMS = {"afidaf_t": (2_848_792, 3.0e6), "afidaf": (5_995_192, 6.5e6), "gfnet_ti": (7_524_072, 7.0e6)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def imagenet_models():
    torch.manual_seed(0)
    return {name: build(name, num_classes=1000).eval() for name in SPECTRAL}


def _num_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------------------------
# registry, parameter counts, shapes, gradients


def test_registered_for_build_and_cli():
    assert set(SPECTRAL) <= set(MODELS)
    from slimops.pruning.cli import main_slim

    with pytest.raises(SystemExit):  # argparse's choices=MODELS still refuses unknown names
        main_slim(["--model", "afidaf_x"])


@pytest.mark.parametrize("name", SPECTRAL)
def test_param_counts(imagenet_models, name):
    exact, published = PARAMS[name]
    assert _num_params(imagenet_models[name]) == exact
    assert abs(exact - published) / published < 0.10


def test_afidaf_without_idaf_is_affnet_sized(imagenet_models):
    """AFIDAF = AFFNet's layout + the image-domain filters: without them the count is AFFNet's 5.5M."""
    m = imagenet_models["afidaf"]
    idaf = sum(_num_params(f) for f in m.modules() if isinstance(f, ImageDomainAdaptiveFilter))
    assert abs(_num_params(m) - idaf - 5.5e6) / 5.5e6 < 0.01


@pytest.mark.parametrize("name", SPECTRAL)
def test_forward_224(imagenet_models, name):
    with torch.no_grad():
        y = imagenet_models[name](torch.randn(1, 3, 224, 224))
    assert y.shape == (1, 1000) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", SPECTRAL)
def test_train_at_32_then_other_resolutions(name):
    """One training step at 32x32 reaches every parameter; the model then runs on other grids."""
    model = build(name, num_classes=10, in_channels=1, width=0.25)
    assert model.config() == {"arch": name, "width": 0.25, "num_classes": 10, "in_channels": 1}
    y = model(torch.randn(4, 1, 32, 32))
    assert y.shape == (4, 10)
    (y * torch.randn_like(y)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    model.eval()
    with torch.no_grad():
        for size in ((40, 56), (64, 64), (16, 24)):
            out = model(torch.randn(2, 1, *size))
            assert out.shape == (2, 10) and torch.isfinite(out).all(), size


def test_width_rounding():
    assert [divisible(c) for c in (4, 12, 20, 24, 100, 8.1)] == [8, 16, 24, 24, 104, 8]
    m = build("afidaf_t", width=0.5)
    dims = [blk.aff.dim for blk in m.modules() if isinstance(blk, AFIDAFBlock)]
    assert sorted(set(dims)) == [48, 80, 96] and all(d % 8 == 0 for d in dims)
    assert build("gfnet_ti", width=0.5).head.in_features == 128
    with pytest.raises(ValueError, match="slimops.models.AFIDAFNet: arch"):
        AFIDAFNet("afidaf_xl")
    with pytest.raises(ValueError, match="slimops.models.GFNet: arch"):
        GFNet("gfnet_b")
    with pytest.raises(ValueError, match=r"slimops.models.GFNet: expected input .* H, W >= 16"):
        build("gfnet_ti")(torch.randn(1, 3, 8, 8))


# ----------------------------------------------------------------------------------------------
# modules against the reference composition (float64, eval mode)


def _ln(x, ln: nn.LayerNorm):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _mlp(x, mlp):
    h = F.conv2d(x.permute(0, 3, 1, 2), mlp.fc1.weight)
    bn = mlp.bn
    h = F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return F.conv2d(F.relu(h), mlp.fc2.weight, mlp.fc2.bias).permute(0, 2, 3, 1)


def _idaf(x, f: ImageDomainAdaptiveFilter):
    c, g = x.shape[-1], f.groups
    a = F.conv2d(x.permute(0, 3, 1, 2), f.dw.weight, f.dw.bias, padding=2, groups=c)
    a = F.conv2d(a, f.dw_dilated.weight, f.dw_dilated.bias, padding=9, dilation=3, groups=c)
    a = F.conv2d(a, f.pw.weight, f.pw.bias, groups=g)
    b, _, h, w = a.shape
    a = a.reshape(b, g, c // g, h, w).transpose(1, 2).reshape(b, c, h, w)  # channel shuffle
    return x * a.permute(0, 2, 3, 1)


def _resized(weight, h, w):
    """The filter for an h x w grid: bilinear (corners aligned) interpolation of real and imaginary parts."""
    k = torch.view_as_complex(weight)

    def part(t):
        return F.interpolate(t.permute(2, 0, 1)[None], size=(h, w // 2 + 1), mode="bilinear",
                             align_corners=True)[0].permute(1, 2, 0)

    return torch.view_as_real(torch.complex(part(k.real), part(k.imag)))


@torch.no_grad()
def _randomise(module: nn.Module):
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.3, 0.3)
            m.running_mean.uniform_(-0.3, 0.3), m.running_var.uniform_(0.5, 2.0)
        elif isinstance(m, nn.LayerNorm):
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.3, 0.3)
    for p in module.parameters():
        if p.dim() == 4 and p.shape[-1] == 2:  # spectral weights: large enough that the softshrink is active
            p.mul_(10)
    return module.eval()


@pytest.mark.parametrize("grid", [(14, 14), (7, 10), (2, 2), (1, 3)])
def test_global_filter_matches_reference(grid):
    f = GlobalFilter(8, 14, 14).double()
    x = torch.randn(2, *grid, 8, dtype=torch.float64)
    want = R.spectral_filter(x, f.weight if grid == (14, 14) else _resized(f.weight, *grid))
    torch.testing.assert_close(f(x), want, rtol=1e-10, atol=1e-12)
    assert f.weight.shape == (14, 8, 8, 2)
    f(x).square().sum().backward()
    assert f.weight.grad is not None and f.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"slimops.nn.GlobalFilter: expected input \(B, H, W, 8\)"):
        f(torch.randn(2, 4, 4, 6, dtype=torch.float64))


def test_adaptive_frequency_filter_matches_reference():
    f = _randomise(AdaptiveFrequencyFilter(16, blocks=4, hidden_factor=2, shrink=0.02).double())
    assert (f.w1.shape, f.b1.shape, f.w2.shape, f.b2.shape) == ((2, 4, 4, 8), (2, 4, 8), (2, 4, 8, 4), (2, 4, 4))
    x = torch.randn(3, 5, 6, 16, dtype=torch.float64)
    torch.testing.assert_close(f(x), R.adaptive_spectral_filter(x, f.w1, f.b1, f.w2, f.b2, 4, 0.02),
                               rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"blocks \(3\) must divide dim \(16\)"):
        AdaptiveFrequencyFilter(16, blocks=3)


@pytest.mark.parametrize("grid", [(9, 7), (3, 2), (1, 1)])
def test_afidaf_block_matches_reference(grid):
    blk = _randomise(AFIDAFBlock(16, mlp_ratio=2, blocks=8, groups=2).double())
    x = torch.randn(2, *grid, 16, dtype=torch.float64)
    a = blk.aff
    want = x + _idaf(_ln(x, blk.norm1), blk.idaf)
    want = want + R.adaptive_spectral_filter(_ln(want, blk.norm2), a.w1, a.b1, a.w2, a.b2, a.blocks, a.shrink)
    want = want + _mlp(_ln(want, blk.norm3), blk.mlp)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), want, rtol=1e-10, atol=1e-12)
        set_spectral_backend(blk, "reference")
        assert blk.aff.backend == "reference"
        torch.testing.assert_close(blk(x), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("grid", [(6, 6), (4, 5)])
def test_global_filter_block_matches_reference(grid):
    blk = _randomise(GlobalFilterBlock(8, 6, 6, mlp_ratio=4).double())
    x = torch.randn(2, *grid, 8, dtype=torch.float64)
    k = blk.filter.weight if grid == (6, 6) else _resized(blk.filter.weight, *grid)
    want = x + _mlp(_ln(R.spectral_filter(_ln(x, blk.norm1), k), blk.norm2), blk.mlp)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k,d", [(5, 1), (7, 3)])
def test_grid_cropped_conv_is_the_full_conv(k, d):
    conv = GridCroppedConv2d(4, 4, k, padding=d * (k // 2), dilation=d, groups=4).double()
    for hw in ((1, 1), (2, 5), (4, 4), (7, 12), (20, 3)):
        x = torch.randn(2, 4, *hw, dtype=torch.float64, requires_grad=True)
        got = conv(x)
        want = F.conv2d(x, conv.weight, conv.bias, 1, d * (k // 2), d, 4)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(got)
        torch.testing.assert_close(torch.autograd.grad(got, (x, conv.weight), g),
                                   torch.autograd.grad(want, (x, conv.weight), g), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="only stride-1 'same' convolutions"):
        GridCroppedConv2d(4, 4, 3, stride=2, padding=1)


def test_models_use_the_kernels_and_the_reference_alike():
    model = build("afidaf_t", width=0.25).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        auto = model(x)
        ref = set_spectral_backend(model, "reference")(x)
    torch.testing.assert_close(auto, ref, rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------------------------
# slimming: the groups, compaction and sparsify against the masked dense model


@pytest.mark.parametrize("name", SPECTRAL)
def test_slim_groups_are_every_bn_in_order(name):
    model = build(name, width=0.25)
    groups = model.slim_groups()
    assert [g.bn for g in groups] == [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for g in groups:
        c = model.get_submodule(g.bn).num_features
        src = model.get_submodule(g.producer or g.select)
        assert (src.out_channels if g.producer else src.num_selected) == c, g
        for cons in g.consumers:
            m = model.get_submodule(cons)
            assert (m.in_channels if isinstance(m, nn.Conv2d) else m.in_features) == c, (g, cons)
            assert not isinstance(m, nn.Conv2d) or m.groups == 1, (g, cons)
    mlps = [g for g in groups if g.bn.endswith(".mlp.bn")]
    if name == "gfnet_ti":
        assert len(groups) == len(mlps) == 12
    else:
        mv2 = [n for n, m in model.named_modules() if isinstance(m, InvertedResidual)]
        assert [g.bn for g in groups if g.select is not None] == [f"{n}.bn" for n in mv2]
        # the stem is slimmed where the first block has no residual: at width 1 (16 -> 32 channels), not at
        # width 0.25 (both round to 8 channels)
        assert "stem.norm" not in [g.bn for g in groups] and model.layer1[0].use_res
        assert build(name).slim_groups()[0].bn == "stem.norm"
        assert groups[-1].consumers == ("fc",) and len(mlps) == 9


@torch.no_grad()
def _silence_half(model, g: torch.Generator) -> dict:
    """Random BN statistics; gamma = 0 and beta > 0 on a random half of every slim BN's channels (their
    constant relu(beta) must be folded). Returns BN name -> kept indices."""
    _randomise(model)
    kept = {}
    for grp in model.slim_groups():
        bn = model.get_submodule(grp.bn)
        n = bn.num_features
        drop = torch.randperm(n, generator=g)[: n // 2]
        bn.weight[drop] = 0
        bn.bias[drop] = torch.rand(len(drop), generator=g) * 0.5 + 0.1
        keep = torch.ones(n, dtype=torch.bool)
        keep[drop] = False
        kept[grp.bn] = torch.nonzero(keep).flatten().tolist()
    return kept


def _assert_same(a, b, rtol=1e-9):
    err, scale = (a - b).abs().max().item(), a.abs().max().item()
    assert err <= rtol * scale, f"max |diff| {err:.3g} vs output scale {scale:.3g}"


@pytest.mark.parametrize("name", SPECTRAL)
def test_compact_and_sparsify_equal_the_masked_model(name):
    g = torch.Generator().manual_seed(SPECTRAL.index(name))
    model = build(name, width=0.25)
    kept = _silence_half(model, g)
    model.double()  # exact up to float64 rounding (float32's, in train mode, is amplified by batch statistics)
    plan = plan_from_bn(model)
    assert plan.layers == kept and plan.constant == sorted(kept)
    small = compact(model, plan)
    fast = sparsify(model, plan)
    assert _num_params(small) < 0.8 * _num_params(model)
    assert arch_summary(small) == {k: len(v) + 1 for k, v in kept.items()}  # + the constant channel
    for size in ((32, 32), (40, 56)):
        x = torch.randn(4, 3, *size, generator=g, dtype=torch.float64)
        for mode in ("eval", "train"):
            for m in (model, small, fast):
                m.train(mode == "train")
            with torch.no_grad():
                ref = model(x)
                _assert_same(ref, small(x))
                _assert_same(ref, fast(x))
    # the compacted state_dict loads into the architecture a replayed plan builds
    fresh = build_pruned(Plan.from_json(plan.to_json())).double().eval()
    fresh.load_state_dict(small.state_dict(), strict=True)
    small.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), small(x))


# ----------------------------------------------------------------------------------------------
# the CLI


def test_cli_slims_afidaf_t(tmp_path):
    """One epoch of proximal network slimming on digits (22 steps at batch 64, width 0.25). lam = 4 drives
    every xi to zero within the run (2.5 leaves them all), so the plan keeps the one channel per layer that
    plan_from_bn always keeps, and the compaction carries the removed channels' constants: the whole
    train -> plan -> compact -> report path runs on a non-trivial plan."""
    from slimops.pruning.cli import main_slim
    from slimops.pruning.pipeline import load_model_file

    out = str(tmp_path / "run")
    m = main_slim(["--model", "afidaf_t", "--width", "0.25", "--data", "digits", "--method", "proximal-ns",
                   "--epochs", "1", "--lam", "4", "--threads", "1", "--bn-recal", "2", "--no-progress", "--out", out])
    assert m["model"]["arch"] == "afidaf_t" and len(m["history"]) == 1
    assert m["channels_kept"] < m["channels_total"] and m["params_pruned"] < m["params_dense"]
    assert m["compaction_vs_masked"]["rel_diff"] < 1e-4
    assert {"dense.pt", "plan.json", "pruned.pt", "metrics.json"} <= set(os.listdir(out))
    with open(os.path.join(out, "plan.json")) as f:
        plan = Plan.from_json(f.read())
    assert plan.arch == m["model"] and set(plan.layers) == set(m["layers"])
    pruned, obj = load_model_file(os.path.join(out, "pruned.pt"))
    assert obj["kind"] == "pruned" and _num_params(pruned) == m["params_pruned"]
    with torch.no_grad():
        assert pruned.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert json.load(open(os.path.join(out, "metrics.json")))["acc"] == m["acc"]
