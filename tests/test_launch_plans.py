"""Launch plans (kernels/launch.py "launch plans"): the second call of a signature replays the first one's launches
with its own tensors. A replay gives the stages' very bits, every component of the signature misses the plan when
it changes, and what cannot be replayed (aliased tensors, masks, the split plan's workspace) is not planned.

Each case compares, bit for bit (values and strides), the stages run with plans off against a capture and a
replay with plans on, on fresh copies of the running stats.
"""

import inspect

import pytest
import torch

import bnfast
from bnfast.kernels import launch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _plans_on():
    previous = launch.LAUNCH_PLANS
    launch.LAUNCH_PLANS = True
    launch._PLANS.clear()
    yield
    launch.LAUNCH_PLANS = previous
    launch._PLANS.clear()


def _vec(C, dtype=torch.float32, stride=1, fill=None):
    t = torch.randn(C * stride, dtype=dtype, device=DEVICE)[::stride]
    return t.uniform_(0.5, 1.5) if fill == "var" else t


def _copy(t):
    """A copy with t's strides (clone makes a strided vector contiguous)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


def _call(kind: str, args: dict):
    """bn_fwd or bn_bwd on copies of the mutable inputs (running stats): (outputs, mutated inputs)."""
    args = {k: (_copy(v) if k in ("running_mean", "running_var") and v is not None else v) for k, v in args.items()}
    fn = launch.bn_fwd if kind == "fwd" else launch.bn_bwd
    out = fn(**args)
    return out, (args.get("running_mean"), args.get("running_var"))


def _same(a, b, what):
    assert (a is None) == (b is None), what
    if a is None:
        return
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), (what, a.stride(), b.stride())
    assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num()), what


def _replayed_equals_stages(kind: str, args: dict, planned: bool = True):
    """Plans off, then on twice (capture, replay): the same bits each time; whether a plan was stored (`planned`:
    None when either is right)."""
    launch.LAUNCH_PLANS = False
    ref = _call(kind, args)
    launch.LAUNCH_PLANS = True
    before = len(launch._PLANS)
    first = _call(kind, args)
    stored = len(launch._PLANS) - before
    second = _call(kind, args)
    assert len(launch._PLANS) - before == stored  # the second call found the first's plan (or none again)
    for got in (first, second):
        for i, (a, b) in enumerate(zip((*ref[0], *ref[1]), (*got[0], *got[1]), strict=True)):
            _same(a, b, (kind, i))
    assert planned is None or stored == int(planned), (kind, stored)
    return stored


def _fwd_args(shape=(8, 6), dtype=torch.float32, layout="contiguous", training=True, **over):
    C = shape[1]
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "transposed":  # (N, C) whose N axis is the contiguous one
        x = x.t().contiguous().t()
    vec = torch.float64 if dtype == torch.float64 else torch.float32
    args = dict(
        x=x,
        weight=_vec(C, vec),
        bias=_vec(C, vec),
        running_mean=_vec(C, vec),
        running_var=_vec(C, vec, fill="var"),
        num_batches_tracked=None,
        training=training,
        momentum=0.1,
        cumulative=False,
        eps=1e-5,
        activation="relu",
        act_param=0.0,
    )
    args.update(over)
    return args


def _bwd_args(fwd: dict, **over):
    x = fwd["x"]
    y, mean, rstd = launch.bn_fwd(**fwd)
    training = fwd["training"]
    args = dict(
        dy=torch.randn_like(y),
        x=x,
        weight=fwd["weight"],
        bias=fwd["bias"],
        mean=mean if training else fwd["running_mean"],
        stat=rstd if training else fwd["running_var"],
        training=training,
        eps=fwd["eps"],
        activation=fwd["activation"],
        act_param=fwd["act_param"],
        residual=fwd.get("residual"),
        needs_dr=fwd.get("residual") is not None and bool(fwd["activation"]),
        chunk=fwd.get("chunk"),
    )
    args.update(over)
    return args


def test_the_signature_lists_every_argument():
    """bn_fwd / bn_bwd take exactly the stages' arguments, and their plan keys hold every one of them: a new
    argument must enter the key (kernels/launch.py) before it is added here."""
    fwd = (
        "x weight bias running_mean running_var num_batches_tracked training momentum cumulative eps activation "
        "act_param running_out residual mask pad_value chunk"
    ).split()
    bwd = (
        "dy x weight bias mean stat training eps activation act_param needs_dx needs_dw needs_db residual needs_dr "
        "mask pad_value chunk"
    ).split()
    for public, stages, names in ((launch.bn_fwd, launch._bn_fwd, fwd), (launch.bn_bwd, launch._bn_bwd, bwd)):
        assert list(inspect.signature(public).parameters) == names
        assert inspect.signature(public).parameters == inspect.signature(stages).parameters
        source = inspect.getsource(public)
        key = source[source.index("key = (") : source.index("PLAN_OVERRIDE,")]
        for name in names:
            if name not in ("mask", "pad_value"):  # calls with either are never planned
                assert name in key, name


CASES = {
    "2d": {},
    "3d-eval": dict(shape=(4, 6, 5), training=False),
    "channels_last": dict(shape=(2, 5, 3, 4), layout="channels_last"),
    "transposed": dict(layout="transposed"),
    "bf16": dict(dtype=torch.bfloat16),
    "float64-gelu": dict(dtype=torch.float64, activation="gelu"),
    "no-affine-leaky": dict(weight=None, bias=None, activation="leaky_relu", act_param=0.2),
    "no-running-stats": dict(running_mean=None, running_var=None),
    "ghost": dict(shape=(12, 6), chunk=4),
    "ghost-eval": dict(shape=(12, 6), chunk=4, training=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_replay_gives_the_stages_bits(case):
    over = dict(CASES[case])
    fwd = _fwd_args(**over)
    planned = None if case == "ghost" else True  # ghost training: its running-stats stage's workspace, not planned
    _replayed_equals_stages("fwd", fwd, planned)
    _replayed_equals_stages("bwd", _bwd_args(fwd), planned)


def test_cumulative_and_residual():
    x = torch.randn(8, 6, device=DEVICE)
    nbt = torch.tensor(3, device=DEVICE)
    fwd = _fwd_args(x=x, momentum=0.0, cumulative=True, num_batches_tracked=nbt, residual=torch.randn_like(x))
    _replayed_equals_stages("fwd", fwd)
    _replayed_equals_stages("bwd", _bwd_args(fwd))


@pytest.mark.parametrize("plan", ["single", "split"])
def test_both_launch_plans(plan):
    """The split plan's workspace is made inside the stages: such calls run the stages every time (not planned),
    the single plan is planned."""
    with bnfast.testing.force_plan(plan, tile_elements=16 if plan == "split" else None):
        fwd = _fwd_args(shape=(16, 4))
        _replayed_equals_stages("fwd", fwd, planned=plan == "single")
        _replayed_equals_stages("bwd", _bwd_args(fwd), planned=plan == "single")


def _changes(C=6):
    """(name, kind, base overrides, changed overrides): one signature component changed at a time."""
    x = torch.randn(8, C, device=DEVICE)
    return [
        ("strides, same shape", "fwd", dict(x=x), dict(x=x.t().contiguous().t())),
        ("dtype", "fwd", dict(x=x), dict(x=x.to(torch.bfloat16))),
        ("training", "fwd", dict(x=x), dict(x=x, training=False)),
        ("activation", "fwd", dict(x=x), dict(x=x, activation="silu")),
        ("act_param", "fwd", dict(x=x, activation="leaky_relu"), dict(x=x, activation="leaky_relu", act_param=0.3)),
        (
            "act_param's sign",
            "fwd",
            dict(x=-x.abs(), activation="leaky_relu", act_param=0.0),
            dict(x=-x.abs(), activation="leaky_relu", act_param=-0.0),
        ),
        ("eps", "fwd", dict(x=x), dict(x=x, eps=1e-3)),
        ("momentum", "fwd", dict(x=x), dict(x=x, momentum=0.5)),
        ("weight None", "fwd", dict(x=x), dict(x=x, weight=None)),
        ("weight stride", "fwd", dict(x=x), dict(x=x, weight=_vec(C, stride=2))),
        ("weight dtype", "fwd", dict(x=x.half()), dict(x=x.half(), weight=_vec(C, torch.float16))),
        ("running stats' stride", "fwd", dict(x=x), dict(x=x, running_mean=_vec(C, stride=3))),
        ("residual", "fwd", dict(x=x), dict(x=x, residual=torch.randn_like(x))),
        ("residual strides", "fwd", dict(x=x, residual=x.clone()), dict(x=x, residual=x.t().contiguous().t())),
        ("dy strides", "bwd", dict(x=x), dict(x=x, dy=torch.randn(C, 8, device=DEVICE).t())),
        ("needs_dx", "bwd", dict(x=x), dict(x=x, needs_dx=False)),
        ("needs_dw", "bwd", dict(x=x), dict(x=x, needs_dw=False)),
        ("eval backward", "bwd", dict(x=x), dict(x=x, training=False)),
        ("ghost chunk (eval)", "fwd", dict(x=x, training=False), dict(x=x, training=False, chunk=4)),
    ]


@pytest.mark.parametrize("change", range(len(_changes())), ids=[c[0] for c in _changes()])
def test_a_changed_component_misses_the_plan(change):
    _, kind, base, changed = _changes()[change]
    for over in (base, changed):
        if kind == "fwd":
            args = _fwd_args(**over)
        else:
            fwd_over = {k: v for k, v in over.items() if k in ("x", "training")}
            args = _bwd_args(_fwd_args(**fwd_over), **{k: v for k, v in over.items() if k not in fwd_over})
        _replayed_equals_stages(kind, args)
    assert sum(key[0] == kind for key in launch._PLANS) == 2  # the change missed the first plan: a second one


def test_the_plan_key_holds_the_plan_override():
    fwd = _fwd_args(shape=(16, 4))
    _replayed_equals_stages("fwd", fwd)
    with bnfast.testing.force_plan("single"):
        _replayed_equals_stages("fwd", fwd)  # same plan chosen, but another key
    assert len(launch._PLANS) == 2


def test_aliased_tensors_and_masks_are_not_planned():
    w = _vec(6)
    _replayed_equals_stages("fwd", _fwd_args(weight=w, bias=w), planned=False)  # which pointer is which: ambiguous
    x = torch.randn(8, 6, device=DEVICE)
    mask = torch.rand(8, device=DEVICE) > 0.3
    mask[:2] = True
    launch.LAUNCH_PLANS = True
    for _ in range(2):
        launch.bn_fwd(**_fwd_args(x=x, mask=mask, pad_value=0.0))
    assert not launch._PLANS


def test_the_module_with_changing_requires_grad():
    """FusedBatchNorm1d forward+backward, x / weight requires_grad switched between calls (the backward's
    needs_* are in its key): the same gradients as with plans off, every time."""
    torch.manual_seed(0)
    x0, dy = torch.randn(8, 6, device=DEVICE), torch.randn(8, 6, device=DEVICE)
    results = {}
    for plans in (False, True):
        launch.LAUNCH_PLANS = plans
        torch.manual_seed(1)
        m = bnfast.FusedBatchNorm1d(6, activation="relu", device=DEVICE)
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
        out = []
        for x_grad, w_grad in ((True, True), (False, True), (True, False), (True, True), (True, True)):
            m.weight.requires_grad_(w_grad)
            m.weight.grad = None
            x = x0.clone().requires_grad_(x_grad)
            y = m(x)
            y.backward(dy)
            out.append((y.detach(), x.grad, m.weight.grad, m.bias.grad.clone(), m.running_mean.clone()))
        results[plans] = out
    for a_step, b_step in zip(results[False], results[True], strict=True):
        for a, b in zip(a_step, b_step, strict=True):
            _same(a, b, "module")


def test_a_parametrized_weight_is_read_through_its_parametrization():
    """The module reads its parameters from _parameters directly only when nothing shadows them: a
    parametrization's property does, and the layer then normalises with the parametrized weight, as torch's."""
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    x = torch.randn(8, 6, device=DEVICE)
    ours = bnfast.FusedBatchNorm1d(6, device=DEVICE)
    theirs = torch.nn.BatchNorm1d(6, device=DEVICE)
    for m in (ours, theirs):
        with torch.no_grad():
            m.bias.fill_(0.5)
        parametrize.register_parametrization(m, "weight", Double())
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
