"""The demo and the CLI run end to end on the embedded digits data (short run) and write what they say."""
import json
import os

import pytest
import torch

from slimops import cli, demo

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def test_demo_short_run_writes_metrics_and_plot(tmp_path):
    torch.set_num_threads(1)
    metrics = demo.main(["--epochs", "2", "--out", str(tmp_path), "--lam", "0.5"])
    with open(tmp_path / "metrics.json") as f:
        saved = json.load(f)
    assert saved["runs"].keys() == {"baseline", "prox-l1"}
    prox = metrics["runs"]["prox-l1"]
    assert prox["channels_total"] == 160
    # a large lam zeroes channels exactly within two epochs; the baseline has none
    assert prox["channels_zero"] > 0
    assert metrics["runs"]["baseline"]["channels_zero"] == 0
    assert 0.0 <= prox["history"][-1]["test_acc"] <= 1.0
    assert os.path.getsize(tmp_path / "sparsity.png") > 1000


def test_cli_info_lists_every_op(capsys):
    cli.main(["info"])
    out = capsys.readouterr().out
    for op in ("prox", "prox_backward", "prox_sgd_", "prox_adamw_", "palm_slimming_", "penalty_grad_", "split_step_"):
        assert op in out
