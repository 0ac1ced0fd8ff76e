"""torch.compile, torch.library.opcheck and torch.export over the `bnfast::` ops (bnfast/ops.py).

On CPU the compiled runs use backend="aot_eager" (here: aot_autograd with recording no-op compilers): it traces
through the fake implementations and the autograd registration without GPU code generation, then runs the
same kernels under the interpreter, so results are compared bitwise. With BNFAST_TEST_DEVICE=cuda they use
the default inductor backend (compared with torch's tolerances: inductor compiles the Linears around the ops).
"""

import copy
import io

import pytest
import torch
from functorch.compile import make_boxed_func
from torch import nn
from torch._dynamo.backends.common import aot_autograd

import bnfast
from bnfast import ops

OPS = ("bnfast.batch_norm.default", "bnfast.batch_norm_backward")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # each test compiles new modules: keep the recompile limit out of the picture
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def recording_backend(device, graphs: list):
    """aot_eager that also keeps the code of the forward and backward graphs; inductor on CUDA."""
    if device.type == "cuda":
        return "inductor"

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=record, bw_compiler=record)


def mlp(device, shape, **bn_kwargs):
    """Linear -> FusedBatchNorm1d(...) -> Linear for (N, C) inputs; Conv1d(k=1) in front for (N, C, L)."""
    torch.manual_seed(0)
    with torch.device(device):  # not .to(device): that cannot swap fake parameters under FakeTensorMode
        if len(shape) == 2:
            head = nn.Linear(shape[1], 6)
        else:
            head = nn.Conv1d(shape[1], 6, kernel_size=1)
        tail = [nn.Flatten(), nn.Linear(6 * shape[2], 3)] if len(shape) == 3 else [nn.Linear(6, 3)]
        return nn.Sequential(head, bnfast.FusedBatchNorm1d(6, **bn_kwargs), *tail)


def steps(model, xs):
    """One forward + backward per input; returns the outputs. Gradients accumulate over the steps."""
    outs = []
    for x in xs:
        y = model(x)
        (y * torch.arange(y.shape[-1], device=y.device)).sum().backward()  # non-uniform dy
        outs.append(y.detach())
    return outs


def assert_same(actual, expected, msg=None):
    """Bitwise on CPU with the kernels: aot_eager runs the same aten ops and the same kernels as eager. Else
    torch's tolerances: inductor may fuse the Linear's bias add (CUDA), and the torch fallback (TRITON_INTERPRET=0)
    runs decomposed batch_norm, with the cumulative momentum as a lerp, once compiled."""
    exact = dict(rtol=0, atol=0) if actual.device.type == "cpu" and bnfast.uses_triton(actual) else {}
    torch.testing.assert_close(actual, expected, msg=msg, **exact)


def assert_same_state(eager, compiled):
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True):
        assert_same(b.grad, a.grad, msg=f"grad of {name}")
    for (name, a), (_, b) in zip(eager.named_buffers(), compiled.named_buffers(), strict=True):
        assert_same(b, a, msg=name)


CASES = {
    "plain": dict(),
    "relu-cumulative": dict(activation="relu", momentum=None),
    "leaky_relu-no_affine": dict(activation=nn.LeakyReLU(0.2), affine=False),
    "gelu-no_running_stats": dict(activation="gelu", track_running_stats=False),
}


# every case in 2D; the activation/momentum/affine ones in 3D too (each compile costs ~1 s under the interpreter)
PARITY_3D = ["relu-cumulative", "leaky_relu-no_affine"]
PARITY = [(case, (8, 4)) for case in CASES] + [(case, (4, 3, 5)) for case in PARITY_3D]


@pytest.mark.parametrize("case, shape", PARITY, ids=lambda v: str(v) if isinstance(v, tuple) else v)
def test_compiled_matches_eager(device, case, shape):
    """Train (2 steps) then eval: outputs, gradients, running stats and num_batches_tracked equal eager's."""
    eager = mlp(device, shape, **CASES[case])
    model = copy.deepcopy(eager)
    buffers = {name: (b, b.data_ptr()) for name, b in model.named_buffers()}
    graphs = []
    compiled = torch.compile(model, backend=recording_backend(device, graphs), fullgraph=True)
    xs = [torch.randn(shape, device=device) + i for i in range(2)]

    for a, b in zip(steps(eager, xs), steps(compiled, xs), strict=True):
        assert_same(b, a)
    assert_same_state(eager, model)
    eager.eval(), model.eval()
    assert_same(steps(compiled, xs[:1])[0], steps(eager, xs[:1])[0])
    assert_same_state(eager, model)

    for name, b in model.named_buffers():  # updated in place: DDP and optimizers hold these tensors
        assert b is buffers[name][0] and b.data_ptr() == buffers[name][1], name
    if graphs and bnfast.uses_triton(xs[0]):  # aot_eager: forward and backward graphs, train and eval
        code = "\n".join(graphs)
        assert all(op in code for op in OPS), code


def test_compiled_split_plan(device, kernel_path):
    """Both launch plans under compile; the split backward returns dw/db from one workspace (see ops.py)."""
    eager = mlp(device, (8, 4), activation="silu")
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend=recording_backend(device, []), fullgraph=True)
    xs = [torch.randn(8, 4, device=device)]
    assert_same(steps(compiled, xs)[0], steps(eager, xs)[0])
    assert_same_state(eager, model)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_graph_break(device, training):
    model = mlp(device, (8, 4), activation="relu").train(training)
    x = torch.randn(8, 4, device=device)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    if bnfast.uses_triton(x):
        assert "bnfast.batch_norm" in explanation.graphs[0].code


def test_dynamic_batch_size(device):
    """dynamic=True: new batch sizes reuse the graph (the fake implementations are shape-generic)."""
    eager = mlp(device, (8, 4), activation="relu", momentum=None)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend=recording_backend(device, []), fullgraph=True, dynamic=True)
    xs = [torch.randn(n, 4, device=device) for n in (8, 5, 7)]
    for a, b in zip(steps(eager, xs), steps(compiled, xs), strict=True):
        assert_same(b, a)
    assert_same_state(eager, model)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


# ---- opcheck: test_schema, test_autograd_registration, test_faketensor, test_aot_dispatch_dynamic ----


def need_kernels(x):
    if not bnfast.uses_triton(x):
        pytest.skip("the bnfast:: ops launch the Triton kernels: needs CUDA or TRITON_INTERPRET=1")


def op_inputs(device, shape, dtype, affine=True):
    torch.manual_seed(0)
    C = shape[1]
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(C, device=device, dtype=dtype, requires_grad=True) if affine else None
    b = torch.randn(C, device=device, dtype=dtype, requires_grad=True) if affine else None
    rm = torch.randn(C, device=device, dtype=dtype)
    rv = torch.rand(C, device=device, dtype=dtype) + 0.5
    return x, w, b, rm, rv


def opcheck_all(device, shape, dtype, affine=True, activation=("relu", 0.0), mask=(True, True, True)):
    """opcheck the op in training and eval, and the backward op after each."""
    x, w, b, rm, rv = op_inputs(device, shape, dtype, affine)
    need_kernels(x)
    nbt = torch.tensor(3, device=device)
    for training in (True, False):
        torch.library.opcheck(ops.batch_norm_op, (x, w, b, rm, rv, nbt, training, 0.1, False, 1e-5, *activation))
    x, w, b = (t.detach() if t is not None else None for t in (x, w, b))  # the backward op has no autograd
    dy = torch.randn_like(x)
    _, mean, rstd, _, _ = ops.batch_norm_op(x, w, b, None, None, None, True, 0.1, False, 1e-5, *activation)
    for training, stats in ((True, (mean, rstd)), (False, (rm, rv))):
        args = (dy, x, w, b, *stats, None, training, 1e-5, *activation, [*mask, False])
        torch.library.opcheck(ops.batch_norm_backward_op, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(8, 4), (4, 3, 5)], ids=str)
def test_opcheck(device, shape, dtype):
    opcheck_all(device, shape, dtype)


def test_opcheck_variants(device, kernel_path):
    """No affine, cumulative momentum, no running stats, partial output_mask, both launch plans."""
    opcheck_all(device, (8, 4), torch.float32, affine=False, activation=("leaky_relu", 0.2), mask=(True, False, False))
    x, w, b, rm, rv = op_inputs(device, (4, 3, 5), torch.float32)
    need_kernels(x)
    nbt = torch.tensor(2, device=device)
    torch.library.opcheck(ops.batch_norm_op, (x, w, b, rm, rv, nbt, True, 0.0, True, 1e-5, "elu", 1.0))
    torch.library.opcheck(ops.batch_norm_op, (x, w, b, None, None, None, True, 0.1, False, 1e-5, "", 0.0))
    x, w, b = x.detach(), w.detach(), b.detach()
    _, mean, rstd, _, _ = ops.batch_norm_op(x, w, b, None, None, None, True, 0.1, False, 1e-5, "", 0.0)
    dy = torch.randn_like(x)
    args = (dy, x, w, b, mean, rstd, None, True, 1e-5, "", 0.0, [False, True, True, False])
    torch.library.opcheck(ops.batch_norm_backward_op, args)


def test_fwd_op_is_functional(device):
    """The training op returns the new running stats and leaves its inputs alone (cumulative: f = 1/nbt)."""
    x, w, b, rm, rv = op_inputs(device, (8, 4), torch.float32)
    need_kernels(x)
    rm0, rv0 = rm.clone(), rv.clone()
    nbt = torch.tensor(4, device=device)
    y, mean, rstd, new_rm, new_rv = ops.batch_norm_op(x, w, b, rm, rv, nbt, True, 0.0, True, 1e-5, "", 0.0)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    torch.testing.assert_close(new_rm, 0.75 * rm0 + 0.25 * x.detach().mean(0))
    torch.testing.assert_close(new_rv, 0.75 * rv0 + 0.25 * x.detach().var(0))
    _, _, _, none_rm, none_rv = ops.batch_norm_op(x, w, b, None, None, None, True, 0.1, False, 1e-5, "", 0.0)
    assert none_rm.numel() == 0 and none_rv.numel() == 0


def test_the_op_schema_follows_the_protocol():
    """The op's arguments are `ops.BatchNormInputs`, by name and in order (the one place the protocol is
    written out; the schema itself is inferred from the op's annotations)."""
    schema = torch.ops.bnfast.batch_norm.default._schema
    assert tuple(a.name for a in schema.arguments) == ops.BatchNormInputs._fields
    assert len(ops.BatchNormInputs._fields) == len(schema.arguments)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_eager_and_traced_entries_save_the_same(device, training):
    """One autograd implementation: the eager Function's backward is the op's registered backward, and both
    forwards save the same tensors through `_setup_context`, and give the same gradients."""
    assert ops.BatchNormFunction.backward is ops._backward
    x, w, b, rm, rv = op_inputs(device, (8, 4), torch.float32)
    need_kernels(x)
    args = (x, w, b, rm.clone(), rv.clone(), None, training, 0.1, False, 1e-5, "silu", 0.0, None)
    # the Function's ctx shows what it saved (the C++ node's saved tensors: tests/test_native.py)
    with bnfast.testing.eager_entry("function"):
        y_fn = ops.batch_norm(*args, traced=False)  # the eager entry: ops.BatchNormFunction, returns y alone
    args = (x, w, b, rm.clone(), rv.clone(), None, training, 0.1, False, 1e-5, "silu", 0.0, None)
    y_op = ops.batch_norm_op(*args)[0]
    saved_fn, saved_op = y_fn.grad_fn.saved_tensors, y_op.grad_fn.saved_tensors
    assert len(saved_fn) == len(saved_op) == 7  # x, weight, bias, two stats, residual, mask
    for a, c in zip(saved_fn, saved_op, strict=True):
        assert (a is None) == (c is None)
        if a is not None:
            torch.testing.assert_close(a, c, rtol=0, atol=0)
    dy = torch.randn_like(y_fn)
    grads_fn = torch.autograd.grad(y_fn, (x, w, b), dy)
    grads_op = torch.autograd.grad(y_op, (x, w, b), dy)
    for a, c in zip(grads_fn, grads_op, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


# ---- torch.export and fake tensors ----


def test_export_eval_model(device):
    """An eval-mode model exports with bnfast::batch_norm_eval in its graph, and survives save/load (the ops
    are registered by `import bnfast`, which loading an exported program therefore needs)."""
    model = mlp(device, (8, 4), activation="relu")
    steps(model, [torch.randn(8, 4, device=device)])
    model.eval()
    x = torch.randn(8, 4, device=device)
    exported = torch.export.export(model, (x,))
    if bnfast.uses_triton(x):
        assert "bnfast.batch_norm" in exported.graph_module.code
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    with torch.no_grad():
        expected = model(x)
        assert_same(exported.module()(x), expected)
        assert_same(loaded.module()(x), expected)


def test_fake_tensor_mode(device):
    """Under FakeTensorMode (shape propagation, memory estimators) the module goes through the ops' fakes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        model = mlp(device, (4, 3, 5), activation="relu")
        y = model(torch.empty(4, 3, 5, device=device))
        y.sum().backward()
    assert isinstance(y, torch.Tensor) and y.shape == (4, 3) and mode is not None
