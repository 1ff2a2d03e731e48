"""Modules and pipeline of the channel_conv family: ChannelSparseConv2d / BatchNorm2d / Linear,
DynamicGatedConv2d, pruning.sparsify (equal to compact, eval and train, on the whole zoo) and
``eval --sparse``."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import TEST_THREADS  # noqa: E402
from test_pruning import randomise_bn, silence_half  # noqa: E402

from slimops.models import build  # noqa: E402
from slimops.nn import (  # noqa: E402
    ChannelSparseBatchNorm2d,
    ChannelSparseConv2d,
    ChannelSparseLinear,
    DynamicGatedConv2d,
)
from slimops.pruning import compact, plan_from_bn, sparsify  # noqa: E402
from slimops.pruning.metrics import count_macs  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / max(a.abs().max().item(), 1e-12)


# ---- ChannelSparseConv2d ---------------------------------------------------------------------------------


def test_sparse_conv_from_conv_shares_parameters_and_matches_gather():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 10, 3, stride=2, padding=1, dilation=1)
    ii, oi = torch.tensor([5, 1, 7]), torch.tensor([9, 0, 4, 2])
    sc = ChannelSparseConv2d.from_conv(conv, ii, oi)
    assert sc.weight is conv.weight and sc.bias is conv.bias
    x = torch.randn(3, 8, 11, 9)
    ref = F.conv2d(x[:, ii], conv.weight[oi][:, ii], conv.bias[oi], 2, 1)
    assert _rel(ref, sc(x)) < 1e-6
    sc(x).sum().backward()
    g = conv.weight.grad
    mask = torch.zeros_like(g, dtype=torch.bool)
    mask[oi[:, None], ii[None, :]] = True
    assert g[~mask].abs().max() == 0 and g[mask].abs().max() > 0


def test_sparse_conv_defaults_to_nn_conv2d():
    torch.manual_seed(0)
    sc = ChannelSparseConv2d(4, 6, (3, 1), padding=(1, 0), bias=False)
    x = torch.randn(2, 4, 7, 5)
    assert _rel(F.conv2d(x, sc.weight, None, 1, (1, 0)), sc(x)) < 1e-6
    assert sc.in_idx.tolist() == list(range(4)) and sc.out_idx.tolist() == list(range(6))


def test_sparse_conv_gathered_input_and_constant_term():
    """input_gathered reads compact x; const_in adds the removed channels' constant exactly, borders
    included (padding 1: border pixels see fewer taps)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1, bias=False)
    keep = torch.tensor([0, 3, 4])
    const = torch.tensor([0.0, 0.7, 0.2, 0.0, 0.0, 1.3])
    sc = ChannelSparseConv2d.from_conv(conv, keep, None, input_gathered=True, const_in=const)
    full = torch.randn(2, 6, 6, 7)
    full[:, [1, 2, 5]] = const[[1, 2, 5]][None, :, None, None]
    ref = conv(full)
    assert _rel(ref, sc(full[:, keep])) < 1e-6


def test_sparse_conv_bad_index_errors():
    conv = nn.Conv2d(4, 4, 3)
    with pytest.raises(ValueError, match="in_idx"):
        ChannelSparseConv2d.from_conv(conv, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="out_idx.*more than once"):
        ChannelSparseConv2d.from_conv(conv, None, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="groups=1"):
        ChannelSparseConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="const_in"):
        ChannelSparseConv2d.from_conv(conv, const_in=torch.zeros(3))


# ---- ChannelSparseBatchNorm2d / Linear ------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sparse_bn_updates_the_full_statistics(momentum):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6, momentum=momentum)
    ref = nn.BatchNorm2d(6, momentum=momentum)
    ref.load_state_dict(bn.state_dict())
    idx = torch.tensor([4, 1, 2])
    sb = ChannelSparseBatchNorm2d(bn, idx)
    for _ in range(3):
        x = torch.randn(5, 6, 4, 4)
        y = sb(x[:, idx])
        assert _rel(ref(x)[:, idx], y) < 1e-6
    for name in ("running_mean", "running_var"):
        a, b = getattr(bn, name), getattr(ref, name)
        assert torch.allclose(a[idx], b[idx], atol=1e-6)
        rest = torch.tensor([0, 3, 5])
        assert torch.equal(a[rest], torch.zeros(3) if name == "running_mean" else torch.ones(3))
    assert int(bn.num_batches_tracked) == 3
    sb.eval(), ref.eval()
    x = torch.randn(2, 6, 3, 3)
    assert _rel(ref(x)[:, idx], sb(x[:, idx])) < 1e-6


def test_sparse_linear_folds_constant_inputs():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    keep = torch.tensor([2, 0])
    const = torch.tensor([0.0, 0.5, 0.0, 2.0, 0.1])
    sl = ChannelSparseLinear(lin, keep, const)
    x = torch.randn(4, 5)
    full = x.clone()
    full[:, [1, 3, 4]] = const[[1, 3, 4]]
    assert _rel(lin(full), sl(x[:, keep])) < 1e-6


# ---- sparsify == compact on the zoo ---------------------------------------------------------------------

ZOO = [("vgg11", 0.5), ("vgg19", 0.25), ("preresnet20", 0.5), ("preresnet164", 0.25), ("densenet40", 0.25)]


@pytest.mark.parametrize("arch,width", ZOO)
def test_sparsify_equals_compact(arch, width):
    """Half of every BN silenced with beta != 0 (constant channels in play): the sparsified model's
    outputs equal the compacted model's in eval and train mode, its parameters are the model's own
    full tensors, and it counts the compacted model's MACs (up to the constant channels)."""
    g = torch.Generator().manual_seed(3)
    model = build(arch, width=width)
    randomise_bn(model, g)
    silence_half(model, g, beta=lambda n: torch.rand(n, generator=g) * 0.5 + 0.1)
    model.eval()
    plan = plan_from_bn(model)
    assert plan.constant, "the test must exercise constant channels"
    small, fast = compact(model, plan), sparsify(model, plan)
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        assert _rel(small(x), fast(x)) < 2e-6
        assert _rel(model(x), fast(x)) < 2e-6
    small.train(), fast.train()
    assert _rel(small(x), fast(x)) < 2e-5
    n_full = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in fast.parameters()) == n_full
    macs_fast, macs_small = count_macs(fast.eval(), (3, 32, 32)), count_macs(small.eval(), (3, 32, 32))
    assert macs_fast <= macs_small < count_macs(model, (3, 32, 32))


def test_sparsify_inplace_trains_the_full_tensors():
    g = torch.Generator().manual_seed(0)
    model = build("vgg11", width=0.25)
    randomise_bn(model, g)
    kept = silence_half(model, g)
    plan = plan_from_bn(model)
    w = model.features.conv1.weight
    fast = sparsify(model, plan, inplace=True)
    assert fast is model and fast.features.conv1.weight is w
    opt = torch.optim.SGD(fast.parameters(), lr=0.1)
    before = w.detach().clone()
    fast.train()
    F.cross_entropy(fast(torch.randn(4, 3, 32, 32, generator=g)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    changed = (w.detach() != before).any(dim=(1, 2, 3))
    keep1 = torch.tensor(kept["features.bn1"])
    assert changed[keep1].all() and not changed[~torch.isin(torch.arange(w.shape[0]), keep1)].any()
    assert "features.conv1.out_idx" in fast.state_dict()


# ---- DynamicGatedConv2d ---------------------------------------------------------------------------------


def test_dynamic_gate_keep_rate_and_reference():
    torch.manual_seed(0)
    m = DynamicGatedConv2d(8, 16, 3, padding=1, keep=0.25)
    x = torch.randn(5, 8, 9, 9)
    y = m(x)
    pi, mask = m.last_saliency, m.last_mask
    assert mask.shape == (5, 16) and (mask.sum(1) <= 4).all() and mask.sum() > 0
    ref = F.conv2d(x, m.weight, m.bias, 1, 1) * (mask * pi)[:, :, None, None]
    assert _rel(ref, y) < 1e-6
    y.sum().backward()
    assert m.fc1.weight.grad is not None and m.conv.weight.grad.abs().sum() > 0


def test_dynamic_gate_threshold_and_errors():
    torch.manual_seed(0)
    m = DynamicGatedConv2d(4, 6, 1, threshold=0.99)
    m(torch.randn(2, 4, 3, 3))
    assert ((m.last_saliency >= 0.99) & (m.last_saliency > 0) == m.last_mask).all()
    with pytest.raises(ValueError, match="keep"):
        DynamicGatedConv2d(4, 4, 3, keep=0)
    with pytest.raises(ValueError, match="reduction"):
        DynamicGatedConv2d(4, 4, 3, reduction=0)


# ---- CLI -------------------------------------------------------------------------------------------------


def test_cli_eval_sparse(tmp_path, capsys):
    """slim (1 epoch, percent plan), then `eval --sparse`: same accuracy as the compacted model."""
    from slimops.pruning.cli import main_eval, main_slim

    out = tmp_path / "run"
    main_slim(["--model", "vgg11", "--width", "0.25", "--method", "ns", "--epochs", "1", "--percent", "0.5",
          "--bn-recal", "0", "--out", str(out), "--no-progress", "--threads", str(TEST_THREADS)])
    capsys.readouterr()
    m = main_eval(["--weights", str(out / "dense.pt"), "--sparse", "--latency-batch", "8", "--threads",
                   str(TEST_THREADS)])
    assert m["kind"] == "sparse" and m["acc"] == pytest.approx(m["acc_compact"], abs=1e-9)
    assert m["speedup_vs_dense"] > 0 and m["speed_vs_compact"] > 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["plan"].endswith("plan.json")
    with pytest.raises(ValueError, match="dense model file"):
        main_eval(["--weights", str(out / "pruned.pt"), "--sparse"])


def test_bn_recalibration_of_sparse_model_equals_compacted():
    """recalibrate_bn re-estimates a sparsified model's statistics at the kept entries of the full tensors,
    to what it gives the compacted model; the removed entries are left alone."""
    from slimops.data import load
    from slimops.pruning.train import recalibrate_bn

    g = torch.Generator().manual_seed(5)
    model = build("vgg11", width=0.25, in_channels=1)
    randomise_bn(model, g)
    silence_half(model, g)
    model.eval()
    plan = plan_from_bn(model)
    ds = load("digits")
    fast, small = sparsify(model, plan), compact(model, plan)
    removed_before = fast.features.bn2.running_mean.clone()
    for m in (fast, small):
        recalibrate_bn(m, ds, torch.device("cpu"), batches=3, batch=16)
    keep = torch.tensor(plan.layers["features.bn2"])
    assert torch.allclose(fast.features.bn2.running_mean[keep], small.features.bn2.running_mean[: len(keep)], atol=1e-5)
    assert torch.allclose(fast.features.bn2.running_var[keep], small.features.bn2.running_var[: len(keep)], atol=1e-5)
    rest = ~torch.isin(torch.arange(fast.features.bn2.num_features), keep)
    assert torch.equal(fast.features.bn2.running_mean[rest], removed_before[rest])
    x = ds.normalise(ds.x_test[:8])
    with torch.no_grad():
        assert _rel(small.eval()(x), fast.eval()(x)) < 1e-5


def test_frozen_weights_take_the_cached_compact_block_and_dense_conv():
    """With no gradient needed for the weights (inference), ChannelSparseConv2d cuts the kept weight block once
    and runs torch's conv on compact tensors: the same values as the kernel path, the cache follows in-place
    weight updates and index changes, and gradients for x still flow."""
    from slimops.nn import ChannelSparseConv2d

    torch.manual_seed(0)
    m = ChannelSparseConv2d(12, 10, 3, padding=1, in_idx=[0, 3, 4, 9], out_idx=[1, 2, 7])
    x = torch.randn(2, 12, 9, 9)
    with torch.no_grad():
        fast = m(x)
    train = m(x)  # weights need gradients: the channel_conv2d kernel
    assert train.requires_grad and not fast.requires_grad
    torch.testing.assert_close(fast, train.detach(), rtol=1e-5, atol=1e-5)
    w_cached = m.compact_weight()[0]
    with torch.no_grad():
        m.weight.mul_(2)
        torch.testing.assert_close(m(x), 2 * fast - m.bias[m.out_idx].view(1, -1, 1, 1), rtol=1e-5, atol=1e-5)
        assert m.compact_weight()[0] is not w_cached
        m.set_index(out_idx=[0])
        assert m(x).shape == (2, 1, 9, 9)
    m.requires_grad_(False)
    xg = x.clone().requires_grad_()
    m(xg).sum().backward()
    assert xg.grad is not None and xg.grad[:, [1, 2, 5]].abs().sum() == 0 and xg.grad[:, 0].abs().sum() > 0
