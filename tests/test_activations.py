"""BatchNorm fused with each activation, against nn.BatchNorm1d followed by the torch activation module.

Also: the memory the fusion saves, counted from what the autograd graph keeps for the backward.
"""

import pytest
import torch
from parity import DEVICE, compare_step, make_pair, random_input, shape_id
from torch import nn

import bnfast
from bnfast import FusedBatchNorm1d

# every name bnfast fuses, plus the module forms with non-default parameters
ACTIVATIONS = [*bnfast.SUPPORTED_ACTIVATIONS, "swish", nn.LeakyReLU(0.2), nn.ELU(0.7), nn.GELU(approximate="tanh")]


def activation_id(spec):
    return spec if isinstance(spec, str) else repr(spec)


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=activation_id)
@pytest.mark.parametrize("shape", [(16, 6), (3, 4, 5)], ids=shape_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_activation_matches_torch(activation, shape, training):
    torch_bn, ours = make_pair(shape[1], activation=activation)
    torch_bn.train(training), ours.train(training)
    x, dy = random_input(shape, scale=2.0)  # spread over both sides of 0, where the activations bend
    compare_step(torch_bn, ours, x, dy, activation)


@pytest.mark.parametrize("activation", ["relu", "elu", "silu", "gelu", "mish"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_activation_half_precision(activation, dtype, kernel_path):
    """16-bit inputs: the activation is evaluated in float32 before the store, as torch's kernels do."""
    torch_bn, ours = make_pair(8, dtype=dtype, activation=activation)
    x, dy = random_input((24, 8), dtype, scale=2.0)
    compare_step(torch_bn, ours, x, dy, activation)


@pytest.mark.parametrize("activation", ["leaky_relu", "elu", "selu", "gelu_tanh", "silu", "tanh", "hardswish"])
def test_fused_activation_split_path(activation, kernel_path):
    torch_bn, ours = make_pair(5, activation=activation)
    x, dy = random_input((40, 5, 3), scale=2.0)
    compare_step(torch_bn, ours, x, dy, activation)


@pytest.mark.parametrize(
    "activation", [a for a in bnfast.SUPPORTED_ACTIVATIONS if a != "relu"] + [nn.ELU(0.5)], ids=activation_id
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(activation, training):
    """ReLU is left out: its kink makes finite differences meaningless at points that land near 0."""
    f64 = dict(dtype=torch.float64, device=DEVICE)
    x = torch.randn(5, 3, **f64, requires_grad=True)
    weight = torch.rand(3, **f64).add(0.5).requires_grad_(True)
    bias = torch.randn(3, **f64, requires_grad=True)
    running_mean, running_var = torch.randn(3, **f64), torch.rand(3, **f64) + 0.5

    def fn(x, weight, bias):
        return bnfast.batch_norm(
            x, running_mean.clone(), running_var.clone(), weight, bias, training, activation=activation
        )

    assert torch.autograd.gradcheck(fn, (x, weight, bias))


def test_elu_selu_exact_near_zero():
    """expm1, not exp - 1: for z ~ 1e-6 the naive form loses half the digits; torch is exact there."""
    z = torch.tensor([[-1e-6, -3e-7], [1e-7, 2e-6]], dtype=torch.float32, device=DEVICE)
    for name in ("elu", "selu"):
        ours = bnfast.batch_norm(
            z,
            torch.zeros(2, device=DEVICE),
            torch.ones(2, device=DEVICE) - 1e-5,
            training=False,
            eps=1e-5,
            activation=name,
        )
        expected = bnfast.resolve_activation(name).apply(z.double()).float()
        # interpreter (numpy, IEEE): within 2e-7 (<= 2 ulp). Compiled: exp is `ex2.approx.f32` (bench.kernel_report
        # lists it); Kahan's form corrects its error through the accurate log (libdevice), divisions are correctly
        # rounded (_div_rn), so allow one ulp more there
        rtol = 2e-7 if ours.device.type == "cpu" else 3.6e-7
        torch.testing.assert_close(ours, expected, rtol=rtol, atol=0)


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("relu", "relu"),
        ("SiLU", "silu"),
        ("swish", "silu"),
        (nn.ReLU(inplace=True), "relu"),
        (nn.LeakyReLU(0.3), "leaky_relu"),
        (nn.GELU(), "gelu"),
        (nn.GELU("tanh"), "gelu_tanh"),
        (None, ""),
    ],
)
def test_resolve_activation(spec, expected):
    act = bnfast.resolve_activation(spec)
    assert act.name == expected
    if isinstance(spec, nn.LeakyReLU):
        assert act.param == pytest.approx(0.3)


@pytest.mark.parametrize(
    "spec",
    ["softplus", nn.Softplus(), nn.PReLU(), 3, nn.Sequential(nn.ReLU())],
    ids=["name", "Softplus", "PReLU", "int", "Sequential"],
)
def test_unsupported_activation_raises(spec):
    with pytest.raises(ValueError, match=r"(?s)unsupported activation .*: bnfast fuses relu, leaky_relu, elu"):
        FusedBatchNorm1d(4, activation=spec)


def test_activation_keeps_state_dict_identical():
    plain, fused = nn.BatchNorm1d(4), FusedBatchNorm1d(4, activation=nn.LeakyReLU(0.2))
    assert list(plain.state_dict()) == list(fused.state_dict())
    fused.load_state_dict(plain.state_dict())
    assert "activation=leaky_relu(0.2)" in repr(fused)


def saved_activation_bytes(module, x):
    """Bytes the autograd graph keeps for the backward of one forward, counting only (N, C, L)-sized tensors.

    Every tensor saved by any node passes through the pack hook; storages are counted once (the input x is
    saved both by torch's BN and by the activation in some graphs).
    """
    storages = {}

    def pack(t):
        if t.numel() == x.numel():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x.requires_grad_(True))
    return sum(storages.values())


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "elu"])
def test_fused_layer_keeps_only_the_input(activation):
    """The fused layer keeps x for the backward; BN + activation in torch keeps x and the BN output."""
    x = torch.randn(64, 8, 5, device=DEVICE)
    act = bnfast.resolve_activation(activation)
    torch_layer = nn.Sequential(nn.BatchNorm1d(8), act.module()).to(DEVICE)
    ours = FusedBatchNorm1d(8, activation=activation, device=DEVICE)
    x_bytes = x.numel() * x.element_size()
    assert saved_activation_bytes(ours, x.clone()) == x_bytes
    assert saved_activation_bytes(torch_layer, x.clone()) == 2 * x_bytes


def test_hardswish_kinks_follow_torch(kernel_path):
    """hardswish' at exactly -3 and 3 is torch's choice (0 at -3, 1 at 3: x/3 + 0.5 only strictly between): eval
    BatchNorm with running stats (0, 1 - eps), so z = x exactly, against torch's hardswish and its backward."""
    eps = 2.0**-20
    z = torch.tensor([[-4.0, -3.0, -1.5, 0.0], [1e-8, 1.5, 3.0, 4.0]], dtype=torch.float64, device=DEVICE)
    z = z.repeat(4, 1).requires_grad_(True)
    mean, var = (
        torch.zeros(4, dtype=torch.float64, device=DEVICE),
        torch.full((4,), 1 - eps, dtype=torch.float64, device=DEVICE),
    )
    ours = bnfast.batch_norm(z, mean, var, training=False, eps=eps, activation=nn.Hardswish())
    (grad,) = torch.autograd.grad(ours.sum(), z)
    z_ref = z.detach().clone().requires_grad_(True)
    expected = nn.functional.hardswish(z_ref)
    (grad_ref,) = torch.autograd.grad(expected.sum(), z_ref)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0)
