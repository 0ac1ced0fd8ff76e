"""What differential testing against torch found (issue 21), one test per finding, against torch on the same input
and on both launch plans where kernels run (tolerance rule in tests/parity.py):

- output (and dx) memory format of non-dense channels_last inputs, and `new_output` against torch's allocation
  over many layouts;
- one running stat of the two: torch's ValueError before any state change (functional, module, SyncBatchNorm's
  checks, recalibrate);
- the residual argument accepts what `act(BN(x) + residual)` accepts: broadcast shapes (gradient summed back to
  the residual's shape), dtypes (a promoting residual gives torch's promoted output), torch's RuntimeError for a
  shape that does not broadcast, before any state change;
"""

import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from parity import DEVICE, assert_matches_ref, random_input, same_strides
from torch import nn

import bnfast
from bnfast import distributed
from bnfast.kernels.launch import new_output
from bnfast.reference import batch_norm_ref


# ------------------------------------------------------------------------------------------- memory format
def _layouts():
    """(name, base shape, view of a base): non-dense and unusual layouts; the issue's example first."""
    return [
        ("issue_sliced_channels_last", (2, 6, 4, 3), lambda t: t.permute(0, 3, 1, 2)[:, :, :, ::2]),
        ("channels_last_sliced_n", (4, 4, 5, 3), lambda t: t.permute(0, 3, 1, 2)[::2]),
        ("channels_last_3d_sliced", (2, 2, 3, 4, 3), lambda t: t.permute(0, 4, 1, 2, 3)[..., ::2]),
        ("permuted_nwhc", (2, 5, 4, 3), lambda t: t.permute(0, 3, 2, 1)),
        ("permuted_nwhc_sliced", (2, 6, 4, 3), lambda t: t.permute(0, 3, 2, 1)[..., ::2]),
        ("ncl_transposed_sliced", (2, 6, 3), lambda t: t.transpose(1, 2)[:, :, ::2]),
        ("nc_transposed", (3, 4), lambda t: t.t()),
        ("expanded_n", (1, 3, 2, 5), lambda t: t.expand(2, 3, 2, 5)),
        ("offset_view", (100,), lambda t: t[7 : 7 + 2 * 3 * 4 * 2].view(2, 3, 4, 2)),
    ]


LAYOUTS = _layouts()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name, shape, view", LAYOUTS, ids=[n for n, _, _ in LAYOUTS])
def test_output_and_dx_memory_format_like_torch(name, shape, view, training, kernel_path):
    base = torch.randn(shape, device=DEVICE)
    C = view(base).shape[1]
    weight, bias = torch.rand(C, device=DEVICE) + 0.5, torch.randn(C, device=DEVICE)
    stats = torch.randn(C, device=DEVICE), torch.rand(C, device=DEVICE) + 0.5
    out = {}
    for kind, fn in (("torch", F.batch_norm), ("bnfast", bnfast.batch_norm)):
        x = view(base.clone().requires_grad_(True))
        rm, rv = stats[0].clone(), stats[1].clone()
        y = fn(x, rm, rv, weight, bias, training)
        dy = torch.linspace(-1, 1, y.numel(), device=DEVICE).view(y.shape)
        (dx,) = torch.autograd.grad(y, x, dy)  # the backward's own dx (no accumulation into a leaf)
        out[kind] = y.detach(), dx, rm, rv
    (y_t, dx_t, rm_t, rv_t), (y_o, dx_o, rm_o, rv_o) = out["torch"], out["bnfast"]
    assert y_o.stride() == y_t.stride(), f"y strides {y_o.stride()}, torch's {y_t.stride()}"
    assert dx_o.stride() == dx_t.stride(), f"dx strides {dx_o.stride()}, torch's {dx_t.stride()}"
    for a, b in ((y_o, y_t), (dx_o, dx_t), (rm_o, rm_t), (rv_o, rv_t)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _random_layout(rng: random.Random) -> torch.Tensor:
    """A small 2-D..5-D tensor: permuted, sliced, size-1 dims, expanded, in any combination."""
    d = rng.choice([2, 3, 4, 5])
    shape = [rng.choice([1, 2, 3]) for _ in range(d)]
    t = torch.zeros([s * rng.choice([1, 2]) for s in shape])
    perm = list(range(d))
    rng.shuffle(perm)
    if rng.random() < 0.7:
        t = t.permute(*perm)
    t = t[tuple(slice(None, None, rng.choice([1, 2])) for _ in range(d))]
    t = t[tuple(slice(0, s) for s in shape)]
    if rng.random() < 0.2:
        t = t[tuple(slice(0, 1) if rng.random() < 0.3 else slice(None) for _ in range(d))]
        if rng.random() < 0.5:
            t = t.expand(*[s if t.shape[i] == 1 else t.shape[i] for i, s in enumerate(shape)])
    return t


def test_new_output_allocates_like_torch_over_many_layouts():
    """`launch.new_output` (y, dx, dresidual, SyncBatchNorm's y) against the strides of torch's own batch_norm
    output, over 3000 random layouts (allocation only: no kernel runs)."""
    rng, checked = random.Random(0), 0
    for _ in range(3000):
        t = _random_layout(rng)
        if t.numel() == 0 or t.numel() == t.shape[1]:  # torch refuses one value per channel in training
            continue
        want = F.batch_norm(t, None, None, training=True)
        got = new_output(t)
        assert got.stride() == want.stride(), f"{tuple(t.shape)} strides {t.stride()}: {got.stride()} vs torch's"
        assert (got.dtype, got.device, got.shape) == (want.dtype, want.device, want.shape)
        checked += 1
    assert checked > 2000


# ------------------------------------------------------------------------------ one running stat of the two
HALF_PAIRS = [("running_mean_only", True), ("running_var_only", False)]


def _half_pair(mean_only: bool, C: int):
    return (torch.randn(C, device=DEVICE), None) if mean_only else (None, torch.rand(C, device=DEVICE) + 0.5)


def _torch_error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return info.type, str(info.value)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name, mean_only", HALF_PAIRS, ids=[n for n, _ in HALF_PAIRS])
def test_functional_one_running_stat_raises_like_torch(name, mean_only, training, kernel_path):
    x = torch.randn(4, 3, 5, device=DEVICE)
    rm, rv = _half_pair(mean_only, 3)
    kept = [None if t is None else t.clone() for t in (rm, rv)]
    err_type, message = _torch_error(lambda: F.batch_norm(x, rm, rv, training=training))
    with pytest.raises(err_type) as info:
        bnfast.batch_norm(x, rm, rv, training=training, activation="relu")
    assert str(info.value) == message
    for t, k in zip((rm, rv), kept, strict=True):
        assert t is None or torch.equal(t, k), "a rejected call changed a running stat"


@pytest.mark.parametrize("name, mean_only", HALF_PAIRS, ids=[n for n, _ in HALF_PAIRS])
def test_module_one_running_stat_raises_like_torch_and_changes_nothing(name, mean_only):
    """torch's module raises the same ValueError; it has counted the batch first, bnfast has not (the README's
    deliberate difference: a rejected call changes no state)."""
    x = torch.randn(4, 3, 5, device=DEVICE)
    theirs, ours = nn.BatchNorm1d(3, device=DEVICE), bnfast.FusedBatchNorm1d(3, device=DEVICE)
    for bn in (theirs, ours):
        setattr(bn, "running_var" if mean_only else "running_mean", None)
    err_type, message = _torch_error(lambda: theirs(x))
    kept = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(err_type) as info:
        ours(x)
    assert str(info.value) == message
    for k, v in ours.state_dict().items():
        assert torch.equal(v, kept[k]), f"{k} changed"
    assert int(theirs.num_batches_tracked) == 1 and int(ours.num_batches_tracked) == 0


@pytest.mark.parametrize("name, mean_only", HALF_PAIRS, ids=[n for n, _ in HALF_PAIRS])
def test_sync_batch_norm_checks_refuse_one_running_stat(name, mean_only):
    """FusedSyncBatchNorm's synced path checks its inputs with `distributed._check_inputs` before any collective
    or state change: one stat of the two gets torch's ValueError there too (the synced kernels need both)."""
    x = torch.randn(4, 3, 5, device=DEVICE)
    rm, rv = _half_pair(mean_only, 3)
    with pytest.raises(ValueError, match="must either both be None or neither be None"):
        distributed._check_inputs(x, None, None, rm, rv, 1e-5)
    distributed._check_inputs(x, None, None, None, None, 1e-5)  # neither: accepted


def test_recalibrate_with_one_running_stat_raises_and_restores_state():
    model = nn.Sequential(nn.Linear(4, 3), bnfast.FusedBatchNorm1d(3), nn.BatchNorm1d(3))
    model[2].running_var = None
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="must either both be None or neither be None"):
        bnfast.recalibrate(model, [torch.randn(6, 4)])
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed"
    assert model[1].training and model[2].momentum == 0.1


# ------------------------------------------------------------------------------------------------ residual
def _residual_steps(x, r, dy, training, activation):
    """(y, dx, dresidual, dweight, dbias, running_mean, running_var) for torch's act(BN(x) + r), bnfast, and the
    float64 reference; r may broadcast and have another dtype."""
    C = x.shape[1]
    gen = torch.Generator().manual_seed(5)
    weight, bias = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen)
    stats = torch.randn(C, generator=gen), torch.rand(C, generator=gen) + 0.5
    act = bnfast.resolve_activation(activation)
    out = {}
    for kind in ("torch", "bnfast", "ref64"):
        cast = (lambda t: t.double()) if kind == "ref64" else (lambda t: t)  # noqa: E731
        xr, rr = cast(same_strides(x)).requires_grad_(True), cast(same_strides(r))
        rr.requires_grad_(rr.is_floating_point())
        w, b = (cast(p.detach().clone().to(DEVICE)).requires_grad_(True) for p in (weight, bias))
        rm, rv = (cast(s.to(DEVICE)) for s in stats)
        if kind == "torch":
            y = act.apply(F.batch_norm(xr, rm, rv, w, b, training) + rr)
        elif kind == "bnfast":
            y = bnfast.batch_norm(xr, rm, rv, w, b, training, activation=activation, residual=rr)
        else:
            z, rm, rv = batch_norm_ref(xr, rm, rv, w, b, training, 0.1, 1e-5, upcast=True)
            y = act.apply(z + rr)
        y.backward(cast(dy).expand(y.shape))
        out[kind] = (y.detach(), xr.grad, rr.grad, w.grad, b.grad, rm, rv)
    return out["torch"], out["bnfast"], out["ref64"]


def _compare(theirs, mine, ref, dtype):
    names = ("y", "dx", "dresidual", "dweight", "dbias", "running_mean", "running_var")
    for name, a, b, c in zip(names, mine, theirs, ref, strict=True):
        if b is None:
            assert a is None, f"{name}: bnfast has a gradient torch has not"
            continue
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)}, torch's {tuple(b.shape)}"
        assert_matches_ref(a, b, c, a.dtype if a.dtype in (torch.float16, torch.bfloat16) else dtype, name)


BROADCAST = [(1, 1), (3, 1, 1), (1, 3, 1, 1), (5,), (4, 1, 1, 1), (), (1, 3, 2, 1)]


@pytest.mark.parametrize("activation", ["relu", None, "silu"], ids=str)
@pytest.mark.parametrize("r_shape", BROADCAST, ids=lambda s: "x".join(map(str, s)) or "0dim")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_broadcast_residual_like_torch(r_shape, activation, training, kernel_path):
    x, dy = random_input((4, 3, 2, 5), loc=0.5, scale=2.0)
    r, _ = random_input(r_shape, seed=2)
    theirs, mine, ref = _residual_steps(x, r, dy, training, activation)
    _compare(theirs, mine, ref, torch.float32)


RESIDUAL_DTYPES = [
    (torch.float64, (4, 3, 5)),
    (torch.float64, (3, 1)),
    (torch.float16, (4, 3, 5)),
    (torch.bfloat16, (5,)),
    (torch.int64, (4, 3, 5)),
    (torch.bool, (3, 1)),
    (torch.float64, ()),
]


@pytest.mark.parametrize("r_dtype, r_shape", RESIDUAL_DTYPES, ids=lambda v: str(v))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_residual_dtype_like_torch(r_dtype, r_shape, training, kernel_path):
    """torch's result dtype: a float64 residual on float32 x gives a float64 output (torch ops compute that call:
    the README's limits), a 16-bit, integer or bool one keeps float32, and so does a 0-dim float64 tensor."""
    x, dy = random_input((4, 3, 5), loc=0.5, scale=2.0)
    r = (torch.randn(r_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3).to(DEVICE)
    r = r.to(r_dtype)
    theirs, mine, ref = _residual_steps(x, r, dy, training, "relu")
    assert mine[0].dtype == theirs[0].dtype == torch.result_type(x, r)
    ref = (ref[0].to(theirs[0].dtype).double(), *ref[1:])  # the reference's y rounded as torch's expression is
    _compare(theirs, mine, ref, theirs[0].dtype if theirs[0].dtype == torch.float64 else torch.float32)


def test_residual_broadcasting_to_a_larger_shape_like_torch():
    """act(BN(x) + r) with an r that adds a leading dim: torch's (larger) output, through torch ops."""
    x, dy = random_input((4, 3, 5), loc=0.5)
    r, _ = random_input((2, 4, 3, 5), seed=4)
    theirs, mine, ref = _residual_steps(x, r, dy.expand(2, 4, 3, 5), True, "relu")
    _compare(theirs, mine, ref, torch.float32)


@pytest.mark.parametrize("r_shape", [(3,), (4, 3, 4), (2, 3, 5)], ids=str)
def test_non_broadcastable_residual_raises_like_torch_before_any_state_change(r_shape, kernel_path):
    x = torch.randn(4, 3, 5, device=DEVICE)
    r = torch.randn(r_shape, device=DEVICE)
    err_type, message = _torch_error(lambda: F.batch_norm(x, None, None, training=True) + r)
    bn = bnfast.FusedBatchNorm1d(3, activation="relu", device=DEVICE)
    kept = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(err_type) as info:
        bn(x, r)
    assert err_type is RuntimeError and str(info.value) == message
    for k, v in bn.state_dict().items():
        assert torch.equal(v, kept[k]), f"{k} changed"


def test_residual_on_another_device_raises_runtime_error():
    x = torch.randn(4, 3, 5, device=DEVICE)
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        bnfast.batch_norm(x, None, None, training=True, residual=torch.empty(4, 3, 5, device="meta"))


# --------------------------------------------------------------------------------------- extreme magnitudes
def _ignore_overflow_warnings():
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # the interpreter's numpy on inf * 0 and overflow


# --------------------------------------------------------------------------------------- extreme magnitudes
def _ulp32(v: float) -> float:
    return 2.0 ** (math.floor(math.log2(v)) - 23) if v > 0 else 2.0**-149


# (std, mean): spread far above the mean (the 1e30 case: the split plan's mean was 19x torch's error),
# tile sums that overflow float32 though the mean does not, means near the float32 limit
MAGNITUDES = [(1e30, 0.0), (1e18, 0.0), (1e30, 3e29), (1e3, 1e36), (1e36, 1e37), (3e37, 2e38), (1.0, 0.0)]


@pytest.mark.parametrize("shape", [(16, 3, 40), (8, 3, 6, 5)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("std, mean", MAGNITUDES, ids=lambda v: f"{v:g}")
def test_extreme_magnitudes_like_torch(std, mean, shape, kernel_path):
    """float32 inputs up to the float32 range, on both plans, against float64 statistics of the same input:
    running_mean within 2x torch's error + 8 ulps of itself (float32 accumulation: torch's CPU kernel
    accumulates in float64); running_var and y where torch's are finite, with the parity rule of tests/parity.py;
    nothing non-finite where torch is finite."""
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # the interpreter's numpy overflows, as designed
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean).float().to(DEVICE)
    dims = [0, *range(2, x.dim())]
    C = x.shape[1]
    stats = {k: (torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)) for k in ("torch", "bnfast")}
    y_t = F.batch_norm(x, *stats["torch"], training=True)
    y_o = bnfast.batch_norm(x, *stats["bnfast"], training=True)
    x64 = x.double()
    ref_mean = 0.1 * x64.mean(dims)
    ref_var = 0.9 + 0.1 * x64.var(dims)
    err = lambda a, r: (a.double() - r).abs().max().item()  # noqa: E731
    (rm_t, rv_t), (rm_o, rv_o) = stats["torch"], stats["bnfast"]
    bound = 2 * err(rm_t, ref_mean) + 8 * _ulp32(ref_mean.abs().max().item())
    assert err(rm_o, ref_mean) <= bound, f"running_mean error {err(rm_o, ref_mean):.3g} > {bound:.3g}"
    for name, ours, theirs, ref in (("running_var", rv_o, rv_t, ref_var), ("y", y_o, y_t, None)):
        finite = theirs.isfinite()
        assert ours[finite].isfinite().all(), f"{name}: non-finite where torch's is finite"
        if ref is None:
            ref = (x64 - x64.mean(dims, keepdim=True)) / (x64.var(dims, correction=0, keepdim=True) + 1e-5).sqrt()
        if finite.all() and ref.isfinite().all():
            assert_matches_ref(ours, theirs, ref, torch.float32, name)


# ------------------------------------------------------------------- bnfast's own argument: num_batches_tracked
@pytest.mark.parametrize("counter", [torch.tensor([1, 2]), torch.tensor(1, device="meta")], ids=["two", "meta"])
def test_num_batches_tracked_must_be_one_element_on_the_device(counter):
    """momentum=None reads the counter on the device: a tensor of several elements or on another device is a
    ValueError before any state changes (torch's module would call float() on it), not garbage."""
    x = torch.randn(4, 3, device=DEVICE)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match="num_batches_tracked must be a one-element tensor"):
        bnfast.batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=counter)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
