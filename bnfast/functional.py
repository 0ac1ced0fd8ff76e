"""`batch_norm(...)`: torch.nn.functional.batch_norm for (N, C) and (N, C, L) inputs, with a fused activation.

Dispatch:
- CUDA tensors run the Triton kernels (`bnfast.kernels`), through `BatchNormFn` for autograd.
- CPU tensors run the same kernels when TRITON_INTERPRET=1 was set before bnfast was imported (Triton's
  interpreter: slow, exact, how CI tests the kernels), and otherwise fall back to
  `torch.nn.functional.batch_norm` followed by the torch activation (same semantics, no Triton).
- Empty inputs take torch's own path everywhere: torch defines their outputs and gradients, and there is
  nothing for a kernel to do.
- The Triton path has two routes to the same launchers (`bnfast.kernels.bn_fwd`/`bn_bwd`):
  eager calls go through `BatchNormFn` (autograd.Function; the forward kernel updates the running stats in
  place, no extra launch, least host overhead). Under torch.compile / torch.export, or on fake tensors, they
  go through the `bnfast::` torch.library ops (`bnfast.ops`), which torch traces without graph breaks; the
  training op is functional (its kernel writes the new running stats into fresh tensors), and this function
  then copies them into running_mean/running_var in place, so both routes update the same buffer objects.
"""

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from . import ops  # registers the bnfast:: ops on import, so torch.export.load finds them after `import bnfast`
from .activations import Activation, resolve_activation
from .kernels import is_interpreted

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def uses_triton(x: torch.Tensor) -> bool:
    """True when `x` is computed by the Triton kernels, False when by the torch fallback."""
    return x.is_cuda or (x.device.type == "cpu" and is_interpreted())


def _is_traced(x: torch.Tensor) -> bool:
    """True under torch.compile / torch.export, or for fake tensors (FakeTensorMode, make_fx): then the kernels
    must be reached through the `bnfast::` ops, which torch can trace; eager calls keep `BatchNormFn`."""
    if torch.compiler.is_compiling():
        return True
    return type(x) is not torch.Tensor and is_fake(x)  # the type test keeps plain eager tensors cheap


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
    if _is_traced(input):
        y, new_mean, new_var = ops.batch_norm(input, running_mean, running_var, num_batches_tracked, weight, bias,
                                              training, factor, cumulative, eps, act)  # fmt: skip
        if new_mean is not None:
            with torch.no_grad():  # in place: modules, DDP and optimizers hold these very tensors
                running_mean.copy_(new_mean)
                running_var.copy_(new_var)
        return y
    from .batch_norm import BatchNormFn

    return BatchNormFn.apply(input, weight, bias, running_mean, running_var, num_batches_tracked, training, factor,
                             cumulative, eps, act)  # fmt: skip


def _torch_batch_norm(x, running_mean, running_var, weight, bias, training, factor, cumulative, nbt, eps,
                      act: Activation):  # fmt: skip
    """The fallback: torch's batch_norm, then the activation as a separate torch op."""
    if cumulative and running_mean is not None:
        if _is_traced(x):  # float(nbt) would be a data-dependent graph break under torch.compile
            return act.apply(_torch_cumulative_batch_norm(x, running_mean, running_var, weight, bias, nbt, eps))
        factor = 1.0 / float(nbt)
    return act.apply(F.batch_norm(x, running_mean, running_var, weight, bias, training, factor, eps))


def _torch_cumulative_batch_norm(x, running_mean, running_var, weight, bias, nbt, eps):
    """Training batch_norm with factor 1/num_batches_tracked kept on device: momentum 1 makes torch write the
    batch mean and unbiased variance into fresh buffers, then the running stats move towards them in place."""
    batch_mean, batch_var = torch.zeros_like(running_mean), torch.ones_like(running_var)
    y = F.batch_norm(x, batch_mean, batch_var, weight, bias, True, 1.0, eps)
    with torch.no_grad():
        factor = nbt.reciprocal().to(running_mean.dtype)
        running_mean.lerp_(batch_mean, factor)
        running_var.lerp_(batch_var, factor)
    return y
