"""Swapping a float model's convolutions and linears for quantised ones, and exporting the result with packed
integer weights.

``quantize_model(model, wbits, abits)`` replaces every ``nn.Conv2d`` / ``nn.Linear`` (exactly those types):

- ``wbits = abits = 1``: :class:`~slimops.quant.modules.BinaryConv2d` / ``BinaryLinear`` (``method="fda"``: the
  FDA sign gradient with noise adaptation; ``"ste"``: straight-through, no noise adaptation — the baseline);
- otherwise :class:`~slimops.quant.modules.QuantConv2d` / ``QuantLinear`` with LSQ quantisers.

The first and the last layer (in module order) keep ``first_last_bits`` (8 by default, as the FAQD and FDA papers
do; 32 = full precision), since they hold few weights and cost the most accuracy.

``export(model)`` returns a plain dict (``torch.load(weights_only=True)`` reads it): per quantised layer the
integer weight levels packed into bytes (8 / bits levels per byte for 1, 2, 4 and 8 bits; 3 bits go in 4-bit
slots, 9..16 bits in int16), the per-channel scales and zero points; every other tensor of the state dict as it
is, except the training-only noise-adaptation weights of FDA layers. ``load_exported(model, blob)`` writes it back into a model built by the same ``quantize_model`` call: the
outputs are those of the exported model (the weights are the dequantised levels, which the weight quantiser maps
to themselves). ``exported_nbytes(blob)`` is the model's size on disk in that form.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from slimops.quant.modules import (FULL_PRECISION, BinaryConv2d, BinaryLinear, QuantConv2d, QuantLinear,
                                   _BinaryMixin, _QuantMixin)
from slimops.reference.quant import levels, quant_levels

__all__ = ["quantize_model", "export", "load_exported", "exported_nbytes", "pack_levels", "unpack_levels",
           "FORMAT", "METHODS"]

FORMAT = "slimops.quant/1"
METHODS = ("lsq", "fda", "ste")


def _targets(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]


def _set(model: nn.Module, name: str, new: nn.Module):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def quantize_model(model: nn.Module, wbits: int = 4, abits: int = 4, *, method: str = "lsq",
                   first_last_bits: int = 8, inplace: bool = False) -> nn.Module:
    """``model`` with its convs / linears quantised (module docstring). ``method``: "lsq" for multi-bit layers,
    "fda" or "ste" for binary ones (``wbits = abits = 1``)."""
    if method not in METHODS:
        raise ValueError(f"slimops.quant: unknown method {method!r} (expected one of: {', '.join(METHODS)})")
    for name, b in (("wbits", wbits), ("abits", abits), ("first_last_bits", first_last_bits)):
        if isinstance(b, bool) or not isinstance(b, int) or not (1 <= b <= 16 or b == FULL_PRECISION):
            raise ValueError(f"slimops.quant: {name} must be an int in [1, 16] or {FULL_PRECISION}, got {b!r}")
    binary = wbits == 1 and abits == 1
    if binary and method == "lsq":
        method = "fda"
    if not binary and method != "lsq":
        raise ValueError(f"slimops.quant: method {method!r} is for binary nets (wbits = abits = 1), got "
                         f"wbits={wbits}, abits={abits}")
    if not inplace:
        model = copy.deepcopy(model)
    targets = _targets(model)
    if not targets:
        raise ValueError("slimops.quant: the model has no nn.Conv2d or nn.Linear to quantise")
    edge = {targets[0][0], targets[-1][0]}
    for name, m in targets:
        conv = isinstance(m, nn.Conv2d)
        if name in edge:
            new = (QuantConv2d if conv else QuantLinear).from_float(m, first_last_bits, first_last_bits)
        elif binary:
            new = (BinaryConv2d if conv else BinaryLinear).from_float(m, surrogate=method,
                                                                      noise_adaptation=method == "fda")
        else:
            new = (QuantConv2d if conv else QuantLinear).from_float(m, wbits, abits)
        new.train(m.training)
        _set(model, name, new)
    return model


# ---- packing -----------------------------------------------------------------------------------------------------


def _slot(bits: int) -> int:
    for s in (1, 2, 4, 8):
        if bits <= s:
            return s
    return 16


def pack_levels(u: Tensor, bits: int) -> Tensor:
    """Unsigned integer levels ``u`` in [0, 2^bits) (any shape) packed little-end-first into uint8 (8 / slot per
    byte, slot = 1, 2, 4 or 8 bits), or int16 for more than 8 bits."""
    flat = u.reshape(-1).to(torch.int32)
    slot = _slot(bits)
    if slot == 16:
        return (flat - 32768).to(torch.int16)  # int16 holds [0, 2^16) shifted
    per = 8 // slot
    pad = (-flat.numel()) % per
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, per)
    shifts = torch.arange(per, dtype=torch.int32, device=flat.device) * slot
    return (flat << shifts).sum(1).to(torch.uint8)


def unpack_levels(packed: Tensor, bits: int, numel: int) -> Tensor:
    """The inverse of :func:`pack_levels`: ``numel`` levels as int32."""
    slot = _slot(bits)
    if slot == 16:
        return packed.to(torch.int32)[:numel] + 32768
    per = 8 // slot
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * slot
    vals = (packed.to(torch.int32)[:, None] >> shifts) & ((1 << slot) - 1)
    return vals.reshape(-1)[:numel]


# ---- export / load -----------------------------------------------------------------------------------------------


@torch.no_grad()
def _export_quant(m: _QuantMixin) -> Optional[dict]:
    wq = m.weight_quant
    if wq is None:
        return None
    if not bool(wq.initialized):
        wq(m.weight)  # a layer never run: initialise its scale from the weights, as the first forward would
    qn = levels(wq.bits, True)[0]
    s = wq.scale.detach().clamp_min(1e-8).float().cpu()  # the export lives on the CPU, whatever trained it
    w = m.weight.detach().float().cpu()
    q = quant_levels(w, s, None, wq.bits, 0, True).to(torch.int32)  # the levels the weight quantiser computes
    u = (q - qn) if wq.bits > 1 else (q + 1) // 2
    return {"kind": "lsq", "bits": wq.bits, "shape": list(w.shape), "packed": pack_levels(u, wq.bits),
            "scale": s.clone(), "qn": qn}


@torch.no_grad()
def _export_binary(m: _BinaryMixin) -> dict:
    w = m.weight.detach().float().cpu()
    u = (w > 0).to(torch.int32)
    scale = w.abs().reshape(w.shape[0], -1).mean(1, dtype=torch.float64).float()  # as BinaryConv2d computes it
    return {"kind": "binary", "bits": 1, "shape": list(w.shape), "packed": pack_levels(u, 1), "scale": scale}


def export(model: nn.Module) -> Dict:
    """``model`` (from :func:`quantize_model`) as a plain dict with packed integer weights (module docstring)."""
    layers, skip, training_only = {}, set(), []
    for name, m in model.named_modules():
        entry = None
        if isinstance(m, _QuantMixin):
            entry = _export_quant(m)
        elif isinstance(m, _BinaryMixin):
            entry = _export_binary(m)
            # FDA's noise adaptation only acts while training (α·e, α = 0 at the end): not part of the model
            training_only += [f"{name}.{sub}." if name else f"{sub}." for sub in ("weight_noise", "act_noise")]
        if entry is not None:
            layers[name] = entry
            skip.add(f"{name}.weight" if name else "weight")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
             if k not in skip and not k.startswith(tuple(training_only))}
    return {"format": FORMAT, "layers": layers, "state": state, "training_only": training_only}


@torch.no_grad()
def load_exported(model: nn.Module, blob: Dict) -> nn.Module:
    """Writes ``blob`` (from :func:`export`) into ``model`` (built by the same :func:`quantize_model` call)."""
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"slimops.quant: not an exported quantised model (expected format {FORMAT!r})")
    try:
        missing, unexpected = model.load_state_dict(blob["state"], strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"slimops.quant: the model does not match the export: {e}") from None
    expected_missing = {f"{n}.weight" if n else "weight" for n in blob["layers"]}
    expected_missing |= {k for k in missing if k.startswith(tuple(blob.get("training_only", ())))}
    if set(missing) - expected_missing or unexpected:
        raise ValueError(f"slimops.quant: the model does not match the export (missing {sorted(set(missing) - expected_missing)}"
                         f", unexpected {sorted(unexpected)})")
    for name, e in blob["layers"].items():
        m = model.get_submodule(name)
        shape = e["shape"]
        u = unpack_levels(e["packed"], e["bits"], math.prod(shape)).reshape(shape)
        s = e["scale"].reshape(-1, *([1] * (len(shape) - 1)))
        if e["kind"] == "binary":
            w = (u * 2 - 1).float() * s  # the layer's float64 mean|W| of it is exactly s
        else:
            q = u + e["qn"] if e["bits"] > 1 else u * 2 - 1
            w = q.float() * s
        if tuple(m.weight.shape) != tuple(shape):
            raise ValueError(f"slimops.quant: layer {name} has weight shape {tuple(m.weight.shape)}, the export "
                             f"{tuple(shape)}")
        m.weight.copy_(w.to(device=m.weight.device, dtype=m.weight.dtype))
    return model


def exported_nbytes(blob: Dict) -> int:
    """Bytes of every tensor in an export (the packed weights, scales and the rest of the state)."""
    n = sum(t.numel() * t.element_size() for t in blob["state"].values())
    for e in blob["layers"].values():
        n += e["packed"].numel() * e["packed"].element_size() + e["scale"].numel() * e["scale"].element_size()
    return n
