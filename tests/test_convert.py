"""bnfast.convert: same numbers before and after, same parameter objects, fused pairs where torch had two modules."""

import copy

import pytest
import torch
from parity import DEVICE
from torch import nn

import bnfast
from bnfast import FusedBatchNorm1d


def seeds_mlp():
    """The seeds' model: one ReLU object used twice."""
    relu = nn.ReLU()
    return nn.Sequential(
        nn.Linear(20, 16), nn.BatchNorm1d(16), relu, nn.Linear(16, 12), nn.BatchNorm1d(12), relu, nn.Linear(12, 3)
    )


class Nested(nn.Module):
    """BatchNorm1d at several depths, one not followed by an activation, one before a non-fusable activation."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.GELU())
        self.block = nn.ModuleDict({"inner": nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Softplus())})
        self.bn_alone = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.bn_alone(self.block["inner"](self.stem(x))))


def sequence_1d():
    """(N, C, L) inputs, and a BatchNorm1d that ends the Sequential (nothing to fuse with)."""
    return nn.Sequential(
        nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6), nn.LeakyReLU(0.1), nn.Conv1d(6, 6, 1), nn.BatchNorm1d(6)
    )


MODELS = {"seeds_mlp": (seeds_mlp, (32, 20)), "nested": (Nested, (32, 20)), "conv1d": (sequence_1d, (8, 4, 9))}


def outputs_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    y = model(x)
    # a fixed random cotangent: a loss such as sum(y**2) is constant after a final BN (sum xhat^2 = M)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.device))
    return y.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", MODELS)
def test_convert_gives_the_same_numbers(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().to(DEVICE)
    converted = bnfast.convert(copy.deepcopy(model))
    x = torch.randn(shape, device=DEVICE)
    for training in (True, False):
        model.train(training), converted.train(training)
        (y_ref, grads_ref), (y, grads) = outputs_and_grads(model, x), outputs_and_grads(converted, x)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        for g, g_ref in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert not any(type(m) is nn.BatchNorm1d for m in converted.modules())


def test_seeds_mlp_pairs_are_fused_with_the_shared_relu():
    model = seeds_mlp()
    keys = list(model.state_dict())
    converted = bnfast.convert(model)
    assert converted is model  # in place
    assert [type(m).__name__ for m in converted] == [
        "Linear",
        "FusedBatchNorm1d",
        "Identity",
        "Linear",
        "FusedBatchNorm1d",
        "Identity",
        "Linear",
    ]
    assert converted[1].activation.name == converted[4].activation.name == "relu"
    assert list(converted.state_dict()) == keys


def test_nested_model_fuses_only_what_it_can():
    model = bnfast.convert(Nested())
    assert model.stem[1].activation.name == "gelu" and isinstance(model.stem[2], nn.Identity)
    inner = model.block["inner"]
    assert type(inner[1]) is FusedBatchNorm1d and not inner[1].activation  # Softplus is not fusable
    assert isinstance(inner[2], nn.Softplus)
    assert type(model.bn_alone) is FusedBatchNorm1d and not model.bn_alone.activation


def test_convert_keeps_parameter_objects_and_options():
    bn = nn.BatchNorm1d(5, eps=1e-3, momentum=None, affine=True, track_running_stats=True)
    model = nn.Sequential(nn.Linear(3, 5), bn, nn.ELU(0.5)).eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weight, running_var = bn.weight, bn.running_var
    bnfast.convert(model)
    fused = model[1]
    assert fused.weight is weight and fused.running_var is running_var  # the optimizer still updates them
    assert (fused.eps, fused.momentum, fused.training) == (1e-3, None, False)
    assert fused.activation == bnfast.resolve_activation(nn.ELU(0.5))
    model.train()
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    assert fused.weight.grad is not None


def test_convert_handles_shared_batchnorm_and_options():
    shared = nn.BatchNorm1d(4, affine=False, track_running_stats=False)
    model = nn.Sequential(shared, nn.ReLU(), nn.Linear(4, 4), shared)
    converted = bnfast.convert(copy.deepcopy(model))
    assert converted[0] is converted[3] and not converted[0].activation  # converted once, shared, not fused
    assert converted[0].weight is None and converted[0].running_mean is None
    x = torch.randn(6, 4)
    torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)


def test_convert_a_bare_batchnorm():
    bn = nn.BatchNorm1d(3)
    fused = bnfast.convert(bn)
    assert type(fused) is FusedBatchNorm1d and fused.weight is bn.weight


def test_batch_norm_with_a_backward_hook_is_not_fused():
    """A backward hook on the BN sees dL/d(BN output); fused with the ReLU it would see dL/d(ReLU output)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU()).to(DEVICE)
    seen = {}
    model[1].register_full_backward_hook(lambda m, gin, gout: seen.__setitem__(len(seen), gout[0].clone()))
    converted = bnfast.convert(copy.deepcopy(model))
    assert isinstance(converted[2], nn.ReLU) and not converted[1].activation
    x = torch.randn(5, 3, device=DEVICE)
    dy = torch.arange(20.0, device=DEVICE).view(5, 4)
    model(x).backward(dy)
    converted(x).backward(dy)
    torch.testing.assert_close(seen[1], seen[0], rtol=0, atol=0)
