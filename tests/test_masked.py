"""Masked BatchNorm (`mask=`, `pad_value=`): statistics over the valid positions only.

Checked against torch on the same input: torch's BatchNorm on the gathered valid positions (batch statistics,
running stats, outputs at valid positions), outputs at padded positions from the same statistics (or pad_value),
and gradients against a float64 autograd reference written with torch ops (mask-aware mean and variance), on both
launch plans (the `kernel_path` fixture), float64 and float32.
"""

import pytest
import torch
import torch.nn.functional as F

import bnfast
from bnfast.activations import resolve_activation

EPS = 1e-5
MOMENTUM = 0.1
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def _lengths_mask(N, L, generator=None):
    """(N, L) padded-sequence mask: sample n valid on [0, length_n), lengths in [2, L]."""
    lengths = torch.randint(2, L + 1, (N,), generator=generator)
    lengths[0] = L
    return torch.arange(L)[None, :] < lengths[:, None]


def _channels_last_rows(x, mask):
    """x (N, C, *spatial) -> (M, C) valid rows, in mask order."""
    return x.movedim(1, -1)[mask]


def _reference(
    x, mask, weight, bias, training, running_mean, running_var, activation=None, residual=None, pad_value=None
):
    """Masked BatchNorm in float64 torch ops (differentiable; updates the given running stats in place)."""
    dims = [0, *range(2, x.dim())]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    valid = mask.unsqueeze(1)
    if training:
        count = valid.expand_as(x).sum(dims).to(x.dtype)
        mean = torch.where(valid, x, 0.0).sum(dims) / count
        var = torch.where(valid, x - mean.view(shape), 0.0).square().sum(dims) / count
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - MOMENTUM).add_(MOMENTUM * mean.to(running_mean.dtype))
                running_var.mul_(1 - MOMENTUM).add_(MOMENTUM * (var * count / (count - 1)).to(running_var.dtype))
    else:
        mean, var = running_mean.to(x.dtype), running_var.to(x.dtype)
    z = (x - mean.view(shape)) * torch.rsqrt(var + EPS).view(shape) * weight.view(shape) + bias.view(shape)
    if residual is not None:
        z = z + residual
    y = resolve_activation(activation).apply(z)
    if pad_value is not None:
        y = torch.where(valid, y, torch.full_like(y, pad_value))
    return y


def _params(C, dtype):
    g = torch.Generator().manual_seed(1)
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    rm = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    rv = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return w, b, rm, rv


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 2, 3, 4)], ids=["NC", "NCL", "NCHW"])
def test_forward_matches_torch_on_valid_positions(kernel_path, dtype, shape):
    """Outputs, batch statistics and running stats against torch's BatchNorm on the gathered valid positions;
    padded positions normalised with the same statistics; no-pad and pad_value."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64).mul(3).add(2).to(dtype)
    mask = torch.rand((shape[0], *shape[2:]), generator=g) < 0.6
    mask.view(-1)[:2] = True
    w, b, rm, rv = _params(shape[1], dtype)
    rows = _channels_last_rows(x, mask)  # (M, C)
    t_rm, t_rv = rm.clone(), rv.clone()
    y_valid = F.batch_norm(rows, t_rm, t_rv, w, b, True, MOMENTUM, EPS)
    mean, var = rows.double().mean(0), rows.double().var(0, unbiased=False)
    view = (1, -1) + (1,) * (x.dim() - 2)
    y_all = (x.double() - mean.view(view)) * torch.rsqrt(var + EPS).view(view) * w.double().view(
        view
    ) + b.double().view(view)
    for pad_value in (None, 0.0, -7.5):
        k_rm, k_rv = rm.clone(), rv.clone()
        y = bnfast.batch_norm(x, k_rm, k_rv, w, b, True, MOMENTUM, EPS, mask=mask, pad_value=pad_value)
        torch.testing.assert_close(_channels_last_rows(y, mask), y_valid, **TOL[dtype])
        torch.testing.assert_close(k_rm, t_rm, **TOL[dtype])
        torch.testing.assert_close(k_rv, t_rv, **TOL[dtype])
        padded = _channels_last_rows(y, ~mask)
        if pad_value is None:
            torch.testing.assert_close(padded.double(), _channels_last_rows(y_all, ~mask), **TOL[dtype])
        else:
            assert bool((padded == pad_value).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pad_value", [None, 0.5])
@pytest.mark.parametrize("activation,with_residual", [(None, False), ("silu", True), (None, True)])
def test_gradients_match_reference(kernel_path, dtype, pad_value, activation, with_residual):
    """(N, C, L), padded-sequence mask: forward and dx, dweight, dbias, dresidual against float64 autograd."""
    g = torch.Generator().manual_seed(2)
    N, C, L = 4, 3, 6
    x = torch.randn(N, C, L, generator=g, dtype=torch.float64)
    x[:, :, -1] = 1e3  # a large value at padded positions must not move the statistics
    mask = _lengths_mask(N, L, g)
    mask[:, -1] = False
    mask[0, :-1] = True
    w, b, rm, rv = _params(C, torch.float64)
    r = torch.randn(N, C, L, generator=g, dtype=torch.float64) if with_residual else None
    dy = torch.randn(N, C, L, generator=g, dtype=torch.float64)
    ref_in = [t.clone().requires_grad_() for t in (x, w, b)] + ([r.clone().requires_grad_()] if with_residual else [])
    y_ref = _reference(
        ref_in[0],
        mask,
        ref_in[1],
        ref_in[2],
        True,
        rm.clone(),
        rv.clone(),
        activation,
        ref_in[3] if with_residual else None,
        pad_value,
    )
    ref_grads = torch.autograd.grad(y_ref, ref_in, dy)
    mod = bnfast.FusedBatchNorm1d(C, activation=activation, dtype=dtype)
    with torch.no_grad():
        mod.weight.copy_(w)
        mod.bias.copy_(b)
    inputs = [x.to(dtype).requires_grad_()] + ([r.to(dtype).requires_grad_()] if with_residual else [])
    y = mod(inputs[0], inputs[1] if with_residual else None, mask=mask, pad_value=pad_value)
    grads = torch.autograd.grad(y, [inputs[0], mod.weight, mod.bias, *inputs[1:]], dy.to(dtype))
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(y.double(), y_ref.detach(), **tol)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, **tol)
    assert int(mod.num_batches_tracked) == 1


def test_broadcast_mask_and_module_state(kernel_path):
    """(N, C, L) with a stride-0 mask (one pattern for every sample) against the same mask materialised, and the
    module's running stats against torch's BatchNorm1d on the gathered positions."""
    g = torch.Generator().manual_seed(3)
    N, C, L = 5, 4, 7
    x = torch.randn(N, C, L, generator=g, dtype=torch.float64)
    pattern = torch.tensor([True, True, False, True, True, False, False])
    mask = pattern[None, :].expand(N, L)
    assert mask.stride(0) == 0
    mod = bnfast.FusedBatchNorm1d(C, dtype=torch.float64)
    ref = torch.nn.BatchNorm1d(C, dtype=torch.float64)
    for _ in range(2):
        y = mod(x, mask=mask)
        y_dense = bnfast.FusedBatchNorm1d(C, dtype=torch.float64)(x, mask=mask.contiguous())
        torch.testing.assert_close(y, y_dense, rtol=0, atol=0)
        y_ref = ref(_channels_last_rows(x, mask))
        torch.testing.assert_close(_channels_last_rows(y, mask), y_ref, **TOL[torch.float64])
    torch.testing.assert_close(mod.running_mean, ref.running_mean, **TOL[torch.float64])
    torch.testing.assert_close(mod.running_var, ref.running_var, **TOL[torch.float64])
    assert int(mod.num_batches_tracked) == 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("broadcast", [False, True], ids=["dense_mask", "broadcast_mask"])
def test_channels_last_4d(kernel_path, dtype, broadcast):
    """(N, C, H, W) channels_last with an (N, H, W) mask: forward, running stats and gradients. A mask broadcast
    over H keeps the rows from merging (channel-fast tiles with an s axis)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 3, 4, generator=g) < 0.5
    mask[0, 0, :2] = True
    if broadcast:
        mask = mask[:, :1, :].expand(2, 3, 4)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    w, b, rm, rv = _params(5, torch.float64)
    xr = x.clone().requires_grad_()
    r_rm, r_rv = rm.clone(), rv.clone()
    y_ref = _reference(xr, mask, w, b, True, r_rm, r_rv, "relu", None, 0.0)
    (dx_ref,) = torch.autograd.grad(y_ref, xr, dy)
    xk = x.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    k_rm, k_rv = rm.to(dtype), rv.to(dtype)
    y = bnfast.batch_norm(
        xk, k_rm, k_rv, w.to(dtype), b.to(dtype), True, MOMENTUM, EPS, activation="relu", mask=mask, pad_value=0.0
    )
    (dx,) = torch.autograd.grad(y, xk, dy.to(dtype).contiguous(memory_format=torch.channels_last))
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), y_ref.detach(), **tol)
    torch.testing.assert_close(dx.double(), dx_ref, **tol)
    torch.testing.assert_close(k_rm.double(), r_rm, **tol)
    torch.testing.assert_close(k_rv.double(), r_rv, **tol)


@pytest.mark.parametrize("pad_value", [None, 1.0])
def test_eval_uses_running_stats(kernel_path, pad_value):
    """Eval: the mask does not touch the statistics (running stats are used); pad_value is honoured, and padded
    positions get no gradient when it is given."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    mask = _lengths_mask(3, 5, g)
    w, b, rm, rv = _params(2, torch.float64)
    xr = x.clone().requires_grad_()
    y_ref = _reference(xr, mask, w, b, False, rm, rv, "gelu", None, pad_value)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    (dx_ref,) = torch.autograd.grad(y_ref, xr, dy)
    xk = x.clone().requires_grad_()
    k_rm, k_rv = rm.clone(), rv.clone()
    y = bnfast.batch_norm(xk, k_rm, k_rv, w, b, False, MOMENTUM, EPS, activation="gelu", mask=mask, pad_value=pad_value)
    (dx,) = torch.autograd.grad(y, xk, dy)
    torch.testing.assert_close(y, y_ref.detach(), **TOL[torch.float64])
    torch.testing.assert_close(dx, dx_ref, **TOL[torch.float64])
    assert torch.equal(k_rm, rm) and torch.equal(k_rv, rv)


def test_all_valid_mask_equals_no_mask(kernel_path):
    """A mask that is True everywhere computes what the unmasked call computes."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
    w, b, rm, rv = _params(3, torch.float64)
    y0 = bnfast.batch_norm(x, rm.clone(), rv.clone(), w, b, True, MOMENTUM, EPS)
    everywhere = torch.ones(4, 6, dtype=torch.bool)
    y1 = bnfast.batch_norm(x, rm.clone(), rv.clone(), w, b, True, MOMENTUM, EPS, mask=everywhere)
    torch.testing.assert_close(y1, y0, **TOL[torch.float64])


@pytest.mark.parametrize("pad_value", [None, 0.0])
def test_gradcheck(kernel_path, pad_value):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, generator=g, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    mask = _lengths_mask(3, 4, g)
    fn = lambda x, w, b, r: bnfast.batch_norm(
        x,
        None,
        None,
        w,
        b,
        True,
        MOMENTUM,
        EPS,
        activation="silu",  # noqa: E731
        residual=r,
        mask=mask,
        pad_value=pad_value,
    )
    # the split plan's many tiny tiles run ~3x longer under the interpreter: a random projection of its Jacobian
    assert torch.autograd.gradcheck(fn, (x, w, b, r), fast_mode=kernel_path == "split")


def test_errors_before_any_state_change():
    mod = bnfast.FusedBatchNorm1d(3)
    x = torch.randn(4, 3, 5)
    rm, rv = mod.running_mean.clone(), mod.running_var.clone()
    bad = {
        "shape": torch.ones(4, 4, dtype=torch.bool),
        "channel dim": torch.ones(4, 3, 5, dtype=torch.bool),
        "dtype": torch.ones(4, 5),
        "meta device": torch.ones(4, 5, dtype=torch.bool, device="meta"),
    }
    for mask in bad.values():
        with pytest.raises(ValueError, match="mask must be a bool tensor"):
            mod(x, mask=mask)
    one_valid = torch.zeros(4, 5, dtype=torch.bool)
    one_valid[1, 2] = True
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        mod(x, mask=one_valid)
    with pytest.raises(ValueError, match="pad_value needs a mask"):
        mod(x, pad_value=0.0)
    assert int(mod.num_batches_tracked) == 0
    assert torch.equal(mod.running_mean, rm) and torch.equal(mod.running_var, rv)
    mod.eval()  # eval needs no valid position
    y = mod(x, mask=torch.zeros(4, 5, dtype=torch.bool), pad_value=3.0)
    assert bool((y == 3.0).all())


def test_sync_batch_norm_without_process_group_is_the_plain_masked_module():
    """No process group: masked FusedSyncBatchNorm is masked FusedBatchNorm1d (across ranks: test_distributed)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    mask = _lengths_mask(4, 5, g)
    sync = bnfast.FusedSyncBatchNorm(3, activation="relu", dtype=torch.float64)
    plain = bnfast.FusedBatchNorm1d(3, activation="relu", dtype=torch.float64)
    for mode in (True, False):
        sync.train(mode), plain.train(mode)
        assert torch.equal(sync(x, mask=mask, pad_value=0.0), plain(x, mask=mask, pad_value=0.0))
    assert torch.equal(sync.running_var, plain.running_var)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        sync.train()(x, mask=torch.zeros(4, 5, dtype=torch.bool))


def test_torch_fallback_matches_kernels(monkeypatch):
    """The torch-op fallback (CPU without the interpreter, functorch) computes the same function."""
    from bnfast import functional

    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
    mask = _lengths_mask(4, 6, g)
    w, b, rm, rv = _params(3, torch.float64)
    k_rm, k_rv = rm.clone(), rv.clone()
    y = bnfast.batch_norm(x, k_rm, k_rv, w, b, True, MOMENTUM, EPS, activation="relu", mask=mask, pad_value=0.0)
    monkeypatch.setattr(functional, "uses_triton", lambda x: False)
    t_rm, t_rv = rm.clone(), rv.clone()
    y_t = bnfast.batch_norm(x, t_rm, t_rv, w, b, True, MOMENTUM, EPS, activation="relu", mask=mask, pad_value=0.0)
    torch.testing.assert_close(y, y_t, **TOL[torch.float64])
    torch.testing.assert_close(k_rm, t_rm, **TOL[torch.float64])
    torch.testing.assert_close(k_rv, t_rv, **TOL[torch.float64])


def test_opcheck_masked_ops(kernel_path):
    """The mask and pad value are op inputs: opcheck (schema, fake, autograd registration) on both ops."""
    from bnfast import ops

    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 3, 5, generator=g, requires_grad=True)
    w, b = torch.rand(3, generator=g).add(0.5).requires_grad_(), torch.randn(3, generator=g).requires_grad_()
    rm, rv = torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5
    mask = _lengths_mask(4, 5, g)
    for training, pad in ((True, None), (True, 0.0), (False, 2.0)):
        args = (x, w, b, rm, rv, None, training, 0.1, False, EPS, "relu", 0.0, None, mask, pad)
        torch.library.opcheck(ops.batch_norm_op, args)
    x, w, b = x.detach(), w.detach(), b.detach()
    _, mean, rstd, _, _ = ops.batch_norm_op(x, w, b, None, None, None, True, 0.1, False, EPS, "", 0.0, None, mask)
    dy = torch.randn(x.shape, generator=g)
    for pad in (None, 1.0):
        args = (dy, x, w, b, mean, rstd, None, True, EPS, "", 0.0, [True, True, True, False], mask, pad)
        torch.library.opcheck(ops.batch_norm_backward_op, args)


def test_compile_fullgraph_with_mask():
    """torch.compile(fullgraph=True) through the op: no graph break, the eager result and gradients."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
    mask = _lengths_mask(4, 6, g)
    eager, compiled = (bnfast.FusedBatchNorm1d(3, activation="relu", dtype=torch.float64) for _ in range(2))
    fn = torch.compile(lambda m, x, mask: m(x, mask=mask, pad_value=0.0), fullgraph=True, backend="aot_eager")
    outs = []
    for module, call in ((eager, lambda m, x, mask: m(x, mask=mask, pad_value=0.0)), (compiled, fn)):
        xr = x.clone().requires_grad_()
        y = call(module, xr, mask)
        y.sum().backward()
        outs.append((y.detach(), xr.grad, module.weight.grad, module.running_mean.clone(), module.running_var.clone()))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_readme_example_runs():
    """The README's Masked BatchNorm snippet runs as written and pads with 0."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Masked BatchNorm.*?$(.*?)(?=^## )", readme, re.M | re.S).group(1)
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    assert scope["y"].shape == (4, 8, 10) and int(scope["mask"].sum()) == 29
    y = scope["bn"](scope["x"], mask=scope["mask"], pad_value=0.0)
    assert bool((y.movedim(1, -1)[~scope["mask"]] == 0).all())


def test_nan_padding_with_pad_value(kernel_path):
    """Garbage (NaN, inf) at padded positions changes nothing when pad_value is given: the statistics, the valid
    outputs and every gradient are those of the same input with finite padding."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
    mask = _lengths_mask(4, 6, g)
    mask[:, -1] = False
    dirty = x.clone()
    dirty[:, 0, -1] = float("nan")
    dirty[:, 1, -1] = float("inf")
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    results = []
    for data in (x, dirty):
        mod = bnfast.FusedBatchNorm1d(3, activation="silu", dtype=torch.float64)
        xr = data.clone().requires_grad_()
        y = mod(xr, mask=mask, pad_value=0.0)
        grads = torch.autograd.grad(y, (xr, mod.weight, mod.bias), dy)
        results.append((y, *grads, mod.running_mean, mod.running_var))
    for clean, got in zip(*results, strict=True):
        torch.testing.assert_close(got, clean, rtol=0, atol=0)
