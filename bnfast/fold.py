"""`fold(model)`: fold eval-mode BatchNorm into the preceding Linear, for inference.

In eval, BatchNorm is an affine map per feature with constants from its buffers, so Linear -> BatchNorm1d is
one Linear (s = gamma / sqrt(running_var + eps)):

    W' = W * s[:, None]        b' = (b - running_mean) * s + beta        (b = 0 without a Linear bias)

`fold` returns a deep copy of the model (the input is not modified) in which, inside every nn.Sequential, each
`nn.BatchNorm1d` or `FusedBatchNorm1d` that directly follows an `nn.Linear` is folded: the Linear's slot
holds the folded Linear (always with a bias), and the BN's slot holds the fused activation's torch module
(`FusedBatchNorm1d(activation="relu")` -> `nn.ReLU()`) or `nn.Identity()`, so the Sequential's indices stay
valid. The folded weights are computed in float64 and cast to the Linear's dtype, so eval outputs equal the
original's to rounding. The state_dict keys change: the BN entries go, and the Linear may gain a bias.

Left in place (with the rest of the model unchanged): a BatchNorm without running stats
(track_running_stats=False, or buffers set to None), which normalises with batch statistics even in eval and
so is no constant affine map; a BatchNorm not preceded by a Linear in a Sequential; subclasses of the
module types above (their forward may differ).

Assumption: the Linear's output is (N, features), as in an MLP. On a 3-D (N, L, features) output,
BatchNorm1d would normalise dim 1 (L), not the Linear's features; `fold` cannot see shapes and only checks
that num_features == out_features.
"""

import copy

import torch
from torch import nn

from .modules import FusedBatchNorm1d

_FOLDABLE_BN = (nn.BatchNorm1d, FusedBatchNorm1d)


def _foldable(linear: nn.Module, bn: nn.Module) -> bool:
    return (
        type(linear) is nn.Linear
        and type(bn) in _FOLDABLE_BN
        and bn.running_mean is not None
        and bn.running_var is not None
        and bn.num_features == linear.out_features
    )


@torch.no_grad()
def _folded_linear(linear: nn.Linear, bn: nn.BatchNorm1d) -> nn.Linear:
    f64 = dict(dtype=torch.float64, device=linear.weight.device)
    scale = (bn.running_var.to(**f64) + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.to(**f64)
    bias = linear.bias.to(**f64) if linear.bias is not None else torch.zeros(linear.out_features, **f64)
    bias = (bias - bn.running_mean.to(**f64)) * scale
    if bn.bias is not None:
        bias = bias + bn.bias.to(**f64)
    folded = nn.Linear(linear.in_features, linear.out_features, bias=True, device="meta")
    folded.weight = nn.Parameter((linear.weight.to(**f64) * scale[:, None]).to(linear.weight.dtype))
    folded.bias = nn.Parameter(bias.to(linear.weight.dtype))
    return folded.train(linear.training)


def _replacement(bn: nn.BatchNorm1d) -> nn.Module:
    if isinstance(bn, FusedBatchNorm1d):
        return bn.activation.module()  # nn.Identity() when no activation is fused
    return nn.Identity()


def fold(model: nn.Module) -> nn.Module:
    """A copy of `model` for inference with every Linear -> BatchNorm1d pair in an nn.Sequential folded into
    one Linear (the BN's fused activation, if any, takes the BN's slot). `model` is not modified.

    Raises ValueError when `model` is in training mode, or when a BatchNorm to be folded is (call
    `model.eval()` first): in training BatchNorm uses batch statistics and updates its buffers, which a
    folded Linear cannot do. See the module docstring for what is left in place.
    """
    if model.training:
        raise ValueError(
            f"bnfast.fold: {type(model).__name__} is in training mode; folding BatchNorm into Linear is for "
            "inference (BatchNorm then uses its running stats): call model.eval() first"
        )
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    for parent in model.modules():
        if isinstance(parent, nn.Sequential):
            children = list(parent)
            for linear, bn in zip(children, children[1:], strict=False):
                if _foldable(linear, bn) and bn.training:
                    raise ValueError(
                        f"bnfast.fold: BatchNorm {names[id(bn)]!r} is in training mode although the model is in "
                        "eval mode; call model.eval() so that every submodule is in eval mode"
                    )
    folded = copy.deepcopy(model)
    for parent in list(folded.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        keys = list(parent._modules)
        for linear_key, bn_key in zip(keys, keys[1:], strict=False):
            linear, bn = parent._modules[linear_key], parent._modules[bn_key]
            if _foldable(linear, bn):
                parent._modules[linear_key] = _folded_linear(linear, bn)
                parent._modules[bn_key] = _replacement(bn)
    return folded
