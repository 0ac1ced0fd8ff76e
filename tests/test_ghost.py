"""Ghost BatchNorm (`virtual_batch_size=G`): each chunk of G samples normalised with its own statistics.

The reference is torch itself on the same input: torch's BatchNorm module called on each chunk in order (outputs,
running stats, num_batches_tracked), and autograd through those calls (dx, dweight, dbias, the residual's
gradient), on both launch plans (the `kernel_path` fixture: the split plan's 64-element tiles give several splits
per chunk), float64 and float32.
"""

import pytest
import torch
from torch import nn

import bnfast
from bnfast import FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d
from bnfast.activations import resolve_activation

EPS = 1e-5
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}
TORCH_BN = {FusedBatchNorm1d: nn.BatchNorm1d, FusedBatchNorm2d: nn.BatchNorm2d, FusedBatchNorm3d: nn.BatchNorm3d}


def _pair(cls, C, dtype, G, momentum=0.1, activation=None, **kwargs):
    """(bnfast module with virtual_batch_size=G, torch module), same random parameters and running stats."""
    g = torch.Generator().manual_seed(C)
    ours = cls(C, momentum=momentum, activation=activation, virtual_batch_size=G, dtype=dtype, **kwargs)
    ref = TORCH_BN[cls](C, momentum=momentum, dtype=dtype, **kwargs)
    with torch.no_grad():
        if ours.weight is not None:
            ours.weight.copy_(torch.rand(C, generator=g, dtype=dtype) + 0.5)
            ours.bias.copy_(torch.randn(C, generator=g, dtype=dtype))
        if ours.running_mean is not None:
            ours.running_mean.copy_(torch.randn(C, generator=g, dtype=dtype))
            ours.running_var.copy_(torch.rand(C, generator=g, dtype=dtype) + 0.5)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _torch_chunks(ref, x, G, activation=None, residual=None):
    """torch's module on each chunk of G samples in order, then the residual and the activation."""
    z = torch.cat([ref(chunk) for chunk in x.split(G)])
    return resolve_activation(activation).apply(z if residual is None else z + residual)


def _check(ours, ref, x, G, activation=None, residual=None, dtype=torch.float64):
    """Forward, backward and state of `ours` on x against torch's per-chunk calls."""
    g = torch.Generator().manual_seed(7)
    xo, xr = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    ro = rr = None
    if residual is not None:
        ro, rr = residual.detach().clone().requires_grad_(), residual.detach().clone().requires_grad_()
    y = ours(xo, ro)
    y_ref = _torch_chunks(ref, xr, G, activation, rr)
    tol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, **tol)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(xo.grad, xr.grad, **tol)
    if ours.weight is not None:
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **tol)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **tol)
    if residual is not None:
        torch.testing.assert_close(ro.grad, rr.grad, **tol)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if getattr(ref, name) is not None:
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name), **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "cls, shape, G",
    [
        (FusedBatchNorm1d, (11, 4), 3),  # (N, C), last chunk of 2
        (FusedBatchNorm1d, (10, 3, 7), 4),  # (N, C, L), last chunk of 2
        (FusedBatchNorm1d, (5, 3, 6), 1),  # one sample per chunk: statistics over L alone
        (FusedBatchNorm2d, (6, 3, 5, 5), 2),
        (FusedBatchNorm3d, (4, 2, 3, 2, 3), 3),
    ],
    ids=["NC-11x4-G3", "NCL-G4", "NCL-G1", "NCHW-G2", "NCDHW-G3"],
)
def test_matches_torch_per_chunk(kernel_path, dtype, cls, shape, G):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).mul(3).add(1).to(dtype)
    _check(*_pair(cls, shape[1], dtype, G), x, G, dtype=dtype)


@pytest.mark.parametrize("activation", ["relu", "gelu", nn.LeakyReLU(0.2)], ids=["relu", "gelu", "leaky"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_activation_residual_momentum(kernel_path, activation, momentum):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 3, 8, generator=g, dtype=torch.float64)
    residual = torch.randn(9, 3, 8, generator=g, dtype=torch.float64)
    ours, ref = _pair(FusedBatchNorm1d, 3, torch.float64, 4, momentum, activation)
    ours.num_batches_tracked.fill_(3)  # cumulative: every chunk's factor counts from here
    ref.num_batches_tracked.fill_(3)
    for _ in range(2):  # twice: the counter and the running stats carry over
        _check(ours, ref, x, 4, activation, residual)
        ours.zero_grad()
        ref.zero_grad()


@pytest.mark.parametrize("memory_format", ["channels_last", "sliced"])
def test_channels_last_and_strided_inputs(kernel_path, memory_format):
    """channels_last (the view merges n and s into rows: a chunk is G * H * W of them) and a non-contiguous input
    with non-contiguous parameters."""
    g = torch.Generator().manual_seed(3)
    if memory_format == "channels_last":
        x = torch.randn(7, 3, 4, 5, generator=g, dtype=torch.float64).to(memory_format=torch.channels_last)
        ours, ref = _pair(FusedBatchNorm2d, 3, torch.float64, 3, activation="relu")
        _check(ours, ref, x, 3, "relu")
        return
    x = torch.randn(8, 6, 9, generator=g, dtype=torch.float64)[:, ::2, 1:]  # (8, 3, 8), strided
    ours, ref = _pair(FusedBatchNorm1d, 3, torch.float64, 3)
    with torch.no_grad():  # strided parameters: views of a larger tensor, as in a packed parameter buffer
        ours.weight = nn.Parameter(torch.rand(6, generator=g, dtype=torch.float64)[::2] + 0.5)
        ref.weight.copy_(ours.weight)
    _check(ours, ref, x, 3)


def test_transposed_2d_input(kernel_path):
    """An (N, C) view whose N axis is the contiguous one: chunks stay rows of n (no transposed view)."""
    x = torch.randn(5, 13, generator=torch.Generator().manual_seed(4), dtype=torch.float64).t()  # (13, 5)
    _check(*_pair(FusedBatchNorm1d, 5, torch.float64, 5), x, 5)


def test_16bit_input(kernel_path):
    """bfloat16 input with float32 parameters and buffers (the AMP layout) against torch's per-chunk calls."""
    x = torch.randn(10, 4, 6, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    ours, ref = _pair(FusedBatchNorm1d, 4, torch.float32, 4)
    y = ours(x)
    y_ref = _torch_chunks(ref, x, 4)
    torch.testing.assert_close(y, y_ref, rtol=1.6e-2, atol=1e-2)  # one bfloat16 rounding of y
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)


def test_large_mean(kernel_path):
    """float32, mean 1e3 and std 1 per chunk: y as accurate as torch's float32 per chunk, against float64 on the
    same values (1 ulp of the mean is 6e-5 std, so a mean a few ulps off would show)."""
    x = (1e3 + torch.randn(12, 2, 16, generator=torch.Generator().manual_seed(6))).float()
    y = FusedBatchNorm1d(2, virtual_batch_size=5)(x)
    exact = _torch_chunks(nn.BatchNorm1d(2, dtype=torch.float64), x.double(), 5)
    torch_error = (_torch_chunks(nn.BatchNorm1d(2), x, 5).double() - exact).abs().max().item()
    error = (y.double() - exact).abs().max().item()
    assert error <= max(2 * torch_error, 1e-5), (error, torch_error)


def test_one_chunk_is_plain_batch_norm(kernel_path):
    """G >= N is one chunk: bit-identical to the module without virtual_batch_size, counter + 1."""
    x = torch.randn(6, 3, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float32)
    ghost, _ = _pair(FusedBatchNorm1d, 3, torch.float32, 6, activation="relu")
    plain, _ = _pair(FusedBatchNorm1d, 3, torch.float32, None, activation="relu")
    torch.testing.assert_close(ghost(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(ghost.running_var, plain.running_var, rtol=0, atol=0)
    assert int(ghost.num_batches_tracked) == int(plain.num_batches_tracked) == 1


def test_eval_ignores_virtual_batch_size(kernel_path):
    x = torch.randn(8, 3, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ghost, ref = _pair(FusedBatchNorm1d, 3, torch.float64, 2)
    ghost.eval()
    ref.eval()
    torch.testing.assert_close(ghost(x), ref(x), **TOL[torch.float64])
    assert int(ghost.num_batches_tracked) == 0


def test_without_running_stats(kernel_path):
    """track_running_stats=False: every chunk normalised with its own statistics, nothing stored."""
    x = torch.randn(7, 3, 4, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    ours, ref = _pair(FusedBatchNorm1d, 3, torch.float64, 3, track_running_stats=False)
    _check(ours, ref, x, 3)


def test_functional_matches_module():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(9, 3, 5, generator=g, dtype=torch.float64)
    module, _ = _pair(FusedBatchNorm1d, 3, torch.float64, 4, activation="silu")
    rm, rv = module.running_mean.clone(), module.running_var.clone()
    y = bnfast.batch_norm(
        x, rm, rv, module.weight, module.bias, True, 0.1, EPS, activation="silu", virtual_batch_size=4
    )
    torch.testing.assert_close(y, module(x), rtol=0, atol=0)
    torch.testing.assert_close(rm, module.running_mean, rtol=0, atol=0)


def test_one_launch_plan_whatever_the_number_of_chunks():
    """The chunk is one more reduction axis, not a Python loop: the same launches for 2 chunks as for 8 (the
    running stats' chunk-order update is one small kernel more than BatchNorm)."""
    names = {}
    for G in (16, 4):
        for plan, tile in (("single", None), ("split", 64)):
            module = FusedBatchNorm1d(3, activation="relu", virtual_batch_size=G)
            x = torch.randn(32, 3, 4, requires_grad=True)
            with bnfast.testing.force_plan(plan, tile), bnfast.testing.record_launches() as log:
                module(x).sum().backward()
            names[G, plan] = [entry[0] for entry in log]
    assert (
        names[16, "single"]
        == names[4, "single"]
        == [
            "_bn_fwd_single_kernel",
            "_bn_running_chunks_kernel",
            "_bn_bwd_single_kernel",
            "_bn_grad_finalize_kernel",
        ]
    )
    assert (
        names[16, "split"]
        == names[4, "split"]
        == [
            "_bn_stats_partial_kernel",
            "_bn_stats_finalize_kernel",
            "_bn_running_chunks_kernel",
            "_bn_normalize_kernel",
            "_bn_grad_partial_kernel",
            "_bn_grad_finalize_kernel",
            "_bn_grad_input_kernel",
        ]
    )


@pytest.mark.parametrize("kernel", ["single", "split"])
def test_gradcheck(kernel):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(5, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(2, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(5, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b, r):
        return bnfast.batch_norm(x, None, None, w, b, True, activation="tanh", residual=r, virtual_batch_size=3)

    with bnfast.testing.force_plan(kernel, 16 if kernel == "split" else None):
        # fast_mode: a random projection of the Jacobian (each perturbation runs the interpreted kernels)
        assert torch.autograd.gradcheck(fn, (x, w, b, r), fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, (x, w, b, r), fast_mode=True)  # the torch-op slow path, per chunk


@pytest.mark.parametrize("G", [0, -2, 2.5, True, "4"])
def test_invalid_virtual_batch_size(G):
    with pytest.raises(ValueError, match="virtual_batch_size"):
        FusedBatchNorm1d(3, virtual_batch_size=G)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        bnfast.batch_norm(torch.randn(4, 3), None, None, training=True, virtual_batch_size=G)


def test_errors_before_any_state_change():
    """A last chunk of one value per channel: torch's ValueError and message, nothing counted or updated."""
    module = FusedBatchNorm1d(3, virtual_batch_size=4)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, got input size"):
        module(torch.randn(9, 3))  # chunks of 4, 4, 1
    with pytest.raises(ValueError, match=r"got input size torch.Size\(\[1, 3\]\)"):
        nn.BatchNorm1d(3)(torch.randn(9, 3)[8:])  # torch's own message for that chunk
    for k, v in module.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="mask"):
        module(torch.randn(8, 3, 5), mask=torch.ones(8, 5, dtype=torch.bool))
    module(torch.randn(9, 3, 2))  # a last chunk of one sample with L = 2 holds two values per channel: fine


def test_torch_fallback_matches_kernels(monkeypatch):
    """The torch-op fallback (CPU without the interpreter, functorch) is torch's batch_norm per chunk: the same
    function as the kernels, cumulative counter included."""
    from bnfast import functional

    x = torch.randn(10, 3, 4, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    kernels, _ = _pair(FusedBatchNorm1d, 3, torch.float64, 3, None, "relu")
    fallback, _ = _pair(FusedBatchNorm1d, 3, torch.float64, 3, None, "relu")
    y = kernels(x)
    monkeypatch.setattr(functional, "uses_triton", lambda x: False)
    y_t = fallback(x)
    torch.testing.assert_close(y, y_t, **TOL[torch.float64])
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(kernels, name), getattr(fallback, name), **TOL[torch.float64])


def test_compile_fullgraph_and_opcheck():
    """The chunk size is an op input: torch.compile(fullgraph=True) gives the eager result; opcheck passes."""
    from bnfast import ops

    g = torch.Generator().manual_seed(14)
    x = torch.randn(9, 3, 4, generator=g, dtype=torch.float64)
    eager, compiled = (_pair(FusedBatchNorm1d, 3, torch.float64, 4, activation="relu")[0] for _ in range(2))
    fn = torch.compile(lambda m, x: m(x), fullgraph=True, backend="aot_eager")
    outs = []
    for module, call in ((eager, lambda m, x: m(x)), (compiled, fn)):
        xr = x.clone().requires_grad_()
        y = call(module, xr)
        y.sum().backward()
        outs.append((y.detach(), xr.grad, module.weight.grad, module.running_mean.clone(), module.num_batches_tracked))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    xg = x.clone().requires_grad_()
    w, b = torch.rand(3, generator=g, dtype=torch.float64).add(0.5).requires_grad_(), torch.zeros(3).double()
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    args = (xg, w, b, rm, rv, None, True, 0.1, False, EPS, "relu", 0.0, None, None, None, 4)
    torch.library.opcheck(ops.batch_norm_op, args)
    _, mean, rstd, _, _ = ops.batch_norm_op(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    assert mean.shape == (3, 3)  # (chunks, C)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    bwd = (dy, x, w.detach(), b, mean, rstd, None, True, EPS, "relu", 0.0, [True, True, True, False], None, None, 4)
    torch.library.opcheck(ops.batch_norm_backward_op, bwd)


def test_repr_and_state_dict():
    module = FusedBatchNorm2d(4, virtual_batch_size=32)
    assert "virtual_batch_size=32" in repr(module)
    assert set(module.state_dict()) == set(nn.BatchNorm2d(4).state_dict())
    assert "virtual_batch_size" not in repr(FusedBatchNorm2d(4))


def test_sync_conversion_leaves_ghost_modules_alone():
    """convert_sync_batchnorm would change what a ghost module computes (chunks of one rank's batch): left alone."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), FusedBatchNorm2d(4, virtual_batch_size=8))
    with pytest.warns(UserWarning, match="leaves FusedBatchNorm2d"):
        converted = bnfast.FusedSyncBatchNorm.convert_sync_batchnorm(model)
    assert type(converted[1]) is FusedBatchNorm2d and converted[1].virtual_batch_size == 8


def test_readme_example_runs():
    """The README's Ghost BatchNorm snippet runs as written: 8 chunks, each normalised with its own statistics."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Ghost BatchNorm.*?$(.*?)(?=^## )", readme, re.M | re.S).group(1)
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    bn = scope["bn"]
    assert int(bn.num_batches_tracked) == 8 and scope["y"].shape == (1000, 64)
    x = torch.randn(1000, 64, generator=torch.Generator().manual_seed(15))
    expected = torch.cat(
        [torch.relu((c - c.mean(0)) * torch.rsqrt(c.var(0, correction=0) + EPS)) for c in x.split(128)]
    )
    torch.testing.assert_close(bn(x), expected, rtol=1e-5, atol=1e-5)
