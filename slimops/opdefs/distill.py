"""The ``distill`` family's op definitions (see :mod:`slimops.opdefs`): the argument checks every backend shares (the
C++ ones of csrc/include/slimops/distill_checks.h, with their words), the fake kernels and the autograd of
``feature_affinity_loss``. The maths and the public function: :mod:`slimops.ops.distill`."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from slimops.opdefs import OpDef, wire
from slimops.opdefs._checks import check_float_tensor, fail
from slimops.reference._common import compute_dtype
from slimops.reference.distill import NORMS

__all__ = ["DEFS", "NORMS", "check_feature_affinity", "check_grad", "check_saved", "saved_shapes"]


def check_feature_affinity(op: str, fs, ft, proj, norm) -> Tuple[int, Optional[int]]:
    """Validates the arguments of ``feature_affinity_loss`` (shared with its backward, the fakes and the Triton
    launchers, so that every backend fails the same way); returns (HW, k) with k None for the exact loss."""
    check_float_tensor(op, "fs", fs)
    check_float_tensor(op, "ft", ft)
    for name, t in (("fs", fs), ("ft", ft)):
        if t.dim() != 4:
            fail(op, f"{name} must be 4-D (B, C, H, W), got shape {tuple(t.shape)}")
    if ft.dtype != fs.dtype:
        fail(op, f"ft has dtype {ft.dtype} but fs has dtype {fs.dtype}; the features must share one dtype", TypeError)
    if ft.device != fs.device:
        fail(op, f"ft is on {ft.device} but fs is on {fs.device}")
    if ft.shape[0] != fs.shape[0]:
        fail(op, f"ft has batch size {ft.shape[0]} but fs has {fs.shape[0]}")
    if ft.shape[2:] != fs.shape[2:]:
        fail(op, f"ft has {ft.shape[2]}x{ft.shape[3]} pixels but fs has {fs.shape[2]}x{fs.shape[3]}; resize the "
                 f"teacher's features first (slimops.distill.feature_affinity_loss does it bilinearly)")
    hw = int(fs.shape[2]) * int(fs.shape[3])
    if hw < 1:
        fail(op, f"fs must have at least one pixel, got shape {tuple(fs.shape)}")
    if not isinstance(norm, str) or norm not in NORMS:
        fail(op, f"unknown norm {norm!r} (expected one of: {', '.join(NORMS)})")
    if proj is None:
        return hw, None
    check_float_tensor(op, "proj", proj)
    if proj.device != fs.device:
        fail(op, f"proj is on {proj.device} but fs is on {fs.device}")
    if proj.dim() != 2 or proj.shape[0] != hw or proj.shape[1] < 1:
        fail(op, f"proj must be 2-D (H*W, k) = ({hw}, k) with k >= 1, got shape {tuple(proj.shape)}")
    return hw, int(proj.shape[1])


def check_saved(op: str, fs: Tensor, ft: Tensor, k: Optional[int], u, e) -> bool:
    """The fast loss's saved products given to the backward (the forward's ``u`` and ``e``): both or neither, only
    with ``proj``; ``u`` (B, Cs + Ct, k) and ``e`` (B, H*W, k) in the compute dtype on the features' device. Returns
    whether they are given."""
    if (u is None) != (e is None):
        fail(op, "u and e are the fast loss's saved products (the forward's 2nd and 3rd outputs): give both or neither")
    if u is None:
        return False
    if k is None:
        fail(op, "u and e are the fast loss's saved products: give them only with proj (the exact loss saves nothing)")
    want = compute_dtype(fs)
    for name, t in (("u", u), ("e", e)):
        if not isinstance(t, Tensor):
            fail(op, f"{name} must be a tensor, got {type(t).__name__}", TypeError)
        if t.layout != torch.strided:
            fail(op, f"{name} must be a strided (dense) tensor, got layout {t.layout}")
        if t.dtype != want:
            fail(op, f"{name} has dtype {t.dtype} but the forward saves it in {want} for {fs.dtype} features",
                 TypeError)
        if t.device != fs.device:
            fail(op, f"{name} is on {t.device} but fs is on {fs.device}")
    b, kk, hw = int(fs.shape[0]), int(fs.shape[1]) + int(ft.shape[1]), int(fs.shape[2]) * int(fs.shape[3])
    if tuple(u.shape) != (b, kk, k):
        fail(op, f"u must be (B, Cs + Ct, k) = ({b}, {kk}, {k}), got shape {tuple(u.shape)}")
    if tuple(e.shape) != (b, hw, k):
        fail(op, f"e must be (B, H*W, k) = ({b}, {hw}, {k}), got shape {tuple(e.shape)}")
    return True


def check_grad(op: str, grad, fs: Tensor):
    """``grad`` of the backward: the per-sample loss gradient, a float tensor (B,) on the features' device."""
    check_float_tensor(op, "grad", grad)
    if grad.device != fs.device:
        fail(op, f"grad is on {grad.device} but fs is on {fs.device}")
    if tuple(grad.shape) != (fs.shape[0],):
        fail(op, f"grad must have the output's shape ({fs.shape[0]},), got {tuple(grad.shape)}")


# ---- fake kernels ---------------------------------------------------------------------------------------


def saved_shapes(fs: Tensor, ft: Tensor, k: Optional[int]) -> Tuple[tuple, tuple]:
    """Shapes of the forward's ``u`` and ``e``: (B, Cs + Ct, k) and (B, H*W, k) for the fast loss, (0,) exact."""
    if k is None:
        return (0,), (0,)
    b = int(fs.shape[0])
    return (b, int(fs.shape[1]) + int(ft.shape[1]), k), (b, int(fs.shape[2]) * int(fs.shape[3]), k)


def _fake(fs, ft, proj=None, norm="l1"):
    _, k = check_feature_affinity("feature_affinity_loss", fs, ft, proj, norm)
    dt = compute_dtype(fs)
    u_shape, e_shape = saved_shapes(fs, ft, k)
    return fs.new_empty((fs.shape[0],), dtype=dt), fs.new_empty(u_shape, dtype=dt), fs.new_empty(e_shape, dtype=dt)


def _backward_fake(grad, fs, ft, proj, norm, output_mask, u=None, e=None):
    op = "feature_affinity_loss_backward"
    _, k = check_feature_affinity(op, fs, ft, proj, norm)
    check_grad(op, grad, fs)
    check_saved(op, fs, ft, k, u, e)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if m else t.new_empty(0)
                 for t, m in zip((fs, ft), output_mask))


# ---- autograd: the backward is the family's own backward op, of the same backend ------------------------
# The fast loss's u and e (the forward's 2nd and 3rd outputs) are saved and handed to the backward, which then
# recomputes no product; they are not differentiable (their incoming gradients are ignored).


def _setup(ctx, inputs, output):
    fs, ft, proj, norm = inputs
    _, u, e = output
    ctx.mark_non_differentiable(u, e)
    # No zero gradients made for u and e: autograd would otherwise fill a (B, HW, k) tensor of zeros per backward
    # (4.4 ms of the 8 x 64 x 56 x 56 fast loss's ~16 ms fwd + bwd, most of it first-touch page faults).
    ctx.set_materialize_grads(False)
    if proj is None:
        u = e = None
    ctx.save_for_backward(fs, ft, proj, u, e)
    ctx.norm = norm


def _make_backward(backward_op):
    def _backward(ctx, grad, _grad_u=None, _grad_e=None):
        fs, ft, proj, u, e = ctx.saved_tensors
        m = [bool(x) for x in ctx.needs_input_grad[:2]]
        if grad is None:  # not materialised: only u or e (non-differentiable) was used
            return None, None, None, None
        gs, gt = backward_op(grad.contiguous(), fs, ft, proj, ctx.norm, m, u, e)
        # proj is a fixed projection: no gradient flows to it.
        return gs if m[0] else None, gt if m[1] else None, None, None

    return _backward


DEFS = (
    OpDef("feature_affinity_loss", _fake, _setup, _make_backward),
    OpDef("feature_affinity_loss_backward", _backward_fake),
)

wire(DEFS, "slimops")
