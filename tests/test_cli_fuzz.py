"""A randomised bad-input suite over every CLI command (issue 17): each option of each command gets values
that are wrong for it (negative, zero where it must be positive, NaN, inf, overflowing, not a number, a path to
nothing / a folder / garbage / a crafted pickle, a bogus choice or device), one at a time, on an otherwise valid
command line. Every case must end as a CLI ends for bad input: status 2, one line
``slimops <command>: error: ...`` on stderr naming the option (its flag or its name), no traceback, and no
training started (each case is over in well under a second or two).

Values are drawn with a fixed seed from per-kind pools, so a failure reproduces; the case count is printed
(``-s``) for the closing note of issue 17.
"""
from __future__ import annotations

import random

import pytest

from slimops import cli

pytest.importorskip("sklearn")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(cli_files):
    return cli_files

# Values that are wrong for every option of a kind.
BAD = {
    "pos_float": ["-1", "0", "nan", "inf", "-inf", "1e400", "abc", ""],
    "float": ["nan", "inf", "-inf", "1e400", "abc", "1,5"],
    "pos_int": ["-1", "0", "1.5", "abc", "", "99999999999999999999999"],
    "nonneg_int": ["-1", "-100", "1.5", "abc", "", "99999999999999999999999"],
    "fraction": ["-0.5", "1", "1.5", "nan", "inf", "abc"],
    "choice": ["bogus", "", "VGG11", "none;rm"],
    "device": ["tpu", "cuda:99", "gpu", "cpu:-1", "", "meta"],
    "weights": ["{d}/missing.pt", "{d}", "{d}/garbage.pt", "{d}/evil.pt", "{d}/plan.json", "{d}/empty.pt"],
    "plan": ["{d}/missing.json", "{d}", "{d}/garbage.pt", "{d}/not-a-plan.json", "{d}/other-plan.json", "{d}/empty.pt"],
    "out": ["{d}/garbage.pt/run", "{d}/garbage.pt"],
    "data_dir": ["{d}/missing", "{d}/garbage.pt"],
}

# command -> (valid base argv, {option: kind}); "--data cifar10" is added for the data_dir cases.
COMMANDS = {
    "slim": (["--epochs", "0", "--width", "0.25", "--bn-recal", "0", "--no-progress", "--out", "{d}/s"],
             {"--width": "pos_float", "--lam": "float", "--beta": "pos_float", "--a": "float", "--percent": "fraction",
              "--epochs": "nonneg_int", "--finetune-epochs": "nonneg_int", "--batch": "pos_int", "--lr": "pos_float",
              "--bn-recal": "nonneg_int", "--threads": "nonneg_int", "--model": "choice", "--method": "choice",
              "--data": "choice", "--penalty": "choice", "--on-nonfinite": "choice", "--device": "device",
              "--out": "out", "--data-dir": "data_dir"}),
    "prune": (["--weights", "{d}/dense.pt", "--bn-recal", "0", "--out", "{d}/p"],
              {"--weights": "weights", "--percent": "fraction", "--bn-recal": "nonneg_int", "--threads": "nonneg_int",
               "--data": "choice", "--device": "device", "--out": "out", "--data-dir": "data_dir"}),
    "finetune": (["--weights", "{d}/pruned.pt", "--epochs", "0", "--no-progress", "--out", "{d}/f"],
                 {"--weights": "weights", "--epochs": "nonneg_int", "--batch": "pos_int", "--lr": "pos_float",
                  "--threads": "nonneg_int", "--data": "choice", "--device": "device", "--out": "out",
                  "--on-nonfinite": "choice", "--data-dir": "data_dir"}),
    "eval": (["--weights", "{d}/dense.pt", "--latency-batch", "1"],
             {"--weights": "weights", "--latency-batch": "pos_int", "--threads": "nonneg_int", "--data": "choice",
              "--device": "device", "--data-dir": "data_dir", "--plan": "plan"}),
    "quantize": (["--teacher", "{d}/dense.pt", "--epochs", "0", "--no-progress", "--no-plots", "--out", "{d}/q"],
                 {"--teacher": "weights", "--wbits": "pos_int", "--abits": "pos_int", "--epochs": "nonneg_int",
                  "--temperature": "pos_float", "--kd-weight": "float", "--fa-weight": "float", "--fa-k": "pos_int",
                  "--first-last-bits": "pos_int", "--batch": "pos_int", "--lr": "pos_float",
                  "--threads": "nonneg_int", "--method": "choice", "--fa-norm": "choice", "--optimizer": "choice",
                  "--schedule": "choice", "--data": "choice", "--on-nonfinite": "choice", "--device": "device",
                  "--out": "out", "--data-dir": "data_dir"}),
    "demo": (["--epochs", "0", "--out", "{d}/demo"],
             {"--width": "pos_float", "--epochs": "nonneg_int", "--threads": "nonneg_int", "--model": "choice",
              "--out": "out"}),
}
# Options whose "0" means something (a default, or "none of it") rather than an error.
ZERO_OK = {"--threads", "--epochs", "--finetune-epochs", "--bn-recal"}
PER_OPTION = 4  # values drawn per option


def _cases():
    rng = random.Random(2026)
    cases = []
    for command, (base, options) in COMMANDS.items():
        for opt, kind in options.items():
            pool = [v for v in BAD[kind] if not (v == "0" and opt in ZERO_OK)]
            for value in rng.sample(pool, min(PER_OPTION, len(pool))):
                cases.append((command, opt, value))
    return cases


CASES = _cases()


def _argv(files, command, opt, value):
    base, _ = COMMANDS[command]
    argv = [a.format(d=files) for a in base]
    value = value.format(d=files)
    if opt in argv:  # replace the base's value
        i = argv.index(opt)
        argv[i + 1] = value
    else:
        argv += [opt, value]
    if opt == "--data-dir":
        argv += ["--data", "cifar10"]
    if opt == "--plan":
        argv += ["--sparse"]
    return [command, *argv, "--threads", "1"] if opt != "--threads" and command != "info" else [command, *argv]


_seen = {"cases": 0, "commands": set()}


@pytest.mark.parametrize("command,opt,value", CASES, ids=[f"{c}{o}={v!r}" for c, o, v in CASES])
def test_bad_option_value_is_a_cli_error(files, capsys, command, opt, value):
    argv = _argv(files, command, opt, value)
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert e.value.code == 2, f"{argv}: status {e.value.code}\n{err}"
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith(f"slimops {command}: error: "), lines
    name = opt.lstrip("-").replace("-", "_")
    words = (opt, name, name.replace("_", " "), "weights" if opt == "--weights" else opt, "plan", "folder",
             "device", "data", value.format(d=files) if value else opt)
    assert any(w and w in lines[-1] for w in words), f"the error does not name {opt}: {lines[-1]}"
    assert not (files / "PWNED").exists()
    _seen["cases"] += 1
    _seen["commands"].add(command)


def test_zz_case_count(capsys):
    """Prints how many cases ran (the suite's size for issue 17's closing note)."""
    with capsys.disabled():
        print(f"\nCLI bad-input cases: {len(CASES)} over {len(COMMANDS)} commands "
              f"({', '.join(f'{c}: {sum(1 for k, _, _ in CASES if k == c)}' for c in COMMANDS)}); "
              f"{_seen['cases']} passed in this run")
