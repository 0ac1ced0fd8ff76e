"""`batch_norm(...)`: torch.nn.functional.batch_norm for (N, C) and (N, C, L) inputs, with a fused activation.

Dispatch:
- CUDA tensors run the Triton kernels (`bnfast.kernels`), through `BatchNormFn` for autograd.
- CPU tensors run the same kernels when TRITON_INTERPRET=1 was set before bnfast was imported (Triton's
  interpreter: slow, exact, how CI tests the kernels), and otherwise fall back to
  `torch.nn.functional.batch_norm` followed by the torch activation (same semantics, no Triton).
- Empty inputs take torch's own path everywhere: torch defines their outputs and gradients, and there is
  nothing for a kernel to do.
- Under torch.compile the Triton path goes through the `bnfast::` custom ops (`bnfast.ops`), which torch
  traces without graph breaks.
"""

import torch
import torch.nn.functional as F

from .activations import Activation, resolve_activation
from .kernels import is_interpreted

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def uses_triton(x: torch.Tensor) -> bool:
    """True when `x` is computed by the Triton kernels, False when by the torch fallback."""
    return x.is_cuda or (x.device.type == "cpu" and is_interpreted())


def _check_inputs(x, running_mean, running_var, weight, bias, training):
    if x.dim() not in (2, 3):
        raise ValueError(f"expected 2D or 3D input (got {x.dim()}D input)")
    if x.dtype not in _SUPPORTED_DTYPES:
        scalar_type = x.new_empty(0).type().removeprefix("torch.").removesuffix("Tensor")  # torch's name: 'Long'
        raise NotImplementedError(f"\"batch_norm\" not implemented for '{scalar_type}': bnfast supports float16, "
                                  "bfloat16, float32 and float64 inputs")  # fmt: skip
    C = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != C:
            raise RuntimeError(f"{name} should contain {C} elements not {t.numel()}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if training and x.numel() > 0 and x.shape[0] * (x.shape[2] if x.dim() == 3 else 1) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")


def _momentum_factor(momentum, num_batches_tracked) -> tuple[float, bool]:
    """(factor, cumulative): momentum=None means the cumulative average 1/num_batches_tracked."""
    if momentum is not None:
        return float(momentum), False
    if num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs the num_batches_tracked tensor")
    return 0.0, True


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
) -> torch.Tensor:
    """`act(F.batch_norm(input, ...))` in one fused pass for (N, C) and (N, C, L) inputs.

    Same arguments and semantics as torch.nn.functional.batch_norm, plus `activation` (a name such as "relu"
    or a module such as nn.LeakyReLU(0.2); see `bnfast.SUPPORTED_ACTIVATIONS`) and `num_batches_tracked`:
    with momentum=None and training, the running stats take the cumulative average with factor
    1/num_batches_tracked (the caller increments it first, as nn.BatchNorm1d does).
    In training with running stats, running_mean/running_var are updated in place.
    """
    act = resolve_activation(activation)
    _check_inputs(input, running_mean, running_var, weight, bias, training)
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    factor, cumulative = _momentum_factor(momentum, num_batches_tracked) if training else (0.0, False)
    if input.numel() == 0 or not uses_triton(input):
        return _torch_batch_norm(input, running_mean, running_var, weight, bias, training, factor, cumulative,
                                 num_batches_tracked, eps, act)  # fmt: skip
    if torch.compiler.is_compiling():
        from .ops import batch_norm_op

        return batch_norm_op(input, running_mean, running_var, num_batches_tracked, weight, bias, training, factor,
                             cumulative, eps, act)  # fmt: skip
    from .batch_norm import BatchNormFn

    return BatchNormFn.apply(input, weight, bias, running_mean, running_var, num_batches_tracked, training, factor,
                             cumulative, eps, act)  # fmt: skip


def _torch_batch_norm(x, running_mean, running_var, weight, bias, training, factor, cumulative, nbt, eps,
                      act: Activation):  # fmt: skip
    """The fallback: torch's batch_norm, then the activation as a separate torch op."""
    if cumulative and running_mean is not None:
        factor = 1.0 / float(nbt)
    return act.apply(F.batch_norm(x, running_mean, running_var, weight, bias, training, factor, eps))
