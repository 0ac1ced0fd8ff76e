"""Torch's own BatchNorm converters, guarded against silently dropping a fused activation.

`nn.SyncBatchNorm.convert_sync_batchnorm` rebuilds every `_BatchNorm` instance as a plain SyncBatchNorm, and
`torch.nn.utils.fusion.fuse_{linear,conv}_bn_eval` fold a BatchNorm into the layer before it; neither knows
that a `FusedBatchNorm{1,2,3}d(activation=...)` also applies an activation, so both would return a model that
computes something else, without a word. `install()` (run once by `import bnfast`) wraps exactly these three
entry points: for any argument that is not a bnfast module with a fused activation they call torch's
function unchanged; for one that is, they raise TypeError naming what to use instead. A module without an
activation is a plain BatchNorm and converts as before.

Why wrap and not change the module's type: a fused module must stay an `nn.BatchNorm1d` (the drop-in promise:
`isinstance` checks in training code, state_dict, hooks), and torch's converters select by exactly that type,
or read only attributes every BatchNorm has; raising is the one answer that cannot be silently wrong.

DistributedDataParallel refuses every `nn.SyncBatchNorm` in a CPU module ("SyncBatchNorm layers only work with GPU
modules": torch's kernels need a GPU). FusedSyncBatchNorm is an nn.SyncBatchNorm that runs on CPU over gloo, so
`install()` also wraps that check (`DistributedDataParallel._passing_sync_batchnorm_handle`, when it exists): torch's
check, unchanged, for any model holding a torch SyncBatchNorm; nothing for FusedSyncBatchNorm alone.

Imports: torch, bnfast.modules.
"""

import functools

import torch
from torch import nn

from .modules import FusedBatchNormBase, FusedSyncBatchNorm

_ORIGINAL = {}


def _refuse_fused_activation(module, what: str, instead: str) -> None:
    if isinstance(module, FusedBatchNormBase) and module.activation:
        raise TypeError(
            f"bnfast: {what} would drop the activation fused into {type(module).__name__}(activation="
            f"{module.activation!r}) and compute something else; {instead}"
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
        instead = "use bnfast.FusedSyncBatchNorm.convert_sync_batchnorm, which keeps it"
        _refuse_fused_activation(module, "nn.SyncBatchNorm.convert_sync_batchnorm", instead)
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
