"""FusedBatchNorm1d against torch.nn.BatchNorm1d and a float64 reference, on both launch plans.

The tolerance rule is in tests/parity.py.
"""

import copy
import io
import os
import subprocess
import sys

import pytest
import torch
from parity import DEVICE, SHAPES, compare_step, make_pair, random_input, run_step, shape_id
from torch import nn

import bnfast
from bnfast import FusedBatchNorm1d


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_train_step_matches_torch(shape, kernel_path):
    torch_bn, ours = make_pair(shape[1])
    x, dy = random_input(shape, loc=0.5, scale=2.0)
    compare_step(torch_bn, ours, x, dy)


@pytest.mark.parametrize("shape", [(2, 3), (67, 5), (2, 3, 7), (130, 40, 3)], ids=shape_id)
def test_eval_step_matches_torch(shape, kernel_path):
    torch_bn, ours = make_pair(shape[1])
    torch_bn.eval(), ours.eval()
    x, dy = random_input(shape, loc=0.5, scale=2.0)
    compare_step(torch_bn, ours, x, dy)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None], ids=lambda m: f"momentum={m}")
def test_running_stats_track_torch_over_steps(momentum, kernel_path):
    torch_bn, ours = make_pair(5, momentum=momentum)
    for step in range(4):
        x, dy = random_input((9, 5, 3), loc=step - 1.0, scale=1.0 + step, seed=step)
        compare_step(torch_bn, ours, x, dy)
    assert ours.num_batches_tracked.item() == 4
    torch_bn.eval(), ours.eval()
    x, dy = random_input((9, 5, 3), seed=10)
    compare_step(torch_bn, ours, x, dy)  # eval with the accumulated statistics


@pytest.mark.parametrize(
    "kwargs",
    [dict(affine=False), dict(bias=False), dict(track_running_stats=False), dict(affine=False, momentum=None)],
    ids=lambda k: ",".join(f"{key}={value}" for key, value in k.items()),
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_options(kwargs, training, kernel_path):
    if "bias" in kwargs and "bias" not in nn.BatchNorm1d.__init__.__code__.co_varnames:
        pytest.skip("this torch's nn.BatchNorm1d has no bias keyword to compare against")
    torch_bn, ours = make_pair(6, **kwargs)
    torch_bn.train(training), ours.train(training)
    for seed in range(2):
        x, dy = random_input((7, 6, 2), seed=seed)
        compare_step(torch_bn, ours, x, dy)


def test_bias_false_has_weight_but_no_bias():
    module = FusedBatchNorm1d(4, bias=False)
    assert module.weight is not None and module.bias is None
    assert set(module.state_dict()) == {"weight", "running_mean", "running_var", "num_batches_tracked"}


NON_CONTIGUOUS = {
    "transposed-2d": lambda x: x.t().contiguous().t(),  # (N, C) with stride (1, N)
    "sliced-2d": lambda x: torch.cat([x, x], dim=1)[:, ::2],  # stride 2 along C
    "permuted-3d": lambda x: x.permute(2, 0, 1).contiguous().permute(1, 2, 0),  # L slowest
    "sliced-3d": lambda x: torch.cat([x, x], dim=2)[:, :, ::2],  # stride 2 along L
}


@pytest.mark.parametrize("layout", NON_CONTIGUOUS)
def test_non_contiguous_input(layout, kernel_path):
    shape = (19, 6) if layout.endswith("2d") else (5, 6, 7)
    torch_bn, ours = make_pair(6)
    x, dy = random_input(shape)
    x, dy = NON_CONTIGUOUS[layout](x), NON_CONTIGUOUS[layout](dy)
    assert not x.is_contiguous() and not dy.is_contiguous()
    compare_step(torch_bn, ours, x, dy)


@pytest.mark.parametrize(
    "loc,scale", [(1e4, 1.0), (-3e4, 0.5), (1.0, 1e-3), (0.0, 1e3)], ids=["mean1e4", "mean-3e4", "tinyvar", "large"]
)
def test_ill_conditioned_inputs(loc, scale, kernel_path):
    """Mean large against the spread: E[x^2] - E[x]^2 in float32 would return garbage (even negative variance).

    A float32 mean, even correctly rounded, is off by up to half an ulp of |mean|, and xhat = (x - mean) * rstd
    inherits that divided by the spread: the floor below (times max weight 1.5). torch's CPU kernel keeps the
    statistics in double and can land under it on some runs (its threading changes the path), so "2x torch"
    alone would flake; torch's CUDA kernels keep a float32 mean, as bnfast does.
    """
    torch_bn, ours = make_pair(4)
    x, dy = random_input((50, 4, 3), loc=loc, scale=scale)
    mean_rounding = 2.0**-24 * abs(loc) / scale * 1.5
    compare_step(torch_bn, ours, x, dy, floor=mean_rounding)


def test_constant_channel_gives_finite_output(kernel_path):
    """Zero variance: rstd = 1/sqrt(eps); x - mean is exactly 0, so y = bias (torch gives the same)."""
    torch_bn, ours = make_pair(3)
    x = torch.full((10, 3), 7.0, device=DEVICE)
    x[:, 1] = torch.arange(10.0)
    dy = torch.randn(10, 3, device=DEVICE)
    compare_step(torch_bn, ours, x, dy)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(32, 32), (67, 5), (2, 3, 7)], ids=shape_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_half_precision(dtype, shape, training, kernel_path):
    torch_bn, ours = make_pair(shape[1], dtype=dtype)
    torch_bn.train(training), ours.train(training)
    x, dy = random_input(shape, dtype, loc=3.0, scale=2.0)
    compare_step(torch_bn, ours, x, dy)


def test_float64_matches_reference(kernel_path):
    torch_bn, ours = make_pair(5, dtype=torch.float64)
    x, dy = random_input((13, 5, 3), torch.float64, loc=100.0)
    compare_step(torch_bn, ours, x, dy)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 3)], ids=shape_id)
def test_gradcheck_float64(shape, training, kernel_path):
    f64 = dict(dtype=torch.float64, device=DEVICE)
    x = torch.randn(shape, **f64, requires_grad=True)
    weight = torch.rand(shape[1], **f64).add(0.5).requires_grad_(True)
    bias = torch.randn(shape[1], **f64, requires_grad=True)
    running_mean, running_var = torch.randn(shape[1], **f64), torch.rand(shape[1], **f64)

    def fn(x, weight, bias):  # fresh running-stat copies: gradcheck calls fn many times
        return bnfast.batch_norm(x, running_mean.clone(), running_var.clone() + 0.5, weight, bias, training)

    assert torch.autograd.gradcheck(fn, (x, weight, bias))


def test_state_dict_loads_both_ways():
    torch_bn, ours = make_pair(7)
    x, _ = random_input((8, 7))
    torch_bn(x)
    fresh = FusedBatchNorm1d(7)
    fresh.load_state_dict(torch_bn.state_dict())
    for key, value in torch_bn.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    ours(x), ours(x)
    back = nn.BatchNorm1d(7)
    back.load_state_dict(ours.state_dict())
    assert list(back.state_dict()) == list(ours.state_dict())
    assert back.num_batches_tracked.item() == 2


def test_module_behaves_like_torch_module():
    module = FusedBatchNorm1d(4, momentum=None, activation="relu", device=DEVICE)
    assert isinstance(module, nn.BatchNorm1d)
    assert "activation='relu'" in repr(module) and "momentum=None" in repr(module)
    module(torch.randn(5, 4, device=DEVICE) + 3)
    clone = copy.deepcopy(module)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (clone, loaded):
        assert other.activation == module.activation
        for key, value in module.state_dict().items():
            assert torch.equal(other.state_dict()[key], value), key
    module.reset_running_stats()
    assert module.num_batches_tracked.item() == 0 and torch.equal(module.running_var, torch.ones(4, device=DEVICE))
    with torch.no_grad():
        module.weight.fill_(3)
    module.reset_parameters()
    assert torch.equal(module.weight, torch.ones(4, device=DEVICE))


@pytest.mark.parametrize(
    "shape,training,error,match",
    [
        ((1, 4), True, ValueError, r"Expected more than 1 value per channel when training, got input size"),
        ((1, 4, 1), True, ValueError, r"Expected more than 1 value per channel when training"),
        ((2, 4, 3, 3), True, ValueError, r"expected 2D or 3D input \(got 4D input\)"),
        ((4,), False, ValueError, r"expected 2D or 3D input \(got 1D input\)"),
        ((3, 5), True, RuntimeError, r"running_mean should contain 5 elements not 4"),
        ((3, 5, 2), False, RuntimeError, r"running_mean should contain 5 elements not 4"),
    ],
)
def test_bad_input_raises_like_torch(shape, training, error, match):
    x = torch.randn(shape)
    for module in (nn.BatchNorm1d(4), FusedBatchNorm1d(4)):
        module.train(training)
        with pytest.raises(error, match=match):
            module(x)


def test_integer_input_raises_like_torch():
    x = torch.randint(0, 5, (3, 4))
    for module in (nn.BatchNorm1d(4), FusedBatchNorm1d(4)):
        with pytest.raises(NotImplementedError, match=r"\"batch_norm\" not implemented for 'Long'"):
            module(x)


def test_unknown_activation_raises():
    with pytest.raises(ValueError, match=r"unsupported activation 'softplus'.*relu.*leaky_relu"):
        FusedBatchNorm1d(4, activation="softplus")
    with pytest.raises(ValueError, match=r"unsupported activation"):
        FusedBatchNorm1d(4, activation=nn.Softplus())


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (2, 3, 0)], ids=shape_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_behaves_like_torch(shape, training):
    torch_bn, ours = make_pair(3)
    torch_bn.train(training), ours.train(training)
    x = torch.randn(shape, device=DEVICE)
    dy = torch.randn(shape, device=DEVICE)
    theirs, mine = run_step(torch_bn, x, dy), run_step(ours, x, dy)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for key, value in torch_bn.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_nan_and_inf_propagate_like_torch(kernel_path):
    """A NaN poisons its own channel's statistics and outputs, and no other channel's, exactly as in torch."""
    torch_bn, ours = make_pair(4)
    x, dy = random_input((6, 4))
    x[2, 1] = float("nan")
    x[3, 2] = float("inf")
    theirs, mine = run_step(torch_bn, x, dy), run_step(ours, x, dy)
    for name, a, b in zip(("y", "dx", "dweight", "dbias"), mine, theirs, strict=True):
        assert torch.equal(a.isnan(), b.isnan()), name
        assert torch.equal(a.isinf(), b.isinf()), name
    for name in ("running_mean", "running_var"):
        assert torch.equal(getattr(ours, name).isfinite(), getattr(torch_bn, name).isfinite()), name
    assert mine[0][:, [0, 3]].isfinite().all(), "clean channels must stay finite"


def test_split_path_is_deterministic():
    """Partial results are combined in a fixed order (no atomics): the same input gives the same bits."""
    x, dy = random_input((70, 6, 5))
    with bnfast.testing.force_plan("split", tile_elements=64):
        runs = [run_step(FusedBatchNorm1d(6, device=DEVICE), x, dy) for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_training_loop_tracks_torch_step_for_step(kernel_path):
    """An MLP with two BatchNorm1d layers trained with SGD: bnfast's copy stays on torch's trajectory.

    SGD, not Adam: the bias of a Linear right before a BatchNorm gets a gradient that is zero in exact math (BN
    removes any shift), so in float it is pure rounding noise, and Adam's m/sqrt(v) turns noise into
    +-lr steps in a random direction in either model. That is a property of the model, not of the kernels.
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 3),
    ).to(DEVICE)
    ours = bnfast.convert(copy.deepcopy(model))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, ours)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, target = torch.randn(24, 12, generator=gen), torch.randint(0, 3, (24,), generator=gen)
        x, target = x.to(DEVICE), target.to(DEVICE)
        for m, opt in zip((model, ours), optimizers, strict=True):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), target).backward()
            opt.step()
    for (name, a), b in zip(model.state_dict().items(), ours.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)  # 5 SGD steps of float32 rounding
    x = torch.randn(10, 12, generator=gen).to(DEVICE)
    torch.testing.assert_close(ours.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_cpu_falls_back_to_torch_without_interpreter():
    """Without TRITON_INTERPRET, CPU tensors run torch.nn.functional.batch_norm (and the torch activation)."""
    script = (
        "import torch, bnfast\n"
        "from torch import nn\n"
        "x = torch.randn(6, 4)\n"
        "assert not bnfast.uses_triton(x)\n"
        "ours, ref = bnfast.FusedBatchNorm1d(4, activation='relu'), nn.Sequential(nn.BatchNorm1d(4), nn.ReLU())\n"
        "torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)\n"
        "torch.testing.assert_close(ours.running_var, ref[0].running_var, rtol=0, atol=0)\n"
        "print('fallback ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


def test_uses_triton_under_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernels run on CPU only under TRITON_INTERPRET=1")
    assert bnfast.uses_triton(torch.randn(2, 3))


def test_inf_channel_running_mean_like_torch(kernel_path):
    """An inf in a channel makes torch's batch mean inf (not NaN): so does bnfast's, on both plans."""
    torch_bn, ours = make_pair(2)
    x, dy = random_input((8, 2))
    x[3, 0] = float("inf")
    run_step(torch_bn, x, dy), run_step(ours, x, dy)
    torch.testing.assert_close(ours.running_mean, torch_bn.running_mean, equal_nan=True)


def test_momentum_none_without_counter_keeps_the_stats_like_torch():
    """momentum=None with num_batches_tracked deleted: torch's module uses factor 0 (the stats stay), not an error."""
    torch_bn, ours = make_pair(3, momentum=None)
    torch_bn.num_batches_tracked, ours.num_batches_tracked = None, None
    x, dy = random_input((6, 3))
    compare_step(torch_bn, ours, x, dy)


def test_meta_parameter_raises_like_torch():
    """A meta-device weight beside a CPU input: torch's own error (get_device() is -1 for both devices)."""
    x = torch.randn(4, 3)
    w = torch.empty(3, device="meta")
    with pytest.raises(Exception) as theirs:
        torch.nn.functional.batch_norm(x, None, None, w, None, True)
    with pytest.raises(type(theirs.value)) as ours:
        bnfast.batch_norm(x, None, None, w, None, True)
    assert str(ours.value) == str(theirs.value)
