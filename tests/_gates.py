"""Helpers shared by the dimension-pruning tests of the ViTs (test_vit_pruning.py) and SEMA-T (test_sema_pruning.py)."""
from __future__ import annotations

import json

import torch

from slimops.pruning.vit import ViTPlan, build_pruned_vit, compact_vit


def random_gates(model, zero_fraction, seed=1):
    """Sets every gate of ``model`` to U[0.1, 1.1), then ``zero_fraction`` of them to exactly 0 (what SiDT leaves)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in model.gates().values():
            w.copy_(torch.rand(w.shape, generator=g) + 0.1)
            w[torch.rand(w.shape, generator=g) < zero_fraction] = 0
    return model


def check_plan_round_trip(model, plan, x, tmp_path):
    """The plan survives JSON (save / load), and ``build_pruned_vit`` of the loaded plan takes the compacted
    model's state dict (strict) and computes what it computes."""
    path = str(tmp_path / "plan.json")
    plan.save(path)
    back = ViTPlan.load(path)
    assert back.to_dict() == json.loads(json.dumps(plan.to_dict()))
    small = compact_vit(model, plan)
    fresh = build_pruned_vit(back)
    fresh.load_state_dict(small.state_dict(), strict=True)
    torch.testing.assert_close(fresh.eval()(x), small(x))
    return small
