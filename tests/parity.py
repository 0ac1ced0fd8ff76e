"""Shared parity helpers: run torch and bnfast side by side and judge both against a float64 reference.

Tolerance rule (STYLE.md, plus a relative floor): for each compared tensor,
    max|bnfast - ref64| <= 2 * max|torch - ref64| + ATOL[dtype] + RTOL[dtype] * max|ref64|
i.e. bnfast may be at most twice as far from the exact answer as torch itself is, plus a floor for the
dtype's rounding. It adapts to ill-conditioned inputs (tiny variance amplifies every rounding) without
letting a real bug through: a wrong formula is off by O(1), far above every term. RTOL covers reductions:
dbias = sum(dy) over M values carries ~log2(M) ulps of its magnitude in a float32 tree sum (torch's CPU
kernels accumulate in double and land within 0.5 ulp, so "2x torch" alone would demand more than float32
accumulation can give; 1e-6 is ~8 ulps).

Tensors live on DEVICE: CPU (the kernels under TRITON_INTERPRET=1) unless BNFAST_TEST_DEVICE=cuda.
"""

import os

import torch
from torch import nn

from bnfast import FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d, resolve_activation
from bnfast.reference import batch_norm_ref

# min N | MNIST | odd | 3d | N=1, L>1 | more than one block
SHAPES = [(2, 3), (32, 32), (67, 5), (2, 3, 7), (1, 8, 300), (130, 40, 3)]
ATOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-2, torch.bfloat16: 5e-2}
RTOL = {torch.float32: 1e-6, torch.float64: 1e-14, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DEVICE = torch.device(os.environ.get("BNFAST_TEST_DEVICE", "cpu"))


def shape_id(shape):
    return "x".join(map(str, shape))


def assert_matches_ref(ours, theirs, ref64, dtype, name, floor=0.0):
    """The tolerance rule above, through torch.testing.assert_close (which reports the worst element)."""
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} != torch's {theirs.dtype}"
    torch_err = (theirs.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    magnitude = ref64.abs().max().item() if ref64.numel() else 0.0
    atol = 2 * torch_err + ATOL[dtype] + RTOL[dtype] * magnitude + floor
    torch.testing.assert_close(
        ours.double(),
        ref64,
        rtol=0,
        atol=atol,
        equal_nan=True,
        msg=lambda m: f"{name} ({dtype}, torch's own error {torch_err:.3g}): {m}",
    )


MODULES = {
    1: (nn.BatchNorm1d, FusedBatchNorm1d),
    2: (nn.BatchNorm2d, FusedBatchNorm2d),
    3: (nn.BatchNorm3d, FusedBatchNorm3d),
}


def make_pair(num_features, *, dtype=torch.float32, device=DEVICE, activation=None, dims=1, **kwargs):
    """A torch BatchNorm{dims}d and a FusedBatchNorm{dims}d with identical random affine parameters and running
    stats (float32 parameters when `dtype` is 16-bit and `amp` is given: see `amp_pair`)."""
    torch_type, fused_type = MODULES[dims]
    torch_bn = torch_type(num_features, device=device, **kwargs)
    with torch.no_grad():
        if torch_bn.weight is not None:
            torch_bn.weight.uniform_(0.5, 1.5)
        if torch_bn.bias is not None:
            torch_bn.bias.uniform_(-0.5, 0.5)
        if torch_bn.running_mean is not None:
            torch_bn.running_mean.uniform_(-1, 1)
            torch_bn.running_var.uniform_(0.5, 2)
    torch_bn = torch_bn.to(dtype)
    ours = fused_type(num_features, device=device, activation=activation, **kwargs).to(dtype)
    ours.load_state_dict(torch_bn.state_dict())
    return torch_bn, ours


def same_strides(t: torch.Tensor) -> torch.Tensor:
    """A detached copy with t's very strides (clone() would make a non-dense layout contiguous)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t.detach())


def run_step(module, x, dy, bn=None):
    """Forward + backward on a fresh leaf copy of x: (y, dx, dweight, dbias); the BN is `module` unless given."""
    bn = module if bn is None else bn
    bn.zero_grad(set_to_none=True)
    x = same_strides(x).requires_grad_(True)
    y = module(x)
    y.backward(dy)
    grad = lambda p: None if p is None else p.grad  # noqa: E731
    return y.detach(), x.grad, grad(bn.weight), grad(bn.bias)


def ref64_step(torch_bn, x, dy, activation=None):
    """The float64 reference of one step: (y, dx, dweight, dbias, new running_mean, new running_var)."""
    x64 = x.detach().double().requires_grad_(True)
    params = [None if p is None else p.detach().double().requires_grad_(True) for p in (torch_bn.weight, torch_bn.bias)]
    stats = [None if s is None else s.double() for s in (torch_bn.running_mean, torch_bn.running_var)]
    use_batch_stats = torch_bn.training or stats[0] is None
    momentum = torch_bn.momentum
    if momentum is None and torch_bn.training and torch_bn.num_batches_tracked is not None:
        momentum = 1.0 / (int(torch_bn.num_batches_tracked) + 1)  # cumulative average, counter not yet incremented
    y, new_mean, new_var = batch_norm_ref(
        x64, *stats, *params, use_batch_stats, momentum or 0.0, torch_bn.eps, activation, upcast=True
    )
    y.backward(dy.double())
    grads = [None if p is None else p.grad for p in params]
    return y.detach(), x64.grad, *grads, new_mean, new_var


def compare_step(torch_bn, ours, x, dy, activation=None, floor=0.0):
    """One forward+backward of both modules from the same state; every output checked against ref64."""
    act = resolve_activation(activation)
    expected = ref64_step(torch_bn, x, dy, act)
    theirs = run_step(nn.Sequential(torch_bn, act.module()) if act else torch_bn, x, dy, bn=torch_bn)
    mine = run_step(ours, x, dy)
    for name, a, b, r in zip(("y", "dx", "dweight", "dbias"), mine, theirs, expected[:4], strict=True):
        if b is None:
            assert a is None, f"{name}: bnfast returned a gradient torch does not have"
            continue
        assert_matches_ref(a, b, r, x.dtype, name, floor)
    for name in ("running_mean", "running_var"):
        mine_stat, torch_stat = getattr(ours, name), getattr(torch_bn, name)
        if torch_stat is None:
            assert mine_stat is None
            continue
        assert_matches_ref(mine_stat, torch_stat, expected[4 if name == "running_mean" else 5], x.dtype, name, floor)
    if torch_bn.num_batches_tracked is not None:
        assert torch.equal(ours.num_batches_tracked, torch_bn.num_batches_tracked)


def random_input(shape, dtype=torch.float32, *, loc=0.0, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + loc
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x.to(DEVICE, dtype), dy.to(DEVICE, dtype)
