"""Fine-tuning that distils from a teacher (``finetune --teacher``, ``slim --teacher``): the criterion against its
definition, the teacher checked before anything is written, the sparse stage untouched by the teacher, resume
refusing a changed teacher, and the CLI's errors."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from slimops import cli
from slimops.distill import kd_logit_loss, load_teacher, logit_kd_criterion
from slimops.models import build
from slimops.pruning import SlimConfig
from slimops.pruning.cli import main_finetune, main_slim
from slimops.pruning.pipeline import finetune, load_model_file, save_model_file

pytest.importorskip("sklearn")
pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ["--model", "vgg11", "--width", "0.25", "--threads", "1", "--no-progress", "--lr", "0.01"]


def _metrics(d) -> dict:
    with open(os.path.join(d, "metrics.json")) as f:
        return json.load(f)


def _state(path) -> dict:
    return load_model_file(path)[1]["state_dict"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A dense teacher (2 epochs of `none`) and a pruned student (1 epoch of proximal NS, pruned to its zeros)."""
    root = tmp_path_factory.mktemp("kd")
    main_slim(BASE + ["--method", "none", "--epochs", "2", "--out", str(root / "teacher")])
    main_slim(BASE + ["--method", "proximal-ns", "--lam", "1.25", "--epochs", "1", "--out", str(root / "student")])
    return root


def test_criterion_is_ce_plus_weighted_kd():
    torch.manual_seed(0)
    teacher = torch.nn.Linear(5, 4)
    x, y, out = torch.randn(6, 5), torch.randint(0, 4, (6,)), torch.randn(6, 4, requires_grad=True)
    t = teacher(x).detach()
    ce = F.cross_entropy(out, y, reduction="sum")
    kl = sum(F.kl_div(F.log_softmax(out[i] / 3, 0), F.softmax(t[i] / 3, 0), reduction="sum") for i in range(6)) * 9
    got = logit_kd_criterion(teacher, kd_weight=0.5, temperature=3.0)(out, x, y)
    torch.testing.assert_close(got, ce + 0.5 * kl, rtol=1e-5, atol=1e-5)
    assert torch.equal(logit_kd_criterion(teacher, kd_weight=0.0)(out, x, y), ce)
    torch.testing.assert_close(logit_kd_criterion(teacher, label_weight=0.0, temperature=2.0)(out, x, y),
                               kd_logit_loss(out, t, 2.0))
    got.backward()
    assert out.grad is not None and teacher.weight.grad is None  # the teacher is a constant


@pytest.mark.parametrize("kw, bad", [({"kd_weight": -1.0}, "kd_weight"), ({"kd_weight": float("nan")}, "kd_weight"),
                                     ({"temperature": 0.0}, "temperature"), ({"temperature": True}, "temperature")])
def test_criterion_rejects_bad_options(kw, bad):
    with pytest.raises(ValueError, match=f"logit_kd_criterion: {bad} must be"):
        logit_kd_criterion(torch.nn.Linear(2, 2), **kw)


def test_finetune_with_a_teacher_records_it_and_learns_differently(runs, tmp_path):
    pruned, teacher = str(runs / "student" / "pruned.pt"), str(runs / "teacher" / "dense.pt")
    common = ["--weights", pruned, "--epochs", "1"] + BASE[4:]
    plain = main_finetune(common + ["--out", str(tmp_path / "plain")])
    kd = main_finetune(common + ["--teacher", teacher, "--kd-weight", "2", "--temperature", "3",
                                 "--out", str(tmp_path / "kd")])
    zero = main_finetune(common + ["--teacher", teacher, "--kd-weight", "0", "--out", str(tmp_path / "zero")])
    assert "teacher" not in plain
    m = _metrics(tmp_path / "kd")
    assert (m["teacher"], m["kd_weight"], m["temperature"]) == (teacher, 2.0, 3.0)
    assert m["acc_teacher"] == _metrics(runs / "teacher")["acc_before_prune"] and kd["acc"] == m["acc"]
    a, b, z = (_state(str(tmp_path / d / "finetuned.pt")) for d in ("plain", "kd", "zero"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the KD term changed the training
    assert all(torch.equal(a[k], z[k]) for k in a)  # with weight 0 it is plain cross-entropy, bit for bit


def test_slim_with_a_teacher_leaves_the_sparse_stage_alone(runs, tmp_path):
    """The teacher is loaded (a fresh model is built, drawing from the RNG) before training: the sparse stage must
    still be the one of the same run without a teacher."""
    args = BASE + ["--method", "proximal-ns", "--lam", "1.25", "--epochs", "1", "--finetune-epochs", "1"]
    main_slim(args + ["--out", str(tmp_path / "plain")])
    m = main_slim(args + ["--teacher", str(runs / "teacher" / "dense.pt"), "--out", str(tmp_path / "kd")])
    a, b = _state(str(tmp_path / "plain" / "dense.pt")), _state(str(tmp_path / "kd" / "dense.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert m["teacher"] == str(runs / "teacher" / "dense.pt") and m["config"]["teacher"] == m["teacher"]
    pa, pb = _state(str(tmp_path / "plain" / "pruned.pt")), _state(str(tmp_path / "kd" / "pruned.pt"))
    assert any(not torch.equal(pa[k], pb[k]) for k in pa)


def test_resume_refuses_another_teacher_setting(runs, tmp_path):
    pruned, teacher = str(runs / "student" / "pruned.pt"), str(runs / "teacher" / "dense.pt")
    out = str(tmp_path / "ft")
    kw = dict(weights=pruned, epochs=1, lr=0.01, out=out, progress=False, teacher=teacher)
    finetune(**kw)
    with pytest.raises(ValueError, match="different run"):
        finetune(**{**kw, "kd_weight": 0.5, "resume": True})
    with pytest.raises(ValueError, match="different run"):
        finetune(**{**kw, "teacher": None, "resume": True})
    finetune(**{**kw, "resume": True})  # the same run resumes (its one epoch is done)


def _foreign_teacher(path, **kw):
    torch.manual_seed(0)
    save_model_file(path, build("vgg11", width=0.25, **kw), kind="dense")
    return path


@pytest.mark.parametrize("kw, match", [({"num_classes": 7, "in_channels": 1}, "predicts 7 classes, the student 10"),
                                       ({"in_channels": 3}, "cannot read this run's images")])
def test_a_teacher_of_other_data_fails_before_anything_is_written(runs, tmp_path, kw, match):
    teacher = _foreign_teacher(str(tmp_path / "t.pt"), **kw)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"slimops.pruning.finetune: teacher '.*t.pt' {match}"):
        finetune(weights=str(runs / "student" / "pruned.pt"), epochs=1, out=str(out), progress=False, teacher=teacher)
    with pytest.raises(ValueError, match=f"slimops.pruning.slim: teacher '.*t.pt' {match}"):
        main_slim(BASE + ["--method", "none", "--epochs", "1", "--finetune-epochs", "1", "--teacher", teacher,
                          "--out", str(out)])
    assert not out.exists()


def test_load_teacher_freezes_it_and_keeps_the_student_mode(runs):
    student = build("vgg11", width=0.25, in_channels=1).train()
    x = torch.randn(2, 1, 32, 32)
    t = load_teacher(str(runs / "teacher" / "dense.pt"), "cpu", x, student, "here")
    assert not t.training and not any(p.requires_grad for p in t.parameters()) and student.training


def test_slim_config_checks_the_teacher_options():
    with pytest.raises(ValueError, match="teacher must be None when finetune_epochs is 0"):
        SlimConfig(model="vgg11", teacher="t.pt")
    with pytest.raises(ValueError, match="teacher must be the path of a model file"):
        SlimConfig(model="vgg11", teacher="", finetune_epochs=1)
    with pytest.raises(ValueError, match="SlimConfig: kd_weight must be"):
        SlimConfig(model="vgg11", teacher="t.pt", finetune_epochs=1, kd_weight=-0.1)
    old = {k: v for k, v in SlimConfig(model="vgg11").to_dict().items()
           if k not in ("teacher", "kd_weight", "temperature")}
    assert SlimConfig.from_dict(old).teacher is None  # a config of before the option reads back


@pytest.mark.parametrize("argv, msg", [
    (["finetune", "--weights", "W", "--teacher", "T", "--temperature", "0"], "argument --temperature: must be"),
    (["finetune", "--weights", "W", "--teacher", "T", "--kd-weight", "-1"], "argument --kd-weight: must be"),
    (["slim", "--teacher", "nope.pt", "--finetune-epochs", "1", "--epochs", "0"], "no such file 'nope.pt'"),
])
def test_cli_errors(tmp_path, capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and "Traceback" not in err
    assert f"slimops {argv[0]}: error:" in err.splitlines()[-1]
