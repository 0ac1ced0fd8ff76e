"""`batch_norm(...)`: torch.nn.functional.batch_norm with a fused activation: checks, routing, the CPU fallback.

Checks. What torch accepts gets torch's answer; what torch rejects gets torch's error, raised before any state
changes. The common case is recognised by a few cheap tests (same dtype everywhere, or 16-bit input with
float32 parameters and buffers: the AMP layout; sizes; devices; eps > 0; more than one value per channel in
training). Anything else is handed to torch itself first (`_torch_verdict`: torch's batch_norm on the same
tensors, running stats cloned, under no_grad): if torch raises, its very exception propagates (type and
message, whatever the installed version says); if it accepts, so do we, and the kernels compute it (they read
every dtype and stride torch accepts).

Routing, per call:
- Triton kernels when `uses_triton(x)`: CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before
  bnfast was imported (Triton's interpreter: slow, exact, how CI tests the kernels).
  `ops.batch_norm` then picks the entry: eager, `ops.BatchNormFunction` (running stats updated in place by the
  kernel); torch.compile / torch.export / fake tensors, the `bnfast::batch_norm` op (functional), whose new
  running stats it copies into the buffers in place, so both update the same tensor objects.
- torch's own `F.batch_norm` + the activation's torch op (same semantics) otherwise: CPU tensors without
  the interpreter, empty inputs (torch defines their outputs), functorch transforms (vmap/grad/jacrev: their
  wrapped tensors have no storage for a kernel to read), and torch.jit.trace (which records torch ops).

Imports: torch, bnfast.activations, bnfast.ops, bnfast.kernels.launch (is_interpreted).
"""

import math
import operator

import torch
import torch.nn.functional as F

from . import ops  # registers the bnfast:: ops on import, so torch.export.load finds them after `import bnfast`
from .activations import Activation, resolve_activation
from .kernels.launch import is_interpreted

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)
_INTERPRETED = is_interpreted()


def uses_triton(x: torch.Tensor) -> bool:
    """True when `x` is computed by the Triton kernels, False when by the torch fallback."""
    return x.is_cuda or (_INTERPRETED and x.is_cpu)  # is_cpu: x.device.type without building a torch.device


_is_traced = ops.is_traced


def _needs_torch_ops() -> bool:
    """functorch transforms and torch.jit.trace run on torch's own ops (see the module docstring)."""
    return torch._C._functorch.maybe_current_level() is not None or torch.jit.is_tracing()


def _common_layout(x, tensors, eps) -> bool:
    """The cheap tests on dtypes, sizes, devices and eps (bnfast.distributed uses them alone: under SyncBatchNorm
    a rank may hold one value per channel, or none)."""
    dtype = x.dtype
    if dtype not in _SUPPORTED_DTYPES or x.dim() < 2 or not eps > 0:  # `not eps > 0` also catches NaN
        return False
    C, device, half = x.shape[1], x.get_device(), dtype in _HALF
    if x.is_meta:
        return False
    for t in tensors:
        if t is None:
            continue
        if t.dtype is not dtype and not (half and t.dtype is torch.float32):
            return False
        if t.shape != (C,) or t.get_device() != device or t.is_meta:  # get_device: an int (CPU and meta: -1)
            return False
    return True


def _common_case(x, tensors, training, eps) -> bool:
    """The cheap tests of the module docstring: True when nothing needs torch's verdict."""
    if not _common_layout(x, tensors, eps) or _half_pair(tensors[2], tensors[3]):
        return False
    if training:
        return x.numel() != x.shape[1]  # more than one value per channel (x.numel() == 0 takes torch's path anyway)
    return tensors[2] is not None and tensors[3] is not None  # eval needs running stats


HALF_PAIR_MESSAGE = "running_mean and running_var must either both be None or neither be None"  # torch's, training


def _half_pair(running_mean, running_var) -> bool:
    """Exactly one running stat of the two: torch's batch_norm refuses it (ValueError in training, RuntimeError
    in eval), and the launchers take both or neither."""
    return (running_mean is None) != (running_var is None)


def _torch_verdict(x, running_mean, running_var, weight, bias, training, eps):
    """Run torch's batch_norm on the same tensors (stats cloned: no state changes) and let its error propagate."""
    clone = lambda t: None if t is None else t.detach().clone()  # noqa: E731
    with torch.no_grad():
        F.batch_norm(
            x.detach(), clone(running_mean), clone(running_var), clone(weight), clone(bias), training, 0.1, eps
        )
    if x.dim() < 2 or x.dtype not in _SUPPORTED_DTYPES:  # torch accepted what bnfast cannot compute
        raise ValueError(f"bnfast.batch_norm: unsupported input ({x.dim()}-D, {x.dtype}); torch accepts it")
    if _half_pair(running_mean, running_var):  # torch (2.11 and later) raised above; never reach the launchers
        raise ValueError(HALF_PAIR_MESSAGE)


def _counter_fits(x: torch.Tensor, num_batches_tracked: torch.Tensor) -> bool:
    """bnfast's own argument: the cumulative factor 1/num_batches_tracked is read on the device by the kernels (a
    tensor elsewhere, or of several elements, would be read as garbage; torch's module calls float() on it)."""
    return num_batches_tracked.numel() == 1 and num_batches_tracked.device == x.device


def _check_residual(x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """What `act(BN(x) + residual)` accepts, checked before any state changes: (residual as the kernels take it,
    whether torch ops must compute the call instead).

    torch's errors for what the expression refuses: a shape that does not broadcast with x's (RuntimeError,
    the sum's message), a tensor on another device (RuntimeError; a 0-dim CPU tensor is allowed, as in
    torch). Free for the kernels, which read the residual through its strides in its own dtype: a residual that
    broadcasts to x's shape (a stride-0 view; autograd's expand sums its gradient back to its shape) and any
    dtype whose sum with x keeps x's dtype (a 16-bit residual on float32 x, a 0-dim float64 tensor; integer
    and bool residuals are cast to x's dtype first). What changes the output itself goes to torch ops (the
    fallback): a residual that promotes the output's dtype (float64 on float32 x: the output is float64) or
    broadcasts x's shape to a larger one."""
    if residual.device != x.device and not (residual.dim() == 0 and residual.device.type == "cpu"):
        raise RuntimeError(
            f"Expected all tensors to be on the same device, but found at least two devices, {x.device} and "
            f"{residual.device}!"
        )
    try:
        shape = torch.broadcast_shapes(x.shape, residual.shape)
    except RuntimeError:  # the sum's own RuntimeError and message, from stride-0 scalars (nothing allocated)
        torch.zeros(()).expand(x.shape) + torch.zeros(()).expand(residual.shape)
        raise
    if shape != x.shape or torch.result_type(x, residual) != x.dtype or residual.device != x.device:
        return residual, True
    if not residual.is_floating_point():
        residual = residual.to(x.dtype)
    if residual.shape != x.shape:
        residual = residual.expand(x.shape)
    return residual, False


def _check_mask(x: torch.Tensor, mask: torch.Tensor, training: bool, pad_value) -> None:
    """A mask of x's shape without the channel dim, bool, on x's device (ValueError otherwise); in training, at
    least 2 valid positions (torch's message for fewer). Reads the mask's count on the host in training (one
    device sync), except under tracing, where the count is not known."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"bnfast.batch_norm: mask must be a bool tensor, got {type(mask).__name__}")
    expected = (x.shape[0], *x.shape[2:])
    if mask.dtype != torch.bool or tuple(mask.shape) != expected or mask.device != x.device:
        raise ValueError(
            f"bnfast.batch_norm: mask must be a bool tensor of the input's shape without the channel dim "
            f"{expected} on {x.device}, got {mask.dtype} of shape {tuple(mask.shape)} on {mask.device}"
        )
    if pad_value is not None and not isinstance(pad_value, (int, float)):
        raise ValueError(f"bnfast.batch_norm: pad_value must be a number or None, got {type(pad_value).__name__}")
    if training and not _is_traced(x) and not isinstance(x, torch.fx.Proxy):
        valid = int(mask.sum())
        if valid < 2:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {valid} valid position(s) of input size "
                f"{x.shape}"
            )


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    activation=None,
    num_batches_tracked: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    pad_value: float | None = None,
    virtual_batch_size: int | None = None,
) -> torch.Tensor:
    """`act(F.batch_norm(input, ...) + residual)` in fused passes, for (N, C), (N, C, L), (N, C, H, W) and
    (N, C, D, H, W) inputs in any memory format.

    Same arguments and semantics as torch.nn.functional.batch_norm, plus `activation` (a name such as "relu"
    or a module such as nn.LeakyReLU(0.2); see `bnfast.SUPPORTED_ACTIVATIONS`) and `num_batches_tracked`:
    with momentum=None and training, the running stats take the cumulative average with factor
    1/num_batches_tracked (the caller increments it first, as nn.BatchNorm1d does), and `residual` (any strides;
    what `act(F.batch_norm(...) + residual)` accepts: see `_check_residual`), added before the activation and
    given the gradient dy * act'(z), summed over the dims it was broadcast along.
    In training with running stats, running_mean/running_var are updated in place.

    Masked BatchNorm: `mask`, a bool tensor of the input's shape without the channel dim ((N,), (N, L), (N, H, W),
    (N, D, H, W); any strides, a broadcast view works), True at valid positions. In training the batch mean and
    biased variance are taken over the valid positions only (M = their count; the running variance gets the
    unbiased factor M/(M-1)), and every position is normalised with them; gradients are exact (a padded x does
    not enter the statistics). `pad_value` (default None) writes that value at padded positions instead, with no
    gradient through them. In eval the mask only places `pad_value`. Fewer than 2 valid positions in training
    raise ValueError, as torch does for one value per channel.

    Ghost BatchNorm: `virtual_batch_size` G (default None: off). In training, samples [0, G), [G, 2G), ... (the
    last chunk may be shorter) are each normalised with their own statistics, and the running stats end as if
    torch's batch_norm had been called on each chunk in order (with momentum=None, num_batches_tracked must then
    already count every chunk: the modules add one per chunk; a counter below the number of chunks makes a
    factor 1/0 or negative, so the running stats come out NaN or wrong). Eval ignores it. Not combined with a mask.
    """
    return batch_norm_impl(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        resolve_activation(activation),
        num_batches_tracked,
        False,
        residual=residual,
        mask=mask,
        pad_value=pad_value,
        virtual_batch_size=virtual_batch_size,
    )


def virtual_batch_size_of(chunk) -> int:
    """Ghost BatchNorm's G as a Python int: a positive integer (numpy integers too), ValueError otherwise."""
    try:
        valid = not isinstance(chunk, bool) and operator.index(chunk) >= 1
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(f"bnfast.batch_norm: virtual_batch_size must be a positive integer or None, got {chunk!r}")
    return operator.index(chunk)


def _check_virtual_batch_size(x: torch.Tensor, chunk: int, mask, training: bool) -> int:
    """Ghost BatchNorm's G (already `virtual_batch_size_of`'s int) without a mask; in training every chunk must hold
    more than one value per channel (torch's ValueError and message for the shortest chunk, the last). Returns the
    number of chunks (1 in eval, where G changes nothing)."""
    if mask is not None:
        raise ValueError("bnfast.batch_norm: virtual_batch_size and mask cannot be combined")
    if not training:
        return 1
    N = x.shape[0]
    chunks = -(-N // chunk)
    last = x[(chunks - 1) * chunk :]
    if N and last.shape[0] * math.prod(last.shape[2:]) == 1:  # torch's _verify_batch_size, on the shortest chunk
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {last.shape}")
    return chunks


def batch_norm_impl(
    x,
    running_mean,
    running_var,
    weight,
    bias,
    training,
    momentum,
    eps,
    act: Activation,
    num_batches_tracked,
    count_batch: bool,
    input_dims: tuple[int, ...] | None = None,
    residual: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    pad_value: float | None = None,
    virtual_batch_size: int | None = None,
):
    """`batch_norm` with a resolved activation; `count_batch` increments num_batches_tracked (the modules'
    `+= 1`, once per chunk under ghost BatchNorm) after the checks, so that a rejected call changes nothing;
    `input_dims` are the dims a module accepts (its `_check_input_dim`, with torch's message)."""
    if input_dims is not None and x.dim() not in input_dims:
        expected = " or ".join(f"{d}D" for d in input_dims)
        raise ValueError(f"expected {expected} input (got {x.dim()}D input)")
    tensors = (weight, bias, running_mean, running_var)
    if not _common_case(x, tensors, training, eps):
        _torch_verdict(x, running_mean, running_var, weight, bias, training, eps)
    if mask is not None:
        _check_mask(x, mask, training, pad_value)
        pad_value = None if pad_value is None else float(pad_value)
    elif pad_value is not None:
        raise ValueError("bnfast.batch_norm: pad_value needs a mask (it is written where the mask is False)")
    chunks = 1
    if virtual_batch_size is not None:
        virtual_batch_size = virtual_batch_size_of(virtual_batch_size)
        chunks = _check_virtual_batch_size(x, virtual_batch_size, mask, training)
    ghost = chunks > 1
    residual_by_torch = residual is not None and not isinstance(residual, torch.Tensor)  # a number: torch's sum
    if residual_by_torch:
        torch.broadcast_shapes(x.shape, torch.as_tensor(residual).shape)  # torch's error for a non-number
    elif residual is not None and (residual.shape, residual.dtype, residual.device) != (x.shape, x.dtype, x.device):
        residual, residual_by_torch = _check_residual(x, residual)
    # momentum=None is the cumulative average 1/num_batches_tracked; without that counter, torch's module uses a
    # factor of 0 (the stats stay): so do we
    cumulative = training and momentum is None and num_batches_tracked is not None
    if cumulative and not _counter_fits(x, num_batches_tracked):
        raise ValueError(
            "bnfast.batch_norm: num_batches_tracked must be a one-element tensor on the input's device, got "
            f"shape {tuple(num_batches_tracked.shape)} on {num_batches_tracked.device}"
        )
    if count_batch:
        num_batches_tracked.add_(chunks if ghost else 1)
        ops.record_increment(chunks if ghost else 1)  # for the call cache, while it records (bnfast.ops)
    factor = 0.0 if momentum is None or not training else float(momentum)
    traced = _is_traced(x)
    if x.numel() == 0 or not uses_triton(x) or (not traced and _needs_torch_ops()) or residual_by_torch:
        if ghost:
            return _torch_ghost_batch_norm(
                x,
                virtual_batch_size,
                running_mean,
                running_var,
                weight,
                bias,
                factor,
                cumulative,
                num_batches_tracked,
                eps,
                act,
                residual,
            )
        if mask is not None:
            return _torch_masked_batch_norm(
                x,
                mask,
                running_mean,
                running_var,
                weight,
                bias,
                training,
                factor,
                cumulative,
                num_batches_tracked,
                eps,
                act,
                residual,
                pad_value,
            )
        return _torch_batch_norm(
            x,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            factor,
            cumulative,
            num_batches_tracked,
            eps,
            act,
            residual,
        )
    return ops.batch_norm(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        num_batches_tracked if cumulative else None,
        training,
        factor,
        cumulative,
        eps,
        act.name,
        act.param,
        residual,
        mask,
        pad_value,
        virtual_batch_size if ghost else None,
        traced=traced,
    )


def _torch_masked_batch_norm(
    x,
    mask,
    running_mean,
    running_var,
    weight,
    bias,
    training,
    factor,
    cumulative,
    nbt,
    eps,
    act: Activation,
    residual,
    pad_value,
):
    """The fallback of masked BatchNorm in torch ops (same semantics as the kernels: see `batch_norm`), in the
    accumulation dtype (float64 for float64, float32 otherwise)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dims = [0, *range(2, x.dim())]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    valid = mask.unsqueeze(1)
    xa = x.to(acc)
    use_batch = training or running_mean is None
    if use_batch:
        count = valid.expand_as(xa).sum(dims).to(acc)
        mean = torch.where(valid, xa, 0.0).sum(dims) / count
        var = torch.where(valid, xa - mean.view(shape), 0.0).square().sum(dims) / count
        if training and running_mean is not None:
            f = nbt.reciprocal().to(acc) if cumulative else torch.tensor(factor, dtype=acc, device=x.device)
            with torch.no_grad():
                running_mean.copy_((1 - f) * running_mean.to(acc) + f * mean.detach())
                running_var.copy_((1 - f) * running_var.to(acc) + f * var.detach() * count / (count - 1))
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    z = (xa - mean.view(shape)) * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        z = z * weight.to(acc).view(shape)
    if bias is not None:
        z = z + bias.to(acc).view(shape)
    y = act.apply(z.to(x.dtype) if residual is None else z.to(x.dtype) + residual)
    return y if pad_value is None else torch.where(valid, y, torch.tensor(pad_value, dtype=y.dtype, device=y.device))


def _torch_ghost_batch_norm(
    x, chunk, running_mean, running_var, weight, bias, factor, cumulative, nbt, eps, act: Activation, residual
):
    """The fallback of ghost BatchNorm: torch's batch_norm on each chunk in order (running stats and, with
    momentum=None, the factor 1/num_batches_tracked of each chunk's own call), then the residual add and the
    activation on the whole."""
    chunks = -(-x.shape[0] // chunk)
    zs = []
    for g, n in enumerate(range(0, x.shape[0], chunk)):
        counted = nbt - (chunks - 1 - g) if cumulative else nbt  # the counter as torch's call on chunk g sees it
        zs.append(
            _torch_batch_norm(
                x[n : n + chunk], running_mean, running_var, weight, bias, True, factor, cumulative, counted, eps,
                Activation(""),
            )
        )  # fmt: skip
    z = torch.cat(zs)
    return act.apply(z if residual is None else z + residual)


def _torch_batch_norm(
    x, running_mean, running_var, weight, bias, training, factor, cumulative, nbt, eps, act: Activation, residual=None
):
    """The fallback: torch's batch_norm, the residual add and the activation as separate torch ops."""
    if cumulative and running_mean is not None:
        if _is_traced(x) or x.device.type != "cpu":  # float(nbt) would sync the device / break the graph
            z = _torch_cumulative_batch_norm(x, running_mean, running_var, weight, bias, nbt, eps)
        else:
            z = F.batch_norm(x, running_mean, running_var, weight, bias, training, 1.0 / float(nbt), eps)
    else:
        z = F.batch_norm(x, running_mean, running_var, weight, bias, training, factor, eps)
    return act.apply(z if residual is None else z + residual)


def _torch_cumulative_batch_norm(x, running_mean, running_var, weight, bias, nbt, eps):
    """Training batch_norm with factor 1/num_batches_tracked kept on device: momentum 1 makes torch write the
    batch mean and unbiased variance into fresh buffers, then the running stats move towards them in place."""
    batch_mean, batch_var = torch.zeros_like(running_mean), torch.ones_like(running_var)
    y = F.batch_norm(x, batch_mean, batch_var, weight, bias, True, 1.0, eps)
    with torch.no_grad():
        factor = nbt.to(running_mean.dtype).reciprocal()  # int64.reciprocal() is float32: 1/3 rounded
        running_mean.lerp_(batch_mean, factor)
        running_var.lerp_(batch_var, factor)
    return y
