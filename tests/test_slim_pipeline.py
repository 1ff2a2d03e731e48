"""End-to-end tests of the slimming pipeline (``python -m slimops slim | prune | finetune | eval``) on the
embedded digits data with a small VGG-11: the files it writes and their consistency, exact resume after
a SIGKILL, data parallelism under ``torchrun`` against the one-process run, and bad input.

Runs are short (one thread, width 0.25, a few epochs); a module-scoped run is shared by the tests
that only read its outputs. ``--lam 1.25`` makes proximal NS zero part (not all) of xi in 4 epochs,
so the plan, the pruned model and the metrics are non-trivial (eval-mode accuracy stays near chance in
so short a run: gamma shrinks faster than the BN running statistics follow; no test relies on it).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from slimops import cli
from slimops.pruning import Plan, build_pruned
from slimops.pruning.cli import main_eval, main_finetune, main_prune, main_slim
from slimops.pruning.pipeline import load_model_file, slim

from _proc import kill_group, run_with_deadline

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

BASE = ["--model", "vgg11", "--width", "0.25", "--method", "proximal-ns", "--lam", "1.25", "--threads", "1",
        "--no-progress"]
RUN_FILES = {"dense.pt", "plan.json", "pruned.pt", "metrics.json", "log.txt", "checkpoint-train.pt",
             "scores.png", "channels.png", "curves.png"}
METRIC_KEYS = ("acc", "acc_before_prune", "channels_total", "channels_kept", "params_dense", "params_pruned",
               "flops_dense", "flops_pruned")
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


pytestmark = pytest.mark.usefixtures("one_thread")


def _metrics(d) -> dict:
    with open(os.path.join(d, "metrics.json")) as f:
        return json.load(f)


def _load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    """The reference run: 4 epochs of proximal NS, in process (also the uninterrupted twin of the resume test)."""
    out = str(tmp_path_factory.mktemp("run4"))
    metrics = main_slim(BASE + ["--epochs", "4", "--out", out])
    return out, metrics


# 1 training epoch + 1 fine-tuning epoch at global batch 64, lr 0.01: the DDP test's one-process twin (at
# lr 0.1 these 22-step runs are chaotic: float32 reassociation alone grows to ~1e-2 in the weights).
FT_ARGS = BASE + ["--epochs", "1", "--finetune-epochs", "1", "--batch", "64", "--lr", "0.01"]


@pytest.fixture(scope="module")
def run_ft(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run_ft"))
    metrics = main_slim(FT_ARGS + ["--out", out])
    return out, metrics


# ------------------------------------------------------------------------------------------------
# What `slim` writes
# ------------------------------------------------------------------------------------------------
def test_slim_writes_every_file(run4):
    out, returned = run4
    assert set(os.listdir(out)) == RUN_FILES  # and no temp files left behind
    for png in ("scores.png", "channels.png", "curves.png"):
        with open(os.path.join(out, png), "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(os.path.join(out, png)) > 5000, png
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    assert log.count("train epoch") == 4 and "slim: acc" in log
    m = _metrics(out)
    assert m["acc"] == returned["acc"]
    assert sorted(os.path.basename(p) for p in m["plots"]) == ["channels.png", "curves.png", "scores.png"]


def test_slim_metrics_are_consistent(run4):
    out, _ = run4
    m = _metrics(out)
    for k in METRIC_KEYS:
        assert k in m, k
    for k in ("acc", "acc_before_prune", "acc_pruned_no_finetune"):
        assert 0.0 <= m[k] <= 1.0
    assert 1 <= m["channels_kept"] <= m["channels_total"]
    assert 0 < m["params_pruned"] <= m["params_dense"]
    assert 0 < m["flops_pruned"] <= m["flops_dense"] and m["flops_dense"] == 2 * m["macs_dense"]
    assert m["kept_fraction"] == pytest.approx(m["channels_kept"] / m["channels_total"])
    plan = Plan.load(os.path.join(out, "plan.json"))
    assert plan.channels_kept == m["channels_kept"] and plan.channels_total == m["channels_total"]
    assert {k: {"total": plan.channels[k], "kept": len(v)} for k, v in plan.layers.items()} == m["layers"]
    if m["channels_kept"] < m["channels_total"]:
        assert m["params_pruned"] < m["params_dense"] and m["flops_pruned"] < m["flops_dense"]
    # without fine-tuning, the final accuracy is the pruned model's
    assert m["finetune_epochs"] == 0 and m["acc"] == m["acc_pruned_no_finetune"]
    # the compacted model computes exactly the masked network (removed channels' gamma zeroed, their
    # relu(beta) carried by one constant channel per layer)
    assert m["compaction_vs_masked"]["rel_diff"] <= 1e-5
    assert m["compaction_vs_masked"]["top1_agreement"] == 1.0
    assert 0 <= m["constant_channels"] <= len(m["layers"])
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3, 4]
    assert all(h["stage"] == "train" for h in m["history"])
    assert m["method"]["lam"] == 1.25 and m["percent"] is None
    # the plan removes exactly the zeros of the saved xi
    assert len(plan.constant) == m["constant_channels"]
    dense = _load(os.path.join(out, "dense.pt"))
    net, _ = load_model_file(os.path.join(out, "dense.pt"))
    for g, xi in zip(net.slim_groups(), dense["xi"]):
        nz = (xi != 0).nonzero().flatten().tolist()
        assert plan.layers[g.bn] == (nz or plan.layers[g.bn][:1]), g.bn


def test_eval_reproduces_metrics(run4, capsys):
    out, _ = run4
    m = _metrics(out)
    r = main_eval(["--weights", os.path.join(out, "pruned.pt"), "--threads", "1"])
    printed = json.loads(capsys.readouterr().out)
    assert r["acc"] == m["acc"] == printed["acc"]
    assert r["kind"] == "pruned" and r["params"] == m["params_pruned"] and r["flops"] == m["flops_pruned"]
    r = main_eval(["--weights", os.path.join(out, "dense.pt"), "--threads", "1"])
    assert r["kind"] == "dense" and r["acc"] == m["acc_before_prune"] and r["params"] == m["params_dense"]


def test_pruned_file_loads_into_the_replayed_plan(run4):
    out, _ = run4
    plan = Plan.load(os.path.join(out, "plan.json"))
    obj = _load(os.path.join(out, "pruned.pt"))
    assert obj["format"] == "slimops-model" and obj["kind"] == "pruned" and obj["plan"] == plan.to_dict()
    fresh = build_pruned(plan)
    fresh.load_state_dict(obj["state_dict"], strict=True)
    for g in fresh.slim_groups():
        assert fresh.get_submodule(g.bn).num_features == len(plan.layers[g.bn]) + (g.bn in plan.constant)
    loaded, _ = load_model_file(os.path.join(out, "pruned.pt"))
    x = torch.randn(3, 1, 32, 32)
    fresh.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), loaded(x))


def test_prune_then_finetune(run4, tmp_path):
    out, _ = run4
    p_out, f_out = str(tmp_path / "p50"), str(tmp_path / "ft")
    m = main_prune(["--weights", os.path.join(out, "dense.pt"), "--percent", "0.5", "--threads", "1", "--out", p_out])
    assert set(os.listdir(p_out)) == {"plan.json", "pruned.pt", "metrics.json", "log.txt"}
    plan = Plan.load(os.path.join(p_out, "plan.json"))
    assert plan.meta["percent"] == 0.5 and plan.meta["criterion"] == "xi"
    assert m["channels_kept"] == plan.channels_kept <= m["channels_total"] // 2 + len(plan.layers)
    assert m["params_pruned"] < m["params_dense"] and m["acc"] == m["acc_pruned_no_finetune"]
    assert _metrics(p_out)["channels_kept"] == plan.channels_kept

    f = main_finetune(["--weights", os.path.join(p_out, "pruned.pt"), "--epochs", "1", "--threads", "1",
                       "--no-progress", "--out", f_out])
    assert set(os.listdir(f_out)) == {"finetuned.pt", "metrics.json", "log.txt", "checkpoint-finetune.pt"}
    assert [h["stage"] for h in f["history"]] == ["finetune"] and _metrics(f_out)["acc"] == f["acc"]
    net, obj = load_model_file(os.path.join(f_out, "finetuned.pt"))
    assert obj["kind"] == "pruned" and Plan.from_dict(obj["plan"]).layers == plan.layers
    r = main_eval(["--weights", os.path.join(f_out, "finetuned.pt"), "--threads", "1"])
    assert r["acc"] == f["acc"]


def test_finetune_epochs_extend_the_history(run_ft):
    out, m = run_ft
    assert [(h["stage"], h["epoch"]) for h in m["history"]] == [("train", 1), ("finetune", 1)]
    assert m["finetune_epochs"] == 1
    assert set(os.listdir(out)) == RUN_FILES | {"checkpoint-finetune.pt"}
    assert _load(os.path.join(out, "checkpoint-finetune.pt"))["stage"] == "finetune"
    r = main_eval(["--weights", os.path.join(out, "pruned.pt"), "--threads", "1"])
    assert r["acc"] == m["acc"]


# ------------------------------------------------------------------------------------------------
# Exact resume after SIGKILL
# ------------------------------------------------------------------------------------------------
def _ckpt_epoch(path) -> int:
    try:
        return int(_load(path)["epoch"])
    except Exception:  # not there yet
        return 0


def test_resume_after_kill_is_bitwise_identical(run4, tmp_path):
    ref_out, ref = run4
    a = str(tmp_path / "A")
    cmd = [sys.executable, "-m", "slimops", "slim", *BASE, "--epochs", "4", "--out", a]
    ck = os.path.join(a, "checkpoint-train.pt")
    with open(tmp_path / "a.log", "wb") as logf:
        # its own process group, killed as a group below: nothing it started outlives the test
        p = subprocess.Popen(cmd, env=ENV, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            killed_at = 0
            while time.monotonic() < deadline and p.poll() is None:
                if os.path.exists(ck):
                    killed_at = _ckpt_epoch(ck)
                    if killed_at >= 1:
                        p.send_signal(signal.SIGKILL)
                        break
                time.sleep(0.05)
            p.wait(timeout=30)
        finally:
            kill_group(p, grace=1.0)  # a no-op when the SIGKILL above already took it down
    assert p.returncode == -signal.SIGKILL, f"the run was not killed mid-training:\n{(tmp_path / 'a.log').read_text()}"
    assert 1 <= killed_at < 4
    assert not os.path.exists(os.path.join(a, "dense.pt"))
    saved_epoch = _ckpt_epoch(ck)
    assert killed_at <= saved_epoch < 4

    r = run_with_deadline(cmd + ["--resume"], env=ENV, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resumed from {ck} after epoch {saved_epoch}" in r.stderr

    da, db = _load(os.path.join(a, "dense.pt")), _load(os.path.join(ref_out, "dense.pt"))
    assert da["state_dict"].keys() == db["state_dict"].keys()
    for k in db["state_dict"]:
        assert torch.equal(da["state_dict"][k], db["state_dict"][k]), k
    assert len(da["xi"]) == len(db["xi"]) and all(torch.equal(u, v) for u, v in zip(da["xi"], db["xi"]))
    ma = _metrics(a)
    assert ma["acc"] == ref["acc"] and ma["acc_before_prune"] == ref["acc_before_prune"]
    assert ma["channels_kept"] == ref["channels_kept"]
    strip = lambda hist: [{k: v for k, v in h.items() if k != "seconds"} for h in hist]  # noqa: E731
    assert strip(ma["history"]) == strip(ref["history"])
    with open(os.path.join(a, "plan.json")) as f1, open(os.path.join(ref_out, "plan.json")) as f2:
        assert json.load(f1)["layers"] == json.load(f2)["layers"]
    pa, pb = _load(os.path.join(a, "pruned.pt")), _load(os.path.join(ref_out, "pruned.pt"))
    assert all(torch.equal(pa["state_dict"][k], v) for k, v in pb["state_dict"].items())


def test_resume_refuses_a_different_run(run4, tmp_path):
    ref_out, _ = run4
    c = tmp_path / "C"
    c.mkdir()
    shutil.copy(os.path.join(ref_out, "checkpoint-train.pt"), c / "checkpoint-train.pt")
    with pytest.raises(ValueError, match="different run"):
        main_slim(BASE + ["--lam", "0.5", "--epochs", "4", "--resume", "--out", str(c)])  # the last --lam wins
    with pytest.raises(ValueError, match="different run"):  # another seed
        main_slim(BASE + ["--epochs", "4", "--seed", "1", "--resume", "--out", str(c)])
    (c / "checkpoint-train.pt").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match=re.escape(f"'{c / 'checkpoint-train.pt'}' is corrupted")):
        main_slim(BASE + ["--epochs", "4", "--resume", "--out", str(c)])
    # a model file is not a checkpoint
    shutil.copy(os.path.join(ref_out, "dense.pt"), c / "checkpoint-train.pt")
    with pytest.raises(ValueError, match="is not a slimops-checkpoint file"):
        main_slim(BASE + ["--epochs", "4", "--resume", "--out", str(c)])


# ------------------------------------------------------------------------------------------------
# Data parallel: torchrun with 2 processes against the 1-process run
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    d2 = str(tmp_path_factory.mktemp("ddp") / "D2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "slimops",
           "slim", *FT_ARGS, "--out", d2]
    r = run_with_deadline(cmd, env=ENV, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return d2, r.stdout + r.stderr


def test_ddp_only_rank0_writes(run_ft, ddp_run):
    ref_out, ref = run_ft
    d2, output = ddp_run
    # the same files as the 1-process run (no per-rank copies, no temp files), one log line per event
    assert set(os.listdir(d2)) == set(os.listdir(ref_out))
    with open(os.path.join(d2, "log.txt")) as f:
        log = f.read()
    for line in ("slim: vgg11", "train epoch 1/1", "finetune epoch 1/1", "slim: acc"):
        assert log.count(line) == 1, line
        assert output.count(line) == 1, line
    m2 = _metrics(d2)
    assert [(h["stage"], h["epoch"]) for h in m2["history"]] == [("train", 1), ("finetune", 1)]
    assert m2["channels_total"] == ref["channels_total"] and m2["train"] == ref["train"]
    assert m2["channels_kept"] == ref["channels_kept"] and m2["params_pruned"] == ref["params_pruned"]
    for name in ("dense.pt", "pruned.pt"):
        load_model_file(os.path.join(d2, name))  # plain, loadable models (no SyncBN / GlobalBN classes)
    d_ref, d_ddp = _load(os.path.join(ref_out, "dense.pt")), _load(os.path.join(d2, "dense.pt"))
    worst, where = 0.0, None
    for k, v in d_ref["state_dict"].items():
        if v.is_floating_point() and (d_ddp["state_dict"][k] - v).abs().max().item() >= worst:
            worst, where = (d_ddp["state_dict"][k] - v).abs().max().item(), k
    print(f"\nCLI DDP (2 processes) vs 1 process, dense.pt after 1 epoch: max |diff| {worst:.3g} at {where}")


def test_ddp_matches_one_process(run_ft, ddp_run):
    ref_out, _ = run_ft
    d2, _ = ddp_run
    d_ref, d_ddp = _load(os.path.join(ref_out, "dense.pt")), _load(os.path.join(d2, "dense.pt"))
    for k, v in d_ref["state_dict"].items():
        if v.is_floating_point():
            # 22 fp32 steps: a different reduction order (2 ranks, all-reduce) moves weights by ~1e-4, the
            # size of the 1-process fp32-vs-fp64 gradient error itself; a wrong split or BN would be >1e-2.
            torch.testing.assert_close(d_ddp["state_dict"][k], v, rtol=1e-3, atol=1e-3, msg=k)
        else:
            assert torch.equal(d_ddp["state_dict"][k], v), k
    for u, v in zip(d_ddp["xi"], d_ref["xi"]):
        torch.testing.assert_close(u, v, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,bad", [
    (["--model", "vgg12"], "vgg12"), (["--method", "slimming"], "slimming"), (["--data", "mnist"], "mnist"),
])
def test_cli_rejects_unknown_names(tmp_path, capsys, argv, bad):
    with pytest.raises(SystemExit) as e:
        main_slim(argv + ["--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert f"invalid choice: '{bad}'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
    with pytest.raises(SystemExit) as e:
        cli.main(["slimm"])
    assert e.value.code == 2 and "slimops: error: unknown command 'slimm'" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs,bad", [
    ({"model": "vgg12"}, "vgg12"), ({"model": "vgg11", "method": "slimming"}, "slimming"),
    ({"model": "vgg11", "data": "mnist"}, "mnist"), ({"model": "vgg11", "width": 0.0}, "width"),
    ({"model": "vgg11", "epochs": -1}, "epochs"), ({"model": "vgg11", "batch": 0}, "batch"),
    ({"model": "vgg11", "method": "prox-sgd", "penalty": "l21"}, "penalty"),
    ({"model": "vgg11", "lam": -1.0}, "lam"),
])
def test_api_rejects_bad_arguments(tmp_path, kwargs, bad):
    kwargs = dict(kwargs)
    with pytest.raises(ValueError, match=bad):
        slim(out=str(tmp_path / "x"), epochs=kwargs.pop("epochs", 1), progress=False, **kwargs)


def test_missing_cifar_dir_names_the_path(tmp_path):
    missing = str(tmp_path / "nonexistent")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        main_slim(BASE + ["--data", "cifar10", "--data-dir", missing, "--epochs", "1", "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="data_dir is None"):
        main_slim(BASE + ["--data", "cifar100", "--epochs", "1", "--out", str(tmp_path / "o")])


def _bad_files(run_dir, tmp_path) -> dict:
    files = {}
    files["corrupted"] = tmp_path / "corrupted.pt"
    files["corrupted"].write_bytes(b"PK\x03\x04 definitely not a zip" * 10)
    files["truncated"] = tmp_path / "truncated.pt"
    data = open(os.path.join(run_dir, "pruned.pt"), "rb").read()
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["plain dict"] = tmp_path / "plain.pt"
    torch.save(load_model_file(os.path.join(run_dir, "dense.pt"))[0].state_dict(), files["plain dict"])
    files["checkpoint"] = tmp_path / "checkpoint-train.pt"  # a slimops file of another kind
    shutil.copy(os.path.join(run_dir, "checkpoint-train.pt"), files["checkpoint"])
    files["plan json"] = tmp_path / "plan.json"
    shutil.copy(os.path.join(run_dir, "plan.json"), files["plan json"])
    files["wrong config"] = tmp_path / "wrong-config.pt"
    obj = _load(os.path.join(run_dir, "dense.pt"))
    obj["config"] = dict(obj["config"], width=0.5)
    torch.save(obj, files["wrong config"])
    files["wrong plan"] = tmp_path / "wrong-plan.pt"
    obj = _load(os.path.join(run_dir, "pruned.pt"))
    obj["plan"]["arch"] = dict(obj["plan"]["arch"], arch="vgg13")
    torch.save(obj, files["wrong plan"])
    return {k: str(v) for k, v in files.items()}


def test_eval_rejects_foreign_and_corrupted_files(run4, tmp_path):
    run_dir, _ = run4
    for what, path in _bad_files(run_dir, tmp_path).items():
        # a pruned.pt whose plan does not fit its layers fails in Plan.check, whose message names the layers
        # but not the file (load_model_file does not wrap that ValueError)
        match = "plan does not fit the model's BN layers" if what == "wrong plan" else re.escape(f"'{path}'")
        with pytest.raises(ValueError, match=match):
            main_eval(["--weights", path, "--threads", "1"])
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.pt"))):
        main_eval(["--weights", str(tmp_path / "missing.pt")])


def test_prune_and_finetune_reject_wrong_files(run4, tmp_path):
    run_dir, _ = run4
    pruned = os.path.join(run_dir, "pruned.pt")
    with pytest.raises(ValueError, match=re.escape(f"'{pruned}' holds a pruned model")):
        main_prune(["--weights", pruned, "--out", str(tmp_path / "p")])
    ck = os.path.join(run_dir, "checkpoint-train.pt")
    with pytest.raises(ValueError, match=re.escape(f"'{ck}' is not a slimops-model file")):
        main_prune(["--weights", ck, "--out", str(tmp_path / "p")])
    with pytest.raises(ValueError, match=re.escape(f"'{ck}' is not a slimops-model file")):
        main_finetune(["--weights", ck, "--epochs", "1", "--no-progress", "--out", str(tmp_path / "f")])


# ------------------------------------------------------------------------------------------------
# CIFAR-format data through the whole pipeline (3 channels, flips, 100 classes, stream BNs)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data,model,classes", [("cifar10", "densenet40", 10), ("cifar100", "preresnet20", 100)])
def test_slim_on_cifar_format_files(tmp_path, data, model, classes):
    from test_data import _fake_cifar10, _fake_cifar100

    torch.set_num_threads(1)
    (_fake_cifar10 if data == "cifar10" else _fake_cifar100)(tmp_path / "d", n=40)
    out = tmp_path / "o"
    m = main_slim(["--model", model, "--width", "0.25", "--data", data, "--data-dir", str(tmp_path / "d"),
                   "--method", "prox-sgd", "--lam", "3", "--epochs", "1", "--batch", "16", "--threads", "1",
                   "--no-progress", "--out", str(out)])
    assert m["model"] == {"arch": model, "width": 0.25, "num_classes": classes, "in_channels": 3}
    assert 0 < m["channels_kept"] <= m["channels_total"]
    # the written files replay: plan -> fresh compacted architecture -> the saved weights, same outputs
    pruned, _ = load_model_file(str(out / "pruned.pt"))
    replay = build_pruned(Plan.load(str(out / "plan.json")))
    replay.load_state_dict(pruned.state_dict())
    x = torch.randn(2, 3, 32, 32)
    pruned.eval(), replay.eval()
    torch.testing.assert_close(replay(x), pruned(x))


def test_every_method_runs_with_its_cli_defaults(tmp_path):
    """No BN method needs a flag to start (ns-lp takes p = 1/2, tl1 a = 1), and lam defaults to the calibration.
    (The ViT methods need a ViT, and vtp / sidt --lam: tests/test_vit_pruning.py, tests/test_patch_slim.py.)"""
    from slimops.pruning.methods import METHODS, TOKEN_METHODS, VIT_METHODS, default_lam

    torch.set_num_threads(1)
    for method in (m for m in METHODS if m not in VIT_METHODS + TOKEN_METHODS):
        m = main_slim(["--model", "vgg11", "--width", "0.125", "--method", method, "--epochs", "1", "--threads", "1",
                       "--no-progress", "--bn-recal", "2", "--out", str(tmp_path / method)])
        assert m["method"]["method"] == method
        assert m["method"]["lam"] == pytest.approx(default_lam(method, m["steps"], m["method"]["penalty"]))
        assert m["method"]["a"] == (0.5 if method == "ns-lp" else 1.0)
        assert 0 < m["channels_kept"] <= m["channels_total"]
