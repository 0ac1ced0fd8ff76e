"""The eager entry's C++ autograd node (bnfast/csrc/autograd_node.cpp, built by bnfast.native) against the
torch.autograd.Function entry it replaces where it can be built: the same bits in every output, gradient and
buffer, on both launch plans, and the autograd behaviours a torch node has (saved-tensor hooks, version checks,
freeing after backward, double backward, forward-mode AD refused, errors in the backward surfacing as raised).
"""

import gc
import os
import subprocess
import sys
import weakref

import pytest
import torch
from parity import DEVICE

import bnfast
from bnfast import native, ops
from bnfast.testing import eager_entry

pytestmark = pytest.mark.skipif(
    native._compiler() is None and ops.native_node() is None, reason="no C++ compiler: the node cannot be built"
)


def test_the_node_is_built_where_a_compiler_is():
    """Where a C++ compiler is on PATH the eager entry is the node (so every other test file runs through it)."""
    assert ops.native_node() is not None, native.reason()
    x = torch.randn(4, 3, device=DEVICE, requires_grad=True)
    y = bnfast.FusedBatchNorm1d(3, device=DEVICE)(x)
    assert y.grad_fn.name() == "BatchNormBackward"


def _case(
    shape,
    *,
    dtype=torch.float32,
    activation="relu",
    residual=False,
    wants=(True, True, True, True),
    training=True,
    affine=True,
    track=True,
    layout=None,
    virtual_batch_size=None,
    masked=False,
):
    """A module, its inputs, dy and mask (seeded), for one call."""
    torch.manual_seed(0)
    cls = {2: bnfast.FusedBatchNorm1d, 3: bnfast.FusedBatchNorm1d, 4: bnfast.FusedBatchNorm2d}[len(shape)]
    kwargs = {} if virtual_batch_size is None else {"virtual_batch_size": virtual_batch_size}
    m = cls(
        shape[1], activation=activation, affine=affine, track_running_stats=track, device=DEVICE, dtype=dtype, **kwargs
    )
    if affine:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
        m.weight.requires_grad_(wants[1])
        m.bias.requires_grad_(wants[2])
    m.train(training)
    x = (torch.randn(shape, dtype=dtype, device=DEVICE) * 3 + 2).requires_grad_(wants[0])
    if layout == "channels_last":
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_(wants[0])
    r = torch.randn(shape, dtype=dtype, device=DEVICE).requires_grad_(wants[3]) if residual else None
    mask = None
    if masked:
        mask = torch.rand((shape[0], *shape[2:]), device=DEVICE) > 0.3
        mask.view(-1)[:2] = True
    return m, x, r, torch.randn(shape, dtype=dtype, device=DEVICE), mask


def _step(entry, case, **call):
    """y, the gradients of every input that wants one, the buffers; through `entry`."""
    m, x, r, dy, mask = case
    with eager_entry(entry):
        y = m(x, r, mask, **call)
        if y.requires_grad:  # the entry asked for is the one that ran
            assert (y.grad_fn.name() == "BatchNormBackward") == (entry == "native"), y.grad_fn.name()
        leaves = [t for t in (x, m.weight, m.bias, r) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(y, leaves, dy, allow_unused=True) if y.requires_grad else ()
    return y, grads, [b.clone() for b in m.buffers()]


def _assert_same(a, b):
    ya, ga, ba = a
    yb, gb, bb = b
    for u, v in zip((ya, *ga, *ba), (yb, *gb, *bb), strict=True):
        assert (u is None) == (v is None)
        if u is not None:
            torch.testing.assert_close(u, v, rtol=0, atol=0)  # the same bits
            assert u.stride() == v.stride()


CASES = {
    "train-relu": {},
    "eval": {"training": False},
    "residual-act": {"residual": True},
    "residual-no-act": {"residual": True, "activation": None},
    "only-x": {"wants": (True, False, False, False)},
    "only-weight": {"wants": (False, True, False, False), "residual": True},
    "only-residual": {"wants": (False, False, False, True), "residual": True},
    "no-affine": {"affine": False},
    "no-running-stats": {"track": False},
    "bf16-silu": {"dtype": torch.bfloat16, "activation": "silu"},
    "float64": {"dtype": torch.float64},
    "channels-last": {"shape": (2, 3, 4, 5), "layout": "channels_last"},
    "ghost": {"shape": (8, 3), "virtual_batch_size": 2},
    "masked": {"shape": (4, 3, 5), "masked": True},
}


@pytest.mark.parametrize("name", CASES)
def test_node_equals_function(name, kernel_path):
    kwargs = dict(CASES[name])
    shape = kwargs.pop("shape", (6, 3, 5))
    call = {"pad_value": 0.5} if kwargs.get("masked") else {}
    native_run = _step("native", _case(shape, **kwargs), **call)
    function_run = _step("function", _case(shape, **kwargs), **call)
    _assert_same(native_run, function_run)


def test_no_grad_and_inference_mode_make_no_node():
    m, x, r, dy, _ = _case((6, 3))
    with eager_entry("native"):
        with torch.no_grad():
            assert m(x).grad_fn is None
        with torch.inference_mode():
            assert not m(x).requires_grad
        x.requires_grad_(False)
        assert m(x).grad_fn is not None  # the weight and bias still want gradients
        m.requires_grad_(False)
        assert m(x).grad_fn is None


def test_double_backward_matches_function():
    """create_graph=True: the backward runs torch's ops (ops._backward_torch), differentiable again."""
    outs = []
    for entry in ("native", "function"):
        m, x, r, dy, _ = _case((6, 3), dtype=torch.float64, activation="silu")
        with eager_entry(entry):
            y = m(x)
            (gx,) = torch.autograd.grad(y, x, dy, create_graph=True)
            (ggx,) = torch.autograd.grad(gx.square().sum(), x)
        outs.append((gx.detach(), ggx))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_gradcheck_through_the_node():
    m, x, r, dy, _ = _case((5, 3), dtype=torch.float64, residual=True, activation="gelu")
    with eager_entry("native"):
        assert torch.autograd.gradcheck(lambda x, r: m(x, r), (x, r), fast_mode=True)


def test_saved_tensor_hooks_see_what_the_function_saves():
    counts = {}
    for entry in ("native", "function"):
        packed = []
        m, x, r, dy, _ = _case((6, 3), residual=True)

        def pack(t, packed=packed):
            packed.append(t.shape)
            return t

        with eager_entry(entry), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = m(x, r)
        y.backward(dy)
        counts[entry] = sorted(packed)
    assert counts["native"] == counts["function"] and counts["native"]


@pytest.mark.parametrize("entry", ["native", "function"])
def test_backward_twice_and_inplace_change_raise_torchs_errors(entry):
    m, x, r, dy, _ = _case((6, 3))
    with eager_entry(entry):
        y = m(x)
        y.backward(dy)
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            y.backward(dy)
        y = m(x)
        with torch.no_grad():
            x.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward(dy)


def test_retain_graph_runs_twice_alike():
    m, x, r, dy, _ = _case((6, 3))
    with eager_entry("native"):
        y = m(x)
        y.backward(dy, retain_graph=True)
        first = x.grad.clone()
        y.backward(dy)
    torch.testing.assert_close(x.grad, 2 * first, rtol=0, atol=0)


def test_forward_mode_ad_is_refused_as_by_the_function():
    import torch.autograd.forward_ad as fwAD

    errors = {}
    for entry in ("native", "function"):
        m, x, r, dy, _ = _case((6, 3), wants=(False, False, False, False))
        with eager_entry(entry), fwAD.dual_level():
            dual = fwAD.make_dual(x, torch.ones_like(x))
            with pytest.raises(Exception) as info:
                m(dual)
        errors[entry] = (type(info.value), str(info.value))
    assert errors["native"] == errors["function"]


def test_undefined_output_gradient_is_zeros_as_the_function_makes_it():
    class DropsGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.clone()

        @staticmethod
        def backward(ctx, g):
            return None

    outs = {}
    for entry in ("native", "function"):
        m, x, r, dy, _ = _case((6, 3))
        with eager_entry(entry):
            y = m(x)
        (DropsGrad.apply(y).sum() + (x * 2).sum()).backward()
        outs[entry] = (x.grad, m.weight.grad, m.bias.grad)
    torch.testing.assert_close(outs["native"], outs["function"], rtol=0, atol=0)


def test_an_error_in_the_backward_surfaces_with_its_type(monkeypatch):
    m, x, r, dy, _ = _case((6, 3))
    with eager_entry("native"):
        y = m(x)

    def fail(*args, **kwargs):
        raise ValueError("planted")

    monkeypatch.setattr(ops.launch, "bn_bwd", fail)
    with pytest.raises(ValueError, match="planted"):
        y.backward(dy)


def test_saved_tensors_are_freed_with_the_graph():
    """The node holds its saved tensors and state only as long as the graph: nothing leaks."""
    m, x, r, dy, _ = _case((6, 3), residual=True)
    with eager_entry("native"):
        y = m(x, r)
    alive = weakref.ref(r)
    y.backward(dy)
    del y, r
    gc.collect()
    assert alive() is None


def test_anomaly_mode_runs_through_the_node():
    m, x, r, dy, _ = _case((6, 3))
    with eager_entry("native"), torch.autograd.detect_anomaly():
        m(x).backward(dy)
    assert torch.isfinite(x.grad).all()


def test_switched_off_or_unbuildable_takes_the_function(tmp_path):
    """BNFAST_NATIVE_AUTOGRAD=0, or a build that fails: load() is None, reason() says why, and the modules run on
    the torch.autograd.Function entry."""
    code = (
        "import torch, bnfast\n"
        "from bnfast import native, ops\n"
        "x = torch.randn(4, 3, requires_grad=True)\n"
        "bnfast.FusedBatchNorm1d(3)(x).sum().backward()\n"
        "print(ops.native_node(), '|', native.reason(), '|', x.grad is not None)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "BNFAST_NATIVE_AUTOGRAD": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("|") == ["None ", " BNFAST_NATIVE_AUTOGRAD=0 ", " True\n"]
    with pytest.raises(RuntimeError, match="failed"):
        native.build("false")  # a "compiler" that fails: the error names it, the cache stays empty of it
    assert not os.path.exists(native.library_path("false"))
