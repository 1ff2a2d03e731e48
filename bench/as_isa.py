"""Runs a benchmark as on a CPU whose widest vector ISA is the one given: slimops' kernels and the libraries its
baselines run on are capped alike, so that a ratio measured here is the ratio an older or smaller server would show
(issue 16: targets must hold on AVX2 and AVX-512 machines alike, and the machines we get vary).

    python bench/as_isa.py avx2 bench/bench_channel_conv.py --keeps 0.5,0.9
    python bench/as_isa.py base bench/bench_sema.py --no-sweep

What is capped (environment variables, set before the benchmark's process starts):
  SLIMOPS_CPU_ISA       slimops' CPU kernel copies (csrc/cpu/isa.h)
  ONEDNN_MAX_CPU_ISA    oneDNN: torch's CPU convolutions, and the matmuls it routes there
  ATEN_CPU_CAPABILITY   ATen's vectorised kernels (SDPA's flash attention, softmax, elementwise, FFT pre/post-passes)
  MKL_ENABLE_INSTRUCTIONS   MKL's BLAS and FFT (on AMD CPUs MKL runs its AVX2 path whatever this says)
The results go to bench/results/<device>-as-<isa>.md (common.device_name reads SLIMOPS_BENCH_AS_ISA), and the
provenance line of every table says what was capped. This emulates the ISA, not the microarchitecture: an AVX2-only
CPU has other caches, clocks and port counts, so these tables complement, not replace, runs on such machines.
"""
from __future__ import annotations

import os
import subprocess
import sys

CAPS = {
    "avx512": {},  # the widest ISA slimops has copies for: nothing capped
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "base": {"ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] not in CAPS:
        print(f"usage: python bench/as_isa.py {{{','.join(CAPS)}}} BENCH.py [its options]", file=sys.stderr)
        return 2
    isa, script, rest = argv[0], argv[1], argv[2:]
    env = dict(os.environ, SLIMOPS_CPU_ISA=isa, SLIMOPS_BENCH_AS_ISA=isa, **CAPS[isa])
    env.pop("SLIMOPS_CPU_BASE_ISA", None)
    return subprocess.call([sys.executable, script] + rest, env=env)


if __name__ == "__main__":
    sys.exit(main())
