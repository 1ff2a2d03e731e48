"""Backend selection shared by every public op.

A public op takes ``backend=`` — ``"auto" | "cuda" | "triton" | "cpu" | "reference"``:

- ``"cpu"``: the C++ kernel (``torch.ops.slimops.<op>``) on CPU tensors;
- ``"cuda"``: the CUDA C++ kernel (same op, CUDA tensors), present when the extension was built with CUDA;
- ``"triton"``: the Triton launcher (``torch.ops.slimops_triton.<op>``) on CUDA tensors, or on CPU
  tensors when ``TRITON_INTERPRET=1`` was set before anything imported triton (tests);
- ``"reference"``: the readable pure-PyTorch twin in ``slimops.reference`` (any device);
- ``"auto"``: ``"cpu"`` on CPU tensors; on CUDA tensors the backend listed in ``AUTO_CUDA`` (the faster one
  measured by ``bench/``), falling back to the other GPU backend, then to the reference.

When a requested backend cannot run, the error says why (NATTEN-style), instead of silently falling back.
"""
from __future__ import annotations

import importlib
import os
from functools import lru_cache

import torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")

# Which GPU backend wins "auto" per op. Until bench/results holds GPU measurements for an op, the CUDA
# kernel is preferred for the prox family: it fuses each list into one launch and reads AMP scalars on
# the device, like the Triton one, but without Triton's per-call Python launch overhead.
AUTO_CUDA = {
    "prox": "cuda",
    "prox_backward": "cuda",
    "prox_sgd_": "cuda",
    "prox_adamw_": "cuda",
    "palm_slimming_": "cuda",
    "penalty_grad_": "cuda",
    "split_step_": "cuda",
    # The channel_conv family has no CUDA C++ kernel: Triton's implicit GEMM is its GPU backend.
    "channel_conv2d": "triton",
    "channel_conv2d_backward": "triton",
    "masked_conv2d": "triton",
    "masked_conv2d_backward": "triton",
    # The spectral family: Triton's fused dense-DFT kernel where it fits (slimops.ops.spectral.pick sends
    # larger grids and wide AFF channel blocks to the CUDA cuFFT kernel).
    "spectral_filter": "triton",
    "spectral_filter_backward": "triton",
    "adaptive_spectral_filter": "triton",
    "adaptive_spectral_filter_backward": "triton",
    # The sema family has no CUDA C++ kernel: Triton's flash-style kernel is its GPU backend.
    "sema_attention": "triton",
    "sema_attention_backward": "triton",
    # The quant family: fda_sign is elementwise, the CUDA kernel skips Triton's Python launch; fake_quantize has
    # no CUDA C++ kernel (its Triton kernels are its GPU backend).
    "fda_sign": "cuda",
    "fda_sign_backward": "cuda",
    "fake_quantize": "triton",
    "fake_quantize_backward": "triton",
    # The token_attention family has no CUDA C++ kernel: Triton's flash-style kernel (indices read in the kernel) is its
    # GPU backend.
    "kept_token_attention": "triton",
    "kept_token_attention_backward": "triton",
    # The distill family has no CUDA C++ kernel: Triton's tiled kernels (and cuBLAS for the fast loss's products) are
    # its GPU backend.
    "feature_affinity_loss": "triton",
    "feature_affinity_loss_backward": "triton",
}

_TRITON_MODULES = {op: "slimops.triton.prox" for op in AUTO_CUDA}
_TRITON_MODULES.update({op: "slimops.triton.channel_conv" for op in AUTO_CUDA if "conv2d" in op})
_TRITON_MODULES.update({op: "slimops.triton.spectral" for op in AUTO_CUDA if "spectral" in op})
_TRITON_MODULES.update({op: "slimops.triton.sema" for op in AUTO_CUDA if op.startswith("sema")})
_TRITON_MODULES.update({op: "slimops.triton.quant" for op in AUTO_CUDA if op.startswith(("fda_", "fake_quantize"))})
_TRITON_MODULES.update({op: "slimops.triton.token_attention" for op in AUTO_CUDA if op.startswith("kept_token")})
_TRITON_MODULES.update({op: "slimops.triton.distill" for op in AUTO_CUDA if op.startswith("feature_affinity")})


@torch.compiler.assume_constant_result  # fixed once the library is loaded; lets Dynamo trace the ops
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the compiled extension registered a kernel for ``slimops::<op>`` under ``dispatch_key``."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"slimops::{op}", dispatch_key)


@lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not(op: str, backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run ``op`` on ``device``, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the tensors are on {device}, not the CPU"
        return None if has_kernel(op, "CPU") else "the extension has no CPU kernel for it"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the tensors are on {device}, not a CUDA device"
        if not has_kernel(op, "CUDA"):
            return "slimops was built without CUDA kernels (rebuild with a CUDA toolkit, see README)"
        return None
    if backend == "triton":
        if not triton_importable():
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return f"the tensors are on {device}; Triton runs on CUDA (or on CPU with TRITON_INTERPRET=1)"
    return f"unknown backend '{backend}' (expected one of {', '.join(BACKENDS)})"


def resolve(op: str, backend: str, device: torch.device) -> str:
    """The concrete backend that runs ``op`` for tensors on ``device``; raises with the reason otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"slimops.{op}: unknown backend '{backend}' (expected one of {', '.join(BACKENDS)})")
    if backend != "auto":
        reason = why_not(op, backend, device)
        if reason is not None:
            raise RuntimeError(f"slimops.{op}: backend '{backend}' cannot run: {reason}")
        return backend
    if device.type == "cuda":
        first = AUTO_CUDA.get(op, "cuda")
        candidates = (first, "triton" if first == "cuda" else "cuda", "reference")
    elif device.type == "cpu":
        candidates = ("cpu", "reference")
    else:
        candidates = ("reference",)
    for cand in candidates:
        if why_not(op, cand, device) is None:
            return cand
    return "reference"  # unreachable: the reference always runs


def available(op: str, device: torch.device) -> list[str]:
    """Every concrete backend that can run ``op`` on ``device`` (for `python -m slimops.info` and tests)."""
    return [b for b in BACKENDS[1:] if why_not(op, b, device) is None]


def pick(op: str, backend: str, device: torch.device, reference_module):
    """(backend name, callable) for ``op``: the C++ op, the Triton op or the reference twin in
    ``reference_module``; raises with the reason when ``backend`` cannot run."""
    b = resolve(op, backend, device)
    if b in ("cpu", "cuda"):
        return b, getattr(torch.ops.slimops, op)
    if b == "triton":
        return b, triton_op(op)
    return b, getattr(reference_module, op)


def triton_op(op: str):
    """``torch.ops.slimops_triton.<op>``, importing its kernel module on first use (never at package import,
    so that TRITON_INTERPRET can still be set by the caller and importing slimops stays cheap)."""
    importlib.import_module(_TRITON_MODULES[op])
    return getattr(torch.ops.slimops_triton, op)
