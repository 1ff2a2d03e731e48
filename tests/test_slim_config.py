"""SlimConfig (issue 18, item 4): one validated object for a slimming run, what the CLI builds and ``slim``
takes, recorded in metrics.json and read back by ``--resume``."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

from slimops.pruning import SlimConfig
from slimops.pruning.cli import main_slim
from slimops.pruning.pipeline import slim

pytest.importorskip("sklearn")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("field,value", [
    ("model", "vgg12"), ("data", "mnist"), ("method", "slimming"), ("width", 0.0), ("width", float("inf")),
    ("lr", -1.0), ("lr", float("nan")), ("lam", -1.0), ("lam", float("inf")), ("beta", -2.0), ("a", float("nan")),
    ("percent", 1.0), ("percent", -0.5), ("percent", "half"), ("epochs", -1), ("epochs", 2**40), ("epochs", 1.5),
    ("batch", 0), ("bn_recal", True), ("seed", -1), ("resume", "yes"), ("on_nonfinite", "ignore"), ("out", ""),
    ("data_dir", 3),
])
def test_every_field_is_checked_and_named(field, value):
    with pytest.raises(ValueError, match=f"{field}"):
        SlimConfig(**{field: value})


def test_method_rules_are_checked_at_construction():
    with pytest.raises(ValueError, match="method 'ns' uses penalty 'l1'; penalty 'l0' does not apply"):
        SlimConfig(method="ns", penalty="l0")
    with pytest.raises(ValueError, match="prox-sgd' takes penalty"):
        SlimConfig(method="prox-sgd", penalty="l21")
    with pytest.raises(ValueError, match="exponent p"):
        SlimConfig(method="ns-lp", a=2.0)
    SlimConfig(method="prox-sgd", penalty="tl1", a=0.5)  # fine


@pytest.mark.parametrize("method,percent,resolved", [
    ("proximal-ns", "auto", None), ("ns", "auto", 0.5), ("ns-tl1", -1, 0.5), ("none", None, None), ("ns", 0.3, 0.3),
])
def test_percent_auto_says_what_it_means(method, percent, resolved):
    cfg = SlimConfig(method=method, percent=percent)
    assert cfg.resolved_percent() == resolved
    assert cfg.percent == ("auto" if percent == -1 else percent)


def test_roundtrip_and_unknown_fields(tmp_path):
    cfg = SlimConfig(model="preresnet20", width=0.5, method="prox-sgd", penalty="l0", lam=0.01, percent=0.25)
    cfg.save(str(tmp_path / "c.json"))
    assert SlimConfig.load(str(tmp_path / "c.json")) == cfg
    d = cfg.to_dict()
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\]"):
        SlimConfig.from_dict({**d, "colour": "red"})
    with pytest.raises(ValueError, match="not a slim configuration"):
        SlimConfig.from_dict({k: v for k, v in d.items() if k != "format"})
    (tmp_path / "bad.json").write_text(json.dumps({**d, "epochs": -3}))
    with pytest.raises(ValueError, match=r"epochs .* \(in '.*bad.json'\)"):
        SlimConfig.load(str(tmp_path / "bad.json"))


def test_slim_takes_a_config_or_its_fields(tmp_path):
    with pytest.raises(TypeError, match="not both"):
        slim(SlimConfig(), epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        slim(model="vgg11", epochs=-1, out=str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")


def test_resume_reads_the_saved_configuration(tmp_path):
    out = str(tmp_path / "run")
    fields = dict(model="vgg11", width=0.25, method="proximal-ns", lam=1.25, epochs=1, bn_recal=0, progress=False,
                  plots=False, out=out)
    first = slim(SlimConfig(**fields))
    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f)
    assert saved["status"] == "done" and SlimConfig.from_dict(saved["config"]) == SlimConfig(**fields)
    # `slimops slim --out DIR --resume` with nothing else continues the same run (width 0.25, lam 1.25, 1 epoch)
    again = main_slim(["--out", out, "--resume", "--threads", "1"])
    assert again["acc"] == first["acc"] and again["channels_kept"] == first["channels_kept"]
    assert again["config"] == {**SlimConfig(**fields).to_dict(), "resume": True}
    # what the command line says goes on top, and the checkpoint refuses what makes it another run
    with pytest.raises(ValueError, match="different run"):
        main_slim(["--out", out, "--resume", "--lr", "0.05", "--threads", "1"])


def test_cli_builds_the_config_the_api_builds(tmp_path, monkeypatch):
    import slimops.pruning.pipeline as pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "_run_slim", lambda cfg: seen.setdefault("cfg", cfg))
    main_slim(["--model", "vgg13", "--width", "0.5", "--method", "ns", "--percent", "0.4", "--epochs", "3",
               "--out", str(tmp_path)])
    expect = SlimConfig(model="vgg13", width=0.5, method="ns", percent=0.4, epochs=3, out=str(tmp_path))
    assert dataclasses.asdict(seen["cfg"]) == dataclasses.asdict(expect)
