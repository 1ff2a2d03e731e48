"""Unit tests of ``slimops.pruning``: plans, compaction, the slimming methods, global BatchNorm and
atomic checkpoint files (docs/algorithms.md §2-§4).

Compaction is checked against its defining property: with gamma = beta = 0 on every removed channel
the removed channels contribute nothing, so the compacted model must reproduce the original's
eval-mode outputs up to float32 reassociation (tolerance relative to the output scale). Removed
channels with beta != 0 emit the constant relu(beta); the plan's constant channel ("fold") must keep
compaction exact for every kind of consumer, and dropping it must not. Method updates are compared with
hand computations of their formulas on top of plain ``torch.optim.SGD``.
"""
from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
from torch import nn

from slimops.models import build
from slimops.nn import ChannelSelect
from slimops.pruning import (METHODS, MethodConfig, Plan, SlimMethod, build_pruned, compact, compaction_error,
                             default_lam, plan_from_bn)
from slimops.pruning import checkpoint as ckpt
from slimops.pruning import distributed as D
from slimops.pruning.methods import LAM_AT_T_REF, T_REF

# Relative tolerance of "compaction is exact": float32 sums over a few hundred terms reassociated.
EXACT_RTOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def _num_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@torch.no_grad()
def randomise_bn(model: nn.Module, g: torch.Generator) -> None:
    """Random but well-conditioned BN parameters and running statistics (eval mode then is a
    non-trivial per-channel affine map)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=g) * 0.8 + 0.6)
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)


@torch.no_grad()
def silence_half(model: nn.Module, g: torch.Generator, *, beta=None, only=None) -> dict:
    """Sets gamma = 0 on a random half of every (or the ``only``) BN's channels; beta = 0 there too
    unless ``beta`` (a callable n -> values) is given. Returns BN name -> sorted kept indices."""
    kept = {}
    for grp in model.slim_groups():
        bn = model.get_submodule(grp.bn)
        n = bn.num_features
        if only is not None and grp.bn not in only:
            kept[grp.bn] = list(range(n))
            continue
        removed = torch.randperm(n, generator=g)[: n // 2]
        bn.weight[removed] = 0
        bn.bias[removed] = 0 if beta is None else beta(len(removed))
        mask = torch.ones(n, dtype=torch.bool)
        mask[removed] = False
        kept[grp.bn] = torch.nonzero(mask).flatten().tolist()
    return kept


def assert_outputs_equal(a: torch.Tensor, b: torch.Tensor, rtol: float = EXACT_RTOL) -> None:
    scale = a.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= rtol * scale + 1e-12, f"max |diff| {err:.3g} > {rtol} x output scale {scale:.3g}"


# ------------------------------------------------------------------------------------------------
# Exact compaction on the whole zoo
# ------------------------------------------------------------------------------------------------
ZOO_CASES = {"vgg19": 1.0, "preresnet56": 1.0, "densenet40": 1.0, "preresnet164": 0.25}


@pytest.fixture(scope="module", params=list(ZOO_CASES))
def silenced(request):
    """(model in eval mode, expected kept indices, input) with half of every BN silenced."""
    name = request.param
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(list(ZOO_CASES).index(name))
    model = build(name, width=ZOO_CASES[name])
    randomise_bn(model, g)
    kept = silence_half(model, g)
    model.eval()
    x = torch.randn(2, 3, 32, 32, generator=g)
    return name, model, kept, x


def test_plan_keeps_exactly_the_live_channels(silenced):
    name, model, kept, _ = silenced
    plan = plan_from_bn(model)
    assert plan.layers == kept, name
    assert plan.channels == {g.bn: model.get_submodule(g.bn).num_features for g in model.slim_groups()}
    assert plan.arch == model.config()
    assert plan.meta["criterion"] == "gamma" and plan.meta["forced_keep"] == 0
    assert plan.constant == []  # beta = 0 on the removed channels: nothing to carry
    assert plan.channels_kept == sum(len(v) for v in kept.values()) < plan.channels_total


def test_compact_is_exact_and_smaller(silenced):
    name, model, kept, x = silenced
    plan = plan_from_bn(model)
    small = compact(model, plan)
    assert not small.training
    with torch.no_grad():
        ref, out = model(x), small(x)
    assert out.shape == ref.shape
    assert_outputs_equal(ref, out)
    assert _num_params(small) < _num_params(model)
    # Every BN now has exactly its kept channels, and the compacted model is still slimmable.
    for grp in small.slim_groups():
        assert small.get_submodule(grp.bn).num_features == len(kept[grp.bn]), grp.bn
        if grp.select is not None:
            assert small.get_submodule(grp.select).index.tolist() == kept[grp.bn]
    err = compaction_error(model, small, x)
    assert err["rel_diff"] <= EXACT_RTOL and err["top1_agreement"] == 1.0


def test_plan_json_round_trip_replays(silenced):
    name, model, _, x = silenced
    plan = plan_from_bn(model)
    small = compact(model, plan)
    plan2 = Plan.from_json(plan.to_json())
    assert plan2.layers == plan.layers and plan2.channels == plan.channels and plan2.arch == plan.arch
    assert plan2.meta == plan.meta and plan2.constant == plan.constant == []
    fresh = build_pruned(plan2)
    fresh.load_state_dict(small.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), small(x)), name
    # The replayed module tree is the same as the compacted one, parameter by parameter.
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# Folding the shifts of removed channels
# ------------------------------------------------------------------------------------------------
def _positive_beta(g):
    return lambda n: torch.rand(n, generator=g) * 0.5 + 0.1  # relu(beta) > 0: a real constant


@pytest.mark.parametrize("arch,width", [("vgg11", 0.5), ("preresnet20", 0.5), ("densenet40", 0.25)])
def test_fold_keeps_nonzero_beta_exact(arch, width):
    """gamma = 0, beta != 0 on the removed channels of every layer: the removed channels emit the
    constant relu(beta). With ``fold`` (the default) the plan gives each such layer one constant
    channel and compaction stays exact, padded 3x3 consumers included, on any image size; without it
    the constant is dropped and the outputs change a lot."""
    g = torch.Generator().manual_seed(1)
    model = build(arch, width=width)
    randomise_bn(model, g)
    kept = silence_half(model, g, beta=_positive_beta(g))
    model.eval()
    plan = plan_from_bn(model)
    plan_drop = plan_from_bn(model, fold=False)
    assert plan.layers == plan_drop.layers == kept
    assert plan.constant == sorted(kept) and plan_drop.constant == []
    assert plan.meta["fold"] is True and plan_drop.meta["fold"] is False
    for size in (32, 48):
        x = torch.randn(2, 3, size, size, generator=g)
        folded = compact(model, plan)
        e_fold = compaction_error(model, folded, x)["rel_diff"]
        e_drop = compaction_error(model, compact(model, plan_drop), x)["rel_diff"]
        assert e_fold <= EXACT_RTOL, (size, e_fold)
        assert e_drop > 1e-2, (size, e_drop)  # the removed channels did matter
    # one constant channel per layer, and still far fewer parameters than the dense model
    for grp in folded.slim_groups():
        assert folded.get_submodule(grp.bn).num_features == len(kept[grp.bn]) + 1
    assert _num_params(folded) < _num_params(model)
    # the constant channels are part of the architecture a replayed plan builds
    fresh = build_pruned(Plan.from_json(plan.to_json()))
    fresh.load_state_dict(folded.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), folded(x))


def test_fold_is_exact_in_train_mode():
    """The constant channel (BN gamma 0, beta 1) outputs 1 in train mode too, so a compacted model
    trained further starts from exactly the masked network's batch-statistics outputs."""
    g = torch.Generator().manual_seed(9)
    model = build("vgg11", width=0.25)
    randomise_bn(model, g)
    silence_half(model, g, beta=_positive_beta(g))
    folded = compact(model, plan_from_bn(model))
    model.train(), folded.train()
    x = torch.randn(8, 3, 32, 32, generator=g)
    with torch.no_grad():
        assert_outputs_equal(model(x), folded(x), rtol=1e-4)


@pytest.mark.parametrize("arch,width,bn", [
    ("vgg11", 0.5, "features.bn7"),        # Linear classifier consumer
    ("vgg11", 0.5, "features.bn0"),        # 3x3 padded conv consumer feeding a BN
    ("preresnet164", 0.25, "layer1.0.bn1"),  # select group, 1x1 conv consumer
    ("preresnet20", 0.5, "layer2.1.bn2"),  # 3x3 conv consumer writing the residual stream
    ("densenet40", 0.25, "trans1.bn"),     # 1x1 stream conv consumer
])
def test_fold_single_layer(arch, width, bn):
    g = torch.Generator().manual_seed(2)
    model = build(arch, width=width)
    randomise_bn(model, g)
    silence_half(model, g, beta=_positive_beta(g), only={bn})
    model.eval()
    plan = plan_from_bn(model)
    assert [k for k in plan.layers if len(plan.layers[k]) < plan.channels[k]] == [bn]
    assert plan.constant == [bn]
    x = torch.randn(2, 3, 32, 32, generator=g)
    folded = compact(model, plan)
    with torch.no_grad():
        assert_outputs_equal(model(x), folded(x))
    e_drop = compaction_error(model, compact(model, plan_from_bn(model, fold=False)), x)["rel_diff"]
    assert e_drop > 1e-3, f"dropping the constant should change the output ({e_drop})"
    fresh = build_pruned(Plan.from_json(plan.to_json()))
    fresh.load_state_dict(folded.state_dict(), strict=True)


def test_negative_beta_needs_no_constant_channel():
    """relu(beta) = 0 for beta < 0: the removed channels are silent, no constant channel is added."""
    g = torch.Generator().manual_seed(10)
    model = build("vgg11", width=0.25)
    randomise_bn(model, g)
    silence_half(model, g, beta=lambda n: -torch.rand(n, generator=g) - 0.1)
    model.eval()
    plan = plan_from_bn(model)
    assert plan.constant == []
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        assert_outputs_equal(model(x), compact(model, plan)(x))


# ------------------------------------------------------------------------------------------------
# plan_from_bn
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def small_vgg():
    g = torch.Generator().manual_seed(3)
    model = build("vgg11", width=0.125)
    randomise_bn(model, g)
    with torch.no_grad():  # signed gammas: the score is |gamma|
        for grp in model.slim_groups():
            bn = model.get_submodule(grp.bn)
            bn.weight.mul_(torch.where(torch.rand(bn.num_features, generator=g) < 0.3, -1.0, 1.0))
    return model


@pytest.mark.parametrize("q", [0.0, 0.1, 0.37, 0.5, 0.9, 0.99])
def test_percent_is_the_global_percentile(small_vgg, q):
    scores = {g.bn: small_vgg.get_submodule(g.bn).weight.detach().abs() for g in small_vgg.slim_groups()}
    allv = torch.cat(list(scores.values())).sort().values
    thr = allv[int(len(allv) * q)].item() if q > 0 else -1.0
    expect = {}
    for k, s in scores.items():  # Liu et al.: channels strictly above the threshold stay
        keep = (s > thr).nonzero().flatten().tolist()
        expect[k] = keep or [int(s.argmax())]  # min_keep=1 rescues an emptied layer
    plan = plan_from_bn(small_vgg, percent=q)
    assert plan.layers == expect
    assert plan.meta["threshold"] == pytest.approx(thr)
    removed = plan.channels_total - plan.channels_kept
    assert removed <= int(len(allv) * q) + (1 if q > 0 else 0)


def test_min_keep_rescues_a_layer_below_threshold(small_vgg):
    bn = small_vgg.features.bn3
    with torch.no_grad():
        bn.weight.mul_(1e-3)  # the whole layer far below any other score
        bn.weight[5] = -2e-3  # its two strongest: 5, then the largest of the rest
    second = int(bn.weight.detach().abs().argsort(descending=True)[1])
    plan = plan_from_bn(small_vgg, percent=0.5)
    assert plan.layers["features.bn3"] == [5]
    assert plan.meta["forced_keep"] == 1
    plan2 = plan_from_bn(small_vgg, percent=0.5, min_keep=2)
    assert plan2.layers["features.bn3"] == sorted([5, second])
    assert plan2.meta["forced_keep"] == 2
    # A layer that keeps enough on its own is left alone by min_keep.
    assert plan2.layers["features.bn0"] == plan.layers["features.bn0"]
    # Without a threshold (exact zeros), an all-zero layer also keeps its min_keep strongest (index order).
    with torch.no_grad():
        bn.weight.zero_()
    plan3 = plan_from_bn(small_vgg, min_keep=3)
    assert plan3.layers["features.bn3"] == [0, 1, 2]


def test_xi_scores_replace_gamma(small_vgg):
    groups = small_vgg.slim_groups()
    g = torch.Generator().manual_seed(4)
    xi, expect = [], {}
    for grp in groups:
        n = small_vgg.get_submodule(grp.bn).num_features
        x = torch.randn(n, generator=g)
        x[torch.rand(n, generator=g) < 0.5] = 0
        x[0] = 0.3  # never an empty layer
        xi.append(x)
        expect[grp.bn] = x.nonzero().flatten().tolist()
    gammas_before = [small_vgg.get_submodule(grp.bn).weight.detach().clone() for grp in groups]
    plan = plan_from_bn(small_vgg, xi=xi)
    assert plan.layers == expect and plan.meta["criterion"] == "xi"
    # xi decides even where gamma is zero or nonzero.
    assert plan_from_bn(small_vgg).layers != expect
    for grp, gb in zip(groups, gammas_before):
        assert torch.equal(small_vgg.get_submodule(grp.bn).weight, gb)
    # percentile on |xi|
    allv = torch.cat([x.abs() for x in xi]).sort().values
    thr = allv[int(len(allv) * 0.6)].item()
    plan = plan_from_bn(small_vgg, percent=0.6, xi=xi)
    for grp, x in zip(groups, xi):
        keep = (x.abs() > thr).nonzero().flatten().tolist()
        assert plan.layers[grp.bn] == (keep or [int(x.abs().argmax())])


@pytest.mark.parametrize("kwargs,match", [
    ({"percent": 1.0}, "percent"), ({"percent": -0.1}, "percent"), ({"percent": 1.5}, "percent"),
    ({"percent": float("nan")}, "percent"), ({"min_keep": 0}, "min_keep"),
])
def test_plan_from_bn_bad_arguments(small_vgg, kwargs, match):
    with pytest.raises(ValueError, match=f"plan_from_bn.*{match}"):
        plan_from_bn(small_vgg, **kwargs)


def test_plan_from_bn_bad_xi(small_vgg):
    groups = small_vgg.slim_groups()
    xi = [small_vgg.get_submodule(g.bn).weight.detach().clone() for g in groups]
    with pytest.raises(ValueError, match="plan_from_bn.*xi has 7 tensors.*8"):
        plan_from_bn(small_vgg, xi=xi[:-1])
    bad = list(xi)
    bad[2] = torch.ones(bad[2].numel() + 1)
    with pytest.raises(ValueError, match="plan_from_bn.*features.bn2.*shape"):
        plan_from_bn(small_vgg, xi=bad)
    bad[2] = torch.ones(1, xi[2].numel())
    with pytest.raises(ValueError, match="plan_from_bn.*shape"):
        plan_from_bn(small_vgg, xi=bad)


def test_plan_from_bn_foreign_module_is_type_error():
    with pytest.raises(TypeError, match="not a slimops model"):
        plan_from_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


# ------------------------------------------------------------------------------------------------
# Plan validation and compatibility
# ------------------------------------------------------------------------------------------------
ARCH = {"arch": "vgg11", "width": 0.125, "num_classes": 10, "in_channels": 3}


@pytest.mark.parametrize("layers,channels,match", [
    ({"a": [0, 0, 1]}, {"a": 4}, "duplicate"),
    ({"a": [0, 4]}, {"a": 4}, r"outside \[0, 4\)"),
    ({"a": [-1, 2]}, {"a": 4}, r"outside \[0, 4\)"),
    ({"a": []}, {"a": 4}, "keeps no channel"),
    ({"a": [0]}, {"b": 4}, "different BN layers"),
    ({"a": [0], "b": [1]}, {"a": 4}, "different BN layers"),
    ({"a": [0, 1, 2, 3]}, {"a": 4}, "constant channels requested"),  # constant=["a"] but nothing removed
    ({"a": [0]}, {"a": 4}, "constant channels requested"),  # constant=["b"]: no such layer
])
def test_plan_validation(layers, channels, match):
    constant = []
    if match == "constant channels requested":
        constant = ["a"] if len(layers["a"]) == 4 else ["b"]
    with pytest.raises(ValueError, match=f"slimops.pruning.Plan.*{match}"):
        Plan(arch=dict(ARCH), layers=layers, channels=channels, constant=constant)


@pytest.mark.parametrize("layers,channels", [({"a": [0.7, 2]}, {"a": 4}), ({"a": [True, 2]}, {"a": 4}),
                                             ({"a": [0, 2]}, {"a": 4.9})])
def test_plan_rejects_non_integer_entries(layers, channels):
    with pytest.raises((TypeError, ValueError)):
        Plan.from_dict({"format": "slimops-plan", "version": 1, "arch": dict(ARCH), "layers": layers,
                        "channels": channels})


def test_plan_sorts_kept_indices():
    p = Plan(arch=dict(ARCH), layers={"a": [3, 0, 2]}, channels={"a": 4})
    assert p.layers == {"a": [0, 2, 3]} and p.channels_kept == 3 and p.kept_fraction == 0.75


def test_plan_from_json_errors(small_vgg, tmp_path):
    good = plan_from_bn(small_vgg).to_dict()
    with pytest.raises(ValueError, match="from_json: not JSON"):
        Plan.from_json("{this is not json")
    with pytest.raises(ValueError, match="from_json: not a slimops plan"):
        Plan.from_json(json.dumps({k: v for k, v in good.items() if k != "format"}))
    with pytest.raises(ValueError, match="from_json: not a slimops plan"):
        Plan.from_json(json.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="from_json: not a slimops plan"):
        Plan.from_json(json.dumps(dict(good, format="something-else")))
    with pytest.raises(ValueError, match="unsupported plan version 2"):
        Plan.from_json(json.dumps(dict(good, version=2)))
    with pytest.raises(ValueError, match="malformed plan"):
        Plan.from_json(json.dumps({k: v for k, v in good.items() if k != "layers"}))
    with pytest.raises(ValueError, match="malformed plan"):
        Plan.from_json(json.dumps(dict(good, layers=[1, 2])))
    bad = copy.deepcopy(good)
    bad["layers"]["features.bn0"] = [0, 0]
    with pytest.raises(ValueError, match="duplicate"):
        Plan.from_json(json.dumps(bad))
    # save / load through a file
    path = tmp_path / "plan.json"
    Plan.from_dict(good).save(str(path))
    assert Plan.load(str(path)).to_dict() == Plan.from_dict(good).to_dict()
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


@pytest.mark.parametrize("other,match", [
    (lambda: build("vgg13", width=0.125), "plan made for"),
    (lambda: build("vgg11", width=0.25), "plan made for"),
    (lambda: build("vgg11", width=0.125, num_classes=100), "plan made for"),
    (lambda: build("vgg11", width=0.125, in_channels=1), "plan made for"),
    (lambda: build("preresnet20", width=0.125), "plan made for"),
])
def test_plan_on_another_architecture(small_vgg, other, match):
    plan = plan_from_bn(small_vgg)
    model = other()
    with pytest.raises(ValueError, match=match):
        plan.check(model)
    with pytest.raises(ValueError, match=match):
        compact(model, plan)


def test_plan_with_wrong_channel_counts(small_vgg):
    plan = plan_from_bn(small_vgg)
    d = plan.to_dict()
    d["channels"]["features.bn1"] += 1
    with pytest.raises(ValueError, match="does not fit.*features.bn1"):
        compact(small_vgg, Plan.from_dict(d))
    d = plan.to_dict()
    d["channels"]["features.bnX"] = 4
    d["layers"]["features.bnX"] = [0]
    with pytest.raises(ValueError, match="does not fit.*bnX"):
        Plan.from_dict(d).check(small_vgg)


def test_foreign_module_is_type_error(small_vgg):
    plan = plan_from_bn(small_vgg)
    foreign = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    with pytest.raises(TypeError, match="not a slimops model"):
        plan.check(foreign)
    with pytest.raises(TypeError, match="not a slimops model"):
        compact(foreign, plan)


def test_compact_leaves_input_untouched(silenced):
    _, model, _, x = silenced
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    identity = {n: m.is_identity for n, m in model.named_modules() if isinstance(m, ChannelSelect)}
    with torch.no_grad():
        out_before = model(x)
    compact(model, plan_from_bn(model))
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: m.is_identity for n, m in model.named_modules() if isinstance(m, ChannelSelect)} == identity
    assert not any(getattr(m, "bias", None) is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert not hasattr(model, "slim_plan")
    with torch.no_grad():
        assert torch.equal(model(x), out_before)


@pytest.mark.parametrize("positive_beta", [False, True])
@pytest.mark.parametrize("arch,width", [("vgg11", 0.25), ("preresnet20", 0.5), ("densenet40", 0.25)])
def test_slim_twice(arch, width, positive_beta):
    g = torch.Generator().manual_seed(5)
    beta = _positive_beta(g) if positive_beta else None
    model = build(arch, width=width)
    randomise_bn(model, g)
    silence_half(model, g, beta=beta)
    model.eval()
    x = torch.randn(2, 3, 32, 32, generator=g)
    plan1 = plan_from_bn(model)
    once = compact(model, plan1)
    with torch.no_grad():
        assert_outputs_equal(model(x), once(x))
    silence_half(once, g, beta=beta)  # a second slimming round on the compacted model
    plan2 = plan_from_bn(once)
    assert plan2.channels == {grp.bn: once.get_submodule(grp.bn).num_features for grp in once.slim_groups()}
    assert bool(plan2.constant) == positive_beta
    twice = compact(once, plan2)
    with torch.no_grad():
        assert_outputs_equal(once(x), twice(x))
    assert _num_params(twice) < _num_params(once) < _num_params(model)
    assert plan2.channels_kept < plan1.channels_kept


# ------------------------------------------------------------------------------------------------
# Method configuration
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"method": "slimming"}, "unknown method 'slimming'"),
    ({"method": "prox-sgd", "penalty": "lp"}, "prox-sgd.*penalty"),
    ({"method": "prox-sgd", "penalty": "l21"}, "prox-sgd.*penalty"),
    ({"method": "prox-sgd", "penalty": "bogus"}, "prox-sgd.*penalty"),
    ({"method": "ns-lp", "a": 1.0}, "ns-lp.*a=1.0"),
    ({"method": "ns-lp", "a": 1.5}, "ns-lp"),
    ({"method": "ns-lp", "a": 0.0}, "ns-lp"),
    ({"method": "ns-tl1", "a": 0.0}, "tl1.*a > 0"),
    ({"method": "prox-sgd", "penalty": "tl1", "a": -1.0}, "tl1.*a > 0"),
    ({"method": "ns", "lam": -1e-4}, "lam and beta must be >= 0"),
    ({"method": "proximal-ns", "lam": float("nan")}, "lam and beta"),
    ({"method": "proximal-ns", "beta": -1.0}, "lam and beta"),
])
def test_method_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MethodConfig(**kwargs)


def test_method_config_defaults():
    assert MethodConfig("prox-sgd").penalty == "l1"
    assert MethodConfig("ns-tl1").penalty == "tl1"
    assert MethodConfig("ns-lp", a=0.5).penalty == "lp"
    for m in METHODS:
        MethodConfig(m, a=0.5)  # every method constructs with defaults


def test_default_lam_scales_inversely_with_steps():
    from slimops.pruning.methods import T_MIN

    for method, penalty in [("ns", None), ("proximal-ns", None), ("prox-sgd", "l1"), ("prox-sgd", "l0")]:
        ref = LAM_AT_T_REF[method] if penalty is None else LAM_AT_T_REF[method][penalty]
        assert default_lam(method, T_REF, penalty) == pytest.approx(ref)
        for steps in (T_MIN, 4321, 10 * T_REF):
            assert default_lam(method, steps, penalty) == pytest.approx(ref * T_REF / steps)
        assert default_lam(method, 1000, penalty) == pytest.approx(2 * default_lam(method, 2000, penalty))
        # runs shorter than the calibration run get its lam, never more (no collapse in a few steps)
        for steps in (1, 100, T_MIN - 1):
            assert default_lam(method, steps, penalty) == pytest.approx(default_lam(method, T_MIN, penalty))
    assert default_lam("none", 100) == 0.0
    assert default_lam("prox-sgd", 1000) == default_lam("prox-sgd", 1000, "l1")


# ------------------------------------------------------------------------------------------------
# SlimMethod updates against hand computations
# ------------------------------------------------------------------------------------------------
LR = 0.05


def _tiny_model(seed=6):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = build("vgg11", width=0.125, num_classes=5, in_channels=1)
    randomise_bn(model, g)
    with torch.no_grad():  # signed, and a few exact zeros (sign(0) = 0)
        for grp in model.slim_groups():
            w = model.get_submodule(grp.bn).weight
            w.mul_(torch.where(torch.rand(w.numel(), generator=g) < 0.3, -1.0, 1.0))
            w[0] = 0
    x = torch.randn(6, 1, 32, 32, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    return model, x, y


def _backward(model, x, y):
    model.train()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()


def _gammas(model):
    return [model.get_submodule(g.bn).weight for g in model.slim_groups()]


def _sgd_twin(model):
    gam = _gammas(model)
    ids = {id(p) for p in gam}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return torch.optim.SGD([{"params": rest}, {"params": gam}], lr=LR, momentum=0.9, weight_decay=1e-4), gam


@pytest.mark.parametrize("method,a", [("ns", 1.0), ("ns-tl1", 1.0), ("ns-tl1", 0.5)])
def test_ns_adds_the_penalty_subgradient(method, a):
    model, x, y = _tiny_model()
    s = 3e-3
    sm = SlimMethod(MethodConfig(method, lam=s, a=a), model, lr=LR)
    _backward(model, x, y)
    gam = _gammas(model)
    before = [g.grad.clone() for g in gam]
    others = {k: p.grad.clone() for k, p in model.named_parameters() if all(p is not g for g in gam)}
    sm.after_backward()
    for k, p in model.named_parameters():
        if k in others:
            assert torch.equal(p.grad, others[k]), k  # only gamma gets the penalty
    for g, b in zip(gam, before):
        w = g.detach()
        if method == "ns":
            expect = b + s * torch.sign(w)
        else:
            expect = b + s * a * (a + 1) * torch.sign(w) / (a + w.abs()) ** 2
        torch.testing.assert_close(g.grad, expect, rtol=1e-6, atol=1e-9)
    assert sm.scores() is None and sm.state_dict() == {"xi": None}


def _lockstep(sm, model, twin, opt2, x, y, steps=3, twin_after=None):
    """``steps`` steps of a SlimMethod and of a plain-SGD twin on the same batch; ``twin_after()`` runs
    after each twin step (the hand-written sparsity update being compared)."""
    for _ in range(steps):
        sm.optimizer.zero_grad(set_to_none=True)
        opt2.zero_grad(set_to_none=True)
        _backward(model, x, y)
        _backward(twin, x, y)
        sm.after_backward()
        sm.optimizer.step()
        sm.after_step()
        opt2.step()
        if twin_after is not None:
            twin_after()


def test_none_and_ns_step_like_sgd():
    """Methods without a prox term step exactly like torch.optim.SGD (after the subgradient)."""
    model, x, y = _tiny_model()
    twin = copy.deepcopy(model)
    sm = SlimMethod(MethodConfig("none"), model, lr=LR)
    opt2, _ = _sgd_twin(twin)
    _lockstep(sm, model, twin, opt2, x, y)
    for (k, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize("lam", [0.05, 2.0])
def test_prox_sgd_is_sgd_then_soft_threshold_on_gamma(lam):
    model, x, y = _tiny_model()
    twin = copy.deepcopy(model)
    sm = SlimMethod(MethodConfig("prox-sgd", penalty="l1", lam=lam), model, lr=LR)
    opt2, gam2 = _sgd_twin(twin)

    @torch.no_grad()
    def soft_threshold():
        for g in gam2:
            g.copy_(torch.sign(g) * (g.abs() - LR * lam).clamp_min(0))

    _lockstep(sm, model, twin, opt2, x, y, twin_after=soft_threshold)
    for (k, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=k)
    zeros = sum(int((g == 0).sum()) for g in _gammas(model))
    assert zeros > 0 and sm.zero_fraction() == zeros / sum(g.numel() for g in _gammas(model))


def test_proximal_ns_updates_and_keeps_xi():
    model, x, y = _tiny_model()
    twin = copy.deepcopy(model)
    lam, beta = 0.5, 100.0
    sm = SlimMethod(MethodConfig("proximal-ns", lam=lam, beta=beta), model, lr=LR)
    opt2, gam2 = _sgd_twin(twin)
    xi2 = [g.detach().clone() for g in gam2]
    xis = sm.scores()
    assert len(xis) == len(gam2) and all(torch.equal(a, b) for a, b in zip(xis, xi2))
    alpha = 1.0 / LR

    @torch.no_grad()
    def gamma_xi_step():  # Bui et al. 2023: the gamma/xi half step (docs/algorithms.md §4)
        for g, xi in zip(gam2, xi2):
            g_new = (alpha * g + beta * xi) / (alpha + beta)
            v = (alpha * xi + beta * g_new) / (alpha + beta)
            t = lam / (alpha + beta)
            xi.copy_(torch.sign(v) * (v.abs() - t).clamp_min(0))
            g.copy_(g_new)

    _lockstep(sm, model, twin, opt2, x, y, twin_after=gamma_xi_step)
    assert all(a is b for a, b in zip(sm.scores(), xis))  # the same xi tensors, updated in place
    for a, b in zip(sm.scores(), xi2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for (k, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=k)
    nz = sum(int((t == 0).sum()) for t in sm.scores())
    assert nz > 0 and sm.zero_fraction() == nz / sum(t.numel() for t in sm.scores())
    # the plan prunes on xi: exactly its zeros (a layer with no nonzero xi keeps its first channel)
    plan = plan_from_bn(model, xi=sm.scores())
    for grp, xi in zip(model.slim_groups(), sm.scores()):
        assert plan.layers[grp.bn] == ((xi != 0).nonzero().flatten().tolist() or [0]), grp.bn

    # state_dict round trip into a fresh method object
    state = copy.deepcopy(sm.state_dict())
    other = SlimMethod(MethodConfig("proximal-ns", lam=lam, beta=beta), copy.deepcopy(twin), lr=LR)
    assert not all(torch.equal(a, b) for a, b in zip(other.scores(), sm.scores()))
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.scores(), sm.scores()))
    # mismatched method state
    with pytest.raises(ValueError, match="xi present/absent"):
        other.load_state_dict({"xi": None})
    with pytest.raises(ValueError, match="xi present/absent"):
        SlimMethod(MethodConfig("ns", lam=1e-4), copy.deepcopy(twin), lr=LR).load_state_dict(state)


# ------------------------------------------------------------------------------------------------
# GlobalBatchNorm2d and the BN conversion
# ------------------------------------------------------------------------------------------------
def _bn_pair(c=5):
    torch.manual_seed(7)
    ref = nn.BatchNorm2d(c)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    glob = D.GlobalBatchNorm2d(c)
    glob.load_state_dict(ref.state_dict())
    return ref, glob


def _run_bn(bn, x, gy):
    x = x.clone().requires_grad_(True)
    y = bn(x)
    y.backward(gy)
    return y.detach(), x.grad, bn.weight.grad, bn.bias.grad


def _compare_bn(ref, glob, exact):
    g = torch.Generator().manual_seed(8)
    for step in range(3):
        x = torch.randn(4, ref.num_features, 6, 7, generator=g) * 2 + 0.5
        gy = torch.randn(4, ref.num_features, 6, 7, generator=g)
        a, b = _run_bn(ref, x, gy), _run_bn(glob, x, gy)
        for u, v, what in zip(a, b, ("out", "x.grad", "weight.grad", "bias.grad")):
            if exact:
                assert torch.equal(u, v), what
            else:
                torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-5, msg=what)
        ref.weight.grad = ref.bias.grad = glob.weight.grad = glob.bias.grad = None
    for k, v in ref.state_dict().items():
        if exact or v.dtype == torch.long:
            assert torch.equal(glob.state_dict()[k], v), k
        else:
            torch.testing.assert_close(glob.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    ref.eval(), glob.eval()
    x = torch.randn(3, ref.num_features, 4, 4, generator=g)
    with torch.no_grad():  # eval mode is the local BatchNorm2d on the (possibly reassociated) running stats
        if exact:
            assert torch.equal(ref(x), glob(x))
        else:
            torch.testing.assert_close(glob(x), ref(x), rtol=1e-5, atol=1e-5)


def test_global_batchnorm_without_process_group_is_batchnorm():
    import torch.distributed as dist

    assert not (dist.is_available() and dist.is_initialized())
    _compare_bn(*_bn_pair(), exact=True)


def test_global_batchnorm_formula_on_one_rank(monkeypatch):
    """The global-statistics branch with a world of one (all_reduce = identity) is BatchNorm2d."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as dfn

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    calls = []
    monkeypatch.setattr(dfn, "all_reduce", lambda t, *a, **k: calls.append(t.shape) or t)
    ref, glob = _bn_pair(6)
    _compare_bn(ref, glob, exact=False)
    # two all-reduces per forward: (sums, count), then the centred sums of squares
    assert calls == [torch.Size([6 + 1]), torch.Size([6])] * 3
    # momentum=None (cumulative average) follows BatchNorm2d as well
    ref, glob = _bn_pair(3)
    ref.momentum = glob.momentum = None
    _compare_bn(ref, glob, exact=False)


def test_global_batchnorm_is_as_accurate_as_batchnorm(monkeypatch):
    import torch.distributed as dist
    import torch.distributed.nn.functional as dfn

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dfn, "all_reduce", lambda t, *a, **k: t)
    g = torch.Generator().manual_seed(11)
    x64 = torch.randn(16, 4, 8, 8, generator=g, dtype=torch.float64) + 100.0
    truth = nn.BatchNorm2d(4).double()(x64)
    with torch.no_grad():
        err_bn = (nn.BatchNorm2d(4)(x64.float()).double() - truth).abs().max().item()
        err_glob = (D.GlobalBatchNorm2d(4)(x64.float()).double() - truth).abs().max().item()
    assert err_glob <= 10 * err_bn + 1e-5, (err_glob, err_bn)


@pytest.mark.parametrize("device,cls", [("cpu", D.GlobalBatchNorm2d), ("cuda", nn.SyncBatchNorm)])
def test_convert_restore_batchnorm_keep_state(device, cls):
    model = build("preresnet20", width=0.25)
    sd = model.state_dict()
    params = [id(p) for p in model.parameters()]
    groups = model.slim_groups()
    out = D.convert_batchnorm(model, torch.device(device))  # only classes change: no device needed
    assert out is model
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(type(m) is cls for m in bns)
    assert list(model.state_dict()) == list(sd)
    assert all(model.state_dict()[k] is not None and torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert [id(p) for p in model.parameters()] == params and model.slim_groups() == groups
    D.restore_batchnorm(model)
    assert all(type(m) is nn.BatchNorm2d for m in bns)
    assert not any(hasattr(m, "process_group") for m in bns)
    assert list(model.state_dict()) == list(sd)
    assert [id(p) for p in model.parameters()] == params


def test_dist_info_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = D.init_from_env(torch.device("cpu"))
    assert not info.enabled and info.is_main and info.world == 1
    D.barrier(info)
    D.shutdown(info)


# ------------------------------------------------------------------------------------------------
# Data parallel train_stage: 2 gloo processes against 1 process
# ------------------------------------------------------------------------------------------------
# Trains VGG-11 (width 0.25) with proximal NS for 2 epochs on the first n digits, once per n given, and
# saves what rank 0 holds. lr 0.01 keeps the dynamics non-chaotic over 20 steps (at lr 0.1 float32
# reassociation alone grows to ~1e-2 in the weights), so 1e-4 separates a correct data-parallel
# run (observed ~1e-6) from any real difference in batches, gradients or BN statistics.
DDP_HELPER = """
import sys
from dataclasses import replace

import torch
from torch import nn

torch.set_num_threads(1)
from slimops.data import load
from slimops.models import build
from slimops.pruning import distributed as D
from slimops.pruning.methods import MethodConfig
from slimops.pruning.train import TrainConfig, train_stage

out = sys.argv[1]
full = load("digits")
info = D.init_from_env(torch.device("cpu"))
for n in map(int, sys.argv[2:]):
    ds = replace(full, x_train=full.x_train[:n], y_train=full.y_train[:n])
    torch.manual_seed(0)
    net = build("vgg11", num_classes=10, in_channels=1, width=0.25)
    res = train_stage(net, ds, MethodConfig("proximal-ns", lam=1.25), TrainConfig(epochs=2, batch=64, lr=0.01),
                      stage="train", ckpt_path=None, resume=False, device=torch.device("cpu"), dist_info=info,
                      run_config={}, progress=False)
    if info.is_main:
        torch.save({"world": info.world, "state_dict": net.state_dict(), "xi": res.method.scores(),
                    "history": res.history,
                    "plain_bn": all(type(m) is nn.BatchNorm2d for m in net.modules()
                                    if isinstance(m, nn.modules.batchnorm._BatchNorm))}, f"{out}-{n}.pt")
D.shutdown(info)
"""
DDP_SIZES = (640, 641)  # 640 = 10 global batches of 64; 641 leaves one sample for a last batch


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    import runpy
    import sys

    from _proc import run_with_deadline

    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    d = tmp_path_factory.mktemp("ddp")
    helper = d / "helper.py"
    helper.write_text(DDP_HELPER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    r = run_with_deadline([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(helper), str(d / "two"), *map(str, DDP_SIZES)], env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    old_argv = sys.argv
    sys.argv = [str(helper), str(d / "one"), *map(str, DDP_SIZES)]
    try:
        runpy.run_path(str(helper), run_name="__main__")  # the same code in this (1-process) interpreter
    finally:
        sys.argv = old_argv
    torch.set_num_threads(1)
    return {n: (torch.load(d / f"one-{n}.pt", weights_only=False), torch.load(d / f"two-{n}.pt", weights_only=False))
            for n in DDP_SIZES}


def _max_state_diff(a: dict, b: dict) -> tuple:
    worst, where = 0.0, None
    for k, v in a.items():
        if v.is_floating_point():
            diff = (b[k] - v).abs().max().item()
            if diff >= worst:
                worst, where = diff, k
    return worst, where


def _assert_same_training(one, two):
    assert one["world"] == 1 and two["world"] == 2
    assert one["state_dict"].keys() == two["state_dict"].keys()
    for k, v in one["state_dict"].items():
        if v.is_floating_point():
            torch.testing.assert_close(two["state_dict"][k], v, rtol=1e-4, atol=1e-4, msg=k)
        else:  # num_batches_tracked: the same number of BN updates
            assert torch.equal(two["state_dict"][k], v), k
    for u, v in zip(two["xi"], one["xi"]):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)
        assert torch.equal(u == 0, v == 0)


def test_ddp_train_stage_matches_one_process(ddp_runs):
    one, two = ddp_runs[640]
    _assert_same_training(one, two)
    assert two["plain_bn"] and one["plain_bn"]  # GlobalBatchNorm2d is undone after training
    assert [h["epoch"] for h in two["history"]] == [1, 2]
    assert [h["lr"] for h in two["history"]] == [h["lr"] for h in one["history"]]
    assert [h["test_acc"] for h in two["history"]] == pytest.approx([h["test_acc"] for h in one["history"]], abs=0.01)
    worst, where = _max_state_diff(one["state_dict"], two["state_dict"])
    print(f"\nDDP train_stage, 2 x gloo vs 1 process, n=640: max |diff| {worst:.3g} at {where}")


def test_ddp_train_stage_matches_one_process_uneven(ddp_runs):
    one, two = ddp_runs[641]
    _assert_same_training(one, two)


def test_ddp_history_is_global(ddp_runs):
    one, two = ddp_runs[640]
    for h1, h2 in zip(one["history"], two["history"]):
        assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-5)
        assert h2["train_acc"] == pytest.approx(h1["train_acc"], abs=1e-9)


# ------------------------------------------------------------------------------------------------
# Checkpoint files
# ------------------------------------------------------------------------------------------------
def _valid(kind=ckpt.CHECKPOINT_FORMAT):
    return {"format": kind, "version": ckpt.FORMAT_VERSION, "payload": torch.arange(1000.0)}


def test_load_file_roundtrip(tmp_path):
    p = str(tmp_path / "c.pt")
    ckpt.atomic_save(_valid(), p)
    obj = ckpt.load_file(p, ckpt.CHECKPOINT_FORMAT, "owner")
    assert torch.equal(obj["payload"], torch.arange(1000.0))
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]


def test_load_file_missing(tmp_path):
    p = str(tmp_path / "nope" / "c.pt")
    with pytest.raises(FileNotFoundError, match=re.escape(f"owner: no such file '{p}'")):
        ckpt.load_file(p, ckpt.CHECKPOINT_FORMAT, "owner")
    with pytest.raises(FileNotFoundError):  # a directory is not a file
        ckpt.load_file(str(tmp_path), ckpt.CHECKPOINT_FORMAT, "owner")


@pytest.mark.parametrize("make,match", [
    (lambda p: open(p, "wb").write(os.urandom(4096)), "corrupted or not a torch file"),
    (lambda p: open(p, "wb").write(b""), "corrupted or not a torch file"),
    (lambda p: open(p, "w").write('{"format": "slimops-checkpoint"}'), "corrupted or not a torch file"),
    ("truncate", "corrupted or not a torch file"),
    (lambda p: torch.save(nn.Linear(3, 2).state_dict(), p), "is not a slimops-checkpoint file"),
    (lambda p: torch.save([1, 2, 3], p), "is not a slimops-checkpoint file.*list"),
    (lambda p: torch.save(_valid(ckpt.MODEL_FORMAT), p), "is not a slimops-checkpoint file.*slimops-model"),
    (lambda p: torch.save(dict(_valid(), version=99), p), "unsupported version 99"),
])
def test_load_file_bad_files(tmp_path, make, match):
    p = str(tmp_path / "bad.pt")
    if make == "truncate":
        ckpt.atomic_save(_valid(), p)
        data = open(p, "rb").read()
        open(p, "wb").write(data[: len(data) // 2])
    else:
        make(p)
    with pytest.raises(ValueError, match=re.escape(f"owner: '{p}' ") + f".*{match}"):
        ckpt.load_file(p, ckpt.CHECKPOINT_FORMAT, "owner")


def test_atomic_save_never_leaves_partial_files(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "model.pt"
    ckpt.atomic_save(_valid(), str(target))  # creates the folder
    old = target.read_bytes()
    assert sorted(os.listdir(target.parent)) == ["model.pt"]

    # 1) torch.save fails half-way (an unpicklable object after a big tensor)
    with pytest.raises(Exception):
        ckpt.atomic_save({"format": "x", "big": torch.zeros(100_000), "bad": lambda: 0}, str(target))
    assert target.read_bytes() == old
    assert sorted(os.listdir(target.parent)) == ["model.pt"]

    # 2) the writer raises after writing some bytes (e.g. a full disk, a KeyboardInterrupt)
    def writer(f):
        f.write(b"partial" * 1000)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_write(str(target), writer)
    assert target.read_bytes() == old
    assert sorted(os.listdir(target.parent)) == ["model.pt"]

    # 3) the rename fails: the temp file is cleaned up and the target keeps its old content
    def bad_replace(src, dst):
        raise OSError("simulated rename failure")

    monkeypatch.setattr(ckpt.os, "replace", bad_replace)
    with pytest.raises(OSError, match="simulated"):
        ckpt.atomic_write_text(str(target), "new text")
    monkeypatch.undo()
    assert target.read_bytes() == old
    assert sorted(os.listdir(target.parent)) == ["model.pt"]

    # a successful text write replaces the content and leaves nothing else
    ckpt.atomic_write_text(str(target), "hello")
    assert target.read_text() == "hello"
    assert sorted(os.listdir(target.parent)) == ["model.pt"]


def test_rng_state_roundtrip():
    import random

    s = ckpt.rng_state()
    a = (torch.rand(3), random.random())
    ckpt.set_rng_state(s)
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
