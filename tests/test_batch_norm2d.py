"""FusedBatchNorm2d / FusedBatchNorm3d against torch.nn.BatchNorm2d / BatchNorm3d and a float64 reference.

Layouts: NCHW/NCDHW (contiguous), channels_last/channels_last_3d, and a strided one (a slice along W);
train and eval, both launch plans, float32/float64/bfloat16 (+ the AMP layout: bf16 input, float32 module),
gradcheck, running stats over steps, errors, state_dict interop, the output's memory format. The tolerance
rule is in tests/parity.py.
"""

import pytest
import torch
from parity import DEVICE, compare_step, make_pair, random_input, run_step
from torch import nn

import bnfast
from bnfast import FusedBatchNorm2d, FusedBatchNorm3d

LAYOUTS = {
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.to(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d),
    "strided": lambda t: torch.cat([t, t], dim=-1)[..., ::2],  # stride 2 along the last dim: no memory format
}
SHAPES = {2: [(2, 3, 4, 5), (5, 8, 3, 3)], 3: [(2, 3, 2, 3, 4)]}
CASES = [(dims, shape) for dims, shapes in SHAPES.items() for shape in shapes]


def case_id(case):
    return f"{case[0]}d-" + "x".join(map(str, case[1]))


def layout_input(shape, layout, dtype=torch.float32, **kwargs):
    x, dy = random_input(shape, dtype, **kwargs)
    return LAYOUTS[layout](x), LAYOUTS[layout](dy)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_torch(case, layout, training, kernel_path):
    dims, shape = case
    torch_bn, ours = make_pair(shape[1], dims=dims)
    torch_bn.train(training), ours.train(training)
    x, dy = layout_input(shape, layout, loc=0.5, scale=2.0)
    compare_step(torch_bn, ours, x, dy)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_fused_activation_matches_torch(layout, activation, kernel_path):
    torch_bn, ours = make_pair(4, dims=2, activation=activation)
    x, dy = layout_input((3, 4, 5, 3), layout, scale=2.0)
    compare_step(torch_bn, ours, x, dy, activation)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_output_memory_format_follows_torch(layout):
    for dims, shape in ((2, (2, 3, 4, 5)), (3, (2, 3, 2, 3, 4))):
        torch_bn, ours = make_pair(shape[1], dims=dims)
        x, dy = layout_input(shape, layout)
        theirs, mine = run_step(torch_bn, x, dy), run_step(ours, x, dy)
        for name, a, b in zip(("y", "dx"), mine[:2], theirs[:2], strict=True):
            assert a.stride() == b.stride(), f"{layout} {dims}d {name}: {a.stride()} != torch's {b.stride()}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dtypes(dtype, layout, kernel_path):
    torch_bn, ours = make_pair(4, dims=2, dtype=dtype)
    x, dy = layout_input((3, 4, 3, 5), layout, dtype, loc=2.0)
    compare_step(torch_bn, ours, x, dy)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_amp_layout_16bit_input_float32_module(dtype, layout):
    """16-bit activations with float32 parameters and buffers (what autocast leaves BatchNorm with)."""
    torch_bn, ours = make_pair(4, dims=2)
    x, dy = layout_input((3, 4, 3, 5), layout, dtype, loc=1.0)
    compare_step(torch_bn, ours, x, dy)


@pytest.mark.parametrize("momentum", [0.1, None], ids=lambda m: f"momentum={m}")
def test_running_stats_over_steps(momentum, kernel_path):
    torch_bn, ours = make_pair(3, dims=2, momentum=momentum)
    for step in range(3):
        x, dy = layout_input((4, 3, 2, 3), "channels_last" if step % 2 else "contiguous", seed=step, loc=step)
        compare_step(torch_bn, ours, x, dy)
    assert ours.num_batches_tracked.item() == 3
    torch_bn.eval(), ours.eval()
    compare_step(torch_bn, ours, *layout_input((4, 3, 2, 3), "channels_last", seed=9))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck(training, layout):
    f64 = dict(dtype=torch.float64, device=DEVICE)
    x = LAYOUTS[layout](torch.randn(2, 3, 2, 3, **f64)).requires_grad_(True)
    weight = torch.rand(3, **f64).add(0.5).requires_grad_(True)
    bias = torch.randn(3, **f64, requires_grad=True)
    running_mean, running_var = torch.randn(3, **f64), torch.rand(3, **f64) + 0.5

    def fn(x, weight, bias):
        return bnfast.batch_norm(
            x, running_mean.clone(), running_var.clone(), weight, bias, training, activation="silu"
        )

    assert torch.autograd.gradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize(
    "module, shape, match",
    [
        (FusedBatchNorm2d, (2, 3, 4), r"expected 4D input \(got 3D input\)"),
        (FusedBatchNorm2d, (2, 3, 4, 5, 6), r"expected 4D input \(got 5D input\)"),
        (FusedBatchNorm3d, (2, 3, 4, 5), r"expected 5D input \(got 4D input\)"),
    ],
)
def test_wrong_dims_raise_like_torch(module, shape, match):
    torch_type = nn.BatchNorm2d if module is FusedBatchNorm2d else nn.BatchNorm3d
    x = torch.randn(shape, device=DEVICE)
    for m in (torch_type(3, device=DEVICE), module(3, device=DEVICE)):
        with pytest.raises(ValueError, match=match):
            m(x)


def test_state_dict_loads_both_ways():
    torch_bn, ours = make_pair(5, dims=2)
    x, _ = random_input((2, 5, 3, 3))
    torch_bn(x)
    fresh = FusedBatchNorm2d(5, device=DEVICE)
    fresh.load_state_dict(torch_bn.state_dict())
    ours(x), ours(x)
    back = nn.BatchNorm2d(5, device=DEVICE)
    back.load_state_dict(ours.state_dict())
    assert back.num_batches_tracked.item() == 2 and list(back.state_dict()) == list(ours.state_dict())
    assert isinstance(ours, nn.BatchNorm2d) and "activation=None" in repr(ours)


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 3),
    )


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
def test_convert_small_cnn(channels_last):
    """convert fuses BN2d -> ReLU pairs, keeps the parameter objects, and gives torch's numbers, both formats."""
    torch.manual_seed(0)
    model = small_cnn().to(DEVICE)
    converted = bnfast.convert(small_cnn().to(DEVICE))
    converted.load_state_dict(model.state_dict())
    assert isinstance(converted[1], FusedBatchNorm2d) and converted[1].activation.name == "relu"
    assert isinstance(converted[2], nn.Identity)
    x = torch.randn(4, 1, 10, 10, device=DEVICE)
    if channels_last:
        model, converted = model.to(memory_format=torch.channels_last), converted.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    for training in (True, False):
        model.train(training), converted.train(training)
        y, y_ours = model(x), converted(x)
        torch.testing.assert_close(y_ours, y, rtol=1e-4, atol=1e-5)
        y.sum().backward(), y_ours.sum().backward()
    for (name, p), q in zip(model.named_parameters(), converted.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, b), c in zip(model.named_buffers(), converted.buffers(), strict=True):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)
