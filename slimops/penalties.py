"""The one table of sparsity penalties: their names, which ops take which, and the rules for their parameters.

Every layer validates ``penalty`` / ``lam`` / ``a`` through :func:`check` — the public ops
(``slimops.ops``), the optimizers (``slimops.optim``), the Triton launchers and the slimming methods
(``slimops.pruning.methods``) — so a setting is refused in the same words wherever it enters. The C++ parser
(``csrc/include/slimops/checks.h``: ``parse_penalty``, ``check_penalty_args``) implements the same table;
``tests/test_penalties.py`` checks that it accepts and rejects exactly the names and values this one does.

Convention (docs/algorithms.md §1): ``prox_{λR}(y) = argmin_x ½(x − y)² + λ·R(x)``.

=========  =====================================================  ===========================  ============
name       R(x)                                                   ``a``                        kind
=========  =====================================================  ===========================  ============
none       0 (the plain optimizer step)                           unused                       step only
l1         ‖x‖₁: soft threshold at λ                              unused                       prox, grad
l0         ‖x‖₀: hard threshold at √(2λ)                          unused                       prox
tl1        Σ (a+1)|x|/(a+|x|) (Zhang & Xin)                       shape, finite, > 0           prox, grad
l1_2       Σ |x|^½: half thresholding (Xu et al.)                 unused                       prox
lp         Σ |x|^p, 0 < p < 1 (subgradient only)                  exponent p, in (0, 1)        grad
l21        Σ_g ‖x_g‖₂, groups = slices along dim 0                unused                       prox, grad
l0_l21     hard threshold, then block soft threshold at λ·a       group weight μ, finite, ≥ 0  prox
=========  =====================================================  ===========================  ============

``lam`` (``s`` for ``penalty_grad_``) is a finite number ≥ 0 for every penalty.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

__all__ = ["Penalty", "PENALTIES", "PROX", "STEP", "GRAD", "GROUP", "ELEMENTWISE_PROX", "OP_PENALTIES", "check",
           "names_for"]


@dataclass(frozen=True)
class Penalty:
    """One penalty: whether it has a proximal operator and a subgradient, whether it acts on groups (slices
    along dim 0), and what its ``a`` is (``a_name``; empty: unused), with the rule ``a`` must meet."""

    name: str
    prox: bool
    grad: bool
    group: bool = False
    a_name: str = ""                              # "a", "a (the exponent p)", ...; "" when a is unused
    a_rule: str = ""                              # "> 0", ">= 0", "in (0, 1)"
    a_ok: Callable[[float], bool] = lambda a: True

    def check_a(self, a: float) -> Optional[str]:
        """None when ``a`` suits this penalty, else the reason (the C++ check_penalty_args' words)."""
        if not self.a_name or self.a_ok(a):
            return None
        return f"{self.a_name} must be {self.a_rule} for penalty '{self.name}', got {a}"


# Table order is the C++ Penalty enum's (csrc/include/slimops/prox_math.h) restricted to each op kind, so the
# lists in error messages read the same from every backend.
PENALTIES = {p.name: p for p in (
    Penalty("none", prox=False, grad=False),
    Penalty("l1", prox=True, grad=True),
    Penalty("l0", prox=True, grad=False),
    Penalty("tl1", prox=True, grad=True, a_name="a", a_rule="> 0", a_ok=lambda a: math.isfinite(a) and a > 0),
    Penalty("l1_2", prox=True, grad=False),
    Penalty("lp", prox=False, grad=True, a_name="a (the exponent p)", a_rule="in (0, 1)", a_ok=lambda a: 0 < a < 1),
    Penalty("l21", prox=True, grad=True, group=True),
    Penalty("l0_l21", prox=True, grad=False, group=True, a_name="a (the group weight mu)", a_rule=">= 0",
            a_ok=lambda a: math.isfinite(a) and a >= 0),
)}

# The names each kind of op accepts, in the table's order (error messages list them in this order).
PROX = tuple(n for n, p in PENALTIES.items() if p.prox)                 # prox, prox_backward, palm_slimming_, split_step_
STEP = ("none",) + PROX                                                  # prox_sgd_, prox_adamw_, the optimizers
GRAD = tuple(n for n, p in PENALTIES.items() if p.grad)                 # penalty_grad_
GROUP = tuple(n for n, p in PENALTIES.items() if p.group)
ELEMENTWISE_PROX = tuple(n for n in PROX if not PENALTIES[n].group)  # what the prox-sgd slimming method offers

OP_PENALTIES = {
    "prox": PROX, "prox_backward": PROX, "palm_slimming_": PROX, "split_step_": PROX,
    "prox_sgd_": STEP, "prox_adamw_": STEP, "penalty_grad_": GRAD,
}


def names_for(op: str) -> Tuple[str, ...]:
    """The penalty names ``op`` (a slimops op name) accepts."""
    return OP_PENALTIES[op]


def real(owner: str, name: str, v) -> float:
    """``v`` as a Python float: a real number (not a bool) or a one-element real tensor, else a TypeError naming
    ``owner`` and ``name``."""
    import torch

    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.is_complex() or v.dtype == torch.bool:
            raise TypeError(f"{owner}: {name} must be a real number, got a tensor of shape {tuple(v.shape)} "
                            f"and dtype {v.dtype}")
        return float(v)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {v!r}")
    return float(v)


def check(owner: str, penalty, lam, a, allowed=STEP, lam_name: str = "lam") -> str:
    """Validates a penalty setting for ``owner`` (the prefix of the message, e.g. ``"slimops.prox"``):
    ``penalty`` one of ``allowed``, ``lam`` finite and >= 0, ``a`` as the penalty needs. Returns the name.
    Raises ValueError (TypeError for a non-number) naming ``owner`` and the argument."""
    if not isinstance(penalty, str) or penalty not in allowed:
        raise ValueError(f"{owner}: unknown penalty '{penalty}' (expected one of: {', '.join(allowed)})")
    lam, a = real(owner, lam_name, lam), real(owner, "a", a)
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"{owner}: {lam_name} must be finite and >= 0, got {lam}")
    reason = PENALTIES[penalty].check_a(a)
    if reason is not None:
        raise ValueError(f"{owner}: {reason}")
    return penalty
