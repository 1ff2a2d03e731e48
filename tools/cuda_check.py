"""Checks a CUDA build of slimops: every op in the `slimops` namespace has a CUDA kernel registered.

Usage: python tools/cuda_check.py path/to/_C.abi3.so

Loads the library (no GPU needed: registration happens at load time), lists the ops its
TORCH_LIBRARY(slimops) block declared, and fails listing every op without a CUDA kernel, unless the
op is in TRITON_GPU_ONLY (ops that by design have no CUDA C++ kernel: their GPU backend is Triton).
"""
import sys

import torch

# Ops whose GPU backend is Triton (slimops/triton), not a CUDA C++ kernel.
TRITON_GPU_ONLY: set = {"channel_conv2d", "channel_conv2d_backward", "masked_conv2d", "masked_conv2d_backward",
                        "sema_attention", "sema_attention_backward", "fake_quantize", "fake_quantize_backward",
                        "kept_token_attention", "kept_token_attention_backward",
                        "feature_affinity_loss", "feature_affinity_loss_backward"}


def main(path: str) -> int:
    torch.ops.load_library(path)
    ops = sorted({s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("slimops::")})
    if not ops:
        print(f"cuda-check: {path} registered no slimops ops")
        return 1
    has = {op: torch._C._dispatch_has_kernel_for_dispatch_key(f"slimops::{op}", "CUDA") for op in ops}
    missing = [op for op in ops if op not in TRITON_GPU_ONLY and not has[op]]
    for op in ops:
        state = ("CUDA kernel" if has[op] else "no CUDA C++ kernel by design (GPU backend: Triton)"
                 if op in TRITON_GPU_ONLY else "MISSING")
        print(f"  slimops::{op:<24} {state}")
    print(f"cuda-check: torch {torch.__version__} (CUDA {torch.version.cuda}), {len(ops)} ops, "
          f"{sum(has.values())} with CUDA kernels, {len(ops) - sum(has.values()) - len(missing)} Triton-only by design, "
          f"{len(missing)} missing")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
