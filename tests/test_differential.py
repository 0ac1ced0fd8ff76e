"""Property-based differential test: bnfast's modules against torch's on the same input, drawn by hypothesis.

Each example draws a shape (2-D to 5-D, sizes of 1 included), a layout of x (contiguous, channels_last, sliced,
stride-0 expand, offset view, transposed: channels-fast; the storage around a view is poisoned with NaN, so a
kernel that reads outside the view fails), a dtype (float16, bfloat16, float32, float64), the flags (affine,
track_running_stats, momentum 0.1 / 0.3 / None, training or eval), a fused activation, a residual (none, the
input's shape, or a broadcast one) and the launch plan. Checked against torch's BatchNorm (+ add + activation)
on the same tensors: y, dx, dweight, dbias, dresidual (values by the tolerance rule of tests/parity.py, with torch
in float64 as the reference), running stats, num_batches_tracked, and the strides of y and dx. Where torch
raises, bnfast raises the same exception type and changes no state (torch's module counts the batch before it
raises; bnfast does not: the README's deliberate difference).

Derandomized (the same examples every run) and small: about a minute on one CPU core under the interpreter.
"""

import copy

import pytest
import torch

pytest.importorskip("hypothesis")  # a test dependency; the GPU machine's stack has none (skip, not an error)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from parity import DEVICE, assert_matches_ref  # noqa: E402
from torch import nn

import bnfast
from bnfast.testing import force_plan

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ACTIVATIONS = [None, "relu", "silu", "leaky_relu", "gelu", "tanh"]
MODULES = {
    2: (nn.BatchNorm1d, bnfast.FusedBatchNorm1d),
    3: (nn.BatchNorm1d, bnfast.FusedBatchNorm1d),
    4: (nn.BatchNorm2d, bnfast.FusedBatchNorm2d),
    5: (nn.BatchNorm3d, bnfast.FusedBatchNorm3d),
}
SETTINGS = settings(
    derandomize=True,
    max_examples=100,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def make_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """`values` in the given layout; storage outside the view holds NaN."""
    shape, dtype = values.shape, values.dtype
    if layout == "channels_last":
        fmt = torch.channels_last if values.dim() == 4 else torch.channels_last_3d
        return values.to(memory_format=fmt)
    if layout == "sliced":
        view = _poisoned((*shape[:-1], 2 * shape[-1]), dtype)[..., ::2]
    elif layout == "offset":
        view = _poisoned((values.numel() + 10,), dtype)[7 : 7 + values.numel()].view(shape)
    elif layout == "transposed":  # channels fast: (C, N).t(), (N, L, C) -> (N, C, L), (N, *spatial, C) -> NC*
        d = values.dim()
        perm = [1, 0] if d == 2 else [0, *range(2, d), 1]
        inverse = [perm.index(i) for i in range(d)]
        view = _poisoned([shape[p] for p in perm], dtype).permute(*inverse)
    elif layout == "expand":  # stride 0 along N: every sample is the first one
        return values[:1].expand(shape)
    else:
        return values.contiguous()
    view.copy_(values)
    return view


@st.composite
def cases(draw):
    ndim = draw(st.sampled_from([2, 3, 4, 5]))
    shape = [draw(st.integers(1, 4)), draw(st.integers(1, 4))] + [draw(st.integers(1, 3)) for _ in range(ndim - 2)]
    layouts = ["contiguous", "sliced", "offset", "transposed", "expand"] + (["channels_last"] if ndim >= 4 else [])
    residual = draw(st.sampled_from(["none", "same", "broadcast"]))
    return dict(
        shape=tuple(shape),
        layout=draw(st.sampled_from(layouts)),
        dtype=draw(st.sampled_from(DTYPES)),
        affine=draw(st.booleans()),
        track=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.1, 0.3, None])),
        training=draw(st.booleans()),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        residual=residual,
        residual_layout=draw(st.sampled_from(["contiguous", "sliced"])),
        plan=draw(st.sampled_from(["single", "split"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _run(bn, act, x, r, dy):
    """(y, grads of (x, weight, bias, residual)) of act(bn(x) [+ r]) (bnfast: the fused call)."""
    fused = isinstance(bn, bnfast.FusedBatchNorm1d | bnfast.FusedBatchNorm2d | bnfast.FusedBatchNorm3d)
    if fused:
        y = bn(x, r)
    else:
        z = bn(x)
        y = act.apply(z if r is None else z + r)
    inputs = [t for t in (x, bn.weight, bn.bias, r) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, inputs, dy) if y.requires_grad else [None] * len(inputs)
    named = dict(zip([id(t) for t in inputs], grads, strict=True))
    return y.detach(), [named.get(id(t)) if t is not None else None for t in (x, bn.weight, bn.bias, r)]


@SETTINGS
@given(case=cases())
def test_modules_match_torch(case):
    dtype, shape = case["dtype"], case["shape"]
    gen = torch.Generator().manual_seed(case["seed"])
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(DEVICE)  # noqa: E731
    x = make_layout((rand(shape) * 2 + 0.5).to(dtype), case["layout"]).detach().requires_grad_(True)
    r = None
    if case["residual"] != "none":
        r_shape = shape if case["residual"] == "same" else (1, shape[1], *[1] * (len(shape) - 2))
        r = make_layout(rand(r_shape).to(dtype), case["residual_layout"]).detach().requires_grad_(True)
    torch_type, fused_type = MODULES[len(shape)]
    kwargs = dict(affine=case["affine"], track_running_stats=case["track"], momentum=case["momentum"])
    theirs = torch_type(shape[1], device=DEVICE, **kwargs)
    with torch.no_grad():
        for p in (theirs.weight, theirs.bias):
            if p is not None:
                p.copy_(rand(shape[1]))
        if theirs.running_mean is not None:
            theirs.running_mean.copy_(rand(shape[1]))
            theirs.running_var.copy_(rand(shape[1]).abs() + 0.5)
            theirs.num_batches_tracked.fill_(2)
    theirs = theirs.to(dtype)
    ref_bn = copy.deepcopy(theirs).double()  # torch in float64: the reference
    ours = fused_type(shape[1], device=DEVICE, activation=case["activation"], **kwargs).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    for m in (theirs, ours, ref_bn):
        m.train(case["training"])
    act = bnfast.resolve_activation(case["activation"])
    dy = rand(shape).to(dtype)

    try:
        y_t, g_t = _run(theirs, act, x, r, dy)
    except Exception as e:  # torch refuses: bnfast raises the same type and changes nothing
        state = {k: v.clone() for k, v in ours.state_dict().items()}
        with force_plan(case["plan"], 64 if case["plan"] == "split" else None), pytest.raises(type(e)):
            _run(ours, act, x, r, dy)
        for k, v in ours.state_dict().items():
            assert torch.equal(v, state[k]), f"{k} changed by a rejected call"
        return
    with force_plan(case["plan"], 64 if case["plan"] == "split" else None):
        y_o, g_o = _run(ours, act, x, r, dy)
    x64 = x.detach().double().requires_grad_(True)
    r64 = None if r is None else r.detach().double().requires_grad_(True)
    y_r, g_r = _run(ref_bn, act, x64, r64, dy.double())

    assert y_o.stride() == y_t.stride(), f"y strides {y_o.stride()} vs torch's {y_t.stride()}"
    assert_matches_ref(y_o, y_t, y_r, dtype, "y")
    for name, a, b, c in zip(("dx", "dweight", "dbias", "dresidual"), g_o, g_t, g_r, strict=True):
        if b is None:
            assert a is None, f"{name}: bnfast has a gradient torch has not"
            continue
        assert a.shape == b.shape, f"{name} shape"
        if name == "dx" and min(shape) > 1:  # size-1 dims: torch's dx layout may differ from its y's (README)
            assert a.stride() == b.stride(), f"dx strides {a.stride()} vs torch's {b.stride()}"
        # dweight/dbias are sums over M in the parameter's dtype: torch's CPU kernel accumulates them in float64
        assert_matches_ref(a, b, c, dtype, name, floor=0.0)
    for name in ("running_mean", "running_var"):
        a, b, c = getattr(ours, name), getattr(theirs, name), getattr(ref_bn, name)
        assert (a is None) == (b is None), name
        if b is not None:
            assert_matches_ref(a, b, c, dtype, name)
    if theirs.num_batches_tracked is not None:
        assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)
