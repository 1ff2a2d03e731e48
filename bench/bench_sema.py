"""Benchmark of SEMA attention (``slimops.ops.sema_attention``) against what a user runs today.

Contenders, timed side by side on the same inputs (bench/common.py), forward and forward + backward (grads of
q, k and v):
  - ``slimops``: ``sema_attention(..., backend=--backend)`` (auto: the C++ kernel on CPU, Triton on CUDA);
  - ``reference``: partition into windows + ``scaled_dot_product_attention`` + merge + mean of v
    (``slimops.reference.sema``: exactly the usual Swin-style code);
  - ``flex``: ``torch.nn.attention.flex_attention`` (torch.compile'd) with a window block mask, plus the mean.
    The block mask is built once per shape, outside the timing (as a user caches it): ``create_block_mask`` up
    to 4096 tokens; beyond, the same (partial, full) block tables computed from the windows' row/column ranges
    (``create_block_mask`` materialises N x N masks and int64 intermediates: 34 GB at 256x256 tokens), checked
    equal to ``create_block_mask`` on small grids in every run. On CPU FlexAttention has no backward;
  - ``sdpa``: global ``scaled_dot_product_attention`` over all N tokens + mean: a different (quadratic) op,
    shown for scale; skipped where it would cost more than ``--sdpa-max-gflop`` per call or its N x N logits
    (if materialised) would not fit in memory. Not counted as a baseline of the same op.

Shapes (B, heads, grid, window 7, d = 32): SEMA-T (head dim 32, widths 64/128/256) at a 224x224 input:
stage 1 56x56 tokens 2 heads, the CPU target (16, 4 heads, 56x56), stage 2 28x28 4 heads, stage 3
14x14 8 heads, B = 16; and stage 1 at 512x512 (128x128 tokens, B = 4) and 1024x1024 (256x256 tokens, B = 1),
where the windows are padded (128 % 7 != 0). The table gives medians, the ratio to the reference and to the
strongest same-op baseline (reference, flex), tokens/s (B * N / time) and, on a GPU, the achieved rate of the
ideal traffic (q, k, v read and out written once: 4 tensors; fwd+bwd adds grad, q, k, v read and the three
grads written: 11) as a fraction of the measured copy bandwidth. A scaling sweep (B = 1, 2 heads, grids
14..224) is plotted log-log next to the results (``<device>-sema-scaling.png``): the windowed ops are linear
in N, global attention quadratic.

CPU target: >= 1.5x fwd+bwd over the reference at (16, 4, 56x56, d = 32) on 2 threads.

    python bench/bench_sema.py                                   # this machine's threads, float32
    python bench/bench_sema.py --threads 2 --backends reference,flex,sdpa
    python bench/bench_sema.py --device cuda --dtype bfloat16
    python bench/bench_sema.py --quick                           # tiny shapes, prints only (CI smoke)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import slimops  # noqa: E402,F401
from slimops import _backend  # noqa: E402
from slimops.ops import sema_attention  # noqa: E402
from slimops.reference import sema as ref  # noqa: E402

D, WINDOW = 32, 7
# (label, B, heads, grid)
SHAPES = [
    ("224 stage1", 16, 2, (56, 56)),
    ("224 stage1 4 heads (CPU target)", 16, 4, (56, 56)),
    ("224 stage2", 16, 4, (28, 28)),
    ("224 stage3", 16, 8, (14, 14)),
    ("512 stage1", 4, 2, (128, 128)),
    ("1024 stage1", 1, 2, (256, 256)),
]
TARGET = (16, 4, (56, 56))
SWEEP = [14, 28, 56, 112, 224]
QUICK_SHAPES = [("quick", 2, 2, (14, 14)), ("quick padded", 1, 2, (9, 11))]
QUICK_SWEEP = [7, 14, 21]
CONTENDERS = ("slimops", "reference", "flex", "sdpa")
DENSE_MASK_MAX_TOKENS = 4096  # create_block_mask materialises N x N; beyond, the analytic block tables
BLOCK = 128  # FlexAttention's default sparse block size


# ---- FlexAttention block masks ---------------------------------------------------------------------------


def mask_mod_for(grid, window, neighborhood):
    (gh, gw), (wh, ww) = grid, window
    if not neighborhood:
        def window_mask(b, h, qi, ki):
            return ((qi // gw) // wh == (ki // gw) // wh) & ((qi % gw) // ww == (ki % gw) // ww)
        return window_mask

    def neighborhood_mask(b, h, qi, ki):
        r0 = torch.clamp(qi // gw - wh // 2, 0, gh - wh)
        c0 = torch.clamp(qi % gw - ww // 2, 0, gw - ww)
        kr, kc = ki // gw, ki % gw
        return (kr >= r0) & (kr < r0 + wh) & (kc >= c0) & (kc < c0 + ww)
    return neighborhood_mask


def _query_ranges(grid, window, neighborhood, device):
    """Per query token: the [start, stop) rows and columns of the keys it sees."""
    (gh, gw), (wh, ww) = grid, window
    r = torch.arange(gh * gw, device=device) // gw
    c = torch.arange(gh * gw, device=device) % gw
    if neighborhood:
        r0, c0 = ref.neighborhood_start(r, wh, gh), ref.neighborhood_start(c, ww, gw)
        return r0, r0 + wh, c0, c0 + ww
    r0, c0 = r // wh * wh, c // ww * ww
    return r0, (r0 + wh).clamp(max=gh), c0, (c0 + ww).clamp(max=gw)


def analytic_block_tables(grid, window, neighborhood, device, chunk=64):
    """(partial, full) int8 (1, 1, q blocks, kv blocks) as ``_convert_mask_to_block_mask`` computes them from the
    dense mask, without it: each query sees a rectangle of the grid, so the number of queries of a query block
    that see each grid cell is (rows in range)^T @ (cols in range), summed per kv block."""
    (gh, gw) = grid
    n = gh * gw
    nb = -(-n // BLOCK)
    r0, r1, c0, c1 = _query_ranges(grid, window, neighborhood, device)
    rows, cols = torch.arange(gh, device=device), torch.arange(gw, device=device)
    rowin = ((rows >= r0[:, None]) & (rows < r1[:, None])).float()  # (N, gh)
    colin = ((cols >= c0[:, None]) & (cols < c1[:, None])).float()  # (N, gw)
    pad = nb * BLOCK - n
    rowin, colin = F.pad(rowin, (0, 0, 0, pad)), F.pad(colin, (0, 0, 0, pad))  # padded queries see nothing
    sums = []
    for s in range(0, nb, chunk):
        e = min(nb, s + chunk)
        ri = rowin[s * BLOCK:e * BLOCK].reshape(e - s, BLOCK, gh)
        ci = colin[s * BLOCK:e * BLOCK].reshape(e - s, BLOCK, gw)
        cnt = (ri.transpose(1, 2) @ ci).reshape(e - s, n)  # queries of the block that see each key
        sums.append(F.pad(cnt, (0, pad)).reshape(e - s, nb, BLOCK).sum(-1))
    total = torch.cat(sums)[None, None]
    full = total == BLOCK * BLOCK
    partial = (total > 0) & ~full
    return partial.to(torch.int8), full.to(torch.int8)


def block_mask_for(grid, window, neighborhood, device):
    from torch.nn.attention import flex_attention as fa

    n = grid[0] * grid[1]
    mm = mask_mod_for(grid, window, neighborhood)
    if n <= DENSE_MASK_MAX_TOKENS:
        return fa.create_block_mask(mm, None, None, n, n, device=device), "create_block_mask"
    tables = analytic_block_tables(grid, window, neighborhood, device)
    return fa._create_sparse_block_from_block_mask(tables, mm, (n, n), BLOCK, BLOCK), "analytic block tables"


def check_block_tables(device):
    """The analytic tables equal create_block_mask's on small grids (square, padded, both modes)."""
    from torch.nn.attention import flex_attention as fa

    for grid, window, nb in [((56, 56), (7, 7), False), ((23, 37), (7, 7), False), ((20, 30), (4, 6), True),
                             ((45, 45), (7, 7), True)]:
        n = grid[0] * grid[1]
        dense = fa.create_block_mask(mask_mod_for(grid, window, nb), None, None, n, n, device=device)
        fast = fa._create_sparse_block_from_block_mask(analytic_block_tables(grid, window, nb, device),
                                                       None, (n, n), BLOCK, BLOCK)
        for name in ("kv_num_blocks", "full_kv_num_blocks"):
            assert torch.equal(getattr(dense, name), getattr(fast, name)), (grid, window, nb, name)
        for cnt, a, b in ((dense.kv_num_blocks, dense.kv_indices, fast.kv_indices),
                          (dense.full_kv_num_blocks, dense.full_kv_indices, fast.full_kv_indices)):
            for qb in range(cnt.shape[-1]):
                k = int(cnt[0, 0, qb])
                assert torch.equal(a[0, 0, qb, :k].sort().values, b[0, 0, qb, :k].sort().values), (grid, qb)


# ---- contenders ----------------------------------------------------------------------------------------------


def sdpa_cost(b, h, n, d):
    """(GFLOP of one forward call, GiB of fp32 N x N logits if materialised) of global attention."""
    return 4.0 * b * h * n * n * d / 1e9, b * h * n * n * 4 / 2 ** 30


def memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30


def make_contenders(names, shape, window, neighborhood, device, args, flex_cache, backward=False):
    """{name: fn(q, k, v) -> out} for the contenders that can run here, and {name: reason} for those that cannot."""
    b, h, grid = shape
    n = grid[0] * grid[1]
    fns, skipped = {}, {}
    if "slimops" in names:
        if args.backend == "auto":
            why = None if _backend.resolve("sema_attention", "auto", device) != "reference" else \
                "auto falls back to the reference here: this build has no slimops kernel for the device"
        else:
            why = _backend.why_not("sema_attention", args.backend, device)
        if why:
            skipped["slimops"] = why
        else:
            fns["slimops"] = lambda q, k, v: sema_attention(q, k, v, grid, window, neighborhood=neighborhood,
                                                            backend=args.backend)
    if "reference" in names:
        fns["reference"] = lambda q, k, v: ref.sema_attention(q, k, v, grid, window, neighborhood)
    if "flex" in names and backward and device.type == "cpu":
        # Not tried: torch's CPU FlexAttention raises NotImplementedError for the backward, and trying it at the
        # 128 x 128-token shape got this 24 GiB machine's bench process OOM-killed first.
        skipped["flex"] = f"FlexAttention has no backward on CPU (torch {torch.__version__})"
    elif "flex" in names:
        try:
            from torch.nn.attention.flex_attention import flex_attention

            if "fn" not in flex_cache:
                flex_cache["fn"] = torch.compile(flex_attention, dynamic=False)
            t0 = time.perf_counter()
            bm, how = block_mask_for(grid, window, neighborhood, device)
            flex_cache["how"] = f"{how} ({time.perf_counter() - t0:.1f} s)"
            flex = flex_cache["fn"]
            fns["flex"] = lambda q, k, v: flex(q, k, v, block_mask=bm) + v.mean(dim=2, keepdim=True)
        except Exception as e:  # pragma: no cover - depends on the build
            skipped["flex"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    if "sdpa" in names:
        gflop, gib = sdpa_cost(b, h, n, D)
        if gflop > args.sdpa_max_gflop:
            skipped["sdpa"] = (f"global attention over N = {n} tokens costs {gflop:.0f} GFLOP per forward call "
                               f"(> --sdpa-max-gflop {args.sdpa_max_gflop:g})")
        elif gib > 0.5 * memory_gib(device):
            skipped["sdpa"] = f"its N x N logits would need {gib:.1f} GiB (> half of {memory_gib(device):.0f} GiB)"
        else:
            fns["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v) + v.mean(dim=2, keepdim=True)
    return fns, skipped


def _inputs(shape, device, dtype):
    b, h, grid = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    n = grid[0] * grid[1]
    return [torch.randn(b, h, n, D, generator=g).to(device, dtype) for _ in range(3)]


def _step(fn, qkv, backward):
    if not backward:
        def run():
            with torch.no_grad():
                fn(*qkv)
        return run
    leaves = [t.detach().requires_grad_() for t in qkv]
    grad = torch.randn_like(qkv[0])

    def run():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad)
    return run


def bench_shape(names, shape, window, neighborhood, device, dtype, backward, args, flex_cache):
    """({name: median ms}, {name: reason skipped}, {name: max |out - reference|})."""
    qkv = _inputs(shape, device, dtype)
    fns, skipped = make_contenders(names, shape, window, neighborhood, device, args, flex_cache, backward)
    steps, errs = {}, {}
    want = None
    for name, fn in fns.items():
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = fn(*qkv)
            if name != "sdpa":
                if want is None:
                    want = ref.sema_attention(*qkv, shape[2], window, neighborhood).float()
                errs[name] = (out.float() - want).abs().max().item()
            step = _step(fn, qkv, backward)
            step()  # warm up / compile; a contender that cannot run is reported, not fatal
            steps[name] = step
            dt = time.perf_counter() - t0
            if dt > 5:
                print(f"    ({name}: first calls took {dt:.0f} s: compile / warm-up)", flush=True)
        except Exception as e:  # pragma: no cover - depends on the machine
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            print(f"    {name}: cannot run ({skipped[name]})", flush=True)
    samples = common.time_side_by_side(steps, device, warmup=1, rounds=args.reps) if steps else {}
    return {k: common.median_ms(v) for k, v in samples.items()}, skipped, errs


def _label(shape):
    b, h, (gh, gw) = shape
    return f"{b}x{h}x{gh}x{gw}"


# ---- the scaling plot ------------------------------------------------------------------------------------------


def plot_scaling(sweep_rows, path, device_label, dtype):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = sorted({r[0] for r in sweep_rows}, key=["fwd", "fwd+bwd"].index)
    fig, axes = plt.subplots(1, len(passes), figsize=(6 * len(passes), 4.5), squeeze=False)
    for ax, p in zip(axes[0], passes):
        names = [c for c in CONTENDERS if any(r[0] == p and r[2] == c for r in sweep_rows)]
        for name in names:
            pts = sorted((r[1], r[3]) for r in sweep_rows if r[0] == p and r[2] == name)
            ax.loglog([x for x, _ in pts], [y for _, y in pts], "o-", label=name)
        xs = sorted({r[1] for r in sweep_rows if r[0] == p})
        ys = [r[3] for r in sweep_rows if r[0] == p]
        if xs and ys:
            y0 = min(ys)
            ax.loglog(xs, [y0 * x / xs[0] for x in xs], "k:", lw=1, label="slope 1 (linear)")
            ax.loglog(xs, [y0 * (x / xs[0]) ** 2 for x in xs], "k--", lw=0.7, label="slope 2 (quadratic)")
        ax.set_xlabel("tokens N (B = 1, 2 heads, d = 32, window 7)")
        ax.set_ylabel("median ms")
        ax.set_title(f"SEMA {p}, {dtype}, {device_label}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- main ------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch CPU threads (default: this machine's cores; the CPU target is stated for 2)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--backend", default="auto", help="slimops backend (auto, cpu, triton, reference)")
    ap.add_argument("--backends", default=None,
                    help="contenders to time, of " + ",".join(CONTENDERS) + " (default: all; e.g. reference,flex,sdpa)")
    ap.add_argument("--reps", "--rounds", dest="reps", type=int, default=None,
                    help="timed rounds (default: 5 on CPU, 30 on CUDA)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes and sweep for a smoke run; prints only (no results appended) and plots to a "
                         "temporary folder; FlexAttention only when named in --backends (its CPU compile is slow)")
    ap.add_argument("--neighborhood", action="store_true", help="also time the neighborhood=True mode")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the scaling sweep and its plot")
    ap.add_argument("--no-backward", dest="backward", action="store_false", help="forward only")
    ap.add_argument("--sdpa-max-gflop", type=float, default=None,
                    help="skip global SDPA above this many GFLOP per forward call (default: 100 on CPU, 20000 on CUDA)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to bench/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    args.reps = args.reps or (30 if device.type == "cuda" else 5)
    if args.sdpa_max_gflop is None:
        args.sdpa_max_gflop = 20000.0 if device.type == "cuda" else 100.0
    if args.backends is None:
        names = [c for c in CONTENDERS if not (args.quick and c == "flex")]
    else:
        names = [c.strip() for c in args.backends.split(",") if c.strip()]
    bad = [c for c in names if c not in CONTENDERS]
    if bad:
        ap.error(f"unknown contender(s) {bad}; expected some of {', '.join(CONTENDERS)}")
    write = not (args.no_write or args.quick)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    sweep = QUICK_SWEEP if args.quick else SWEEP
    modes = [False, True] if args.neighborhood else [False]
    passes = [False, True] if args.backward else [False]
    window = (WINDOW, WINDOW)
    bw = common.copy_bandwidth_gbs(device) if device.type == "cuda" else None
    elem = torch.finfo(dtype).bits // 8
    print(common.provenance(device), flush=True)
    if "flex" in names:
        try:
            check_block_tables(device)
            print("flex: analytic block tables == create_block_mask on the check grids", flush=True)
        except Exception as e:  # pragma: no cover
            print(f"flex: block-table check failed ({type(e).__name__}: {e})", flush=True)
            raise

    flex_cache: dict = {}
    notes = []
    target_ratio = None
    for nb in modes:
        rows = []
        mode = "neighborhood" if nb else "windows"
        for bwd in passes:
            pname = "fwd+bwd" if bwd else "fwd"
            for label, b, h, grid in shapes:
                shape = (b, h, grid)
                n = grid[0] * grid[1]
                print(f"[{mode} {pname}] {label} {_label(shape)} d={D} window {WINDOW}", flush=True)
                times, skipped, errs = bench_shape(names, shape, window, nb, device, dtype, bwd, args, flex_cache)
                baselines = {k: t for k, t in times.items() if k in ("reference", "flex")}
                best = min(baselines.values()) if baselines else float("nan")
                reft = times.get("reference", float("nan"))
                traffic = b * h * n * D * elem * (11 if bwd else 4)
                for name in names:
                    if name in times:
                        t = times[name]
                        rate = traffic / (t * 1e-3) / 1e9
                        row = [pname, label, _label(shape), name, t, reft / t, best / t, b * n / (t * 1e-3) / 1e6,
                               rate if bw is None else rate / bw,
                               errs.get(name, float("nan")) if name != "sdpa" else "(other op)",
                               flex_cache.get("how", "") if name == "flex" else ""]
                    elif name in skipped:
                        row = [pname, label, _label(shape), name, "skipped", "", "", "", "", "", skipped[name]]
                    else:
                        continue
                    rows.append(row)
                    print("   ", " | ".join(common._fmt(v) for v in row), flush=True)
                if bwd and not nb and shape == TARGET and "slimops" in times and "reference" in times:
                    target_ratio = times["reference"] / times["slimops"]
        if target_ratio is not None and device.type == "cpu":
            met = "MET" if target_ratio >= 1.5 else "NOT met"
            msg = (f"CPU target (>= 1.5x fwd+bwd over the reference at 16x4x56x56, d = 32, on 2 threads): {met} "
                   f"({target_ratio:.2f}x on {args.threads} threads)")
            print(msg, flush=True)
            notes.append(msg)
        rate_col = "GB/s (ideal traffic)" if bw is None else f"fraction of copy bandwidth ({bw:.0f} GB/s)"
        header = ["pass", "shape", "B x heads x grid", "contender", "median ms", "x reference",
                  "x best same-op baseline", "Mtokens/s", rate_col, "max abs err vs reference", "note"]
        note = (f"SEMA `{mode}` mode, window {WINDOW}, d = {D}, {args.dtype}, backend `{args.backend}`, medians of "
                f"{args.reps} interleaved rounds, {args.threads} threads. Same-op baselines: reference (partition + "
                "SDPA + mean) and flex (torch.compile'd FlexAttention with a window block mask, + mean); sdpa is "
                "global attention over all N tokens (quadratic), shown for scale. Mtokens/s counts B*N tokens. "
                + " ".join(notes))
        if write:
            path = common.write_results(device, f"sema_attention ({mode}), {args.dtype}", header, rows, note)
            print("results appended to", path)

    if args.sweep:
        sweep_rows = []
        sweep_names = names
        if device.type == "cpu" and "flex" in names:
            # Measured here: in this sweep CPU FlexAttention took 0.2 s at 56 x 56 tokens and 7.7 s at 112 x 112, and
            # the process was OOM-killed (24 GiB) at 224 x 224; its forward is in the tables above.
            sweep_names = [c for c in names if c != "flex"]
            print("sweep: FlexAttention left out on CPU (7.7 s at 112x112 tokens, out of memory at 224x224 here)")
        for bwd in passes:
            pname = "fwd+bwd" if bwd else "fwd"
            for s in sweep:
                shape = (1, 2, (s, s))
                print(f"[sweep {pname}] {_label(shape)}", flush=True)
                times, skipped, _ = bench_shape(sweep_names, shape, window, False, device, dtype, bwd, args,
                                                flex_cache)
                for name, t in times.items():
                    sweep_rows.append([pname, s * s, name, t])
                    print(f"    {name}: {t:.3g} ms", flush=True)
                for name, why in skipped.items():
                    print(f"    {name}: skipped ({why})", flush=True)
        folder = tempfile.mkdtemp(prefix="bench_sema_") if not write else common.RESULTS_DIR
        os.makedirs(folder, exist_ok=True)
        path = plot_scaling(sweep_rows, os.path.join(folder, f"{common.device_name(device)}-sema-scaling.png"),
                            common.device_name(device), args.dtype)
        print("scaling plot:", path, flush=True)
        if write:
            common.write_results(device, f"sema_attention scaling sweep (windows), {args.dtype}",
                                 ["pass", "tokens N (B=1, 2 heads)", "contender", "median ms"], sweep_rows,
                                 f"Plot: `{os.path.basename(path)}`. Window {WINDOW}, d = {D}, {args.threads} threads.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
