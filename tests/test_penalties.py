"""The one penalty table (slimops.penalties, issue 18 item 3): every layer validates through it, and the C++
parser (csrc/include/slimops/checks.h) accepts and rejects exactly the same names and parameter values, with
the same words."""
from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from torch import nn

import slimops  # noqa: F401  (registers torch.ops.slimops)
from slimops import penalties as P
from slimops.opdefs import _checks
from slimops.optim import ProxAdamW, ProxSGD

NAMES = list(P.PENALTIES) + ["L1", "l2", "", "l1 ", "none_", "l0l21", "lp "]
A_VALUES = [-1.0, 0.0, 0.5, 1.0, 2.0, math.inf, math.nan]
LAM_VALUES = [-0.1, 0.0, 0.3, math.inf, math.nan]


def _cpp_call(op: str, penalty: str, lam: float, a: float):
    """One call of the C++ kernel of ``op`` straight through torch.ops (no Python checks on the way)."""
    x = torch.randn(3, 2)
    ops = torch.ops.slimops
    if op == "prox":
        return ops.prox(x, penalty, lam, a)
    if op == "prox_backward":
        return ops.prox_backward(torch.randn(3, 2), x, penalty, lam, a)
    if op == "prox_sgd_":
        return ops.prox_sgd_([x], [torch.randn(3, 2)], [], 0.1, 0.0, 0.0, 0.0, False, False, False, penalty, lam, a,
                             None, None)
    if op == "penalty_grad_":
        return ops.penalty_grad_([torch.randn(3, 2)], [x], penalty, lam, a, 1e-8)
    raise AssertionError(op)


def _outcome(fn):
    """"ok", or the error's first line with numbers written alike (C++ streams -1.0 as "-1", Python as "-1.0")."""
    try:
        fn()
    except (ValueError, TypeError, RuntimeError) as e:
        return f"{type(e).__name__}: " + re.sub(r"(\d)\.0\b", r"\1", str(e).splitlines()[0])
    return "ok"


@pytest.mark.parametrize("op", ["prox", "prox_backward", "prox_sgd_", "penalty_grad_"])
def test_cpp_parser_accepts_and_rejects_what_the_table_does(op):
    allowed = P.names_for(op)
    lam_name = "s" if op == "penalty_grad_" else "lam"
    disagreements = []
    cases = list(itertools.product(NAMES, [0.3], [1.0])) + list(itertools.product(list(P.PENALTIES), LAM_VALUES, A_VALUES))
    for name, lam, a in cases:
        cpp = _outcome(lambda: _cpp_call(op, name, lam, a))
        py = _outcome(lambda: P.check(f"slimops.{op}", name, lam, a, allowed, lam_name))
        if cpp != py:
            disagreements.append(f"{name!r} lam={lam} a={a}: C++ {cpp!r} / table {py!r}")
    assert not disagreements, "\n".join(disagreements)


def test_table_kinds():
    assert P.PROX == ("l1", "l0", "tl1", "l1_2", "l21", "l0_l21")
    assert P.STEP == ("none",) + P.PROX
    assert P.GRAD == ("l1", "tl1", "lp", "l21")
    assert P.GROUP == ("l21", "l0_l21") and all(P.PENALTIES[n].prox for n in P.GROUP)
    assert set(P.OP_PENALTIES) == {"prox", "prox_backward", "prox_sgd_", "prox_adamw_", "palm_slimming_",
                                   "penalty_grad_", "split_step_"}


@pytest.mark.parametrize("opt_cls", [ProxSGD, ProxAdamW])
def test_optimizers_ops_and_methods_share_the_rules(opt_cls):
    """Settings the ops refuse, the optimizers refuse in the same words (they used to let an infinite lam and a
    negative l0_l21 weight through)."""
    w = nn.Parameter(torch.randn(3))
    for penalty, lam, a in [("l1", math.inf, 1.0), ("l0_l21", 0.1, -1.0), ("tl1", 0.1, math.nan), ("l3", 0.1, 1.0)]:
        with pytest.raises(ValueError) as e_op:
            _checks.check_penalty("prox_sgd_", penalty, P.STEP, lam, a)
        with pytest.raises(ValueError) as e_opt:
            opt_cls([w], lr=0.1, penalty=penalty, lam=lam, a=a)
        assert str(e_op.value).split(": ", 1)[1] == str(e_opt.value).split(": ", 1)[1]


def test_slimming_method_offers_the_elementwise_prox_penalties():
    from slimops.pruning.methods import PROX_SGD_PENALTIES, MethodConfig

    assert PROX_SGD_PENALTIES == P.ELEMENTWISE_PROX == ("l1", "l0", "tl1", "l1_2")
    for name in P.ELEMENTWISE_PROX:
        MethodConfig("prox-sgd", penalty=name, a=1.0)
    with pytest.raises(ValueError, match="prox-sgd"):
        MethodConfig("prox-sgd", penalty="l21")


def test_non_numbers_are_type_errors_naming_the_argument():
    with pytest.raises(TypeError, match=r"slimops\.prox: lam must be a real number, got '0.1'"):
        P.check("slimops.prox", "l1", "0.1", 1.0, P.PROX)
    with pytest.raises(TypeError, match=r"slimops\.prox: a must be a real number, got True"):
        P.check("slimops.prox", "tl1", 0.1, True, P.PROX)
