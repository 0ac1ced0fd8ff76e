"""bnfast: fused Triton kernels for BatchNorm (+ activation), drop-in for torch.nn.BatchNorm1d."""

from pathlib import Path

if not (Path(__file__).parent / "kernels").is_dir():
    # Source checkout used via PYTHONPATH: kernels/ sits beside bnfast/ (setup.py installs it as bnfast.kernels).
    __path__.append(str(Path(__file__).resolve().parent.parent))

from .activations import SUPPORTED_ACTIVATIONS, resolve_activation  # noqa: E402
from .batch_norm import BatchNormFn, FusedBatchNorm1d  # noqa: E402
from .convert import convert  # noqa: E402
from .fold import fold  # noqa: E402
from .functional import batch_norm, uses_triton  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "SUPPORTED_ACTIVATIONS",
    "BatchNormFn",
    "FusedBatchNorm1d",
    "batch_norm",
    "convert",
    "fold",
    "resolve_activation",
    "uses_triton",
]
