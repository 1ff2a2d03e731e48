"""Tests of the CIFAR model zoo (``slimops.models``) and ``slimops.nn.ChannelSelect``.

Parameter counts are asserted exactly (they follow from the architecture) and compared with the
numbers Liu et al. (ICCV 2017) and He et al. publish; the slimming spec is checked structurally and
by a miniature compaction that must reproduce the outputs of the masked network.
"""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from slimops.models import MODELS, VIT_MODELS, SlimGroup, SlimmableModel, arch_summary, build

# The models slimmed by their BatchNorms (every test below); the ViTs have none: tests/test_vit_models.py.
BN_MODELS = tuple(m for m in MODELS if m not in VIT_MODELS)
from slimops.nn import ChannelSelect

# Exact counts measured for width 1, 10 classes, 3 input channels, and the published figure.
PARAMS = {
    "vgg19": (20_035_018, 20.04e6),      # Liu et al. Table 1
    "preresnet164": (1_703_258, 1.70e6),  # Liu et al. Table 1
    "preresnet20": (272_282, 0.27e6),     # He et al. 2016 (CIFAR ResNet-20)
    "preresnet56": (855_578, 0.85e6),     # He et al. 2016 (CIFAR ResNet-56)
    "densenet40": (1_059_298, 1.02e6),    # Liu et al. Table 1
}


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def zoo():
    """Every model at width 1 / 10 classes, built once for the module."""
    torch.manual_seed(0)
    return {name: build(name) for name in BN_MODELS}


# ----------------------------------------------------------------------------------------------
# parameter counts


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_counts(zoo, name):
    exact, published = PARAMS[name]
    assert _num_params(zoo[name]) == exact
    # 1% holds for VGG-19 (0.03%), ResNet-164 (0.2%), ResNet-20 (0.8%) and ResNet-56 (0.7%: He et al.'s
    # 0.85M uses parameter-free shortcuts; our 1×1 projections add 16·32 + 32·64 = 2,560). DenseNet-40
    # is 3.9% above the 1.02M of Liu et al.; the closed form below shows the architecture is the one
    # specified (stem 24, growth 12, 3×12 layers, full-width transitions), so the gap is in the
    # published figure, and 5% is the tolerance agreed for it.
    tol = 0.05 if name == "densenet40" else 0.01
    assert abs(exact - published) / published < tol


def test_densenet40_count_closed_form():
    k, n, c, convs, bns = 12, 12, 24, 3 * 9 * 24, 0
    for block in range(3):
        for _ in range(n):
            convs, bns, c = convs + 9 * c * k, bns + 2 * c, c + k
        if block < 2:
            convs, bns = convs + c * c, bns + 2 * c
    expected = convs + bns + 2 * c + c * 10 + 10
    assert expected == PARAMS["densenet40"][0] == _num_params(build("densenet40"))


def test_other_vgg_counts(zoo):
    # Same rule as VGG-19 (3×3 convs without bias, BN γ/β, one Linear); values measured.
    assert {n: _num_params(zoo[n]) for n in ("vgg11", "vgg13", "vgg16")} == {
        "vgg11": 9_228_362, "vgg13": 9_413_066, "vgg16": 14_724_042}


# ----------------------------------------------------------------------------------------------
# forward shapes: a 2^(4-1) fractional factorial over (in_channels, num_classes, width, resolution)
# — every pair of levels of every two factors occurs — for each model.

_LEVELS = [(1, 3), (10, 100), (0.5, 1.0), (32, 40)]
_RUNS = [tuple(_LEVELS[f][b] for f, b in enumerate(bits + (sum(bits) % 2,)))
         for bits in itertools.product((0, 1), repeat=3)]


@pytest.mark.parametrize("name", BN_MODELS)
def test_forward_shapes(name):
    torch.manual_seed(0)
    for in_channels, num_classes, width, res in _RUNS:
        model = build(name, num_classes=num_classes, in_channels=in_channels, width=width)
        with torch.no_grad():
            y = model(torch.randn(2, in_channels, res, res))
        assert y.shape == (2, num_classes), (in_channels, num_classes, width, res)
        assert torch.isfinite(y).all()
        assert model.config() == {"arch": name, "width": width, "num_classes": num_classes,
                                  "in_channels": in_channels}


def test_backward_reaches_every_parameter():
    model = build("preresnet20", width=0.25)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# initialisation and width


@pytest.mark.parametrize("name", BN_MODELS)
def test_bn_init(zoo, name):
    bns = [m for m in zoo[name].modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert torch.all(bn.weight == 0.5) and torch.all(bn.bias == 0)


def test_conv_and_linear_init(zoo):
    vgg = zoo["vgg19"]
    conv = vgg.features.conv10  # 512 -> 512, 3x3: He-normal fan_out std sqrt(2 / (9 * 512))
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 512)), rel=0.02)
    assert vgg.classifier.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(vgg.classifier.bias == 0)


def test_width_scaling():
    vgg = build("vgg19", width=0.5)
    outs = [m.out_channels for m in vgg.modules() if isinstance(m, nn.Conv2d)]
    assert outs == [32, 32, 64, 64] + [128] * 4 + [256] * 8
    assert vgg.classifier.in_features == 256
    # round(19.2) = 19, round(38.4) = 38, round(76.8) = 77, round(153.6) = 154
    vgg11 = build("vgg11", width=0.3)
    assert [m.out_channels for m in vgg11.modules() if isinstance(m, nn.Conv2d)] == [19, 38, 77, 77] + [154] * 4
    # tiny widths never produce empty layers
    assert all(m.out_channels == 1 for m in build("vgg11", width=1e-3).modules() if isinstance(m, nn.Conv2d))

    r164 = build("preresnet164", width=0.5)
    assert r164.conv1.out_channels == 8
    assert [getattr(r164, f"layer{s}")[0].conv3.out_channels for s in (1, 2, 3)] == [32, 64, 128]
    assert r164.layer3[0].conv1.out_channels == 32 and r164.fc.in_features == 128
    r20 = build("preresnet20", width=0.5)
    assert [getattr(r20, f"layer{s}")[0].conv2.out_channels for s in (1, 2, 3)] == [8, 16, 32]

    d40 = build("densenet40", width=0.5)
    assert d40.conv1.out_channels == 12 and d40.growth == 6
    assert d40.fc.in_features == 12 + 36 * 6
    assert build("densenet40").fc.in_features == 24 + 36 * 12


# ----------------------------------------------------------------------------------------------
# slimming spec


def _check_groups(model: SlimmableModel):
    groups = model.slim_groups()
    assert all(isinstance(g, SlimGroup) for g in groups)
    bn_names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert [g.bn for g in groups] == bn_names  # every BN exactly once, in module order
    for g in groups:
        bn = model.get_submodule(g.bn)
        c = bn.num_features
        assert (g.producer is None) != (g.select is None)
        if g.producer is not None:
            producer = model.get_submodule(g.producer)
            assert isinstance(producer, nn.Conv2d) and producer.out_channels == c
        else:
            select = model.get_submodule(g.select)
            assert isinstance(select, ChannelSelect) and select.num_selected == c
        assert g.consumers
        for name in g.consumers:
            consumer = model.get_submodule(name)
            if isinstance(consumer, nn.Conv2d):
                assert consumer.in_channels == c, (g, name)
            else:
                assert isinstance(consumer, nn.Linear) and consumer.in_features == c, (g, name)
    assert arch_summary(model) == {g.bn: model.get_submodule(g.bn).num_features for g in groups}
    return groups


@pytest.mark.parametrize("name", BN_MODELS)
def test_slim_groups_cover_every_bn(zoo, name):
    groups = _check_groups(zoo[name])
    _check_groups(build(name, width=0.5, num_classes=100, in_channels=1))
    if name.startswith("vgg"):
        assert all(g.producer is not None for g in groups)
        assert groups[-1].consumers == ("classifier",)
    elif name.startswith("preresnet"):
        # per block: bn1 reads the residual stream (select); bn2/bn3 follow their conv (producer)
        for g in groups[:-1]:
            assert (g.select is not None) == g.bn.endswith(".bn1"), g
        assert any(g.bn.endswith(".bn3") for g in groups) == (name == "preresnet164")
        assert groups[-1] == SlimGroup("bn", None, "select", ("fc",))
    elif name == "densenet40":
        assert all(g.select is not None for g in groups)
        assert groups[-1] == SlimGroup("bn", None, "select", ("fc",))


def test_slim_group_validation():
    with pytest.raises(ValueError, match="exactly one of producer/select"):
        SlimGroup("bn", "conv", "select", ("fc",))
    with pytest.raises(ValueError, match="exactly one of producer/select"):
        SlimGroup("bn", None, None, ("fc",))
    with pytest.raises(ValueError, match="consumers"):
        SlimGroup("bn", "conv", None, ())
    with pytest.raises(TypeError, match="arch_summary"):
        arch_summary(nn.Linear(2, 2))


def _compact(model: SlimmableModel, keep: dict[str, torch.Tensor]) -> None:
    """Physically remove channels following the spec (a miniature of the compaction engine)."""
    for g in model.slim_groups():
        k = keep[g.bn]
        bn = model.get_submodule(g.bn)
        for name in ("weight", "bias"):
            setattr(bn, name, nn.Parameter(getattr(bn, name).data[k].clone()))
        bn.running_mean, bn.running_var = bn.running_mean[k].clone(), bn.running_var[k].clone()
        bn.num_features = len(k)
        if g.producer is not None:
            conv = model.get_submodule(g.producer)
            conv.weight = nn.Parameter(conv.weight.data[k].clone())
            conv.out_channels = len(k)
        else:
            select = model.get_submodule(g.select)
            select.set_index(select.index[k])
        for name in g.consumers:
            m = model.get_submodule(name)
            m.weight = nn.Parameter(m.weight.data[:, k].clone())
            if isinstance(m, nn.Conv2d):
                m.in_channels = len(k)
            else:
                m.in_features = len(k)


@pytest.mark.parametrize("name", ["vgg11", "preresnet20", "preresnet164", "densenet40"])
def test_spec_compaction_matches_masking(name):
    """Zeroing γ and β of a channel silences it exactly (ReLU(0) = 0), so physically removing it as
    the spec says must give the same outputs: this catches a missing or wrong consumer/producer."""
    torch.manual_seed(0)
    model = build(name, width=0.25).eval()
    keep = {}
    for g in model.slim_groups():
        bn = model.get_submodule(g.bn)
        c = bn.num_features
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            k = torch.randperm(c)[: max(1, c // 2)].sort().values
            drop = torch.ones(c, dtype=torch.bool)
            drop[k] = False
            bn.weight[drop] = 0
            bn.bias[drop] = 0
        keep[g.bn] = k
    pruned = copy.deepcopy(model)
    _compact(pruned, keep)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-4, atol=1e-5)
    assert _num_params(pruned) < _num_params(model)
    assert arch_summary(pruned) == {b: len(k) for b, k in keep.items()}
    _check_groups(pruned)
    # A compacted state_dict carries the selections; loading it into a compacted twin restores them.
    twin = copy.deepcopy(pruned)
    for m in twin.modules():
        if isinstance(m, ChannelSelect):
            m.set_index(torch.arange(m.num_selected))
    twin.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(twin(x), pruned(x))


# ----------------------------------------------------------------------------------------------
# ChannelSelect


def test_channel_select_identity_and_gather():
    cs = ChannelSelect(5)
    x = torch.randn(2, 5, 3, 3)
    assert cs.is_identity and cs.index.dtype == torch.long and cs(x) is x
    cs.set_index(torch.tensor([3, 0, 4], dtype=torch.int32))
    assert not cs.is_identity and cs.index.dtype == torch.long and cs.num_selected == 3
    torch.testing.assert_close(cs(x), x[:, [3, 0, 4]])
    cs.set_index(torch.tensor([], dtype=torch.long))
    assert cs(x).shape == (2, 0, 3, 3)
    cs.set_index(torch.tensor([1, 0, 2, 3, 4]))  # a permutation is not the identity
    torch.testing.assert_close(cs(x), x[:, [1, 0, 2, 3, 4]])
    cs.set_index(torch.arange(5))
    assert cs.is_identity and cs(x) is x
    # dtype casts leave the integer buffer alone
    assert cs.double().index.dtype == torch.long
    cs.set_index(torch.tensor([0]))
    with pytest.raises(ValueError, match="slimops.nn.ChannelSelect: expected input with 5 channels"):
        cs(torch.randn(2, 6, 3, 3))


@pytest.mark.parametrize("index, err, msg", [
    ([0, 1], TypeError, "must be a torch.Tensor"),
    (torch.tensor([0.0, 1.0]), TypeError, "integer dtype"),
    (torch.tensor([True, False]), TypeError, "integer dtype"),
    (torch.tensor([[0, 1]]), ValueError, "1-D"),
    (torch.tensor([0, 4]), ValueError, r"\[0, 4\)"),
    (torch.tensor([-1, 2]), ValueError, r"\[0, 4\)"),
    (torch.tensor([1, 1]), ValueError, "duplicate"),
])
def test_channel_select_bad_index(index, err, msg):
    cs = ChannelSelect(4)
    with pytest.raises(err, match=rf"slimops\.nn\.ChannelSelect\.set_index: .*{msg}"):
        cs.set_index(index)
    assert cs.is_identity and torch.equal(cs.index, torch.arange(4))


@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_channel_select_bad_num_channels(n):
    with pytest.raises(ValueError, match="slimops.nn.ChannelSelect: num_channels"):
        ChannelSelect(n)


def test_channel_select_state_dict_round_trip():
    src = ChannelSelect(6)
    src.set_index(torch.tensor([5, 2]))
    sd = src.state_dict()
    assert list(sd) == ["index"]  # persistent buffer
    dst = ChannelSelect(6)
    dst.load_state_dict(sd)
    assert not dst.is_identity and torch.equal(dst.index, torch.tensor([5, 2]))
    x = torch.randn(1, 6, 2, 2)
    torch.testing.assert_close(dst(x), src(x))
    # and back to the full identity: the fast path comes back with it
    dst.load_state_dict(ChannelSelect(6).state_dict())
    assert dst.is_identity and dst(x) is x
    with pytest.raises(RuntimeError, match=r"slimops\.nn\.ChannelSelect\.load_state_dict: .*duplicate"):
        dst.load_state_dict({"index": torch.tensor([1, 1])})
    assert dst.is_identity


# ----------------------------------------------------------------------------------------------
# argument errors


@pytest.mark.parametrize("kwargs, arg", [
    ({"width": 0}, "width"), ({"width": -0.5}, "width"), ({"width": float("nan")}, "width"),
    ({"width": float("inf")}, "width"), ({"width": "1"}, "width"),
    ({"num_classes": 0}, "num_classes"), ({"num_classes": 2.5}, "num_classes"),
    ({"num_classes": True}, "num_classes"),
    ({"in_channels": 0}, "in_channels"), ({"in_channels": -3}, "in_channels"),
])
def test_build_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=rf"slimops\.models\.build: {arg}"):
        build("vgg11", **kwargs)


def test_build_unknown_name():
    with pytest.raises(ValueError, match=r"slimops\.models\.build: unknown model 'resnet50' "
                                         r"\(expected one of: vgg11, .*gfnet_ti, sema_t, vit_ti, vit_s, deit_b\)"):
        build("resnet50")
    assert MODELS == ("vgg11", "vgg13", "vgg16", "vgg19", "preresnet20", "preresnet56",
                      "preresnet164", "densenet40", "afidaf_t", "afidaf", "gfnet_ti", "sema_t", "vit_ti", "vit_s",
                      "deit_b")
