"""The `bnfast::` torch.library ops: how torch.compile, torch.export and fake-tensor tracing see the kernels.

    bnfast::batch_norm_fwd   training forward, functional: (y, save_mean, save_rstd, new_running_mean,
                             new_running_var); the kernel writes the new running stats into fresh outputs
    bnfast::batch_norm_eval  eval forward: y, normalised with the running stats (which it only reads)
    bnfast::batch_norm_bwd   backward of both: (dx, dweight, dbias)

Why `custom_op` + `register_fake` and not `triton_op` + `wrap_triton`: under TRITON_INTERPRET=1 a triton_op's
kernels are traced with fake tensors and the interpreter fails ("Cannot access data pointer of Tensor"),
whereas an opaque custom_op with an explicit fake implementation traces on CPU (backend="aot_eager") and GPU
(inductor calls the op as an extern kernel) alike. The op bodies are thin: they call the same launchers as
the eager `BatchNormFn` (`bnfast.kernels.bn_fwd`/`bn_bwd`), so both routes run the same kernels.

Rules the schemas follow:
- No op mutates its inputs (PyTorch refuses autograd for mutating custom ops), so the training forward is
  functional like aten's `_native_batch_norm_legit_functional`: `bnfast.functional.batch_norm` copies the new
  running stats into the buffers in place (same tensor objects) after the op.
- custom_op cannot return None, so "no such tensor" is a 0-element tensor: the new running stats when there
  are none, and the gradients that were not asked for (`output_mask`) or have no parameter.
- Outputs alias neither inputs nor each other (checked by torch at run time).
- save_mean/save_rstd are in the accumulation dtype: float64 for float64 inputs, float32 otherwise.
- `batch_norm_bwd` has no autograd formula (like the eager `BatchNormFn`, which is once_differentiable):
  double backward raises torch's "autograd has not been implemented" error.
"""

import torch
from torch import Tensor

from .kernels import bn_bwd, bn_fwd
from .kernels.launchers import _acc_dtype


def _none(x: Tensor) -> Tensor:
    """Stands for None in an output: custom_op outputs must be tensors."""
    return x.new_empty(0)


def _new_running_stats(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None) -> tuple[Tensor, Tensor]:
    if running_mean is None:
        return _none(x), _none(x)
    return torch.empty_like(running_mean), torch.empty_like(running_var)


@torch.library.custom_op("bnfast::batch_norm_fwd", mutates_args=())
def batch_norm_fwd(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float,
    cumulative: bool,
    eps: float,
    activation: str,
    act_param: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training forward with batch statistics. Returns (y, save_mean, save_rstd, new_running_mean,
    new_running_var); the new running stats are 0-element tensors when running_mean/var are None."""
    new_mean, new_var = _new_running_stats(x, running_mean, running_var)
    y, mean, rstd = bn_fwd(
        x, weight, bias, running_mean, running_var, num_batches_tracked, training=True, momentum=momentum,
        cumulative=cumulative, eps=eps, activation=activation, act_param=act_param,
        running_mean_out=new_mean if running_mean is not None else None,
        running_var_out=new_var if running_mean is not None else None,
    )  # fmt: skip
    return y, mean, rstd, new_mean, new_var


@batch_norm_fwd.register_fake
def _(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, cumulative, eps, activation,
      act_param):  # fmt: skip
    C = x.shape[1]
    acc, _ = _acc_dtype(x.dtype)  # (torch dtype, triton dtype): the launcher's own choice
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, like the launcher's
    mean = torch.empty(C, dtype=acc, device=x.device)
    rstd = torch.empty(C, dtype=acc, device=x.device)
    return (y, mean, rstd, *_new_running_stats(x, running_mean, running_var))


@torch.library.custom_op("bnfast::batch_norm_eval", mutates_args=())
def batch_norm_eval(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    activation: str,
    act_param: float,
) -> Tensor:
    """Eval forward: normalise with the running stats, which are only read."""
    y, _, _ = bn_fwd(
        x, weight, bias, running_mean, running_var, None, training=False, momentum=0.0, cumulative=False,
        eps=eps, activation=activation, act_param=act_param,
    )  # fmt: skip
    return y


@batch_norm_eval.register_fake
def _(x, weight, bias, running_mean, running_var, eps, activation, act_param):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("bnfast::batch_norm_bwd", mutates_args=())
def batch_norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    stat: Tensor,
    training: bool,
    eps: float,
    activation: str,
    act_param: float,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias). (mean, stat) = (save_mean, save_rstd) in training, (running_mean, running_var) in
    eval. A gradient not in output_mask, or for a missing parameter, is a 0-element tensor."""
    dx, dw, db = bn_bwd(
        dy, x, weight, bias, mean, stat, training=training, eps=eps, activation=activation, act_param=act_param,
        needs_dx=output_mask[0], needs_dw=output_mask[1], needs_db=output_mask[2],
    )  # fmt: skip
    return (dx if dx is not None else _none(x), dw if dw is not None else _none(x), db if db is not None else _none(x))


@batch_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, stat, training, eps, activation, act_param, output_mask):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if output_mask[0] else _none(x)
    dw = torch.empty_like(weight) if output_mask[1] and weight is not None else _none(x)
    db = torch.empty_like(bias) if output_mask[2] and bias is not None else _none(x)
    return dx, dw, db


def _setup_fwd(ctx, inputs, output):
    x, weight, bias = inputs[:3]
    ctx.eps, ctx.activation, ctx.act_param = inputs[8:11]
    _, mean, rstd, new_mean, new_var = output
    ctx.mark_non_differentiable(mean, rstd, new_mean, new_var)
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.training = True


def _setup_eval(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, ctx.eps, ctx.activation, ctx.act_param = inputs
    ctx.save_for_backward(x, weight, bias, running_mean, running_var)
    ctx.training = False


def _backward(ctx, dy, *_stat_grads):
    """Shared by both forwards; the saved (mean, stat) say which. Only y is differentiable."""
    x, weight, bias, mean, stat = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    dx, dw, db = batch_norm_bwd(dy, x, weight, bias, mean, stat, ctx.training, ctx.eps, ctx.activation,
                                ctx.act_param, mask)  # fmt: skip
    grads = tuple(g if needed else None for g, needed in zip((dx, dw, db), mask, strict=True))
    # running stats, num_batches_tracked and the scalars get no gradient
    return grads + (None,) * (len(ctx.needs_input_grad) - 3)


batch_norm_fwd.register_autograd(_backward, setup_context=_setup_fwd)
batch_norm_eval.register_autograd(_backward, setup_context=_setup_eval)


def batch_norm(x, running_mean, running_var, num_batches_tracked, weight, bias, training: bool, momentum: float,
               cumulative: bool, eps: float, activation) -> tuple[Tensor, Tensor | None, Tensor | None]:  # fmt: skip
    """(y, new_running_mean, new_running_var) through the ops; the new stats are None when not updated.
    `activation` is an `Activation`. Nothing is mutated: the caller writes the new stats back."""
    if not training:
        y = batch_norm_eval(x, weight, bias, running_mean, running_var, eps, activation.name, activation.param)
        return y, None, None
    y, _, _, new_mean, new_var = batch_norm_fwd(
        x, weight, bias, running_mean, running_var, num_batches_tracked if cumulative else None, momentum,
        cumulative, eps, activation.name, activation.param,
    )  # fmt: skip
    if running_mean is None:
        return y, None, None
    return y, new_mean, new_var
