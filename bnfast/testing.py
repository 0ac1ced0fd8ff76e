"""Public test hooks: run bnfast on a chosen launch plan.

    with bnfast.testing.force_plan("split", tile_elements=64):   # many splits and tiles on a tiny tensor
        y = bnfast.FusedBatchNorm1d(8)(x)

`force_plan(plan, tile_elements=None)`: `plan` is "single" (one program holds a channel block's whole
column: one launch per direction) or "split" (partials + finalize + elementwise stage: three launches);
`tile_elements` caps the split plan's tile (a power of two), so that small tensors get many splits and tiles.
Meant for tests and benchmarks (this repo's and yours): a forced "single" plan on a tensor whose column does
not fit a tile may compile huge tiles. Not thread-safe: it sets a module-level override of the launchers.

`eager_entry("native" | "function")`: the eager autograd entry, the C++ node (bnfast.native) or the
torch.autograd.Function (what runs where the node cannot be built); same kernels, same results.

`call_cache(enabled)`: the modules' call cache (a module's repeated eager call replayed from C++) on or off.

`standin_driver()`: Triton's real launch path on CPU tensors with a driver that reports an sm_90 target, loads
nothing and records what its launcher is handed (host-time benchmark, direct-launch tests; kernels compiled, not
interpreted). `record_launches()`: bnfast's launches recorded, Triton not reached at all.

Imports: torch, triton (the stand-in driver), bnfast.kernels.launch, bnfast.ops (the eager entry), bnfast.functional
(its CPU routing, switched by the stand-in driver).
"""

import contextlib

import torch

from . import ops
from .kernels import launch

PLANS = ("single", "split")
ENTRIES = ("native", "function")


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


@contextlib.contextmanager
def eager_entry(entry: str):
    """Inside the block, eager calls take the C++ autograd node ("native"; skipped by pytest's caller when it cannot
    be built: `bnfast.native.reason()`) or `ops.BatchNormFunction` ("function"); restores the previous choice."""
    if entry not in ENTRIES:
        raise ValueError(f"eager_entry: entry must be one of {ENTRIES}, got {entry!r}")
    node = ops.native_node()
    if entry == "native" and node is None:
        raise RuntimeError(f"eager_entry: the C++ autograd node is not available: {native_reason()}")
    previous = list(ops._NATIVE)
    ops._NATIVE[:] = [node if entry == "native" else None]
    try:
        yield
    finally:
        ops._NATIVE[:] = previous


@contextlib.contextmanager
def call_cache(enabled: bool):
    """Inside the block the modules' call cache (bnfast.ops "call cache": a module's eager call replayed from C++)
    is on or off; restores the previous state. On needs the C++ node (bnfast.native)."""
    node = ops.native_node()
    if enabled and node is None:
        raise RuntimeError(f"call_cache: the C++ autograd node is not available: {native_reason()}")
    previous = ops.CALL_CACHE[0]
    ops.CALL_CACHE[0] = node if enabled else None
    try:
        yield
    finally:
        ops.CALL_CACHE[0] = previous


def native_reason() -> str | None:
    """Why the C++ autograd node is not used (None when it is)."""
    from . import native

    return native.reason()


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


# ------------------------------------------------------------------------------------------ stand-in driver
triton_launch_support = launch.triton_launch_support  # None where the launch path is known, else why not


class _StandinUtils:
    """The driver's `utils`: no module is loaded; the device properties are an H100/H200's."""

    def __init__(self, owner):
        self.owner = owner

    def load_binary(self, name, kernel, shared, device):
        self.owner.loaded.append(name)
        return object(), len(self.owner.loaded), 0, 0, 1024  # module, function handle, n_regs, n_spills, threads

    @staticmethod
    def get_device_properties(device):
        return {
            "max_shared_mem": 232448,
            "multiprocessor_count": 132,
            "max_num_regs": 65536,
            "warpSize": 32,
            "sm_clock_rate": 1980000,
            "mem_clock_rate": 2619000,
            "mem_bus_width": 5120,
        }


class StandinDriver:
    """A CUDA driver for Triton that runs nothing: it reports an sm_`arch` target, device `device` and a stream,
    loads no module (`loaded` lists the kernels it was asked to load), and its launcher records its arguments in
    `launches` instead of launching: (kernel name, (gridX, gridY, gridZ), stream, function handle, the rest:
    packed metadata, launch metadata, the enter and exit hooks, then the kernel's arguments). With it active,
    `kernel[grid](...)` runs Triton's real launch path on CPU tensors (binding, specialisation key, cache lookup,
    compile for the target with ptxas; only the launcher's own C call is missing). Device -1 is the CPU's index
    (`Tensor.get_device()`), so CPU tensors are on the current device and need no device switch."""

    def __init__(self, arch: int = 90, device: int = -1, stream: int = 0x5747):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.device, self.stream = device, stream
        self.launches, self.loaded, self.device_switches = [], [], []
        self.utils = _StandinUtils(self)
        owner = self

        class Launcher:
            def __init__(self, src, metadata):
                self.name = metadata.name

            def __call__(self, gridX, gridY, gridZ, stream, function, *args):
                owner.launches.append((self.name, (gridX, gridY, gridZ), stream, function, args))

        self.launcher_cls = Launcher

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def set_current_device(self, device):
        self.device_switches.append(device)
        self.device = device

    def get_current_stream(self, device=None):
        return self.stream

    def get_device_capability(self, device=None):
        return divmod(self.target.arch, 10)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def map_python_to_cpp_type(self, ty):
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)

    @staticmethod
    def is_active():
        return True


@contextlib.contextmanager
def standin_driver(arch: int = 90, device: int = -1):
    """Inside the block Triton's active driver is a `StandinDriver` (yielded) and bnfast sends CPU tensors to its
    kernels, so that a bnfast call runs Triton's real launch path with nothing launched (outputs hold garbage).
    For measuring host time (bench/test_host_overhead.py) and testing the launch path without a GPU. Needs the
    kernels compiled, not interpreted (TRITON_INTERPRET unset when bnfast was imported) and a Triton whose
    launch path is known (`triton_launch_support`)."""
    from triton.runtime import driver as config  # the DriverConfig object

    from . import functional

    if launch.is_interpreted():
        raise RuntimeError(
            "standin_driver: the kernels are interpreted (TRITON_INTERPRET=1 at import); run in a process without it"
        )
    reason = triton_launch_support()
    if reason is not None:
        raise RuntimeError(f"standin_driver: {reason}")
    previous_driver, previous_route = config._active, functional._INTERPRETED
    standin = StandinDriver(arch, device)
    config.set_active(standin)
    functional._INTERPRETED = True  # CPU tensors go to the kernels, as under the interpreter
    try:
        yield standin
    finally:
        config._active = previous_driver
        functional._INTERPRETED = previous_route
