"""`batch_norm_ref`: BatchNorm + activation written out in plain torch ops: the ground truth for tests and bench.

It shares no code with the kernels or with torch's batch_norm, so it can check both. With `upcast=True` the
math runs in float64 (the tests' "ref64"); autograd through it gives reference gradients.
"""

import torch

from .activations import resolve_activation


def batch_norm_ref(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation=None,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Returns (y, new_running_mean, new_running_var); the inputs are not modified.

    x is (N, C) or (N, C, L). Training: batch mean and biased variance over all dims but C; the running stats
    move by `momentum` towards the batch mean and the unbiased variance. Eval: the running stats normalize.
    """
    act = resolve_activation(activation)
    work = torch.float64 if upcast else x.dtype

    def cast(t):
        return None if t is None else t.to(work)

    xw = cast(x)
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)  # broadcast a (C,) vector against x
    new_mean, new_var = cast(running_mean), cast(running_var)
    if training:
        mean = xw.mean(dims)
        var = xw.var(dims, unbiased=False)
        if running_mean is not None:
            count = x.numel() // x.shape[1]
            new_mean = (1 - momentum) * new_mean + momentum * mean.detach()
            new_var = (1 - momentum) * new_var + momentum * var.detach() * count / (count - 1)
    else:
        mean, var = new_mean, new_var
    z = (xw - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if weight is not None:
        z = z * cast(weight).view(shape)
    if bias is not None:
        z = z + cast(bias).view(shape)
    return act.apply(z), new_mean, new_var
