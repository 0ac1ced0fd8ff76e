"""64-bit element offsets: what the interpreter hides (it cannot allocate a tensor of 2**31 elements).

The kernels compute a tile's element offsets in `kernels.batch_norm._tile_offsets`. Triton types a stride
argument as int32 whenever its value fits, so a product such as c * stride_c overflows int32 on a tensor whose
every stride fits (BatchNorm3d on (1, 32, 512, 512, 512): stride_c = 2**27, c up to 31) unless the index is widened
first. These tests run `_tile_offsets` itself in a small kernel that stores the offsets instead of loading
through them, with the strides and tile origins of such tensors and no storage behind them: the interpreter
computes int32 arithmetic in numpy's int32, which wraps exactly as the GPU's does.
"""

import pytest
import torch
import triton
import triton.language as tl

from bnfast.kernels.batch_norm import _tile_offsets


# fmt: off
@triton.jit
def _offsets_kernel(out_ptr, n0, s0, N, C, S, stride_n, stride_c, stride_s,
                    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    c_offs = tl.arange(0, BLOCK_C)
    offs, mask = _tile_offsets(n0, s0, c_offs, N, C, S, stride_n, stride_c, stride_s, BLOCK_N, BLOCK_S)
    i = (tl.arange(0, BLOCK_N)[:, None, None] * (BLOCK_C * BLOCK_S) + tl.arange(0, BLOCK_C)[None, :, None] * BLOCK_S
         + tl.arange(0, BLOCK_S)[None, None, :])
    tl.store(out_ptr + i, offs, mask=mask)
# fmt: on


CASES = {
    # (N, C, S), strides, tile origin (n0, s0), tile (BLOCK_N, BLOCK_C, BLOCK_S)
    "bn3d-1x32x512x512x512": ((1, 32, 512**3), (32 * 512**3, 512**3, 1), (0, 0), (1, 32, 2)),
    "transposed-2d-2^26x64": ((1, 64, 2**26), (0, 2**26, 1), (0, 2**26 - 4), (1, 64, 4)),  # x.t() of (64, 2**26)
    "channels_last-ncl-1x64x2^26": ((1, 64, 2**26), (64 * 2**26, 1, 64), (0, 2**26 - 8), (1, 64, 8)),
    "many-rows-2^25x128": ((2**25, 128, 1), (128, 1, 1), (2**25 - 4, 0), (4, 128, 1)),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_tile_offsets_are_64_bit(case):
    (N, C, S), (sn, sc, ss), (n0, s0), (bn, bc, bs) = CASES[case]
    out = torch.full((bn, bc, bs), -1, dtype=torch.int64)
    _offsets_kernel[(1,)](out, n0, s0, N, C, S, sn, sc, ss, BLOCK_N=bn, BLOCK_C=bc, BLOCK_S=bs)
    n = torch.arange(n0, n0 + bn, dtype=torch.int64).view(-1, 1, 1)
    c = torch.arange(bc, dtype=torch.int64).view(1, -1, 1)
    s = torch.arange(s0, s0 + bs, dtype=torch.int64).view(1, 1, -1)
    expected = n * sn + c * sc + s * ss
    assert expected.max() >= 2**31, "the case must need 64-bit offsets"
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
