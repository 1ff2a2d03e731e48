"""Dimension pruning of SEMA-T (VTP / SiDT on its SEMA blocks; slimops.pruning.vit): gates on the attention's qkv
input and value dims and on the MLP units, per-block plans (the stages differ in width), exact compaction that
also cuts the in_proj rows and dwc channels feeding the removed qkv inputs, the MACs of SEMA attention, and the
pipeline."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import slimops.models as M
from slimops.nn import SEMAAttention, SEMABlock
from slimops.pruning.metrics import count_macs, count_params
from slimops.pruning.vit import ViTPlan, compact_vit, vit_plan_from_gates, zero_removed_gates

from _gates import check_plan_round_trip, random_gates

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCKS = 2 + 4 + 8 + 4


def _gated(seed=0, width=0.25, **kw):
    torch.manual_seed(seed)
    return M.build("sema_t", num_classes=10, in_channels=1, width=width, gates=True, **kw).eval()


def _x(n=3, size=32):
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(7))


def test_gates_start_as_the_identity_and_an_ungated_checkpoint_loads():
    m = _gated()
    plain = M.build("sema_t", num_classes=10, in_channels=1, width=0.25).eval()
    # the MLP keeps the nn.Sequential names of earlier SEMA-T checkpoints (mlp.0 / mlp.2)
    assert "stages.0.blocks.0.mlp.0.weight" in plain.state_dict() and "stages.0.blocks.0.mlp.2.bias" in plain.state_dict()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if "gate" not in k}, strict=True)
    x = _x()
    torch.testing.assert_close(m(x), plain(x))
    assert len(m.gates()) == 3 * BLOCKS and m.config()["gates"] is True and "gates" not in plain.config()
    assert not plain.gated and m.gated
    m(x).sum().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in m.gates().values())
    again = M.build_from_config(m.config())
    assert again.gated and set(again.state_dict()) == set(m.state_dict())


@pytest.mark.parametrize("zero_fraction", [0.0, 0.4, 0.8])
def test_compaction_is_exact_smaller_and_cuts_the_attention_branch(zero_fraction):
    m = random_gates(_gated(), zero_fraction)
    plan = vit_plan_from_gates(m)
    assert isinstance(plan.dims, list) and [d["dim"] for d in plan.dims] == [16] * 2 + [32] * 4 + [64] * 8 + [128] * 4
    small = compact_vit(m, plan)
    for size in (32, 20, 8):  # other grids too: the windows clip, the mean covers what is there
        x = _x(size=size)
        torch.testing.assert_close(small(x), m(x), rtol=1e-5, atol=1e-5)
    assert not small.gated and not small.gates()
    for b, p, i in zip(small.gated_blocks(), plan.blocks, range(BLOCKS)):
        a = b.attn
        assert a.num_heads == len(plan.heads_kept(i)) and a.v_dim == plan.v_dim(i) and b.mlp.hidden == len(p["hidden"])
        assert a.in_dim == len(p["in"]) == b.in_proj.out_features == b.dwc.in_channels == b.dwc.out_channels
        assert a.dim == b.dim == b.in_proj.in_features == a.proj.out_features  # the block's width is unchanged
    if zero_fraction > 0:
        assert count_params(small) < count_params(m)
        assert count_macs(small, (1, 32, 32)) < count_macs(m, (1, 32, 32))
    else:
        assert count_macs(small, (1, 32, 32)) == count_macs(m, (1, 32, 32))


def test_compacted_blocks_train():
    """A compacted block (fewer qkv inputs, padded value dims) has gradients for every weight: fine-tuning works."""
    m = random_gates(_gated(), 0.5)
    small = compact_vit(m, vit_plan_from_gates(m)).train()
    small(_x()).logsumexp(-1).sum().backward()
    blk = small.stages[2].blocks[0]
    assert blk.attn.v_dim < blk.attn.head_dim  # a padded block
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in small.parameters())


def test_percent_plan_prunes_the_lowest_gates_over_all_stages_and_stays_exact():
    m = random_gates(_gated(), 0.0)
    plan = vit_plan_from_gates(m, percent=0.4)
    gates = torch.cat([w.detach().flatten() for w in m.gates().values()])
    assert plan.meta["threshold"] == pytest.approx(float(gates.abs().kthvalue(int(0.4 * gates.numel())).values))
    s = plan.summary()
    assert s["gated_dims_total"] == gates.numel() and 0.55 < s["gated_dims_kept"] < 0.65
    small = compact_vit(m, plan)
    ref = zero_removed_gates(m, plan)
    torch.testing.assert_close(small(_x()), ref(_x()), rtol=1e-5, atol=1e-5)


def test_a_head_with_no_value_dim_goes_whole():
    m = _gated()
    blk = m.stages[3].blocks[1]  # 16 heads of 8 dims at width 0.25
    att = blk.attn
    hd = att.head_dim
    with torch.no_grad():
        g = att.gate_out.weight.view(att.num_heads, hd)
        g[:5] = 0                   # five heads gone
        g[5, : hd // 2] = 0         # one head with half its value dims: every kept head is padded to the widest
    plan = vit_plan_from_gates(m)
    i = 2 + 4 + 8 + 1
    assert plan.heads_kept(i) == list(range(5, 16)) and plan.v_dim(i) == hd
    a = compact_vit(m, plan).stages[3].blocks[1].attn
    assert (a.num_heads, a.head_dim, a.v_dim) == (11, hd, hd)
    torch.testing.assert_close(compact_vit(m, plan)(_x()), m(_x()), rtol=1e-5, atol=1e-5)


def test_plan_json_round_trip_build_pruned_and_mismatches(tmp_path):
    m = random_gates(_gated(), 0.5)
    plan = vit_plan_from_gates(m)
    check_plan_round_trip(m, plan, _x(), tmp_path)
    other = _gated(width=0.5)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="the plan was made for 18 blocks of"):
        compact_vit(other, plan)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    vit_plan = vit_plan_from_gates(random_gates(M.build("vit_ti", width=0.125, img_size=32, gates=True), 0.3))
    with pytest.raises(ValueError, match="the plan was made for 12 blocks"):  # a ViT plan does not fit SEMA-T
        compact_vit(other, vit_plan)


@pytest.mark.parametrize("edit,msg", [
    (lambda d: d["dims"].pop(), r"dims must be one dict, or one per block \(18\), got 17"),
    (lambda d: d["dims"][3].update({"hidden": -1}), r"dims\[3\]\['hidden'\] must be a positive integer"),
    (lambda d: d["blocks"][17].update({"in": [0, 128]}), r"block 17 'in' has an index out of range \[0, 128\)"),
    (lambda d: d["blocks"][0].update({"v": [[0]] * 3}), "must list the kept value dims of each of the 2 heads"),
])
def test_bad_per_block_plans_are_clear_errors(edit, msg):
    d = vit_plan_from_gates(random_gates(_gated(), 0.3)).to_dict()
    edit(d)
    with pytest.raises(ValueError, match=msg):
        ViTPlan.from_dict(d)


@pytest.mark.parametrize("grid,window,neighborhood", [((9, 7), 4, False), ((7, 7), 7, False), ((9, 7), 4, True),
                                                      ((3, 5), 7, False)])
def test_sema_attention_macs_count_the_window_products(grid, window, neighborhood):
    att = SEMAAttention(16, 2, window, neighborhood=neighborhood)
    n = grid[0] * grid[1]
    wh, ww = att.window_for(*grid)
    if neighborhood:
        pairs = n * wh * ww
    else:  # brute force: each query sees the tokens of its window
        r = torch.arange(grid[0])[:, None].expand(grid).flatten() // wh
        c = torch.arange(grid[1])[None, :].expand(grid).flatten() // ww
        win = r * 1000 + c
        pairs = int((win[:, None] == win[None, :]).sum())
    linear = n * 16 * 48 + n * 16 * 16  # qkv and proj
    assert count_macs(att, (*grid, 16)) == linear + 2 * (pairs * (8 + 8) + n * 8)  # att takes (1, H, W, 16)


def test_a_model_with_sema_attention_counts_it():
    m = M.build("sema_t", num_classes=1000)
    macs = count_macs(m, (3, 224, 224))
    assert 3.8e9 < macs < 4.0e9  # MLLA-T, with linear attention, is 4.2 GFLOPs (as MACs) at 224


def test_config_and_method_checks():
    from slimops.pruning.config import SlimConfig
    from slimops.pruning.methods import MethodConfig, SlimMethod

    SlimConfig(model="sema_t", method="sidt", lam=1.0)
    SlimConfig(model="sema_t", method="vtp", lam=0.01)
    SlimConfig(model="sema_t", method="ns")  # its stem BatchNorm is still a slim group
    with pytest.raises(ValueError, match="prunes the tokens of a ViT"):
        SlimConfig(model="sema_t", method="patch-slim")
    with pytest.raises(ValueError, match="prunes the dimension gates of a transformer"):
        SlimConfig(model="vgg11", method="sidt", lam=1.0)
    with pytest.raises(ValueError, match="vgg11 takes no gates"):
        M.build("vgg11", gates=True)
    with pytest.raises(ValueError, match="gates must be True or False"):
        M.build("sema_t", gates=1)
    with pytest.raises(ValueError, match="the model has none"):
        SlimMethod(MethodConfig("sidt", lam=0.5), M.build("sema_t", width=0.25), lr=0.1)
    m = _gated()
    sm = SlimMethod(MethodConfig("sidt", lam=0.5, penalty="tl1"), m, lr=1e-3, optimizer="adamw")
    assert {id(p) for p in sm.optimizer.param_groups[-1]["params"]} == {id(w) for w in m.gates().values()}


def test_block_resize_checks():
    blk = SEMABlock(16, 2, window=4)
    with pytest.raises(ValueError, match="resize_attention_input: in_proj"):
        blk.resize_attention_input(nn.Linear(16, 8), blk.dwc)
    with pytest.raises(ValueError, match="SEMAAttention.resize: qkv"):
        blk.attn.resize(nn.Linear(16, 42), nn.Linear(8, 16), num_heads=2, head_dim=8, v_dim=4)


def test_sidt_and_vtp_through_the_pipeline(tmp_path):
    from slimops.pruning.config import SlimConfig
    from slimops.pruning.pipeline import evaluate_file, load_model_file, prune, save_model_file, slim

    out = str(tmp_path / "run")
    res = slim(SlimConfig(model="sema_t", width=0.25, method="sidt", lam=100.0, epochs=2, batch=256,
                          optimizer="adamw", lr=2e-3, out=out, progress=False, plots=False, augment=False))
    assert res["units"] == "gated dims" and res["channels_kept"] < res["channels_total"]
    assert res["params_pruned"] < res["params_dense"] and res["flops_pruned"] < res["flops_dense"]
    assert res["compaction_vs_masked"]["max_abs_diff"] < 1e-4 and len(res["blocks"]) == BLOCKS
    pruned, obj = load_model_file(f"{out}/pruned.pt")
    assert obj["plan"]["format"] == "slimops-vit-plan" and isinstance(obj["plan"]["dims"], list)
    assert evaluate_file(weights=f"{out}/pruned.pt")["acc"] == pytest.approx(res["acc"])
    dense = random_gates(_gated(), 0.0)
    save_model_file(str(tmp_path / "dense.pt"), dense, kind="dense")
    again = prune(weights=str(tmp_path / "dense.pt"), percent=0.5, out=str(tmp_path / "pr"))
    assert again["kept_fraction"] == pytest.approx(0.5, abs=0.02) and again["params_pruned"] < again["params_dense"]
