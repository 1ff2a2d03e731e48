"""The training options of the pipeline (slimops.pruning.train.TrainConfig): SGD or AdamW, step or cosine
schedules with warmup; their validation, their place in a run's identity, and exact resume with them."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import slimops.models as M
from slimops.optim import ProxAdamW, ProxSGD
from slimops.pruning import train as T
from slimops.pruning.config import SlimConfig
from slimops.pruning.distributed import DistInfo
from slimops.pruning.methods import MethodConfig, SlimMethod

pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_config_defaults_and_errors():
    assert T.TrainConfig(epochs=1).weight_decay == 1e-4
    assert T.TrainConfig(epochs=1, optimizer="adamw").weight_decay == 0.05
    assert T.TrainConfig(epochs=1, optimizer="adamw", weight_decay=0.0).weight_decay == 0.0
    for kw, msg in ((dict(optimizer="adam"), "optimizer must be one of sgd, adamw"),
                    (dict(schedule="linear"), "schedule must be one of step, cosine"),
                    (dict(warmup_epochs=2), "needs schedule 'cosine'"),
                    (dict(weight_decay=-1.0), "weight_decay must be a finite number >= 0")):
        with pytest.raises(ValueError, match=msg):
            T.TrainConfig(epochs=1, **kw)


def test_cosine_factor_warms_up_then_decays_to_zero():
    f = T._cosine(4, 20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(12) == pytest.approx(0.5) and f(20) == pytest.approx(0.0) and f(25) == pytest.approx(0.0)
    g = T._cosine(0, 10)
    assert g(0) == 1.0 and g(5) == pytest.approx(0.5)


def test_the_optimizer_is_the_fused_one_asked_for():
    m = M.build("vgg11", num_classes=10, in_channels=1, width=0.125)
    assert isinstance(SlimMethod(MethodConfig("none"), m, lr=0.1).optimizer, ProxSGD)
    opt = SlimMethod(MethodConfig("ns", lam=1e-4), m, lr=1e-3, weight_decay=0.05, optimizer="adamw").optimizer
    assert isinstance(opt, ProxAdamW) and opt.param_groups[0]["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="method 'proximal-ns' is defined on SGD steps"):
        SlimMethod(MethodConfig("proximal-ns", lam=1e-4), m, lr=0.1, optimizer="adamw")


@pytest.mark.parametrize("arch, method", [("vit_ti", "none"), ("vit_ti", "sidt"), ("gfnet_ti", "none"),
                                          ("vgg11", "ns")])
def test_adamw_decays_the_matrices_only(arch, method):
    """DeiT / timm's groups: AdamW's decay acts on the ndim >= 2 weights, not on biases, norm scales, the position
    embedding or the class token (nor the gates / BN scales a method presses). SGD decays every weight."""
    kw = dict(gates=True) if method == "sidt" else {}
    m = M.build(arch, num_classes=10, in_channels=1, width=0.25, **kw)
    cfg = MethodConfig(method, lam=1e-4)
    sm = SlimMethod(cfg, m, lr=1e-3, weight_decay=0.05, optimizer="adamw")
    gate_ids = {id(g) for g in sm.gammas}
    decay_of = {id(p): g["weight_decay"] for g in sm.optimizer.param_groups for p in g["params"]}
    names = dict(m.named_parameters())
    assert set(decay_of) == {id(p) for p in names.values()}  # every parameter in exactly one group
    assert len(decay_of) == len(names)
    skip = m.no_weight_decay() if hasattr(m, "no_weight_decay") else set()
    for name, p in names.items():
        if id(p) in gate_ids:
            assert decay_of[id(p)] == 0.0, name  # 1-D: the gates, or the BN scales ns presses
        else:
            assert decay_of[id(p)] == (0.05 if p.ndim >= 2 and name not in skip else 0.0), name
    if arch == "vit_ti":
        assert decay_of[id(m.pos_embed)] == 0.0 and decay_of[id(m.cls_token)] == 0.0
        assert decay_of[id(m.blocks[0].attn.qkv.weight)] == 0.05 and decay_of[id(m.blocks[0].norm1.weight)] == 0.0
    sgd = SlimMethod(MethodConfig("none"), m, lr=0.1, weight_decay=1e-4).optimizer
    assert {g["weight_decay"] for g in sgd.param_groups if g["params"]} == {1e-4}


def test_slim_config_refuses_adamw_for_the_sgd_methods_and_warmup_without_cosine():
    SlimConfig(model="vit_ti", method="none", optimizer="adamw", schedule="cosine", warmup_epochs=3)
    with pytest.raises(ValueError, match="optimizer must be 'sgd' for method prox-sgd"):
        SlimConfig(method="prox-sgd", optimizer="adamw")
    with pytest.raises(ValueError, match="warmup_epochs must be 0 unless schedule is 'cosine'"):
        SlimConfig(warmup_epochs=2)
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        SlimConfig(weight_decay=float("nan"))


def test_the_new_options_at_their_defaults_leave_old_run_configs_unchanged():
    """A checkpoint written before the options existed must still be resumable: its run config has no
    optimizer / schedule / warmup keys, and a default run's config has none either."""
    cfg = T.TrainConfig(epochs=2)
    run = T.run_config_of({"arch": "vgg11"}, "digits", MethodConfig("none"), cfg)
    assert set(run["train"]) == {"epochs", "lr", "momentum", "weight_decay", "batch", "seed", "milestones", "augment"}
    run = T.run_config_of({"arch": "vgg11"}, "digits", MethodConfig("none"),
                          T.TrainConfig(epochs=2, optimizer="adamw", schedule="cosine", warmup_epochs=1))
    assert run["train"]["optimizer"] == "adamw" and run["train"]["schedule"] == "cosine"
    assert run["train"]["warmup_epochs"] == 1


def test_adamw_cosine_resumes_bitwise(tmp_path, monkeypatch):
    """Three epochs straight, against one epoch + resume for the other two (the per-step scheduler and AdamW's
    moments come back from the checkpoint): the same weights, bit for bit."""
    from slimops.data import load

    ds = load("digits")
    cfg = T.TrainConfig(epochs=3, lr=1e-3, batch=256, seed=0, optimizer="adamw", schedule="cosine", warmup_epochs=1)
    info = DistInfo()
    run = T.run_config_of({"arch": "vit_ti"}, "digits", MethodConfig("none"), cfg)

    def fresh():
        torch.manual_seed(0)
        return M.build("vit_ti", num_classes=10, in_channels=1, width=0.125, img_size=32, patch=8)

    saved = {}
    real_save = T.atomic_save

    def keep_epoch_1(obj, path):
        if obj["epoch"] == 1:
            saved["ck"] = copy.deepcopy(obj)
        real_save(obj, path)

    monkeypatch.setattr(T, "atomic_save", keep_epoch_1)
    a = fresh()
    res_a = T.train_stage(a, ds, MethodConfig("none"), cfg, stage="train", ckpt_path=str(tmp_path / "a.pt"),
                          resume=False, device=torch.device("cpu"), dist_info=info, run_config=run, progress=False)
    lrs = [h["lr"] for h in res_a.history]
    assert lrs[0] == pytest.approx(1e-3) and 0 < lrs[1] < 1e-3 and lrs[2] < 1e-8  # warmup done, then decaying
    monkeypatch.setattr(T, "atomic_save", real_save)
    ck = str(tmp_path / "b.pt")
    real_save(saved["ck"], ck)
    b = fresh()
    res_b = T.train_stage(b, ds, MethodConfig("none"), cfg, stage="train", ckpt_path=ck, resume=True,
                          device=torch.device("cpu"), dist_info=info, run_config=run, progress=False)
    assert res_b.resumed_from == 1
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert math.isfinite(res_a.history[-1]["loss"])


def test_resume_refuses_an_optimizer_state_of_another_layout(tmp_path, monkeypatch):
    """A checkpoint whose AdamW state has other groups (as one written before the decay / no-decay split) is
    refused with a message naming the file, not resumed into the wrong groups."""
    from slimops.data import load

    ds = load("digits")
    cfg = T.TrainConfig(epochs=2, lr=1e-3, batch=512, seed=0, optimizer="adamw")
    run = T.run_config_of({"arch": "vit_ti"}, "digits", MethodConfig("none"), cfg)
    m = M.build("vit_ti", num_classes=10, in_channels=1, width=0.125, img_size=32, patch=8)
    saved = {}
    real_save = T.atomic_save
    monkeypatch.setattr(T, "atomic_save", lambda obj, path: saved.setdefault("ck", copy.deepcopy(obj)))
    T.train_stage(m, ds, MethodConfig("none"), cfg, stage="train", ckpt_path=str(tmp_path / "a.pt"), resume=False,
                  device=torch.device("cpu"), dist_info=DistInfo(), run_config=run, progress=False)
    ck = saved["ck"]
    groups = ck["optimizer"]["param_groups"]
    groups[0]["params"] = groups[0]["params"] + groups[1]["params"]  # the old layout: decay on everything
    del groups[1]
    path = str(tmp_path / "old.pt")
    real_save(ck, path)
    with pytest.raises(ValueError, match=r"resume: the optimizer state in '.*old\.pt' does not fit"):
        T.train_stage(m, ds, MethodConfig("none"), cfg, stage="train", ckpt_path=path, resume=True,
                      device=torch.device("cpu"), dist_info=DistInfo(), run_config=run, progress=False)


def test_slim_warns_when_a_vit_trains_with_sgd(tmp_path):
    """A ViT with the CNN recipe (SGD, step decay) reaches ~20% on digits: the run says which recipe to use,
    in one line of its log, and still runs; with AdamW it says nothing."""
    from slimops.pruning.pipeline import slim

    for opt in ("sgd", "adamw"):
        out = str(tmp_path / opt)
        slim(model="vit_ti", width=0.125, patch=8, method="none", epochs=1, batch=512, optimizer=opt,
             progress=False, out=out)
        log = open(f"{out}/log.txt").read()
        warned = [line for line in log.splitlines() if "trains poorly" in line]
        if opt == "sgd":
            assert len(warned) == 1 and "--optimizer adamw --lr 1e-3 --schedule cosine" in warned[0]
        else:
            assert not warned
