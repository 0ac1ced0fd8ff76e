"""bnfast.recalibrate: every BatchNorm's running stats become the exact mean and unbiased variance of its input
over the data, checked against a float64 computation over the whole data set (every layer input of the same
pass, concatenated); module state restored; both batch forms. Across ranks: tests/test_distributed.py.
"""

import copy

import pytest
import torch
from torch import nn

import bnfast

F64 = torch.float64


def make_model(dtype=F64):
    """torch's and bnfast's BatchNorms, (N, C) and (N, C, L) inputs, a fused activation, a momentum=None layer."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 6),
        nn.BatchNorm1d(6, momentum=None),
        nn.ReLU(),
        nn.Linear(6, 8),
        nn.Unflatten(1, (2, 4)),
        bnfast.FusedBatchNorm1d(2, activation="silu"),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).to(dtype)


def make_batches(n=5, batch=6, dtype=F64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        ((torch.randn(batch, 5, generator=gen) * 3 + 20).to(dtype), torch.randint(0, 3, (batch,), generator=gen))
        for _ in range(n)
    ]


def population_stats(model, inputs):
    """Ground truth: the pass recalibrate makes (BatchNorms in training mode, batch statistics, on a copy), every
    BatchNorm's inputs concatenated over the data; their float64 mean and unbiased variance per channel."""
    model = copy.deepcopy(model)
    seen = {}
    bns = {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    for name, m in bns.items():
        m.train()
        m.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, []).append(args[0].double()))
    with torch.no_grad():
        for x in inputs:
            model(x)
    out = {}
    for name, xs in seen.items():
        x = torch.cat(xs).transpose(0, 1).flatten(1)  # (C, all values)
        out[name] = (x.mean(1), x.var(1, correction=1))
    return out


@pytest.mark.parametrize("form", ["tuples", "tensors"])
def test_recalibrate_equals_float64_over_the_data_set(form):
    model = make_model().eval()
    batches = make_batches()
    expected = population_stats(model, [x for x, _ in batches])
    bn1, bn2 = model[1], model[5]
    bn1.num_batches_tracked.fill_(7)
    loader = batches if form == "tuples" else [x for x, _ in batches]
    with bnfast.testing.force_plan("split", tile_elements=8):
        assert bnfast.recalibrate(model, loader) is model
    for name, (mean, var) in expected.items():
        bn = model.get_submodule(name)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12, msg=f"{name} mean")
        torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12, msg=f"{name} var")
    assert not bn1.training and not bn2.training and not model.training
    assert bn1.momentum is None and bn2.momentum == 0.1
    assert bn1.num_batches_tracked.item() == 7 and bn2.num_batches_tracked.item() == 0


def test_recalibrate_num_batches_train_state_and_float32():
    """float32 model with mean-20 inputs: float32 partials, float64 merge (the float64 truth to 1e-5); only the
    first num_batches batches; a module in training mode stays there; modules without running stats are skipped."""
    model = make_model(torch.float32).train()
    model.append(nn.BatchNorm1d(3, track_running_stats=False))
    batches = make_batches(dtype=torch.float32)
    expected = population_stats(model, [x for x, _ in batches[:3]])
    bnfast.recalibrate(model, iter(batches), num_batches=3)
    for name, (mean, var) in expected.items():
        bn = model.get_submodule(name)
        if bn.running_mean is None:
            continue
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-5)
    assert model.training and model[1].training and model[1].momentum is None


def test_recalibrate_a_model_without_batch_norm_is_a_no_op():
    model = nn.Linear(3, 2)
    assert bnfast.recalibrate(model, [torch.randn(4, 3)]) is model
