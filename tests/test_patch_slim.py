"""Patch slimming (slimops/pruning/patch_slim.py, VisionTransformer.set_token_plan): the schedule, the top-down impact
scores against a direct computation, nested kept sets, exactness of the prefix execution against an explicit
masked-sequence forward, FLOPs that shrink with the plan, plan round trips and bad input."""
from __future__ import annotations

import pytest
import torch

import slimops
from slimops.pruning import patch_slim as PS
from slimops.pruning.metrics import count_macs

pytestmark = pytest.mark.usefixtures("one_thread")


def _vit(**kw):
    torch.manual_seed(0)
    return slimops.models.build("vit_ti", num_classes=10, in_channels=1, img_size=16, patch=4, width=0.25, **kw).eval()


def test_keep_schedule_mean_and_shape():
    for depth, tokens, keep in ((12, 65, 0.6), (12, 197, 0.5), (4, 17, 0.3), (12, 65, 1.0)):
        k = PS.keep_schedule(depth, tokens, keep)
        assert len(k) == depth and k[0] == tokens and all(a >= b >= 2 for a, b in zip(k, k[1:]))
        mean = sum((x - 1) / (tokens - 1) for x in k) / depth
        assert abs(mean - keep) < 1.5 / (tokens - 1) + 0.02, (k, mean)
    with pytest.raises(ValueError, match="keep must be a fraction"):
        PS.keep_schedule(12, 65, 0.0)


def _masked_forward(model, plan, x):
    """The definition, no prefix trick: block l attends among the tokens of S_l (a boolean mask over the original
    positions); tokens outside S_l keep their features and are ignored afterwards."""
    t = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    t = torch.cat([model.cls_token.expand(t.shape[0], -1, -1), t], 1) + model.pos_embed
    for l, blk in enumerate(model.blocks):
        idx = torch.tensor(sorted(plan.order[: plan.keep[l]]))
        sub = blk(t[:, idx])
        t = t.clone()
        t[:, idx] = sub
    return model.head(model.norm(t)[:, 0])


def test_prefix_execution_equals_the_masked_definition_and_costs_less():
    model = _vit()
    x = torch.randn(3, 1, 16, 16)
    plan = PS.plan_tokens(model, [x], keep=0.5)
    ref = _masked_forward(model, plan, x)
    dense_macs = count_macs(model, (1, 16, 16))
    model.set_token_plan(plan)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    assert count_macs(model, (1, 16, 16)) < 0.7 * dense_macs
    model.set_token_plan(None)
    assert count_macs(model, (1, 16, 16)) == dense_macs


def test_impact_scores_follow_the_definition():
    model = _vit()
    x = torch.randn(2, 1, 16, 16)
    maps = PS.attention_maps(model, x)
    assert len(maps) == len(model.blocks) and maps[0].shape == (2, 17, 17)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 17))
    s = torch.zeros(2, 17)
    s[:, 0] = 1
    want = []
    for a in reversed(maps):  # s_l = s_{l+1} (I + A_l), normalised
        s = s @ torch.eye(17) + torch.einsum("bi,bij->bj", s, a)
        s = s / s.sum(1, keepdim=True)
        want.append(s.mean(0))
    torch.testing.assert_close(PS.impact_scores(model, [x]), torch.stack(want[::-1]), rtol=1e-5, atol=1e-6)


def test_scores_with_keep_propagate_only_through_the_kept_tokens_above():
    model = _vit()
    x = torch.randn(2, 1, 16, 16)
    keep = PS.keep_schedule(len(model.blocks), 17, 0.4)
    scores = PS.impact_scores(model, [x], keep)
    free = PS.impact_scores(model, [x])
    torch.testing.assert_close(scores[-1], free[-1])  # nothing above the last block
    maps = PS.attention_maps(model, x)
    top = PS.token_plan_from_scores(scores, keep)
    last = torch.zeros(17)
    last[list(top.order[: keep[-1]])] = 1  # S_{L-1}
    s = torch.zeros(2, 17)
    s[:, 0] = 1
    s = s + torch.einsum("bi,bij->bj", s, maps[-1])
    s = (s / s.sum(1, keepdim=True)) * last  # a token the last block drops feeds nothing
    s = s + torch.einsum("bi,bij->bj", s, maps[-2])
    torch.testing.assert_close(scores[-2], (s / s.sum(1, keepdim=True)).mean(0), rtol=1e-5, atol=1e-6)
    assert PS.plan_tokens(model, [x], 0.4) == top
    with pytest.raises(ValueError, match="keep 0.05 is below the smallest mean"):
        PS.keep_schedule(12, 17, 0.05)


def test_kept_sets_are_nested_and_top_down():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(5, 20, generator=g)
    keep = [20, 15, 10, 6, 3]
    plan = PS.token_plan_from_scores(scores, keep)
    sets = [set(plan.order[:k]) for k in keep]
    assert all(a >= b for a, b in zip(sets, sets[1:])) and all(0 in s for s in sets)
    last = sorted(range(1, 20), key=lambda t: -scores[4, t])[:2]
    assert sets[4] == {0, *last}  # the last block: the class token and the best patches by its own score
    extra = sorted(set(range(20)) - sets[4], key=lambda t: -scores[3, t])[:3]
    assert sets[3] == sets[4] | set(extra)


def test_plan_round_trip_and_bad_input(tmp_path):
    plan = PS.TokenPlan((0, 2, 1, 3), (4, 3, 2))
    p = tmp_path / "tokens.json"
    plan.save(str(p))
    assert PS.TokenPlan.load(str(p)) == plan
    with pytest.raises(ValueError, match="order must hold each"):
        PS.TokenPlan((0, 2, 2, 3), (4, 3))
    with pytest.raises(ValueError, match="class token"):
        PS.TokenPlan((1, 0, 2, 3), (4, 3))
    with pytest.raises(ValueError, match="non-increasing"):
        PS.TokenPlan((0, 1, 2, 3), (3, 4))
    model = _vit()
    with pytest.raises(ValueError, match="the plan covers 4 tokens and 3 blocks, the model has 17 tokens"):
        model.set_token_plan(plan)
    model.set_token_plan(PS.token_plan_from_scores(torch.rand(12, 17), PS.keep_schedule(12, 17, 0.5)))
    with pytest.raises(ValueError, match="a token plan is for 16x16 inputs"):
        model(torch.randn(1, 1, 20, 20))
    with pytest.raises(ValueError, match="without a token plan"):
        PS.impact_scores(model, [torch.randn(1, 1, 16, 16)])


def test_patch_slim_through_the_pipeline_writes_a_loadable_slimmed_vit(tmp_path, monkeypatch):
    from slimops.pruning.config import SlimConfig
    from slimops.pruning.pipeline import evaluate_file, finetune, load_model_file, slim

    out = str(tmp_path / "run")
    res = slim(SlimConfig(model="vit_ti", width=0.125, patch=8, method="patch-slim", keep_tokens=0.5, epochs=1,
                          finetune_epochs=1, batch=256, optimizer="adamw", lr=2e-3, out=out, progress=False,
                          plots=True, augment=False))
    assert res["units"] == "token-blocks" and res["tokens"] == 17 and len(res["tokens_per_block"]) == 12
    assert res["tokens_per_block"][0] == 17 and res["tokens_per_block"][-1] < 17 and res["keep_tokens"] == 0.5
    assert res["flops_pruned"] < 0.7 * res["flops_dense"] and res["params_pruned"] == res["params_dense"]
    assert any(p.endswith("tokens_kept.png") for p in res["plots"])
    model, obj = load_model_file(f"{out}/pruned.pt")
    assert obj["plan"]["format"] == "slimops.token_plan" and model.token_keep == tuple(res["tokens_per_block"])
    assert PS.TokenPlan.load(f"{out}/plan.json").keep == model.token_keep
    assert evaluate_file(weights=f"{out}/pruned.pt")["acc"] == pytest.approx(res["acc"])
    ft = finetune(weights=f"{out}/pruned.pt", epochs=1, batch=256, lr=1e-3, optimizer="adamw", out=str(tmp_path / "ft"),
                  progress=False)
    assert load_model_file(str(tmp_path / "ft" / "finetuned.pt"))[0].token_keep == model.token_keep and ft["acc"] >= 0
    # --resume of the finished run fine-tunes with the plan it made (plan.json), not a re-scored one
    def rescored(*a, **k):
        raise AssertionError("a resumed patch-slim run re-scored its tokens")

    monkeypatch.setattr(PS, "plan_tokens", rescored)
    again = slim(SlimConfig(model="vit_ti", width=0.125, patch=8, method="patch-slim", keep_tokens=0.5, epochs=1,
                            finetune_epochs=1, batch=256, optimizer="adamw", lr=2e-3, out=out, progress=False,
                            plots=False, augment=False, resume=True))
    assert again["tokens_per_block"] == res["tokens_per_block"] and again["acc"] == pytest.approx(res["acc"])


def test_patch_slim_configuration_errors():
    from slimops.pruning.config import SlimConfig

    assert SlimConfig(model="vit_ti", method="patch-slim").resolved_keep_tokens() == 0.5
    with pytest.raises(ValueError, match="keep_tokens must be None for method none on vit_ti"):
        SlimConfig(model="vit_ti", method="none", keep_tokens=0.5)
    with pytest.raises(ValueError, match=r"keep_tokens must be a fraction in \(0, 1\]"):
        SlimConfig(model="vit_ti", method="patch-slim", keep_tokens=1.5)
    with pytest.raises(ValueError, match="prunes the tokens of a ViT"):
        SlimConfig(model="vgg11", method="patch-slim")
    with pytest.raises(ValueError, match="percent must be 'auto' for method patch-slim"):
        SlimConfig(model="vit_ti", method="patch-slim", percent=0.3)
    assert SlimConfig(model="vit_ti", method="patch-slim").resolved_percent() is None


def test_prune_plans_tokens_of_a_dense_vit_file(tmp_path):
    from slimops.pruning.pipeline import load_model_file, prune, save_model_file

    vit = slimops.models.build("vit_ti", num_classes=10, in_channels=1, img_size=32, patch=8, width=0.125)
    save_model_file(str(tmp_path / "dense.pt"), vit, kind="dense")
    res = prune(weights=str(tmp_path / "dense.pt"), keep_tokens=0.4, out=str(tmp_path / "pr"))
    assert res["units"] == "token-blocks" and res["keep_tokens"] == 0.4 and res["flops_pruned"] < res["flops_dense"]
    model, obj = load_model_file(str(tmp_path / "pr" / "pruned.pt"))
    assert model.token_keep == tuple(res["tokens_per_block"]) and obj["plan"]["meta"]["method"] == "patch-slim"
    with pytest.raises(ValueError, match="give percent .* or keep_tokens .*, not both"):
        prune(weights=str(tmp_path / "dense.pt"), keep_tokens=0.4, percent=0.3, out=str(tmp_path / "x"))
    vgg = slimops.models.build("vgg11", width=0.125)
    save_model_file(str(tmp_path / "vgg.pt"), vgg, kind="dense")
    with pytest.raises(ValueError, match="keep_tokens slims the tokens of a ViT; .* holds a vgg11"):
        prune(weights=str(tmp_path / "vgg.pt"), keep_tokens=0.4, out=str(tmp_path / "y"))
    assert not (tmp_path / "y").exists()  # nothing written for a refused call
