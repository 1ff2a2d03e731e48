"""Every op has the whole anatomy (issue 18 item 2; README "Adding an op"): this test enumerates every schema the
compiled ``TORCH_LIBRARY(slimops)`` block registers, so an op added without one of its parts fails here by name.

For each ``slimops::<op>``:
- a backend entry (``slimops._backend.AUTO_CUDA``) and a Triton declaration ``slimops_triton::<op>`` whose schema
  has exactly the C++ schema's arguments and returns;
- a fake kernel in both namespaces (``torch.compile`` and opcheck's fake-tensor test need it);
- autograd in both namespaces when the op is differentiable (it has a ``<op>_backward`` op);
- a reference twin ``slimops.reference.<family>.<op>``;
- a benchmark that times it (its name in ``bench/bench_<family>.py``);
- a passing ``torch.library.opcheck`` (schema, fake tensor, autograd registration) on a real call: the calls
  are recorded while the public ops run forward and backward on small inputs, so backward ops are checked on
  exactly the arguments autograd gives them.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import slimops.ops as P
from slimops import _backend

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLIMOPS = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("slimops::"))


def family(op: str) -> str:
    return _backend._TRITON_MODULES[op].rsplit(".", 1)[1]


def forward_of(op: str) -> str:
    return op[: -len("_backward")] if op.endswith("_backward") else op


def differentiable(op: str) -> bool:
    return f"{op}_backward" in SLIMOPS


def _triton_or_skip(op):
    if not _backend.triton_importable():
        pytest.skip("triton is not installed")
    return _backend.triton_op(op)


def test_the_library_registers_the_ops_we_know():
    assert len(SLIMOPS) == 25
    assert set(SLIMOPS) == set(_backend.AUTO_CUDA), "every op needs a backend entry (slimops/_backend.py)"


def _signature(schema):
    args = [(a.name, str(a.type), a.kwarg_only, repr(a.default_value) if a.has_default_value() else None,
             bool(a.alias_info and a.alias_info.is_write)) for a in schema.arguments]
    return args, [str(r.type) for r in schema.returns]


@pytest.mark.parametrize("op", SLIMOPS)
def test_triton_declaration_has_the_cpp_schema(op):
    triton = _triton_or_skip(op)
    assert _signature(triton.default._schema) == _signature(getattr(torch.ops.slimops, op).default._schema)


@pytest.mark.parametrize("op", SLIMOPS)
def test_fake_and_autograd_are_registered(op):
    from torch._library import simple_registry

    namespaces = ["slimops"] + (["slimops_triton"] if _backend.triton_importable() else [])
    if len(namespaces) == 2:
        _backend.triton_op(op)  # imports the family's Triton module (its registrations)
    for ns in namespaces:
        qualname = f"{ns}::{op}"
        assert simple_registry.singleton.find(qualname).fake_impl.kernel is not None, f"{qualname}: no fake kernel"
        assert has_autograd(qualname) == differentiable(op), \
            f"{qualname}: autograd {has_autograd(qualname)}, differentiable {differentiable(op)}"


def has_autograd(qualname: str) -> bool:
    """A registered backward: the Autograd kernel of a C++-schema op; for a ``torch.library.custom_op`` (which
    always has an Autograd kernel, one that refuses to differentiate) its registered backward function."""
    from torch._library.custom_ops import OPDEFS

    if qualname in OPDEFS:
        return OPDEFS[qualname]._backward_fn is not None
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd")


@pytest.mark.parametrize("op", SLIMOPS)
def test_reference_twin_and_benchmark_exist(op):
    ref = importlib.import_module(f"slimops.reference.{family(op)}")
    assert callable(getattr(ref, op, None)), f"slimops.reference.{family(op)} has no twin of {op}"
    bench = os.path.join(ROOT, "bench", f"bench_{family(op)}.py")
    with open(bench) as f:
        assert forward_of(op) in f.read(), f"{bench} does not time {forward_of(op)}"


# ---- opcheck on recorded calls ---------------------------------------------------------------------------------

class _Record(TorchDispatchMode):
    """Records the first call of every slimops:: op (arguments cloned before the op runs: in-place ops)."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "slimops" and func.__name__.split(".")[0] not in self.calls:
            clone = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
            tree = torch.utils._pytree.tree_map(clone, (args, kwargs))
            self.calls[func.__name__.split(".")[0]] = (func, *tree)
        return func(*args, **kwargs)


def _t(*shape, grad=False, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _run_every_public_op():
    """One forward (+ backward where differentiable) of every public op, on the C++ CPU backend."""
    outs = []
    outs.append(P.prox(_t(4, 3, grad=True), "tl1", 0.2, a=1.0, backend="cpu"))
    shapes = [(3,), (2, 4)]
    mk = lambda: [_t(*s) for s in shapes]  # noqa: E731
    P.prox_sgd_(mk(), mk(), mk(), lr=0.1, momentum=0.9, penalty="l1", lam=0.1, backend="cpu")
    P.prox_adamw_(mk(), mk(), [torch.zeros(s, dtype=torch.float64) for s in shapes],
                  [torch.zeros(s, dtype=torch.float64) for s in shapes],
                  [torch.zeros(s, dtype=torch.float64) for s in shapes], [torch.tensor(0.0), torch.tensor(0.0)],
                  lr=0.1, amsgrad=True, penalty="l1", lam=0.1, backend="cpu")
    P.palm_slimming_(mk(), mk(), alpha=10.0, beta=1.0, lam=0.1, penalty="l1", backend="cpu")
    P.penalty_grad_(mk(), mk(), penalty="tl1", s=0.1, backend="cpu")
    P.split_step_(mk(), mk(), mk(), lr=0.1, beta=1.0, penalty="l0", lam=0.1, backend="cpu")
    x, w, b = _t(2, 5, 6, 6, grad=True), _t(4, 5, 3, 3, grad=True), _t(4, grad=True)
    outs.append(P.channel_conv2d(x, w, b, torch.tensor([0, 3, 4]), torch.tensor([1, 2]), 1, 1, 1, backend="cpu"))
    mask = torch.tensor([[True, False, True, True], [False, False, True, False]])
    outs.append(P.masked_conv2d(x, w, b, mask, 1, 1, 1, backend="cpu"))
    outs.append(P.spectral_filter(_t(2, 5, 6, 4, grad=True), _t(5, 4, 4, 2, grad=True), backend="cpu"))
    blocks, cb = 2, 2
    outs.append(P.adaptive_spectral_filter(_t(2, 5, 6, 4, grad=True), _t(2, blocks, cb, cb, grad=True) * 0.3,
                                           _t(2, blocks, cb, grad=True) * 0.1, _t(2, blocks, cb, cb, grad=True) * 0.3,
                                           _t(2, blocks, cb, grad=True) * 0.1, blocks=blocks, backend="cpu"))
    q, k, v = (_t(1, 2, 16, 4, grad=True) for _ in range(3))
    outs.append(P.sema_attention(q, k, v, grid=(4, 4), window=2, backend="cpu"))
    outs.append(P.fda_sign(_t(3, 5, grad=True), n_terms=4, omega=0.5, surrogate="fda", clip=2.0, backend="cpu"))
    xq, sq, zq = _t(4, 5, grad=True), (torch.rand(4, dtype=torch.float64) * 0.2 + 0.05).requires_grad_(), \
        torch.full((4,), 3.0, dtype=torch.float64, requires_grad=True)
    outs.append(P.fake_quantize(xq, sq, zq, bits=3, per_channel_axis=0, signed=False, grad_factor=0.5, backend="cpu"))
    q, k, v = _t(2, 2, 6, 4, grad=True), _t(2, 2, 5, 4, grad=True), _t(2, 2, 5, 4, grad=True)
    outs.append(P.kept_token_attention(q, k, v, torch.tensor([4, 0, 2]), torch.tensor([[1, 3], [0, 4]]), backend="cpu"))
    fs, ft = _t(2, 3, 4, 5, grad=True), _t(2, 2, 4, 5, grad=True)
    outs.append(P.feature_affinity_loss(fs, ft, norm="l1", reduction="none", backend="cpu"))
    sum(o.sum() for o in outs).backward()


@pytest.fixture(scope="module")
def recorded():
    rec = _Record()
    with rec:
        _run_every_public_op()
    return rec.calls


@pytest.mark.parametrize("op", SLIMOPS)
def test_opcheck_on_a_recorded_call(recorded, op):
    assert op in recorded, f"no public op calls slimops::{op} (add it to _run_every_public_op)"
    func, args, kwargs = recorded[op]
    torch.library.opcheck(func, args, kwargs,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ---- the import picture (issue 18 item 1): Triton is a peer backend of the C++ kernels, below nothing but opdefs -----


def _imports(path):
    """(module, names) of every import statement in ``path``, plus importlib.import_module("...") strings."""
    import ast

    tree = ast.parse(open(path).read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            found.append((node.args[0].value, []))
    return found


def _modules(package):
    folder = os.path.join(ROOT, "slimops", package)
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".py"))


@pytest.mark.parametrize("path", _modules("triton"), ids=os.path.basename)
def test_triton_modules_import_no_ops_and_no_sibling(path):
    """No module under slimops/triton imports slimops.ops; a kernel file takes shared helpers from
    slimops.triton._common, never from a sibling kernel file."""
    me = os.path.basename(path)[:-3]
    for module, names in _imports(path):
        assert not (module == "slimops.ops" or module.startswith("slimops.ops.")), f"{me} imports {module}"
        if module == "slimops.triton":
            siblings = [n for n in names if n not in ("_common", "interpreting", "is_available")]
            assert not siblings, f"{me} imports the sibling kernel module(s) {siblings}"
        elif module.startswith("slimops.triton."):
            assert module == "slimops.triton._common", f"{me} imports the sibling kernel module {module}"


@pytest.mark.parametrize("path", _modules("opdefs"), ids=os.path.basename)
def test_opdefs_sit_below_ops_and_triton(path):
    """slimops.opdefs is the layer both backends stand on: it imports neither of them."""
    for module, _ in _imports(path):
        for above in ("slimops.ops", "slimops.triton", "slimops.nn", "slimops.pruning"):
            assert not (module == above or module.startswith(above + ".")), f"{os.path.basename(path)} imports {module}"


def test_the_import_rule_test_can_fail(tmp_path):
    """The checker above sees each form of the forbidden imports."""
    bad = tmp_path / "bad.py"
    bad.write_text("from slimops.ops import prox\nfrom slimops.triton.prox import _fail\n"
                   "import importlib\nimportlib.import_module('slimops.ops.prox')\n")
    modules = [m for m, _ in _imports(str(bad))]
    assert modules == ["slimops.ops", "slimops.triton.prox", "importlib", "slimops.ops.prox"]
