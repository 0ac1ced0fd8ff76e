"""`convert(model)`: adopt bnfast in an existing model with one call.

Every `nn.BatchNorm1d`/`2d`/`3d` becomes a `FusedBatchNorm1d`/`2d`/`3d` that takes over the very same Parameter
and buffer objects (so an optimizer built before the call keeps working, and outputs are unchanged). Inside an
`nn.Sequential`, a BatchNorm directly followed by a supported activation module is fused with it: the BN slot holds
`FusedBatchNorm1d(activation=...)` and the activation's slot becomes `nn.Identity()`, so indices and
state_dict keys stay valid. Only the Sequential's slot changes: an activation object reused elsewhere (the
seeds' MLP uses one `relu` twice) keeps working there. A BatchNorm that appears in several places is
converted once and shared, but not fused (its successors may differ).

The new module keeps everything else the old one carried: forward (pre-)hooks, backward hooks, state_dict
hooks (the very dicts, so existing handles still remove them) and custom attributes. A pair is not fused when
either module has hooks that would observe the difference (any hook on the activation; forward or backward hooks
on the BatchNorm: they would see the activation's output or its gradient), so every hook sees the same values.

Imports: torch, bnfast.activations, bnfast.modules.
"""

from collections import Counter

from torch import nn

from .activations import activation_of_module
from .modules import FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d, FusedBatchNormBase, adopt_state

_FUSED_TYPE = {nn.BatchNorm1d: FusedBatchNorm1d, nn.BatchNorm2d: FusedBatchNorm2d, nn.BatchNorm3d: FusedBatchNorm3d}
_FUSED_TYPE.update({fused: fused for fused in list(_FUSED_TYPE.values())})


def _is_plain_bn(module: nn.Module) -> bool:
    """torch's BatchNorm1d/2d/3d (exact types: a subclass may override forward), or a bnfast one without activation."""
    if type(module) in _FUSED_TYPE:
        return not getattr(module, "activation", None)
    return False


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _fused_from(bn: nn.modules.batchnorm._BatchNorm, activation=None) -> FusedBatchNormBase:
    fused = _FUSED_TYPE[type(bn)](
        bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta",
        bias=bn.bias is not None if bn.affine else True, activation=activation,
    )  # fmt: skip
    return adopt_state(fused, bn)


def _has_hooks(module: nn.Module, kinds=_HOOKS) -> bool:
    return any(getattr(module, kind, None) for kind in kinds)


def convert(model: nn.Module) -> nn.Module:
    """Replace nn.BatchNorm1d/2d/3d by FusedBatchNorm1d/2d/3d in place, fusing BN -> activation pairs in
    nn.Sequential; returns `model`.

    Use `convert(copy.deepcopy(model))` to keep the original.
    """
    if _is_plain_bn(model):
        return _fused_from(model)
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    converted: dict[int, FusedBatchNormBase] = {}

    def plain(bn):
        if id(bn) not in converted:
            converted[id(bn)] = _fused_from(bn)
        return converted[id(bn)]

    for parent in list(model.modules()):
        names = list(parent._modules)
        for i, name in enumerate(names):
            child = parent._modules[name]
            if child is None or not _is_plain_bn(child):
                continue
            following = parent._modules[names[i + 1]] if i + 1 < len(names) else None
            activation = activation_of_module(following) if following is not None else None
            # a BN's forward hooks would see the activation's output, its backward hooks the activation's grad
            fusable = activation is not None and not _has_hooks(following) and not _has_hooks(child)
            if isinstance(parent, nn.Sequential) and fusable and uses[id(child)] == 1:
                parent._modules[name] = _fused_from(child, activation)
                parent._modules[names[i + 1]] = nn.Identity()
            else:
                parent._modules[name] = plain(child)
    return model
