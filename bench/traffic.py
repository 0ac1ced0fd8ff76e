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

Nothing an implementation chooses to keep is counted: not the saved mean/rstd (a few bytes per channel), not
the second read of x that a split reduction needs, not the activation's saved output that torch's unfused
module keeps. So GB/s = min_bytes / time is the bandwidth the call would need at the floor, and its ratio to
the device's measured copy bandwidth says how close to the floor an implementation gets (1.0 = as fast as a
device-to-device copy of the same bytes).
"""

import math

MODES = ("fwd-train", "fwd-eval", "fwd+bwd")


def min_bytes(mode: str, shape, elem_size: int, param_size: int | None = None) -> int:
    """Bytes moved at the floor by one call of `mode` on an input of `shape` (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    p = elem_size if param_size is None else param_size
    numel, C = math.prod(shape), shape[1]
    tensor_passes, vector_passes = {"fwd-train": (2, 6), "fwd-eval": (2, 4), "fwd+bwd": (5, 8)}[mode]
    return tensor_passes * numel * elem_size + vector_passes * C * p
