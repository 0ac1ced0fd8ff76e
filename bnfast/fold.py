"""`fold(model)`: fold eval-mode BatchNorm into the preceding Linear or convolution, for inference.

In eval, BatchNorm is an affine map per channel with constants from its buffers, so Linear -> BatchNorm1d is
one Linear and Conv{1,2,3}d -> BatchNorm{1,2,3}d one convolution (s = gamma / sqrt(running_var + eps), per output
channel, along the weight's first dimension):

    W' = W * s[:, None, ...]        b' = (b - running_mean) * s + beta        (b = 0 without a bias)

`fold` returns a deep copy of the model (the input is not modified) in which each such pair is folded: the
layer's slot holds the folded layer (always with a bias), and the BN's slot holds the fused activation's torch
module (`FusedBatchNorm2d(activation="relu")` -> `nn.ReLU()`) or `nn.Identity()`, so the model's forward and a
Sequential's indices stay valid. The folded weights are computed in float64 and cast to the layer's dtype, so
eval outputs equal the original's to rounding. The state_dict keys change: the BN entries go, and the layer may
gain a bias.

Where pairs are found: wherever the traced forward calls the BatchNorm directly on the layer's output and
nothing else uses it (torch.fx trace with `bnfast.fuse.Tracer`: plain nn.Sequentials are inlined there); a model
fx cannot trace gets the pairs adjacent in an nn.Sequential (that exact type) only, with a warning. The
BatchNorms: torch's BatchNorm1d/2d/3d, bnfast's FusedBatchNorm1d/2d/3d,
FusedFrozenBatchNorm2d and torchvision's FrozenBatchNorm2d (after a Conv2d). A pair is folded only when each
module is used once in the model (and called once in the trace), the layer's output goes to the BatchNorm alone,
the BatchNorm has one input (no fused residual) and neither has hooks.

Left in place (with the rest of the model unchanged): a BatchNorm without running stats
(track_running_stats=False, or buffers set to None), which normalises with batch statistics even in eval and
so is no constant affine map; a BatchNorm not preceded by such a layer; subclasses of the module types above
(their forward may differ); ConvTranspose (its output channels are not the weight's first dimension).

Assumption for Linear: the output is (N, features), as in an MLP. On a 3-D (N, L, features) output,
BatchNorm1d would normalise dim 1 (L), not the Linear's features; `fold` checks only that num_features ==
out_features.

Imports: torch (torch.fx), bnfast.known, bnfast.modules, bnfast.fuse (its Tracer).
"""

import copy
import warnings
from collections import Counter

import torch
from torch import nn

from .fuse import Tracer
from .known import has_hooks, torchvision_frozen_type
from .modules import FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d, FusedBatchNormBase, FusedFrozenBatchNorm2d

_BN_AFTER = {
    nn.Linear: (nn.BatchNorm1d, FusedBatchNorm1d),
    nn.Conv1d: (nn.BatchNorm1d, FusedBatchNorm1d),
    nn.Conv2d: (nn.BatchNorm2d, FusedBatchNorm2d, FusedFrozenBatchNorm2d),
    nn.Conv3d: (nn.BatchNorm3d, FusedBatchNorm3d),
}


def _out_features(layer: nn.Module) -> int:
    return layer.out_features if type(layer) is nn.Linear else layer.out_channels


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    kinds = _BN_AFTER.get(type(layer), ())
    if type(layer) is nn.Conv2d:
        kinds = (*kinds, torchvision_frozen_type())
    return (
        type(bn) in kinds
        and getattr(bn, "running_mean", None) is not None
        and getattr(bn, "running_var", None) is not None
        and bn.running_mean.shape == (_out_features(layer),)
        and not has_hooks(layer)
        and not has_hooks(bn)
    )


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold `bn` into `layer` in place (layer belongs to fold's copy)."""
    f64 = dict(dtype=torch.float64, device=layer.weight.device)
    scale = (bn.running_var.to(**f64) + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.to(**f64)
    out = _out_features(layer)
    bias = layer.bias.to(**f64) if layer.bias is not None else torch.zeros(out, **f64)
    bias = (bias - bn.running_mean.to(**f64)) * scale
    if bn.bias is not None:
        bias = bias + bn.bias.to(**f64)
    weight = layer.weight.to(**f64) * scale.view(-1, *[1] * (layer.weight.dim() - 1))
    dtype = layer.weight.dtype
    layer.weight = nn.Parameter(weight.to(dtype), requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(bias.to(dtype), requires_grad=layer.weight.requires_grad)


def _replacement(bn: nn.Module) -> nn.Module:
    if isinstance(bn, (FusedBatchNormBase, FusedFrozenBatchNorm2d)):
        return bn.activation.module()  # nn.Identity() when no activation is fused
    return nn.Identity()


def _pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer path, BatchNorm path) of every foldable pair in the traced forward (the layer's output used by the
    BatchNorm alone), or in nn.Sequential where fx cannot trace the model."""
    names = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), name)
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    pairs = {}
    try:
        graph = Tracer().trace(model)
    except Exception as error:  # noqa: BLE001 - whatever fx raises, the Sequential pairs stand
        warnings.warn(
            f"bnfast.fold: torch.fx cannot trace {type(model).__name__} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); folding pairs in nn.Sequential only",
            stacklevel=3,
        )
        for parent in model.modules():
            if type(parent) is nn.Sequential:  # exactly: a subclass may override forward
                children = list(parent)
                for layer, bn in zip(children, children[1:], strict=False):
                    if _foldable(layer, bn) and uses[id(layer)] == uses[id(bn)] == 1:
                        pairs[names[id(bn)]] = names[id(layer)]
        return [(layer, bn) for bn, layer in pairs.items()]
    # traced: only the pairs the forward shows (a plain Sequential is inlined, so its pairs are here; one that is
    # iterated with an intermediate output kept, or a subclass, shows the layer's output used twice)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and len(node.args) == 1 and not node.kwargs else None
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        if source.args and calls[node.target] == calls[source.target] == 1:
            layer, bn = model.get_submodule(source.target), model.get_submodule(node.target)
            if _foldable(layer, bn) and uses[id(layer)] == uses[id(bn)] == 1:
                pairs[names[id(bn)]] = names[id(layer)]
    return [(layer, bn) for bn, layer in pairs.items()]


def fold(model: nn.Module) -> nn.Module:
    """A copy of `model` for inference with every Linear/Conv -> BatchNorm pair folded into one layer (the BN's
    fused activation, if any, takes the BN's slot). `model` is not modified.

    Raises ValueError when `model` is in training mode, or when a BatchNorm to be folded is (call
    `model.eval()` first): in training BatchNorm uses batch statistics and updates its buffers, which a
    folded layer cannot do. See the module docstring for where pairs are found and what is left in place.
    """
    if model.training:
        raise ValueError(
            f"bnfast.fold: {type(model).__name__} is in training mode; folding BatchNorm into Linear is for "
            "inference (BatchNorm then uses its running stats): call model.eval() first"
        )
    pairs = _pairs(model)
    for _, bn_name in pairs:
        bn = model.get_submodule(bn_name)
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.training:
            raise ValueError(
                f"bnfast.fold: BatchNorm {bn_name!r} is in training mode although the model is in "
                "eval mode; call model.eval() so that every submodule is in eval mode"
            )
    folded = copy.deepcopy(model)
    for layer_name, bn_name in pairs:
        _fold_into(folded.get_submodule(layer_name), folded.get_submodule(bn_name))
        parent, _, name = bn_name.rpartition(".")
        setattr(folded.get_submodule(parent), name, _replacement(folded.get_submodule(bn_name)))
    return folded
