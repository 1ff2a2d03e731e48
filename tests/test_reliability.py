"""Reliability and security of the pipeline's files and runs (issue 17):

- no file slimops reads can run code (a crafted pickle is refused before its payload runs), old
  checkpoints (numpy RNG state as an ndarray) still load, everything a run writes loads weights-only;
- files come out with the user's umask permissions, never torn;
- the output folder is checked before training (unwritable, not a folder, not enough room);
- matplotlib is optional: without it a run warns once and writes no plots;
- a NaN/inf loss or gradient stops the run (naming the step) or skips the step, and never reaches a file;
- untrusted plans and model configurations are bounded (an error, not an allocation).

The CLI's error format for all of these is tested in tests/test_cli_errors.py.
"""
from __future__ import annotations

import json
import logging
import os
import random
import sys

import numpy as np
import pytest
import torch
from torch import nn

from slimops.pruning import Plan, build_pruned
from slimops.pruning import checkpoint as ckpt
from slimops.pruning.guard import NonFiniteError, NonFiniteGuard, check_finite_state
from slimops.pruning.pipeline import load_model_file, slim

pytest.importorskip("sklearn")
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(model="vgg11", width=0.25, data="digits", method="proximal-ns", lam=1.25, progress=False)


@pytest.fixture(scope="module")
def run1(tmp_path_factory):
    """One epoch of a tiny proximal-NS run: the files every reader test loads."""
    out = str(tmp_path_factory.mktemp("run1"))
    return out, slim(**TINY, epochs=1, out=out)


class _Payload:
    """Pickles to a call of os.system: what a crafted checkpoint runs on torch.load(weights_only=False)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(path, marker, fmt=ckpt.MODEL_FORMAT):
    # The payload sits *inside* a dict with the right format tag, as an attacker would place it.
    torch.save({"format": fmt, "version": ckpt.FORMAT_VERSION, "kind": "dense", "x": _Payload(marker)}, path)


# ------------------------------------------------------------------------------------------------
# No code execution from a file
# ------------------------------------------------------------------------------------------------
def test_crafted_pickle_is_refused_without_running(tmp_path):
    marker, evil = tmp_path / "PWNED", str(tmp_path / "evil.pt")
    _crafted(evil, marker)
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.pt.*could run code"):
        load_model_file(evil)
    assert not marker.exists()
    with pytest.raises(ValueError, match="refusing to load"):
        ckpt.load_file(evil, ckpt.CHECKPOINT_FORMAT, "owner")
    assert not marker.exists()


def test_crafted_checkpoint_on_resume_is_refused_without_running(tmp_path):
    marker, out = tmp_path / "PWNED", tmp_path / "run"
    out.mkdir()
    _crafted(str(out / "checkpoint-train.pt"), marker, fmt=ckpt.CHECKPOINT_FORMAT)
    with pytest.raises(ValueError, match="refusing to load"):
        slim(**TINY, epochs=1, out=str(out), resume=True)
    assert not marker.exists()


def test_every_file_a_run_writes_loads_weights_only(run1):
    out, _ = run1
    for name in ("dense.pt", "pruned.pt", "checkpoint-train.pt"):
        torch.load(os.path.join(out, name), map_location="cpu", weights_only=True)  # no allowlist needed
    load_model_file(os.path.join(out, "pruned.pt"))


def test_checkpoint_with_legacy_numpy_rng_still_loads_and_restores(tmp_path):
    """Checkpoints of before 2026-12 pickled numpy's RNG state as an ndarray: still loadable, still exact."""
    np.random.seed(7)
    state = ckpt.rng_state()
    legacy = dict(state, numpy=np.random.get_state())  # the old layout
    expected = np.random.rand(4)
    np.random.seed(0)
    path = str(tmp_path / "old.pt")
    torch.save({"format": ckpt.CHECKPOINT_FORMAT, "version": ckpt.FORMAT_VERSION, "rng": legacy}, path)
    loaded = ckpt.load_file(path, ckpt.CHECKPOINT_FORMAT, "owner")
    ckpt.set_rng_state(loaded["rng"])
    assert np.array_equal(np.random.rand(4), expected)


def test_rng_state_is_plain_data_and_roundtrips(tmp_path):
    s = ckpt.rng_state()
    a = (torch.rand(3), random.random(), np.random.rand(3))
    path = str(tmp_path / "rng.pt")
    ckpt.atomic_save({"rng": s}, path)
    ckpt.set_rng_state(torch.load(path, weights_only=True)["rng"])
    b = (torch.rand(3), random.random(), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])


# ------------------------------------------------------------------------------------------------
# Permissions, torn files, the output folder
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        ckpt.atomic_save({"a": torch.ones(2)}, str(tmp_path / "w.pt"))
        ckpt.atomic_write_text(str(tmp_path / "m.json"), "{}")
    finally:
        os.umask(old)
    for name in ("w.pt", "m.json"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == mode, name


def test_run_files_have_normal_permissions(run1):
    out, _ = run1
    mask = os.umask(0)
    os.umask(mask)
    for name in os.listdir(out):
        assert os.stat(os.path.join(out, name)).st_mode & 0o777 == 0o666 & ~mask, name


def test_disk_full_mid_write_leaves_the_old_file(tmp_path, monkeypatch):
    import errno

    target = tmp_path / "checkpoint.pt"
    ckpt.atomic_save({"epoch": 1}, str(target))
    old = target.read_bytes()

    def full(f):
        f.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        ckpt.atomic_write(str(target), full)
    assert target.read_bytes() == old and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_output_folder_that_cannot_be_written_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=r"slimops.pruning.slim: cannot write into the output folder '.*file/run'"):
        slim(**TINY, epochs=1, out=str(blocker / "run"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_fails_before_training(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="cannot write into the output folder"):
            slim(**TINY, epochs=1, out=str(ro))
    finally:
        ro.chmod(0o700)


def test_read_only_output_folder_simulated(tmp_path, monkeypatch):
    """What a read-only folder does for a non-root user (the CI runs as root, which writes anyway)."""
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError, match=r"cannot write into the output folder '.*' \(Permission denied\)"):
        slim(**TINY, epochs=1, out=str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "log.txt")


def test_not_enough_free_space_fails_before_training(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError, match=r"has 0.0 MiB free; this run writes about [0-9.]+ MiB") as e:
        slim(**TINY, epochs=1, out=str(tmp_path / "run"))
    assert e.value.errno == 28
    assert not os.path.exists(tmp_path / "run" / "checkpoint-train.pt")


def test_stale_temp_files_of_a_killed_writer_are_removed(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".tmp-abc123checkpoint-train.pt").write_bytes(b"torn")
    (out / "keep.txt").write_text("user file")
    ckpt.prepare_output_dir(str(out), "owner")
    assert sorted(os.listdir(out)) == ["keep.txt"]


# ------------------------------------------------------------------------------------------------
# matplotlib is optional
# ------------------------------------------------------------------------------------------------
def test_run_without_matplotlib_warns_once_and_writes_no_plots(tmp_path, monkeypatch, caplog):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="slimops"):
        logging.getLogger("slimops").addHandler(caplog.handler)  # the pipeline's logger does not propagate
        try:
            m = slim(**TINY, epochs=1, out=out)
        finally:
            logging.getLogger("slimops").removeHandler(caplog.handler)
    warnings = [r.getMessage() for r in caplog.records if "matplotlib" in r.getMessage()]
    assert warnings == ["plots skipped: matplotlib is not installed (pip install matplotlib, or slimops[demo])"]
    assert m["plots"] == [] and not any(f.endswith(".png") for f in os.listdir(out))
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["acc"] == m["acc"]


# ------------------------------------------------------------------------------------------------
# Non-finite training
# ------------------------------------------------------------------------------------------------
def _poison_forward(monkeypatch, at_call: int):
    """Makes the VGG's forward return NaN logits on training call ``at_call`` (1-based), once."""
    from slimops.models.vgg import VGG

    calls = {"n": 0}
    orig = VGG.forward

    def forward(self, x):
        y = orig(self, x)
        if self.training:
            calls["n"] += 1
            if calls["n"] == at_call:
                return y * float("nan")
        return y

    monkeypatch.setattr(VGG, "forward", forward)
    return calls


def test_nonfinite_stop_names_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    _poison_forward(monkeypatch, at_call=22 + 5)  # epoch 2 (22 steps an epoch at batch 64), step 5
    with pytest.raises(NonFiniteError, match=r"non-finite loss or gradient at train epoch 2, step 5 of the epoch "
                                             r".*checkpoint after epoch 1 is intact"):
        slim(**TINY, epochs=3, out=out)
    ck = ckpt.load_file(os.path.join(out, "checkpoint-train.pt"), ckpt.CHECKPOINT_FORMAT, "t")
    assert ck["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert not os.path.exists(os.path.join(out, "dense.pt"))


def test_nonfinite_skip_drops_the_step(tmp_path, monkeypatch):
    """The poisoned step is skipped and counted, the run finishes and its files hold finite weights (that the
    BN statistics the forward moved are put back: test_guard_skip_restores_buffers_and_counts)."""
    out = str(tmp_path / "run")
    _poison_forward(monkeypatch, at_call=3)
    m = slim(**TINY, epochs=1, out=out, on_nonfinite="skip", plots=False)
    assert m["history"][0]["skipped_steps"] == 1
    dense, _ = load_model_file(os.path.join(out, "dense.pt"))
    check_finite_state(dense, "test")


def test_guard_skip_restores_buffers_and_counts():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    guard = NonFiniteGuard(net, "skip")
    before = [b.clone() for b in net.buffers()]
    guard.before_forward()
    out = net(torch.randn(8, 3))
    loss = out.sum() * float("inf")
    loss.backward()
    assert guard.step_is_bad(loss, "here") and guard.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, net.buffers()))
    guard.before_forward()
    net.zero_grad()
    loss = net(torch.randn(8, 3)).sum()
    loss.backward()
    assert not guard.step_is_bad(loss, "here")


def test_guard_catches_a_nonfinite_gradient_with_a_finite_loss():
    w = nn.Parameter(torch.ones(3))
    net = nn.Module()
    net.w = w
    w.grad = torch.tensor([0.0, float("nan"), 1.0])
    with pytest.raises(NonFiniteError, match="at step 9"):
        NonFiniteGuard(net, "stop").step_is_bad(torch.tensor(1.0), "step 9")
    with pytest.raises(ValueError, match="on_nonfinite must be one of stop, skip"):
        NonFiniteGuard(net, "ignore")


def test_no_model_file_from_nonfinite_weights(tmp_path):
    from slimops.models import build
    from slimops.pruning.pipeline import save_model_file

    net = build("vgg11", num_classes=10, in_channels=1, width=0.25)
    with torch.no_grad():
        net.classifier.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"model file .* not written: 'classifier.weight' holds NaN or inf"):
        save_model_file(str(tmp_path / "m.pt"), net, kind="dense")
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------------------------
# Untrusted plans and configurations are bounded
# ------------------------------------------------------------------------------------------------
def test_plan_asking_for_a_huge_model_is_an_error_not_an_allocation(run1):
    out, _ = run1
    d = Plan.load(os.path.join(out, "plan.json")).to_dict()
    for arch in ({**d["arch"], "width": 1e6}, {**d["arch"], "num_classes": 10**9}, {**d["arch"], "width": 1e300}):
        with pytest.raises(ValueError, match=r"slimops.models.build_from_config: .*(limit|cannot build)"):
            build_pruned(Plan.from_dict({**d, "arch": arch}))


@pytest.mark.parametrize("edit,match", [
    (lambda d, k: d["layers"].__setitem__(k, [-1]), r"indices outside \[0, "),
    (lambda d, k: d["layers"].__setitem__(k, [0, 0]), "duplicate"),
    (lambda d, k: d["channels"].__setitem__(k, 10**9), "does not fit the model"),
    (lambda d, k: d["layers"].__setitem__(k, [1.5]), "non-integer"),
])
def test_plan_with_bad_indices_or_counts_is_refused(run1, edit, match):
    out, _ = run1
    d = json.loads(Plan.load(os.path.join(out, "plan.json")).to_json())
    edit(d, next(iter(d["layers"])))
    with pytest.raises(ValueError, match=match):
        build_pruned(Plan.from_dict(d))


def test_plan_file_too_big_is_refused_unread(tmp_path, monkeypatch):
    from slimops.pruning import plan as plan_mod

    p = tmp_path / "plan.json"
    p.write_text(" " * 2000)
    monkeypatch.setattr(plan_mod, "MAX_PLAN_BYTES", 1000)
    with pytest.raises(ValueError, match=r"'.*plan.json' is 2,000 bytes; a plan is at most 1,000"):
        Plan.load(str(p))
    p.write_bytes(b"\xff\xfe not utf-8")
    monkeypatch.setattr(plan_mod, "MAX_PLAN_BYTES", 10**6)
    with pytest.raises(ValueError, match=r"plan.json"):
        Plan.load(str(p))
