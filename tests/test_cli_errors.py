"""The CLI fails like a CLI (issue 17): bad input prints one line ``slimops <command>: error: <what>`` on stderr
and exits with status 2, no traceback; ``--debug`` shows the traceback; a diverged run (NaN/inf, stopped)
exits with status 1 and one line. Tracebacks stay for bugs (anything that is not ValueError / OSError).

The files are made without training (a freshly built model saved as dense.pt), so every case is fast.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from slimops import cli

pytest.importorskip("sklearn")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(cli_files):
    return cli_files


def _fails(capsys, argv, status=2):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == status, err
    assert "Traceback" not in err
    # argparse's usage lines (the first flush left, the rest indented) may precede the one error line
    return [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("usage:", " "))]


# command, argv (with {d} the files' folder), what the one error line must contain
CASES = [
    ("eval", ["--weights", "{d}/missing.pt"], "no such file '{d}/missing.pt'"),
    ("eval", ["--weights", "{d}/garbage.pt"], "'{d}/garbage.pt' is corrupted or not a torch file"),
    ("eval", ["--weights", "{d}/folder.pt"], "no such file '{d}/folder.pt'"),
    ("eval", ["--weights", "{d}/evil.pt"], "refusing to load '{d}/evil.pt'"),
    ("eval", ["--weights", "{d}/plan.json"], "'{d}/plan.json' is corrupted or not a torch file"),
    ("eval", ["--weights", "{d}/dense.pt", "--sparse", "--plan", "{d}/other-plan.json"], "plan made for"),
    ("eval", ["--weights", "{d}/dense.pt", "--sparse", "--plan", "{d}/nope.json"], "no plan at '{d}/nope.json'"),
    ("eval", ["--weights", "{d}/pruned.pt", "--sparse"], "holds a pruned model"),
    ("prune", ["--weights", "{d}/pruned.pt", "--out", "{d}/p"], "holds a pruned model; prune a dense.pt"),
    ("prune", ["--weights", "{d}/dense.pt", "--percent", "1.5", "--out", "{d}/p"],
     "argument --percent: must be 'auto' or a fraction in [0, 1), got 1.5"),
    ("prune", ["--weights", "{d}/evil.pt", "--out", "{d}/p"], "refusing to load"),
    ("finetune", ["--weights", "{d}/missing.pt", "--out", "{d}/f"], "no such file"),
    ("finetune", ["--weights", "{d}/pruned.pt", "--epochs", "-1", "--out", "{d}/f"],
     "argument --epochs: must be an integer in [0, 2147483647], got -1"),
    ("slim", ["--epochs", "-1", "--out", "{d}/s"], "argument --epochs: must be an integer in [0, "),
    ("slim", ["--lr", "0", "--out", "{d}/s"], "argument --lr: must be a finite number > 0"),
    ("slim", ["--width", "-1", "--out", "{d}/s"], "argument --width: must be a finite number > 0, got -1"),
    ("slim", ["--percent", "2", "--epochs", "0", "--out", "{d}/s"], "argument --percent: must be 'auto' or a fraction"),
    ("slim", ["--method", "ns", "--penalty", "l0", "--epochs", "0", "--out", "{d}/s"],
     "method 'ns' uses penalty 'l1'; penalty 'l0' does not apply to it"),
    ("slim", ["--device", "cuda:3", "--out", "{d}/s"], "argument --device: 'cuda:3'"),
    ("slim", ["--out", "{d}/garbage.pt/run"], "cannot write into the output folder '{d}/garbage.pt/run'"),
    ("slim", ["--data", "cifar10", "--data-dir", "{d}/nodata", "--out", "{d}/s"], "{d}/nodata"),
    ("slim", ["--method", "prox-sgd", "--penalty", "l21", "--out", "{d}/s"], "argument --penalty: invalid choice: 'l21'"),
    ("slim", ["--model", "vit_ti", "--method", "patch-slim", "--keep-tokens", "1.5", "--out", "{d}/s"],
     "argument --keep-tokens: must be a fraction in (0, 1], got 1.5"),
    ("slim", ["--model", "vit_ti", "--keep-tokens", "0.5", "--method", "none", "--out", "{d}/s"],
     "keep_tokens must be None for method none"),
    ("prune", ["--weights", "{d}/dense.pt", "--keep-tokens", "0", "--out", "{d}/p"],
     "argument --keep-tokens: must be a fraction in (0, 1], got 0"),
    ("quantize", ["--teacher", "{d}/missing.pt", "--out", "{d}/q"], "no such file '{d}/missing.pt'"),
    ("quantize", ["--teacher", "{d}/evil.pt", "--out", "{d}/q"], "refusing to load '{d}/evil.pt'"),
    ("quantize", ["--teacher", "{d}/dense.pt", "--method", "fda", "--out", "{d}/q"],
     "method 'fda' trains a binary net: it needs wbits = abits = 1"),
    ("quantize", ["--teacher", "{d}/dense.pt", "--wbits", "1", "--abits", "1", "--method", "kd", "--out", "{d}/q"],
     "wbits = abits = 1 is a binary net: use method 'fda' or 'ste'"),
    ("quantize", ["--teacher", "{d}/dense.pt", "--method", "qat", "--label-free", "--out", "{d}/q"],
     "label_free needs a teacher's logits to learn from"),
    ("quantize", ["--teacher", "{d}/dense.pt", "--wbits", "0", "--out", "{d}/q"],
     "argument --wbits: must be an integer in [1, 16] or 32"),
    ("quantize", ["--teacher", "{d}/garbage.pt", "--out", "{d}/q"], "'{d}/garbage.pt' is corrupted or not a torch file"),
]


@pytest.mark.parametrize("command,argv,expect", CASES, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_bad_input_is_one_line_and_status_2(files, capsys, command, argv, expect):
    argv = [a.format(d=files) for a in argv]
    lines = _fails(capsys, [command, *argv, "--threads", "1", "--no-progress"] if command in ("slim", "finetune", "quantize")
                   else [command, *argv, "--threads", "1"])
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"slimops {command}: error: "), lines[0]
    assert expect.format(d=files) in lines[0], lines[0]
    assert not (files / "PWNED").exists()


@pytest.mark.parametrize("argv,expect", [
    (["slim", "--model", "vgg12"], "slimops slim: error: argument --model: invalid choice: 'vgg12'"),
    (["eval"], "slimops eval: error: the following arguments are required: --weights"),
    (["prune", "--weights", "x", "--percent", "half"], "slimops prune: error: argument --percent: 'half' is not a number"),
    (["slim", "--on-nonfinite", "ignore"], "slimops slim: error: argument --on-nonfinite: invalid choice"),
    (["slimm"], "slimops: error: unknown command 'slimm' (choose from slim, prune, finetune, eval, quantize, demo, info)"),
])
def test_usage_errors(capsys, argv, expect):
    lines = _fails(capsys, argv)
    assert lines[-1].startswith(expect), lines


def test_debug_shows_the_traceback(files):
    with pytest.raises(FileNotFoundError, match="no such file"):
        cli.main(["eval", "--weights", str(files / "missing.pt"), "--debug"])
    with pytest.raises(ValueError, match="refusing to load"):
        cli.main(["--debug", "eval", "--weights", str(files / "evil.pt")])
    assert not (files / "PWNED").exists()


def test_a_bug_keeps_its_traceback(files, monkeypatch):
    """Only bad input is turned into one line: an unexpected exception type propagates (a bug to report)."""
    import slimops.pruning.pipeline as pipeline

    def broken(**kw):
        raise KeyError("internal")

    monkeypatch.setattr(pipeline, "evaluate_file", broken)
    with pytest.raises(KeyError, match="internal"):
        cli.main(["eval", "--weights", str(files / "dense.pt")])


def test_diverged_run_exits_1_with_one_line(tmp_path, capsys):
    lines = _fails(capsys, ["slim", "--model", "vgg11", "--width", "0.25", "--epochs", "1", "--lr", "1e6",
                            "--threads", "1", "--no-progress", "--out", str(tmp_path / "run")], status=1)
    assert lines[-1].startswith("slimops slim: error: slimops.pruning: non-finite loss or gradient at train epoch 1, "
                                "step "), lines
    assert not os.path.exists(tmp_path / "run" / "checkpoint-train.pt")


def test_real_process_prints_one_line(files):
    """The installed entry point as a user runs it: exit status 2, one line on stderr, nothing on stdout."""
    r = subprocess.run([sys.executable, "-m", "slimops", "eval", "--weights", str(files / "missing.pt")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.strip() == (f"slimops eval: error: slimops.pruning.load_model_file: no such file "
                                f"'{files / 'missing.pt'}'")
