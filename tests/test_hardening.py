"""Hardening: inputs and tools torch's BatchNorm handles that bnfast got wrong, one section per defect.

Every check is against the installed torch on the same input, computed here: where torch raises, bnfast must
raise the same exception type with the same message, before any state changes; where torch accepts, bnfast
must give torch's answer (float32 tolerance F32 unless stated; float64 relative errors where numerics are
the point). Plans matter for the kernels' indexing and reductions: those tests take `kernel_path`.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from parity import DEVICE, RTOL, compare_step, make_pair, random_input, run_step, shape_id
from torch import nn

import bnfast
from bnfast import FusedBatchNorm1d

F32 = dict(rtol=1e-5, atol=1e-5)  # float32 results of two correct algorithms on unit-scale data
F64 = dict(rtol=1e-12, atol=1e-12)
TRAIN_EVAL = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])


def assert_same_outcome(theirs, ours, **tolerance):
    """Call torch's `theirs()` then bnfast's `ours()`. If torch raises, bnfast must raise the same type with the
    same message; otherwise both results must be close (NaN where torch has NaN). Returns whether torch raised."""
    try:
        expected = theirs()
    except Exception as error:  # noqa: BLE001 - whatever torch raises is the specification
        with pytest.raises(type(error)) as raised:
            ours()
        assert str(raised.value) == str(error), f"torch raised {type(error).__name__}: {error}"
        return True
    torch.testing.assert_close(ours(), expected, equal_nan=True, **tolerance)
    return False


def assert_rel_close(actual, expected, rel, name=""):
    """max|actual - expected| <= rel * max|expected|: a normwise relative error, blind to which elements are
    small (single gradient entries of a BN can cancel to ~0 and carry no relative precision)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * scale, msg=lambda m: f"{name}: {m}")


def rel_err(actual, ref64):
    return ((actual.double() - ref64).abs().max() / ref64.abs().max()).item()


def step(bn_call, x, dy, *params):
    """Forward + backward of `bn_call(x, *params)` on fresh leaves: (y, dx, *param grads)."""
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in params]
    y = bn_call(x, *params)
    y.backward(dy)
    return (y.detach(), x.grad, *(p.grad for p in params))


# ---- 1. non-contiguous weight, bias, running_mean, running_var -------------------------------------------------
# The reference is torch on dense copies of the same values: torch's own CPU backward misreads a stride-0 weight
# and strided running stats in eval (garbage or NaN in dx, changing from run to run: torch 2.14), while its
# forward and running-stat updates are right. Updates of the copies are compared with the caller's views.


def _stacked(*columns):
    """(C, k) storage whose columns are the given vectors: each column is a stride-k view."""
    return torch.stack([c.to(DEVICE) for c in columns], 1)


@TRAIN_EVAL
@pytest.mark.parametrize("shape", [(9, 4), (5, 4, 3)], ids=shape_id)
def test_strided_running_stats_are_read_and_updated_in_place(shape, training, kernel_path):
    """running_mean/var are the two columns of one (C, 2) tensor (stride 2): y and dx must be torch's, and each
    column must hold torch's updated statistic afterwards (the caller's views, written in place)."""
    C = shape[1]
    x, dy = random_input(shape, loc=0.5, scale=2.0)
    stats = _stacked(torch.linspace(-1, 1, C), torch.linspace(0.5, 2, C))
    rm_t, rv_t = stats[:, 0].contiguous(), stats[:, 1].contiguous()
    ours = stats.clone()
    expected = step(lambda x: F.batch_norm(x, rm_t, rv_t, training=training), x, dy)
    actual = step(lambda x: bnfast.batch_norm(x, ours[:, 0], ours[:, 1], training=training), x, dy)
    for name, a, e in zip(("y", "dx"), actual, expected, strict=True):
        torch.testing.assert_close(a, e, **F32, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(
        ours, torch.stack([rm_t, rv_t], 1), **F32, msg=lambda m: f"running stats (column 0 mean, 1 var): {m}"
    )


@TRAIN_EVAL
@pytest.mark.parametrize("shape", [(9, 4), (5, 4, 3)], ids=shape_id)
def test_expanded_weight_and_bias(shape, training, kernel_path):
    """weight and bias expanded from 0-d tensors (stride 0): one value per channel, read without indexing past
    the one-element storage; their gradients flow back to the 0-d leaves (summed over channels)."""
    C = shape[1]
    x, dy = random_input(shape, loc=0.5, scale=2.0)
    w0, b0 = torch.tensor(1.5, device=DEVICE), torch.tensor(0.3, device=DEVICE)
    stats = (torch.linspace(-1, 1, C, device=DEVICE), torch.linspace(0.5, 2, C, device=DEVICE))
    (rm_t, rv_t), (rm_o, rv_o) = [s.clone() for s in stats], [s.clone() for s in stats]
    expected = step(
        lambda x, w, b: F.batch_norm(x, rm_t, rv_t, w.expand(C).contiguous(), b.expand(C).contiguous(), training),
        x,
        dy,
        w0,
        b0,
    )
    actual = step(lambda x, w, b: bnfast.batch_norm(x, rm_o, rv_o, w.expand(C), b.expand(C), training), x, dy, w0, b0)
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), actual, expected, strict=True):
        torch.testing.assert_close(a, e, **F32, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close((rm_o, rv_o), (rm_t, rv_t), **F32)


@TRAIN_EVAL
def test_functional_call_with_view_parameters_and_buffers(training, kernel_path):
    """torch.func.functional_call with weight/bias and running stats given as column views of (C, 2) tensors:
    same y and gradients as torch's module, and the buffer views updated in place with torch's new stats."""
    C, shape = 5, (7, 5, 2)
    x, dy = random_input(shape, loc=0.5, scale=2.0)
    params = _stacked(torch.linspace(0.5, 1.5, C), torch.linspace(-0.5, 0.5, C))
    buffers = _stacked(torch.linspace(-1, 1, C), torch.linspace(0.5, 2, C))
    torch_bn, ours = make_pair(C)

    def run(module, dense):
        module.train(training)
        p, b = params.clone().requires_grad_(True), buffers.clone()
        x_leaf = x.clone().requires_grad_(True)
        tensors = [p[:, 0], p[:, 1], b[:, 0], b[:, 1]]
        if dense:  # copies; gradients still flow back to p
            tensors = [t.contiguous() for t in tensors]
        state = dict(zip(("weight", "bias", "running_mean", "running_var"), tensors, strict=True))
        y = torch.func.functional_call(module, state, (x_leaf,))
        y.backward(dy)
        return y.detach(), x_leaf.grad, p.grad, b if not dense else torch.stack(tensors[2:], 1)

    names = ("y", "dx", "d(weight, bias)", "running stats")
    for name, a, e in zip(names, run(ours, dense=False), run(torch_bn, dense=True), strict=True):
        torch.testing.assert_close(a, e, **F32, msg=lambda m, name=name: f"{name}: {m}")


# ---- 2. eps <= 0 --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, -1.0], ids=lambda e: f"eps={e:g}")
@TRAIN_EVAL
def test_non_positive_eps_module_like_torch(eps, training):
    """torch raises for eps <= 0 in training and eps < 0 in eval; bnfast must raise the same before touching
    the running stats. Eval with eps=0 is accepted: a zero running_var channel then divides by 0 (inf/nan)."""
    torch_bn, ours = make_pair(4, eps=eps)
    with torch.no_grad():
        torch_bn.running_var[0] = 0.0
    ours.load_state_dict(torch_bn.state_dict())
    torch_bn.train(training), ours.train(training)
    x, _ = random_input((6, 4))
    before = {name: getattr(ours, name).clone() for name in ("running_mean", "running_var", "num_batches_tracked")}
    raised = assert_same_outcome(lambda: torch_bn(x), lambda: ours(x), **F32)
    if raised:  # torch's module counts the batch before F.batch_norm raises; bnfast raises before any change
        for name, value in before.items():
            assert torch.equal(getattr(ours, name), value), f"{name} changed before the error"
    else:
        assert torch.equal(ours.num_batches_tracked, torch_bn.num_batches_tracked)


@pytest.mark.parametrize("eps", [0.0, -1.0], ids=lambda e: f"eps={e:g}")
@TRAIN_EVAL
def test_non_positive_eps_functional_like_torch(eps, training, kernel_path):
    C = 4
    x, _ = random_input((6, C, 2))
    stats = (torch.linspace(-1, 1, C, device=DEVICE), torch.linspace(0.0, 2, C, device=DEVICE))  # var 0 in channel 0
    theirs, ours = [s.clone() for s in stats], [s.clone() for s in stats]
    raised = assert_same_outcome(
        lambda: F.batch_norm(x, *theirs, training=training, eps=eps),
        lambda: bnfast.batch_norm(x, *ours, training=training, eps=eps),
        **F32,
    )
    for name, a, e, s in zip(("running_mean", "running_var"), ours, theirs, stats, strict=True):
        assert torch.equal(a, s if raised else e), f"{name}: {a} (torch: {e})"


# ---- 3. split-plan numerics ---------------------------------------------------------------------------------------

FLOOR32 = RTOL[torch.float32]  # ~8 float32 ulps: dbias = sum(dy) over M values in a float32 tree (tests/parity.py)


def _momentum1_step(batch_norm, x, dy, weight, bias, dtype):
    """One training step in `dtype` with momentum 1, so the running stats are the batch mean and unbiased
    variance themselves: (y, dx, dweight, dbias, running_mean, running_var)."""
    C = x.shape[1]
    rm, rv = torch.zeros(C, dtype=dtype, device=DEVICE), torch.ones(C, dtype=dtype, device=DEVICE)
    grads = step(
        lambda x, w, b: batch_norm(x, rm, rv, w, b, True, 1.0, 1e-5),
        x.to(dtype),
        dy.to(dtype),
        weight.to(dtype),
        bias.to(dtype),
    )
    return (*grads, rm, rv)


STEP_NAMES = ("y", "dx", "dweight", "dbias", "running_mean", "running_var")


def assert_as_accurate_as_torch(ours, theirs, ref, weight, dy, mean_rounding):
    """Each output's relative error against float64 (computed from the same float32 input) is at most 2x torch
    float32's own, plus FLOOR32, plus what a correctly rounded float32 mean costs: `mean_rounding` = half an ulp
    of |mean| over the std, times max|w| on y, max|w|*max|dy| on dx, max|dbias| on dweight, squared on the
    variance (torch's CPU kernel keeps double statistics on some paths, so 2x torch alone could be ~0 there)."""
    mr = mean_rounding
    floors = {
        "y": mr * weight.abs().max().item(),
        "dx": mr * weight.abs().max().item() * dy.abs().max().item(),
        "dweight": mr * ref[3].abs().max().item(),
    }
    failures = []
    for i, name in enumerate(STEP_NAMES):
        floor = FLOOR32 + floors.get(name, 0.0) / ref[i].abs().max().item() + (mr**2 if name == "running_var" else 0)
        mine, torch_err = rel_err(ours[i], ref[i]), rel_err(theirs[i], ref[i])
        if not mine <= 2 * torch_err + floor:
            failures.append(f"{name}: relative error {mine:.3g} > 2 * torch's {torch_err:.3g} + floor {floor:.3g}")
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("loc", [1e4, 1e5], ids=lambda v: f"mean={v:g}")
@pytest.mark.parametrize("shape", [(128, 4), (64, 2, 4)], ids=shape_id)
def test_large_mean_accuracy_per_plan(shape, loc, kernel_path):
    """float32, mean 1e4/1e5, std 1, against float64. The single-pass plan is as accurate as torch; the split
    plan's running_var was 6-85x further from float64 (its Chan merge of float32 tile means at |mean| >> std).
    At mean 1e6 the float32 mean's own rounding (mr**2 on the variance) dominates and hides the difference."""
    C = shape[1]
    x, dy = random_input(shape, loc=loc, scale=1.0)
    weight = torch.linspace(0.5, 1.5, C, device=DEVICE)
    bias = torch.linspace(-0.5, 0.5, C, device=DEVICE)
    ref = _momentum1_step(F.batch_norm, x, dy, weight, bias, torch.float64)
    theirs = _momentum1_step(F.batch_norm, x, dy, weight, bias, torch.float32)
    ours = _momentum1_step(bnfast.batch_norm, x, dy, weight, bias, torch.float32)
    assert_as_accurate_as_torch(ours, theirs, ref, weight, dy, mean_rounding=2.0**-24 * loc)


@pytest.mark.parametrize("shape", [(64, 3), (8, 3, 8)], ids=shape_id)
def test_huge_mean_stays_finite_like_torch(shape, kernel_path):
    """|mean| ~ 3e19, std 1e18: squares of the values overflow float32, squares of the deviations do not. torch
    float32 is finite everywhere; bnfast must be too (the split plan's first Chan merge made inf * 0 = NaN),
    and as accurate as in test_large_mean_accuracy_per_plan."""
    C = shape[1]
    x, dy = random_input(shape, scale=1e18)
    locs = torch.tensor([3e19, -3e19, 1e19], dtype=torch.float64, device=DEVICE).view(1, C, *[1] * (len(shape) - 2))
    x = (x.double() + locs).float()
    weight = torch.linspace(0.5, 1.5, C, device=DEVICE)
    bias = torch.linspace(-0.5, 0.5, C, device=DEVICE)
    ref = _momentum1_step(F.batch_norm, x, dy, weight, bias, torch.float64)
    theirs = _momentum1_step(F.batch_norm, x, dy, weight, bias, torch.float32)
    ours = _momentum1_step(bnfast.batch_norm, x, dy, weight, bias, torch.float32)
    for name, a, t in zip(STEP_NAMES, ours, theirs, strict=True):
        assert t.isfinite().all(), f"torch float32 {name} is not finite: the input is not the one intended"
        assert a.isfinite().all(), f"{name}: not finite where torch is: {a}"
    assert_as_accurate_as_torch(ours, theirs, ref, weight, dy, mean_rounding=2.0**-24 * 3e19 / 1e18)


# ---- 4. float64 activation parameters -----------------------------------------------------------------------------


@pytest.mark.parametrize("activation", [nn.LeakyReLU(0.2), nn.ELU(0.7)], ids=repr)
@TRAIN_EVAL
def test_float64_activation_parameter_is_not_rounded(activation, training):
    """A float64 module with LeakyReLU(0.2) / ELU(0.7): output and gradients within 1e-13 (normwise relative) of
    torch float64's BatchNorm1d -> activation; a slope rounded to float32 is off by ~1e-8."""
    torch_bn, ours = make_pair(5, dtype=torch.float64, activation=activation)
    torch_bn.train(training), ours.train(training)
    reference = nn.Sequential(torch_bn, copy.deepcopy(activation))
    x, dy = random_input((8, 5), torch.float64, scale=2.0)  # both sides of the kink
    expected = run_step(reference, x, dy, bn=torch_bn)
    actual = run_step(ours, x, dy)
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), actual, expected, strict=True):
        assert_rel_close(a, e, 1e-13, name)


# ---- 5. dtype mixing ----------------------------------------------------------------------------------------------

# (module dtype, input dtype) pairs torch's CPU BatchNorm rejects
MODULE_MIXES = [
    (torch.float32, torch.float64),
    (torch.float64, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]


@pytest.mark.parametrize("mix", MODULE_MIXES, ids=lambda m: f"module_{str(m[0])[6:]}-input_{str(m[1])[6:]}")
@TRAIN_EVAL
def test_module_dtype_mix_like_torch(mix, training):
    module_dtype, input_dtype = mix
    torch_bn, ours = make_pair(4, dtype=module_dtype)
    torch_bn.train(training), ours.train(training)
    x, _ = random_input((6, 4), input_dtype)
    before = {name: getattr(ours, name).clone() for name in ("running_mean", "running_var", "num_batches_tracked")}
    raised = assert_same_outcome(lambda: torch_bn(x), lambda: ours(x), **F32)
    for name, value in before.items():
        if raised:  # torch's module counts the batch before raising; bnfast raises before any change
            assert torch.equal(getattr(ours, name), value), f"{name} changed before the error"
        else:
            torch.testing.assert_close(getattr(ours, name), getattr(torch_bn, name), **F32)


# functional: which tensor is float64 while the input and everything else is float32
FUNCTIONAL_MIXES = ["running_stats", "weight", "bias"]


@pytest.mark.parametrize("mixed", FUNCTIONAL_MIXES, ids=lambda m: f"{m}_float64")
@TRAIN_EVAL
def test_functional_dtype_mix_like_torch(mixed, training):
    C = 4
    x, _ = random_input((6, C))
    stats_dtype = torch.float64 if mixed == "running_stats" else torch.float32
    stats = (torch.linspace(-1, 1, C, dtype=stats_dtype), torch.linspace(0.5, 2, C, dtype=stats_dtype))
    weight = torch.linspace(0.5, 1.5, C, dtype=torch.float64 if mixed == "weight" else torch.float32)
    bias = torch.linspace(-0.5, 0.5, C, dtype=torch.float64 if mixed == "bias" else torch.float32)
    weight, bias, stats = weight.to(DEVICE), bias.to(DEVICE), [s.to(DEVICE) for s in stats]
    theirs, ours = [s.clone() for s in stats], [s.clone() for s in stats]
    raised = assert_same_outcome(
        lambda: F.batch_norm(x, *theirs, weight, bias, training),
        lambda: bnfast.batch_norm(x, *ours, weight, bias, training),
        **F32,
    )
    for name, a, e, s in zip(("running_mean", "running_var"), ours, theirs, stats, strict=True):
        if raised:
            assert torch.equal(a, s), f"{name} changed before the error"
        else:
            torch.testing.assert_close(a, e, **F32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@TRAIN_EVAL
def test_amp_layout_still_matches_torch(dtype, training):
    """16-bit input with float32 parameters and buffers (what autocast produces) is accepted by torch: bnfast
    must keep computing it (tolerance rule of tests/parity.py)."""
    torch_bn, ours = make_pair(6, dtype=torch.float32)
    torch_bn.train(training), ours.train(training)
    x, dy = random_input((10, 6, 3), dtype, loc=1.0, scale=2.0)
    compare_step(torch_bn, ours, x, dy)


# ---- 6. functional eval without running stats ---------------------------------------------------------------------


def test_functional_eval_without_running_stats_raises_like_torch():
    x, _ = random_input((5, 3))
    assert assert_same_outcome(
        lambda: F.batch_norm(x, None, None, training=False), lambda: bnfast.batch_norm(x, None, None, training=False)
    )


# ---- 7. torch.func and batched gradients --------------------------------------------------------------------------

FUNC_MODES = {"eval": dict(), "train_no_running_stats": dict(track_running_stats=False)}


def _func_pair(mode):
    torch_bn, ours = make_pair(4, dtype=torch.float64, **FUNC_MODES[mode])
    torch_bn.train(mode != "eval"), ours.train(mode != "eval")
    return torch_bn, ours


@pytest.mark.parametrize("mode", FUNC_MODES)
def test_vmap_over_model(mode):
    """torch.func.vmap over a batch of (N, C) inputs: eval, and training without running stats (torch's BN
    supports both; training with running stats is rejected by torch itself)."""
    torch_bn, ours = _func_pair(mode)
    x, _ = random_input((3, 5, 4), torch.float64, loc=0.5, scale=2.0)
    torch.testing.assert_close(torch.func.vmap(ours)(x), torch.func.vmap(torch_bn)(x), **F64)


@pytest.mark.parametrize("mode", FUNC_MODES)
def test_func_grad_through_model(mode):
    torch_bn, ours = _func_pair(mode)
    x, v = random_input((5, 4), torch.float64, loc=0.5, scale=2.0)
    grads = [torch.func.grad(lambda x, m=m: (m(x) * v).sum())(x) for m in (ours, torch_bn)]
    torch.testing.assert_close(*grads, **F64)


@pytest.mark.parametrize("mode", FUNC_MODES)
def test_functional_call_grad_over_parameters(mode):
    torch_bn, ours = _func_pair(mode)
    x, v = random_input((5, 4, 2), torch.float64, loc=0.5, scale=2.0)
    params = {name: p.detach().clone() for name, p in torch_bn.named_parameters()}

    def loss(params, module):
        return (torch.func.functional_call(module, params, (x,)) * v).sum()

    mine, theirs = torch.func.grad(loss)(params, ours), torch.func.grad(loss)(params, torch_bn)
    torch.testing.assert_close(mine, theirs, **F64)


@TRAIN_EVAL
def test_is_grads_batched(training):
    torch_bn, ours = make_pair(4, dtype=torch.float64)
    torch_bn.train(training), ours.train(training)
    x, _ = random_input((5, 4), torch.float64, loc=0.5, scale=2.0)
    cotangents = torch.randn(3, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def batched_dx(module):
        x_leaf = x.clone().requires_grad_(True)
        return torch.autograd.grad(module(x_leaf), x_leaf, cotangents, is_grads_batched=True)[0]

    torch.testing.assert_close(batched_dx(ours), batched_dx(torch_bn), **F64)


def _gradcheck_inputs(shape):
    f64 = dict(dtype=torch.float64, device=DEVICE)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, generator=gen).to(DEVICE).requires_grad_(True)
    weight = torch.rand(shape[1], dtype=torch.float64, generator=gen).add(0.5).to(DEVICE).requires_grad_(True)
    bias = torch.randn(shape[1], dtype=torch.float64, generator=gen).to(DEVICE).requires_grad_(True)
    stats = torch.linspace(-1, 1, shape[1], **f64), torch.linspace(0.5, 2, shape[1], **f64)
    return (x, weight, bias), stats


def _bn_fn(batch_norm, stats, training, activation=None):
    act = bnfast.resolve_activation(activation)

    def fn(x, weight, bias):  # fresh running-stat copies: the checks call fn many times
        rm, rv = (s.clone() for s in stats)
        if batch_norm is F.batch_norm:
            return act.apply(F.batch_norm(x, rm, rv, weight, bias, training))
        return bnfast.batch_norm(x, rm, rv, weight, bias, training, activation=activation)

    return fn


@TRAIN_EVAL
def test_gradcheck_batched_grad(training):
    inputs, stats = _gradcheck_inputs((4, 3))
    check = dict(check_batched_grad=True, fast_mode=True)  # fast mode: every evaluation is interpreted kernels
    assert torch.autograd.gradcheck(_bn_fn(F.batch_norm, stats, training), inputs, **check)
    assert torch.autograd.gradcheck(_bn_fn(bnfast.batch_norm, stats, training), inputs, **check)


# ---- 8. torch.fx and TorchScript ----------------------------------------------------------------------------------


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), FusedBatchNorm1d(4, activation="relu"), nn.Linear(4, 2)).to(DEVICE)


@TRAIN_EVAL
def test_fx_symbolic_trace(training):
    """symbolic_trace works (torch's BatchNorm1d model traces) and the traced module computes what the model
    does in the mode it was traced in, running-stat updates included."""
    model = _mlp().train(training)
    reference = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(model)
    x, _ = random_input((6, 3))
    torch.testing.assert_close(traced(x), reference(x), **F32)
    for (name, a), b in zip(traced.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, **F32, msg=lambda m, name=name: f"{name}: {m}")


def _names_bnfast(error):
    """The error is bnfast's own, clear one: its first line names bnfast (not a file path deep in a traceback
    of TorchScript's or Triton's internals)."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return "bnfast" in first_line and not type(error).__module__.startswith("triton")


def test_jit_script_works_or_names_bnfast():
    module = FusedBatchNorm1d(4).to(DEVICE).eval()
    try:
        scripted = torch.jit.script(module)
    except Exception as error:  # noqa: BLE001
        assert _names_bnfast(error), f"unclear error: {type(error).__module__}.{type(error).__name__}: {error}"
        return
    x, _ = random_input((5, 4))
    torch.testing.assert_close(scripted(x), module(x), **F32)


def test_jit_trace_eval_model_works_or_names_bnfast():
    model = _mlp().eval()
    x, _ = random_input((6, 3))
    try:
        traced = torch.jit.trace(model, (x,))
    except Exception as error:  # noqa: BLE001
        assert _names_bnfast(error), f"unclear error: {type(error).__module__}.{type(error).__name__}: {error}"
        return
    other, _ = random_input((6, 3), seed=1)
    torch.testing.assert_close(traced(other), model(other), **F32)


# ---- 9. convert keeps hooks and attributes ------------------------------------------------------------------------


def _hooked_model(log):
    """Linear -> BatchNorm1d -> ReLU -> Linear with hooks on the BN (one of which changes its output) and a tag."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).to(DEVICE)
    bn = model[1]
    bn.register_forward_pre_hook(lambda module, args: log.append(("bn pre", args[0].detach().clone())))
    bn.register_forward_hook(lambda module, args, out: log.append(("bn out", out.detach().clone())) or out * 2)
    bn.my_tag = 3
    return model


@TRAIN_EVAL
def test_convert_keeps_hooks_and_attributes(training):
    """Hooks on a converted BatchNorm1d still fire, see the same tensors and keep their effect; custom attributes
    survive. (A BN forward hook sees the BN output: fusing the following ReLU into it would change that.)"""
    log_ref, log = [], []
    reference, model = _hooked_model(log_ref).train(training), _hooked_model(log).train(training)
    bnfast.convert(model)
    x, _ = random_input((6, 3))
    expected, actual = reference(x), model(x)
    assert [name for name, _ in log] == [name for name, _ in log_ref], "hooks fired differently"
    for (name, seen), (_, seen_ref) in zip(log, log_ref, strict=True):
        torch.testing.assert_close(seen, seen_ref, **F32, msg=lambda m, name=name: f"{name} hook saw: {m}")
    torch.testing.assert_close(actual, expected, **F32)
    assert getattr(model[1], "my_tag", None) == 3


def test_convert_does_not_fuse_an_activation_with_hooks():
    log = []
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).to(DEVICE)
    model[2].register_forward_hook(lambda module, args, out: log.append(out.detach().clone()))
    reference = copy.deepcopy(model)
    bnfast.convert(model)
    x, _ = random_input((6, 3))
    expected = reference(x)
    seen_ref = log.pop()
    actual = model(x)
    assert len(log) == 1, "the ReLU's forward hook no longer fires after convert"
    torch.testing.assert_close(log[0], seen_ref, **F32)
    torch.testing.assert_close(actual, expected, **F32)


# ---- 10. other converters -----------------------------------------------------------------------------------------


def test_convert_sync_batchnorm_keeps_the_activation():
    """convert_sync_batchnorm on a model holding FusedBatchNorm1d(activation="relu") either raises or yields a
    model that still computes relu(BN(x)) (checked in eval: SyncBatchNorm's CPU forward needs no process group)."""
    model = nn.Sequential(FusedBatchNorm1d(4, activation="relu")).to(DEVICE).eval()
    with torch.no_grad():
        model[0].running_mean.uniform_(-1, 1)
        model[0].running_var.uniform_(0.5, 2)
    x, _ = random_input((6, 4), scale=2.0)
    expected = model(x)
    try:
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    except Exception:  # noqa: BLE001 - refusing is a correct answer
        return
    torch.testing.assert_close(converted.eval()(x), expected, **F32)


def test_fuse_linear_bn_eval_keeps_the_activation():
    """fuse_linear_bn_eval folds a BN into the Linear and drops the module: with a fused activation it must
    raise, or (impossible for an affine Linear) still compute the activation."""
    torch.manual_seed(0)
    linear = nn.Linear(3, 4).to(DEVICE).eval()
    bn = FusedBatchNorm1d(4, activation="relu").to(DEVICE).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x, _ = random_input((6, 3), scale=2.0)
    expected = bn(linear(x))
    try:
        fused = torch.nn.utils.fusion.fuse_linear_bn_eval(linear, bn)
    except Exception:  # noqa: BLE001
        return
    torch.testing.assert_close(fused(x), expected, **F32)


def test_plain_fused_bn_still_converts():
    """activation=None is a plain BN: both converters keep working on it and give the same numbers."""
    torch.manual_seed(0)
    linear = nn.Linear(3, 4).to(DEVICE).eval()
    model = nn.Sequential(FusedBatchNorm1d(4)).to(DEVICE).eval()
    with torch.no_grad():
        model[0].running_mean.uniform_(-1, 1)
        model[0].running_var.uniform_(0.5, 2)
    x, _ = random_input((6, 3), scale=2.0)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    torch.testing.assert_close(converted(linear(x)), model(linear(x)), **F32)
    fused = torch.nn.utils.fusion.fuse_linear_bn_eval(linear, model[0])
    torch.testing.assert_close(fused(x), model(linear(x)), **F32)


# ---- 11. double backward ------------------------------------------------------------------------------------------


def _second_order(fn, inputs, cotangent, direction):
    """d/d(x, weight, bias, dy) of <direction, (dx, dweight, dbias)>: one double-backward, as torch's
    gradgradcheck uses it."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (*inputs, cotangent)]
    first = torch.autograd.grad(fn(*leaves[:3]), leaves[:3], leaves[3], create_graph=True)
    inner = sum((g * d).sum() for g, d in zip(first, direction, strict=True))
    return torch.autograd.grad(inner, leaves, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize(
    "activation,shape",
    [(None, (3, 2, 3)), ("silu", (4, 3)), ("tanh", (3, 2, 3))],
    ids=lambda v: shape_id(v) if isinstance(v, tuple) else str(v),
)
@TRAIN_EVAL
def test_double_backward(activation, shape, training, kernel_path):
    """Second derivatives equal torch's (BatchNorm -> activation, float64), then gradgradcheck (fast mode: the
    interpreter makes every evaluation cost milliseconds)."""
    inputs, stats = _gradcheck_inputs(shape)
    gen = torch.Generator().manual_seed(2)
    cotangent = torch.randn(shape, dtype=torch.float64, generator=gen).to(DEVICE)
    direction = [torch.randn(t.shape, dtype=torch.float64, generator=gen).to(DEVICE) for t in inputs]
    ours = _bn_fn(bnfast.batch_norm, stats, training, activation)
    expected = _second_order(_bn_fn(F.batch_norm, stats, training, activation), inputs, cotangent, direction)
    actual = _second_order(ours, inputs, cotangent, direction)
    for name, a, e in zip(("x", "weight", "bias", "dy"), actual, expected, strict=True):
        torch.testing.assert_close(a, e, **F64, msg=lambda m, name=name: f"d2/d{name}: {m}")
    assert torch.autograd.gradgradcheck(ours, inputs, fast_mode=True)
