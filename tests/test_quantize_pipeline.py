"""``slimops quantize`` (slimops.quant.pipeline): a teacher model file distilled into a quantised or binary student.

- a KD run writes quantized.pt, metrics.json (teacher and student accuracy, bits, bytes before / after), curves.png
  and its checkpoint; quantized.pt reloads (weights_only) to a model with the accuracy the metrics report;
- label-free training never reads a label; the KD loss is Hinton's T²·KL;
- a binary FDA run applies the paper's schedule and ends with α = 0; a pruned teacher (slimming) quantises too;
- --resume of a finished run reproduces its result from the checkpoint (quantiser state included);
- the CLI entry point prints its summary line.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from slimops import cli
from slimops.distill import kd_logit_loss
from slimops.pruning.metrics import accuracy
from slimops.quant import BinaryConv2d
from slimops.quant.pipeline import QuantizeConfig, _criterion, load_quantized_file, quantize

pytest.importorskip("sklearn")
pytestmark = pytest.mark.usefixtures("one_thread")


def _run(files, tmp_path, **kw):
    cfg = dict(teacher=str(files / "dense.pt"), out=str(tmp_path / "q"), epochs=1, batch=128, progress=False,
               plots=False)
    cfg.update(kw)
    return quantize(QuantizeConfig(**cfg))


def test_kd_run_writes_a_reloadable_quantised_model(cli_files, tmp_path):
    m = _run(cli_files, tmp_path, wbits=4, abits=4, method="kd", plots=True)
    out = tmp_path / "q"
    for f in ("quantized.pt", "metrics.json", "log.txt", "checkpoint-quantize.pt", "curves.png"):
        assert (out / f).exists(), f
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["status"] == "done" and saved["quant"]["wbits"] == 4 and len(saved["history"]) == 1
    assert 0 < m["bytes_quantized"] < m["bytes_float"] / 3 and m["compression"] > 3
    model, obj = load_quantized_file(str(out / "quantized.pt"))
    from slimops.data import load

    assert accuracy(model, load("digits")) == pytest.approx(m["acc"], abs=1e-9)
    assert obj["quant"]["method"] == "kd"


def test_label_free_never_reads_a_label_and_kd_is_t2_kl(cli_files):
    from slimops.pruning.pipeline import load_model_file

    teacher, _ = load_model_file(str(cli_files / "dense.pt"))
    teacher.eval()
    cfg = QuantizeConfig(teacher="t", method="kd", label_free=True, temperature=3.0)
    loss = _criterion(cfg, teacher)
    x = torch.randn(5, 1, 32, 32)
    out = torch.randn(5, 10)
    a, b = loss(out, x, torch.zeros(5, dtype=torch.long)), loss(out, x, torch.full((5,), 7))
    assert torch.equal(a, b)
    t = teacher(x).detach()
    p, q = torch.softmax(t / 3, 1), torch.log_softmax(out / 3, 1)
    want = 9 * (p * (p.log() - q)).sum()
    torch.testing.assert_close(kd_logit_loss(out, t, 3.0), want)
    with pytest.raises(ValueError, match="temperature"):
        kd_logit_loss(out, t, 0.0)


def test_binary_fda_run_follows_the_schedule(cli_files, tmp_path):
    m = _run(cli_files, tmp_path, wbits=1, abits=1, method="fda", epochs=2)
    model, _ = load_quantized_file(str(tmp_path / "q" / "quantized.pt"))
    binaries = [mod for mod in model.modules() if isinstance(mod, BinaryConv2d)]
    assert binaries and m["quant"]["method"] == "fda"
    assert m["bytes_quantized"] < m["bytes_float"] / 8
    assert all(math.isfinite(h["loss"]) for h in m["history"])


def test_a_pruned_teacher_quantises(cli_files, tmp_path):
    m = _run(cli_files, tmp_path, teacher=str(cli_files / "pruned.pt"), wbits=2, abits=2, method="qat")
    model, _ = load_quantized_file(str(tmp_path / "q" / "quantized.pt"))
    assert m["model"]["width"] == 0.25 and model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_resume_of_a_finished_run_reproduces_it(cli_files, tmp_path):
    first = _run(cli_files, tmp_path, wbits=4, abits=4, method="kd", label_free=True)
    blob1 = torch.load(tmp_path / "q" / "quantized.pt", weights_only=True)
    again = _run(cli_files, tmp_path, wbits=4, abits=4, method="kd", label_free=True, resume=True)
    blob2 = torch.load(tmp_path / "q" / "quantized.pt", weights_only=True)
    assert again["acc"] == first["acc"]
    for name, e in blob1["export"]["layers"].items():
        assert torch.equal(e["packed"], blob2["export"]["layers"][name]["packed"]), name
    with pytest.raises(ValueError, match="different run"):
        _run(cli_files, tmp_path, wbits=3, abits=4, method="kd", label_free=True, resume=True)


def test_cli_prints_the_summary(cli_files, tmp_path, capsys):
    cli.main(["quantize", "--teacher", str(cli_files / "dense.pt"), "--wbits", "8", "--abits", "8", "--epochs", "1",
              "--method", "qat", "--no-progress", "--no-plots", "--threads", "1", "--out", str(tmp_path / "c")])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("quantize: acc ") and "8/8 bits" in line and os.path.exists(tmp_path / "c" / "quantized.pt")


def test_ddp_two_processes_binary_and_lsq(cli_files, tmp_path):
    """Under torchrun (2 gloo processes): every rank starts from the same LSQ scales (initialised on the probe
    batch before DDP wraps the student), and the FDA noise adaptation keeps a gradient at α = 0 (its last epoch):
    a parameter without one would stop DDP's next reduction."""
    import sys

    import torch.distributed as dist

    from _proc import run_with_deadline

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for extra in (["--wbits", "1", "--abits", "1", "--method", "fda", "--epochs", "2"],
                  ["--wbits", "4", "--abits", "4", "--method", "kd", "--epochs", "1"]):
        out = str(tmp_path / extra[5])
        r = run_with_deadline([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "slimops", "quantize", "--teacher", str(cli_files / "dense.pt"), *extra,
                               "--batch", "128", "--threads", "1", "--no-progress", "--no-plots", "--out", out],
                              timeout=300, env=env)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        model, _ = load_quantized_file(os.path.join(out, "quantized.pt"))
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_fa_norm_is_checked_by_the_config():
    assert QuantizeConfig(teacher="t", method="faqd", fa_norm="l2sq").fa_norm == "l2sq"
    with pytest.raises(ValueError, match="fa_norm must be 'l1' or 'l2sq'"):
        QuantizeConfig(teacher="t", method="faqd", fa_norm="l2")
