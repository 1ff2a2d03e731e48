"""SEMA attention as a module and the Mamba-like block built on it (docs/algorithms.md §8; Tran, Xue, Zhang et al.
2025, on the MLLA block of Han et al. 2024).

Every module here works on channels-last tokens ``x`` (B, H, W, C), row-major over the H x W grid, the token
order of :func:`slimops.ops.sema_attention`. The depthwise convolutions of the block run on the NCHW view
``x.permute(0, 3, 1, 2)`` of the same memory (channels_last strides, which PyTorch's convolutions keep).

Any grid works: the attention window is ``(min(window, H), min(window, W))`` on an H x W grid, so a 7 x 7
window on the 7 x 7 / 4 x 4 / 1 x 1 grids of a model's late stages is a window over the whole grid (plain
softmax attention plus the mean), and grids that are not a multiple of the window get smaller last windows
(the op's partition, :mod:`slimops.reference.sema`). Nothing depends on the input resolution.

``backend``: :class:`SEMAAttention` takes the op's ``backend=`` (``"auto"`` by default: the C++ kernel on CPU,
Triton on CUDA, the reference where neither is available) as a constructor argument and a plain attribute;
:func:`set_sema_backend` sets it on every SEMA module of a model.
"""
from __future__ import annotations

from torch import Tensor, nn

from slimops._backend import BACKENDS
from slimops.nn.dim_gate import DimGate, GatedMlp, split_qkv
from slimops.ops.sema import sema_attention

__all__ = ["SEMAAttention", "SEMAMlp", "SEMABlock", "DropPath", "DepthwiseConv3", "set_sema_backend"]


def _positive_int(where: str, name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"slimops.nn.{where}: {name} must be a positive int, got {v!r}")
    return v


def _check_backend(where: str, backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"slimops.nn.{where}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


class SEMAAttention(nn.Module):
    """Multi-head SEMA on tokens ``x`` (B, H, W, in_dim)::

        q, k, v = split(qkv(gate_in(x)))             one fused Linear(in_dim, 3C), heads of d = C / heads
        y = proj(gate_out(merge_heads(SEMA(q, k, v))))       -> (B, H, W, dim)

    with SEMA the op :func:`slimops.ops.sema_attention` (scale d^-1/2, windows of ``window`` tokens per side;
    ``neighborhood=True``: the window centred on each query instead). q, k and v are strided views of the
    qkv projection's output (B, heads, N, d) with a contiguous head dim, which the kernels read in place: no
    copy between the projection and the attention. The window is clipped to the grid per dimension,
    ``(min(window, H), min(window, W))``, so that every input resolution works (module docstring).

    Dimension pruning (VTP / SiDT on SEMA-T, :mod:`slimops.pruning.vit`): the gates (:class:`DimGate`, absent by
    default, :meth:`add_gates`) sit on the input of ``qkv`` and of ``proj``, as in :class:`slimops.nn.vit.ViTAttention`.
    A compacted module (:meth:`resize`) reads ``in_dim <= dim`` inputs (its block cut the layers that make the
    others), has ``heads`` kept heads, and ``v_dim <= head_dim`` value dims per head (q / k are not gated, so the
    logits stay exact; v is zero-padded to ``head_dim`` for the op, :func:`slimops.nn.dim_gate.split_qkv`).
    """

    def __init__(self, dim: int, heads: int, window: int = 7, *, neighborhood: bool = False, qkv_bias: bool = True,
                 backend: str = "auto"):
        super().__init__()
        _positive_int("SEMAAttention", "dim", dim)
        _positive_int("SEMAAttention", "heads", heads)
        _positive_int("SEMAAttention", "window", window)
        if dim % heads:
            raise ValueError(f"slimops.nn.SEMAAttention: heads ({heads}) must divide dim ({dim})")
        if not isinstance(neighborhood, bool):
            raise ValueError(f"slimops.nn.SEMAAttention: neighborhood must be a bool, got {neighborhood!r}")
        self.dim, self.window, self.neighborhood = dim, window, neighborhood
        self.backend = _check_backend("SEMAAttention", backend)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.gate_in: DimGate | None = None
        self.gate_out: DimGate | None = None
        self._set_heads(heads, dim // heads, dim // heads)

    def _set_heads(self, heads: int, head_dim: int, v_dim: int) -> None:
        self.heads, self.head_dim, self.v_dim = heads, head_dim, v_dim

    @property
    def num_heads(self) -> int:
        """``heads`` under the name :class:`slimops.nn.vit.ViTAttention` (and timm) give it."""
        return self.heads

    @property
    def in_dim(self) -> int:
        """The input width ``qkv`` reads: ``dim``, fewer in a compacted block."""
        return self.qkv.in_features

    @property
    def attn_dim(self) -> int:
        """The attention output width ``heads * v_dim`` (the input of ``proj``)."""
        return self.heads * self.v_dim

    def add_gates(self) -> None:
        """Installs the two dimension gates (identity at first) if they are not there."""
        if self.gate_in is None:
            self.gate_in = DimGate(self.in_dim).to(self.qkv.weight.device)
        if self.gate_out is None:
            self.gate_out = DimGate(self.attn_dim).to(self.qkv.weight.device)

    def resize(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, head_dim: int, v_dim: int | None = None) -> None:
        """Installs cut ``qkv`` / ``proj`` layers and the head shape they have (compaction); the gates go (they
        are folded into the layers by then). ``qkv`` may read fewer than ``dim`` inputs; ``proj`` gives ``dim``."""
        v_dim = head_dim if v_dim is None else v_dim
        if (qkv.out_features, proj.in_features, proj.out_features) != (num_heads * (2 * head_dim + v_dim),
                                                                       num_heads * v_dim, self.dim) \
                or not 0 < v_dim <= head_dim or qkv.in_features > self.dim:
            raise ValueError(f"slimops.nn.SEMAAttention.resize: qkv ({qkv.in_features} -> {qkv.out_features}) and proj "
                             f"({proj.in_features} -> {proj.out_features}) do not fit {num_heads} heads of q/k dim "
                             f"{head_dim} and v dim {v_dim} with output {self.dim}")
        self.qkv, self.proj = qkv, proj
        self.gate_in = self.gate_out = None
        self._set_heads(num_heads, head_dim, v_dim)

    def window_for(self, h: int, w: int) -> tuple[int, int]:
        """The window used on an h x w grid: ``(min(window, h), min(window, w))``."""
        return min(self.window, h), min(self.window, w)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-1] != self.in_dim:
            raise ValueError(f"slimops.nn.SEMAAttention: expected input (B, H, W, {self.in_dim}), got {tuple(x.shape)}")
        b, h, w, _ = x.shape
        if self.gate_in is not None:
            x = self.gate_in(x)
        q, k, v = split_qkv(self.qkv(x).reshape(b, h * w, -1), self.heads, self.head_dim, self.v_dim)
        out = sema_attention(q, k, v, (h, w), self.window_for(h, w), neighborhood=self.neighborhood,
                             backend=self.backend)
        out = out[..., : self.v_dim].transpose(1, 2).reshape(b, h, w, self.attn_dim)
        if self.gate_out is not None:
            out = self.gate_out(out)
        return self.proj(out)

    def extra_repr(self) -> str:
        cut = "" if (self.in_dim, self.heads * self.head_dim, self.v_dim) == (self.dim, self.dim, self.head_dim) else \
            f", in_dim={self.in_dim}, head_dim={self.head_dim}, v_dim={self.v_dim}"
        return (f"dim={self.dim}, heads={self.heads}{cut}, window={self.window}, neighborhood={self.neighborhood}, "
                f"backend={self.backend!r}")


class SEMAMlp(GatedMlp):
    """``fc2(gate(GELU(fc1(x))))`` with ``hidden`` units: the SEMA block's MLP. Its layers keep the names of the
    ``nn.Sequential(Linear, GELU, Linear)`` it replaces (``mlp.0``, ``mlp.1``, ``mlp.2``; ``fc1`` / ``act`` /
    ``fc2`` are aliases), so earlier SEMA-T checkpoints load as they are. The :class:`DimGate` (absent by default)
    multiplies the activations, so removing a gated-off unit (fc1 row, fc2 column) is exact."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        _positive_int("SEMAMlp", "dim", dim)
        _positive_int("SEMAMlp", "hidden", hidden)
        self.hidden = hidden
        self.add_module("0", nn.Linear(dim, hidden))
        self.add_module("1", nn.GELU())
        self.add_module("2", nn.Linear(hidden, dim))
        self.gate: DimGate | None = None

    @property
    def fc1(self) -> nn.Linear:
        return self._modules["0"]

    @property
    def act(self) -> nn.Module:
        return self._modules["1"]

    @property
    def fc2(self) -> nn.Linear:
        return self._modules["2"]

    def __getitem__(self, i: int) -> nn.Module:
        """``mlp[0]``, ``mlp[1]``, ``mlp[2]``: fc1, act, fc2, as the ``nn.Sequential`` this replaced indexes them."""
        return (self.fc1, self.act, self.fc2)[i]

    def _install(self, fc1: nn.Linear, fc2: nn.Linear) -> None:
        self._modules["0"], self._modules["2"] = fc1, fc2


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016) on a residual branch: in training, each sample's branch output is
    zeroed with probability ``p`` and the kept ones scaled by ``1 / (1 - p)``; the identity in eval mode or
    for ``p = 0``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"slimops.nn.DropPath: p must be a float in [0, 1), got {p!r}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class DepthwiseConv3(nn.Conv2d):
    """``dwconv3``: a depthwise 3x3 convolution (padding 1, with bias) on channels-last tokens (B, H, W, C),
    run on the NCHW view of the same memory; returns (B, H, W, C)."""

    def __init__(self, dim: int):
        super().__init__(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class SEMABlock(nn.Module):
    """The Mamba-like (MLLA-style) block with SEMA as its token mixer, on tokens ``x`` (B, H, W, C),
    exactly docs/algorithms.md §8::

        x = x + cpe1(x)                                  cpe1: dwconv3 (conditional position encoding)
        h = norm1(x)
        g = SiLU(act_proj(h))                            the gate
        h = SiLU(dwc(in_proj(h)))                        dwc: dwconv3
        h = attn(h)                                      SEMAAttention (its own qkv and output projections)
        x = x + drop_path(out_proj(h * g))
        x = x + cpe2(x)                                  cpe2: dwconv3
        x = x + drop_path(mlp(norm2(x)))                 mlp: Linear(C, r C) -> GELU -> Linear(r C, C)

    ``in_proj``, ``act_proj``, ``out_proj`` Linear(C, C); norms LayerNorms over channels; module names as in
    MLLA's code. Stochastic depth (``drop_path``) on the attention and MLP branches, as MLLA applies it; the
    two position-encoding convolutions are always added. Grid-free: every H x W works.

    Dimension pruning (:meth:`add_gates`, :mod:`slimops.pruning.vit`): the gates of ``attn`` (its qkv input and
    its value dims) and of ``mlp`` (hidden units). A qkv input dim that goes takes with it the ``in_proj`` row and
    the ``dwc`` channel that made it (:meth:`resize_attention_input`): the attention branch then runs ``attn.in_dim``
    channels from ``in_proj`` to ``qkv``, and the block still maps (B, H, W, dim) to (B, H, W, dim).
    """

    def __init__(self, dim: int, heads: int, window: int = 7, mlp_ratio: float = 4.0, drop_path: float = 0.0, *,
                 neighborhood: bool = False, backend: str = "auto"):
        super().__init__()
        _positive_int("SEMABlock", "dim", dim)
        _positive_int("SEMABlock", "heads", heads)
        _positive_int("SEMABlock", "window", window)
        if dim % heads:
            raise ValueError(f"slimops.nn.SEMABlock: heads ({heads}) must divide dim ({dim})")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
            raise ValueError(f"slimops.nn.SEMABlock: mlp_ratio must be a number > 0, got {mlp_ratio!r}")
        if isinstance(drop_path, bool) or not isinstance(drop_path, (int, float)) or not 0 <= drop_path < 1:
            raise ValueError(f"slimops.nn.SEMABlock: drop_path must be a float in [0, 1), got {drop_path!r}")
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.dim = dim
        self.cpe1 = DepthwiseConv3(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, dim)
        self.act_proj = nn.Linear(dim, dim)
        self.dwc = DepthwiseConv3(dim)
        self.act = nn.SiLU()
        self.attn = SEMAAttention(dim, heads, window, neighborhood=neighborhood, backend=backend)
        self.out_proj = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path)
        self.cpe2 = DepthwiseConv3(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SEMAMlp(dim, hidden)

    def add_gates(self) -> None:
        """Installs the dimension gates of ``attn`` and ``mlp`` (identity at first) if they are not there."""
        self.attn.add_gates()
        self.mlp.add_gates()

    def resize_attention_input(self, in_proj: nn.Linear, dwc: "DepthwiseConv3") -> None:
        """Installs a cut ``in_proj`` (dim -> attn.in_dim) and ``dwc`` (attn.in_dim channels): compaction, after
        ``attn`` was resized to read fewer inputs."""
        n = self.attn.in_dim
        if (in_proj.in_features, in_proj.out_features, dwc.in_channels) != (self.dim, n, n):
            raise ValueError(f"slimops.nn.SEMABlock.resize_attention_input: in_proj ({in_proj.in_features} -> "
                             f"{in_proj.out_features}) and dwc ({dwc.in_channels} channels) must map {self.dim} -> "
                             f"{n}, the attention's input width")
        self.in_proj, self.dwc = in_proj, dwc

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"slimops.nn.SEMABlock: expected input (B, H, W, {self.dim}), got {tuple(x.shape)}")
        x = x + self.cpe1(x)
        h = self.norm1(x)
        g = self.act(self.act_proj(h))
        h = self.attn(self.act(self.dwc(self.in_proj(h))))
        x = x + self.drop_path(self.out_proj(h * g))
        x = x + self.cpe2(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


def set_sema_backend(module: nn.Module, backend: str) -> nn.Module:
    """Sets ``backend`` on every :class:`SEMAAttention` inside ``module``; returns ``module``."""
    _check_backend("set_sema_backend", backend)
    for m in module.modules():
        if isinstance(m, SEMAAttention):
            m.backend = backend
    return module
