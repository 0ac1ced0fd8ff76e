"""What a converted model computes stays what the original computes: the cases an independent review found
(torch.fx traces that would fix the train/eval mode or drop hooks and state, Sequential subclasses and iterated
Sequentials with feature taps, an in-place write between a BatchNorm and its add, a number as the residual).
Each compares the converted model with the original on the same input; tolerances are float32 rounding."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from parity import DEVICE
from torch import nn

import bnfast

F32 = dict(rtol=1e-5, atol=1e-5)


def _randomized(model):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model.to(DEVICE)


class DropAfterBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return F.dropout(self.bn(x), 0.5, self.training)


def test_trace_that_would_fix_the_mode_falls_back():
    model = _randomized(DropAfterBN()).train()
    with pytest.warns(UserWarning, match="train\\(\\)/eval\\(\\)"):
        converted = bnfast.convert(copy.deepcopy(model), trace=True)
    assert not converted.bnfast_report.traced
    x = torch.randn(8, 3, device=DEVICE)
    converted.eval(), model.eval()
    torch.testing.assert_close(converted(x), model(x), **F32)  # eval: no dropout in either


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(x)


class WithBlockAndSpare(nn.Module):
    def __init__(self):
        super().__init__()
        self.blk, self.extra = Block(), nn.Linear(3, 3)

    def forward(self, x):
        return self.blk(x) * 2


def test_trace_that_would_drop_hooks_or_state_falls_back():
    seen = []
    model = _randomized(WithBlockAndSpare()).eval()
    model.blk.register_forward_hook(lambda m, a, y: seen.append(type(y).__name__))
    with pytest.warns(UserWarning, match="hooks"):
        converted = bnfast.convert(copy.deepcopy(model), trace=True)
    converted(torch.randn(4, 3, device=DEVICE))
    assert seen == ["Tensor"]  # the hook still runs, on a tensor (never during the conversion on a Proxy)
    model = _randomized(WithBlockAndSpare()).eval()
    with pytest.warns(UserWarning, match="state_dict keys"):
        converted = bnfast.convert(copy.deepcopy(model), trace=True)
    assert sorted(converted.state_dict()) == sorted(model.state_dict())


class Tap(nn.Sequential):
    def forward(self, x):
        y = self[0](x)
        return self[1](y) + y


class Feats(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        outs = []
        for layer in self.body:
            x = layer(x)
            outs.append(x)
        return torch.cat(outs, 1)


@pytest.mark.parametrize("trace", [False, True], ids=["modules", "traced"])
def test_sequential_subclass_is_not_fused(trace):
    model = _randomized(Tap(nn.BatchNorm1d(3), nn.ReLU())).eval()
    x = torch.randn(6, 3, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = bnfast.convert(copy.deepcopy(model), trace=trace)
    torch.testing.assert_close(converted(x), model(x), **F32)


def test_iterated_sequential_with_taps_is_fused_only_by_a_confirming_trace():
    model = _randomized(Feats(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.ReLU()))).eval()
    x = torch.randn(6, 3, device=DEVICE)
    converted = bnfast.convert(copy.deepcopy(model), trace=True)
    assert converted.bnfast_report.traced and not converted.bnfast_report.pairs  # the BN output is tapped
    torch.testing.assert_close(converted(x), model(x), **F32)
    torch.testing.assert_close(bnfast.fold(model)(x), model(x), **F32)


def test_fold_of_a_sequential_subclass_changes_nothing():
    torch.manual_seed(1)
    model = _randomized(Tap(nn.Linear(3, 3), nn.BatchNorm1d(3))).eval()
    x = torch.randn(6, 3, device=DEVICE)
    torch.testing.assert_close(bnfast.fold(model)(x), model(x), **F32)


class InPlaceBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        x = x * 1.0
        y = self.bn(x)
        z = x.relu_()
        return y + z


class NumberResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(x) + x.size(1)


@pytest.mark.parametrize("model_type", [InPlaceBetween, NumberResidual])
def test_bn_add_fusion_keeps_the_function(model_type):
    model = _randomized(model_type()).eval()
    x = torch.randn(6, 3, device=DEVICE)
    converted = bnfast.convert(copy.deepcopy(model), trace=True)
    assert converted.bnfast_report.traced
    torch.testing.assert_close(converted(x), model(x), **F32)
    if model_type is InPlaceBetween:
        assert not converted.bnfast_report.adds  # the add is not fused past the in-place relu_
