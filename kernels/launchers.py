"""Host side of the BatchNorm kernels: view as (N, C, S), allocate, pick meta-parameters, launch.

Inputs are already validated by `bnfast.functional` (shapes, dtypes, M >= 2 in training). Each launcher runs
in the same order: view as (N, C, S), allocate, `_launch_config`, launch. Launch plan (see `batch_norm.py`):

    train forward   column fits: 1 launch          split: 3 launches (partial stats, finalize, normalize)
    eval forward    1 launch (normalize with running stats)
    train backward  column fits: 1 launch          split: 3 launches (partial sums, finalize, dx)
    eval backward   column fits: 1 launch          split: 2 launches (partial sums + dx, finalize)

The tuning knobs below are module attributes read at every launch, so tests can shrink them to force the
split path and many tiles on small tensors.
"""

import dataclasses

import torch
import triton
import triton.language as tl

from .batch_norm import (
    _bn_bwd_dx_kernel,
    _bn_bwd_fused_kernel,
    _bn_bwd_reduce_finalize_kernel,
    _bn_bwd_reduce_partial_kernel,
    _bn_fwd_fused_kernel,
    _bn_fwd_normalize_kernel,
    _bn_fwd_stats_finalize_kernel,
    _bn_fwd_stats_partial_kernel,
)

FUSED_MAX_ELEMENTS = 4096  # a column-fits tile: <= 16 values per thread at 8 warps, no spills in the backward
TILE_ELEMENTS = 4096  # streaming tile of the split kernels: 16 KiB of float32 per program per iteration
MAX_BLOCK_S = 512
PROGRAMS_PER_SM = 4  # split until about this many programs per SM, to have enough bytes in flight
MAX_SPLITS = 1024  # bounds the (splits, C) workspace and the finalize loop
FINALIZE_BLOCK_SPLITS = 32
FINALIZE_BLOCK_C = 32
CPU_SM_COUNT = 4  # stands in for the SM count under the interpreter, so CPU tests exercise several splits


def is_interpreted() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return type(_bn_fwd_fused_kernel).__name__ == "InterpretedFunction"


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    column_fits: bool  # one program holds a channel's whole column: the single-launch paths
    BLOCK_N: int
    BLOCK_C: int
    BLOCK_S: int
    num_splits: int  # programs along the reduction; 1 when column_fits
    num_warps: int


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_SM_COUNT


def _launch_config(N: int, C: int, S: int, device: torch.device, widen: int = 1) -> LaunchConfig:
    """Tile shape, split count and warps for x viewed as (N, C, S); `widen` (1 or 2) is from `_register_widening`.

    The fast axis of a tile should span >= 16 contiguous values: c for (N, C) (BLOCK_C >= 16), s for (N, C, L)
    (BLOCK_S = next_pow2(S) up to MAX_BLOCK_S). The column fits when a program can hold all N*S values of
    its BLOCK_C channels in FUSED_MAX_ELEMENTS; otherwise the reduction is split so that
    channel blocks x splits ~ PROGRAMS_PER_SM * SMs, which fills the GPU even for C = 32.
    widen=2 tiles hold half the elements with the same warps: half the values per thread, for the kernels whose
    registers per value are about double (see `_register_widening`).
    """
    fused_max_elements, tile_elements = FUSED_MAX_ELEMENTS // widen, TILE_ELEMENTS // widen
    pow2_n, pow2_c, pow2_s = (triton.next_power_of_2(v) for v in (N, C, S))
    min_block_c = min(pow2_c, 16 if S == 1 else 1)
    sms = _sm_count(device)
    if pow2_n * pow2_s * min_block_c <= fused_max_elements:
        budget_c = fused_max_elements // (pow2_n * pow2_s)
        spread_c = triton.next_power_of_2(triton.cdiv(C, sms))  # one channel block per SM when C is large
        block_c = max(min_block_c, min(budget_c, spread_c, pow2_c))
        tile = pow2_n * block_c * pow2_s
        return LaunchConfig(True, pow2_n, block_c, pow2_s, 1, _num_warps(tile * widen))
    block_s = min(pow2_s, MAX_BLOCK_S)
    block_c = min(pow2_c, 64) if S == 1 else min(pow2_c, max(1, tile_elements // (4 * block_s)))
    block_n = max(1, min(pow2_n, tile_elements // (block_s * block_c)))
    num_tiles = triton.cdiv(N, block_n) * triton.cdiv(S, block_s)
    c_blocks = triton.cdiv(C, block_c)
    num_splits = max(1, min(num_tiles, MAX_SPLITS, triton.cdiv(PROGRAMS_PER_SM * sms, c_blocks)))
    return LaunchConfig(False, block_n, block_c, block_s, num_splits, _num_warps(block_n * block_c * block_s * widen))


# Backward activations whose derivative keeps many temporaries live per value (exp/erf/tanh chains): at 16 values
# per thread ptxas spills a few bytes in the split backward kernels (bench/kernel_report.py, default matrix).
_HEAVY_BACKWARD_ACTIVATIONS = ("elu", "selu", "silu", "gelu", "gelu_tanh", "sigmoid", "tanh", "mish")


def _register_widening(acc_torch: torch.dtype, activation: str = "", backward: bool = False) -> int:
    """2 where a value needs about twice the registers (float64 ACC; a heavy activation's backward), else 1.
    Full-size tiles there need 255 registers and spill; half-size ones compile to <= 206 with no spill."""
    heavy = acc_torch == torch.float64 or (backward and activation in _HEAVY_BACKWARD_ACTIVATIONS)
    return 2 if heavy else 1


def _num_warps(tile_elements: int) -> int:
    return max(1, min(8, tile_elements // 256))


def _acc_dtype(dtype: torch.dtype):
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise (16-bit inputs included)."""
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _as_ncs(t: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (N, C, 1) and (N, C, L) as is; a view, so any strides are kept."""
    return t.unsqueeze(-1) if t.dim() == 2 else t


def bn_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    *,
    training: bool,
    momentum: float,
    cumulative: bool,
    eps: float,
    activation: str,
    act_param: float,
    running_mean_out: torch.Tensor | None = None,
    running_var_out: torch.Tensor | None = None,
):
    """Forward. Returns (y, mean, stat): training -> batch mean and rstd (ACC dtype), saved for the backward;
    eval -> running_mean and running_var themselves (the backward then computes rstd from the variance).

    In training with running stats, the updated stats are written to running_*_out (default: in place, into
    running_mean/running_var). `cumulative` uses 1/num_batches_tracked (already incremented) as the factor.
    """
    x3 = _as_ncs(x)
    N, C, S = x3.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y3 = _as_ncs(y)
    acc_torch, acc = _acc_dtype(x.dtype)
    has_w, has_b = weight is not None, bias is not None
    w = weight if has_w else x
    b = bias if has_b else x
    cfg = _launch_config(N, C, S, x.device, _register_widening(acc_torch))
    common = dict(HAS_WEIGHT=has_w, HAS_BIAS=has_b, ACTIVATION=activation, ACC=acc, num_warps=cfg.num_warps)
    blocks = dict(BLOCK_N=cfg.BLOCK_N, BLOCK_C=cfg.BLOCK_C, BLOCK_S=cfg.BLOCK_S)
    if not training:
        grid = (triton.cdiv(C, cfg.BLOCK_C), cfg.num_splits)
        _bn_fwd_normalize_kernel[grid](
            y3, x3, w, b, running_mean, running_var, N, C, S, *x3.stride(), *y3.stride(), eps, act_param,
            STAT_IS_VAR=True, **common, **blocks,
        )  # fmt: skip
        return y, running_mean, running_var

    mean = torch.empty(C, dtype=acc_torch, device=x.device)
    rstd = torch.empty(C, dtype=acc_torch, device=x.device)
    update = running_mean is not None
    running = (
        running_mean if update else mean,
        running_var if update else rstd,
        running_mean_out if running_mean_out is not None else running_mean if update else mean,
        running_var_out if running_var_out is not None else running_var if update else rstd,
        num_batches_tracked if cumulative else mean,  # dummy pointers are never read (constexpr-disabled)
    )
    if cfg.column_fits:
        _bn_fwd_fused_kernel[(triton.cdiv(C, cfg.BLOCK_C),)](
            y3, mean, rstd, x3, w, b, *running, N, C, S, *x3.stride(), *y3.stride(), eps, momentum, act_param,
            UPDATE_RUNNING=update, CUMULATIVE=cumulative, **common, **blocks,
        )  # fmt: skip
        return y, mean, rstd

    grid = (triton.cdiv(C, cfg.BLOCK_C), cfg.num_splits)  # fills the GPU even when C is small
    part_cnt, part_mean, part_m2 = torch.empty((3, cfg.num_splits, C), dtype=acc_torch, device=x.device)
    _bn_fwd_stats_partial_kernel[grid](
        part_cnt, part_mean, part_m2, x3, N, C, S, *x3.stride(), ACC=acc, num_warps=cfg.num_warps, **blocks
    )
    _bn_fwd_stats_finalize_kernel[(triton.cdiv(C, FINALIZE_BLOCK_C),)](
        mean, rstd, part_cnt, part_mean, part_m2, *running, C, cfg.num_splits, eps, momentum,
        UPDATE_RUNNING=update, CUMULATIVE=cumulative, ACC=acc,
        BLOCK_SPLITS=FINALIZE_BLOCK_SPLITS, BLOCK_C=FINALIZE_BLOCK_C,
    )  # fmt: skip
    _bn_fwd_normalize_kernel[grid](
        y3, x3, w, b, mean, rstd, N, C, S, *x3.stride(), *y3.stride(), eps, act_param,
        STAT_IS_VAR=False, **common, **blocks,
    )  # fmt: skip
    return y, mean, rstd


def bn_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    stat: torch.Tensor,
    *,
    training: bool,
    eps: float,
    activation: str,
    act_param: float,
    needs_dx: bool = True,
    needs_dw: bool = True,
    needs_db: bool = True,
):
    """Backward. (mean, stat) are what `bn_fwd` returned: (mean, rstd) in training, (running_mean, running_var)
    in eval. Returns (dx, dweight, dbias), each None when not asked for or when there is no such parameter."""
    x3, dy3 = _as_ncs(x), _as_ncs(dy)
    N, C, S = x3.shape
    acc_torch, acc = _acc_dtype(x.dtype)
    has_w, has_b = weight is not None, bias is not None
    needs_dw, needs_db = needs_dw and has_w, needs_db and has_b
    w = weight if has_w else x
    b = bias if has_b else x
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if needs_dx else None
    dx3 = _as_ncs(dx) if needs_dx else x3  # dummy strides/pointer when dx is not computed
    cfg = _launch_config(N, C, S, x.device, _register_widening(acc_torch, activation, backward=True))
    strides = (*x3.stride(), *dy3.stride(), *dx3.stride())
    common = dict(HAS_WEIGHT=has_w, HAS_BIAS=has_b, ACTIVATION=activation, ACC=acc, num_warps=cfg.num_warps)
    blocks = dict(BLOCK_N=cfg.BLOCK_N, BLOCK_C=cfg.BLOCK_C, BLOCK_S=cfg.BLOCK_S)
    if cfg.column_fits:
        param_dtype = weight.dtype if has_w else x.dtype
        dw = torch.empty(C, dtype=param_dtype, device=x.device) if needs_dw else None
        db = torch.empty(C, dtype=bias.dtype, device=x.device) if needs_db else None
        _bn_bwd_fused_kernel[(triton.cdiv(C, cfg.BLOCK_C),)](
            dx3, dw if needs_dw else x, db if needs_db else x, x3, dy3, w, b, mean, stat,
            N, C, S, *strides, eps, act_param,
            TRAINING=training, STAT_IS_VAR=not training, COMPUTE_DX=needs_dx, COMPUTE_DW=needs_dw,
            COMPUTE_DB=needs_db, **common, **blocks,
        )  # fmt: skip
        return dx, dw, db

    grid = (triton.cdiv(C, cfg.BLOCK_C), cfg.num_splits)  # fills the GPU even when C is small
    part_db, part_dw = torch.empty((2, cfg.num_splits, C), dtype=acc_torch, device=x.device)
    _bn_bwd_reduce_partial_kernel[grid](
        part_db, part_dw, dx3, x3, dy3, w, b, mean, stat, N, C, S, *strides, eps, act_param,
        TRAINING=training, STAT_IS_VAR=not training, COMPUTE_DX=needs_dx, **common, **blocks,
    )  # fmt: skip
    # two allocations, not rows of one: they are returned as dbias/dweight, which must not share storage
    db_acc, dw_acc = (torch.empty(C, dtype=acc_torch, device=x.device) for _ in range(2))
    if training or needs_dw or needs_db:
        _bn_bwd_reduce_finalize_kernel[(triton.cdiv(C, FINALIZE_BLOCK_C),)](
            db_acc, dw_acc, part_db, part_dw, C, cfg.num_splits,
            BLOCK_SPLITS=FINALIZE_BLOCK_SPLITS, BLOCK_C=FINALIZE_BLOCK_C,
        )  # fmt: skip
    if training and needs_dx:
        _bn_bwd_dx_kernel[grid](
            dx3, x3, dy3, w, b, mean, stat, db_acc, dw_acc, N, C, S, *strides, act_param, **common, **blocks
        )
    dw = dw_acc.to(weight.dtype) if needs_dw else None  # no copy when the parameters are in ACC already
    db = db_acc.to(bias.dtype) if needs_db else None
    return dx, dw, db
