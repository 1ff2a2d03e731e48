"""What a slimmed model costs and how well it does: parameters, MACs, latency, test accuracy.

MACs (multiply-accumulates) count the dense ``nn.Conv2d`` and ``nn.Linear`` layers (subclasses
included): ``out_elems * in_ch/groups * kh * kw`` for a convolution, ``out_elems * in_features`` for a
linear layer, and the two token products of ViT self-attention (``q k^T`` and ``softmax v``:
``N^2 * heads * (head_dim + v_dim)`` for N tokens, :class:`slimops.nn.vit.ViTAttention`) and of SEMA attention
(the same products over each query's window, plus the mean of v: ``heads * (head_dim + v_dim) * sum_windows n_w^2
+ N * heads * v_dim``, :class:`slimops.nn.sema.SEMAAttention`), for one forward pass of a batch-1 input. The
zero padding that a compacted block adds to v for the kernels (``v_dim < head_dim``) is not counted. Biases, BatchNorm, activations, pooling and
residual additions are not counted: they are a rounding error next to the convolutions and are what
the pruning literature leaves out too. FLOPs are conventionally reported as ``2 x MACs``: the CIFAR
VGG-19 of network slimming (Liu et al., 2017, Table 1: 7.97e8 FLOPs, 20.04M parameters) has
398,136,320 MACs here, 2 x that = 7.963e8, within 0.1% of the paper (the rest is presumably BN, ReLU
and biases); its 20,035,018 parameters match too (checked in tests/test_metrics.py).
"""
from __future__ import annotations

import time

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (all of them, trainable or not; shared ones once)."""
    return sum(p.numel() for p in model.parameters())


def _check_input_size(fn: str, input_size) -> tuple[int, ...]:
    try:
        size = tuple(int(s) for s in input_size)
    except TypeError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"slimops.pruning.{fn}: input_size must be (C, H, W) with positive sizes, got {input_size!r}")
    return size


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def _eval_forward(model: nn.Module, x: torch.Tensor):
    """One forward pass in eval mode without autograd, restoring the caller's train/eval flag."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.train(was_training)


def _squares(extent: int, window: int) -> int:
    """The sum of the squared sizes of the windows that tile ``extent`` from the start (the last one smaller)."""
    full, rest = divmod(extent, window)
    return full * window * window + rest * rest


def count_macs(model: nn.Module, input_size) -> int:
    """Multiply-accumulates of one forward pass of a zero input of shape ``(1, *input_size)``, with
    ``input_size = (C, H, W)``: Conv2d and Linear layers only (see the module docstring)."""
    size = _check_input_size("count_macs", input_size)
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp, out):
        nonlocal total
        total += out.numel() * m.in_features

    def attention_hook(m, inp, _out):  # the token products; qkv and proj are counted as Linear layers
        nonlocal total
        b, n = inp[0].shape[:2]
        total += b * n * n * m.num_heads * (m.head_dim + m.v_dim)  # q k^T, then softmax . v

    def sema_hook(m, inp, _out):  # windowed q k^T and softmax . v, and the mean of v; qkv / proj are Linear layers
        nonlocal total
        b, gh, gw = inp[0].shape[:3]
        wh, ww = m.window_for(gh, gw)
        if m.neighborhood:  # every query sees a full wh x ww window
            pairs = gh * gw * wh * ww
        else:  # the windows of the partition, the last row / column smaller: sum of their sizes squared
            pairs = _squares(gh, wh) * _squares(gw, ww)
        total += b * m.num_heads * (pairs * (m.head_dim + m.v_dim) + gh * gw * m.v_dim)

    def sparse_conv_hook(m, _inp, out):  # slimops.nn.ChannelSparseConv2d: only the kept channels
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * m.in_idx.numel() * kh * kw

    def sparse_linear_hook(m, _inp, out):
        nonlocal total
        total += out.numel() * m.in_idx.numel()

    from slimops.nn import ChannelSparseConv2d, ChannelSparseLinear
    from slimops.nn.sema import SEMAAttention
    from slimops.nn.vit import ViTAttention

    handles = []
    try:
        for m in model.modules():
            if isinstance(m, ChannelSparseConv2d):
                handles.append(m.register_forward_hook(sparse_conv_hook))
            elif isinstance(m, ChannelSparseLinear):
                handles.append(m.register_forward_hook(sparse_linear_hook))
            elif isinstance(m, nn.Conv2d):
                handles.append(m.register_forward_hook(conv_hook))
            elif isinstance(m, nn.Linear):
                handles.append(m.register_forward_hook(linear_hook))
            elif isinstance(m, ViTAttention):
                handles.append(m.register_forward_hook(attention_hook))
            elif isinstance(m, SEMAAttention):
                handles.append(m.register_forward_hook(sema_hook))
        device, dtype = _device_dtype(model)
        _eval_forward(model, torch.zeros((1, *size), device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    return int(total)


def measure_latency(model: nn.Module, input_size, batch: int = 1, warmup: int = 3, reps: int = 20,
                    threads: int | None = None) -> dict:
    """Wall-clock time of eval-mode forward passes on a ``(batch, *input_size)`` zero input.

    Returns ``{"median_ms", "p10_ms", "p90_ms", "batch", "threads", "reps", "device"}``. ``threads`` sets
    torch's intra-op thread count for the measurement only (restored afterwards); on CUDA every pass
    is bracketed by ``torch.cuda.synchronize`` so the time is the kernels', not the launch's.
    """
    size = _check_input_size("measure_latency", input_size)
    for arg, val, lo in (("batch", batch, 1), ("warmup", warmup, 0), ("reps", reps, 1)):
        if val < lo:
            raise ValueError(f"slimops.pruning.measure_latency: {arg} must be >= {lo}, got {val}")
    if threads is not None and threads < 1:
        raise ValueError(f"slimops.pruning.measure_latency: threads must be >= 1 or None, got {threads}")
    device, dtype = _device_dtype(model)
    x = torch.zeros((batch, *size), device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    old_threads = torch.get_num_threads()
    was_training = model.training
    times = []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        model.eval()
        with torch.no_grad():
            for i in range(warmup + reps):
                sync()
                t0 = time.perf_counter()
                model(x)
                sync()
                if i >= warmup:
                    times.append((time.perf_counter() - t0) * 1e3)
        used_threads = torch.get_num_threads()
    finally:
        model.train(was_training)
        torch.set_num_threads(old_threads)
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"median_ms": q[1].item(), "p10_ms": q[0].item(), "p90_ms": q[2].item(), "batch": batch,
            "threads": used_threads, "reps": reps, "device": str(device)}


def compare_latency(baseline: nn.Module, candidate: nn.Module, input_size, batch: int = 64, rounds: int = 7,
                    reps: int = 5, warmup: int = 3) -> dict:
    """Latency of two models measured side by side: ``rounds`` alternating rounds of ``reps`` timed
    passes each (after ``warmup`` untimed passes of both), so drift in clock speed or background load
    hits both alike. Returns each model's median over all passes and the median of the per-round
    ratios ``baseline / candidate`` (the speed-up), with the batch and thread count."""
    for m in (baseline, candidate):
        measure_latency(m, input_size, batch=batch, warmup=warmup, reps=1)
    per = {"baseline": [], "candidate": []}
    ratios = []
    for _ in range(rounds):
        a = measure_latency(baseline, input_size, batch=batch, warmup=0, reps=reps)
        b = measure_latency(candidate, input_size, batch=batch, warmup=0, reps=reps)
        per["baseline"].append(a["median_ms"])
        per["candidate"].append(b["median_ms"])
        ratios.append(a["median_ms"] / max(b["median_ms"], 1e-9))

    def med(v):
        return torch.tensor(v, dtype=torch.float64).median().item()

    return {"baseline_ms": med(per["baseline"]), "candidate_ms": med(per["candidate"]), "speedup": med(ratios),
            "batch": batch, "threads": a["threads"], "rounds": rounds, "reps": reps, "device": a["device"]}


def accuracy(model: nn.Module, data, batch_size: int = 256, device=None) -> float:
    """Top-1 accuracy of ``model`` on ``data``'s test split (an :class:`~slimops.data.ImageData`), in
    eval mode without autograd; the model's train/eval flag is restored. ``device`` defaults to the
    model's (batches are moved there)."""
    if data.num_test == 0:
        raise ValueError(f"slimops.pruning.accuracy: data {data.name!r} has an empty test split")
    device = _device_dtype(model)[0] if device is None else torch.device(device)
    correct = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, y in data.test_batches(batch_size):
                pred = model(x.to(device)).argmax(dim=1)
                correct += int((pred == y.to(device)).sum())
    finally:
        model.train(was_training)
    return correct / data.num_test
