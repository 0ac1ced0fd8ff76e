"""`convert(model)`: adopt bnfast in an existing model with one call.

Module by module (always):
- every `nn.BatchNorm1d`/`2d`/`3d` becomes a `FusedBatchNorm1d`/`2d`/`3d`;
- timm's norm-act layers (`BatchNormAct2d`, `SyncBatchNormAct`, `FrozenBatchNormAct2d`: a BatchNorm whose forward
  also runs `self.drop` then `self.act`) become `FusedBatchNorm2d` / `FusedSyncBatchNorm` /
  `FusedFrozenBatchNorm2d` with that activation fused, when `drop` is the identity and `act` is one bnfast fuses
  (or the identity), neither with hooks; otherwise they stay as they are;
- torchvision's `FrozenBatchNorm2d` (timm uses the same class) becomes `FusedFrozenBatchNorm2d` (one eval kernel).
The new module takes over the very same Parameter and buffer objects (so an optimizer built before the call
keeps working, and outputs are unchanged). Exact types only: any other BatchNorm subclass (its forward may do
more) is left alone. timm and torchvision are never imported: their classes are looked up in `sys.modules`, so
a model holding them has already loaded them.

Inside an `nn.Sequential` (that exact type: a subclass may override forward), a BatchNorm directly followed by a
supported activation module is fused with it: the
BN slot holds `FusedBatchNorm1d(activation=...)` and the activation's slot becomes `nn.Identity()`, so indices
and state_dict keys stay valid. Only the Sequential's slot changes: an activation object reused elsewhere (the
seeds' MLP uses one `relu` twice) keeps working there. A BatchNorm that appears in several places is
converted once and shared, but not fused (its successors may differ). A forward that iterates over a
Sequential's children and keeps an intermediate output (a feature tap after the BatchNorm) is not visible here:
`convert(model, trace=True)` (bnfast/fuse.py) confirms every pair in the traced forward instead, and also fuses
what the forward writes out (`relu(bn(x) + identity)`).

The new module keeps everything else the old one carried: forward (pre-)hooks, backward hooks, state_dict
hooks (the very dicts, so existing handles still remove them) and custom attributes. A pair is not fused when
either module has hooks that would observe the difference (any hook on the activation; forward or backward hooks
on the BatchNorm: they would see the activation's output or its gradient), so every hook sees the same values.
(A timm norm-act layer's own hooks already see the activation's output: they move with it.)

Imports: torch, bnfast.activations, bnfast.known, bnfast.modules.
"""

from collections import Counter

from torch import nn

from .activations import activation_of_module
from .known import has_hooks, norm_act_activation, timm_norm_act_types, torchvision_frozen_type
from .modules import (
    FusedBatchNorm1d,
    FusedBatchNorm2d,
    FusedBatchNorm3d,
    FusedBatchNormBase,
    FusedFrozenBatchNorm2d,
    FusedSyncBatchNorm,
    adopt_state,
)

_FUSED_TYPE = {nn.BatchNorm1d: FusedBatchNorm1d, nn.BatchNorm2d: FusedBatchNorm2d, nn.BatchNorm3d: FusedBatchNorm3d}
_FUSED_TYPE.update({fused: fused for fused in list(_FUSED_TYPE.values())})


def _is_plain_bn(module: nn.Module) -> bool:
    """torch's BatchNorm1d/2d/3d (exact types: a subclass may override forward), or a bnfast one without activation."""
    if type(module) in _FUSED_TYPE:
        return not getattr(module, "activation", None)
    return False


def _fused_from(bn: nn.modules.batchnorm._BatchNorm, activation=None) -> FusedBatchNormBase:
    fused = _FUSED_TYPE[type(bn)](
        bn.num_features,
        bn.eps,
        bn.momentum,
        bn.affine,
        bn.track_running_stats,
        device="meta",
        bias=bn.bias is not None if bn.affine else True,
        activation=activation,
    )
    return adopt_state(fused, bn)


def _frozen_from(frozen: nn.Module, activation=None) -> FusedFrozenBatchNorm2d | None:
    buffers = [frozen._buffers.get(name) for name in ("weight", "bias", "running_mean", "running_var")]
    if any(t is None or t.dim() != 1 or t.shape != buffers[0].shape or t.dtype != buffers[0].dtype for t in buffers):
        return None
    if not isinstance(frozen.eps, (float, int)):
        return None
    new = FusedFrozenBatchNorm2d(buffers[0].shape[0], frozen.eps, activation=activation, device="meta")
    return adopt_state(new, frozen)


def fused_replacement(module: nn.Module) -> nn.Module | None:
    """The bnfast module that computes what `module` computes, taking over its tensors and hooks; None when
    bnfast does not know `module`'s type (it stays as it is)."""
    if _is_plain_bn(module):
        return _fused_from(module)
    kind = type(module)
    if kind is torchvision_frozen_type():
        return _frozen_from(module)
    timm = timm_norm_act_types()
    if kind not in timm.values():
        return None
    activation = norm_act_activation(module)
    if activation is None:
        return None
    if kind is timm.get("FrozenBatchNormAct2d"):
        return _frozen_from(module, activation)
    if kind is timm.get("SyncBatchNormAct"):
        new = FusedSyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            module.process_group,
            device="meta",
            bias=module.bias is not None if module.affine else True,
            activation=activation,
        )
        return adopt_state(new, module)
    return adopt_state(
        FusedBatchNorm2d(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device="meta",
            bias=module.bias is not None if module.affine else True,
            activation=activation,
        ),
        module,
    )


def _fusable_with_next(new: nn.Module) -> bool:
    return isinstance(new, (FusedBatchNormBase, FusedFrozenBatchNorm2d)) and not new.activation


def convert_modules(model: nn.Module, *, sequential_pairs: bool = True) -> nn.Module:
    """Replace every BatchNorm bnfast knows (see the module docstring) by its bnfast module in place, fusing
    BN -> activation pairs in (exactly) nn.Sequential unless `sequential_pairs` is False; returns `model`.
    A bnfast module already there counts as converted (a second call fuses its Sequential pairs). The public
    entry is `bnfast.convert` (bnfast/fuse.py), which also fuses by tracing."""
    own = fused_replacement(model)
    if own is not None:
        return own
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    converted: dict[int, nn.Module | None] = {}

    def replacement(module):
        if id(module) not in converted:
            converted[id(module)] = module if _fusable_with_next(module) else fused_replacement(module)
        return converted[id(module)]

    for parent in list(model.modules()):
        names = list(parent._modules)
        for i, name in enumerate(names):
            child = parent._modules[name]
            new = replacement(child) if child is not None else None
            if new is None:
                continue
            following = parent._modules[names[i + 1]] if i + 1 < len(names) else None
            activation = activation_of_module(following) if following is not None else None
            # a BN's forward hooks would see the activation's output, its backward hooks the activation's grad
            fusable = activation is not None and not has_hooks(following) and not has_hooks(child)
            # exactly nn.Sequential: a subclass may override forward (reuse an intermediate output, say)
            in_sequential = sequential_pairs and type(parent) is nn.Sequential
            if in_sequential and fusable and uses[id(child)] == 1 and _fusable_with_next(new):
                new.activation = activation  # not shared (used once): fusing changes no other slot
                parent._modules[names[i + 1]] = nn.Identity()
            parent._modules[name] = new
    return model
