"""Builds slimops._C with ninja through torch's BuildExtension.

CPU kernels always. CUDA kernels when torch has CUDA and a toolkit is found, or when
SLIMOPS_FORCE_CUDA=1 (compile and link without a GPU); never when SLIMOPS_DISABLE_CUDA=1.
MAX_JOBS, TORCH_CUDA_ARCH_LIST and DEBUG=1 are honoured. The build says which path it took and why.
"""
import glob
import os
import subprocess
import sys

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _gcc_avx512_header_warnings():
    """Flags that silence GCC 12.0-12.2's false warnings from its own AVX-512 headers (GCC bug 105593): their
    _mm512_undefined_* (`__m512 __Y = __Y;`) warn under -Wall, which Python's build flags pass, wherever an intrinsic
    that takes one is inlined (~150 warnings here, none about our variables). Empty for other compilers."""
    cxx = os.environ.get("CXX", "c++")
    try:
        banner = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
        version = subprocess.run([cxx, "-dumpfullversion"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    if "clang" in banner.lower() or not version.strip():
        return []
    parts = [int(p) for p in version.strip().split(".")[:2] if p.isdigit()]
    if len(parts) == 2 and parts[0] == 12 and parts[1] < 3:
        return ["-Wno-uninitialized", "-Wno-maybe-uninitialized"]
    return []


def _cuda_decision():
    """Returns (build_cuda, reason)."""
    import torch

    if _flag("SLIMOPS_DISABLE_CUDA"):
        return False, "SLIMOPS_DISABLE_CUDA=1"
    if torch.version.cuda is None:
        if _flag("SLIMOPS_FORCE_CUDA"):
            sys.exit("slimops build: SLIMOPS_FORCE_CUDA=1 but this torch (%s) is a CPU-only build" % torch.__version__)
        return False, "torch %s has no CUDA" % torch.__version__
    if CUDA_HOME is None:
        if _flag("SLIMOPS_FORCE_CUDA"):
            sys.exit("slimops build: SLIMOPS_FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if _flag("SLIMOPS_FORCE_CUDA"):
        return True, "SLIMOPS_FORCE_CUDA=1 (toolkit %s, torch CUDA %s)" % (CUDA_HOME, torch.version.cuda)
    if torch.cuda.is_available():
        return True, "a GPU is visible (toolkit %s, torch CUDA %s)" % (CUDA_HOME, torch.version.cuda)
    return False, "torch has CUDA but no GPU is visible and SLIMOPS_FORCE_CUDA is not set"


def _torch_cuda_include_dirs():
    """torch's pip wheels ship the CUDA headers it needs under site-packages/nvidia/cu*/include."""
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))


_BUILD_INFO = {}


def _record_build_info(build_cuda, reason, debug):
    """Remembers how this build was configured; BuildExt writes it next to the built library."""
    import torch

    _BUILD_INFO.update({
        "cuda_kernels": build_cuda,
        "reason": reason,
        "debug": debug,
        "torch_built_against": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_home": CUDA_HOME if build_cuda else None,
        "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if build_cuda else None,
        "max_jobs": os.environ.get("MAX_JOBS"),
    })


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's ninja BuildExtension, plus `_build_info.json` beside the built `_C` library (in place for
    `pip install -e .`, under --build-lib otherwise) for `python -m slimops.info`."""

    def run(self):
        import json

        super().run()
        out_dir = os.path.dirname(self.get_ext_fullpath("slimops._C"))
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "_build_info.json"), "w") as f:
            json.dump(_BUILD_INFO, f, indent=2)


def _extensions():
    debug = _flag("DEBUG")
    build_cuda, reason = _cuda_decision()
    print("slimops build: %s kernels (%s)%s" % ("CPU + CUDA" if build_cuda else "CPU", reason,
                                                ", DEBUG" if debug else ""), flush=True)
    _record_build_info(build_cuda, reason, debug)
    sources = ["csrc/registration.cpp", "csrc/python_module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # No -std here: torch's BuildExtension adds the standard its headers need (C++20 for torch >= 2.13).
    # -fopenmp (when torch itself uses OpenMP): at::parallel_for is an inline template over OpenMP, and
    # compiled without it the CPU kernels run on one thread. The loader shares the libgomp.so.1 that
    # torch already loaded (same soname), so there is one OpenMP runtime.
    import torch

    omp = ["-fopenmp"] if torch.backends.openmp.is_available() and sys.platform.startswith("linux") else []
    # -fno-math-errno: sqrt (AdamW's denominator, the group norms) may then compile to the vector instruction;
    # with errno semantics GCC keeps a scalar call per element. Nothing here reads errno.
    cxx = opt + ["-fno-math-errno", "-fdiagnostics-color=always"] + omp + _gcc_avx512_header_warnings()
    extra = {"cxx": cxx}
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc", "include")], py_limited_api=True, extra_link_args=omp)
    if build_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
        kwargs["include_dirs"] += _torch_cuda_include_dirs()
        ext = CUDAExtension("slimops._C", sources, extra_compile_args=extra, **kwargs)
    else:
        ext = CppExtension("slimops._C", sources, extra_compile_args=extra, **kwargs)
    return [ext]


setup(
    name="slimops",
    packages=find_packages(include=["slimops", "slimops.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
