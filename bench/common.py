"""A small benchmark harness: median timings side by side, and results files with provenance.

Every bench script times its kernel and the strongest baselines in the same process, on the same
inputs, interleaved round by round (so drift in clock speed or a noisy neighbour hits every contender
alike), and writes ``bench/results/<device>.md`` + ``.csv`` rows tagged with device, versions and git SHA.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import statistics
import subprocess
import time
from typing import Callable, Dict, List

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _steady_malloc() -> str:
    """Fixes glibc malloc's mmap and trim thresholds (32 MB, never trim) for this process, unless
    SLIMOPS_BENCH_MALLOC=system; returns what the results' provenance says about it.

    Why: with glibc's defaults the thresholds move with what was freed last, so a 13-26 MB tensor (an output or a
    gradient of the shapes here) comes from a fresh mapping in some rounds and from the heap in others, and a fresh
    mapping costs a page fault per 4 KB on first touch. On a Xeon (2 threads) `channel_conv2d` fwd+bwd at 64 @ 56²
    then ran 20-21 ms in most calls and 26-31 ms in one of four, and a whole contender's median could sit in
    either mode (x compact read 0.77 in one run and 1.35 in another). With the thresholds fixed: 20-22 ms, no second
    mode. Every contender runs under the same allocator either way; torch's CPU tensors use malloc directly.
    """
    if os.environ.get("SLIMOPS_BENCH_MALLOC", "") == "system":
        return "glibc defaults (SLIMOPS_BENCH_MALLOC=system)"
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and libc.mallopt(m_trim_threshold, (1 << 31) - 1) == 1
        return "malloc mmap threshold 32 MB, no trim" if ok else "glibc defaults (mallopt refused)"
    except OSError:
        return "the platform's (not glibc)"


MALLOC = _steady_malloc()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(fns: Dict[str, Callable[[], None]], device: torch.device, *, warmup: int = 5,
                      rounds: int = 30, inner: int = 1) -> Dict[str, List[float]]:
    """Per-call times (seconds) of each fn, `rounds` samples each, interleaved round-robin.

    On CUDA each sample is timed with events around `inner` back-to-back calls; on CPU with
    perf_counter. Returns the raw samples; report their median.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / 1e3 / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples[name].append((time.perf_counter() - t0) / inner)
    return samples


def add_run_args(ap: argparse.ArgumentParser, *, dtypes: str, rounds_help: str, quick_help: str) -> None:
    """The options every op benchmark takes: --device, --backend, --threads, --dtypes (default ``dtypes``),
    --rounds, --quick, --json, --no-write (read the dtypes back with :func:`dtypes_of`)."""
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="auto", help="slimops backend (auto, cpu, triton, reference)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the CPU results use 2)")
    ap.add_argument("--dtypes", default=dtypes, help="comma-separated, of float32, bfloat16, float16")
    ap.add_argument("--rounds", type=int, default=None, help=rounds_help)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--json", default=None, metavar="PATH", help="also write provenance and the table to PATH")
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to bench/results")


def dtypes_of(ap: argparse.ArgumentParser, text: str) -> List[torch.dtype]:
    """The --dtypes value as torch dtypes (float32, bfloat16, float16); anything else is the parser's error."""
    out = []
    for dn in text.split(","):
        if dn.strip() not in ("float32", "bfloat16", "float16"):
            ap.error(f"--dtypes: float32, bfloat16 and/or float16, got {dn!r}")
        out.append(getattr(torch, dn.strip()))
    return out


def median_ms(samples: List[float]) -> float:
    return statistics.median(samples) * 1e3


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes / time): the memory roofline."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    s = time_side_by_side({"copy": lambda: dst.copy_(src)}, device, warmup=3, rounds=20)
    return 2 * src.numel() * 4 / statistics.median(s["copy"]) / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    as_isa = os.environ.get("SLIMOPS_BENCH_AS_ISA")  # bench/as_isa.py: this CPU with every library capped
    if as_isa:
        return f"cpu-{torch.get_num_threads()}threads-as-{as_isa}"
    from slimops.info import cpu_flags

    # A CPU with AMX tiles gets its own table: oneDNN and torch's bf16 GEMMs run on the tiles there, so its
    # baselines differ from an AVX-512 CPU's without them (issue 16: one results table per ISA).
    return f"cpu-{torch.get_num_threads()}threads" + ("-amx" if "amx_tile" in cpu_flags() else "")


def isa_caps() -> str:
    """What bench/as_isa.py capped in this process ('' when nothing was)."""
    names = ("SLIMOPS_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
    caps = [f"{n}={os.environ[n]}" for n in names if os.environ.get(n)]
    return f"; capped: {', '.join(caps)}" if caps else ""


def git_sha() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True).strip()
    except Exception:
        return "unknown"


def provenance(device: torch.device) -> str:
    import slimops

    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "not installed"
    from slimops.info import cpu_description, cpu_isa, kernel_isa

    return (f"device `{device_name(device)}` ({cpu_description()}, {os.cpu_count()} cores visible, torch threads "
            f"{torch.get_num_threads()}; CPU ISA {cpu_isa()}, slimops kernels {kernel_isa()}, torch "
            f"{torch.backends.cpu.get_cpu_capability()}{isa_caps()}; {MALLOC}), "
            f"torch {torch.__version__}, triton {tv}, slimops {slimops.__version__} "
            f"@ {git_sha()}, {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")


def write_results(device: torch.device, title: str, header: List[str], rows: List[List], notes: str = "") -> str:
    """Appends a markdown table section to bench/results/<device>.md and rows to <device>.csv."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    base = os.path.join(RESULTS_DIR, device_name(device))
    with open(base + ".md", "a") as f:
        f.write(f"\n## {title}\n\n{provenance(device)}\n\n")
        f.write("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
        for r in rows:
            f.write("| " + " | ".join(_fmt(v) for v in r) + " |\n")
        if notes:
            f.write("\n" + notes.strip() + "\n")
    new = not os.path.exists(base + ".csv")
    with open(base + ".csv", "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["bench", "sha"] + header)
        for r in rows:
            w.writerow([title, git_sha()] + list(r))
    return base + ".md"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
