"""bnfast's Triton kernels, installed as `bnfast.kernels` (setup.py maps this folder; PyPI has a `kernels`).

`batch_norm.py` and `activations.py` hold the @triton.jit code; `launchers.py` the host side that views,
allocates, picks meta-parameters and launches. Nothing here imports torch.nn.
"""

from .launchers import LaunchConfig, bn_bwd, bn_fwd, is_interpreted

__all__ = ["LaunchConfig", "bn_bwd", "bn_fwd", "is_interpreted"]
