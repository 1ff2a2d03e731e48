"""The configuration of a slimming run as one validated object: what the CLI builds, what ``slim`` takes, what
``metrics.json`` and ``config.json`` record, and what ``--resume`` reads back.

    cfg = SlimConfig(model="vgg11", width=0.5, method="proximal-ns", epochs=15, out="runs/pns")
    slimops.pruning.slim(cfg)                      # or slim(**fields): the same thing
    SlimConfig.load("runs/pns/config.json")        # the run's own record, validated again

Every field is checked once, in ``__post_init__``, with an error that names the field: the run never starts
with an argument it would only refuse after training. ``percent`` is ``"auto"`` (per method: remove the
exact zeros for none / prox-sgd / proximal-ns, the lowest 50% of scores for the subgradient ns-* methods),
``None`` (the exact zeros), or a fraction in [0, 1); the old spelling ``-1`` means ``"auto"``.

The quantise / distil / search commands to come follow the same pattern: one dataclass per command,
validated once, saved with the run.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Optional, Union

CONFIG_FORMAT = "slimops-slim-config"
CONFIG_VERSION = 1
COUNT_MAX = 2**31 - 1  # epochs, batches, threads: anything larger is a typo, and would overflow int32 indexing
EXACT_ZERO_METHODS = ("none", "prox-sgd", "proximal-ns", "sidt")
DEFAULT_NS_PERCENT = 0.5
DEFAULT_VTP_PERCENT = 0.4  # VTP's headline setting: 40% of the gated dims removed
DEFAULT_KEEP_TOKENS = 0.5  # patch-slim: mean kept fraction of the patches over the blocks (docs/vit.md)


def _bad(name: str, what: str, value) -> ValueError:
    return ValueError(f"slimops.pruning.SlimConfig: {name} must be {what}, got {value!r}")


def _number(name, value, *, lo=-math.inf, lo_open=False, optional=False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (value <= lo if lo_open else value < lo):
        what = "a finite number" + (f" > {lo:g}" if lo_open else (f" >= {lo:g}" if lo > -math.inf else ""))
        raise _bad(name, what + (" (or None)" if optional else ""), value)


def _count(name, value, lo=0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= COUNT_MAX:
        raise _bad(name, f"an integer in [{lo}, {COUNT_MAX}]", value)


@dataclass
class SlimConfig:
    """Everything a ``slim`` run depends on (see :func:`slimops.pruning.pipeline.slim` for the meaning)."""

    model: str = "vgg11"
    width: float = 1.0
    patch: Optional[int] = None          # ViTs only: the patch size (None: 16 for inputs from 224 up, else 4)
    data: str = "digits"
    data_dir: Optional[str] = None
    method: str = "proximal-ns"
    penalty: Optional[str] = None
    lam: Optional[float] = None          # None: calibrated to the run's length (methods.default_lam)
    beta: Optional[float] = None         # None: the method's default (proximal-ns: 100)
    a: Optional[float] = None            # None: 1 (the tl1 shape), or the exponent p = 1/2 for ns-lp
    percent: Union[str, float, None] = "auto"
    keep_dims: Optional[float] = None    # sidt: keep about this fraction of the gated dims; lam is then adjusted
    #                                      during training, starting from --lam (default 1) (keep_target.py)
    keep_tokens: Optional[float] = None  # patch-slim: mean fraction of the patches the blocks keep (None: 0.5);
    #                                      vtp / sidt on a ViT: patch slimming after the dimension plan too (None: off)
    epochs: int = 15
    finetune_epochs: int = 0
    teacher: Optional[str] = None        # a model file whose logits the fine-tuning distils from (None: labels only)
    kd_weight: float = 1.0               # with teacher: weight of the T² KL term (the labels' CE keeps weight 1)
    temperature: float = 4.0             # with teacher: the KD temperature T
    batch: int = 64
    lr: float = 0.1
    optimizer: str = "sgd"               # sgd (momentum 0.9) | adamw (the ViTs' choice)
    weight_decay: Optional[float] = None  # None: 1e-4 for sgd, 0.05 for adamw
    schedule: str = "step"               # step (lr / 10 at 50% and 75%) | cosine (per step, after the warmup)
    warmup_epochs: int = 0               # cosine: linear warmup over this many epochs
    seed: int = 0
    out: str = "runs/slim"
    resume: bool = False
    device: str = "cpu"
    augment: bool = True
    fold: bool = True
    bn_recal: int = 100
    progress: bool = True
    plots: bool = True
    on_nonfinite: str = "stop"

    def __post_init__(self):
        from slimops.models import MODELS
        from slimops.pruning.guard import check_on_nonfinite
        from slimops.pruning.methods import METHODS

        if self.model not in MODELS:
            raise _bad("model", f"one of {', '.join(MODELS)}", self.model)
        if self.data not in ("digits", "cifar10", "cifar100"):
            raise _bad("data", "one of digits, cifar10, cifar100", self.data)
        if self.method not in METHODS:
            raise _bad("method", f"one of {', '.join(METHODS)}", self.method)
        if self.percent is not None and not isinstance(self.percent, str) and self.percent == -1:
            self.percent = "auto"  # the old spelling
        if self.percent != "auto" and self.percent is not None:
            if isinstance(self.percent, bool) or not isinstance(self.percent, (int, float)) \
                    or not 0.0 <= self.percent < 1.0:
                raise _bad("percent", "'auto', None or a fraction in [0, 1)", self.percent)
        _number("width", self.width, lo=0.0, lo_open=True)
        if self.patch is not None:
            from slimops.models import RESOLUTION_MODELS

            _count("patch", self.patch, lo=1)
            if self.model not in RESOLUTION_MODELS:
                raise _bad("patch", f"None for {self.model} (only {', '.join(RESOLUTION_MODELS)} take a patch size)",
                           self.patch)
        from slimops.models import GATED_MODELS, VIT_MODELS
        from slimops.pruning.methods import TOKEN_METHODS, VIT_METHODS

        if self.model in VIT_MODELS and self.method not in ("none",) + VIT_METHODS + TOKEN_METHODS:
            raise _bad("method", f"none, vtp, sidt or patch-slim for {self.model}: the other methods prune BatchNorm "
                                 "channels and a ViT has none", self.method)
        if self.model not in GATED_MODELS and self.method in VIT_METHODS:
            raise _bad("method", f"a BatchNorm method for {self.model}: {self.method} prunes the dimension gates of a "
                                 f"transformer ({', '.join(GATED_MODELS)})", self.method)
        if self.model not in VIT_MODELS and self.method in TOKEN_METHODS:
            raise _bad("method", f"a BatchNorm{' or dimension-gate' if self.model in GATED_MODELS else ''} method "
                                 f"for {self.model}: {self.method} prunes the tokens of a ViT ({', '.join(VIT_MODELS)})",
                       self.method)
        if self.keep_tokens is not None:
            if self.method not in TOKEN_METHODS and not (self.method in VIT_METHODS and self.model in VIT_MODELS):
                raise _bad("keep_tokens", f"None for method {self.method} on {self.model} (it sets the kept tokens of "
                                          "patch-slim, or of vtp / sidt on a ViT: dims and tokens)", self.keep_tokens)
            if isinstance(self.keep_tokens, bool) or not isinstance(self.keep_tokens, (int, float)) \
                    or not 0 < self.keep_tokens <= 1:
                raise _bad("keep_tokens", "a fraction in (0, 1] (or None)", self.keep_tokens)
        if self.method in TOKEN_METHODS and self.percent not in ("auto", None):
            raise _bad("percent", f"'auto' for method {self.method} (it keeps tokens: keep_tokens says how many)",
                       self.percent)
        if self.keep_dims is not None:
            if self.method != "sidt":
                raise _bad("keep_dims", f"None for method {self.method} (it is SiDT's target: the fraction of the "
                                        "gated dims to keep; vtp keeps 1 - percent)", self.keep_dims)
            if isinstance(self.keep_dims, bool) or not isinstance(self.keep_dims, (int, float)) \
                    or not 0 < self.keep_dims < 1:
                raise _bad("keep_dims", "a fraction in (0, 1) (or None)", self.keep_dims)
        if self.method in VIT_METHODS and self.lam is None and self.keep_dims is None:
            raise _bad("lam", f"given for method {self.method} (the gates' shrinkage per unit of lr and step: "
                              "lr * lam * steps near 1 removes the gates the loss does not defend; docs/vit.md)",
                       self.lam)
        _number("lr", self.lr, lo=0.0, lo_open=True)
        _number("lam", self.lam, lo=0.0, optional=True)
        _number("beta", self.beta, lo=0.0, optional=True)
        _number("a", self.a, optional=True)
        for name in ("epochs", "finetune_epochs", "bn_recal", "warmup_epochs"):
            _count(name, getattr(self, name))
        if self.teacher is not None:
            if not isinstance(self.teacher, str) or not self.teacher:
                raise _bad("teacher", "the path of a model file (or None)", self.teacher)
            if self.finetune_epochs == 0:
                raise _bad("teacher", "None when finetune_epochs is 0 (the teacher guides the fine-tuning)",
                           self.teacher)
        from slimops.distill.teacher import check_kd_options

        check_kd_options(self.kd_weight, self.temperature, "slimops.pruning.SlimConfig")
        from slimops.pruning.methods import ADAMW_METHODS
        from slimops.pruning.train import OPTIMIZERS, SCHEDULES

        if self.optimizer not in OPTIMIZERS:
            raise _bad("optimizer", f"one of {', '.join(OPTIMIZERS)}", self.optimizer)
        if self.optimizer == "adamw" and self.method not in ADAMW_METHODS:
            raise _bad("optimizer", f"'sgd' for method {self.method} (defined on SGD steps; 'adamw' works with "
                                    f"{', '.join(ADAMW_METHODS)})", self.optimizer)
        if self.schedule not in SCHEDULES:
            raise _bad("schedule", f"one of {', '.join(SCHEDULES)}", self.schedule)
        if self.warmup_epochs and self.schedule != "cosine":
            raise _bad("warmup_epochs", "0 unless schedule is 'cosine'", self.warmup_epochs)
        _number("weight_decay", self.weight_decay, lo=0.0, optional=True)
        _count("batch", self.batch, lo=1)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise _bad("seed", "an integer in [0, 2**63)", self.seed)
        for name in ("resume", "augment", "fold", "progress", "plots"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, "True or False", getattr(self, name))
        for name in ("out", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise _bad(name, "a non-empty string", getattr(self, name))
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise _bad("data_dir", "a path or None", self.data_dir)
        check_on_nonfinite(self.on_nonfinite)
        # The method's own rules (penalty, a, lam) with the values this run resolves to.
        self.method_config(steps=1)

    # -- derived -------------------------------------------------------------------------------------
    def resolved_percent(self) -> Optional[float]:
        """The fraction the plan removes: None for the exact zeros."""
        from slimops.pruning.methods import TOKEN_METHODS

        if self.method in TOKEN_METHODS:
            return None  # no channel or gate is removed
        if self.percent == "auto":
            if self.method == "vtp":
                return DEFAULT_VTP_PERCENT
            return None if self.method in EXACT_ZERO_METHODS else DEFAULT_NS_PERCENT
        return None if self.percent is None else float(self.percent)

    def resolved_keep_tokens(self) -> Optional[float]:
        """patch-slim's mean kept fraction of the patches; vtp / sidt's when given (dims and tokens); else None."""
        from slimops.pruning.methods import TOKEN_METHODS

        if self.method not in TOKEN_METHODS:
            return None if self.keep_tokens is None else float(self.keep_tokens)
        return DEFAULT_KEEP_TOKENS if self.keep_tokens is None else float(self.keep_tokens)

    def train_config(self, epochs: int, seed: int):
        """The :class:`~slimops.pruning.train.TrainConfig` of a stage of ``epochs`` epochs."""
        from slimops.pruning.train import TrainConfig

        return TrainConfig(epochs=epochs, lr=self.lr, batch=self.batch, seed=seed, augment=self.augment,
                           optimizer=self.optimizer, weight_decay=self.weight_decay, schedule=self.schedule,
                           warmup_epochs=self.warmup_epochs)

    def method_config(self, steps: int):
        """The :class:`~slimops.pruning.methods.MethodConfig` of a run of ``steps`` SGD steps (lam calibrated)."""
        from slimops.pruning.pipeline import resolve_method

        return resolve_method(self.method, self.penalty, self.lam, self.beta, self.a, steps, keep_dims=self.keep_dims)

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "SlimConfig":
        from slimops.pruning.checkpoint import check_format

        check_format(d, CONFIG_FORMAT, CONFIG_VERSION, "slimops.pruning.SlimConfig", "a slim configuration")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"format", "version"})
        if unknown:
            raise ValueError(f"slimops.pruning.SlimConfig: unknown fields {unknown}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str) -> None:
        from slimops.pruning.checkpoint import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str) -> "SlimConfig":
        from slimops.pruning.checkpoint import read_json_file

        d = read_json_file(path, 2**20, "slimops.pruning.SlimConfig.load", "a configuration")
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{e} (in '{path}')") from None
