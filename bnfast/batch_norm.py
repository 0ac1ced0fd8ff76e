"""`FusedBatchNorm1d` (drop-in torch.nn.BatchNorm1d on Triton kernels) and its autograd Function.

The module is a subclass of nn.BatchNorm1d, so the constructor, parameters, buffers, state_dict,
reset_parameters, reset_running_stats, input-dim check, pickling and deepcopy are torch's own; only
`forward` differs (it calls `bnfast.functional.batch_norm`) and an optional activation is fused.

Saved for the backward: the input x and two per-channel vectors (mean and rstd in training; the running
buffers in eval). nn.BatchNorm1d followed by an activation module also keeps the BN output (or the
activation's output) alive for the activation's backward; bnfast recomputes it from x in the backward
kernel instead, so a BN + activation layer keeps one (N, C, L) tensor where torch keeps two.
"""

import inspect

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .activations import Activation, resolve_activation
from .functional import batch_norm
from .kernels import bn_bwd, bn_fwd

_TORCH_HAS_BN_BIAS = "bias" in inspect.signature(nn.BatchNorm1d.__init__).parameters


class BatchNormFn(torch.autograd.Function):
    """Eager autograd for the Triton path. Running stats are updated in place inside the forward kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum,
                cumulative, eps, activation: Activation):  # fmt: skip
        y, mean, stat = bn_fwd(
            x, weight, bias, running_mean, running_var, num_batches_tracked, training=training, momentum=momentum,
            cumulative=cumulative, eps=eps, activation=activation.name, act_param=activation.param,
        )  # fmt: skip
        ctx.save_for_backward(x, weight, bias, mean, stat)
        ctx.training, ctx.eps, ctx.activation = training, eps, activation
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, stat = ctx.saved_tensors
        needs_dx, needs_dw, needs_db = ctx.needs_input_grad[:3]
        act = ctx.activation
        dx, dw, db = bn_bwd(
            dy, x, weight, bias, mean, stat, training=ctx.training, eps=ctx.eps, activation=act.name,
            act_param=act.param, needs_dx=needs_dx, needs_dw=needs_dw, needs_db=needs_db,
        )  # fmt: skip
        # running_mean, running_var, num_batches_tracked and the five scalars get no gradient
        return dx, dw, db, None, None, None, None, None, None, None, None


class FusedBatchNorm1d(nn.BatchNorm1d):
    """Drop-in :class:`torch.nn.BatchNorm1d` on Triton kernels, optionally fusing an activation.

    ``activation`` is None, a name ("relu", "leaky_relu", "elu", "selu", "silu"/"swish", "gelu", "gelu_tanh",
    "sigmoid", "tanh", "mish") or the matching torch module (``nn.LeakyReLU(0.2)``, ``nn.GELU("tanh")``, ...).
    The activation has no state: the state_dict is exactly nn.BatchNorm1d's.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 activation=None) -> None:  # fmt: skip
        self.activation = resolve_activation(activation)  # before super(): reset_parameters may print repr
        if _TORCH_HAS_BN_BIAS:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        else:  # older torch: no bias keyword; drop the bias ourselves
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
            if affine and not bias:
                self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        momentum = self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        else:
            momentum = 0.0 if momentum is None else momentum  # the stats are not updated: any factor will do
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats  # only then are the buffers read or written
        return batch_norm(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            bn_training,
            momentum,
            self.eps,
            activation=self.activation,
            num_batches_tracked=self.num_batches_tracked,
        )
