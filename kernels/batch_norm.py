"""BatchNorm (+ fused activation) kernels on x viewed as (N, C, S); M = N * S values per channel.

Math (statistics and reductions in ACC: float32 for float32/16-bit inputs, float64 for float64):
    Forward (train):  mean = sum(x)/M   var = sum((x-mean)**2)/M   rstd = 1/sqrt(var+eps)
                      xhat = (x-mean)*rstd   z = w*xhat + b [+ r]   y = act(z)      # r: the fused residual
                      running_mean <- (1-f)*running_mean + f*mean
                      running_var  <- (1-f)*running_var  + f*var*M/(M-1)         # unbiased, like torch
                      f = momentum, or 1/num_batches_tracked when momentum is None (cumulative average)
    Forward (eval):   the same with mean, var = running_mean, running_var.
    Backward (train): g = dy*act'(z)   (z recomputed from x, mean, rstd [and r]; nothing else is saved)
                      sum_g = sum(g)   sum_gx = sum(g*xhat)   dbias = sum_g   dweight = sum_gx
                      dx = w*rstd * (g - (sum_g + xhat*sum_gx)/M)   dr = g (no activation: dr = dy, no kernel)
    Backward (eval):  mean, rstd are constants: dx = w*rstd*g; dweight, dbias as above.
Masked (HAS_MASK: a bool mask over (n, s), True = valid, v = its indicator, read through its own strides with
c stride 0: 1 byte per (n, s) per tile; PAD: pad_value p written where v = 0):
    Forward (train):  M = sum(v) (per tile: the stats partials' count; single pass: the column's), mean and var
                      over the valid lanes only, running var with M/(M-1); every lane normalised with them:
                      y = act(z) where v, and y = act(z) (no PAD) or p (PAD) where not
    Backward (train): g = dy*act'(z), and g = 0 where not v under PAD (y was the constant); sum_g, sum_gx over all
                      lanes (g*xhat with xhat = 0 where g was zeroed); a padded x is outside the statistics, so
                      dx = w*rstd * (g - v*(sum_g + xhat*sum_gx)/M): the direct term only where not v
                      (0 under PAD). Split plan: `_bn_grad_partial` adds a third plane, the valid count per split,
                      `_bn_grad_finalize` sums it (HAS_COUNT), `_bn_grad_input` takes 1/M from it (no host sync).
    Eval:             the mask changes nothing but PAD (the statistics are the running ones).
    HAS_MASK=False (and PAD=False) compiles to exactly the unmasked code: every masked branch is a constexpr if.
Ghost BatchNorm (GHOST, training only; `chunk` = rows of the (N, C, S) view per chunk, the last chunk shorter):
    every chunk [g*chunk, min((g+1)*chunk, N)) is a BatchNorm of its own: mean, var, rstd, M and the backward's
    sums per (chunk, channel), so the chunk is one more reduction axis, not a loop. Grid axis 0 runs over (chunk,
    channel block), chunk-major; each program offsets its pointers to its chunk's first row and its row of the
    (chunks, C) statistics, and runs the unchanged tile code on N = the chunk's rows. Same passes and traffic as
    BatchNorm; the running stats move chunk by chunk in chunk order (`_bn_running_chunks_kernel`, one program per
    channel block: (1-f)*running + f*batch per chunk, rounded to the buffers' dtype each time, as torch's module
    called on each chunk would), and dweight, dbias are the chunks' sums added in chunk order
    (`_bn_grad_finalize_kernel`). GHOST=False compiles to exactly the code without it.

Accuracy. Variance is never E[x^2]-E[x]^2. A tile's (count, mean, M2 = sum of squared deviations) is exact
up to rounding, tiles merge with Chan's formula, and splits with the parallel formula
M2 = sum_k M2_k + sum_k n_k*(mean_k-mean)**2. The split plan works on x - shift, with shift = the mean of
the channel's first tile (|mean - shift| ~ spread / sqrt(tile size)), so partial means are small numbers
whose rounding is relative to the spread, not to |mean|: mean 1e6 / std 1 in float32 keeps the accuracy of
the single-pass plan. The merge (`_merge_stats`) keeps the rounding of the merged mean relative to the shift
(a compensation term and a TwoSum), so the mean does not inherit an ulp of |mean - shift| either: std 1e30
around mean 0 gets torch's accuracy. Means are refined once in registers (`_channel_mean`), so they come out
correctly rounded; y is computed as (x - mean)*scale + b, never x*scale + (b - mean*scale), which cancels.
Up to the float32 limit: tile sums are rescaled by a power of two where they would overflow, and the merge
weighs means by count/total, never count*mean (see `_channel_mean`, `_merge_stats`).

Partials (the unit SyncBatchNorm puts a collective between; format documented once, here):
    stats partials  `part` (3, K, C) in ACC: per split k: count, mean of (x - shift), M2; and `shift` (C,)
                    (masked: count = the split's valid lanes, the shift the first tile's valid mean)
    grad partials   `part` (2, K, C) in ACC: per split k: sum g, sum g*xhat; masked: (3, K, C), + valid count
Empty splits hold count 0 (stats) or 0 sums (grad) and add nothing; the finalize kernels merge the K rows
in a fixed order: no atomics, results are bit-identical run to run.
SyncBatchNorm (bnfast/distributed.py): `_bn_stats_merge` packs one rank's K rows into (4, C) = count, mean of
(x - shift), M2, shift; the gathered (world, 4, C) rows go through the same finalize with a shift per row
(ROW_SHIFTS: means rebased to the first non-empty rank's shift), in rank order; the backward all-reduces the
(2, C) sums of `_bn_grad_finalize` before `_bn_grad_input`.

Passes and launches per plan (chosen by `kernels.launch`):
    plan          train forward                         train backward                    traffic (x, dy)
    single-pass   _bn_fwd_single (1 launch)              _bn_bwd_single (1)                read once: the floor
    split         _bn_stats_partial -> _bn_stats_        _bn_grad_partial -> _bn_grad_     fwd reads x twice,
                  finalize -> _bn_normalize (3)          finalize -> _bn_grad_input (3)    bwd x and dy twice
    eval forward  _bn_normalize (1): one read, one write.
    eval backward single-pass: _bn_bwd_single (1); split: _bn_grad_partial (writes dx too) -> _bn_grad_finalize.
    ghost         as above, whatever the number of chunks, plus _bn_running_chunks after the statistics (with
                  running stats) and, single-pass backward, _bn_grad_finalize (dweight, dbias over the chunks)
"single-pass": one program holds a channel block's whole column in registers. "split": grid (channel blocks,
splits); each program walks the tiles t = split, split + K, ... of its channel block, so even C = 32 fills a
132-SM GPU; dx needs the global sums before any element can be written, and x, dy do not fit on chip, so the
split backward reads them again (torch's native kernels do the same).

Tiles are [BLOCK_N, BLOCK_C, BLOCK_S] with any strides; the launcher sizes them so that the axis whose stride
is 1 (c for (N, C) and channels-last, s for NCL) is the long one, which Triton then vectorises.
Per-channel vectors (weight, bias, running stats) are read and written through their own strides.

Imports: triton and kernels.activations only.
"""

import triton
import triton.language as tl

from .activations import _act, _div_rn, _grad_pre_activation

# fmt: off
# (the kernels' and jit helpers' signatures, and the helper calls inside them, group their arguments by role,
# one role a line: the formatter would put one argument a line)


# ------------------------------------------------------------------------------------------------ jit helpers
@triton.jit
def _tile_offsets(n0, s0, c_offs, N, C, S, stride_n, stride_c, stride_s, BLOCK_N: tl.constexpr,
                  BLOCK_S: tl.constexpr):
    """Element offsets and mask of the [BLOCK_N, BLOCK_C, BLOCK_S] tile whose first (n, s) is (n0, s0).
    Every index is widened to int64 before its stride multiplies it: any one product can pass 2**31 (c * stride_c
    of BatchNorm3d on (1, 32, 512, 512, 512); s * stride_s of a transposed (N, C) with N * C >= 2**31) although
    each stride fits in int32, and Triton types a stride argument as int32 whenever its value does. The addresses
    are 64-bit anyway, so the tile's registers barely change (bench.kernel_report)."""
    n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    c = c_offs.to(tl.int64)
    s = (s0 + tl.arange(0, BLOCK_S)).to(tl.int64)
    offs = n[:, None, None] * stride_n + c[None, :, None] * stride_c + s[None, None, :] * stride_s
    mask = (n[:, None, None] < N) & (c_offs[None, :, None] < C) & (s[None, None, :] < S)
    return offs, mask


@triton.jit
def _load_valid(m_ptr, n0, s0, c_offs, N, C, S, stride_mn, stride_ms, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """The mask's tile (True = a valid position), broadcast over the tile's channels: one byte per (n, s), read
    through the mask's own strides (c stride 0); lanes outside the tile are False."""
    offs, inside = _tile_offsets(n0, s0, c_offs, N, C, S, stride_mn, 0, stride_ms, BLOCK_N, BLOCK_S)
    return inside & (tl.load(m_ptr + offs, mask=inside, other=0) != 0)


@triton.jit
def _tile(ptr, n0, s0, c_offs, N, C, S, stride_n, stride_c, stride_s, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """Pointers and mask of the [BLOCK_N, BLOCK_C, BLOCK_S] tile whose first (n, s) is (n0, s0)."""
    offs, mask = _tile_offsets(n0, s0, c_offs, N, C, S, stride_n, stride_c, stride_s, BLOCK_N, BLOCK_S)
    return ptr + offs, mask


@triton.jit
def _load_tile(ptr, n0, s0, c_offs, N, C, S, stride_n, stride_c, stride_s, ACC: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """A tile in ACC and its mask; masked lanes load 0 (each caller says why that is safe)."""
    ptrs, mask = _tile(ptr, n0, s0, c_offs, N, C, S, stride_n, stride_c, stride_s, BLOCK_N, BLOCK_S)
    return tl.load(ptrs, mask=mask, other=0.0).to(ACC), mask


@triton.jit
def _store_tile(ptr, value, n0, s0, c_offs, N, C, S, stride_n, stride_c, stride_s,
                BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    ptrs, mask = _tile(ptr, n0, s0, c_offs, N, C, S, stride_n, stride_c, stride_s, BLOCK_N, BLOCK_S)
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_residual(z, r_ptr, n0, s0, c_offs, N, C, S, stride_rn, stride_rc, stride_rs, HAS_RESIDUAL: tl.constexpr,
                  ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """z + residual (same tile), or z when there is none."""
    if HAS_RESIDUAL:
        r, _ = _load_tile(r_ptr, n0, s0, c_offs, N, C, S, stride_rn, stride_rc, stride_rs, ACC, BLOCK_N, BLOCK_S)
        return z + r
    else:
        return z


@triton.jit
def _grad_tile(x_ptr, dy_ptr, r_ptr, n0, s0, c_offs, N, C, S, stride_xn, stride_xc, stride_xs, stride_dyn, stride_dyc,
               stride_dys, stride_rn, stride_rc, stride_rs, mean, rstd, w, b, act_param, HAS_RESIDUAL: tl.constexpr,
               ACTIVATION: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """(xhat, g) of one tile: xhat = (x - mean)*rstd, g = dy*act'(w*xhat + b [+ r]); masked lanes have dy = 0, so
    g = 0 there and they add nothing to the sums."""
    x, _ = _load_tile(x_ptr, n0, s0, c_offs, N, C, S, stride_xn, stride_xc, stride_xs, ACC, BLOCK_N, BLOCK_S)
    dy, _ = _load_tile(dy_ptr, n0, s0, c_offs, N, C, S, stride_dyn, stride_dyc, stride_dys, ACC, BLOCK_N, BLOCK_S)
    xhat = (x - _bcast(mean)) * _bcast(rstd)
    shift = _add_residual(_bcast(b), r_ptr, n0, s0, c_offs, N, C, S, stride_rn, stride_rc, stride_rs, HAS_RESIDUAL,
                          ACC, BLOCK_N, BLOCK_S)
    return xhat, _grad_pre_activation(dy, xhat, _bcast(w), shift, ACTIVATION, act_param)


@triton.jit
def _tile_origin(t, S, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """(n0, s0) of tile t; tiles are numbered s-fastest over the (N, S) reduction plane."""
    s_tiles = tl.cdiv(S, BLOCK_S)
    return (t // s_tiles) * BLOCK_N, (t % s_tiles) * BLOCK_S


@triton.jit
def _num_tiles(N, S, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    return tl.cdiv(N, BLOCK_N) * tl.cdiv(S, BLOCK_S)


@triton.jit
def _ghost_block(C, BLOCK_C: tl.constexpr):
    """GHOST: grid axis 0 runs over (chunk, channel block), chunk-major (axis 0 has no 65535 limit, so any number
    of chunks fits): (channel block, chunk g) of this program."""
    c_blocks = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    return pid % c_blocks, pid // c_blocks


@triton.jit
def _ghost_rows(g, N, chunk):
    """Chunk g's first row (int64: g * chunk * stride_n can pass 2**31) and its row count: rows
    [g * chunk, min((g + 1) * chunk, N)) of the (N, C, S) view; the last chunk may be shorter."""
    row0 = (tl.zeros([], tl.int64) + g) * chunk  # (g is an int in the interpreter's loops)
    return row0, tl.minimum(N - row0, chunk)


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
    """1/sqrt(var + eps) in ACC. eps arrives as float64 (the kernels' `eps: tl.float64`): a Python float
    passed plainly would be rounded to float32 and float64 inputs would lose precision."""
    v = var + tl.full([], eps, ACC)
    # sqrt_rn and _div_rn: IEEE sqrt and correctly rounded division for float32 (tl.sqrt and `/` are approximate
    # there in compiled code); float64 sqrt and division are always IEEE.
    if ACC == tl.float32:
        return _div_rn(tl.full([], 1.0, tl.float32), tl.sqrt_rn(v))
    else:
        return 1.0 / tl.sqrt(v)


@triton.jit
def _channel_mean(x, mask, count):
    """sum(x)/count, then refined once by the mean of (x - first estimate).

    A plain float32 sum drifts by a few ulps of the total, which for |mean| >> spread is several ulps of the
    mean, and every xhat inherits it. The differences x - mean0 are exact (Sterbenz) and small, so the
    correction is accurate and the mean comes out correctly rounded, like a float64 sum would. Neither division
    needs to be IEEE (compiled float32 `/` is up to 2 ulp off): the correction absorbs mean0's error, and its own
    relative error is 2 ulp of a correction that is itself a few ulp of the mean.
    Near the float32 limit the sum of a tile can overflow though its mean cannot (64 values of 1e37): such
    channels sum x * p instead, p = 2**-ceil(log2(count)) (a power of two: exact scaling, and count * p <= 1
    keeps every partial sum finite); the correction is always summed scaled.
    """
    total = _channel_sum(x)
    p = tl.exp2(-tl.ceil(tl.log2(count)))
    mean0 = tl.where(tl.abs(total) < float("inf"), total / count, _channel_sum(x * p) / (count * p))
    refined = mean0 + _channel_sum(tl.where(mask, (x - _bcast(mean0)) * p, 0.0)) / (count * p)
    return tl.where(tl.abs(mean0) < float("inf"), refined, mean0)  # an inf stays inf (inf - inf would be NaN)


@triton.jit
def _masked_channel_mean(x, valid, count):
    """`_channel_mean` of the valid lanes (x is 0 elsewhere) with a per-channel count [BLOCK_C] (>= 1): the
    same sum, scaling and refinement, the count and scale broadcast over the tile."""
    total = _channel_sum(x)
    p = tl.exp2(-tl.ceil(tl.log2(count)))
    mean0 = tl.where(tl.abs(total) < float("inf"), total / count, _channel_sum(x * _bcast(p)) / (count * p))
    refined = mean0 + _channel_sum(tl.where(valid, (x - _bcast(mean0)) * _bcast(p), 0.0)) / (count * p)
    return tl.where(tl.abs(mean0) < float("inf"), refined, mean0)


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan's parallel update of (count, mean, M2) by another group. The cross term is skipped, not
    multiplied by 0, while the first group is empty: delta**2 may overflow, and inf * 0 is NaN."""
    n = n_a + n_b
    delta = mean_b - mean_a
    frac = n_b / tl.maximum(n, 1.0)
    cross = tl.where(n_a > 0, delta * delta * (n_a * frac), 0.0)
    return n, mean_a + delta * frac, m2_a + m2_b + cross


@triton.jit
def _load_vec(ptr, c_offs, C, stride, other, ACC: tl.constexpr):
    """A per-channel vector (weight, bias, stats) through its stride (views and expanded tensors work)."""
    # int64: a vector may be a view with a long stride (a column of a large matrix), (C - 1) * stride >= 2**31
    return tl.load(ptr + c_offs.to(tl.int64) * stride, mask=c_offs < C, other=other).to(ACC)


@triton.jit
def _load_affine(w_ptr, b_ptr, c_offs, C, stride_w, stride_b,
                 HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    if HAS_WEIGHT:
        w = _load_vec(w_ptr, c_offs, C, stride_w, 1.0, ACC)
    else:
        w = tl.full(c_offs.shape, 1.0, ACC)
    if HAS_BIAS:
        b = _load_vec(b_ptr, c_offs, C, stride_b, 0.0, ACC)
    else:
        b = tl.zeros(c_offs.shape, ACC)
    return w, b


@triton.jit
def _load_stats(mean_ptr, stat_ptr, c_offs, C, stride_mean, stride_stat, eps,
                STAT_IS_VAR: tl.constexpr, ACC: tl.constexpr):
    """Per-channel (mean, rstd): saved batch stats (STAT_IS_VAR=False) or running stats (eval, True)."""
    mean = _load_vec(mean_ptr, c_offs, C, stride_mean, 0.0, ACC)
    stat = _load_vec(stat_ptr, c_offs, C, stride_stat, 1.0, ACC)
    if STAT_IS_VAR:
        return mean, _rsqrt_eps(stat, eps, ACC)
    else:
        return mean, stat


@triton.jit
def _update_running_stats(rm_ptr, rv_ptr, rm_out_ptr, rv_out_ptr, nbt_ptr, c_offs, C,
                          stride_rm, stride_rv, stride_rmo, stride_rvo, mean, var, M, momentum,
                          CUMULATIVE: tl.constexpr, ACC: tl.constexpr):
    """running <- (1-f)*running + f*batch, read from rm/rv, written to rm_out/rv_out (the same tensors when in
    place). CUMULATIVE (momentum=None): f = 1/num_batches_tracked, read on device (no host sync), already
    incremented by the module."""
    if CUMULATIVE:
        factor = _div_rn(tl.full([], 1.0, ACC), tl.load(nbt_ptr).to(ACC))
    else:
        factor = tl.full([], momentum, ACC)
    c_mask = c_offs < C
    c = c_offs.to(tl.int64)  # strided views, as in _load_vec
    rm = tl.load(rm_ptr + c * stride_rm, mask=c_mask, other=0.0)
    rv = tl.load(rv_ptr + c * stride_rv, mask=c_mask, other=0.0)
    unbiased_var = var * _div_rn(M, tl.maximum(M - 1.0, 1.0))  # M >= 2 is checked on the host
    new_rm = (1.0 - factor) * rm.to(ACC) + factor * mean
    new_rv = (1.0 - factor) * rv.to(ACC) + factor * unbiased_var
    tl.store(rm_out_ptr + c * stride_rmo, new_rm.to(rm.dtype), mask=c_mask)
    tl.store(rv_out_ptr + c * stride_rvo, new_rv.to(rv.dtype), mask=c_mask)


@triton.jit
def _sum_rows(part_ptr, row0, num_rows, c_offs, C, BLOCK_ROWS: tl.constexpr, ACC: tl.constexpr):
    """sum_k part[row0 + k, c] over k < num_rows, in a fixed order (deterministic)."""
    total = tl.zeros(c_offs.shape, ACC)
    for k0 in range(0, num_rows, BLOCK_ROWS):
        k = k0 + tl.arange(0, BLOCK_ROWS)
        mask = (k[:, None] < num_rows) & (c_offs[None, :] < C)
        total += tl.sum(tl.load(part_ptr + (row0 + k[:, None]) * C + c_offs[None, :], mask=mask, other=0.0), axis=0)
    return total


@triton.jit
def _merge_stats(part_ptr, shift_ptr, num_rows, stride_row, stride_plane, stride_shift, c_offs, C,
                 ROW_SHIFTS: tl.constexpr, ACC: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """Merge stats rows k < num_rows (count, mean of x - shift, M2; row k at part_ptr + k * stride_row, the three
    planes stride_plane apart) in a fixed order with the parallel formula: (count, mean relative to the returned
    shift, M2, shift) per channel, the returned shift being the merged mean rounded (the relative mean is then
    its rounding error, tiny). One shift (C,) for all rows, or (ROW_SHIFTS) one per row, stride_shift apart: the
    means are then rebased to the first non-empty row's shift (an empty row's shift means nothing: a rank with
    no samples), so they stay small numbers (see Accuracy)."""
    c_mask = c_offs < C
    if ROW_SHIFTS:
        first = tl.zeros(c_offs.shape, tl.int32) + num_rows
        for k0 in range(0, num_rows, BLOCK_ROWS):
            k = k0 + tl.arange(0, BLOCK_ROWS)
            mask = (k[:, None] < num_rows) & c_mask[None, :]
            cnt = tl.load(part_ptr + k[:, None] * stride_row + c_offs[None, :], mask=mask, other=0.0)
            first = tl.minimum(first, tl.min(tl.where(cnt > 0, k[:, None], num_rows), axis=0))
        first = tl.where(first < num_rows, first, 0)  # all rows empty: any shift will do
        shift = tl.load(shift_ptr + first * stride_shift + c_offs, mask=c_mask, other=0.0)
    else:
        shift = tl.load(shift_ptr + c_offs, mask=c_mask, other=0.0)
    total = tl.zeros(c_offs.shape, ACC)
    for k0 in range(0, num_rows, BLOCK_ROWS):
        k = k0 + tl.arange(0, BLOCK_ROWS)
        mask = (k[:, None] < num_rows) & c_mask[None, :]
        total += tl.sum(tl.load(part_ptr + k[:, None] * stride_row + c_offs[None, :], mask=mask, other=0.0), axis=0)
    inv_total = _bcast_rows(_div_rn(tl.full(c_offs.shape, 1.0, ACC), tl.maximum(total, 1.0)))
    # weights count/total <= 1: a weighted sum that cannot overflow, where count * mean could (1e9 values of 1e30)
    hi = tl.zeros(c_offs.shape, ACC)
    for k0 in range(0, num_rows, BLOCK_ROWS):
        cnt, mean_k, _ = _stats_rows(part_ptr, shift_ptr, shift, k0, num_rows, stride_row, stride_plane, stride_shift,
                                     c_offs, c_mask, ROW_SHIFTS, BLOCK_ROWS)
        hi += tl.sum(cnt * inv_total * mean_k, axis=0)  # empty rows have count 0: they add nothing
    lo = tl.zeros(c_offs.shape, ACC)
    m2 = tl.zeros(c_offs.shape, ACC)
    for k0 in range(0, num_rows, BLOCK_ROWS):
        cnt, mean_k, m2_k = _stats_rows(part_ptr, shift_ptr, shift, k0, num_rows, stride_row, stride_plane,
                                        stride_shift, c_offs, c_mask, ROW_SHIFTS, BLOCK_ROWS)
        d = mean_k - hi[None, :]
        lo += tl.sum(tl.where(cnt > 0, cnt * inv_total * d, 0.0), axis=0)
        m2 += tl.sum(m2_k + tl.where(cnt > 0, cnt * d * d, 0.0), axis=0)
    # mean - shift = hi + lo, with lo the small correction of hi's rounding (the rows' means are relative to a
    # shift one sample away: |hi| is about the spread, and hi alone would carry an ulp of the spread into the
    # mean). The result is rebased onto shift + hi, rounded, with that rounding's exact error kept (TwoSum): the
    # mean comes out as accurate as its rows, whatever |mean - shift| is. (m2 around hi rather than the mean
    # differs by total * lo**2: an ulp of an ulp, not corrected.)
    new_shift = shift + hi
    moved = new_shift - shift
    rounding = (shift - (new_shift - moved)) + (hi - moved)
    finite = tl.abs(new_shift) < float("inf")  # an inf or NaN mean stays relative to the old shift, as it was
    return total, tl.where(finite, rounding + lo, hi), m2, tl.where(finite, new_shift, shift)


@triton.jit
def _bcast_rows(v):
    """A per-channel vector [BLOCK_C] as [1, BLOCK_C], against [BLOCK_ROWS, BLOCK_C] rows of partials."""
    return v[None, :]


@triton.jit
def _stats_rows(part_ptr, shift_ptr, shift, k0, num_rows, stride_row, stride_plane, stride_shift, c_offs, c_mask,
                ROW_SHIFTS: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """Rows k0 .. k0 + BLOCK_ROWS of the stats partials: (count, mean relative to `shift`, M2), [BLOCK_ROWS, BLOCK_C];
    with ROW_SHIFTS, each row's mean rebased from its own shift (an empty row's mean is 0)."""
    k = k0 + tl.arange(0, BLOCK_ROWS)
    offs = k[:, None] * stride_row + c_offs[None, :]
    mask = (k[:, None] < num_rows) & c_mask[None, :]
    cnt = tl.load(part_ptr + offs, mask=mask, other=0.0)
    mean_k = tl.load(part_ptr + stride_plane + offs, mask=mask, other=0.0)
    if ROW_SHIFTS:
        shift_k = tl.load(shift_ptr + k[:, None] * stride_shift + c_offs[None, :], mask=mask, other=0.0)
        mean_k = tl.where(cnt > 0, mean_k + (shift_k - shift[None, :]), 0.0)
    return cnt, mean_k, tl.load(part_ptr + 2 * stride_plane + offs, mask=mask, other=0.0)


# ----------------------------------------------------------------------------------------- forward kernels
@triton.jit
def _bn_fwd_single_kernel(
    y_ptr, mean_ptr, rstd_ptr, var_ptr,  # outputs; mean/rstd (C,) in ACC; GHOST: (chunks, C), and var too
    x_ptr, w_ptr, b_ptr, r_ptr, rm_ptr, rv_ptr, rm_out_ptr, rv_out_ptr, nbt_ptr, m_ptr,
    N, C, S, stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys, stride_rn, stride_rc, stride_rs,
    stride_w, stride_b, stride_rm, stride_rv, stride_rmo, stride_rvo, stride_mn, stride_ms, chunk,
    eps: tl.float64, momentum: tl.float64, act_param: tl.float64, pad_value: tl.float64,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
    CUMULATIVE: tl.constexpr, ACTIVATION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr, PAD: tl.constexpr,
    GHOST: tl.constexpr,
):
    """Single-pass training forward: the channel block's whole column is one tile, x is read once. HAS_MASK: the
    statistics run over the mask's valid lanes (M = their count); PAD writes pad_value at padded positions.
    GHOST: the program's column is one chunk of rows, with its own statistics; UPDATE_RUNNING then stores the
    chunk's variance for `_bn_running_chunks_kernel` instead of updating the running stats."""
    if GHOST:
        block, ci = _ghost_block(C, BLOCK_C)
        row0, N = _ghost_rows(ci, N, chunk)
        x_ptr += row0 * stride_xn
        y_ptr += row0 * stride_yn
        r_ptr += row0 * stride_rn
        mean_ptr += ci.to(tl.int64) * C
        rstd_ptr += ci.to(tl.int64) * C
        var_ptr += ci.to(tl.int64) * C
    else:
        block = tl.program_id(0)
    c_offs = block * BLOCK_C + tl.arange(0, BLOCK_C)
    x, mask = _load_tile(x_ptr, 0, 0, c_offs, N, C, S, stride_xn, stride_xc, stride_xs, ACC, BLOCK_N, BLOCK_S)
    if HAS_MASK:
        valid = _load_valid(m_ptr, 0, 0, c_offs, N, C, S, stride_mn, stride_ms, BLOCK_N, BLOCK_S)
        M = tl.maximum(_channel_sum(valid.to(ACC)), 1.0)  # >= 2 on real channels (checked on the host)
        mean = _masked_channel_mean(tl.where(valid, x, 0.0), valid, M)
        centered = tl.where(valid, x - _bcast(mean), 0.0)
    else:
        M = _count(N, S, ACC)
        mean = _channel_mean(x, mask, M)  # masked lanes hold 0 and are masked out of the correction
        centered = tl.where(mask, x - _bcast(mean), 0.0)
    var = _div_rn(_channel_sum(centered * centered), M)
    rstd = _rsqrt_eps(var, eps, ACC)
    c_mask = c_offs < C
    tl.store(mean_ptr + c_offs, mean, mask=c_mask)
    tl.store(rstd_ptr + c_offs, rstd, mask=c_mask)
    if UPDATE_RUNNING:
        if GHOST:  # the running stats move chunk by chunk, in order: _bn_running_chunks_kernel, from (mean, var)
            tl.store(var_ptr + c_offs, var, mask=c_mask)
        else:
            _update_running_stats(rm_ptr, rv_ptr, rm_out_ptr, rv_out_ptr, nbt_ptr, c_offs, C, stride_rm, stride_rv,
                                  stride_rmo, stride_rvo, mean, var, M, momentum, CUMULATIVE, ACC)
    w, b = _load_affine(w_ptr, b_ptr, c_offs, C, stride_w, stride_b, HAS_WEIGHT, HAS_BIAS, ACC)
    if HAS_MASK:  # every position is normalised, padded ones too
        centered = tl.where(mask, x - _bcast(mean), 0.0)
    z = _add_residual(centered * _bcast(rstd * w) + _bcast(b), r_ptr, 0, 0, c_offs, N, C, S, stride_rn, stride_rc,
                      stride_rs, HAS_RESIDUAL, ACC, BLOCK_N, BLOCK_S)
    y = _act(z, ACTIVATION, act_param)
    if PAD:
        y = tl.where(valid, y, pad_value)
    _store_tile(y_ptr, y, 0, 0, c_offs, N, C, S, stride_yn, stride_yc, stride_ys, BLOCK_N, BLOCK_S)


@triton.jit
def _bn_stats_partial_kernel(
    part_ptr, shift_ptr,  # outputs: (3, K, C) count / mean of (x - shift) / M2, and shift (C,); ACC
    x_ptr, m_ptr, N, C, S, stride_xn, stride_xc, stride_xs, stride_mn, stride_ms, chunk,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr,
    GHOST: tl.constexpr,
):
    """Split stage 1: (count, mean, M2) of x - shift over this split's tiles, tiles merged with Chan's formula.
    HAS_MASK: over the mask's valid lanes only (the counts are theirs; a tile with none adds nothing).
    GHOST: over one chunk of rows; part is (chunks, 3, K, C) and shift (chunks, C)."""
    if GHOST:
        block, ci = _ghost_block(C, BLOCK_C)
        row0, N = _ghost_rows(ci, N, chunk)
        x_ptr += row0 * stride_xn
        part_ptr += ci.to(tl.int64) * 3 * tl.num_programs(1) * C
        shift_ptr += ci.to(tl.int64) * C
    else:
        block = tl.program_id(0)
    c_offs = block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    # shift = the first tile's mean (every split computes the same): |mean - shift| ~ spread / sqrt(tile size)
    x0, mask0 = _load_tile(x_ptr, 0, 0, c_offs, N, C, S, stride_xn, stride_xc, stride_xs, ACC, BLOCK_N, BLOCK_S)
    if HAS_MASK:  # the first tile's valid lanes (none: shift 0)
        mask0 = _load_valid(m_ptr, 0, 0, c_offs, N, C, S, stride_mn, stride_ms, BLOCK_N, BLOCK_S)
        shift = _masked_channel_mean(tl.where(mask0, x0, 0.0), mask0, tl.maximum(_channel_sum(mask0.to(ACC)), 1.0))
    else:
        shift = _channel_mean(x0, mask0, (tl.minimum(N, BLOCK_N) * tl.minimum(S, BLOCK_S)).to(ACC))
    shift = tl.where(tl.abs(shift) < float("inf"), shift, 0.0)  # NaN/inf: no shift; the channel is NaN anyway
    cnt = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for t in range(split, _num_tiles(N, S, BLOCK_N, BLOCK_S), num_splits):
        n0, s0 = _tile_origin(t, S, BLOCK_N, BLOCK_S)
        x, mask = _load_tile(x_ptr, n0, s0, c_offs, N, C, S, stride_xn, stride_xc, stride_xs, ACC, BLOCK_N, BLOCK_S)
        if HAS_MASK:
            mask = _load_valid(m_ptr, n0, s0, c_offs, N, C, S, stride_mn, stride_ms, BLOCK_N, BLOCK_S)
            tile_cnt = _channel_sum(mask.to(ACC))  # 0 for a tile with no valid lane: it adds nothing
            x = tl.where(mask, x - _bcast(shift), 0.0)  # masked lanes: 0, outside every sum below
            tile_mean = _masked_channel_mean(x, mask, tl.maximum(tile_cnt, 1.0))
        else:
            tile_cnt = (tl.minimum(N - n0, BLOCK_N) * tl.minimum(S - s0, BLOCK_S)).to(ACC)
            x = tl.where(mask, x - _bcast(shift), 0.0)  # masked lanes: 0, outside every sum below
            tile_mean = _channel_mean(x, mask, tile_cnt)
        d = tl.where(mask, x - _bcast(tile_mean), 0.0)
        cnt, mean, m2 = _chan_merge(cnt, mean, m2, tile_cnt, tile_mean, _channel_sum(d * d))
    row = split * C + c_offs
    plane = num_splits * C
    tl.store(part_ptr + row, cnt, mask=c_mask)
    tl.store(part_ptr + plane + row, mean, mask=c_mask)
    tl.store(part_ptr + 2 * plane + row, m2, mask=c_mask)
    if split == 0:
        tl.store(shift_ptr + c_offs, shift, mask=c_mask)


@triton.jit
def _bn_stats_merge_kernel(
    out_ptr,  # output: (4, C) in ACC: count, mean of (x - shift), M2, shift
    part_ptr, shift_ptr, C, num_splits,
    ACC: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """SyncBatchNorm's local stage: this rank's K split rows merged in order into one row per channel, the
    packed unit that the forward's all_gather sends (one rank's partials, whatever its K)."""
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    total, mean_rel, m2, shift = _merge_stats(part_ptr, shift_ptr, num_splits, C, num_splits * C, 0, c_offs, C,
                                              False, ACC, BLOCK_SPLITS)
    tl.store(out_ptr + c_offs, total, mask=c_mask)
    tl.store(out_ptr + C + c_offs, mean_rel, mask=c_mask)
    tl.store(out_ptr + 2 * C + c_offs, m2, mask=c_mask)
    tl.store(out_ptr + 3 * C + c_offs, shift, mask=c_mask)


@triton.jit
def _bn_stats_finalize_kernel(
    mean_ptr, rstd_ptr, var_ptr,  # outputs, (C,) in ACC; GHOST: (chunks, C), and var
    part_ptr, shift_ptr, rm_ptr, rv_ptr, rm_out_ptr, rv_out_ptr, nbt_ptr,
    C, num_splits, stride_part_row, stride_part_plane, stride_shift_row, stride_rm, stride_rv, stride_rmo, stride_rvo,
    eps: tl.float64, momentum: tl.float64,
    ROW_SHIFTS: tl.constexpr, UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr, GHOST: tl.constexpr,
):
    """Split stage 2: merge the K rows in a fixed order (parallel formula); mean, rstd, running stats. The rows
    are one device's splits (one shift), or SyncBatchNorm's gathered ranks (ROW_SHIFTS: a shift per row).
    GHOST: one chunk's (3, K, C) block of the (chunks, 3, K, C) partials per program, mean/rstd/var (chunks, C);
    UPDATE_RUNNING then stores the variance (see _bn_fwd_single_kernel)."""
    if GHOST:
        block, ci = _ghost_block(C, BLOCK_C)
        part_ptr += ci.to(tl.int64) * 3 * stride_part_plane
        shift_ptr += ci.to(tl.int64) * C
        mean_ptr += ci.to(tl.int64) * C
        rstd_ptr += ci.to(tl.int64) * C
        var_ptr += ci.to(tl.int64) * C
    else:
        block = tl.program_id(0)
    c_offs = block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    total, mean_rel, m2, shift = _merge_stats(part_ptr, shift_ptr, num_splits, stride_part_row, stride_part_plane,
                                              stride_shift_row, c_offs, C, ROW_SHIFTS, ACC, BLOCK_SPLITS)
    safe_total = tl.maximum(total, 1.0)  # only masked channels (c >= C) are empty: keep them finite
    var = _div_rn(m2, safe_total)
    mean = shift + mean_rel
    tl.store(mean_ptr + c_offs, mean, mask=c_mask)
    tl.store(rstd_ptr + c_offs, _rsqrt_eps(var, eps, ACC), mask=c_mask)
    if UPDATE_RUNNING:
        if GHOST:
            tl.store(var_ptr + c_offs, var, mask=c_mask)
        else:
            _update_running_stats(rm_ptr, rv_ptr, rm_out_ptr, rv_out_ptr, nbt_ptr, c_offs, C, stride_rm, stride_rv,
                                  stride_rmo, stride_rvo, mean, var, safe_total, momentum, CUMULATIVE, ACC)


@triton.jit
def _bn_running_chunks_kernel(
    rm_out_ptr, rv_out_ptr,  # outputs (C,) in the buffers' dtype: the same tensors as rm, rv when in place
    rm_ptr, rv_ptr, nbt_ptr, mean_ptr, var_ptr,  # mean, var: (chunks, C) in ACC, each chunk's batch statistics
    N, C, S, chunk, stride_rm, stride_rv, stride_rmo, stride_rvo,
    momentum: tl.float64,
    CUMULATIVE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Ghost BatchNorm's running stats: the chunks' updates applied one after another in chunk order, each rounded
    to the buffers' dtype, as torch's BatchNorm called on each chunk in turn applies them. M of chunk g is its
    rows * S; CUMULATIVE: chunk g's factor is 1/(num_batches_tracked - chunks + 1 + g), the counter having been
    advanced by one per chunk (as torch's module advances it per call)."""
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    c = c_offs.to(tl.int64)  # strided views, as in _load_vec
    rm = tl.load(rm_ptr + c * stride_rm, mask=c_mask, other=0.0)
    rv = tl.load(rv_ptr + c * stride_rv, mask=c_mask, other=0.0)
    num_chunks = tl.cdiv(N, chunk)
    if CUMULATIVE:
        counted_before = tl.load(nbt_ptr).to(ACC) - num_chunks
    for g in range(num_chunks):
        _, rows = _ghost_rows(g, N, chunk)
        M = (rows * S).to(ACC)  # >= 2, checked on the host
        if CUMULATIVE:
            factor = _div_rn(tl.full([], 1.0, ACC), counted_before + (g + 1))
        else:
            factor = tl.full([], momentum, ACC)
        mean = tl.load(mean_ptr + g * C + c_offs, mask=c_mask, other=0.0)
        var = tl.load(var_ptr + g * C + c_offs, mask=c_mask, other=0.0)
        unbiased_var = var * _div_rn(M, tl.maximum(M - 1.0, 1.0))
        rm = ((1.0 - factor) * rm.to(ACC) + factor * mean).to(rm_ptr.dtype.element_ty)
        rv = ((1.0 - factor) * rv.to(ACC) + factor * unbiased_var).to(rv_ptr.dtype.element_ty)
    tl.store(rm_out_ptr + c * stride_rmo, rm, mask=c_mask)
    tl.store(rv_out_ptr + c * stride_rvo, rv, mask=c_mask)


@triton.jit
def _bn_normalize_kernel(
    y_ptr,  # output
    x_ptr, w_ptr, b_ptr, r_ptr, mean_ptr, stat_ptr, m_ptr,
    N, C, S, stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys, stride_rn, stride_rc, stride_rs,
    stride_w, stride_b, stride_mean, stride_stat, stride_mn, stride_ms, chunk,
    eps: tl.float64, act_param: tl.float64, pad_value: tl.float64,
    STAT_IS_VAR: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, PAD: tl.constexpr, GHOST: tl.constexpr,
):
    """Split stage 3 (train) and the whole eval forward: y = act((x - mean) * rstd * w + b [+ r]), one pass.
    PAD: pad_value where the mask is False (the mask is read only then). GHOST: one chunk of rows per program,
    with that chunk's row of the (chunks, C) mean and rstd."""
    if GHOST:
        block, ci = _ghost_block(C, BLOCK_C)
        row0, N = _ghost_rows(ci, N, chunk)
        x_ptr += row0 * stride_xn
        y_ptr += row0 * stride_yn
        r_ptr += row0 * stride_rn
        mean_ptr += ci.to(tl.int64) * C
        stat_ptr += ci.to(tl.int64) * C
    else:
        block = tl.program_id(0)
    c_offs = block * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    mean, rstd = _load_stats(mean_ptr, stat_ptr, c_offs, C, stride_mean, stride_stat, eps, STAT_IS_VAR, ACC)
    w, b = _load_affine(w_ptr, b_ptr, c_offs, C, stride_w, stride_b, HAS_WEIGHT, HAS_BIAS, ACC)
    # (x - mean) * scale + b, not x * scale + (b - mean * scale): the folded form cancels catastrophically
    # when |mean| >> spread (mean 1e4, std 1 loses 3 digits); the subtraction is exact there (Sterbenz).
    scale = rstd * w
    # eval with eps = 0 on a zero variance makes scale infinite: there, torch's folded form decides which outputs
    # are inf and which NaN, so use it on such channels (a per-channel select; exact everywhere else)
    if STAT_IS_VAR:
        folded = tl.abs(scale) == float("inf")
    else:
        folded = c_offs < 0  # never: batch statistics have eps > 0
    folded_shift = _bcast(tl.where(folded, b - mean * scale, b))
    centre = _bcast(tl.where(folded, 0.0, mean))
    scale = _bcast(scale)
    for t in range(split, _num_tiles(N, S, BLOCK_N, BLOCK_S), num_splits):
        n0, s0 = _tile_origin(t, S, BLOCK_N, BLOCK_S)
        x, _ = _load_tile(x_ptr, n0, s0, c_offs, N, C, S, stride_xn, stride_xc, stride_xs, ACC, BLOCK_N, BLOCK_S)
        z = _add_residual((x - centre) * scale + folded_shift, r_ptr, n0, s0, c_offs, N, C, S, stride_rn,
                          stride_rc, stride_rs, HAS_RESIDUAL, ACC, BLOCK_N, BLOCK_S)
        y = _act(z, ACTIVATION, act_param)
        if PAD:
            y = tl.where(_load_valid(m_ptr, n0, s0, c_offs, N, C, S, stride_mn, stride_ms, BLOCK_N, BLOCK_S), y,
                         pad_value)
        _store_tile(y_ptr, y, n0, s0, c_offs, N, C, S, stride_yn, stride_yc, stride_ys, BLOCK_N, BLOCK_S)


# ---------------------------------------------------------------------------------------- backward kernels
@triton.jit
def _bn_bwd_single_kernel(
    dx_ptr, dw_ptr, db_ptr, dr_ptr,  # outputs; dw/db (C,) in the parameters' dtype; dr = g (the residual's grad)
    x_ptr, dy_ptr, w_ptr, b_ptr, r_ptr, mean_ptr, stat_ptr, m_ptr,
    N, C, S, stride_xn, stride_xc, stride_xs, stride_dyn, stride_dyc, stride_dys, stride_dxn, stride_dxc, stride_dxs,
    stride_rn, stride_rc, stride_rs, stride_drn, stride_drc, stride_drs, stride_w, stride_b, stride_mean, stride_stat,
    stride_mn, stride_ms, chunk,
    eps: tl.float64, act_param: tl.float64,
    TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, COMPUTE_DR: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr, PAD: tl.constexpr,
    GHOST: tl.constexpr,
):
    """Single-pass backward: x and dy read once. Eval (TRAINING=False) reads the running stats (var, not rstd).
    HAS_MASK: M = the valid count and the statistics' terms of dx only at valid positions; PAD: g = 0 at padded
    positions (their output was the constant). GHOST (training): one chunk of rows per program, with its own
    statistics and M; dw_ptr and db_ptr are then planes 1 and 0 of a (2, chunks, C) partial in ACC (the chunk's
    sums, added up over chunks by _bn_grad_finalize_kernel)."""
    if GHOST:
        block, ci = _ghost_block(C, BLOCK_C)
        row0, N = _ghost_rows(ci, N, chunk)
        x_ptr += row0 * stride_xn
        dy_ptr += row0 * stride_dyn
        dx_ptr += row0 * stride_dxn
        r_ptr += row0 * stride_rn
        dr_ptr += row0 * stride_drn
        mean_ptr += ci.to(tl.int64) * C
        stat_ptr += ci.to(tl.int64) * C
        dw_ptr += ci.to(tl.int64) * C
        db_ptr += ci.to(tl.int64) * C
    else:
        block = tl.program_id(0)
    c_offs = block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    mean, rstd = _load_stats(mean_ptr, stat_ptr, c_offs, C, stride_mean, stride_stat, eps, not TRAINING, ACC)
    w, b = _load_affine(w_ptr, b_ptr, c_offs, C, stride_w, stride_b, HAS_WEIGHT, HAS_BIAS, ACC)
    xhat, g = _grad_tile(x_ptr, dy_ptr, r_ptr, 0, 0, c_offs, N, C, S, stride_xn, stride_xc, stride_xs, stride_dyn,
                         stride_dyc, stride_dys, stride_rn, stride_rc, stride_rs, mean, rstd, w, b, act_param,
                         HAS_RESIDUAL, ACTIVATION, ACC, BLOCK_N, BLOCK_S)
    if HAS_MASK:
        valid = _load_valid(m_ptr, 0, 0, c_offs, N, C, S, stride_mn, stride_ms, BLOCK_N, BLOCK_S)
        if PAD:
            g = tl.where(valid, g, 0.0)
            xhat = tl.where(valid, xhat, 0.0)  # an inf/NaN x at a padded position adds nothing
    if COMPUTE_DR:
        _store_tile(dr_ptr, g, 0, 0, c_offs, N, C, S, stride_drn, stride_drc, stride_drs, BLOCK_N, BLOCK_S)
    sum_g = _channel_sum(g)
    sum_gx = _channel_sum(g * xhat)
    if COMPUTE_DW:
        tl.store(dw_ptr + c_offs, sum_gx.to(dw_ptr.dtype.element_ty), mask=c_mask)
    if COMPUTE_DB:
        tl.store(db_ptr + c_offs, sum_g.to(db_ptr.dtype.element_ty), mask=c_mask)
    if COMPUTE_DX:
        if TRAINING:
            # per-channel means of g and g*xhat, then one multiply-add per element (as _bn_grad_input; an
            # element-wise division would be `div.full.f32`, approximate, in compiled float32)
            if HAS_MASK:  # x at a padded position is outside the statistics: only the direct term
                inv_m = _div_rn(tl.full([BLOCK_C], 1.0, ACC), tl.maximum(_channel_sum(valid.to(ACC)), 1.0))
                stats_term = tl.where(valid, _bcast(sum_g * inv_m) + xhat * _bcast(sum_gx * inv_m), 0.0)
                dx = _bcast(w * rstd) * (g - stats_term)
            else:
                inv_m = _div_rn(tl.full([], 1.0, ACC), _count(N, S, ACC))
                dx = _bcast(w * rstd) * (g - _bcast(sum_g * inv_m) - xhat * _bcast(sum_gx * inv_m))
        else:
            dx = _bcast(w * rstd) * g
        _store_tile(dx_ptr, dx, 0, 0, c_offs, N, C, S, stride_dxn, stride_dxc, stride_dxs, BLOCK_N, BLOCK_S)


@triton.jit
def _bn_grad_partial_kernel(
    part_ptr, dx_ptr, dr_ptr,  # outputs: (2, K, C) sum g / sum g*xhat in ACC (HAS_MASK: (3, K, C), + the valid
    x_ptr, dy_ptr, w_ptr, b_ptr, r_ptr, mean_ptr, stat_ptr, m_ptr,  # count); dx and dr (= g) only in eval
    N, C, S, stride_xn, stride_xc, stride_xs, stride_dyn, stride_dyc, stride_dys, stride_dxn, stride_dxc, stride_dxs,
    stride_rn, stride_rc, stride_rs, stride_drn, stride_drc, stride_drs, stride_w, stride_b, stride_mean, stride_stat,
    stride_mn, stride_ms, chunk,
    eps: tl.float64, act_param: tl.float64,
    TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    COMPUTE_DX: tl.constexpr, COMPUTE_DR: tl.constexpr, ACTIVATION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr, PAD: tl.constexpr,
    GHOST: tl.constexpr,
):
    """Backward split stage 1: per split, sum g and sum g*xhat. Eval: dx = w*rstd*g (and dr = g) need no global
    sum, so they are written here, in the same pass. HAS_MASK: a third plane, the split's valid count (grad_input's
    M, with no host sync); PAD: g = 0 at padded positions. GHOST (training): one chunk of rows per program; its
    rows are chunk * K + split of the (2, chunks * K, C) part (chunk-major within each plane)."""
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    if GHOST:
        block, ci = _ghost_block(C, BLOCK_C)
        num_rows = tl.cdiv(N, chunk) * num_splits  # rows per plane: chunks * K
        row0, N = _ghost_rows(ci, N, chunk)
        x_ptr += row0 * stride_xn
        dy_ptr += row0 * stride_dyn
        r_ptr += row0 * stride_rn
        mean_ptr += ci.to(tl.int64) * C
        stat_ptr += ci.to(tl.int64) * C
        row_base = ci.to(tl.int64) * num_splits  # this chunk's first row in each plane
    else:
        block = tl.program_id(0)
        row_base = 0
        num_rows = num_splits
    c_offs = block * BLOCK_C + tl.arange(0, BLOCK_C)
    mean, rstd = _load_stats(mean_ptr, stat_ptr, c_offs, C, stride_mean, stride_stat, eps, not TRAINING, ACC)
    w, b = _load_affine(w_ptr, b_ptr, c_offs, C, stride_w, stride_b, HAS_WEIGHT, HAS_BIAS, ACC)
    sum_g = tl.zeros([BLOCK_C], ACC)
    sum_gx = tl.zeros([BLOCK_C], ACC)
    cnt = tl.zeros([BLOCK_C], ACC)
    for t in range(split, _num_tiles(N, S, BLOCK_N, BLOCK_S), num_splits):
        n0, s0 = _tile_origin(t, S, BLOCK_N, BLOCK_S)
        xhat, g = _grad_tile(x_ptr, dy_ptr, r_ptr, n0, s0, c_offs, N, C, S, stride_xn, stride_xc, stride_xs,
                             stride_dyn, stride_dyc, stride_dys, stride_rn, stride_rc, stride_rs, mean, rstd, w, b,
                             act_param, HAS_RESIDUAL, ACTIVATION, ACC, BLOCK_N, BLOCK_S)
        if HAS_MASK:
            valid = _load_valid(m_ptr, n0, s0, c_offs, N, C, S, stride_mn, stride_ms, BLOCK_N, BLOCK_S)
            cnt += _channel_sum(valid.to(ACC))
            if PAD:
                g = tl.where(valid, g, 0.0)
                xhat = tl.where(valid, xhat, 0.0)
        sum_g += _channel_sum(g)
        sum_gx += _channel_sum(g * xhat)
        if not TRAINING:
            if COMPUTE_DX:
                dx = _bcast(w * rstd) * g
                _store_tile(dx_ptr, dx, n0, s0, c_offs, N, C, S, stride_dxn, stride_dxc, stride_dxs, BLOCK_N, BLOCK_S)
            if COMPUTE_DR:
                _store_tile(dr_ptr, g, n0, s0, c_offs, N, C, S, stride_drn, stride_drc, stride_drs, BLOCK_N, BLOCK_S)
    row = (row_base + split) * C + c_offs
    c_mask = c_offs < C
    tl.store(part_ptr + row, sum_g, mask=c_mask)
    tl.store(part_ptr + num_rows * C + row, sum_gx, mask=c_mask)
    if HAS_MASK:
        tl.store(part_ptr + 2 * num_rows * C + row, cnt, mask=c_mask)


@triton.jit
def _bn_grad_finalize_kernel(
    sums_ptr, dw_ptr, db_ptr,  # outputs: (2, C) sum g / sum g*xhat in ACC (for dx; HAS_COUNT: (3, C), + count);
    part_ptr, C, num_splits, num_chunks,  # dw, db in the params' dtype
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, ACC: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr, HAS_COUNT: tl.constexpr, GHOST: tl.constexpr,
):
    """Backward split stage 2: the K partial sums, in a fixed order (HAS_COUNT: the masked grad_partial's third
    plane, the valid counts, too). GHOST: part is (2, chunks * K, C), chunk-major; each chunk's K rows give its
    sums, (2, chunks, C), for grad_input, and dweight, dbias are the chunks' sums added in chunk order."""
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    if GHOST:
        sum_g = tl.zeros([BLOCK_C], ACC)
        sum_gx = tl.zeros([BLOCK_C], ACC)
        for g in range(num_chunks):
            chunk_g = _sum_rows(part_ptr, g * num_splits, num_splits, c_offs, C, BLOCK_SPLITS, ACC)
            chunk_gx = _sum_rows(part_ptr, (num_chunks + g) * num_splits, num_splits, c_offs, C, BLOCK_SPLITS, ACC)
            tl.store(sums_ptr + g * C + c_offs, chunk_g, mask=c_mask)
            tl.store(sums_ptr + (num_chunks + g) * C + c_offs, chunk_gx, mask=c_mask)
            sum_g += chunk_g
            sum_gx += chunk_gx
    else:
        sum_g = _sum_rows(part_ptr, 0, num_splits, c_offs, C, BLOCK_SPLITS, ACC)
        sum_gx = _sum_rows(part_ptr, num_splits, num_splits, c_offs, C, BLOCK_SPLITS, ACC)
        tl.store(sums_ptr + c_offs, sum_g, mask=c_mask)
        tl.store(sums_ptr + C + c_offs, sum_gx, mask=c_mask)
    if HAS_COUNT:
        tl.store(sums_ptr + 2 * C + c_offs, _sum_rows(part_ptr, 2 * num_splits, num_splits, c_offs, C, BLOCK_SPLITS,
                                                      ACC), mask=c_mask)
    if COMPUTE_DW:
        tl.store(dw_ptr + c_offs, sum_gx.to(dw_ptr.dtype.element_ty), mask=c_mask)
    if COMPUTE_DB:
        tl.store(db_ptr + c_offs, sum_g.to(db_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _bn_grad_input_kernel(
    dx_ptr, dr_ptr,  # outputs (dr = g, the residual's grad)
    x_ptr, dy_ptr, w_ptr, b_ptr, r_ptr, mean_ptr, rstd_ptr, sums_ptr, m_ptr,
    N, C, S, stride_xn, stride_xc, stride_xs, stride_dyn, stride_dyc, stride_dys, stride_dxn, stride_dxc, stride_dxs,
    stride_rn, stride_rc, stride_rs, stride_drn, stride_drc, stride_drs, stride_w, stride_b, stride_mn, stride_ms,
    chunk,
    inv_count: tl.float64, act_param: tl.float64,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, COMPUTE_DX: tl.constexpr,
    COMPUTE_DR: tl.constexpr, ACTIVATION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr, PAD: tl.constexpr,
    GHOST: tl.constexpr,
):
    """Backward split stage 3 (train): dx = w*rstd * (g - (sum_g + xhat*sum_gx) * inv_count), elementwise, and
    dr = g. inv_count = 1/M; SyncBatchNorm passes the global count's. HAS_MASK: 1/M from the valid count in
    sums' third row (inv_count unused), the statistics' terms only at valid positions; PAD: g = 0 at padded ones.
    GHOST: one chunk of rows per program, its row of the (chunks, C) mean and rstd and of the (2, chunks, C) sums,
    and its own M (inv_count unused)."""
    if GHOST:
        block, ci = _ghost_block(C, BLOCK_C)
        plane = tl.cdiv(N, chunk) * C  # the sums' plane stride: chunks * C
        row0, N = _ghost_rows(ci, N, chunk)
        x_ptr += row0 * stride_xn
        dy_ptr += row0 * stride_dyn
        dx_ptr += row0 * stride_dxn
        r_ptr += row0 * stride_rn
        dr_ptr += row0 * stride_drn
        mean_ptr += ci.to(tl.int64) * C
        rstd_ptr += ci.to(tl.int64) * C
        sums_ptr += ci.to(tl.int64) * C
    else:
        block = tl.program_id(0)
        plane = C
    c_offs = block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    mean, rstd = _load_stats(mean_ptr, rstd_ptr, c_offs, C, 1, 1, 0.0, False, ACC)
    w, b = _load_affine(w_ptr, b_ptr, c_offs, C, stride_w, stride_b, HAS_WEIGHT, HAS_BIAS, ACC)
    if HAS_MASK:
        inv_m = _div_rn(tl.full([BLOCK_C], 1.0, ACC),
                        tl.maximum(tl.load(sums_ptr + 2 * C + c_offs, mask=c_mask, other=1.0), 1.0))
    elif GHOST:
        inv_m = _div_rn(tl.full([], 1.0, ACC), _count(N, S, ACC))
    else:
        inv_m = tl.full([], inv_count, ACC)
    mean_g = _bcast(tl.load(sums_ptr + c_offs, mask=c_mask, other=0.0) * inv_m)
    mean_gx = _bcast(tl.load(sums_ptr + plane + c_offs, mask=c_mask, other=0.0) * inv_m)
    for t in range(split, _num_tiles(N, S, BLOCK_N, BLOCK_S), num_splits):
        n0, s0 = _tile_origin(t, S, BLOCK_N, BLOCK_S)
        xhat, g = _grad_tile(x_ptr, dy_ptr, r_ptr, n0, s0, c_offs, N, C, S, stride_xn, stride_xc, stride_xs,
                             stride_dyn, stride_dyc, stride_dys, stride_rn, stride_rc, stride_rs, mean, rstd, w, b,
                             act_param, HAS_RESIDUAL, ACTIVATION, ACC, BLOCK_N, BLOCK_S)
        if HAS_MASK:
            valid = _load_valid(m_ptr, n0, s0, c_offs, N, C, S, stride_mn, stride_ms, BLOCK_N, BLOCK_S)
            if PAD:
                g = tl.where(valid, g, 0.0)
        if COMPUTE_DR:
            _store_tile(dr_ptr, g, n0, s0, c_offs, N, C, S, stride_drn, stride_drc, stride_drs, BLOCK_N, BLOCK_S)
        if COMPUTE_DX:
            if HAS_MASK:  # a padded x is outside the statistics: only the direct term
                dx = _bcast(w * rstd) * (g - tl.where(valid, mean_g + xhat * mean_gx, 0.0))
            else:
                dx = _bcast(w * rstd) * (g - mean_g - xhat * mean_gx)
            _store_tile(dx_ptr, dx, n0, s0, c_offs, N, C, S, stride_dxn, stride_dxc, stride_dxs, BLOCK_N, BLOCK_S)
# fmt: on
