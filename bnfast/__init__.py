"""bnfast: fused Triton kernels for BatchNorm (+ activation), drop-ins for torch.nn.BatchNorm1d/2d/3d.

A call reads top-down: `FusedBatchNorm1d.forward` (modules) -> `functional.batch_norm_impl` (checks, routing)
-> `ops` (autograd: one setup and backward for the eager Function and the torch.library op) ->
`kernels.launch` (stages) -> `kernels.batch_norm` (Triton). Nothing imports upward. `kernels/` is installed as
`bnfast.kernels` (pyproject.toml); a source checkout is used through `pip install -e .`.
"""

from . import guards, testing
from .activations import SUPPORTED_ACTIVATIONS, resolve_activation
from .fold import fold
from .functional import batch_norm, uses_triton
from .fuse import FusionReport, convert, fuse  # convert: bnfast/convert.py, and bnfast/fuse.py for trace=True
from .modules import FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d, FusedFrozenBatchNorm2d, FusedSyncBatchNorm
from .recalibrate import recalibrate

guards.install()  # torch's BatchNorm converters refuse a fused activation instead of dropping it

__version__ = "0.1.0"
__all__ = [
    "SUPPORTED_ACTIVATIONS",
    "FusedBatchNorm1d",
    "FusedBatchNorm2d",
    "FusedBatchNorm3d",
    "FusedFrozenBatchNorm2d",
    "FusedSyncBatchNorm",
    "FusionReport",
    "batch_norm",
    "convert",
    "fold",
    "fuse",
    "recalibrate",
    "resolve_activation",
    "testing",
    "uses_triton",
]
