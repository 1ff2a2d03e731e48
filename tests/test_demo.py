"""The demo and the CLI run end to end on the embedded digits data (short runs) and write what they say."""
import json
import os

import pytest
import torch

from slimops import cli, demo

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def test_demo_short_run_prints_table_and_writes_files(tmp_path, capsys):
    torch.set_num_threads(1)
    runs = demo.main(["--epochs", "1", "--width", "0.25", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for row in ("test accuracy", "BN channels kept", "params", "FLOPs", "CPU latency"):
        assert row in out
    with open(tmp_path / "summary.json") as f:
        saved = json.load(f)
    assert saved["runs"].keys() == {"baseline", "proximal-ns"}
    base, pns = runs["baseline"], runs["proximal-ns"]
    # the baseline removes nothing; proximal NS never keeps more than it had
    assert base["channels_kept"] == base["channels_total"]
    assert pns["channels_kept"] <= pns["channels_total"]
    assert pns["params_pruned"] <= base["params_pruned"]
    for name in ("baseline", "proximal-ns"):
        for f in ("metrics.json", "plan.json", "pruned.pt", "dense.pt", "scores.png", "channels.png"):
            assert os.path.getsize(tmp_path / name / f) > 100


def test_cli_info_lists_every_op(capsys):
    cli.main(["info"])
    out = capsys.readouterr().out
    for op in ("prox", "prox_backward", "prox_sgd_", "prox_adamw_", "palm_slimming_", "penalty_grad_", "split_step_"):
        assert op in out


def test_cli_help_and_unknown_command(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("slim", "prune", "finetune", "eval", "demo", "info"):
        assert cmd in out
    with pytest.raises(SystemExit) as e:
        cli.main(["nope"])
    assert e.value.code == 2 and "slimops: error: unknown command 'nope'" in capsys.readouterr().err
