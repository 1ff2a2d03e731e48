"""SiDT with a target (slimops.pruning.keep_target.KeepTarget, ``--keep-dims``): lam follows a path until the target
fraction of gates is exactly 0, then those zeros are frozen and the penalty stops; the state resumes exactly."""
from __future__ import annotations

import pytest
import torch

from slimops.optim import ProxAdamW
from slimops.pruning.keep_target import KeepTarget

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(n=600, seed=0):
    """Gates g (init 1) under a loss sum_i w_i (g_i - 1)^2 / 2 plus noise: w spans 0..1, so the gates differ in how
    strongly the loss defends them; a weight w_i and a noise per step."""
    gen = torch.Generator().manual_seed(seed)
    gates = [torch.nn.Parameter(torch.ones(n // 2)), torch.nn.Parameter(torch.ones(n - n // 2))]
    w = [torch.rand(g.shape, generator=gen) for g in gates]
    return gates, w, gen


def _run(keep, steps, *, lr=2e-2, stop_at=None, state=None, seed=0):
    gates, w, gen = _problem(seed=seed)
    opt = ProxAdamW([{"params": gates, "penalty": "l1", "lam": 1.0, "a": 1.0}], lr=lr, weight_decay=0.0)
    target = KeepTarget(gates, opt, keep, steps, ramp=0.6)  # the mechanism, with room after the target is met
    start = 0
    if state is not None:
        for g, s in zip(gates, state["gates"]):
            g.data.copy_(s)
        opt.load_state_dict(state["opt"])
        target.load_state_dict(state["target"])
        gen.set_state(state["gen"])
        start = state["t"]
    zeros, lams = [], []
    for t in range(start, steps if stop_at is None else stop_at):
        opt.zero_grad()
        loss = sum((wi * (g - 1) ** 2).sum() / 2 for g, wi in zip(gates, w))
        loss = loss + sum((g * 0.3 * torch.randn(g.shape, generator=gen)).sum() for g in gates)
        loss.backward()
        opt.step()
        lams.append(target.step())
        zeros.append(float(sum((g == 0).sum() for g in gates)) / sum(g.numel() for g in gates))
    out = {"gates": [g.detach().clone() for g in gates], "opt": opt.state_dict(), "target": target.state_dict(),
           "gen": gen.get_state(), "t": steps if stop_at is None else stop_at}
    return target, gates, w, zeros, lams, out


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.8])
def test_the_target_is_met_then_frozen(keep):
    target, gates, w, zeros, lams, _ = _run(keep, 400)
    assert target.met
    met_at = next(i for i, z in enumerate(zeros) if z >= 1 - keep)
    assert met_at <= 0.7 * 400  # about at the end of the ramp (60% of the steps here)
    assert 1 - keep <= zeros[-1] <= 1 - keep + 0.03  # at most a step's overshoot
    assert all(z == zeros[met_at] for z in zeros[met_at:])  # frozen: the same zeros to the end
    assert all(lam == 0 for lam in lams[met_at:])  # and no penalty on the kept gates
    # the gates the loss defends most are the ones that stay
    wf, gf = torch.cat(w), torch.cat([g.detach() for g in gates])
    assert wf[gf != 0].mean() > wf[gf == 0].mean() + 0.2


def test_lam_follows_the_lr_schedule_and_keeps_rising_past_the_ramp_until_met():
    gates, _, _ = _problem()
    opt = ProxAdamW([{"params": gates, "penalty": "l1", "lam": 1.0, "a": 1.0}], lr=1e-3, weight_decay=0.0)
    target = KeepTarget(gates, opt, 0.5, 100)
    lam = target.step()  # nothing moved: the gap is 0, lam is the pace q0 / (R lr)
    assert lam == pytest.approx(1.0 / (90 * 1e-3), rel=0.01) and opt.param_groups[0]["lam"] == lam
    opt.param_groups[0]["lr"] = 5e-4
    assert target.step() == pytest.approx(2 * lam, rel=0.02)  # half the lr: twice the lam for the same pace
    target.t = 100  # past the ramp and short of the target: lam rises every step
    a, b = target.step(), target.step()
    assert b > a > 0 and not target.met


def test_resume_continues_the_same_path():
    *_, full_zeros, full_lams, full = _run(0.5, 300)
    *_, first = _run(0.5, 300, stop_at=230)  # past the point the target is met (the frozen masks are state)
    assert first["target"]["frozen"] is not None
    *_, rest_zeros, rest_lams, resumed = _run(0.5, 300, state=first)
    assert rest_lams == full_lams[230:] and rest_zeros == full_zeros[230:]
    assert all(torch.equal(a, b) for a, b in zip(resumed["gates"], full["gates"]))
    *_, early = _run(0.5, 300, stop_at=40)  # before: lam and the correction are state
    assert early["target"]["frozen"] is None
    *_, _, lams2, again = _run(0.5, 300, state=early)
    assert lams2 == full_lams[40:] and all(torch.equal(a, b) for a, b in zip(again["gates"], full["gates"]))


def test_bad_arguments_and_states():
    gates, _, _ = _problem()
    opt = ProxAdamW([{"params": gates, "penalty": "l1", "lam": 1.0, "a": 1.0}], lr=1e-3)
    for keep in (0, 1, 1.5, True):
        with pytest.raises(ValueError, match="keep must be a fraction in"):
            KeepTarget(gates, opt, keep, 100)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        KeepTarget(gates, opt, 0.5, 0)
    with pytest.raises(ValueError, match="needs the gates and an optimizer group holding them"):
        KeepTarget(gates, torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1), 0.5, 100)
    with pytest.raises(ValueError, match="needs the gates and an optimizer group holding them"):
        KeepTarget(gates, torch.optim.SGD(gates, lr=0.1), 0.5, 100)  # no 'lam': not a prox optimizer
    t = KeepTarget(gates, opt, 0.5, 100)
    with pytest.raises(ValueError, match="not a KeepTarget state"):
        t.load_state_dict({"t": 3})
    with pytest.raises(ValueError, match="not a KeepTarget state"):
        t.load_state_dict({**t.state_dict(), "frozen": [torch.ones(3)]})


def test_keep_dims_in_the_configuration_and_the_method():
    from slimops.pruning.config import SlimConfig
    from slimops.pruning.methods import MethodConfig, SlimMethod
    from slimops.pruning.train import TrainConfig, run_config_of
    import slimops.models as M

    cfg = SlimConfig(model="vit_ti", method="sidt", keep_dims=0.5)  # no lam needed: it starts at 1
    mcfg = cfg.method_config(steps=200)
    assert (mcfg.keep_dims, mcfg.steps, mcfg.lam) == (0.5, 200, 1.0)
    # a target defaults to transformed l1 (methods.DEFAULT_PENALTY_KEEP_DIMS); a fixed lam to l1; a given one wins
    assert mcfg.penalty == "tl1" and MethodConfig("sidt", lam=1.5).penalty == "l1"
    assert SlimConfig(model="vit_ti", method="sidt", keep_dims=0.5, penalty="l1").method_config(steps=200).penalty \
        == "l1"
    with pytest.raises(ValueError, match="keep_dims must be None for method vtp"):
        SlimConfig(model="vit_ti", method="vtp", lam=0.01, keep_dims=0.5)
    with pytest.raises(ValueError, match=r"keep_dims must be a fraction in \(0, 1\)"):
        SlimConfig(model="vit_ti", method="sidt", keep_dims=1.0)
    with pytest.raises(ValueError, match="keep_dims sets SiDT's target"):
        MethodConfig("prox-sgd", keep_dims=0.5, steps=10)
    # a run without a target writes the run config it always did (its checkpoints still resume)
    plain = run_config_of({}, "digits", MethodConfig("sidt", lam=1.5), TrainConfig(epochs=1))
    assert "keep_dims" not in plain["method"] and "steps" not in plain["method"]
    assert run_config_of({}, "digits", mcfg, TrainConfig(epochs=1))["method"]["keep_dims"] == 0.5
    m = M.build("vit_ti", width=0.125, img_size=32, gates=True)
    sm = SlimMethod(mcfg, m, lr=1e-3, optimizer="adamw")
    assert sm.target is not None and sm.current_lam() == 1.0 and "keep_target" in sm.state_dict()
    with pytest.raises(ValueError, match="keep_dims target present/absent"):
        SlimMethod(MethodConfig("sidt", lam=1.5), m, lr=1e-3, optimizer="adamw").load_state_dict(sm.state_dict())


def test_sidt_with_keep_dims_through_the_pipeline(tmp_path):
    from slimops.pruning.config import SlimConfig
    from slimops.pruning.pipeline import slim

    res = slim(SlimConfig(model="vit_ti", width=0.125, patch=8, method="sidt", keep_dims=0.5, epochs=2, batch=64,
                          optimizer="adamw", lr=2e-3, out=str(tmp_path / "run"), progress=False, plots=False,
                          augment=False))
    assert all("lam" in h for h in res["history"]) and res["method"]["keep_dims"] == 0.5
    assert res["method"]["penalty"] == "tl1"  # the target's default
    assert res["kept_fraction"] <= 0.5 + 0.03  # 44 steps: the target is met before the end


def test_a_stage_interrupted_and_resumed_ends_bitwise_as_one_run(tmp_path):
    """Through train_stage and its checkpoints: lam, the correction and the frozen zeros resume exactly (the target
    finds the optimizer's gate group again after load_state_dict replaced it)."""
    import slimops.models as M
    import slimops.pruning.distributed as D
    from slimops.data import load
    from slimops.pruning.methods import MethodConfig
    from slimops.pruning.train import TrainConfig, run_config_of, train_stage

    data = load("digits")
    mcfg = MethodConfig("sidt", lam=1.0, keep_dims=0.6, steps=4 * 22)
    tcfg = TrainConfig(epochs=4, lr=2e-3, optimizer="adamw", schedule="cosine", augment=False)

    def run(ckpt, stop_before=None, resume=False):
        torch.manual_seed(0)
        m = M.build("vit_ti", num_classes=10, in_channels=1, width=0.125, img_size=32, patch=8, gates=True)

        def on_epoch(e):
            if e == stop_before:
                raise KeyboardInterrupt

        try:
            res = train_stage(m, data, mcfg, tcfg, stage="train", ckpt_path=str(ckpt), resume=resume,
                              device=torch.device("cpu"), dist_info=D.DistInfo(), progress=False,
                              run_config=run_config_of(m.config(), "digits", mcfg, tcfg), on_epoch=on_epoch)
        except KeyboardInterrupt:
            return None, None
        return m, res

    whole, res = run(tmp_path / "a.pt")
    assert res.method.target.met and [h["lam"] for h in res.history][-1] == 0.0
    assert run(tmp_path / "b.pt", stop_before=3) == (None, None)  # 3 epochs done, the target met in the 3rd
    again, res2 = run(tmp_path / "b.pt", resume=True)
    def timeless(history):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert res2.resumed_from == 3 and timeless(res2.history) == timeless(res.history)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), again.state_dict().values()))
