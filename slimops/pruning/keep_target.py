"""SiDT with a target instead of a strength: ``--keep-dims F`` keeps about a fraction F of the gated dims, whatever
lam that takes (docs/vit.md, "A target instead of lam").

Why. SiDT's plan is its exact zeros, so lam alone decides how much goes, and with AdamW its useful range is a narrow
edge: every Adam step on a gate is about ``lr`` whatever its gradient, and the prox takes ``lr * lam``, so below
lam ~ 1 every gate can be defended and above it none can (measured on digits: ViT-Ti keeps 100% at lam 1, 42–54% at
1.5, 3% at 2; SEMA-T 100% at 1.25, 32% at 1.5). What lam keeps a given fraction depends on the model, the data and
the run. Here lam is adjusted after every optimizer step so that the gates follow a path to the target.

The path. With ``q0`` the (1 - F)-quantile of |g| when training starts (1 for gates initialised to 1), the
threshold ``p_t = q0 * max(0, 1 - t / R)`` falls linearly to 0 over the first ``R`` steps (``ramp``, 90% of the
run by default) and stays at 0 after. The (1 - F)-quantile ``q_t`` of |g| should follow it.

How lam follows. Per step the prox lowers every gate by ``lr_t * lam`` (l1; transformed l1, the default with a
target, by ``lr_t * lam * rho'(|g|)``, more for small gates than large ones) and the optimizer moves it by its own
step (about ``lr_t`` with AdamW, up for the gates the loss defends). So during the ramp lam is set to move the
gates down at the path's pace, ``q0 / (R lr_t)`` (feed-forward: it follows the lr schedule, warmup and cosine
included), times a correction ``exp(c)``: ``c`` integrates the gap to the path, ``c += gain (q_t - p_t) / q0``,
so a quantile above the path raises lam. The quantile is a continuous measure, where the fraction of gates below
a threshold is not (the gates start clustered at 1). The gates the loss defends most drift up against the common
pace, by about the sum of the lr over the ramp: those are the ones that stay. ``lam`` (``--lam``, default 1) is
the value before the first step.

Then the zeros are frozen. As soon as a fraction ``1 - F`` of the gates is exactly 0 (at about the end of the
ramp; past it, lam keeps rising until that holds), those gates are held at 0 for the rest of the run and the
penalty stops (lam = 0): the kept gates train freely, as in a fine-tuning stage. Holding the zeros with lam
instead does not work: zero gates are all alike, so they revive together once lam falls below the edge, and
the fraction oscillates (measured on digits, ViT-Ti: 19–60% zeros over the last 12 epochs). The count is what
it is at the step the target is reached: it overshoots by at most that step's new zeros (about 1% of the gates
per step on digits).

State (the step, lam, the correction, and the frozen zeros) goes into the run's checkpoint: a resumed run continues the same path.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["KeepTarget", "DEFAULT_RAMP", "DEFAULT_GAIN"]

# The path reaches 0 after this fraction of the run's steps. Measured on digits (ViT-Ti, keep 0.5, 30 + 10 FT
# epochs, seeds 0-2): ramp 0.6 ended at 93.33 / 90.22 / 93.78%, ramp 0.9 at 92.67 / 97.11 / 91.78% (the zeros met
# in epoch 28-29, then 10 epochs of fine-tuning): the gentler pressure did better on the mean, within a spread that
# large. docs/vit.md.
DEFAULT_RAMP = 0.9
DEFAULT_GAIN = 0.05  # per step, c += 0.05 * gap: a gap of 0.1 (in units of q0) doubles lam in about 140 steps


class KeepTarget:
    """Adjusts the ``lam`` of the ``optimizer``'s param group that holds ``gates`` (``ProxAdamW`` / ``ProxSGD``)
    after each step so that a fraction ``keep`` of the gates stays nonzero (module docstring). The group is looked
    up at every step, not kept: ``optimizer.load_state_dict`` (a resumed run) replaces the group dicts."""

    def __init__(self, gates: list[Tensor], optimizer, keep: float, steps: int, *, ramp: float = DEFAULT_RAMP,
                 gain: float = DEFAULT_GAIN):
        where = "slimops.pruning.KeepTarget"
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep < 1:
            raise ValueError(f"{where}: keep must be a fraction in (0, 1), got {keep!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{where}: steps must be a positive int, got {steps!r}")
        if not 0 < ramp <= 1 or not gain > 0:
            raise ValueError(f"{where}: ramp must be in (0, 1] and gain > 0, got ramp={ramp}, gain={gain}")
        self.gates, self.optimizer, self.keep, self.gain = list(gates), optimizer, float(keep), float(gain)
        if not self.gates or "lam" not in self._group(where):
            raise ValueError(f"{where}: needs the gates and an optimizer group holding them with the 'lam' the prox "
                             "step reads")
        self.ramp_steps = max(1, int(round(ramp * steps)))
        self.lam = float(self._group()["lam"]) if self._group()["lam"] > 0 else 1.0
        self.t, self.c = 0, 0.0
        self.frozen: list[Tensor] | None = None  # once the target is met: 1 for the kept gates, 0 for the frozen zeros
        self.q0 = float(torch.quantile(self._magnitudes(), 1.0 - self.keep))
        self._group()["lam"] = self.lam

    def _group(self, where: str = "slimops.pruning.KeepTarget") -> dict:
        first = id(self.gates[0]) if self.gates else None
        for group in self.optimizer.param_groups:
            if any(id(p) == first for p in group["params"]):
                return group
        raise ValueError(f"{where}: needs the gates and an optimizer group holding them")

    @torch.no_grad()
    def _magnitudes(self) -> Tensor:
        return torch.cat([g.detach().abs().float().flatten() for g in self.gates])

    def path(self, t: int) -> float:
        """The threshold at step t: ``q0 * max(0, 1 - t / ramp_steps)``."""
        return self.q0 * max(0.0, 1.0 - t / self.ramp_steps)

    @torch.no_grad()
    def step(self) -> float:
        """After an optimizer step: updates lam from where the gates are (or holds the frozen zeros); returns lam."""
        self.t += 1
        if self.frozen is not None:  # the target was met: its zeros stay 0, the rest trains without the penalty
            for g, keep in zip(self.gates, self.frozen):
                g.mul_(keep)
            return self.lam
        mags = self._magnitudes()
        zeros = int((mags == 0).sum()) / mags.numel()  # in double: a float32 mean can miss an exact target
        if zeros >= 1.0 - self.keep - 1e-12:
            self.frozen = [(g != 0).to(g.dtype) for g in self.gates]
            self.lam = 0.0
        elif self.t <= self.ramp_steps:  # follow the path: feed-forward pace, corrected by the integrated gap
            q = float(torch.quantile(mags, 1.0 - self.keep))
            self.c = _clamp(self.c + self.gain * (q - self.path(self.t)) / self.q0, 8.0)
            lr = float(self._group()["lr"])
            pace = self.q0 / (self.ramp_steps * lr) if lr > 0 else self.lam
            self.lam = pace * math.exp(self.c)
        else:  # past the ramp and short of the target: lam keeps rising until it is met
            q = float(torch.quantile(mags, 1.0 - self.keep))
            self.lam = min(self.lam * math.exp(self.gain * ((1.0 - self.keep) - zeros + q / self.q0)), 1e12)
        self._group()["lam"] = self.lam
        return self.lam

    @property
    def met(self) -> bool:
        """Whether the target was met (the zeros are frozen)."""
        return self.frozen is not None

    def state_dict(self) -> dict:
        return {"t": self.t, "lam": self.lam, "q0": self.q0, "c": self.c,
                "frozen": None if self.frozen is None else [m.detach().cpu().clone() for m in self.frozen]}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.t = int(state["t"])
            self.lam, self.q0, self.c = (float(state[k]) for k in ("lam", "q0", "c"))
            frozen = state["frozen"]
            if frozen is not None:
                if len(frozen) != len(self.gates) or any(m.shape != g.shape for m, g in zip(frozen, self.gates)):
                    raise ValueError("the frozen masks do not fit the gates")
                frozen = [m.to(device=g.device, dtype=g.dtype) for m, g in zip(frozen, self.gates)]
            self.frozen = frozen
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"slimops.pruning.KeepTarget: not a KeepTarget state ({e})") from None
        self._group()["lam"] = self.lam


def _clamp(x: float, bound: float) -> float:
    return min(max(x, -bound), bound)
