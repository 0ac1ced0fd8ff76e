"""Torch's own BatchNorm converters, guarded against computing something else without a word.

`nn.SyncBatchNorm.convert_sync_batchnorm` rebuilds every `_BatchNorm` instance as a plain SyncBatchNorm, and
`torch.nn.utils.fusion.fuse_{linear,conv}_bn_eval` fold a BatchNorm into the layer before it; neither knows
that a `FusedBatchNorm{1,2,3}d(activation=...)` also applies an activation, nor that a BatchNorm subclass
(timm's BatchNormAct2d: `.drop` and `.act` run in its forward; pytorch#187298) computes more than a BatchNorm.
`install()` (run once by `import bnfast`) wraps exactly these three entry points:

- `nn.SyncBatchNorm.convert_sync_batchnorm` (torch's converter recurses through it, so it sees every submodule):
  a bnfast module becomes what `FusedSyncBatchNorm.convert_sync_batchnorm` makes of it (a FusedSyncBatchNorm,
  activation kept); a BatchNorm subclass other than torch's own BatchNorm1d/2d/3d/SyncBatchNorm is left as it
  is, with a warning (its children are still converted); everything else is torch's function, unchanged.
- `fuse_linear_bn_eval`, `fuse_conv_bn_eval`: raise TypeError for a bnfast module with a fused activation (a
  folded Linear cannot apply it: use `bnfast.fold`) and for a BatchNorm subclass that overrides forward; call
  torch's function unchanged otherwise. A bnfast module without activation is a plain BatchNorm.

Why wrap and not change the module's type: a fused module must stay an `nn.BatchNorm1d` (the drop-in promise:
`isinstance` checks in training code, state_dict, hooks), and torch's converters select by exactly that type.

DistributedDataParallel refuses every `nn.SyncBatchNorm` in a CPU module ("SyncBatchNorm layers only work with GPU
modules": torch's kernels need a GPU). FusedSyncBatchNorm is an nn.SyncBatchNorm that runs on CPU over gloo, so
`install()` also wraps that check (`DistributedDataParallel._passing_sync_batchnorm_handle`, when it exists): torch's
check, unchanged, for any model holding a torch SyncBatchNorm; nothing for FusedSyncBatchNorm alone.

Imports: torch, bnfast.modules.
"""

import functools
import warnings

import torch
from torch import nn

from .modules import FusedBatchNormBase, FusedSyncBatchNorm

_ORIGINAL = {}


_TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _refuse_fused_activation(module, what: str, instead: str) -> None:
    if isinstance(module, FusedBatchNormBase) and module.activation:
        raise TypeError(
            f"bnfast: {what} would drop the activation fused into {type(module).__name__}(activation="
            f"{module.activation!r}) and compute something else; {instead}"
        )
    overridden = type(module).forward not in (nn.modules.batchnorm._BatchNorm.forward, FusedBatchNormBase.forward)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and overridden:
        raise TypeError(
            f"bnfast: {what} would replace {type(module).__name__}, whose forward is not BatchNorm's, by a plain "
            "BatchNorm and compute something else"
        )


def _guard_fusion(name: str):
    original = getattr(torch.nn.utils.fusion, name)
    _ORIGINAL[name] = original

    @functools.wraps(original)
    def guarded(layer, bn, *args, **kwargs):
        _refuse_fused_activation(bn, f"torch.nn.utils.fusion.{name}", "use bnfast.fold(model), which keeps it")
        return original(layer, bn, *args, **kwargs)

    guarded.__bnfast_guard__ = True
    setattr(torch.nn.utils.fusion, name, guarded)


def install() -> None:
    """Wrap the three converters (idempotent)."""
    convert = nn.SyncBatchNorm.__dict__["convert_sync_batchnorm"]
    if getattr(convert.__func__, "__bnfast_guard__", False):
        return
    original = convert.__func__
    _ORIGINAL["convert_sync_batchnorm"] = original

    @functools.wraps(original)
    def convert_sync_batchnorm(cls, module, process_group=None):
        # torch's converter recurses through cls.convert_sync_batchnorm, so every submodule passes here
        if isinstance(module, FusedBatchNormBase):
            return FusedSyncBatchNorm.convert_sync_batchnorm(module, process_group)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and type(module) not in _TORCH_BN:
            warnings.warn(
                f"bnfast: nn.SyncBatchNorm.convert_sync_batchnorm leaves {type(module).__name__} as it is (not "
                "synchronised): its forward may do more than BatchNorm (timm's norm-act layers: use "
                "bnfast.FusedSyncBatchNorm.convert_sync_batchnorm or timm.layers.convert_sync_batchnorm)",
                stacklevel=2,
            )
            for name, child in module.named_children():
                module.add_module(name, cls.convert_sync_batchnorm(child, process_group))
            return module
        return original(cls, module, process_group)

    convert_sync_batchnorm.__bnfast_guard__ = True
    nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(convert_sync_batchnorm)
    for name in ("fuse_linear_bn_eval", "fuse_conv_bn_eval"):
        _guard_fusion(name)
    _allow_fused_sync_bn_in_cpu_ddp()


def _allow_fused_sync_bn_in_cpu_ddp() -> None:
    ddp = nn.parallel.DistributedDataParallel
    original = getattr(ddp, "_passing_sync_batchnorm_handle", None)
    if original is None:
        return
    _ORIGINAL["_passing_sync_batchnorm_handle"] = original

    @functools.wraps(original)
    def check(self, module):
        torch_sync = (m for m in module.modules() if isinstance(m, nn.SyncBatchNorm))
        if any(not isinstance(m, FusedSyncBatchNorm) for m in torch_sync):
            return original(self, module)
        return None

    check.__bnfast_guard__ = True
    ddp._passing_sync_batchnorm_handle = check
