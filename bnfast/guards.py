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

Imports: torch, bnfast.modules.
"""

import functools

import torch
from torch import nn

from .modules import FusedBatchNormBase

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
        instead = "use a BatchNorm without activation followed by the activation module"
        _refuse_fused_activation(module, "nn.SyncBatchNorm.convert_sync_batchnorm", instead)
        return original(cls, module, process_group)

    convert_sync_batchnorm.__bnfast_guard__ = True
    nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(convert_sync_batchnorm)
    for name in ("fuse_linear_bn_eval", "fuse_conv_bn_eval"):
        _guard_fusion(name)
