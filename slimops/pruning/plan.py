"""A slimming plan: which channels of every prunable BatchNorm survive, as plain data.

Network slimming (Liu et al. 2017, docs/algorithms.md §2) ranks channels by their BN scale |gamma| and
removes those below a global percentile; proximal network slimming (Bui et al. 2023, §4) removes
exactly the channels whose auxiliary variable xi is zero. Either way the result is a :class:`Plan`:
the kept channel indices per BN layer plus the model configuration it was made for. It is JSON, not a
pickled module, so it can be stored, read, diffed and replayed on a freshly built model
(:func:`slimops.pruning.compact`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

PLAN_FORMAT = "slimops-plan"
PLAN_VERSION = 1
MAX_PLAN_BYTES = 64 * 2**20  # a million-channel plan is ~10 MiB of JSON; anything bigger is not a plan


@dataclass
class Plan:
    """Kept channels per BN layer of one architecture.

    Attributes:
        arch: the model configuration (``model.config()``: arch, width, num_classes, in_channels).
        layers: BN module name -> sorted kept channel indices.
        channels: BN module name -> channel count of the unpruned layer.
        constant: BN module names whose compacted layer gains one constant channel carrying the
            removed channels' ``relu(beta)`` (see :func:`slimops.pruning.compact`); part of the
            architecture, so it lives in the plan.
        meta: how the plan was made (criterion, percent, threshold, ...); informational only.
    """

    arch: dict
    layers: dict
    channels: dict
    constant: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if set(self.layers) != set(self.channels):
            raise ValueError("slimops.pruning.Plan: layers and channels name different BN layers")
        self.constant = sorted(set(self.constant))
        bad = [n for n in self.constant if n not in self.layers or len(self.layers[n]) >= self.channels[n]]
        if bad:
            raise ValueError(f"slimops.pruning.Plan: constant channels requested for layers that remove nothing or "
                             f"do not exist: {bad[:5]}")
        for name, n in self.channels.items():
            if not _is_int(n) or n < 1:
                raise ValueError(f"slimops.pruning.Plan: layer '{name}' has channel count {n!r} (a positive integer expected)")
        for name, kept in self.layers.items():
            n = self.channels[name]
            if not all(_is_int(i) for i in kept):
                raise ValueError(f"slimops.pruning.Plan: layer '{name}' has non-integer channel indices")
            kept = [int(i) for i in kept]
            if not kept:
                raise ValueError(f"slimops.pruning.Plan: layer '{name}' keeps no channel (at least one must stay)")
            if len(set(kept)) != len(kept):
                raise ValueError(f"slimops.pruning.Plan: layer '{name}' has duplicate channel indices")
            if min(kept) < 0 or max(kept) >= n:
                raise ValueError(f"slimops.pruning.Plan: layer '{name}' has channel indices outside [0, {n})")
            self.layers[name] = sorted(kept)

    # -- summary ---------------------------------------------------------------------------------
    @property
    def channels_total(self) -> int:
        return sum(self.channels.values())

    @property
    def channels_kept(self) -> int:
        return sum(len(v) for v in self.layers.values())

    @property
    def kept_fraction(self) -> float:
        return self.channels_kept / max(self.channels_total, 1)

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "arch": dict(self.arch),
                "layers": {k: list(v) for k, v in self.layers.items()},
                "channels": dict(self.channels), "constant": list(self.constant), "meta": dict(self.meta)}

    def to_json(self, indent: Optional[int] = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise ValueError("slimops.pruning.Plan.from_json: not a slimops plan (missing format 'slimops-plan')")
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"slimops.pruning.Plan.from_json: unsupported plan version {d.get('version')!r}")
        try:
            return cls(arch=dict(d["arch"]), layers={k: list(v) for k, v in d["layers"].items()},
                       channels=dict(d["channels"]),
                       constant=list(d.get("constant", [])), meta=dict(d.get("meta", {})))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"slimops.pruning.Plan.from_json: malformed plan ({e!r})") from e

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"slimops.pruning.Plan.from_json: not JSON ({e})") from e
        return cls.from_dict(d)

    def save(self, path: str) -> None:
        from slimops.pruning.checkpoint import atomic_write_text

        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str) -> "Plan":
        """Reads a plan file; errors name the path. Files above ``MAX_PLAN_BYTES`` are refused unread."""
        import os

        size = os.path.getsize(path)  # FileNotFoundError names the path
        if size > MAX_PLAN_BYTES:
            raise ValueError(f"slimops.pruning.Plan.load: '{path}' is {size:,} bytes; a plan is at most "
                             f"{MAX_PLAN_BYTES:,} (its kept-index lists are bounded by the model's channels)")
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_json(f.read())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{e} (in '{path}')".replace("slimops.pruning.Plan.from_json", "slimops.pruning.Plan.load")) from None

    # -- compatibility ---------------------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        """Raises ValueError unless this plan was made for ``model``'s architecture (same config,
        same prunable BN layers with the same channel counts)."""
        cfg = model_config(model)
        if cfg != self.arch:
            raise ValueError(f"slimops.pruning.Plan: plan made for {self.arch}, model is {cfg}")
        have = {g.bn: model.get_submodule(g.bn).num_features for g in model.slim_groups()}
        if have != self.channels:
            missing = sorted(set(self.channels) - set(have))
            extra = sorted(set(have) - set(self.channels))
            wrong = sorted(k for k in set(have) & set(self.channels) if have[k] != self.channels[k])
            raise ValueError("slimops.pruning.Plan: plan does not fit the model's BN layers "
                             f"(missing in model: {missing[:5]}, not in plan: {extra[:5]}, channel counts differ: {wrong[:5]})")


def _is_int(v) -> bool:
    """A true integer: JSON 3 or 3.0-free; bools and floats are refused rather than truncated."""
    return isinstance(v, int) and not isinstance(v, bool)


def model_config(model: nn.Module) -> dict:
    """The build configuration of a slimops model (``model.config()``); models of other origins have none."""
    if not hasattr(model, "config") or not hasattr(model, "slim_groups"):
        raise TypeError(f"slimops.pruning: {type(model).__name__} is not a slimops model "
                        "(build it with slimops.models.build: it needs config() and slim_groups())")
    return dict(model.config())


def bn_scores(model: nn.Module, xi: Optional[Sequence[Tensor]] = None) -> dict:
    """BN name -> channel score: |gamma|, or |xi| (proximal network slimming) given per group in
    ``model.slim_groups()`` order."""
    model_config(model)  # a TypeError naming the problem for models that are not slimops models
    groups = model.slim_groups()
    if xi is not None and len(xi) != len(groups):
        raise ValueError(f"slimops.pruning.plan_from_bn: xi has {len(xi)} tensors, the model has {len(groups)} BN layers")
    out = {}
    for i, g in enumerate(groups):
        bn = model.get_submodule(g.bn)
        s = bn.weight if xi is None else xi[i]
        if s.shape != (bn.num_features,):
            raise ValueError(f"slimops.pruning.plan_from_bn: score of '{g.bn}' has shape {tuple(s.shape)}, expected ({bn.num_features},)")
        out[g.bn] = s.detach().abs().float().cpu()
    return out


def check_percent(percent: Optional[float], where: str) -> None:
    """``percent`` is None (remove the exact zeros) or a fraction in [0, 1); ValueError naming ``where`` otherwise."""
    if percent is not None and not 0.0 <= float(percent) < 1.0:
        raise ValueError(f"{where}: percent must be None or in [0, 1), got {percent}")


@torch.no_grad()
def plan_from_bn(model: nn.Module, percent: Optional[float] = None, *, xi: Optional[Sequence[Tensor]] = None,
                 min_keep: int = 1, fold: bool = True) -> Plan:
    """Plans the channels to keep from the BN scales of ``model`` (or from ``xi``).

    ``percent=None`` removes exactly the channels whose score is zero (gamma after proximal SGD, xi
    after proximal network slimming): no threshold to pick. A number ``q`` in [0, 1) removes the
    globally smallest fraction ``q`` of all scores (Liu et al.: the threshold is the sorted score at
    index ``int(total * q)``; channels strictly above it stay), pooled over every layer.
    Each layer keeps at least ``min_keep`` channels (its largest scores) so the network stays connected.
    With ``fold`` a layer whose removed channels have some ``relu(beta) > 0`` gets a constant channel
    in the compacted model that carries them (exact removal; see :func:`slimops.pruning.compact`).
    """
    check_percent(percent, "slimops.pruning.plan_from_bn")
    if min_keep < 1:
        raise ValueError(f"slimops.pruning.plan_from_bn: min_keep must be >= 1, got {min_keep}")
    scores = bn_scores(model, xi)
    if percent is None:
        threshold = 0.0
        keep = {k: s > 0 for k, s in scores.items()}
    else:
        allv = torch.cat(list(scores.values())).sort().values
        threshold = float(allv[min(int(len(allv) * percent), len(allv) - 1)]) if percent > 0 else -1.0
        keep = {k: s > threshold for k, s in scores.items()}
    layers, forced = {}, 0
    for k, s in scores.items():
        m = keep[k].clone()
        need = min(min_keep, len(s)) - int(m.sum())
        if need > 0:  # a layer emptied by the threshold keeps its strongest channels
            order = torch.argsort(s, descending=True, stable=True)
            m[order[:min(min_keep, len(s))]] = True
            forced += need
        layers[k] = torch.nonzero(m).flatten().tolist()
    constant = []
    if fold:
        for g in model.slim_groups():
            removed = torch.ones(len(scores[g.bn]), dtype=torch.bool)
            removed[layers[g.bn]] = False
            if bool((model.get_submodule(g.bn).bias.detach().cpu()[removed] > 0).any()):
                constant.append(g.bn)
    meta = {"criterion": "xi" if xi is not None else "gamma", "percent": percent,
            "threshold": threshold, "forced_keep": forced, "fold": fold}
    return Plan(arch=model_config(model), layers=layers, channels={k: len(s) for k, s in scores.items()},
                constant=constant, meta=meta)
