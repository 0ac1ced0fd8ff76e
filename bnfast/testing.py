"""Public test hooks: run bnfast on a chosen launch plan.

    with bnfast.testing.force_plan("split", tile_elements=64):   # many splits and tiles on a tiny tensor
        y = bnfast.FusedBatchNorm1d(8)(x)

`force_plan(plan, tile_elements=None)`: `plan` is "single" (one program holds a channel block's whole
column: one launch per direction) or "split" (partials + finalize + elementwise stage: three launches);
`tile_elements` caps the split plan's tile (a power of two), so that small tensors get many splits and tiles.
Meant for tests and benchmarks (this repo's and yours): a forced "single" plan on a tensor whose column does
not fit a tile may compile huge tiles. Not thread-safe: it sets a module-level override of the launchers.

Imports: bnfast.kernels.launch.
"""

import contextlib

from .kernels import launch

PLANS = ("single", "split")


@contextlib.contextmanager
def force_plan(plan: str, tile_elements: int | None = None):
    """Force the launch plan (and the split tile size) inside the `with` block; restores the previous one."""
    if plan not in PLANS:
        raise ValueError(f"force_plan: plan must be one of {PLANS}, got {plan!r}")
    if tile_elements is not None and (tile_elements < 1 or tile_elements & (tile_elements - 1)):
        raise ValueError(f"force_plan: tile_elements must be a power of two, got {tile_elements}")
    previous = launch.PLAN_OVERRIDE
    launch.PLAN_OVERRIDE = (plan, tile_elements)
    try:
        yield
    finally:
        launch.PLAN_OVERRIDE = previous


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.name, grid, args, kwargs))


@contextlib.contextmanager
def record_launches():
    """Inside the block, bnfast's kernel launches are recorded, not run: yields the list of
    (kernel name, grid, args, kwargs). For measuring bnfast's own host time (bench/test_host_overhead.py) and
    enumerating compile configurations (bench/kernel_report.py, on meta tensors). Outputs hold garbage."""
    from .kernels import batch_norm as kernels

    names = [n for n in vars(kernels) if n.startswith("_bn_") and n.endswith("_kernel")]
    saved = {n: getattr(kernels, n) for n in names}
    log = []
    try:
        for n in names:
            setattr(kernels, n, _Recorder(n, log))
        yield log
    finally:
        for n, v in saved.items():
            setattr(kernels, n, v)
