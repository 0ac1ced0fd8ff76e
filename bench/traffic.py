"""The minimum number of bytes a BatchNorm (+ activation) call must move: the one place GB/s is counted from.

x is (N, C) or (N, C, L); numel = N*C*L; e = x's element size; p = the parameters' and running stats' element
size (the module's dtype: the benchmarks cast the whole module, like `model.to(dtype)`).

    fwd-train:  read x, write y                     2*numel*e
                read w, b, running_mean, running_var,
                write running_mean, running_var     + 6*C*p
    fwd-eval:   read x, write y                     2*numel*e
                read w, b, running_mean, running_var  + 4*C*p
    fwd+bwd:    forward as fwd-train                2*numel*e + 6*C*p
                backward reads x and dy, writes dx  + 3*numel*e
                and writes dw, db                   + 2*C*p        = 5*numel*e + 8*C*p

With a fused residual (act(BN(x) + r)), the forward also reads r and the backward writes dr: + numel*e each
(min fwd+bwd = 7*numel*e + 8*C*p); recomputing the activation's input in the backward reads r again, which is
counted by the standalone figure below but not here (a 1-bit mask would do).

The standalone floor (`standalone_bytes`, issue 13) counts what a BatchNorm that does not fuse into its
neighbours must move when the tensor is larger than the chip keeps: the forward reads x twice (statistics, then
normalise) and writes y; the backward reads x and dy twice and writes dx: fwd-train 3, fwd-eval 2, fwd+bwd 8
passes (+1 read of r in each direction, +1 write of dr, with a residual).

Nothing an implementation chooses to keep is counted: not the saved mean/rstd (a few bytes per channel), not
the second read of x that a split reduction needs, not the activation's saved output that torch's unfused
module keeps. So GB/s = min_bytes / time is the bandwidth the call would need at the floor, and its ratio to
the device's measured copy bandwidth says how close to the floor an implementation gets (1.0 = as fast as a
device-to-device copy of the same bytes).
"""

import math

MODES = ("fwd-train", "fwd-eval", "fwd+bwd")


def min_bytes(mode: str, shape, elem_size: int, param_size: int | None = None, residual: bool = False) -> int:
    """Bytes moved at the floor by one call of `mode` on an input of `shape` (see the module docstring)."""
    return _bytes(mode, shape, elem_size, param_size, {"fwd-train": 2, "fwd-eval": 2, "fwd+bwd": 5}, residual)


def standalone_bytes(mode: str, shape, elem_size: int, param_size: int | None = None, residual: bool = False):
    """Bytes a standalone BatchNorm moves on a tensor larger than the chip keeps (see the module docstring)."""
    return _bytes(
        mode,
        shape,
        elem_size,
        param_size,
        {"fwd-train": 3, "fwd-eval": 2, "fwd+bwd": 8},
        residual,
        extra_residual_read=True,
    )


def _bytes(mode, shape, elem_size, param_size, passes, residual, extra_residual_read=False) -> int:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    p = elem_size if param_size is None else param_size
    numel, C = math.prod(shape), shape[1]
    tensor_passes = passes[mode]
    if residual:  # read r in the forward; write dr (and read r again) in the backward
        tensor_passes += 1 + (1 + extra_residual_read if mode == "fwd+bwd" else 0)
    vector_passes = {"fwd-train": 6, "fwd-eval": 4, "fwd+bwd": 8}[mode]
    return tensor_passes * numel * elem_size + vector_passes * C * p
