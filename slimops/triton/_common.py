"""What every Triton family module shares: the dtype table, where Triton can run, argument errors, the launch
context, and the small ``@triton.jit`` helpers (fp64-argument conversion, round-to-nearest-even stores, row
reductions).

The family modules (``prox``, ``channel_conv``, ``spectral``, ``sema``) import from here and from
:mod:`slimops.opdefs`, never from each other or from :mod:`slimops.ops` (tests/test_op_anatomy.py checks it).

Interpreter notes (``TRITON_INTERPRET=1``, kernels on CPU tensors):

- Whether kernels run interpreted is decided when a ``@triton.jit`` function is decorated, i.e. when the
  module is imported; :data:`INTERPRETED` probes it with this module's own helper, decorated at the same time
  as the family kernels that import it.
- The interpreter converts fp32 -> bf16 by truncation where a GPU rounds to nearest even: stores go through
  :func:`cvt_store`, which rounds explicitly there (:data:`EMULATE_RNE`).
- The helpers call only Triton builtins and ``triton.language.standard``'s combine functions, never the
  ``@jit``'d ``tl.sum`` / ``tl.max`` themselves (those are compiled-mode functions when triton was imported
  before ``TRITON_INTERPRET=1`` was set, and the interpreter cannot call them). ``tl.reduce`` with exactly
  tl.sum's / tl.max's combine functions runs as one numpy reduction in the interpreter; any other combine
  function is called element by element (~30x slower).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.standard import _elementwise_max, _sum_combine
from triton.runtime.errors import OutOfResources

__all__ = [
    "TL_DTYPES", "INTERPRETED", "EMULATE_RNE", "math_dtype", "fail", "check_device", "device_of", "next_pow2", "on_device",
    "to_acc", "cvt_store", "div_rn", "rowsum", "rowmax", "vecsum",
]

TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


# ---- device helpers -------------------------------------------------------------------------------------


@triton.jit
def to_acc(x, ACC: tl.constexpr):
    """An fp64 scalar argument (a Python float in the interpreter) in the math dtype."""
    return (x + tl.full([], 0.0, ACC)).to(ACC)


@triton.jit
def cvt_store(x, DTYPE: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """Math dtype -> storage dtype, rounding to nearest even (the interpreter truncates to bf16)."""
    if EMULATE_RNE and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        r = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        r = tl.where(x != x, x.to(DTYPE), r)
    else:
        r = x.to(DTYPE)
    return r


@triton.jit
def div_rn(x, y, ACC: tl.constexpr):
    """IEEE (round-to-nearest) division: Triton's fp32 ``/`` is an approximation on NVIDIA GPUs."""
    if ACC == tl.float32:
        r = tl.math.div_rn(x, y)
    else:
        r = x / y
    return r


@triton.jit
def rowsum(x):
    """Sum over axis 1 (tl.sum's reduction through the builtin tl.reduce; see the module docstring)."""
    return tl.reduce(x, 1, _sum_combine)


@triton.jit
def vecsum(x):
    """Sum of a 1-D block (tl.sum's reduction, as :func:`rowsum`)."""
    return tl.reduce(x, 0, _sum_combine)


@triton.jit
def rowmax(x):
    """Max over axis 1 (tl.max's reduction, as :func:`rowsum`)."""
    return tl.reduce(x, 1, _elementwise_max)


try:
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction

    INTERPRETED = isinstance(to_acc, _InterpretedFunction)
except Exception:  # pragma: no cover - depends on the triton version
    INTERPRETED = False
# The interpreter truncates fp32 -> bf16; the GPU rounds to nearest even (cvt_store).
EMULATE_RNE = INTERPRETED


@triton.jit
def dot_operand(x, IN_T: tl.constexpr, DOT_T: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """A math-dtype tile (attention's P or dS) as a tl.dot operand, rounded to the input dtype as a low-precision
    MMA takes it; in the interpreter (whose bf16 tl.dot is wrong) the round-to-nearest-even bf16 values as
    float32."""
    if IN_T == DOT_T:
        r = x.to(DOT_T)
    else:
        r = cvt_store(x, IN_T, EMULATE_RNE).to(DOT_T)
    return r


# ---- host helpers ---------------------------------------------------------------------------------------


def fail(op: str, msg: str, exc=ValueError):
    raise exc(f"slimops.{op}: {msg}")


def math_dtype(t: Tensor) -> torch.dtype:
    """The kernels' math dtype for a storage dtype: float64 for float64, float32 for the others."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def device_of(ts: Sequence[Tensor]) -> Optional[torch.device]:
    """The device of a tensor list (None for an empty list)."""
    return ts[0].device if len(ts) else None


def check_device(op: str, device: Optional[torch.device]):
    """Where Triton can run: CUDA tensors, or CPU tensors under the interpreter (nothing to check for an
    empty list). The other argument checks are the shared ones of :mod:`slimops.opdefs`."""
    if device is None:
        return
    if INTERPRETED:
        if device.type != "cpu":
            fail(op, f"the Triton interpreter (TRITON_INTERPRET=1) runs on CPU tensors, got {device}")
    elif device.type != "cuda":
        fail(op, f"Triton kernels run on CUDA tensors (or on CPU with TRITON_INTERPRET=1 set before triton "
                 f"is imported), got {device}")


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


class on_device:
    """Launch context: ``torch.cuda.device(dev)`` for CUDA tensors (Triton launches on the current device);
    in the interpreter, numpy's floating-point warnings off (padding lanes of a tile may divide by zero,
    as they silently do on a GPU)."""

    def __init__(self, device: torch.device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None
        self.np_ctx = None
        if INTERPRETED:
            import numpy as np

            self.np_ctx = np.errstate(all="ignore")

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()
        if self.np_ctx is not None:
            self.np_ctx.__enter__()

    def __exit__(self, *exc):
        if self.np_ctx is not None:
            self.np_ctx.__exit__(*exc)
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


# ---- the attention families (sema, token_attention): q / k / v planes read in place ----------------------


@contextlib.contextmanager
def launching_attention(op: str, head_dim: int, acc: torch.dtype, device: torch.device):
    """The launch context (:class:`on_device`), plus a clear error naming the op when a configuration needs more
    shared memory or registers than the GPU has (Triton raises that at the first launch; e.g. head dims far
    beyond 128)."""
    try:
        with on_device(device):
            yield
    except OutOfResources as e:
        fail(op, f"the Triton kernel does not fit this GPU for head dim {head_dim} and {TL_DTYPES[acc]} math ({e}); "
                 "use backend='reference'", RuntimeError)


def head_rows(t: Tensor) -> Tensor:
    """t read in place when its head dim is contiguous (or of size 1), else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def token_strides(t: Tensor):
    """(batch, head, token) strides in elements of a (B, heads, tokens, d) tensor."""
    return int(t.stride(0)), int(t.stride(1)), int(t.stride(2))
