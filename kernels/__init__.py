"""bnfast's Triton kernels, installed as `bnfast.kernels` (pyproject.toml maps this folder; PyPI
has a `kernels`).

`activations.py` (the table of fused activations + their jit helpers) and `batch_norm.py` (the math, the
partials' format, the passes per plan, the kernels in the order they run) hold the @triton.jit code;
`launch.py` the host side: one function per stage, `bn_fwd` / `bn_bwd` composing them; `compat.py` the shims for
the supported Triton releases (imported first). Nothing here imports torch.nn or anything from `bnfast` outside
this package.
"""

from . import compat  # noqa: F401  (first: shims for the installed Triton, see compat.py)
from .launch import LaunchConfig, bn_bwd, bn_fwd, is_interpreted

__all__ = ["LaunchConfig", "bn_bwd", "bn_fwd", "is_interpreted"]
