"""Autograd for the Triton path: one forward, one setup, one backward, shared by the eager and the traced entry.

    bnfast::batch_norm           (x, weight, bias, running_mean, running_var, num_batches_tracked, training,
                                  momentum, cumulative, eps, activation, act_param, residual, mask, pad_value,
                                  virtual_batch_size)
                                  -> (y, save_mean, save_rstd, new_running_mean, new_running_var)
    bnfast::batch_norm_backward  (dy, x, weight, bias, mean, stat, residual, training, eps, activation, act_param,
                                  output_mask, mask, pad_value, virtual_batch_size) -> (dx, dweight, dbias, dresidual)

Masked BatchNorm: `mask` (x's shape without the channel dim, bool; checked by bnfast.functional) restricts the
training statistics to its True positions, and `pad_value` (None: normalise them too) is written at the others;
the mask is saved for the backward when it matters there (training, or a pad value).

Ghost BatchNorm: `virtual_batch_size` G (None: off; checked by bnfast.functional) normalises samples [0, G),
[G, 2G), ... with their own statistics in training: save_mean/save_rstd are then (chunks, C), the running stats
take each chunk's update in order, and the backward is each chunk's BatchNorm backward (dweight, dbias summed).

y = act(BN(x) + residual) when a residual is given. Saved for the backward: x, weight, bias, two (C,) stat
vectors ((chunks, C) under ghost BatchNorm), and the residual only when an activation is fused (act'(z) needs
z = BN(x) + residual; without an activation the residual's gradient is dy itself and nothing of it is kept).

Three entries, one implementation:
- The eager entry, in C++ where it can be built (bnfast.native compiles bnfast/csrc/autograd_node.cpp at first
  use): `node.apply` makes y's grad_fn a C++ torch::autograd::Node around the same Python forward (`_forward`)
  and backward (`_grads`), without torch.autograd.Function's bookkeeping (bench/test_host_overhead.py's floors).
- `BatchNormFunction` (autograd.Function) is the eager entry where the node cannot be built (no C++ compiler,
  BNFAST_NATIVE_AUTOGRAD=0) and for forward-mode AD (dual tensors: it raises torch's error).
- The `bnfast::` torch.library ops are what torch.compile / torch.export / fake tensors see (traceable, no
  graph break). No op mutates its inputs (PyTorch refuses autograd for mutating custom ops), so the op's
  forward is functional like aten's `_native_batch_norm_legit_functional`: it returns the new running stats
  and `batch_norm` below copies them into the buffers in place.
All take the same inputs in the same order (`BatchNormInputs`, the protocol written out once) and save what
`_saved` says; `_grads` is the backward of all three (the op's `_setup_context` marks its extra outputs and calls
`_save`; the eager entries return y alone). Why not the op eagerly: measured on this project's CPU, its eager
dispatch costs about twice the host time per forward+backward of `BatchNormFunction.apply` (the README's "Host
time"); a layer of the MNIST model computes for ~3 us on a GPU, so host time is the step time there.

On top of the C++ node, the call cache ("call cache" below) replays a module's repeated eager call, forward and
backward, from C++, with the same arguments to the same compiled kernels as this Python path.

Rules the op schemas follow: custom_op cannot return None, so "no such tensor" is a 0-element tensor (the
new running stats without buffers, save_mean/save_rstd in eval, gradients not asked for); outputs alias
neither inputs nor each other; save_mean/save_rstd are in the accumulation dtype (float64 for float64
inputs, float32 otherwise). Fake implementations allocate through the launchers' own
`forward_outputs` / `backward_outputs`.

The backward has two paths:
- kernels (the normal case): `bn_bwd`, or the backward op when traced;
- differentiable torch ops of the same math (`_backward_torch`), when the backward itself is differentiated
  (create_graph=True: double backward, gradient penalties, Hessian-vector products) or runs on batched
  gradients (`is_grads_batched=True`, gradcheck's batched check: functorch tensors the kernels cannot read).
  This is the slow path: a few torch ops per layer, float32 (float64 for float64) like the kernels.

The eager-vs-traced choice and the running-stat copy-back live here too (`batch_norm`, `is_traced`), so that
`bnfast.functional` only checks and routes (kernels or torch).

Imports: torch, bnfast.native (the C++ node, on the first eager call), bnfast.activations, bnfast.kernels.launch.
"""

import os
import threading
from typing import NamedTuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .activations import Activation
from .kernels import launch


class BatchNormInputs(NamedTuple):
    """The inputs of `bnfast::batch_norm` and of `BatchNormFunction`, in this order: the op protocol, named once
    (the op's schema is checked against it in tests/test_compile.py; the fake, `_save`, `_backward` and the
    host-time benchmark's floor read it)."""

    x: Tensor
    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    training: bool
    momentum: float
    cumulative: bool
    eps: float
    activation: str
    act_param: float
    residual: Tensor | None = None
    mask: Tensor | None = None
    pad_value: float | None = None
    virtual_batch_size: int | None = None


_RESIDUAL = BatchNormInputs._fields.index("residual")  # the one input after the non-differentiable ones
# the eager Function takes only what autograd must see: (x, weight, bias, residual, the BatchNormInputs tuple);
# 13 inputs cost ~4 us more per forward+backward than 4 (bench/test_host_overhead.py's floors)
EAGER_INPUTS = 5
_EAGER_RESIDUAL = 3


def _none(x: Tensor) -> Tensor:
    """Stands for None in an output: custom_op outputs must be tensors."""
    return x.new_empty(0)


def _new_running(x, running_mean, running_var, training):
    if not training or running_mean is None:
        return _none(x), _none(x)
    return torch.empty_like(running_mean), torch.empty_like(running_var)


# ------------------------------------------------------------------------------------------------- the ops
@torch.library.custom_op("bnfast::batch_norm", mutates_args=())
def batch_norm_op(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    training: bool,
    momentum: float,
    cumulative: bool,
    eps: float,
    activation: str,
    act_param: float,
    residual: Tensor | None = None,
    mask: Tensor | None = None,
    pad_value: float | None = None,
    virtual_batch_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, save_mean, save_rstd, new_running_mean, new_running_var); see the module docstring."""
    new_mean, new_var = _new_running(x, running_mean, running_var, training)
    running_out = (new_mean, new_var) if new_mean.numel() else None
    y, mean, rstd = launch.bn_fwd(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        num_batches_tracked,
        training=training,
        momentum=momentum,
        cumulative=cumulative,
        eps=eps,
        activation=activation,
        act_param=act_param,
        running_out=running_out,
        residual=residual,
        mask=mask,
        pad_value=pad_value,
        chunk=virtual_batch_size,
    )
    return y, mean, rstd, new_mean, new_var


@batch_norm_op.register_fake
def _(*args, **kwargs):
    i = BatchNormInputs(*args, **kwargs)
    return (
        *launch.forward_outputs(i.x, i.training, i.virtual_batch_size),
        *_new_running(i.x, i.running_mean, i.running_var, i.training),
    )


@torch.library.custom_op("bnfast::batch_norm_backward", mutates_args=())
def batch_norm_backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    stat: Tensor,
    residual: Tensor | None,
    training: bool,
    eps: float,
    activation: str,
    act_param: float,
    output_mask: list[bool],
    mask: Tensor | None = None,
    pad_value: float | None = None,
    virtual_batch_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dresidual); (mean, stat) = (save_mean, save_rstd) in training, the running stats in
    eval; output_mask has 4 entries (dresidual only with an activation: otherwise it is dy, see `_backward`)."""
    grads = launch.bn_bwd(
        dy,
        x,
        weight,
        bias,
        mean,
        stat,
        training=training,
        eps=eps,
        activation=activation,
        act_param=act_param,
        needs_dx=output_mask[0],
        needs_dw=output_mask[1],
        needs_db=output_mask[2],
        residual=residual,
        needs_dr=output_mask[3],
        mask=mask,
        pad_value=pad_value,
        chunk=virtual_batch_size,
    )
    return tuple(g if g is not None else _none(x) for g in grads)


@batch_norm_backward_op.register_fake
def _(
    dy,
    x,
    weight,
    bias,
    mean,
    stat,
    residual,
    training,
    eps,
    activation,
    act_param,
    output_mask,
    mask=None,
    pad_value=None,
    virtual_batch_size=None,
):
    grads = launch.backward_outputs(x, weight, bias, output_mask, residual)
    return tuple(g if g is not None else _none(x) for g in grads)


# -------------------------------------------------------------------------------- shared setup and backward
def _setup_context(ctx, inputs, output):
    """The op's setup (register_autograd): `inputs` follow `BatchNormInputs`; `output` is the op's
    (y, save_mean, save_rstd, new running stats), all but y non-differentiable."""
    ctx.mark_non_differentiable(*output[1:])
    _save(ctx, *_saved(BatchNormInputs(*inputs), output[1], output[2]), _RESIDUAL)


def _saved(i: BatchNormInputs, mean, rstd) -> tuple[tuple, tuple]:
    """Every entry: what the backward needs (see the module docstring), as (tensors, state): the tensors
    (x, weight, bias, the two stats, the residual, the mask; None where absent) and the scalars `_grads` reads."""
    kept_residual = i.residual if i.activation else None  # act'(z) needs z = BN(x) + residual; dy needs nothing
    kept_mask = i.mask if i.training or i.pad_value is not None else None  # eval without a pad: it changes nothing
    if i.training:
        tensors = (i.x, i.weight, i.bias, mean, rstd, kept_residual, kept_mask)
    else:  # eval: the running stats are constants of the backward
        tensors = (i.x, i.weight, i.bias, i.running_mean, i.running_var, kept_residual, kept_mask)
    chunk = i.virtual_batch_size if i.training else None
    return tensors, (i.training, i.eps, i.activation, i.act_param, i.pad_value, chunk)


def _save(ctx, tensors: tuple, state: tuple, residual_index: int):
    """The op's and the Function's: what `_saved` says, on their ctx; `residual_index` is the residual's position
    among the entry's inputs (the op's 12, the Function's 3)."""
    ctx.save_for_backward(*tensors)
    ctx.state, ctx.residual_index = state, residual_index


def _backward(ctx, dy, *_stat_grads):
    """The op's and the Function's backward: `_grads` for x, weight, bias and the residual; None for the buffers,
    the scalars and the Function's inputs tuple."""
    needs = ctx.needs_input_grad
    r = ctx.residual_index
    dx, dw, db, dr = _grads(ctx.state, (*needs[:3], len(needs) > r and needs[r]), dy, *ctx.saved_tensors)
    grads = [None] * len(needs)
    grads[:3] = dx, dw, db
    if len(needs) > r:
        grads[r] = dr
    return tuple(grads)


def _grads(state, needs, dy, x, weight, bias, mean, stat, residual, mask):
    """(dx, dweight, dbias, dresidual) from what `_saved` kept; `needs`: which of the four are wanted. Only y is
    differentiable; the residual gets g = dy * act'(z) (dy itself without an activation)."""
    training, eps, activation, act_param, pad_value, chunk = state
    needs_dr = needs[3] and bool(activation)  # without an activation dresidual = dy: no kernel
    if torch.is_grad_enabled() or _is_functorch(dy) or torch._C._functorch.maybe_current_level() is not None:
        dx, dw, db, dr = _backward_torch(
            dy,
            x,
            weight,
            bias,
            mean,
            stat,
            residual,
            training,
            eps,
            activation,
            act_param,
            (*needs[:3], needs_dr),
            mask,
            pad_value,
            chunk,
        )
    elif type(dy) is torch.Tensor and type(x) is torch.Tensor:
        dx, dw, db, dr = launch.bn_bwd(
            dy,
            x,
            weight,
            bias,
            mean,
            stat,
            training=training,
            eps=eps,
            activation=activation,
            act_param=act_param,
            needs_dx=needs[0],
            needs_dw=needs[1],
            needs_db=needs[2],
            residual=residual,
            needs_dr=needs_dr,
            mask=mask,
            pad_value=pad_value,
            chunk=chunk,
        )
    else:  # traced (fake/functional tensors): through the op, which torch can trace
        wanted = [*needs[:3], needs_dr]
        grads = batch_norm_backward_op(
            dy,
            x,
            weight,
            bias,
            mean,
            stat,
            residual,
            training,
            eps,
            activation,
            act_param,
            wanted,
            mask,
            pad_value,
            chunk,
        )
        dx, dw, db, dr = (g if need and g.numel() else None for g, need in zip(grads, wanted, strict=True))
    if needs[3] and not activation:
        dr = dy if mask is None or pad_value is None else dy * mask.unsqueeze(1)  # padded outputs: constant
    return dx, dw, db, dr


def _is_functorch(t: Tensor) -> bool:
    """A functorch wrapper, or a legacy BatchedTensor (what `is_grads_batched=True` feeds the backward)."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t) or torch._C._functorch.is_legacy_batchedtensor(t)


def torch_pre_activation(x, weight, bias, mean, rstd, residual=None):
    """The forward's math in torch ops, in ACC = mean.dtype: (xhat, z, w, shape) with z = xhat * w + b [+ residual]
    and `shape` the (1, C, 1, ...) view of a channel vector. Shared by the slow paths (`_backward_torch`, and
    bnfast.distributed's torch-op stages)."""
    acc = mean.dtype
    shape = (1, -1) + (1,) * (x.dim() - 2)
    w = weight.to(acc) if weight is not None else torch.ones_like(mean)
    b = bias.to(acc) if bias is not None else torch.zeros_like(mean)
    xhat = (x.to(acc) - mean.view(shape)) * rstd.view(shape)
    z = xhat * w.view(shape) + b.view(shape)
    if residual is not None:
        z = z + residual.to(acc)
    return xhat, z, w, shape


def torch_grad(dy, z, act: Activation):
    """g = dy * act'(z) in z's dtype (ACC): what every backward stage starts from."""
    return dy.to(z.dtype) * act.derivative(z)


def _backward_torch(
    dy,
    x,
    weight,
    bias,
    mean,
    stat,
    residual,
    training,
    eps,
    activation,
    act_param,
    needs,
    mask=None,
    pad_value=None,
    chunk=None,
):
    """The backward's math in differentiable torch ops (the slow path; see the module docstring). In training,
    mean and rstd are recomputed from x so that a second derivative sees their dependence on x (over the mask's
    valid positions when there is one; per chunk of `chunk` samples under ghost BatchNorm)."""
    if training and chunk is not None and chunk < x.shape[0]:
        parts = [
            _backward_torch(
                dy[n : n + chunk],
                x[n : n + chunk],
                weight,
                bias,
                None,
                None,
                None if residual is None else residual[n : n + chunk],
                training,
                eps,
                activation,
                act_param,
                needs,
            )
            for n in range(0, x.shape[0], chunk)
        ]
        dx, dw, db, dr = (list(p) for p in zip(*parts, strict=True))
        return (
            torch.cat(dx) if needs[0] else None,
            sum(dw[1:], dw[0]) if dw[0] is not None else None,
            sum(db[1:], db[0]) if db[0] is not None else None,
            torch.cat(dr) if dr[0] is not None else None,
        )
    acc = launch.acc_dtype(x.dtype)
    dims = [0, *range(2, x.dim())]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    xa, dya = x.to(acc), dy.to(acc)
    valid = mask.unsqueeze(1) if mask is not None else None
    if training and valid is not None:
        count = valid.expand_as(xa).sum(dims).to(acc)
        xv = torch.where(valid, xa, 0.0)
        mean = xv.sum(dims) / count
        rstd = torch.rsqrt(torch.where(valid, xa - mean.view(shape), 0.0).square().sum(dims) / count + eps)
    elif training:
        mean = xa.mean(dims)
        rstd = torch.rsqrt(xa.var(dims, correction=0) + eps)
    else:
        mean, rstd = mean.to(acc), torch.rsqrt(stat.to(acc) + eps)
    xhat, z, w, _ = torch_pre_activation(xa, weight, bias, mean, rstd, residual)
    g = torch_grad(dya, z, Activation(activation, act_param))
    if valid is not None and pad_value is not None:  # padded outputs are the constant: no gradient
        g = torch.where(valid, g, 0.0)
        xhat = torch.where(valid, xhat, 0.0)
    sum_g, sum_gx = g.sum(dims), (g * xhat).sum(dims)
    dx = dw = db = dr = None
    if needs[0]:
        g_x = g
        if training and valid is not None:  # a padded x is outside the statistics: only the direct term
            g_x = g - torch.where(valid, (sum_g.view(shape) + xhat * sum_gx.view(shape)) / count.view(shape), 0.0)
        elif training:
            count = x.numel() // x.shape[1]
            g_x = g - (sum_g.view(shape) + xhat * sum_gx.view(shape)) / count
        dx = ((w * rstd).view(shape) * g_x).to(x.dtype)
    if needs[1] and weight is not None:
        dw = sum_gx.to(weight.dtype)
    if needs[2] and bias is not None:
        db = sum_g.to(bias.dtype)
    if needs[3] and residual is not None:
        dr = g.to(residual.dtype)
    return dx, dw, db, dr


# --------------------------------------------------------------------------------------------- eager entry
def _forward(inputs: tuple) -> tuple:
    """The eager forward, both eager entries': (y, saved tensors, state) for `BatchNormInputs`, the running stats
    updated in place by the kernel."""
    i = BatchNormInputs(*inputs)
    y, mean, rstd = launch.bn_fwd(
        i.x,
        i.weight,
        i.bias,
        i.running_mean,
        i.running_var,
        i.num_batches_tracked,
        training=i.training,
        momentum=i.momentum,
        cumulative=i.cumulative,
        eps=i.eps,
        activation=i.activation,
        act_param=i.act_param,
        residual=i.residual,
        mask=i.mask,
        pad_value=i.pad_value,
        chunk=i.virtual_batch_size,
    )
    tensors, state = _saved(i, mean, rstd)
    record = getattr(_RECORDING, "call", None)
    if record is not None:  # a call-cache capture (`module_call`): what this call did
        record.append(("forward", inputs, launch.LAST_PLAN[0], (y, mean, rstd), tensors, state))
    return y, tensors, state


_NATIVE: list = []  # [bnfast.native's module, or None] from the first eager call on (`native_node`)


def native_node():
    """The C++ autograd node's module (bnfast.native: built or loaded on the first call), or None when it cannot be
    had: the eager entry then is `BatchNormFunction`. bnfast.testing.eager_entry switches it."""
    if not _NATIVE:
        from . import native  # imported on the first eager call: `python -m bnfast.native` runs it as a script

        node = native.load()
        _NATIVE.append(node)
        if node is not None:
            node.init(*launch.native_globals(), _NATIVE, _native_backward)
            if os.environ.get("BNFAST_CALL_CACHE", "1") != "0":
                CALL_CACHE[0] = node
    return _NATIVE[0]


def _native_backward(state, needs, dy, *saved):
    """The C++ node's backward: `_grads`, and for a node the call cache made, the spec of the backward plan the
    kernels replayed with every launch direct (((layouts, steps), dr is dy) or None): the node's entry then replays
    it from C++ (bnfast/csrc/autograd_node.cpp)."""
    launch.LAST_PLAN[0] = None
    dx, dw, db, dr = _grads(state, needs, dy, *saved)
    plan = launch.LAST_PLAN[0]
    if plan is None or saved[6] is not None:  # not the kernels' plan replayed direct, or a mask
        return dx, dw, db, dr, None
    exported = plan.native()
    return dx, dw, db, dr, None if exported is None else (exported, needs[3] and not state[2])


# --------------------------------------------------------------------------------------------- call cache
# The modules' eager forward, replayed from C++ (bnfast/csrc/autograd_node.cpp, "call cache"): on a module's call
# whose every input to the slow path's decisions (the module's class, its training / momentum / eps /
# track_running_stats / activation / virtual_batch_size objects, its parameters' and buffers' classes and layouts,
# x's and the residual's layouts, bnfast's and Triton's launch switches, the thread's autograd, functorch, mode
# and tracing state) is as on its last stored call, C++ does what that call did: num_batches_tracked += k, the
# forward plan's launches with this call's tensors, the node. Anything else takes the slow path, which
# `module_call` records (`_RECORDING`, per thread) and stores again when it ran the kernels' forward plan direct
# with tensors all from the module and the call (`_call_spec`). The node's first slow backward stores the
# backward plan likewise (`_native_backward`).
CALL_CACHE: list = [None]  # [bnfast.native's module] when the call cache is on (BNFAST_CALL_CACHE=0: off)
# this thread's recording while `module_call` runs the slow path (.call: ("increment", k), ("forward", ...))
_RECORDING = threading.local()


def record_increment(k: int) -> None:
    """bnfast.functional's num_batches_tracked += k, for the call cache (only while recording)."""
    record = getattr(_RECORDING, "call", None)
    if record is not None:
        record.append(("increment", k))


def module_call(module, x, residual, slow, state_objects: list | None):
    """`slow()` (the module's forward), recorded; then stored in the call cache when it can be replayed.
    `state_objects`: the module's [weight, bias, running_mean, running_var, num_batches_tracked] (bnfast.modules'
    `_state`), None when its calls may not be cached."""
    node = _NATIVE[0] if _NATIVE else native_node()
    if node is None or getattr(_RECORDING, "call", None) is not None:  # a module's call inside another's: slow
        return slow()
    _RECORDING.call = record = []
    try:
        y = slow()
    finally:
        _RECORDING.call = None
    spec = None if state_objects is None else _call_spec(x, residual, y, record, state_objects)
    if spec is not None:
        node.store(module, x, residual, spec)
    return y


def _call_spec(x, residual, y, record, state_objects):
    """(sources, increment, forward plan, saved slots, state) for bnfast/csrc/autograd_node.cpp's `store`, or None
    when the recorded call cannot be replayed: the kernels' forward plan ran direct, its inputs are the call's x,
    residual and the module's own state, nothing else ran (a torch fallback, a second call), and y is its output."""
    forwards = [r for r in record if r[0] == "forward"]
    increments = [r[1] for r in record if r[0] == "increment"]
    if len(forwards) != 1 or len(increments) > 1 or len(record) != len(forwards) + len(increments):
        return None
    _, inputs, plan, outputs, tensors, state = forwards[0]
    i = BatchNormInputs(*inputs)
    if plan is None or outputs[0] is not y or i.mask is not None or type(x) is not torch.Tensor:
        return None
    if residual is not None and type(residual) is not torch.Tensor:
        return None
    # bn_fwd's inputs, in its plan's table order
    plan_inputs = (i.x, i.weight, i.bias, i.running_mean, i.running_var, i.num_batches_tracked, i.residual)
    sources = []
    for t in plan_inputs:
        if t is None:
            sources.append(-2)
        elif t is x:
            sources.append(-1)
        elif residual is not None and t is residual:
            sources.append(5)
        else:
            k = next((k for k, o in enumerate(state_objects) if t is o), None)
            if k is None:
                return None
            sources.append(k)
    table = (*plan_inputs, *outputs)
    saved = []
    for t in tensors:
        slot = next((k for k, o in enumerate(table) if o is not None and o is t), None)
        if t is not None and slot is None:
            return None
        saved.append(-1 if t is None else slot)
    exported = plan.native()
    if exported is None or len(exported[0]) != len(outputs):
        return None
    increment = increments[0] if increments else 0
    if increment and state_objects[4] is None:
        return None
    return tuple(sources), increment, exported, tuple(saved), state


class BatchNormFunction(torch.autograd.Function):
    """The eager entry (see the module docstring): the running stats are updated in place by the kernel. It takes
    only what autograd must see (x, weight, bias, residual; the rest rides in one tuple) and returns y alone (mean
    and rstd are only saved): per forward+backward, 13 inputs instead of 4 cost ~4 us and 3 outputs instead of 1
    ~3 us of torch's autograd bookkeeping (bench/test_host_overhead.py's floors).

    forward(ctx, ...) saves through `_save` itself rather than declaring a `setup_context` staticmethod: with a
    separate setup_context, `Function.apply` binds the arguments through `inspect.signature` on every call
    (about a fifth of bnfast's host time per layer, measured with bench/test_host_overhead.py). functorch
    transforms, which would need the separate form, never reach this class: `bnfast.functional` routes their
    tensors to torch's own batch_norm.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, inputs):
        """x, weight, bias and the residual (what gets gradients), then all the `BatchNormInputs` as a tuple."""
        y, tensors, state = _forward(inputs)
        _save(ctx, tensors, state, _EAGER_RESIDUAL)
        return y

    backward = staticmethod(_backward)


def is_traced(x: Tensor) -> bool:
    """True under torch.compile / torch.export, or for fake tensors (FakeTensorMode, make_fx): then the kernels
    are reached through the `bnfast::` op, which torch can trace."""
    if torch.compiler.is_compiling():
        return True
    return type(x) is not torch.Tensor and is_fake(x)  # the type test keeps plain eager tensors cheap


def batch_norm(*inputs, traced: bool | None = None) -> Tensor:
    """y for `BatchNormInputs` through the kernels: the eager Function (running stats updated in place by the
    kernel), or when traced (`is_traced(x)`, computed here when not given) the functional op, whose new running
    stats are then copied into the buffers in place, so both entries update the same tensor objects."""
    if traced is None:
        traced = is_traced(inputs[0])
    if not traced:
        residual = inputs[_RESIDUAL] if len(inputs) > _RESIDUAL else None
        node = _NATIVE[0] if _NATIVE else native_node()
        if node is not None:
            y = node.apply(_forward, _grads, inputs[0], inputs[1], inputs[2], residual, inputs)
            if y is not NotImplemented:  # NotImplemented: a dual tensor (forward-mode AD): the Function raises
                return y
        return BatchNormFunction.apply(inputs[0], inputs[1], inputs[2], residual, inputs)
    y, _, _, new_mean, new_var = batch_norm_op(*inputs)
    i = BatchNormInputs(*inputs)
    if i.training and i.running_mean is not None:
        with torch.no_grad():  # in place: modules, DDP and optimizers hold these very tensors
            i.running_mean.copy_(new_mean)
            i.running_var.copy_(new_var)
    return y


batch_norm_op.register_autograd(_backward, setup_context=_setup_context)
