"""The BatchNorm layers of other libraries that bnfast recognises, found without importing those libraries.

timm's norm-act layers (`BatchNormAct2d`, `SyncBatchNormAct`, `FrozenBatchNormAct2d`: a BatchNorm whose forward
also runs `self.drop` then `self.act`) and torchvision's `FrozenBatchNorm2d` (timm uses the same class) are looked
up in `sys.modules`: a model holding one has loaded its library already, and bnfast's import never loads them.
Exact types only, everywhere: a subclass may override forward.

Imports: torch, bnfast.activations.
"""

import sys

from torch import nn

from .activations import Activation, activation_of_module

HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def has_hooks(module: nn.Module, kinds=HOOKS) -> bool:
    return any(getattr(module, kind, None) for kind in kinds)


def timm_norm_act_types() -> dict:
    """{"BatchNormAct2d": class, "SyncBatchNormAct": ..., "FrozenBatchNormAct2d": ...} of the loaded timm (empty
    when timm is not loaded)."""
    norm_act = sys.modules.get("timm.layers.norm_act")
    names = ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d")
    return {name: getattr(norm_act, name) for name in names if hasattr(norm_act, name)} if norm_act else {}


def torchvision_frozen_type():
    """torchvision.ops.FrozenBatchNorm2d when torchvision is loaded, else None."""
    return getattr(sys.modules.get("torchvision.ops.misc"), "FrozenBatchNorm2d", None)


def norm_act_activation(module: nn.Module) -> Activation | None:
    """The activation a timm norm-act layer applies after its BatchNorm, when bnfast can fuse the whole tail:
    `drop` absent or the identity, `act` absent, the identity or a supported activation, no hooks on either,
    no other submodule. None otherwise (the layer must then stay as it is)."""
    children = dict(module.named_children())
    if set(children) - {"act", "drop"} or any(has_hooks(m) for m in children.values()):
        return None
    drop, act = children.get("drop"), children.get("act")
    if drop is not None and type(drop) is not nn.Identity:
        return None
    if act is None or type(act) is nn.Identity:
        return Activation("")
    return activation_of_module(act)
