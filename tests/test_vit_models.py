"""The ViT zoo (slimops.models.vit, slimops.nn.vit): DeiT's layouts and parameter counts, timm's state-dict keys,
any input size, the width rule, attention against its formula, MACs with the attention products, and the slim
pipeline's handling of a model without BatchNorm slim groups."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import slimops.models as M
from slimops.nn.vit import ViTAttention, ViTMlp
from slimops.pruning.config import SlimConfig
from slimops.pruning.metrics import count_macs

pytestmark = pytest.mark.usefixtures("one_thread")

# DeiT (Touvron et al. 2021, Table 1) / timm: dim, heads, and the exact parameter counts at 224², patch 16, 1000 classes
PUBLISHED = {"vit_ti": (192, 3, 5_717_416, 5.7e6), "vit_s": (384, 6, 22_050_664, 22.1e6),
             "deit_b": (768, 12, 86_567_656, 86.6e6)}


def timm_keys(dim, depth=12, mlp=4, patch=16, in_ch=3, img=224, classes=1000):
    """The state-dict keys and shapes of timm's VisionTransformer (class token, no register tokens, qkv bias,
    LayerScale off), written out here from timm's layout, not from our model."""
    n = (img // patch) ** 2
    keys = {"cls_token": (1, 1, dim), "pos_embed": (1, n + 1, dim), "patch_embed.proj.weight": (dim, in_ch, patch, patch),
            "patch_embed.proj.bias": (dim,), "norm.weight": (dim,), "norm.bias": (dim,),
            "head.weight": (classes, dim), "head.bias": (classes,)}
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,), b + "attn.qkv.weight": (3 * dim, dim),
                     b + "attn.qkv.bias": (3 * dim,), b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                     b + "norm2.weight": (dim,), b + "norm2.bias": (dim,), b + "mlp.fc1.weight": (mlp * dim, dim),
                     b + "mlp.fc1.bias": (mlp * dim,), b + "mlp.fc2.weight": (dim, mlp * dim), b + "mlp.fc2.bias": (dim,)})
    return keys


@pytest.mark.parametrize("name", M.VIT_MODELS)
def test_parameter_counts_are_deits(name):
    dim, heads, exact, published = PUBLISHED[name]
    with torch.device("meta"):
        m = M.build(name, num_classes=1000)
    n = sum(p.numel() for p in m.parameters())
    assert n == exact and abs(n - published) / published < 0.01
    assert m.embed_dim == dim and all(b.attn.num_heads == heads and b.attn.head_dim == 64 for b in m.blocks)
    assert m.config() == {"arch": name, "width": 1.0, "num_classes": 1000, "in_channels": 3, "img_size": 224, "patch": 16}


@pytest.mark.parametrize("name", M.VIT_MODELS)
def test_a_timm_state_dict_loads_strictly(name):
    dim = PUBLISHED[name][0]
    want = timm_keys(dim)
    with torch.device("meta"):
        m = M.build(name, num_classes=1000)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == want
    if name == "vit_ti":  # a real load (the larger ones are checked on shapes only, to keep the suite fast)
        m = M.build(name, num_classes=1000)
        sd = {k: torch.randn(s) for k, s in want.items()}
        m.load_state_dict(sd, strict=True)
        assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())


def test_small_patch_model_runs_at_any_size_and_backprops():
    m = M.build("vit_ti", num_classes=10, in_channels=1, width=0.25, img_size=32)
    assert (m.patch, m.grid, m.embed_dim) == (4, 8, 48) and m.pos_embed.shape == (1, 65, 48)
    for size in ((32, 32), (20, 28), (4, 4), (64, 48)):
        y = m(torch.randn(2, 1, *size))
        assert y.shape == (2, 10) and torch.isfinite(y).all()
    assert m.pos_embed_for(8, 8) is m.pos_embed
    m(torch.randn(3, 1, 32, 32)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    with pytest.raises(ValueError, match="H, W >= 4"):
        m(torch.randn(1, 1, 3, 32))
    with pytest.raises(ValueError, match=r"expected input \(B, 1, H, W\)"):
        m(torch.randn(1, 3, 32, 32))


def test_interpolated_positions_keep_the_class_token_and_the_built_grid():
    m = M.build("vit_ti", num_classes=10, width=0.125, img_size=32)
    pe = m.pos_embed_for(4, 6)
    assert pe.shape == (1, 1 + 24, m.embed_dim)
    torch.testing.assert_close(pe[:, 0], m.pos_embed[:, 0])
    back = m.pos_embed_for(8, 8)
    assert back is m.pos_embed


@pytest.mark.parametrize("width,d", [(1.0, 64), (0.5, 32), (0.25, 16), (0.1, 8), (0.01, 8), (1.5, 96)])
def test_width_scales_the_head_dim_not_the_heads(width, d):
    with torch.device("meta"):
        m = M.build("vit_s", width=width, img_size=32)
    assert m.embed_dim == 6 * d
    assert all(b.attn.head_dim == d and b.attn.num_heads == 6 and b.mlp.hidden == 4 * 6 * d for b in m.blocks)


def test_attention_is_softmax_attention():
    torch.manual_seed(0)
    att = ViTAttention(24, 3).double()
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    q, k, v = att.qkv(x).reshape(2, 7, 3, 3, 8).permute(2, 0, 3, 1, 4)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    want = att.proj((p @ v).transpose(1, 2).reshape(2, 7, 24))
    torch.testing.assert_close(att(x), want)


def test_resize_updates_the_attributes_with_the_layers():
    att = ViTAttention(24, 3)
    att.resize(torch.nn.Linear(24, 3 * 2 * 5), torch.nn.Linear(10, 24), num_heads=2, head_dim=5)
    assert (att.num_heads, att.head_dim, att.attn_dim, att.scale) == (2, 5, 10, 5 ** -0.5)
    assert att(torch.randn(1, 4, 24)).shape == (1, 4, 24)
    with pytest.raises(ValueError, match="do not fit 2 heads of q/k dim 6 and v dim 6 on 24 of 24 input dims"):
        att.resize(torch.nn.Linear(24, 30), torch.nn.Linear(10, 24), num_heads=2, head_dim=6)
    mlp = ViTMlp(24, 96)
    mlp.resize(torch.nn.Linear(24, 40), torch.nn.Linear(40, 24))
    assert mlp.hidden == 40 and mlp(torch.randn(3, 24)).shape == (3, 24)
    with pytest.raises(ValueError, match="fc1 has 40 outputs but fc2 41 inputs"):
        mlp.resize(torch.nn.Linear(24, 40), torch.nn.Linear(41, 24))


def test_macs_count_the_attention_products():
    m = M.build("vit_ti", num_classes=1000)
    dim, n = 192, 197
    per_block = n * (3 * dim * dim + dim * dim + 2 * 4 * dim * dim) + 2 * n * n * dim
    want = 196 * dim * 3 * 16 * 16 + 12 * per_block + 1000 * dim
    assert count_macs(m, (3, 224, 224)) == want  # 1.254e9 MACs: DeiT-Ti's published 1.3 GFLOPs (as MACs)


def test_build_arguments_are_checked():
    with pytest.raises(ValueError, match="vgg11 runs at any input size and takes no img_size"):
        M.build("vgg11", img_size=32)
    with pytest.raises(ValueError, match="patch must be a positive int"):
        M.build("vit_ti", img_size=32, patch=0)
    with pytest.raises(ValueError, match=r"patch \(64\) must not exceed img_size \(32\)"):
        M.build("vit_ti", img_size=32, patch=64)
    with pytest.raises(ValueError, match="img_size must be a positive int"):
        M.build("vit_ti", img_size=32.0)
    with pytest.raises(ValueError, match="drop_path"):
        M.VisionTransformer("vit_ti", drop_path=1.0)


def test_build_from_config_rebuilds_the_resolution():
    m = M.build("vit_ti", num_classes=10, in_channels=1, width=0.25, img_size=32, patch=8)
    r = M.build_from_config(json.loads(json.dumps(m.config())))
    assert r.config() == m.config() and r.pos_embed.shape == m.pos_embed.shape
    huge = {**m.config(), "img_size": 2**20, "patch": 1}
    with pytest.raises(ValueError, match="more than the limit"):
        M.build_from_config(huge)


def test_drop_path_grows_linearly():
    m = M.VisionTransformer("vit_ti", num_classes=10, width=0.125, img_size=32, drop_path=0.1)
    rates = [b.drop_path.p for b in m.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)


def test_slim_config_knows_what_a_vit_takes():
    SlimConfig(model="vit_ti", method="none", patch=4)
    with pytest.raises(ValueError, match="method must be none, vtp, sidt or patch-slim for vit_ti"):
        SlimConfig(model="vit_ti", method="proximal-ns")
    with pytest.raises(ValueError, match="patch must be None for vgg11"):
        SlimConfig(model="vgg11", patch=4)
    with pytest.raises(ValueError, match=r"patch must be an integer in \[1, "):
        SlimConfig(model="vit_ti", method="none", patch=0)


def test_a_vit_trains_through_the_pipeline_and_its_files_load_back(tmp_path):
    from slimops.pruning.pipeline import slim
    from slimops.pruning.pipeline import evaluate_file

    out = str(tmp_path / "run")
    res = slim(SlimConfig(model="vit_ti", width=0.125, method="none", epochs=1, lr=0.05, batch=128, out=out,
                          progress=False, plots=False, bn_recal=0, patch=8))
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["status"] == "done" and metrics["model"]["patch"] == 8 and metrics["model"]["img_size"] == 32
    assert metrics["params_dense"] == metrics["params_pruned"] > 0 and metrics["flops_dense"] == metrics["flops_pruned"]
    ev = evaluate_file(weights=os.path.join(out, "pruned.pt"))
    assert ev["acc"] == pytest.approx(res["acc"])
