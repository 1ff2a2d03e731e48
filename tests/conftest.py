"""Shared fixtures and helpers of the slimops test suite.

Tolerance principle (DESIGN.md "Testing rules"):

- float64 and float32 results are compared with their reference twin with tight tolerances
  (``TOL[dtype]``): the kernel and the reference compute the same formula in the same accumulation
  dtype, so they differ only by reassociation and libm differences.
- bfloat16/float16 results are compared against a float64 "truth" (the reference computed on float64
  copies of the inputs); the kernel's error must be at most ``2 x`` the error of the reference
  computed in that same low-precision dtype, plus a small absolute floor (the principle of the
  flash-attention test suite). See :func:`assert_close_lowp`.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import random

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter where no GPU is visible. It must be switched
# on before anything imports triton, i.e. before test modules are collected.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import slimops  # noqa: F401  (registers torch.ops.slimops.*)

HAS_CUDA = torch.cuda.is_available()

# (rtol, atol) for kernel-vs-reference comparisons of the same-dtype computation.
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
    # used only when a low-precision result is compared directly (e.g. two kernels that must agree
    # up to one rounding of the stored value); prefer assert_close_lowp.
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 1e-3),
}

LOWP = (torch.bfloat16, torch.float16)
ALL_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# The absolute error floor of the "2x the reference's error" comparison: a small multiple of the dtype's
# epsilon (float32/float64 entries for results stored in those dtypes, e.g. AdamW's float32 step counts).
LOWP_FLOOR = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-6, torch.float64: 1e-12}


def pytest_addoption(parser, pluginmanager):
    # pyproject's `timeout` / `timeout_method` belong to pytest-timeout (the per-test backstop). Without the
    # plugin, declare them here so that pytest does not warn about unknown keys (or fail under --strict-config):
    # the suite still runs, only without the backstop (the header says so).
    if not pluginmanager.has_plugin("timeout"):
        parser.addini("timeout", "per-test timeout (needs pytest-timeout; ignored without it)")
        parser.addini("timeout_method", "pytest-timeout's method (ignored without it)")


def pytest_report_header(config):
    if not config.pluginmanager.has_plugin("timeout"):
        return "pytest-timeout is not installed: no per-test timeout (pip install pytest-timeout)"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: longer runs")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def seed_all(seed: int = 0) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state (fresh but reproducible inputs)."""
    seed_all(1234)
    yield


def devices() -> list[str]:
    """The devices tests run on: the CPU, plus CUDA when a GPU is present."""
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


def device_params():
    """``devices()`` as pytest params, the CUDA one marked ``gpu``."""
    return [pytest.param(d, marks=pytest.mark.gpu) if d == "cuda" else d for d in ["cpu", "cuda"]]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """Same-dtype comparison with the tolerances of ``TOL`` (dtype of ``expected``)."""
    rtol, atol = TOL[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True,
                               msg=(lambda m: f"{msg}\n{m}") if msg else None)


def assert_close_lowp(actual: torch.Tensor, ref_lowp: torch.Tensor, ref_f64: torch.Tensor, msg: str = "",
                      factor: float = 2.0, floor: float | None = None) -> None:
    """flash-attention's principle for bf16/fp16: |actual - truth| <= factor * |ref_lowp - truth| + floor,
    checked on the max norm, with truth the float64 reference."""
    floor = LOWP_FLOOR[actual.dtype] if floor is None else floor
    truth = ref_f64.double()
    if truth.numel() == 0:
        assert actual.shape == truth.shape
        return
    err = (actual.double() - truth).abs().max().item()
    ref_err = (ref_lowp.double() - truth).abs().max().item()
    assert err <= factor * ref_err + floor, f"{msg}: kernel error {err:.3g} > {factor} x reference error {ref_err:.3g} + {floor:g}"


def compare(actual: torch.Tensor, ref_same: torch.Tensor, ref_f64: torch.Tensor | None = None, msg: str = "") -> None:
    """Dispatches to ``assert_close`` (fp32/fp64) or ``assert_close_lowp`` (bf16/fp16)."""
    assert actual.dtype == ref_same.dtype, msg
    assert actual.shape == ref_same.shape, msg
    if actual.dtype in LOWP:
        assert ref_f64 is not None
        assert_close_lowp(actual, ref_same, ref_f64, msg)
    else:
        assert_close(actual, ref_same, msg)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: more threads only add fork/join and spin overhead (badly
    so on a busy 2-core CI machine). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """Files the CLI bad-input tests point commands at, made without training: a freshly built digits VGG-11
    (width 0.25) as dense.pt, its 50% plan and pruned.pt, a plan of another model, garbage, an empty file, a
    folder named like a file, a JSON that is not a plan, and a crafted pickle whose payload would create
    ``PWNED`` in the folder."""
    from slimops.models import build
    from slimops.pruning import compact, plan_from_bn
    from slimops.pruning.pipeline import save_model_file

    d = tmp_path_factory.mktemp("cli_files")
    torch.manual_seed(0)
    net = build("vgg11", num_classes=10, in_channels=1, width=0.25)
    save_model_file(str(d / "dense.pt"), net, kind="dense")
    plan = plan_from_bn(net, 0.5)
    plan.save(str(d / "plan.json"))
    save_model_file(str(d / "pruned.pt"), compact(net, plan), kind="pruned", plan=plan)
    plan_from_bn(build("vgg13", num_classes=10, in_channels=1, width=0.25), 0.5).save(str(d / "other-plan.json"))
    (d / "garbage.pt").write_bytes(b"\x00not a torch file" * 40)
    (d / "empty.pt").write_bytes(b"")
    (d / "folder.pt").mkdir()
    (d / "not-a-plan.json").write_text('{"format": "slimops-plan", "version": 1, "layers": 3}')

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {d / 'PWNED'}",))

    torch.save({"format": "slimops-model", "version": 1, "kind": "dense", "x": Payload()}, d / "evil.pt")
    return d


def triton_family(name: str):
    """The preamble of a Triton family's tests: ``(slimops.triton.<name> or None, interpreted, device, skip mark)``.
    The kernels run on CPU tensors through the interpreter (switched on above, before this import, when no GPU is
    visible) or compiled on CUDA tensors; without triton, or with neither, the mark skips the module."""
    reason = "needs triton, and TRITON_INTERPRET=1 (set before triton is imported) or a GPU"
    if importlib.util.find_spec("triton") is None:
        return None, False, "cuda", pytest.mark.skipif(True, reason=reason)
    from slimops.triton import _common

    interpreted = _common.INTERPRETED
    mark = pytest.mark.skipif(not (interpreted or torch.cuda.is_available()), reason=reason)
    return importlib.import_module(f"slimops.triton.{name}"), interpreted, "cpu" if interpreted else "cuda", mark


@pytest.fixture
def no_matmul_tf32():
    """Compiled float32 runs on a GPU: torch's TF32 matmul flag off, so the Triton fp32 dots take the modules'
    fp32-class default (3xTF32) and cuBLAS's products stay fp32. A no-op in the interpreter."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture
def cuda_or_skip():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    return "cuda"


# Intra-op threads per test process. `make test` runs the suite in pytest-xdist workers (`-n 2` on a 2-core CI
# machine), each of which gets its share of the cores: two workers of two OpenMP threads each on two cores spin
# against each other (a 78 s training test took 210 s that way). Tests that train "on every core" use
# TEST_THREADS, not os.cpu_count(). SLIMOPS_TEST_THREADS overrides it.
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
TEST_THREADS = max(1, len(os.sched_getaffinity(0)) // max(1, XDIST_WORKERS))
if os.environ.get("SLIMOPS_TEST_THREADS"):
    TEST_THREADS = int(os.environ["SLIMOPS_TEST_THREADS"])
    torch.set_num_threads(TEST_THREADS)
elif XDIST_WORKERS > 1:
    torch.set_num_threads(TEST_THREADS)
    # and the `python -m slimops` processes tests start (torchrun sets 1 for its workers itself)
    os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS))
