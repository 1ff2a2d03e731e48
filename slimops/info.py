"""`python -m slimops.info` (or `python -m slimops info`): versions, build flags, and the backends of
every op on this machine — the first thing to paste into a bug report."""
from __future__ import annotations

import json
import os
import platform
import sys

import torch

from slimops import _backend


def build_info() -> dict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except OSError:
        return {"note": f"{path} not found (built by an older setup.py or not built in place)"}


def cpu_isa() -> str:
    """The instruction set slimops' CPU kernels use in this process: base, avx2 or avx512 (csrc/cpu/isa.h: what
    the CPU has, capped by SLIMOPS_CPU_ISA)."""
    from slimops import _C

    return _C.cpu_isa()


def cpu_bf16_dot() -> bool:
    """Whether slimops' bfloat16 paths use the AVX512-BF16 dot products in this process (csrc/cpu/bf16_dot.h: the
    avx512 ISA, a CPU with AVX512_BF16, and SLIMOPS_CPU_BF16_DOT not set to 0). Today: kept_token_attention's
    forward."""
    from slimops import _C

    return bool(_C.cpu_bf16_dot())


def cpu_amx_bf16() -> bool:
    """Whether slimops' bfloat16 kernels may use AMX tiles in this process (csrc/cpu/amx_bf16.h: the avx512 ISA, a CPU
    with AMX-BF16 whose tiles the OS grants, SLIMOPS_CPU_AMX not 0). Today: kept_token_attention's forward products,
    and (with oneDNN) channel_conv's bf16 calls."""
    from slimops import _C

    return bool(_C.cpu_amx_bf16())


def cpu_bf16_conv_onednn() -> bool:
    """Whether channel_conv2d / masked_conv2d run their bfloat16 calls through oneDNN's convolution on AMX tiles
    (csrc/cpu/channel_conv_onednn.h: the avx512 ISA, a CPU with AMX-BF16 that the OS lets this process use, oneDNN
    not capped below AMX, SLIMOPS_CPU_BF16_CONV not ``direct``) instead of the float direct kernel."""
    from slimops import _C

    return bool(_C.cpu_bf16_conv_onednn())


def _cpuinfo_field(name: str) -> str | None:
    """The value of the first /proc/cpuinfo line named `name` (None where there is no such file or line)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set:
    """The CPU's feature flags as Linux lists them (/proc/cpuinfo; empty where there is none)."""
    return set((_cpuinfo_field("flags") or "").split())


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what ``platform`` knows where there is none."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_description() -> str:
    """Model name and the vector extensions that decide which library code runs: results from an AVX2 server, an
    AVX-512 one and one with AMX tiles (which oneDNN and torch's bf16 GEMMs use) are not comparable, so every
    benchmark header and bug report carries this."""
    flags = cpu_flags()
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
    have = [f for f in wanted if f in flags]
    return f"{cpu_model()} [{' '.join(have) if have else 'flags unknown'}]"


def kernel_isa() -> str:
    """The kernel copies that run for :func:`cpu_isa`: base, avx2 or avx512 (every kernel with ISA copies has all
    three, except channel_conv's direct convolution, which has avx2 and avx512 copies and leaves the base ISA to
    im2col + BLAS)."""
    isa = cpu_isa()
    if isa == "base":
        return "base"
    if isa == "avx2":
        return "avx2"
    return ("avx512 (spectral, sema, token_attention, distill, quant, prox, channel_conv"
            + ("; bf16 dot products" if cpu_bf16_dot() else "")
            + ("; bf16 attention products on AMX tiles" if cpu_amx_bf16() else "")
            + ("; bf16 convs on oneDNN/AMX" if cpu_bf16_conv_onednn() else "") + ")")


def ops() -> list[str]:
    return sorted({s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("slimops::")})


def report() -> str:
    import slimops

    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = "not installed"
    lines = [
        f"slimops {slimops.__version__}  ({os.path.dirname(slimops.__file__)})",
        f"python  {sys.version.split()[0]} on {platform.platform()}",
        f"torch   {torch.__version__} (CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()})",
        f"triton  {triton_v} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})",
        f"threads {torch.get_num_threads()}",
        f"cpu     {cpu_description()}",
        f"cpu ISA {cpu_isa()} (SLIMOPS_CPU_ISA={os.environ.get('SLIMOPS_CPU_ISA', 'unset')}): slimops runs its "
        f"{kernel_isa()} kernel copies; torch's capability {torch.backends.cpu.get_cpu_capability()}",
        "build   " + ", ".join(f"{k}={v}" for k, v in build_info().items()),
        "",
        f"{'op':<24} {'CPU kernel':<11} {'CUDA kernel':<12} {'backends on cpu':<28} auto on cuda",
    ]
    cpu = torch.device("cpu")
    for op in ops():
        lines.append(f"{op:<24} {str(_backend.has_kernel(op, 'CPU')):<11} {str(_backend.has_kernel(op, 'CUDA')):<12} "
                     f"{','.join(_backend.available(op, cpu)):<28} {_backend.AUTO_CUDA.get(op, '-')}")
    return "\n".join(lines)


def main(argv=None) -> None:
    print(report())


if __name__ == "__main__":
    main()
