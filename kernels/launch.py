"""Host side of the BatchNorm kernels: view as (N, C, S), allocate, pick meta-parameters, launch; one stage each.

Every stage runs in the same order: view, allocate, `launch_config` (memoised), launch. The stages are the
units that SyncBatchNorm puts collectives between and that BatchNorm2d/3d reuse; `bn_fwd` / `bn_bwd`
compose them into the two launch plans (see kernels/batch_norm.py for the math, the partials' format and
the passes):

    forward   single-pass: forward_single                     split: stats_partial -> stats_finalize -> normalize
    SyncBN    stats_partial -> stats_merge -> all_gather -> stats_finalize (per-row shifts) -> normalize
    eval fwd  normalize (running stats)
    backward  single-pass: backward_single                    split: grad_partial -> grad_finalize -> grad_input
    SyncBN    grad_partial -> grad_finalize -> all_reduce -> grad_input
    eval bwd  single-pass: backward_single                    split: grad_partial (+ dx) -> grad_finalize

Inputs are validated by `bnfast.functional` (shapes, dtypes, M >= 2 in training). `as_ncs` views any 2-D to
5-D tensor as (N, C, S) without copying when its spatial dims can be merged, and `launch_config` picks the
tile's long axis from the strides: C when stride_c == 1 ((N, C), channels_last, a transposed (N, L, C)),
S otherwise (NCL, NCHW). The host path is lean on purpose (a layer of the MNIST model computes for ~3 us on a
GPU): the configuration is memoised on plain integers, and nothing is allocated beyond outputs and workspace.

Launching: every stage calls `_launch` with the kernel's arguments in signature order (pointers, integers,
floats, constexprs). The first launch of a configuration goes through Triton's `kernel[grid](...)`
(JITFunction.run: binding, specialisation key, cache, compile); later ones call the compiled kernel's launcher
directly, keyed on everything Triton specialises on (see "direct launch" below; BNFAST_DIRECT_LAUNCH=0 or a Triton
other than 3.6/3.8 turns it off; the interpreter always takes kernel[grid]). Triton launches on the current
device: `_launch` makes the tensors' device current when it is not (one integer comparison otherwise).
`bn_fwd` / `bn_bwd` keep a launch plan per call signature (see "launch plans" below): after the first call, the
stages' views, configuration and arguments are not rebuilt; the same launches are replayed with the call's tensors.

Tests and tools steer the plan through `bnfast.testing.force_plan` (it sets `PLAN_OVERRIDE`, which is part of
the memoised configuration's key), and record launches by swapping the kernels on `kernels.batch_norm` (stages
look them up there).

Imports: torch, triton, kernels.batch_norm, kernels.activations.
"""

import dataclasses
import functools
import inspect
import operator
import os
from math import copysign
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import batch_norm as _k
from .activations import ACTIVATIONS

SINGLE_MAX_ELEMENTS = 4096  # a single-pass tile: <= 16 values per thread at 8 warps, no spills in the backward
TILE_ELEMENTS = 4096  # streaming tile of the split kernels: 16 KiB of float32 per program per iteration
MAX_BLOCK_S = 512
# S-fast tiles: at most 2 channels, then rows of n. Each channel of a tile carries its per-channel vectors (mean,
# rstd, weight, bias) across the tile's layout: NCHW 7x7 at (4, 16, 64) took 222-255 registers and spilled up to
# 300 bytes on sm_90 (triton 3.6); (32, 2, 64) takes 56-109 (bench.kernel_report --matrix bench)
MAX_BLOCK_C_S_FAST = 2
MAX_BLOCK_C = 64  # C-fast tiles: 64 channels = 256 B of float32 per row, 16 lanes x 128 bits
PROGRAMS_PER_SM = 4  # split until about this many programs per SM, to have enough bytes in flight
MAX_SPLITS = 1024  # bounds the (K, C) workspace and the finalize loop
FINALIZE_BLOCK_SPLITS = 32
FINALIZE_BLOCK_C = 32
CPU_SM_COUNT = 4  # stands in for the SM count under the interpreter, so CPU tests exercise several splits
PLAN_OVERRIDE: tuple[str, int | None] | None = None  # ("single" | "split", tile_elements): bnfast.testing


def is_interpreted() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return _INTERPRETED


_INTERPRETED = type(_k._bn_fwd_single_kernel).__name__ == "InterpretedFunction"


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    plan: str  # "single" (one program holds a channel block's whole column) or "split"
    BLOCK_N: int
    BLOCK_C: int
    BLOCK_S: int
    num_splits: int  # K, programs along the reduction; 1 for "single"
    num_warps: int
    grid: tuple[int, int]  # (channel blocks, K); ghost BatchNorm: (chunks x channel blocks, K)
    chunk: int = 0  # ghost BatchNorm: rows of the (N, C, S) view per chunk (the tile is sized for one); else 0
    num_chunks: int = 1


def _pow2(n: int) -> int:
    """next power of two >= n, in plain integer math (triton.next_power_of_2 costs ~2.8 us a call)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _num_warps(tile_elements: int) -> int:
    return max(1, min(8, tile_elements // 256))


@functools.cache
def _sm_count(device_index: int) -> int:
    """SMs of CUDA device `device_index` (`Tensor.get_device()`: an int, cheaper than a torch.device); -1 is CPU."""
    if device_index >= 0:
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    return CPU_SM_COUNT


@functools.lru_cache(maxsize=4096)
def launch_config(
    N: int, C: int, S: int, c_fast: bool, widen: int, sms: int, override=None, chunks: int = 1
) -> LaunchConfig:
    """Tile shape, split count, warps and grid for x viewed as (N, C, S). Memoised: called on every launch.

    c_fast: stride_c == 1, so the tile's long axis is C (>= 16 channels when there are that many: 128-bit
    accesses); otherwise S (BLOCK_S = next_pow2(S) up to MAX_BLOCK_S). widen = 2 halves the elements per tile
    for kernels whose registers per value are about double (`register_widening`). The plan is single-pass when a
    program can hold all N*S values of its channel block in SINGLE_MAX_ELEMENTS; otherwise the reduction is
    split so that channel blocks x splits ~ PROGRAMS_PER_SM * SMs, which fills the GPU even for C = 32.
    `override` (from bnfast.testing.force_plan) forces the plan and caps the split tile.
    Ghost BatchNorm: N is the rows of one chunk, and `chunks` chunks share the grid's first axis (each chunk's
    channel blocks in turn), which then counts chunks x channel blocks programs.
    """
    single_max, tile = SINGLE_MAX_ELEMENTS // widen, TILE_ELEMENTS // widen
    if override is not None:
        single_max = single_max if override[0] == "single" else 0
        tile = override[1] or tile
    pow2_n, pow2_c, pow2_s = _pow2(N), _pow2(C), _pow2(S)
    min_block_c = min(pow2_c, 16) if c_fast else 1
    column = pow2_n * pow2_s
    if column * min_block_c <= single_max or (override is not None and override[0] == "single"):
        spread_c = _pow2(_cdiv(C * chunks, sms))  # one program per SM when C (x chunks) is large
        block_c = max(min_block_c, min(single_max // column, spread_c, pow2_c))
        tile_elems = column * block_c
        return LaunchConfig(
            "single",
            pow2_n,
            block_c,
            pow2_s,
            1,
            _num_warps(tile_elems * widen),
            (_cdiv(C, block_c) * chunks, 1),
            N if chunks > 1 else 0,
            chunks,
        )
    if c_fast:  # long axis C, then rows along s (contiguous in channels_last), then n
        if 1 < S < 16:  # short s with many n rows: at full size ptxas spills a few bytes on sm_80 (kernel report)
            tile //= 2
        block_c = min(pow2_c, MAX_BLOCK_C, max(1, tile))
        block_s = min(pow2_s, max(1, tile // block_c))
    else:  # long axis S; a few channels per tile when S is short (more rows of n instead: see MAX_BLOCK_C_S_FAST)
        # rows not 16-aligned: no vector access, a 64-bit address per value. At full size the eval residual backward
        # of NCHW 7x7 took 130 registers (1 CTA per SM at 8 warps); at half size triton 3.8's ptxas still spilled
        # 4-12 bytes in its grad_input at 80 registers; a quarter (4 warps) compiles with neither (kernel report)
        if S % 16:
            tile //= 4
        block_s = min(pow2_s, MAX_BLOCK_S, max(1, tile))
        block_c = min(pow2_c, max(1, tile // (4 * block_s)), MAX_BLOCK_C_S_FAST)
    block_n = max(1, min(pow2_n, tile // (block_s * block_c)))
    num_tiles = _cdiv(N, block_n) * _cdiv(S, block_s)
    c_blocks = _cdiv(C, block_c) * chunks
    num_splits = max(1, min(num_tiles, MAX_SPLITS, _cdiv(PROGRAMS_PER_SM * sms, c_blocks)))
    return LaunchConfig(
        "split",
        block_n,
        block_c,
        block_s,
        num_splits,
        _num_warps(block_n * block_c * block_s * widen),
        (c_blocks, num_splits),
        N if chunks > 1 else 0,
        chunks,
    )


def register_widening(acc: torch.dtype, activation: str = "", backward: bool = False) -> int:
    """2 where a value needs about twice the registers (float64 ACC; a heavy activation's backward), else 1.
    Full-size tiles there need 255 registers and spill; half-size ones compile with no spill."""
    heavy = acc == torch.float64 or (backward and activation and ACTIVATIONS[activation].heavy_backward)
    return 2 if heavy else 1


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise (16-bit inputs included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_TL = {torch.float32: tl.float32, torch.float64: tl.float64}


def is_transposed_2d(x: torch.Tensor) -> bool:
    """A 2-D (N, C) tensor whose N axis is the contiguous one (a transposed (C, N))."""
    return x.dim() == 2 and x.stride(0) == 1 and x.stride(1) != 1 and x.shape[0] > 1


class Ncs(NamedTuple):
    """A tensor seen as (N, C, S) with element strides: what every stage takes. Plain integers, not a view
    tensor: building one costs a microsecond of host time per tensor per call."""

    t: torch.Tensor  # the tensor whose storage the kernels index (its data pointer)
    N: int
    C: int
    S: int
    sn: int
    sc: int
    ss: int

    @property
    def dims(self):
        return self.N, self.C, self.S

    @property
    def strides(self):
        return self.sn, self.sc, self.ss


def as_ncs(t: torch.Tensor, transposed_2d: bool = False) -> Ncs:
    """t (N, C, *spatial) as (N, C, S): the same storage whenever the spatial dims merge (contiguous,
    channels_last, any (N, C) or (N, C, L)), a contiguous copy otherwise. With `transposed_2d` (decided once, on
    x, by `is_transposed_2d`, and applied to y, dy and dx alike) a 2-D tensor is seen as (1, C, N): x's unit
    stride lands on S, and M = N * S is unchanged."""
    shape, strides = t.shape, t.stride()
    if len(shape) == 2:
        if transposed_2d:
            return Ncs(t, 1, shape[1], shape[0], 0, strides[1], strides[0])
        return Ncs(t, shape[0], shape[1], 1, strides[0], strides[1], 1)
    if len(shape) == 3:
        return Ncs(t, *shape, *strides)
    S, ss = 1, 1  # merge the spatial dims from the innermost out; sizes of 1 impose nothing
    for size, stride in zip(reversed(shape[2:]), reversed(strides[2:]), strict=True):
        if size == 1:
            continue
        if S > 1 and stride != ss * S:
            return as_ncs(t.contiguous())
        ss, S = (stride, size) if S == 1 else (ss, S * size)
    return Ncs(t, shape[0], shape[1], S, strides[0], strides[1], ss)


def merge_rows(*views: Ncs | None) -> tuple[Ncs | None, ...]:
    """With stride_c == 1 and the (n, s) rows evenly spaced (stride_n == S * stride_s: channels_last, and (N, C))
    in every given view, see each as (N*S, C, 1): one dense row axis, so a 7x7 channels_last image fills the tile
    instead of 49 of 64 rows. M = N*S is unchanged. Returns the views unchanged when any of them does not merge
    (a contiguous NCL y beside a channels-last x, say); None entries pass through."""
    present = [v for v in views if v is not None]
    if any(v.S == 1 or v.sc != 1 or v.sn != v.S * v.ss for v in present):
        return views
    return tuple(None if v is None else Ncs(v.t, v.N * v.S, v.C, 1, v.ss, 1, 1) for v in views)


def new_output(x: torch.Tensor) -> torch.Tensor:
    """An output allocated as torch's batch_norm allocates it (`empty_like(x, x.suggest_memory_format())`): in
    channels_last order when a 4-D/5-D x is channels_last, dense or not (a sliced or strided channels_last view
    gets a dense channels_last output), contiguous otherwise (any other stride order, expanded inputs, and every
    2-D/3-D input)."""
    # contiguous_format, never preserve: a contiguous x may carry odd strides on its size-1 dims, which torch's
    # output does not copy (and empty_like with a format is as cheap as the plain call). A tensor that is both
    # contiguous and channels_last (size-1 dims) is contiguous for torch.
    if x.is_contiguous() or x.dim() < 4 or not _channels_last(x):
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return torch.empty_like(x, memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def _channels_last(x: torch.Tensor) -> bool:
    """c10's `is_strides_like_channels_last(_3d)` for a 4-D/5-D x (what `suggest_memory_format` asks): dense
    channels_last, or strides non-decreasing in the order c, w, h, n (c, w, h, d, n), size-1 dims and the
    ambiguous N111 case resolved as c10 resolves them."""
    if x.is_contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d):
        return True
    sizes, strides = x.shape, x.stride()
    if strides[1] == 0:  # an expanded C: NCHW, as in c10
        return False
    lower = 0
    for d in (1, 3, 2, 0) if x.dim() == 4 else (1, 4, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < lower or (d == 0 and lower == strides[1]):
            return False
        lower = strides[d] * sizes[d]
    return True


def config_for(x: Ncs, widen: int, split: bool = False, chunk: int = 0) -> LaunchConfig:
    """`launch_config` for x; `split` forces the split plan (SyncBatchNorm: the partials must exist), keeping a
    forced tile size; `chunk` (ghost BatchNorm: rows of x per chunk, fewer than x.N) sizes the tile for one chunk."""
    c_fast = x.sc == 1 and x.C > 1 and (x.S == 1 or x.ss != 1)
    override = PLAN_OVERRIDE
    if split and (override is None or override[0] != "split"):
        override = ("split", override[1] if override is not None else None)
    if chunk:
        return launch_config(chunk, x.C, x.S, c_fast, widen, _sm_count(x.t.get_device()), override, _cdiv(x.N, chunk))
    return launch_config(x.N, x.C, x.S, c_fast, widen, _sm_count(x.t.get_device()), override)


def prepare(
    x: torch.Tensor, *others: torch.Tensor | None, widen: int = 1, split: bool = False, chunk: int | None = None
):
    """(x3, *others3, cfg): x and the tensors indexed like it (y, dy, dx, the residual and its gradient; None
    passes through) as (N, C, S) views, and the launch configuration, the one way every caller builds them
    (bn_fwd, bn_bwd, the SyncBatchNorm stages, recalibrate, the kernel report). A transposed 2-D x decides the
    view of all of them (`is_transposed_2d`); channels_last rows are merged when every view allows it
    (`merge_rows`); `widen` and `split` are `config_for`'s. `chunk` (ghost BatchNorm: samples per chunk, fewer
    than N) keeps the samples on the view's row axis (no transposed view; merged rows are S per sample), and
    `cfg.chunk` is then the rows per chunk."""
    transposed = chunk is None and is_transposed_2d(x)
    views = [as_ncs(x, transposed)]
    for t in others:
        views.append(as_ncs(t, transposed) if t is not None else None)
    if views[0].sc == 1 and views[0].S > 1:  # channels_last: one dense row axis when every tensor allows it
        views = merge_rows(*views)
    rows = chunk * (views[0].N // x.shape[0]) if chunk is not None else 0
    return (*views, config_for(views[0], widen, split, rows))


def mask_view(mask: torch.Tensor) -> torch.Tensor:
    """A mask (x's shape without the channel dim, bool) as x's rank with a channel dim of size 1, whose stride is 1
    (a size-1 dim imposes nothing: `merge_rows` then treats it as it treats x), in bytes (uint8, the same
    storage): what `prepare` takes beside x; its (N, 1, S) view gives the kernels the mask's (n, s) strides."""
    m = mask.view(torch.uint8)
    return m.as_strided((m.shape[0], 1, *m.shape[1:]), (m.stride(0), 1, *m.stride()[1:]), m.storage_offset())


def _mask_args(m: Ncs | None, x: Ncs):
    """(pointer, (stride_n, stride_s)) of the mask view for a kernel; x's pointer and zeros when there is none."""
    return (m.t, (m.sn, m.ss)) if m is not None else (x.t, (0, 0))


def _stat_pair(like: torch.Tensor, C: int, dtype: torch.dtype):
    """mean and rstd on `like`'s device: two allocations, not rows of one (they are op outputs, which must not
    alias)."""
    return like.new_empty(C, dtype=dtype), like.new_empty(C, dtype=dtype)


def _vec_stride(t: torch.Tensor | None) -> int:
    return t.stride(0) if t is not None else 0


def _ncs_or(v: Ncs | None, default: Ncs) -> Ncs:
    return v if v is not None else default


def _or(t, default):
    """A tensor argument, or a dummy pointer the kernel never dereferences (its constexpr flag is off)."""
    return t if t is not None else default


# ---------------------------------------------------------------------------------------------- direct launch
# After the first launch of a configuration through Triton's `kernel[grid](...)` (JITFunction.run: binding,
# specialisation, cache lookup, compile), the compiled kernel's launcher is called directly on later launches of
# the same configuration. The key holds everything Triton specialises on, or more: the kernel, the device index,
# num_warps, every constexpr, every integer argument's exact value (which fixes its type, == 1 and divisibility
# by 16), every pointer's dtype, and Triton's debug and instrumentation knobs; a launch whose pointers are not
# all 16-byte aligned (Triton specialises on that too) always goes through `kernel[grid]`, and so does any launch
# while a launch hook is set. Float arguments are annotated tl.float64 in every kernel: Triton does not
# specialise on them. The launcher gets exactly the arguments JITFunction.run gives it (tests/test_direct_launch.py
# compares them through the stand-in driver of bnfast.testing).
SUPPORTED_TRITON = ("3.6", "3.8")  # the launch paths studied (JITFunction.run, CompiledKernel); others: kernel[grid]


def triton_launch_support(version: str = triton.__version__) -> str | None:
    """None when Triton `version`'s launch path is one the direct launch knows; otherwise why not, in words."""
    if ".".join(version.split(".")[:2]) not in SUPPORTED_TRITON:
        return f"triton {version}: the launch path is known for triton {' and '.join(SUPPORTED_TRITON)}"
    return None


def _direct_launch_default() -> bool:
    """On unless BNFAST_DIRECT_LAUNCH=0, the kernels are interpreted, or Triton's version is not a known one."""
    return (
        os.environ.get("BNFAST_DIRECT_LAUNCH", "1") != "0" and triton_launch_support() is None and not is_interpreted()
    )


_DIRECT: dict = {}  # key -> (kernel, launcher, function, packed metadata)
_DIRECT_MAX = 4096  # entries; the cache is emptied when full (a new key then costs one kernel[grid] launch)
_JITFunction = triton.runtime.jit.JITFunction
_dtype_of = operator.attrgetter("dtype")
_data_ptr = operator.methodcaller("data_ptr")
_CONSTEXPR_NAMES: dict[str, tuple[str, ...]] = {}
# the kernels' Python functions (JITFunction and InterpretedFunction both keep them), taken before any recorder
_KERNEL_FNS = {n: k.fn for n, k in vars(_k).items() if n.startswith("_bn_") and n.endswith("_kernel")}
_DRIVER = [None, None, None, None]  # Triton's active driver; its get_current_device, set_current_device, stream
_RUNTIME_KNOBS = triton.knobs.runtime
_COMPILATION_KNOBS = triton.knobs.compilation
try:  # the DriverConfig object (triton.runtime.driver is shadowed by it)
    from triton.runtime import driver as _DRIVER_CONFIG
except ImportError:  # pragma: no cover - a Triton without it takes kernel[grid]
    _DRIVER_CONFIG = None


def _constexpr_names(name: str, count: int) -> tuple[str, ...]:
    """The names of kernel `name`'s last `count` parameters: its constexprs (every kernel declares them last)."""
    names = _CONSTEXPR_NAMES.get(name)
    if names is None:
        names = _CONSTEXPR_NAMES[name] = tuple(inspect.signature(_KERNEL_FNS[name]).parameters)[-count:]
    return names


def _active_driver():
    """Triton's active driver's device and stream functions (refreshed when the active driver changes)."""
    active = triton.runtime.driver.active
    if _DRIVER[0] is not active:
        get_device = active.get_current_device
        if get_device is torch.cuda.current_device:
            get_device = torch._C._cuda_getDevice  # the same answer once CUDA is initialised, without the Python
        _DRIVER[:] = active, get_device, active.set_current_device, active.get_current_stream
        _DIRECT.clear()  # launchers belong to the driver that loaded them
        _GENERATION[0] += 1
    return _DRIVER


def _launch(name, grid, num_warps, device, ptrs, ints, floats, consts):
    """Launch kernel `name` (looked up on kernels.batch_norm, where bnfast.testing.record_launches swaps in
    recorders) with the arguments in its signature's order: pointers (tensors), integers, floats, constexprs.
    `device` is the tensors' device index (`Tensor.get_device()`): the launch runs on it and on its current
    stream, switching the current device only when it differs (the common case costs one comparison)."""
    if _CAPTURE is not None:  # a launch plan is being captured (see "launch plans")
        _CAPTURE.append((name, grid, num_warps, device, ptrs, ints, floats, consts))
    kernel = getattr(_k, name)
    if DIRECT_LAUNCH and _DRIVER[0] is _DRIVER_CONFIG._active:
        key = (
            name,
            device,
            num_warps,
            consts,
            ints,
            tuple(map(_dtype_of, ptrs)),
            _RUNTIME_KNOBS.debug,
            _COMPILATION_KNOBS.instrumentation_mode,
        )
        entry = _DIRECT.get(key)
        if entry is not None and entry[0] is kernel and not functools.reduce(operator.or_, map(_data_ptr, ptrs)) & 15:
            if device == _DRIVER[1]():
                _direct(entry, grid, device, (*ptrs, *ints, *floats, *consts))
            else:
                with _on_device(device):
                    _direct(entry, grid, device, (*ptrs, *ints, *floats, *consts))
            return
    kwargs = dict(zip(_constexpr_names(name, len(consts)), consts, strict=True))
    if not isinstance(kernel, _JITFunction):  # Triton's interpreter (CPU tensors, no device), or a recorder
        kernel[grid](*ptrs, *ints, *floats, **kwargs, num_warps=num_warps)
        return
    driver = _active_driver()
    if device != driver[1]():
        with _on_device(device):
            compiled = kernel[grid](*ptrs, *ints, *floats, **kwargs, num_warps=num_warps)
    else:
        compiled = kernel[grid](*ptrs, *ints, *floats, **kwargs, num_warps=num_warps)
    aligned = not functools.reduce(operator.or_, map(_data_ptr, ptrs)) & 15
    if DIRECT_LAUNCH and aligned and not kernel.pre_run_hooks and hasattr(compiled, "packed_metadata"):
        if len(_DIRECT) >= _DIRECT_MAX:
            _DIRECT.clear()
        key = (
            name,
            device,
            num_warps,
            consts,
            ints,
            tuple(map(_dtype_of, ptrs)),
            _RUNTIME_KNOBS.debug,
            _COMPILATION_KNOBS.instrumentation_mode,
        )
        _DIRECT[key] = (kernel, compiled.run, compiled.function, compiled.packed_metadata, compiled.launch_metadata)


def _direct(entry, grid, device, args):
    """What JITFunction.run does after its cache hit, for a compiled kernel found in `_DIRECT`."""
    _, launcher, function, packed, launch_metadata = entry
    stream = _DRIVER[3](device)
    launcher(
        grid[0],
        grid[1] if len(grid) > 1 else 1,
        1,
        stream,
        function,
        packed,
        launch_metadata(grid, stream, *args),
        _RUNTIME_KNOBS.launch_enter_hook,
        _RUNTIME_KNOBS.launch_exit_hook,
        *args,
    )


class _on_device:
    """Make CUDA device `device` current for a launch (Triton launches on the current device), then restore."""

    __slots__ = ("device", "previous")

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        driver = _active_driver()
        self.previous = driver[1]()
        driver[2](self.device)

    def __exit__(self, *exc):
        _DRIVER[2](self.previous)


def clear_direct_cache():
    """Forget every cached launch (the next launch of each configuration goes through kernel[grid] again)."""
    _DIRECT.clear()
    _GENERATION[0] += 1  # the launch plans' entries too


DIRECT_LAUNCH = _direct_launch_default()  # bnfast.testing and the host-time benchmark may switch it at run time


# ----------------------------------------------------------------------------------------------- launch plans
# A layer calls bn_fwd / bn_bwd with the same layout step after step, and everything they derive from it (the
# (N, C, S) views, the configuration, each launch's integers, floats, constexprs and grid) is the same each time.
# So the first call of a signature runs the stages (`_bn_fwd` / `_bn_bwd`) while `_launch` records what it is
# handed (`_CAPTURE`), and `_plan` turns that into a `_Plan`: the outputs' layouts, and per launch its constant
# arguments and which of the call's tensors (by position: inputs, then outputs) each pointer is. Later calls of
# the signature allocate outputs of the same layouts and replay the launches with their own tensors: the same
# arguments to the same kernels, so the same bits (tests/test_launch_plans.py). The signature (`bn_fwd`,
# `bn_bwd`) holds every argument the stages read except the tensors' data: shapes and strides, dtypes, the device
# index and its SM count, vectors' dtype and stride, every flag and float (with its sign: -0.0 == 0.0 in a key),
# and PLAN_OVERRIDE. A call is not planned (the stages run every time) when a pointer is none of the call's
# tensors (a contiguous copy, a mask view, a split plan's workspace), when two of its tensors are the same object
# (which one a pointer is would be ambiguous), or with a mask. Each replayed launch goes direct when the launch's
# direct entry is current (see "direct launch"), through `_launch` otherwise (kernel[grid], the interpreter, a
# recorder), which then refreshes the entry. BNFAST_LAUNCH_PLANS=0 (or LAUNCH_PLANS = False) turns plans off.
LAUNCH_PLANS = os.environ.get("BNFAST_LAUNCH_PLANS", "1") != "0"
_PLANS: dict = {}  # signature -> _Plan
_PLANS_MAX = 4096  # entries; emptied when full
_CAPTURE: list | None = None  # while a plan is captured: _launch appends its arguments here
_GENERATION = [0]  # bumped whenever cached launchers must not be used any more (clear_direct_cache)
# the plan the last bn_fwd / bn_bwd call replayed with every launch direct, else None (bnfast.ops's call cache
# reads it right after the call: see `_Plan.native`)
LAST_PLAN: list = [None]


class _Step:
    """One launch of a plan: its constant arguments, where its pointers come from, its direct entry if known."""

    __slots__ = (
        "name",
        "grid",
        "num_warps",
        "device",
        "slots",
        "pointers",
        "unique_slots",
        "unique",
        "ints",
        "floats",
        "consts",
        "tail",
        "dtypes",
        "entry",
        "valid",
    )

    def __init__(self, name, grid, num_warps, device, slots, ptrs, ints, floats, consts):
        self.name, self.grid, self.num_warps, self.device = name, grid, num_warps, device
        self.slots = tuple(slots)
        self.pointers = _getter(slots)
        self.unique_slots = tuple(sorted(set(slots)))  # each tensor once: the alignment check's
        self.unique = _getter(self.unique_slots)
        self.ints, self.floats, self.consts = ints, floats, consts
        self.tail = (*ints, *floats, *consts)
        self.dtypes = tuple(map(_dtype_of, ptrs))
        self.entry, self.valid = None, None

    def refresh(self):
        """After a launch through `_launch`: the direct entry it left, valid under the current knobs."""
        knobs = (_RUNTIME_KNOBS.debug, _COMPILATION_KNOBS.instrumentation_mode)
        key = (self.name, self.device, self.num_warps, self.consts, self.ints, self.dtypes, *knobs)
        self.entry = _DIRECT.get(key)
        self.valid = (_GENERATION[0], *knobs)


def _getter(slots):
    """`table -> tuple of table[i] for i in slots`, in C (operator.itemgetter), a tuple even for one slot."""
    if len(slots) == 1:
        index = slots[0]
        return lambda table: (table[index],)
    return operator.itemgetter(*slots)


class _Plan:
    __slots__ = ("outputs", "steps")

    def __init__(self, outputs, steps):
        self.outputs, self.steps = outputs, steps

    def run(self, inputs: tuple, like: torch.Tensor) -> tuple:
        """Allocate the outputs (on `like`'s device), replay the launches with `inputs` + outputs; the outputs."""
        outputs = tuple(None if o is None else like.new_empty_strided(o[0], o[1], dtype=o[2]) for o in self.outputs)
        table = inputs + outputs
        direct = True
        for step in self.steps:
            ptrs = step.pointers(table)
            kernel = getattr(_k, step.name)
            entry = step.entry
            if (
                entry is not None
                and entry[0] is kernel
                and DIRECT_LAUNCH
                and _DRIVER[0] is _DRIVER_CONFIG._active
                and step.valid == (_GENERATION[0], _RUNTIME_KNOBS.debug, _COMPILATION_KNOBS.instrumentation_mode)
                and not functools.reduce(operator.or_, map(_data_ptr, step.unique(table))) & 15
            ):
                device = step.device
                if device == _DRIVER[1]():
                    _direct(entry, step.grid, device, (*ptrs, *step.tail))
                else:
                    with _on_device(device):
                        _direct(entry, step.grid, device, (*ptrs, *step.tail))
                continue
            direct = False
            _launch(step.name, step.grid, step.num_warps, step.device, ptrs, step.ints, step.floats, step.consts)
            step.refresh()
        if direct:
            LAST_PLAN[0] = self
        return outputs

    def native(self) -> tuple | None:
        """This plan as bnfast/csrc/autograd_node.cpp replays it, (output layouts, steps), each step (name, kernel,
        grid x, grid y, grid, device, pointer slots, unique slots, constant arguments, launcher, function, packed
        metadata, launch_metadata): what `run` hands `_direct`. None when a step has no current direct entry."""
        steps = []
        knobs = (_GENERATION[0], _RUNTIME_KNOBS.debug, _COMPILATION_KNOBS.instrumentation_mode)
        for step in self.steps:
            entry = step.entry
            if entry is None or step.valid != knobs:
                return None
            kernel, launcher, function, packed, launch_metadata = entry
            grid = step.grid
            steps.append(
                (
                    step.name,
                    kernel,
                    grid[0],
                    grid[1] if len(grid) > 1 else 1,
                    grid,
                    step.device,
                    step.slots,
                    step.unique_slots,
                    step.tail,
                    launcher,
                    function,
                    packed,
                    launch_metadata,
                )
            )
        return self.outputs, tuple(steps)


def native_globals() -> tuple:
    """What bnfast/csrc/autograd_node.cpp's `init` takes of this module: the objects whose state every C++ replay
    checks as `_Plan.run` does (this module's and the kernels module's dicts, _DRIVER, Triton's driver config,
    _GENERATION, Triton's runtime and compilation knobs)."""
    return globals(), vars(_k), _DRIVER, _DRIVER_CONFIG, _GENERATION, _RUNTIME_KNOBS, _COMPILATION_KNOBS


def _capture_plan(key, inputs: tuple, stages, *args, **kwargs):
    """`stages(*args, **kwargs)` (whose result is its outputs), captured into the plan of signature `key` when it
    can be replayed; `inputs` are the call's tensors in the signature's order (None where absent)."""
    global _CAPTURE
    outer, _CAPTURE = _CAPTURE, []
    try:
        outputs = stages(*args, **kwargs)
        launches = _CAPTURE
    finally:
        _CAPTURE = outer
    plan = _plan(inputs, tuple(outputs), launches)
    if plan is not None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = plan
    return outputs


def _plan(inputs, outputs, launches) -> "_Plan | None":
    """The plan of a captured call (see above), or None when it cannot be replayed."""
    table = inputs + outputs
    present = [t for t in table if t is not None]
    slot_of = {id(t): i for i, t in enumerate(table) if t is not None}
    if len(slot_of) != len(present) or not all(o is None or _fresh(o, inputs) for o in outputs):
        return None  # two slots hold the same tensor, or an output is not a fresh allocation
    steps = []
    for name, grid, num_warps, device, ptrs, ints, floats, consts in launches:
        slots = [slot_of.get(id(p)) for p in ptrs]
        if None in slots:
            return None  # a tensor made inside the stages: a copy, a view, a workspace
        step = _Step(name, grid, num_warps, device, slots, ptrs, ints, floats, consts)
        step.refresh()
        steps.append(step)
    layouts = tuple(None if o is None else (tuple(o.shape), o.stride(), o.dtype) for o in outputs)
    return _Plan(layouts, steps)


def _fresh(t: torch.Tensor, inputs) -> bool:
    """`t` is a tensor of its own (a fresh allocation): no view, and none of the inputs' storage."""
    ptr = t.untyped_storage().data_ptr()
    return (
        t._base is None
        and t.storage_offset() == 0
        and all(i is None or i.untyped_storage().data_ptr() != ptr or ptr == 0 for i in inputs)
    )


def _vec_key(t: torch.Tensor | None):
    """What the stages read of a (C,) vector besides its data: its dtype and stride."""
    return None if t is None else (t.dtype, t.stride(0))


# fmt: off
# (the stages' signatures and _launch calls group their arguments by role, one role a line, in the kernels'
# argument order: the formatter would put one argument a line)
# --------------------------------------------------------------------------------------------- forward stages
# Each stage: x, y, dy, dx are `Ncs`; w, b (weight, bias) and the running stats are (C,) tensors of any stride or
# None; `cfg` comes from `config_for(x, ...)`; outputs are allocated by the caller or returned.
def forward_single(x: Ncs, y: Ncs, w, b, mean, rstd, running, nbt, cfg, *, eps, momentum, cumulative, activation,
                   act_param, r: Ncs | None = None, m: Ncs | None = None, pad=None, var=None):
    """Single-pass training forward: y, and the batch mean/rstd into `mean`/`rstd` (ACC, (C,)).
    `running` = (rm, rv, rm_out, rv_out) or None; `nbt` = num_batches_tracked when cumulative; `r` the residual;
    `m` the mask view (statistics over its valid positions), `pad` the value written at padded ones (or None).
    Ghost BatchNorm (cfg.num_chunks > 1): mean/rstd are (chunks, C), and with `running` the chunks' variances go
    to `var` (chunks, C) for `running_chunks`, the running stats are not touched here."""
    rm, rv, rm_out, rv_out = running if running is not None else (mean, mean, mean, mean)  # dummies: never read
    r_ = _ncs_or(r, x)
    m_ptr, m_strides = _mask_args(m, x)
    _launch("_bn_fwd_single_kernel", cfg.grid, cfg.num_warps, x.t.get_device(),
        (y.t, mean, rstd, _or(var, mean), x.t, _or(w, x.t), _or(b, x.t), r_.t, rm, rv, rm_out, rv_out,
         _or(nbt, mean), m_ptr),
        (*x.dims, *x.strides, *y.strides, *r_.strides, _vec_stride(w), _vec_stride(b),
         rm.stride(0), rv.stride(0), rm_out.stride(0), rv_out.stride(0), *m_strides, cfg.chunk),
        (eps, momentum, act_param, 0.0 if pad is None else pad),
        # HAS_WEIGHT, HAS_BIAS, HAS_RESIDUAL, UPDATE_RUNNING, CUMULATIVE, ACTIVATION, ACC, BLOCK_N/C/S, HAS_MASK, PAD,
        # GHOST
        (w is not None, b is not None, r is not None, running is not None, cumulative, activation, _TL[mean.dtype],
         cfg.BLOCK_N, cfg.BLOCK_C, cfg.BLOCK_S, m is not None, m is not None and pad is not None,
         cfg.num_chunks > 1),
    )


def stats_partial(x: Ncs, cfg, m: Ncs | None = None):
    """Split stage 1: (part (3, K, C), shift (C,)) in ACC, the format in kernels/batch_norm.py; over the valid
    positions of the mask view `m` when given. Ghost BatchNorm: (chunks, 3, K, C) and (chunks, C)."""
    acc = acc_dtype(x.t.dtype)
    ghost = cfg.num_chunks > 1
    lead = (cfg.num_chunks,) if ghost else ()
    part = torch.empty((*lead, 3, cfg.num_splits, x.C), dtype=acc, device=x.t.device)
    shift = torch.empty((*lead, x.C), dtype=acc, device=x.t.device)
    m_ptr, m_strides = _mask_args(m, x)
    # constexprs: ACC, BLOCK_N/C/S, HAS_MASK, GHOST
    _launch("_bn_stats_partial_kernel", cfg.grid, cfg.num_warps, x.t.get_device(), (part, shift, x.t, m_ptr),
            (*x.dims, *x.strides, *m_strides, cfg.chunk), (),
            (_TL[acc], cfg.BLOCK_N, cfg.BLOCK_C, cfg.BLOCK_S, m is not None, ghost))
    return part, shift


def stats_merge(part, shift, out=None):
    """SyncBatchNorm's local stage: the K rows of `part` merged in order into one packed (4, C) tensor in ACC
    (count, mean of x - shift, M2, shift), written into `out` (e.g. this rank's slot of the gather buffer)."""
    C = part.shape[2]
    out = torch.empty((4, C), dtype=part.dtype, device=part.device) if out is None else out
    # constexprs: ACC, BLOCK_SPLITS, BLOCK_C; 4 warps: Triton's default, which the finalize kernels always had
    _launch("_bn_stats_merge_kernel", (_cdiv(C, FINALIZE_BLOCK_C),), 4, part.get_device(), (out, part, shift),
            (C, part.shape[1]), (), (_TL[part.dtype], FINALIZE_BLOCK_SPLITS, FINALIZE_BLOCK_C))
    return out


def stats_finalize(part, shift, mean, rstd, running, nbt, *, eps, momentum, cumulative, var=None):
    """Split stage 2: merge the K rows of `part` in order into `mean`/`rstd` (ACC, (C,)); running stats updated.
    `part` is (3, K, C) with unit channel stride (any row and plane strides: SyncBatchNorm passes a view of the
    gathered (world, 4, C) buffer); `shift` is (C,), or (K, C) for a shift per row (the gathered ranks').
    Ghost BatchNorm: `stats_partial`'s contiguous (chunks, 3, K, C) and (chunks, C), mean/rstd (chunks, C), and
    with `running` the chunks' variances go to `var` for `running_chunks` (the running stats are not touched)."""
    ghost = part.dim() == 4
    chunks = part.shape[0] if ghost else 1
    planes = part[0] if ghost else part  # one chunk's (3, K, C): the strides the kernel steps through
    C = planes.shape[2]
    rm, rv, rm_out, rv_out = running if running is not None else (mean, mean, mean, mean)
    row_shifts = shift.dim() == 2 and not ghost
    _launch("_bn_stats_finalize_kernel", (_cdiv(C, FINALIZE_BLOCK_C) * chunks,), 4, part.get_device(),
        (mean, rstd, _or(var, mean), part, shift, rm, rv, rm_out, rv_out, _or(nbt, mean)),
        (C, planes.shape[1], planes.stride(1), planes.stride(0), shift.stride(0) if row_shifts else 0,
         rm.stride(0), rv.stride(0), rm_out.stride(0), rv_out.stride(0)), (eps, momentum),
        # ROW_SHIFTS, UPDATE_RUNNING, CUMULATIVE, ACC, BLOCK_SPLITS, BLOCK_C, GHOST; float64 rows: half as many per
        # iteration (at 32 x 32 float64 values ptxas spills 16 bytes on sm_80)
        (row_shifts, running is not None, cumulative, _TL[part.dtype],
         FINALIZE_BLOCK_SPLITS // (2 if part.dtype == torch.float64 else 1), FINALIZE_BLOCK_C, ghost),
    )


def running_chunks(x: Ncs, cfg, running, nbt, mean, var, *, momentum, cumulative):
    """Ghost BatchNorm's running stats: the chunks' (mean, var) rows ((chunks, C) in ACC) applied in chunk order,
    `running` = (rm, rv, rm_out, rv_out); `nbt` = num_batches_tracked when cumulative (advanced by one per chunk)."""
    rm, rv, rm_out, rv_out = running
    _launch("_bn_running_chunks_kernel", (_cdiv(x.C, FINALIZE_BLOCK_C),), 4, mean.get_device(),
        (rm_out, rv_out, rm, rv, _or(nbt, mean), mean, var),
        (x.N, x.C, x.S, cfg.chunk, rm.stride(0), rv.stride(0), rm_out.stride(0), rv_out.stride(0)), (momentum,),
        (cumulative, _TL[mean.dtype], FINALIZE_BLOCK_C))  # CUMULATIVE, ACC, BLOCK_C


def normalize(x: Ncs, y: Ncs, w, b, mean, stat, cfg, *, stat_is_var, eps, activation, act_param, r: Ncs | None = None,
              m: Ncs | None = None, pad=None):
    """y = act((x - mean) * rstd * w + b [+ r]); `stat` is rstd, or the running variance when stat_is_var (eval);
    `pad` (with the mask view `m`) is written where the mask is False."""
    r_ = _ncs_or(r, x)
    padded = m is not None and pad is not None
    m_ptr, m_strides = _mask_args(m if padded else None, x)
    _launch("_bn_normalize_kernel", cfg.grid, cfg.num_warps, x.t.get_device(),
        (y.t, x.t, _or(w, x.t), _or(b, x.t), r_.t, mean, stat, m_ptr),
        (*x.dims, *x.strides, *y.strides, *r_.strides, _vec_stride(w), _vec_stride(b), mean.stride(-1),
         stat.stride(-1), *m_strides, cfg.chunk), (eps, act_param, pad if padded else 0.0),
        # STAT_IS_VAR, HAS_WEIGHT, HAS_BIAS, HAS_RESIDUAL, ACTIVATION, ACC, BLOCK_N/C/S, PAD, GHOST
        (stat_is_var, w is not None, b is not None, r is not None, activation, _TL[acc_dtype(x.t.dtype)],
         cfg.BLOCK_N, cfg.BLOCK_C, cfg.BLOCK_S, padded, cfg.num_chunks > 1),
    )


# -------------------------------------------------------------------------------------------- backward stages
def backward_single(dy: Ncs, x: Ncs, dx: Ncs | None, w, b, mean, stat, dw, db, cfg, *, training, eps, activation,
                    act_param, r: Ncs | None = None, dr: Ncs | None = None, m: Ncs | None = None,
                    pad=None):
    """Single-pass backward into dx, dw, db, dr (each None: not needed); `r` the residual of the forward; `m` the
    forward's mask view and `pad` its pad value (None: padded outputs were normalised). Ghost BatchNorm: dw and
    db are the planes 1 and 0 of a (2, chunks, C) partial in ACC, for `grad_finalize`."""
    out, r_, dr_ = _ncs_or(dx, x), _ncs_or(r, x), _ncs_or(dr, x)  # dummy strides and pointers when absent
    m_ptr, m_strides = _mask_args(m, x)
    _launch("_bn_bwd_single_kernel", cfg.grid, cfg.num_warps, x.t.get_device(),
        (out.t, _or(dw, x.t), _or(db, x.t), dr_.t, x.t, dy.t, _or(w, x.t), _or(b, x.t), r_.t, mean, stat, m_ptr),
        (*x.dims, *x.strides, *dy.strides, *out.strides, *r_.strides, *dr_.strides, _vec_stride(w),
         _vec_stride(b), mean.stride(-1), stat.stride(-1), *m_strides, cfg.chunk), (eps, act_param),
        # TRAINING, HAS_WEIGHT, HAS_BIAS, HAS_RESIDUAL, COMPUTE_DX/DW/DB/DR, ACTIVATION, ACC, BLOCK_N/C/S, HAS_MASK,
        # PAD, GHOST
        (training, w is not None, b is not None, r is not None, dx is not None, dw is not None, db is not None,
         dr is not None, activation, _TL[acc_dtype(x.t.dtype)], cfg.BLOCK_N, cfg.BLOCK_C, cfg.BLOCK_S,
         m is not None, m is not None and pad is not None, cfg.num_chunks > 1),
    )


def grad_partial(dy: Ncs, x: Ncs, w, b, mean, stat, cfg, *, training, eps, activation, act_param, dx=None, r=None,
                 dr=None, m: Ncs | None = None, pad=None):
    """Backward split stage 1: part (2, K, C) in ACC (sum g, sum g*xhat). Eval: also writes dx and dr if given.
    With the mask view `m`: part (3, K, C), the third plane the valid counts (see _bn_grad_partial_kernel)."""
    acc = acc_dtype(x.t.dtype)
    rows = cfg.num_splits * cfg.num_chunks  # ghost BatchNorm: each chunk's K rows, chunk-major
    part = torch.empty((2 if m is None else 3, rows, x.C), dtype=acc, device=x.t.device)
    out, r_, dr_ = _ncs_or(dx, x), _ncs_or(r, x), _ncs_or(dr, x)
    m_ptr, m_strides = _mask_args(m, x)
    _launch("_bn_grad_partial_kernel", cfg.grid, cfg.num_warps, x.t.get_device(),
        (part, out.t, dr_.t, x.t, dy.t, _or(w, x.t), _or(b, x.t), r_.t, mean, stat, m_ptr),
        (*x.dims, *x.strides, *dy.strides, *out.strides, *r_.strides, *dr_.strides, _vec_stride(w),
         _vec_stride(b), mean.stride(-1), stat.stride(-1), *m_strides, cfg.chunk), (eps, act_param),
        # TRAINING, HAS_WEIGHT, HAS_BIAS, HAS_RESIDUAL, COMPUTE_DX, COMPUTE_DR, ACTIVATION, ACC, BLOCK_N/C/S,
        # HAS_MASK, PAD, GHOST
        (training, w is not None, b is not None, r is not None, dx is not None and not training,
         dr is not None and not training, activation, _TL[acc], cfg.BLOCK_N, cfg.BLOCK_C, cfg.BLOCK_S,
         m is not None, m is not None and pad is not None, cfg.num_chunks > 1),
    )
    return part


def grad_finalize(part, dw=None, db=None, chunks: int = 1):
    """Backward split stage 2: sums (2, C) in ACC (sum g, sum g*xhat, for grad_input); also writes dweight
    and dbias (in their own dtype) when given. A masked grad_partial's (3, K, C) part gives (3, C) sums, the
    third row the valid counts. Ghost BatchNorm (`chunks` > 1): part is (2, chunks * K, C), chunk-major; sums are
    (2, chunks, C), and dweight, dbias the chunks' sums added in chunk order."""
    C = part.shape[2]
    sums = torch.empty((part.shape[0], *((chunks,) if chunks > 1 else ()), C), dtype=part.dtype, device=part.device)
    _launch("_bn_grad_finalize_kernel", (_cdiv(C, FINALIZE_BLOCK_C),), 4, part.get_device(),
            (sums, _or(dw, sums), _or(db, sums), part), (C, part.shape[1] // chunks, chunks), (),
            # COMPUTE_DW, COMPUTE_DB, ACC, BLOCK_SPLITS, BLOCK_C, HAS_COUNT, GHOST
            (dw is not None, db is not None, _TL[part.dtype], FINALIZE_BLOCK_SPLITS, FINALIZE_BLOCK_C,
             part.shape[0] == 3, chunks > 1))
    return sums


def grad_input(dy: Ncs, x: Ncs, dx: Ncs | None, w, b, mean, rstd, sums, cfg, *, count, activation, act_param,
               r: Ncs | None = None, dr: Ncs | None = None, m: Ncs | None = None, pad=None):
    """Backward split stage 3 (train): dx (and dr) from the global sums; `count` = M (the global M under SyncBN).
    With the mask view `m`, M is the valid count in the (3, C) sums' third row (`count` is not used)."""
    out, r_, dr_ = _ncs_or(dx, x), _ncs_or(r, x), _ncs_or(dr, x)
    m_ptr, m_strides = _mask_args(m, x)
    _launch("_bn_grad_input_kernel", cfg.grid, cfg.num_warps, x.t.get_device(),
        (out.t, dr_.t, x.t, dy.t, _or(w, x.t), _or(b, x.t), r_.t, mean, rstd, sums, m_ptr),
        (*x.dims, *x.strides, *dy.strides, *out.strides, *r_.strides, *dr_.strides, _vec_stride(w),
         _vec_stride(b), *m_strides, cfg.chunk), (1.0 / count, act_param),
        # HAS_WEIGHT, HAS_BIAS, HAS_RESIDUAL, COMPUTE_DX, COMPUTE_DR, ACTIVATION, ACC, BLOCK_N/C/S, HAS_MASK, PAD,
        # GHOST
        (w is not None, b is not None, r is not None, dx is not None, dr is not None, activation,
         _TL[acc_dtype(x.t.dtype)], cfg.BLOCK_N, cfg.BLOCK_C, cfg.BLOCK_S, m is not None,
         m is not None and pad is not None, cfg.num_chunks > 1),
    )


# fmt: on


# ----------------------------------------------------------------------------------------------- composition
def num_chunks(x: torch.Tensor, training: bool, chunk: int | None) -> int:
    """Ghost BatchNorm's chunks of `chunk` samples in x (the last may be shorter); 1 when x is one chunk, in eval
    (the running stats normalise every sample) or without ghost BatchNorm."""
    return _cdiv(x.shape[0], chunk) if training and chunk is not None and chunk < x.shape[0] else 1


def forward_outputs(x: torch.Tensor, training: bool, chunk: int | None = None):
    """(y, mean, rstd) allocated as `bn_fwd` allocates them (mean/rstd are 0-element in eval, (chunks, C) under
    ghost BatchNorm): also what the torch.library op's fake implementation returns."""
    chunks = num_chunks(x, training, chunk)
    C = x.shape[1] if training else 0
    if chunks > 1:
        acc = acc_dtype(x.dtype)
        mean, rstd = x.new_empty((chunks, C), dtype=acc), x.new_empty((chunks, C), dtype=acc)
    else:
        mean, rstd = _stat_pair(x, C, acc_dtype(x.dtype))
    return new_output(x), mean, rstd


def backward_outputs(x, weight, bias, output_mask, residual=None):
    """(dx, dweight, dbias, dresidual) allocated as `bn_bwd` allocates them; None where not asked for or where
    there is no such input. output_mask = (dx, dweight, dbias[, dresidual])."""
    C = x.shape[1]
    dx = new_output(x) if output_mask[0] else None
    dw = weight.new_empty(C) if output_mask[1] and weight is not None else None  # contiguous, the weight's dtype
    db = bias.new_empty(C) if output_mask[2] and bias is not None else None
    needs_dr = len(output_mask) > 3 and output_mask[3] and residual is not None
    dr = new_output(residual) if needs_dr else None
    return dx, dw, db, dr


def bn_fwd(
    x,
    weight,
    bias,
    running_mean,
    running_var,
    num_batches_tracked,
    *,
    training,
    momentum,
    cumulative,
    eps,
    activation,
    act_param,
    running_out=None,
    residual=None,
    mask=None,
    pad_value=None,
    chunk=None,
):
    """Forward: `_bn_fwd` (what it computes and returns), replayed from its launch plan when the call's signature
    has one (see "launch plans"; the signature lists every argument: tests/test_launch_plans.py checks it)."""
    LAST_PLAN[0] = None
    if LAUNCH_PLANS and mask is None and pad_value is None:
        device = x.get_device()
        key = (
            "fwd",
            x.shape,
            x.stride(),
            x.dtype,
            device,
            _sm_count(device),
            _vec_key(weight),
            _vec_key(bias),
            _vec_key(running_mean),
            _vec_key(running_var),
            None if num_batches_tracked is None else num_batches_tracked.dtype,
            training,
            cumulative,
            activation,
            momentum,
            eps,
            act_param,
            copysign(1.0, momentum),
            copysign(1.0, eps),
            copysign(1.0, act_param),
            None if running_out is None else (_vec_key(running_out[0]), _vec_key(running_out[1])),
            None if residual is None else (residual.shape, residual.stride(), residual.dtype),
            chunk,
            PLAN_OVERRIDE,
        )
        inputs = (x, weight, bias, running_mean, running_var, num_batches_tracked, residual)
        if running_out is not None:
            inputs += tuple(running_out)
        plan = _PLANS.get(key)
        if plan is not None:
            return plan.run(inputs, x)
        return _capture_plan(
            key,
            inputs,
            _bn_fwd,
            x,
            weight,
            bias,
            running_mean,
            running_var,
            num_batches_tracked,
            training=training,
            momentum=momentum,
            cumulative=cumulative,
            eps=eps,
            activation=activation,
            act_param=act_param,
            running_out=running_out,
            residual=residual,
            chunk=chunk,
        )
    return _bn_fwd(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        num_batches_tracked,
        training=training,
        momentum=momentum,
        cumulative=cumulative,
        eps=eps,
        activation=activation,
        act_param=act_param,
        running_out=running_out,
        residual=residual,
        mask=mask,
        pad_value=pad_value,
        chunk=chunk,
    )


def _bn_fwd(
    x,
    weight,
    bias,
    running_mean,
    running_var,
    num_batches_tracked,
    *,
    training,
    momentum,
    cumulative,
    eps,
    activation,
    act_param,
    running_out=None,
    residual=None,
    mask=None,
    pad_value=None,
    chunk=None,
):
    """Forward. Returns (y, mean, rstd): the batch mean and rstd in ACC when training (saved for the backward),
    0-element tensors in eval (the backward then reads the running stats).
    `chunk` (ghost BatchNorm, training; no mask): samples [0, chunk), [chunk, 2 chunk), ... are normalised with
    their own statistics, mean/rstd are (chunks, C), and the running stats take each chunk's update in order.
    `mask` (x's shape without the channel dim, bool, any strides; validated by bnfast.functional): training
    statistics over its True positions only; `pad_value` (a float or None) is written where it is False.

    Training with running stats writes the updated stats into `running_out` = (mean_out, var_out), by default
    running_mean/running_var themselves (in place). `cumulative` uses 1/num_batches_tracked (already incremented)
    as the factor. `residual` (x's shape, any strides) is added before the activation.
    """
    y_t, mean, rstd = forward_outputs(x, training, chunk)
    ghost = mean.dim() == 2
    assert not (ghost and mask is not None), "ghost BatchNorm takes no mask (bnfast.functional refuses the pair)"
    if mask is not None and (training or pad_value is not None):  # eval without a pad value: the mask changes nothing
        x3, y3, r3, m3, cfg = prepare(x, y_t, residual, mask_view(mask), widen=2 if x.dtype == torch.float64 else 1)
    else:
        x3, y3, r3, cfg = prepare(  # widen: register_widening
            x, y_t, residual, widen=2 if x.dtype == torch.float64 else 1, chunk=chunk if ghost else None
        )
        m3 = None
    if not training:
        normalize(
            x3,
            y3,
            weight,
            bias,
            running_mean,
            running_var,
            cfg,
            stat_is_var=True,
            eps=eps,
            activation=activation,
            act_param=act_param,
            r=r3,
            m=m3,
            pad=pad_value,
        )
        return y_t, mean, rstd
    running = None
    if running_mean is not None:
        running = (running_mean, running_var, *(running_out or (running_mean, running_var)))
    nbt = num_batches_tracked if cumulative else None
    opts = dict(eps=eps, momentum=momentum, cumulative=cumulative)
    var = torch.empty_like(mean) if ghost and running is not None else None  # the chunks' variances
    if cfg.plan == "single":
        forward_single(
            x3,
            y3,
            weight,
            bias,
            mean,
            rstd,
            running,
            nbt,
            cfg,
            activation=activation,
            act_param=act_param,
            r=r3,
            m=m3,
            pad=pad_value,
            var=var,
            **opts,
        )
        if var is not None:
            running_chunks(x3, cfg, running, nbt, mean, var, momentum=momentum, cumulative=cumulative)
        return y_t, mean, rstd
    part, shift = stats_partial(x3, cfg, m3)
    stats_finalize(part, shift, mean, rstd, running, nbt, var=var, **opts)
    if var is not None:
        running_chunks(x3, cfg, running, nbt, mean, var, momentum=momentum, cumulative=cumulative)
    normalize(
        x3,
        y3,
        weight,
        bias,
        mean,
        rstd,
        cfg,
        stat_is_var=False,
        eps=eps,
        activation=activation,
        act_param=act_param,
        r=r3,
        m=m3,
        pad=pad_value,
    )
    return y_t, mean, rstd


def bn_bwd(
    dy,
    x,
    weight,
    bias,
    mean,
    stat,
    *,
    training,
    eps,
    activation,
    act_param,
    needs_dx=True,
    needs_dw=True,
    needs_db=True,
    residual=None,
    needs_dr=False,
    mask=None,
    pad_value=None,
    chunk=None,
):
    """Backward: `_bn_bwd` (what it computes and returns), replayed from its launch plan when the call's
    signature has one (see "launch plans"; the signature lists every argument: tests/test_launch_plans.py)."""
    LAST_PLAN[0] = None
    if LAUNCH_PLANS and mask is None and pad_value is None:
        device = x.get_device()
        key = (
            "bwd",
            x.shape,
            x.stride(),
            x.dtype,
            device,
            _sm_count(device),
            dy.shape,
            dy.stride(),
            dy.dtype,
            _vec_key(weight),
            _vec_key(bias),
            _vec_key(mean),
            _vec_key(stat),
            training,
            activation,
            eps,
            act_param,
            copysign(1.0, eps),
            copysign(1.0, act_param),
            needs_dx,
            needs_dw,
            needs_db,
            needs_dr,
            None if residual is None else (residual.shape, residual.stride(), residual.dtype),
            chunk,
            PLAN_OVERRIDE,
        )
        inputs = (dy, x, weight, bias, mean, stat, residual)
        plan = _PLANS.get(key)
        if plan is not None:
            return plan.run(inputs, x)
        return _capture_plan(
            key,
            inputs,
            _bn_bwd,
            dy,
            x,
            weight,
            bias,
            mean,
            stat,
            training=training,
            eps=eps,
            activation=activation,
            act_param=act_param,
            needs_dx=needs_dx,
            needs_dw=needs_dw,
            needs_db=needs_db,
            residual=residual,
            needs_dr=needs_dr,
            chunk=chunk,
        )
    return _bn_bwd(
        dy,
        x,
        weight,
        bias,
        mean,
        stat,
        training=training,
        eps=eps,
        activation=activation,
        act_param=act_param,
        needs_dx=needs_dx,
        needs_dw=needs_dw,
        needs_db=needs_db,
        residual=residual,
        needs_dr=needs_dr,
        mask=mask,
        pad_value=pad_value,
        chunk=chunk,
    )


def _bn_bwd(
    dy,
    x,
    weight,
    bias,
    mean,
    stat,
    *,
    training,
    eps,
    activation,
    act_param,
    needs_dx=True,
    needs_dw=True,
    needs_db=True,
    residual=None,
    needs_dr=False,
    mask=None,
    pad_value=None,
    chunk=None,
):
    """Backward. (mean, stat) = (batch mean, rstd) in training, (running_mean, running_var) in eval; `residual` is
    the forward's (needed to recompute z under an activation). Returns (dx, dweight, dbias, dresidual), each
    None when not asked for or when there is no such input. Without an activation dresidual = dy: the caller
    passes dy on and asks for no dresidual here. `mask`, `pad_value`, `chunk`: the forward's (ghost BatchNorm:
    mean and rstd are then (chunks, C))."""
    dx_t, dw, db, dr_t = backward_outputs(x, weight, bias, (needs_dx, needs_dw, needs_db, needs_dr), residual)
    r = residual if activation else None  # only act' reads it
    widen = register_widening(acc_dtype(x.dtype), activation, backward=True)
    ghost = training and mean.dim() == 2
    if mask is not None and (training or pad_value is not None):
        x3, dy3, dx3, r3, dr3, m3, cfg = prepare(x, dy, dx_t, r, dr_t, mask_view(mask), widen=widen)
    else:
        x3, dy3, dx3, r3, dr3, cfg = prepare(x, dy, dx_t, r, dr_t, widen=widen, chunk=chunk if ghost else None)
        m3 = None
    opts = dict(activation=activation, act_param=act_param, r=r3, dr=dr3, m=m3, pad=pad_value)
    if cfg.plan == "single":
        if ghost:  # each chunk's sums, then dweight, dbias over the chunks in order
            part = torch.empty((2, cfg.num_chunks, x3.C), dtype=mean.dtype, device=x.device)
            backward_single(
                dy3, x3, dx3, weight, bias, mean, stat, part[1], part[0], cfg, training=training, eps=eps, **opts
            )
            if dw is not None or db is not None:
                grad_finalize(part, dw, db, cfg.num_chunks)
            return dx_t, dw, db, dr_t
        backward_single(dy3, x3, dx3, weight, bias, mean, stat, dw, db, cfg, training=training, eps=eps, **opts)
        return dx_t, dw, db, dr_t
    part = grad_partial(dy3, x3, weight, bias, mean, stat, cfg, training=training, eps=eps, dx=dx3, **opts)
    sums = grad_finalize(part, dw, db, cfg.num_chunks)
    if training and (dx3 is not None or dr3 is not None):
        grad_input(dy3, x3, dx3, weight, bias, mean, stat, sums, cfg, count=x3.N * x3.S, **opts)
    return dx_t, dw, db, dr_t
