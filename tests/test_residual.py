"""The fused residual add: act(BN(x) + residual), forward and backward in the same passes as the BatchNorm.

Against torch's BN -> add -> activation on the same input and a float64 reference (tolerance rule in
tests/parity.py), both launch plans, layouts of x and of the residual independently, train and eval; gradients
for the residual; gradcheck/gradgradcheck; torch.compile; what the autograd graph keeps.
"""

import copy

import pytest
import torch
from parity import DEVICE, assert_matches_ref, make_pair, random_input, same_strides
from torch import nn

import bnfast
from bnfast.reference import batch_norm_ref

CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def layout(t, name):
    if name == "channels_last":
        return t.to(memory_format=CHANNELS_LAST[t.dim()])
    if name == "strided":
        return torch.cat([t, t], dim=-1)[..., ::2]
    return t


def steps(torch_bn, ours, x, r, dy, activation):
    """(y, dx, dresidual, dweight, dbias) for torch (BN -> add -> act), bnfast, and the float64 reference."""
    act = bnfast.resolve_activation(activation)
    out = []
    for kind in ("torch", "bnfast", "ref64"):
        xr, rr = same_strides(x).requires_grad_(True), same_strides(r).requires_grad_(True)
        bn = torch_bn if kind != "bnfast" else ours
        if kind == "ref64":
            xr, rr = xr.detach().double().requires_grad_(True), rr.detach().double().requires_grad_(True)
            w, b = (p.detach().double().requires_grad_(True) for p in (torch_bn.weight, torch_bn.bias))
            stats = [s.double() for s in (torch_bn.running_mean, torch_bn.running_var)]
            z, _, _ = batch_norm_ref(xr, *stats, w, b, torch_bn.training, 0.1, torch_bn.eps, upcast=True)
            y = act.apply(z + rr)
            y.backward(dy.double())
            out.append((y.detach(), xr.grad, rr.grad, w.grad, b.grad))
            continue
        bn.zero_grad(set_to_none=True)
        y = act.apply(bn(xr) + rr) if kind == "torch" else bn(xr, rr)
        y.backward(dy)
        out.append((y.detach(), xr.grad, rr.grad, bn.weight.grad, bn.bias.grad))
    return out


LAYOUT_PAIRS = [
    ("contiguous", "contiguous"),
    ("channels_last", "channels_last"),
    ("channels_last", "contiguous"),
    ("contiguous", "strided"),
]


@pytest.mark.parametrize("activation", ["relu", None, "silu"], ids=str)
@pytest.mark.parametrize("x_layout, r_layout", LAYOUT_PAIRS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn2d_residual_matches_torch(activation, x_layout, r_layout, training, kernel_path):
    torch_bn, ours = make_pair(3, dims=2, activation=activation)
    torch_bn.train(training), ours.train(training)
    x, dy = random_input((4, 3, 3, 5), loc=0.5, scale=2.0)
    r, _ = random_input((4, 3, 3, 5), seed=1)
    theirs, mine, ref = steps(torch_bn, ours, layout(x, x_layout), layout(r, r_layout), dy, activation)
    for name, a, b, c in zip(("y", "dx", "dresidual", "dweight", "dbias"), mine, theirs, ref, strict=True):
        assert_matches_ref(a, b, c, torch.float32, name)
    assert mine[0].stride() == theirs[0].stride(), "y keeps torch's memory format"


@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5)], ids=str)
def test_bn1d_residual_matches_torch(shape, kernel_path):
    torch_bn, ours = make_pair(4, activation="relu")
    x, dy = random_input(shape, scale=2.0)
    r, _ = random_input(shape, seed=2)
    theirs, mine, ref = steps(torch_bn, ours, x, r, dy, "relu")
    for name, a, b, c in zip(("y", "dx", "dresidual", "dweight", "dbias"), mine, theirs, ref, strict=True):
        assert_matches_ref(a, b, c, torch.float32, name)


def test_bf16_residual():
    torch_bn, ours = make_pair(4, dims=2, activation="relu", dtype=torch.bfloat16)
    x, dy = random_input((3, 4, 4, 4), torch.bfloat16, loc=1.0)
    r, _ = random_input((3, 4, 4, 4), torch.bfloat16, seed=3)
    theirs, mine, ref = steps(torch_bn, ours, x, r, dy, "relu")
    for name, a, b, c in zip(("y", "dx", "dresidual", "dweight", "dbias"), mine, theirs, ref, strict=True):
        assert_matches_ref(a, b, c, torch.bfloat16, name)


@pytest.mark.parametrize("activation", [None, "silu"], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_and_gradgradcheck(activation, training):
    f64 = dict(dtype=torch.float64, device=DEVICE)
    x = torch.randn(3, 2, 2, 2, **f64, requires_grad=True)
    r = torch.randn(3, 2, 2, 2, **f64, requires_grad=True)
    weight = torch.rand(2, **f64).add(0.5).requires_grad_(True)
    bias = torch.randn(2, **f64, requires_grad=True)
    stats = torch.randn(2, **f64), torch.rand(2, **f64) + 0.5

    def fn(x, r, weight, bias):
        return bnfast.batch_norm(
            x, stats[0].clone(), stats[1].clone(), weight, bias, training, activation=activation, residual=r
        )

    assert torch.autograd.gradcheck(fn, (x, r, weight, bias))
    assert torch.autograd.gradgradcheck(fn, (x, r, weight, bias), fast_mode=True)


def test_module_residual_of_another_shape_or_dtype_is_torchs_expression():
    """The module (what a tracing fusion calls without seeing shapes) computes act(BN(x) + residual) for any
    residual that expression accepts, and raises its error, before any state change, for one it rejects."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    bn = bnfast.FusedBatchNorm2d(3, device=DEVICE, activation="relu")
    ref = nn.BatchNorm2d(3, device=DEVICE)
    for residual in (torch.randn(3, 1, 1, device=DEVICE), torch.randn(2, 3, 4, 4, device=DEVICE, dtype=torch.float64)):
        y, expected = bn(x, residual), torch.relu(ref(x) + residual)
        assert y.dtype == expected.dtype
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    stats = [t.clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    with pytest.raises(RuntimeError):
        torch.relu(ref(x) + torch.randn(2, 3, 4, 5, device=DEVICE))
    with pytest.raises(RuntimeError):
        bn(x, torch.randn(2, 3, 4, 5, device=DEVICE))
    for t, before in zip((bn.running_mean, bn.running_var, bn.num_batches_tracked), stats, strict=True):
        assert torch.equal(t, before)


class Block(nn.Module):
    """A ResNet basic block's tail: relu(bn(conv(x)) + x), written the torch way or the bnfast way."""

    def __init__(self, fused: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.fused = fused
        self.bn = bnfast.FusedBatchNorm2d(3, activation="relu") if fused else nn.BatchNorm2d(3)

    def forward(self, x):
        if self.fused:
            return self.bn(self.conv(x), x)  # the one-line change: residual into the BN
        return torch.relu(self.bn(self.conv(x)) + x)


def test_compiled_block_matches_eager(device):
    """torch.compile(fullgraph=True) through the op with a residual: same numbers as eager, both directions."""
    torch.manual_seed(0)
    eager = Block(fused=True).to(device)
    model = copy.deepcopy(eager)
    torch._dynamo.reset()
    backend = "aot_eager" if device.type == "cpu" else "inductor"
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(2, 3, 5, 5, device=device)
    for m in (eager, compiled):
        m(x).sum().backward()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-6, atol=1e-6)
    for (name, a), b in zip(eager.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-6, msg=name)
    torch._dynamo.reset()


def saved_bytes(fn, *inputs):
    """Bytes of input-sized storages the autograd graph keeps for one forward (each storage counted once)."""
    storages = {}

    def pack(t):
        if t.numel() == inputs[0].numel():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(storages.values())


@pytest.mark.parametrize("activation", ["relu", None], ids=str)
def test_memory_kept_for_backward(activation):
    """torch's BN -> add -> ReLU keeps x and the ReLU output (2 tensors); bnfast keeps x and, under an activation,
    the residual it was given (a tensor the caller already holds: no new allocation), and x alone without one."""
    x = torch.randn(8, 4, 6, 6, device=DEVICE, requires_grad=True)
    r = torch.randn(8, 4, 6, 6, device=DEVICE, requires_grad=True)
    act = bnfast.resolve_activation(activation)
    bn = nn.BatchNorm2d(4, device=DEVICE)
    ours = bnfast.FusedBatchNorm2d(4, activation=activation, device=DEVICE)
    size = x.numel() * x.element_size()
    torch_kept = saved_bytes(lambda x, r: act.apply(bn(x) + r), x, r)
    ours_kept = saved_bytes(lambda x, r: ours(x, r), x, r)
    assert torch_kept == (2 if activation else 1) * size
    assert ours_kept == (2 if activation else 1) * size
