"""ViT dimension pruning (slimops.pruning.vit): gates, plans from them, and exact compaction into a smaller ViT."""
from __future__ import annotations

import pytest
import torch

import slimops.models as M
from slimops.pruning.metrics import count_macs, count_params
from slimops.pruning.vit import ViTPlan, compact_vit, vit_plan_from_gates, zero_removed_gates

from _gates import check_plan_round_trip, random_gates

pytestmark = pytest.mark.usefixtures("one_thread")


def _gated(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"num_classes": 10, "in_channels": 1, "width": 0.25, "img_size": 32, "patch": 8, **kw}
    return M.build("vit_ti", gates=True, **kw).eval()


def _x(n=3):
    return torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(7))


def test_gates_start_as_the_identity_and_get_gradients():
    m = _gated()
    plain = M.build("vit_ti", num_classes=10, in_channels=1, width=0.25, img_size=32, patch=8).eval()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if "gate" not in k})
    x = _x()
    torch.testing.assert_close(m(x), plain(x))
    assert len(m.gates()) == 3 * 12 and m.config()["gates"] is True
    m(x).sum().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in m.gates().values())


@pytest.mark.parametrize("zero_fraction", [0.0, 0.3, 0.7])
def test_compaction_is_exact_and_smaller(zero_fraction):
    m = random_gates(_gated(), zero_fraction)
    plan = vit_plan_from_gates(m)
    small = compact_vit(m, plan)
    x = _x()
    torch.testing.assert_close(small(x), m(x), rtol=1e-5, atol=1e-5)
    assert m.gated and not any(b.mlp.gate is not None or b.attn.gate_in is not None for b in small.blocks)
    for b, p in zip(small.blocks, plan.blocks):
        assert b.attn.num_heads == len([v for v in p["v"] if v])
        assert b.attn.v_dim == max(len(v) for v in p["v"]) and b.mlp.hidden == len(p["hidden"])
        assert (b.attn.in_index is None) == (len(p["in"]) == b.attn.dim)
    if zero_fraction > 0:
        assert count_params(small) < count_params(m)
        assert count_macs(small, (1, 32, 32)) < count_macs(m, (1, 32, 32))


def test_percent_plan_prunes_the_lowest_gates_and_stays_exact():
    m = random_gates(_gated(), 0.0)
    plan = vit_plan_from_gates(m, percent=0.4)
    gates = torch.cat([w.detach().flatten() for w in m.gates().values()])
    assert plan.meta["threshold"] == pytest.approx(float(gates.abs().kthvalue(int(0.4 * gates.numel())).values))
    assert 0.55 < plan.summary()["gated_dims_kept"] < 0.65
    small = compact_vit(m, plan)
    ref = zero_removed_gates(m, plan)  # the gated model with what the plan removes set to 0
    x = _x()
    torch.testing.assert_close(small(x), ref(x), rtol=1e-5, atol=1e-5)


def test_a_head_with_no_value_dim_goes_whole_and_narrower_heads_are_padded():
    m = _gated()
    att = m.blocks[3].attn
    hd = att.head_dim
    with torch.no_grad():
        g = att.gate_out.weight.view(att.num_heads, hd)
        g[0] = 0                  # head 0: gone
        g[1, : hd // 2] = 0       # head 1: half its value dims
        g[2, :1] = 0              # head 2: all but one
    plan = vit_plan_from_gates(m)
    assert plan.heads_kept(3) == [1, 2] and plan.v_dim(3) == hd - 1
    small = compact_vit(m, plan)
    b = small.blocks[3].attn
    assert (b.num_heads, b.head_dim, b.v_dim) == (2, hd, hd - 1)
    assert b.qkv.out_features == 2 * (2 * hd + hd - 1) and b.proj.in_features == 2 * (hd - 1)
    x = _x()
    torch.testing.assert_close(small(x), m(x), rtol=1e-5, atol=1e-5)


def test_plan_json_round_trip_and_build_pruned(tmp_path):
    m = random_gates(_gated(), 0.5)
    check_plan_round_trip(m, vit_plan_from_gates(m), _x(), tmp_path)


def _plan_dict(m):
    return vit_plan_from_gates(random_gates(m, 0.3)).to_dict()


@pytest.mark.parametrize("edit,msg", [
    (lambda d: d["blocks"][0].update({"in": [5, 3]}), "block 0 'in' must be sorted and without duplicates"),
    (lambda d: d["blocks"][0].update({"in": [1, 1]}), "block 0 'in' must be sorted and without duplicates"),
    (lambda d: d["blocks"][1].update({"hidden": [0, 10**9]}), r"block 1 'hidden' has an index out of range \[0, 192\)"),
    (lambda d: d["blocks"][1].update({"hidden": []}), "block 1 'hidden' keeps nothing"),
    (lambda d: d["blocks"][2].update({"v": [[], [], []]}), "block 2 removes every head"),
    (lambda d: d["blocks"][2].update({"v": [[0]]}), "must list the kept value dims of each of the 3 heads"),
    (lambda d: d["blocks"][2]["v"].__setitem__(0, [-1]), r"head 0 'v' has an index out of range \[0, 16\): -1"),
    (lambda d: d["blocks"][0].update({"in": [0.5]}), "must be a list of integer indices"),
    (lambda d: d["blocks"][0].pop("hidden"), "must have exactly the keys"),
    (lambda d: d["dims"].update({"heads": 0}), r"dims\['heads'\] must be a positive integer"),
    (lambda d: d.update({"format": "slimops-plan"}), "not a ViT plan"),
    (lambda d: d.update({"version": 9}), "unsupported version 9"),
    (lambda d: d.update({"blocks": []}), "blocks must be a non-empty list"),
])
def test_bad_plans_are_clear_errors(edit, msg):
    d = _plan_dict(_gated())
    edit(d)
    with pytest.raises(ValueError, match=msg):
        ViTPlan.from_dict(d)


def test_all_zero_gates_keep_one_input_dim_one_unit_and_one_value_dim():
    m = _gated()
    with torch.no_grad():
        for w in m.gates().values():
            w.zero_()
        m.blocks[0].mlp.gate.weight[5] = -0.5  # a negative gate counts by |g|
    plan = vit_plan_from_gates(m)
    assert all(len(b["in"]) == 1 and len(b["hidden"]) == 1 and sum(map(len, b["v"])) == 1 for b in plan.blocks)
    assert plan.blocks[0]["hidden"] == [5]
    small = compact_vit(m, plan)
    torch.testing.assert_close(small(_x()), m(_x()), rtol=1e-5, atol=1e-5)


def test_a_plan_for_another_model_is_refused_and_nothing_is_changed():
    plan = vit_plan_from_gates(random_gates(_gated(), 0.3))
    other = _gated(width=0.5)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="the plan was made for 12 blocks of"):
        compact_vit(other, plan)
    with pytest.raises(ValueError, match="the plan was made for"):
        zero_removed_gates(other, plan)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_plans_need_a_gated_vit_with_finite_gates(tmp_path):
    with pytest.raises(ValueError, match="has no dimension gates"):
        vit_plan_from_gates(M.build("vit_ti", width=0.125, img_size=32))
    with pytest.raises(TypeError, match="must be a slimops ViT"):
        vit_plan_from_gates(M.build("vgg11", width=0.125))
    m = _gated()
    with torch.no_grad():
        m.blocks[0].mlp.gate.weight[3] = float("nan")
    with pytest.raises(ValueError, match="a gate is NaN or infinite"):
        vit_plan_from_gates(m)
    with pytest.raises(ValueError, match="percent"):
        vit_plan_from_gates(_gated(), percent=1.5)
    big = tmp_path / "big.json"
    big.write_text(" " * (64 * 2**20 + 1))
    with pytest.raises(ValueError, match="larger than a plan can be"):
        ViTPlan.load(str(big))
    with pytest.raises(FileNotFoundError):
        ViTPlan.load(str(tmp_path / "missing.json"))


# ---- the methods and the pipeline ------------------------------------------------------------------------------


def test_vit_methods_are_for_vits_and_need_lam():
    from slimops.pruning.config import SlimConfig
    from slimops.pruning.methods import MethodConfig

    SlimConfig(model="vit_ti", method="sidt", lam=0.5, penalty="tl1")
    SlimConfig(model="vit_ti", method="vtp", lam=0.01)
    with pytest.raises(ValueError, match="lam must be given for method sidt"):
        SlimConfig(model="vit_ti", method="sidt")
    with pytest.raises(ValueError, match="method must be a BatchNorm method for vgg11"):
        SlimConfig(model="vgg11", method="vtp", lam=0.1)
    with pytest.raises(ValueError, match="method must be none, vtp, sidt or patch-slim for vit_ti"):
        SlimConfig(model="vit_ti", method="ns")
    with pytest.raises(ValueError, match="method 'vtp' uses penalty 'l1'"):
        MethodConfig("vtp", penalty="l0")
    with pytest.raises(ValueError, match="method 'sidt' takes penalty in"):
        MethodConfig("sidt", penalty="l21")


def test_the_methods_train_the_gates_with_the_fused_optimizers():
    from slimops.optim import ProxAdamW
    from slimops.pruning.methods import MethodConfig, SlimMethod

    m = _gated()
    sm = SlimMethod(MethodConfig("sidt", lam=0.5, penalty="l0"), m, lr=1e-3, weight_decay=0.05, optimizer="adamw")
    assert isinstance(sm.optimizer, ProxAdamW)
    gate_group = sm.optimizer.param_groups[-1]  # after the AdamW decay / no-decay groups
    assert gate_group["penalty"] == "l0" and gate_group["lam"] == 0.5 and gate_group["weight_decay"] == 0.0
    assert {id(p) for p in gate_group["params"]} == {id(w) for w in m.gates().values()}
    with pytest.raises(ValueError, match="the model has none"):
        SlimMethod(MethodConfig("sidt", lam=0.5), M.build("vit_ti", width=0.125, img_size=32), lr=0.1)
    vtp = SlimMethod(MethodConfig("vtp", lam=0.25), m, lr=0.1)
    m(_x()).sum().backward()
    w = next(iter(m.gates().values()))
    before = w.grad.clone()
    vtp.after_backward()  # g.grad += s sign(g)
    torch.testing.assert_close(w.grad, before + 0.25 * torch.sign(w.detach()))


def test_sidt_through_the_pipeline_writes_a_loadable_pruned_vit(tmp_path):
    from slimops.pruning.config import SlimConfig
    from slimops.pruning.pipeline import evaluate_file, finetune, load_model_file, prune, slim

    out = str(tmp_path / "run")
    res = slim(SlimConfig(model="vit_ti", width=0.125, patch=8, method="sidt", lam=120.0, epochs=2, batch=256,
                          optimizer="adamw", lr=2e-3, out=out, progress=False, plots=False, augment=False))
    assert res["units"] == "gated dims" and res["channels_kept"] < res["channels_total"]
    assert res["params_pruned"] < res["params_dense"] and res["compaction_vs_masked"]["max_abs_diff"] < 1e-4
    assert len(res["blocks"]) == 12 and all("heads" in b for b in res["blocks"])
    pruned, obj = load_model_file(f"{out}/pruned.pt")
    assert obj["plan"]["format"] == "slimops-vit-plan"
    assert evaluate_file(weights=f"{out}/pruned.pt")["acc"] == pytest.approx(res["acc"])
    ft = finetune(weights=f"{out}/pruned.pt", epochs=1, batch=256, lr=1e-3, optimizer="adamw", out=str(tmp_path / "ft"),
                  progress=False)
    assert ft["acc"] >= 0 and load_model_file(str(tmp_path / "ft" / "finetuned.pt"))[1]["kind"] == "pruned"
    # prune: VTP's threshold on the gates of a gated dense model file
    from slimops.pruning.pipeline import save_model_file

    dense = random_gates(_gated(width=0.125), 0.0)
    save_model_file(str(tmp_path / "dense.pt"), dense, kind="dense")
    again = prune(weights=str(tmp_path / "dense.pt"), percent=0.5, out=str(tmp_path / "pr"))
    assert again["kept_fraction"] == pytest.approx(0.5, abs=0.02) and again["params_pruned"] < again["params_dense"]


# ---- dims and tokens: one plan carries patch slimming's tokens too -----------------------------------------------


def _with_tokens(m, plan, keep=0.5):
    import dataclasses

    from slimops.pruning.patch_slim import plan_tokens

    batches = [torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    return dataclasses.replace(plan, tokens=plan_tokens(compact_vit(m, plan), batches, keep))


def test_a_plan_with_tokens_compacts_exactly_and_round_trips(tmp_path):
    import copy

    m = random_gates(_gated(), 0.4)
    dims = vit_plan_from_gates(m)
    plan = _with_tokens(m, dims)
    assert plan.to_dict()["version"] == 2 and dims.to_dict()["version"] == 1
    assert plan.summary()["tokens"]["tokens_per_block"] == list(plan.tokens.keep)
    small = compact_vit(m, plan)
    assert small.token_keep == plan.tokens.keep and compact_vit(m, dims).token_keep is None
    masked = zero_removed_gates(copy.deepcopy(m), plan)  # the gated model, removed gates 0, same tokens
    x = _x()
    torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-5)
    assert count_macs(small, (1, 32, 32)) < count_macs(compact_vit(m, dims), (1, 32, 32))
    fresh_small = check_plan_round_trip(m, plan, x, tmp_path)  # build_pruned_vit of the JSON runs the tokens too
    assert fresh_small.token_keep == plan.tokens.keep


def test_bad_plans_with_tokens_are_clear_errors():
    import dataclasses

    m = random_gates(_gated(), 0.3)
    d = _with_tokens(m, vit_plan_from_gates(m)).to_dict()
    with pytest.raises(ValueError, match="a version-1 plan has no 'tokens'"):
        ViTPlan.from_dict({**d, "version": 1})
    with pytest.raises(ValueError, match="missing field 'tokens'"):
        ViTPlan.from_dict({k: v for k, v in d.items() if k != "tokens"})
    with pytest.raises(ValueError, match="tokens keep counts for 11 blocks, the plan has 12"):
        ViTPlan.from_dict({**d, "tokens": {**d["tokens"], "keep": d["tokens"]["keep"][:-1]}})
    with pytest.raises(ValueError, match="not a token plan"):
        ViTPlan.from_dict({**d, "tokens": {"format": "slimops-plan"}})
    sema = random_gates(M.build("sema_t", width=0.25, gates=True), 0.3)
    with pytest.raises(ValueError, match=r"tokens \(patch slimming\) are for the ViTs"):
        dataclasses.replace(vit_plan_from_gates(sema), tokens=ViTPlan.from_dict(d).tokens)


def test_sidt_with_keep_tokens_through_the_pipeline(tmp_path):
    from slimops.pruning.config import SlimConfig
    from slimops.pruning.pipeline import evaluate_file, load_model_file, prune, slim

    out = str(tmp_path / "run")
    res = slim(SlimConfig(model="vit_ti", width=0.125, patch=8, method="sidt", lam=1.5, keep_tokens=0.5, epochs=1,
                          batch=256, optimizer="adamw", lr=2e-3, out=out, progress=False, plots=False, augment=False))
    assert res["keep_tokens"] == 0.5 and res["tokens_per_block"][0] == 17 and res["tokens_per_block"][-1] < 17
    assert res["units"] == "gated dims" and res["compaction_vs_masked"]["max_abs_diff"] < 1e-4
    pruned, obj = load_model_file(f"{out}/pruned.pt")
    assert obj["plan"]["version"] == 2 and pruned.token_keep == tuple(res["tokens_per_block"])
    assert evaluate_file(weights=f"{out}/pruned.pt")["acc"] == pytest.approx(res["acc"])
    # the same in two steps: a dimension-pruned pruned.pt, then prune --keep-tokens of it
    dims = slim(SlimConfig(model="vit_ti", width=0.125, patch=8, method="sidt", lam=1.5, epochs=1, batch=256,
                           optimizer="adamw", lr=2e-3, out=str(tmp_path / "dims"), progress=False, plots=False,
                           augment=False))
    both = prune(weights=str(tmp_path / "dims" / "pruned.pt"), keep_tokens=0.5, out=str(tmp_path / "both"))
    assert both["units"] == "token-blocks" and both["flops_pruned"] < both["flops_dense"] == dims["flops_pruned"]
    assert load_model_file(str(tmp_path / "both" / "pruned.pt"))[1]["plan"]["version"] == 2
    with pytest.raises(ValueError, match="holds a pruned model; prune a dense.pt"):  # its tokens are already slimmed
        prune(weights=str(tmp_path / "both" / "pruned.pt"), keep_tokens=0.4, out=str(tmp_path / "again"))
    with pytest.raises(ValueError, match="holds a pruned model; prune a dense.pt"):  # dims again: from dense.pt
        prune(weights=str(tmp_path / "dims" / "pruned.pt"), percent=0.3, out=str(tmp_path / "again2"))
    with pytest.raises(ValueError, match="keep_tokens must be None for method sidt on sema_t"):
        SlimConfig(model="sema_t", method="sidt", lam=1.5, keep_tokens=0.5)
