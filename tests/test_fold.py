"""bnfast.fold: Linear -> BatchNorm1d folded into one Linear for inference, on torch's and bnfast's modules."""

import copy

import pytest
import torch
from torch import nn

import bnfast
from bnfast import FusedBatchNorm1d

# The folded weights are rounded once from float64, so outputs differ from the unfolded model's by rounding:
# measured max |diff| 3e-7 (float32) and 2e-15 (float64) at |y| <= 1; the tolerances leave headroom.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def mnist_mlp():
    """The MNIST MLP: 784-32-32-10 with BatchNorm1d + ReLU after each hidden Linear."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def bn_without_bias(num_features):
    """nn.BatchNorm1d without bias on every supported torch (the `bias=` keyword is newer than torch 2.11)."""
    bn = nn.BatchNorm1d(num_features)
    bn.register_parameter("bias", None)
    return bn


def deep_mlp():
    """Deeper, with the corners: no Linear bias, BN without affine or without bias, momentum=None, nested
    Sequentials, an activation with a parameter, and a BN that follows no Linear (left in place)."""
    return nn.Sequential(
        nn.BatchNorm1d(16),  # not after a Linear: stays
        nn.Linear(16, 24),
        nn.BatchNorm1d(24, momentum=None),
        nn.LeakyReLU(0.2),
        nn.Sequential(nn.Linear(24, 24, bias=False), nn.BatchNorm1d(24), nn.GELU()),
        nn.Linear(24, 20),
        nn.BatchNorm1d(20, affine=False),
        nn.SiLU(),
        nn.Sequential(nn.Linear(20, 20), bn_without_bias(20), nn.ELU(0.5)),
        nn.Linear(20, 12),
        nn.BatchNorm1d(12),
        nn.Tanh(),
        nn.Linear(12, 5),
    )


def trained(model, in_features, dtype=torch.float32, steps=3):
    """A few SGD steps on seeded random data, so the running stats and affine parameters are non-trivial."""
    torch.manual_seed(0)
    model = model.to(dtype).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        x = torch.randn(16, in_features, dtype=dtype) * 3 + 1
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model.eval()


def count(model, types):
    return sum(isinstance(m, types) for m in model.modules())


def check_fold(model, in_features, dtype, expected_bns_left):
    state = copy.deepcopy(model.state_dict())
    folded = bnfast.fold(model)
    x = torch.randn(32, in_features, dtype=dtype) * 3 + 1
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL[dtype])
    assert count(folded, nn.BatchNorm1d) == expected_bns_left
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the input is not modified
    return folded


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("flavour", ["torch", "bnfast"])
def test_fold_mnist_mlp(flavour, dtype):
    model = trained(mnist_mlp(), 784, dtype)
    if flavour == "bnfast":
        model = bnfast.convert(model)
        assert count(model, FusedBatchNorm1d) == 2
    folded = check_fold(model, 784, dtype, expected_bns_left=0)
    # convert() put the ReLU into the BN's slot and an Identity into the ReLU's; fold keeps the slots
    act_slots = [nn.ReLU, nn.Identity] if flavour == "bnfast" else [nn.Identity, nn.ReLU]
    assert [type(m) for m in folded] == [nn.Flatten, nn.Linear, *act_slots, nn.Linear, *act_slots, nn.Linear]


@pytest.mark.parametrize("flavour", ["torch", "bnfast"])
def test_fold_deep_mlp(flavour):
    model = trained(deep_mlp(), 16)
    if flavour == "bnfast":
        model = bnfast.convert(model)
    check_fold(model, 16, torch.float32, expected_bns_left=1)


def test_fold_slots():
    """The BN slot keeps the Sequential's indices: the fused activation's module, or Identity."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6),
        FusedBatchNorm1d(6, activation=nn.LeakyReLU(0.3)),
        nn.Linear(6, 6, bias=False),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Linear(6, 2),
    ).eval()
    folded = bnfast.fold(model)
    assert [type(m) for m in folded] == [nn.Linear, nn.LeakyReLU, nn.Linear, nn.Identity, nn.ReLU, nn.Linear]
    assert folded[1].negative_slope == 0.3
    assert folded[2].bias is not None  # a Linear without bias gains one
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL[torch.float32])


def test_fold_leaves_bn_without_running_stats():
    """track_running_stats=False normalises with batch statistics even in eval: not a constant map, kept."""
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Linear(6, 2)).eval()
    folded = bnfast.fold(model)
    assert isinstance(folded[1], nn.BatchNorm1d) and folded[1] is not model[1]  # a copy, unfolded


def test_fold_refuses_training_mode():
    model = nn.Sequential(nn.Linear(4, 6), FusedBatchNorm1d(6, activation="relu"))
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
        bnfast.fold(model)
    model.eval()
    model[1].train()
    with pytest.raises(ValueError, match=r"BatchNorm '1' is in training mode"):
        bnfast.fold(model)
