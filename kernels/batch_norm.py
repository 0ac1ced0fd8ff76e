"""BatchNorm (+ fused activation) kernels on x viewed as (N, C, S): S = L for (N, C, L) inputs, S = 1 for (N, C).

M = N * S values per channel. A program owns BLOCK_C channels and walks 3-D tiles [BLOCK_N, BLOCK_C, BLOCK_S]
of the reduction axes (n, s); any strides work, and the axis whose stride is 1 (c for (N, C), s for
contiguous (N, C, L)) becomes the fast, vectorised axis of the tile. Statistics and reductions run in ACC:
float32 for float32/16-bit inputs, float64 for float64.

Forward (train):  mean = sum(x)/M   var = sum((x-mean)**2)/M   rstd = 1/sqrt(var+eps)
                  xhat = (x-mean)*rstd   z = w*xhat + b   y = act(z)
                  running_mean <- (1-f)*running_mean + f*mean
                  running_var  <- (1-f)*running_var  + f*var*M/(M-1)       # unbiased, like torch
                  f = momentum, or 1/num_batches_tracked when momentum is None (cumulative average)
Forward (eval):   the same with mean, var = running_mean, running_var.
Backward (train): g = dy*act'(z)   (z recomputed from x, mean, rstd; nothing else is saved)
                  db = sum(g)   dw = sum(g*xhat)   dx = w*rstd * (g - (db + xhat*dw)/M)
Backward (eval):  mean, rstd are constants: dx = g*w*rstd, db and dw as above.

Variance is never E[x^2]-E[x]^2: each tile gives its exact (count, mean, M2 = sum of squared deviations),
tiles are merged with Chan's formula, and splits are merged by the parallel formula
M2 = sum_k M2_k + sum_k n_k*(mean_k-mean)**2, so mean 1e4 / std 1 inputs keep full float32 precision.
Means are refined once in registers (`_channel_mean`) and split means merged around a shift, so the mean is
correctly rounded; y is computed as (x - mean)*scale + b, never x*scale + (b - mean*scale), which cancels.

Two launch plans, chosen by `kernels.launchers`:
- column fits (BLOCK_N >= N and BLOCK_S >= S): one program per channel block holds the whole column in
  registers. Forward = `_bn_fwd_fused_kernel` (reads x once, writes y once: the floor). Backward =
  `_bn_bwd_fused_kernel` (reads x and dy once, writes dx once: the floor). One launch each.
- split: grid (channel blocks, splits), so even C = 32 fills a 132-SM GPU. Partial results go to a small
  fp32 workspace (splits, C) and a second small stage merges them in a fixed order: no float atomics,
  results are bit-identical run to run.
    forward:  `_bn_fwd_stats_partial_kernel` (reads x) -> `_bn_fwd_stats_finalize_kernel` (mean, rstd,
              running stats) -> `_bn_fwd_normalize_kernel` (reads x, writes y): floor + one read of x.
    backward: `_bn_bwd_reduce_partial_kernel` (reads x, dy) -> `_bn_bwd_reduce_finalize_kernel` (dw, db)
              -> `_bn_bwd_dx_kernel` (reads x, dy, writes dx): floor + one read of x and of dy. dx needs
              the global sums and per-element x and dy, and those cannot stay on chip for tensors larger
              than the GPU's registers+SMEM, so they are read again (torch's native kernels do the same).
    eval forward: `_bn_fwd_normalize_kernel` alone: one read, one write.
    eval backward: `_bn_bwd_reduce_partial_kernel` writes dx in the same pass (dx needs no global sum),
              then the finalize: reads x and dy once, writes dx once.
"""

import triton
import triton.language as tl

from .activations import _act, _act_grad


@triton.jit
def _tile(ptr, n0, s0, c_offs, N, C, S, stride_n, stride_c, stride_s, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets and mask of the [BLOCK_N, BLOCK_C, BLOCK_S] tile whose first (n, s) is (n0, s0)."""
    n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64: n * stride_n overflows int32 on large tensors
    s = s0 + tl.arange(0, BLOCK_S)
    offs = n[:, None, None] * stride_n + c_offs[None, :, None] * stride_c + s[None, None, :] * stride_s
    mask = (n[:, None, None] < N) & (c_offs[None, :, None] < C) & (s[None, None, :] < S)
    return ptr + offs, mask


@triton.jit
def _channel_sum(t):
    """Sum a [BLOCK_N, BLOCK_C, BLOCK_S] tile over n and s: one value per channel."""
    return tl.sum(tl.sum(t, axis=2), axis=0)


@triton.jit
def _bcast(v):
    """A per-channel vector [BLOCK_C] as [1, BLOCK_C, 1], to broadcast against a tile."""
    return v[None, :, None]


@triton.jit
def _count(N, S, ACC: tl.constexpr):
    """M = N * S as an ACC scalar (N or S may arrive specialised as the constant 1)."""
    return (tl.zeros([], tl.int64) + N * S).to(ACC)


@triton.jit
def _rsqrt_eps(var, eps, ACC: tl.constexpr):
    """1/sqrt(var + eps) in ACC. eps arrives as float64 (see the kernels' `eps: tl.float64`): a Python float
    passed plainly would be rounded to float32 and float64 inputs would lose precision."""
    v = var + tl.full([], eps, ACC)
    # sqrt_rn: IEEE sqrt for float32 (tl.sqrt may be approximate there); float64 sqrt is always exact.
    if ACC == tl.float32:
        return 1.0 / tl.sqrt_rn(v)
    else:
        return 1.0 / tl.sqrt(v)


@triton.jit
def _channel_mean(x, mask, count):
    """sum(x)/count, then refined once by the mean of (x - first estimate).

    A plain float32 sum drifts by a few ulps of the total, which for |mean| >> spread (mean 1e4, std 1) is
    several ulps of the mean, and every xhat inherits it. The differences x - mean0 are exact (Sterbenz) and
    small, so the correction is accurate and the mean comes out correctly rounded, like a float64 sum would.
    """
    mean0 = _channel_sum(x) / count
    return mean0 + _channel_sum(tl.where(mask, x - _bcast(mean0), 0.0)) / count


@triton.jit
def _load_channel_params(w_ptr, b_ptr, c_offs, C, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    c_mask = c_offs < C
    if HAS_WEIGHT:
        w = tl.load(w_ptr + c_offs, mask=c_mask, other=1.0).to(ACC)
    else:
        w = tl.full(c_offs.shape, 1.0, ACC)
    if HAS_BIAS:
        b = tl.load(b_ptr + c_offs, mask=c_mask, other=0.0).to(ACC)
    else:
        b = tl.zeros(c_offs.shape, ACC)
    return w, b


@triton.jit
def _update_running_stats(
    rm_in_ptr, rv_in_ptr, rm_out_ptr, rv_out_ptr, nbt_ptr, c_offs, C, mean, var, M, momentum,
    CUMULATIVE: tl.constexpr, ACC: tl.constexpr,
):
    # CUMULATIVE (momentum=None): f = 1/num_batches_tracked, read on device (no host sync), already incremented.
    if CUMULATIVE:
        factor = 1.0 / tl.load(nbt_ptr).to(ACC)
    else:
        factor = tl.full([], momentum, ACC)
    c_mask = c_offs < C
    rm = tl.load(rm_in_ptr + c_offs, mask=c_mask, other=0.0)
    rv = tl.load(rv_in_ptr + c_offs, mask=c_mask, other=0.0)
    unbiased_var = var * (M / tl.maximum(M - 1.0, 1.0))  # M >= 2 is checked on the host
    new_rm = (1.0 - factor) * rm.to(ACC) + factor * mean
    new_rv = (1.0 - factor) * rv.to(ACC) + factor * unbiased_var
    tl.store(rm_out_ptr + c_offs, new_rm.to(rm.dtype), mask=c_mask)
    tl.store(rv_out_ptr + c_offs, new_rv.to(rv.dtype), mask=c_mask)


@triton.jit
def _bn_fwd_fused_kernel(
    y_ptr, mean_ptr, rstd_ptr,  # outputs; mean/rstd in ACC, shape (C,)
    x_ptr, w_ptr, b_ptr, rm_in_ptr, rv_in_ptr, rm_out_ptr, rv_out_ptr, nbt_ptr,
    N, C, S, stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys,
    eps: tl.float64, momentum: tl.float64, act_param,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Training forward when a channel's whole column (N x S) fits one tile: x is read once."""
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    x_ptrs, mask = _tile(x_ptr, 0, 0, c_offs, N, C, S, stride_xn, stride_xc, stride_xs, BLOCK_N, BLOCK_S)
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC)  # masked lanes load 0 and are masked out of the M2 sum
    M = _count(N, S, ACC)
    mean = _channel_mean(x, mask, M)
    centered = tl.where(mask, x - _bcast(mean), 0.0)
    var = _channel_sum(centered * centered) / M
    rstd = _rsqrt_eps(var, eps, ACC)
    c_mask = c_offs < C
    tl.store(mean_ptr + c_offs, mean, mask=c_mask)
    tl.store(rstd_ptr + c_offs, rstd, mask=c_mask)
    if UPDATE_RUNNING:
        _update_running_stats(
            rm_in_ptr, rv_in_ptr, rm_out_ptr, rv_out_ptr, nbt_ptr, c_offs, C, mean, var, M, momentum, CUMULATIVE, ACC
        )
    w, b = _load_channel_params(w_ptr, b_ptr, c_offs, C, HAS_WEIGHT, HAS_BIAS, ACC)
    z = centered * _bcast(rstd * w) + _bcast(b)
    y = _act(z, ACTIVATION, act_param)
    y_ptrs, _ = _tile(y_ptr, 0, 0, c_offs, N, C, S, stride_yn, stride_yc, stride_ys, BLOCK_N, BLOCK_S)
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_fwd_stats_partial_kernel(
    part_cnt_ptr, part_mean_ptr, part_m2_ptr,  # outputs, (num_splits, C) in ACC
    x_ptr, N, C, S, stride_xn, stride_xc, stride_xs,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Split stage 1: (count, mean, M2) of this split's tiles, tiles merged with Chan's formula."""
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    s_tiles = tl.cdiv(S, BLOCK_S)
    num_tiles = tl.cdiv(N, BLOCK_N) * s_tiles
    cnt = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for t in range(split, num_tiles, num_splits):
        n0 = (t // s_tiles) * BLOCK_N
        s0 = (t % s_tiles) * BLOCK_S
        x_ptrs, mask = _tile(x_ptr, n0, s0, c_offs, N, C, S, stride_xn, stride_xc, stride_xs, BLOCK_N, BLOCK_S)
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC)
        tile_cnt = (tl.minimum(N - n0, BLOCK_N) * tl.minimum(S - s0, BLOCK_S)).to(ACC)
        tile_mean = _channel_mean(x, mask, tile_cnt)
        d = tl.where(mask, x - _bcast(tile_mean), 0.0)
        tile_m2 = _channel_sum(d * d)
        new_cnt = cnt + tile_cnt
        delta = tile_mean - mean
        mean += delta * (tile_cnt / new_cnt)
        m2 += tile_m2 + delta * delta * (cnt * tile_cnt / new_cnt)
        cnt = new_cnt
    out = split * C + c_offs
    c_mask = c_offs < C
    tl.store(part_cnt_ptr + out, cnt, mask=c_mask)
    tl.store(part_mean_ptr + out, mean, mask=c_mask)
    tl.store(part_m2_ptr + out, m2, mask=c_mask)


@triton.jit
def _bn_fwd_stats_finalize_kernel(
    mean_ptr, rstd_ptr,  # outputs, (C,) in ACC
    part_cnt_ptr, part_mean_ptr, part_m2_ptr, rm_in_ptr, rv_in_ptr, rm_out_ptr, rv_out_ptr, nbt_ptr,
    C, num_splits, eps: tl.float64, momentum: tl.float64,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Split stage 2: merge the splits in a fixed order (parallel formula), write mean/rstd, running stats."""
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    # Weighted mean of the split means, shifted by split 0's mean (split 0 always holds tile 0): the shifted
    # terms are small and exact, so the merged mean stays correctly rounded when |mean| >> spread.
    shift = tl.load(part_mean_ptr + c_offs, mask=c_mask, other=0.0)
    total = tl.zeros([BLOCK_C], ACC)
    weighted = tl.zeros([BLOCK_C], ACC)
    for k0 in range(0, num_splits, BLOCK_SPLITS):
        k = k0 + tl.arange(0, BLOCK_SPLITS)
        offs = k[:, None] * C + c_offs[None, :]
        mask = (k[:, None] < num_splits) & c_mask[None, :]
        cnt = tl.load(part_cnt_ptr + offs, mask=mask, other=0.0)  # empty splits have count 0: they add nothing
        total += tl.sum(cnt, axis=0)
        part_mean = tl.load(part_mean_ptr + offs, mask=mask, other=0.0)
        weighted += tl.sum(cnt * (part_mean - shift[None, :]), axis=0)
    total = tl.maximum(total, 1.0)  # only masked channels (c >= C) have no values: keep them finite
    mean = shift + weighted / total
    m2 = tl.zeros([BLOCK_C], ACC)
    for k0 in range(0, num_splits, BLOCK_SPLITS):
        k = k0 + tl.arange(0, BLOCK_SPLITS)
        offs = k[:, None] * C + c_offs[None, :]
        mask = (k[:, None] < num_splits) & c_mask[None, :]
        cnt = tl.load(part_cnt_ptr + offs, mask=mask, other=0.0)
        d = tl.load(part_mean_ptr + offs, mask=mask, other=0.0) - mean[None, :]
        m2 += tl.sum(tl.load(part_m2_ptr + offs, mask=mask, other=0.0) + cnt * d * d, axis=0)
    var = m2 / total
    tl.store(mean_ptr + c_offs, mean, mask=c_mask)
    tl.store(rstd_ptr + c_offs, _rsqrt_eps(var, eps, ACC), mask=c_mask)
    if UPDATE_RUNNING:
        _update_running_stats(
            rm_in_ptr, rv_in_ptr, rm_out_ptr, rv_out_ptr, nbt_ptr, c_offs, C,
            mean, var, total, momentum, CUMULATIVE, ACC,
        )


@triton.jit
def _load_stats(mean_ptr, stat_ptr, c_offs, C, eps, STAT_IS_VAR: tl.constexpr, ACC: tl.constexpr):
    """Per-channel (mean, rstd): saved batch stats (STAT_IS_VAR=False) or running stats (eval, True)."""
    c_mask = c_offs < C
    mean = tl.load(mean_ptr + c_offs, mask=c_mask, other=0.0).to(ACC)
    stat = tl.load(stat_ptr + c_offs, mask=c_mask, other=1.0).to(ACC)
    if STAT_IS_VAR:
        rstd = _rsqrt_eps(stat, eps, ACC)
    else:
        rstd = stat
    return mean, rstd


@triton.jit
def _bn_fwd_normalize_kernel(
    y_ptr,  # output
    x_ptr, w_ptr, b_ptr, mean_ptr, stat_ptr,
    N, C, S, stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys,
    eps: tl.float64, act_param,
    STAT_IS_VAR: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Split stage 3 (train) and the whole eval forward: y = act((x - mean) * rstd * w + b), one pass."""
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    mean, rstd = _load_stats(mean_ptr, stat_ptr, c_offs, C, eps, STAT_IS_VAR, ACC)
    w, b = _load_channel_params(w_ptr, b_ptr, c_offs, C, HAS_WEIGHT, HAS_BIAS, ACC)
    # (x - mean) * scale + b, not x * scale + (b - mean * scale): the folded form cancels catastrophically
    # when |mean| >> spread (mean 1e4, std 1 loses 3 digits); the subtraction is exact there (Sterbenz).
    scale = _bcast(rstd * w)
    s_tiles = tl.cdiv(S, BLOCK_S)
    num_tiles = tl.cdiv(N, BLOCK_N) * s_tiles
    for t in range(split, num_tiles, num_splits):
        n0 = (t // s_tiles) * BLOCK_N
        s0 = (t % s_tiles) * BLOCK_S
        x_ptrs, mask = _tile(x_ptr, n0, s0, c_offs, N, C, S, stride_xn, stride_xc, stride_xs, BLOCK_N, BLOCK_S)
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC)
        y = _act((x - _bcast(mean)) * scale + _bcast(b), ACTIVATION, act_param)
        y_ptrs, _ = _tile(y_ptr, n0, s0, c_offs, N, C, S, stride_yn, stride_yc, stride_ys, BLOCK_N, BLOCK_S)
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


# Backward, column fits (one pass over x and dy):
#   xhat = (x-mean)*rstd   z = w*xhat + b   g = dy*act'(z)   db = sum(g)   dw = sum(g*xhat)
#   train: dx = w*rstd * (g - (db + xhat*dw)/M)       eval: dx = w*rstd * g
@triton.jit
def _bn_bwd_fused_kernel(
    dx_ptr, dw_ptr, db_ptr,  # outputs; dw/db in the parameters' dtype
    x_ptr, dy_ptr, w_ptr, b_ptr, mean_ptr, stat_ptr,
    N, C, S, stride_xn, stride_xc, stride_xs, stride_dyn, stride_dyc, stride_dys, stride_dxn, stride_dxc, stride_dxs,
    eps: tl.float64, act_param,
    TRAINING: tl.constexpr, STAT_IS_VAR: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    mean, rstd = _load_stats(mean_ptr, stat_ptr, c_offs, C, eps, STAT_IS_VAR, ACC)
    w, b = _load_channel_params(w_ptr, b_ptr, c_offs, C, HAS_WEIGHT, HAS_BIAS, ACC)
    x_ptrs, mask = _tile(x_ptr, 0, 0, c_offs, N, C, S, stride_xn, stride_xc, stride_xs, BLOCK_N, BLOCK_S)
    dy_ptrs, _ = _tile(dy_ptr, 0, 0, c_offs, N, C, S, stride_dyn, stride_dyc, stride_dys, BLOCK_N, BLOCK_S)
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(ACC)  # dy = 0 on masked lanes: they add nothing to the sums
    xhat = (x - _bcast(mean)) * _bcast(rstd)
    g = dy * _act_grad(xhat * _bcast(w) + _bcast(b), ACTIVATION, act_param)
    db = _channel_sum(g)
    dw = _channel_sum(g * xhat)
    if COMPUTE_DW:
        tl.store(dw_ptr + c_offs, dw.to(dw_ptr.dtype.element_ty), mask=c_mask)
    if COMPUTE_DB:
        tl.store(db_ptr + c_offs, db.to(db_ptr.dtype.element_ty), mask=c_mask)
    if COMPUTE_DX:
        if TRAINING:
            M = _count(N, S, ACC)
            dx = _bcast(w * rstd) * (g - (_bcast(db) + xhat * _bcast(dw)) / M)
        else:
            dx = _bcast(w * rstd) * g
        dx_ptrs, _ = _tile(dx_ptr, 0, 0, c_offs, N, C, S, stride_dxn, stride_dxc, stride_dxs, BLOCK_N, BLOCK_S)
        tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# Backward, split stage 1: per split, sum(g) and sum(g*xhat) with g = dy*act'(w*xhat + b).
# Eval (TRAINING=False): dx = w*rstd*g needs no global sum, so it is written here, in the same pass.
@triton.jit
def _bn_bwd_reduce_partial_kernel(
    part_db_ptr, part_dw_ptr, dx_ptr,  # outputs; partials (num_splits, C) in ACC
    x_ptr, dy_ptr, w_ptr, b_ptr, mean_ptr, stat_ptr,
    N, C, S, stride_xn, stride_xc, stride_xs, stride_dyn, stride_dyc, stride_dys, stride_dxn, stride_dxc, stride_dxs,
    eps: tl.float64, act_param,
    TRAINING: tl.constexpr, STAT_IS_VAR: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    COMPUTE_DX: tl.constexpr, ACTIVATION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    mean, rstd = _load_stats(mean_ptr, stat_ptr, c_offs, C, eps, STAT_IS_VAR, ACC)
    w, b = _load_channel_params(w_ptr, b_ptr, c_offs, C, HAS_WEIGHT, HAS_BIAS, ACC)
    db = tl.zeros([BLOCK_C], ACC)
    dw = tl.zeros([BLOCK_C], ACC)
    s_tiles = tl.cdiv(S, BLOCK_S)
    num_tiles = tl.cdiv(N, BLOCK_N) * s_tiles
    for t in range(split, num_tiles, num_splits):
        n0 = (t // s_tiles) * BLOCK_N
        s0 = (t % s_tiles) * BLOCK_S
        x_ptrs, mask = _tile(x_ptr, n0, s0, c_offs, N, C, S, stride_xn, stride_xc, stride_xs, BLOCK_N, BLOCK_S)
        dy_ptrs, _ = _tile(dy_ptr, n0, s0, c_offs, N, C, S, stride_dyn, stride_dyc, stride_dys, BLOCK_N, BLOCK_S)
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(ACC)  # dy = 0 on masked lanes: they add nothing
        xhat = (x - _bcast(mean)) * _bcast(rstd)
        g = dy * _act_grad(xhat * _bcast(w) + _bcast(b), ACTIVATION, act_param)
        db += _channel_sum(g)
        dw += _channel_sum(g * xhat)
        if not TRAINING:
            if COMPUTE_DX:
                dx_ptrs, _ = _tile(
                    dx_ptr, n0, s0, c_offs, N, C, S, stride_dxn, stride_dxc, stride_dxs, BLOCK_N, BLOCK_S
                )
                tl.store(dx_ptrs, (_bcast(w * rstd) * g).to(dx_ptr.dtype.element_ty), mask=mask)
    out = split * C + c_offs
    c_mask = c_offs < C
    tl.store(part_db_ptr + out, db, mask=c_mask)
    tl.store(part_dw_ptr + out, dw, mask=c_mask)


@triton.jit
def _bn_bwd_reduce_finalize_kernel(
    db_ptr, dw_ptr,  # outputs (C,), ACC: the dx kernel reads them at full precision
    part_db_ptr, part_dw_ptr, C, num_splits,
    BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Backward split stage 2: db = sum_k part_db[k], dw = sum_k part_dw[k], in a fixed order."""
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    db = tl.zeros([BLOCK_C], part_db_ptr.dtype.element_ty)
    dw = tl.zeros([BLOCK_C], part_dw_ptr.dtype.element_ty)
    for k0 in range(0, num_splits, BLOCK_SPLITS):
        k = k0 + tl.arange(0, BLOCK_SPLITS)
        offs = k[:, None] * C + c_offs[None, :]
        mask = (k[:, None] < num_splits) & c_mask[None, :]
        db += tl.sum(tl.load(part_db_ptr + offs, mask=mask, other=0.0), axis=0)
        dw += tl.sum(tl.load(part_dw_ptr + offs, mask=mask, other=0.0), axis=0)
    tl.store(db_ptr + c_offs, db, mask=c_mask)
    tl.store(dw_ptr + c_offs, dw, mask=c_mask)


# Backward, split stage 3 (train): dx = w*rstd * (g - (db + xhat*dw)/M), elementwise with the global db, dw.
@triton.jit
def _bn_bwd_dx_kernel(
    dx_ptr,  # output
    x_ptr, dy_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, db_ptr, dw_ptr,
    N, C, S, stride_xn, stride_xc, stride_xs, stride_dyn, stride_dyc, stride_dys, stride_dxn, stride_dxc, stride_dxs,
    act_param,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    mean, rstd = _load_stats(mean_ptr, rstd_ptr, c_offs, C, 0.0, False, ACC)
    w, b = _load_channel_params(w_ptr, b_ptr, c_offs, C, HAS_WEIGHT, HAS_BIAS, ACC)
    inv_m = 1.0 / _count(N, S, ACC)
    db_over_m = _bcast(tl.load(db_ptr + c_offs, mask=c_mask, other=0.0) * inv_m)
    dw_over_m = _bcast(tl.load(dw_ptr + c_offs, mask=c_mask, other=0.0) * inv_m)
    s_tiles = tl.cdiv(S, BLOCK_S)
    num_tiles = tl.cdiv(N, BLOCK_N) * s_tiles
    for t in range(split, num_tiles, num_splits):
        n0 = (t // s_tiles) * BLOCK_N
        s0 = (t % s_tiles) * BLOCK_S
        x_ptrs, mask = _tile(x_ptr, n0, s0, c_offs, N, C, S, stride_xn, stride_xc, stride_xs, BLOCK_N, BLOCK_S)
        dy_ptrs, _ = _tile(dy_ptr, n0, s0, c_offs, N, C, S, stride_dyn, stride_dyc, stride_dys, BLOCK_N, BLOCK_S)
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(ACC)
        xhat = (x - _bcast(mean)) * _bcast(rstd)
        g = dy * _act_grad(xhat * _bcast(w) + _bcast(b), ACTIVATION, act_param)
        dx = _bcast(w * rstd) * (g - db_over_m - xhat * dw_over_m)
        dx_ptrs, _ = _tile(dx_ptr, n0, s0, c_offs, N, C, S, stride_dxn, stride_dxc, stride_dxs, BLOCK_N, BLOCK_S)
        tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
