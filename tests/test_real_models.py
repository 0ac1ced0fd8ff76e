"""Real models from torchvision and timm (random weights, tiny inputs, reduced depth) converted by bnfast, against
the unconverted model: kernels run in every BatchNorm, what is fused, train forward, every gradient, running
stats, eval, channels_last, state_dict both ways, the SyncBatchNorm converters (bnfast's and torch's), fold, and
frozen BatchNorm.

Tolerance (`assert_near`): for each compared tensor, the float64 model (the unconverted model in double) is the
truth, and bnfast may be at most `K` times as far from it as torch's own float32 model is, plus a floor of
`FLOOR` x the tensor's magnitude (float32 rounding of that magnitude, a few ulps):
    max|bnfast32 - torch64| <= K * max|torch32 - torch64| + FLOOR * max|torch64|
A deep network amplifies every rounding; two correct float32 algorithms (bnfast reduces in another order) land
within a small multiple of each other's error, while a wrong formula is off by O(1).

timm and torchvision are test extras (pyproject.toml, optional-dependencies "test"); each model skips cleanly
without its library.
"""

import contextlib
import copy
import warnings

import pytest
import torch
from parity import DEVICE
from torch import nn

import bnfast
from bnfast.modules import FusedBatchNormBase, FusedFrozenBatchNorm2d

K, FLOOR = 4.0, 2e-6
BN_TYPES = (nn.modules.batchnorm._BatchNorm, FusedFrozenBatchNorm2d)


# Training needs more than 2 values per channel in the last stage: with M = 2, BatchNorm's input gradient is 0 in
# exact arithmetic (xhat = +-1 spans the space it projects out), so every float32 gradient through it is rounding
# noise. ResNet-18 drops the stem's max-pool (as CIFAR ResNets do: the last stage is 2x2 at 32x32), the timm
# models take 64x64 inputs (stride 32).
def resnet18():
    model = pytest.importorskip("torchvision").models.resnet18(weights=None, num_classes=10)
    model.maxpool = nn.Identity()
    return model


def bottleneck_resnet():
    """ResNet-50's torchvision Bottleneck blocks (1x1 -> 3x3 -> 1x1, expansion 4), narrow and two deep: one with the
    identity shortcut, one with a strided downsample (ResNet-50 itself is too slow for the interpreter)."""
    resnet = pytest.importorskip("torchvision").models.resnet
    downsample = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        resnet.Bottleneck(16, 4),
        resnet.Bottleneck(16, 8, stride=2, downsample=downsample),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def timm_model(name):
    return lambda: pytest.importorskip("timm").create_model(name, pretrained=False, num_classes=10)


MODELS = {  # name: (builder, input shape)
    "resnet18": (resnet18, (2, 3, 32, 32)),
    "bottleneck": (bottleneck_resnet, (2, 3, 8, 8)),
    "efficientnet": (timm_model("test_efficientnet"), (2, 3, 64, 64)),
    "mobilenetv3": (timm_model("mobilenetv3_small_050"), (2, 3, 64, 64)),
    "regnet": (timm_model("regnetx_002"), (2, 3, 64, 64)),
    "byobnet": (timm_model("test_byobnet"), (2, 3, 64, 64)),
}
SHAPE = (2, 3, 32, 32)


def randomized(model):
    """Random BatchNorm affine parameters and running stats, so that eval is no near-identity map."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BN_TYPES):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    return model


def assert_near(ours, theirs, ref64, name):
    torch_err = (theirs.double() - ref64).abs().max().item()
    atol = K * torch_err + FLOOR * ref64.abs().max().item()
    torch.testing.assert_close(
        ours.double(),
        ref64,
        rtol=0,
        atol=atol,
        msg=lambda m: f"{name} (torch float32's own error {torch_err:.3g}): {m}",
    )


@contextlib.contextmanager
def kernel_launches_per_module(model):
    """{module path: number of bnfast kernel launches during its forward} for every bnfast BatchNorm in `model`
    (kernels wrapped to count, still run)."""
    from bnfast.kernels import batch_norm as kernels

    log, counts, handles = [], {}, []
    names = [n for n in vars(kernels) if n.startswith("_bn_") and n.endswith("_kernel")]
    saved = {n: getattr(kernels, n) for n in names}

    class Counting:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]
            return lambda *args, **kwargs: (log.append(1), launch(*args, **kwargs))[1]

    for path, m in model.named_modules():
        if isinstance(m, (FusedBatchNormBase, FusedFrozenBatchNorm2d)):
            assert bnfast.uses_triton(m.running_mean)
            handles.append(m.register_forward_pre_hook(lambda m, a, path=path: counts.__setitem__(path, -len(log))))
            handles.append(
                m.register_forward_hook(lambda m, a, y, path=path: counts.__setitem__(path, counts[path] + len(log)))
            )
    try:
        for n in names:
            setattr(kernels, n, Counting(saved[n]))
        yield counts
    finally:
        for n, v in saved.items():
            setattr(kernels, n, v)
        for h in handles:
            h.remove()


def bnfast_bns(model):
    return {p: m for p, m in model.named_modules() if isinstance(m, (FusedBatchNormBase, FusedFrozenBatchNorm2d))}


def step(model, x, cotangent):
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(cotangent)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), grads, {n: b.clone() for n, b in model.named_buffers()}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    """(name, original float32 model, its float64 copy, the model converted with tracing, input, cotangent)."""
    build, shape = MODELS[request.param]
    original = randomized(build()).to(DEVICE)
    ref64 = copy.deepcopy(original).double()
    converted = bnfast.convert(copy.deepcopy(original), trace=True)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    cotangent = torch.randn(2, 10, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():  # the eval outputs every test compares with
        EVAL[request.param] = (original.eval()(x), ref64.eval()(x.double()))
    return request.param, original, ref64, converted, x, cotangent


EVAL = {}  # name: (torch float32 eval output, float64 eval output), set by the fixture


def test_traced_and_kernels_run_in_every_batch_norm(case):
    name, original, _, converted, x, _ = case
    report = converted.bnfast_report
    converted = copy.deepcopy(converted)  # training forwards update the running stats
    assert report.traced and isinstance(converted, torch.fx.GraphModule), report
    left = [
        type(m).__name__
        for m in converted.modules()
        if isinstance(m, BN_TYPES) and m not in bnfast_bns(converted).values()
    ]
    assert left == [], left  # every BatchNorm of the model, MobileNetV3's Hardswish ones included
    for training in (True, False):
        converted.train(training)
        with kernel_launches_per_module(converted) as launches, torch.no_grad():
            converted(x)
        assert set(launches) == set(bnfast_bns(converted)), "a BatchNorm did not run"
        assert all(n >= 1 for n in launches.values()), {p: n for p, n in launches.items() if n < 1}


def test_what_is_fused(case):
    name, original, _, converted, _, _ = case
    report = converted.bnfast_report
    bns = bnfast_bns(converted)
    residual_calls = {n.target for n in converted.graph.nodes if n.op == "call_module" and len(n.args) == 2}
    if name == "resnet18":  # every BN + ReLU (stem, bn1 of 8 blocks) and BN + add + ReLU (bn2 of 8 blocks)
        assert (len(report.pairs), len(report.triples), len(report.adds)) == (9, 8, 0)
        assert residual_calls == {f"layer{i}.{j}.bn2" for i in range(1, 5) for j in range(2)}
        unfused = sorted(p for p, m in bns.items() if not m.activation)
        assert unfused == [f"layer{i}.0.downsample.1" for i in range(2, 5)]  # followed by the add of the block
    if name == "bottleneck":  # the stem's pair (in a Sequential, confirmed by the trace), bn1 and bn2 + ReLU, bn3 +
        # add + ReLU
        assert (len(report.pairs), len(report.triples), len(report.adds)) == (5, 2, 0)
        assert residual_calls == {"3.bn3", "4.bn3"}
        assert sorted(p for p, m in bns.items() if not m.activation) == ["4.downsample.1"]
    if name in ("efficientnet", "regnet", "byobnet", "mobilenetv3"):
        # every timm norm-act layer with a fusable act converts to a bnfast module with that activation
        for path, m in original.named_modules():
            act = type(getattr(m, "act", None)).__name__
            if isinstance(m, BN_TYPES) and act in ("SiLU", "ReLU", "Hardswish"):
                assert bns[path].activation.name == act.lower(), path
    for path in residual_calls:
        assert path in report.triples + report.adds
    assert report.with_activation == sum(bool(m.activation) for m in bns.values())
    assert str(report).startswith("bnfast.fuse: ")


def test_train_forward_gradients_running_stats_then_eval(case):
    name, original, ref64, converted, x, cotangent = case
    model32, model64, ours = (copy.deepcopy(m).train() for m in (original, ref64, converted))
    y32, g32, b32 = step(model32, x, cotangent)
    y64, g64, b64 = step(model64, x.double(), cotangent.double())
    y, g, b = step(ours, x, cotangent)
    assert_near(y, y32, y64, "train output")
    assert g.keys() == g32.keys() and b.keys() == b32.keys()
    for key in g32:
        assert_near(g[key], g32[key], g64[key], f"grad {key}")
    for key in b32:
        if key.endswith("num_batches_tracked"):
            assert torch.equal(b[key], b32[key]), key
        else:
            assert_near(b[key], b32[key], b64[key], key)
    with torch.no_grad():
        model32.eval(), model64.eval(), ours.eval()
        assert_near(ours(x), model32(x), model64(x.double()), "eval output after a step")


def test_eval_channels_last(case):
    name, original, ref64, converted, x, _ = case
    ours = copy.deepcopy(converted).eval().to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = ours(x_cl)
        assert_near(y, *EVAL[name], "eval, channels_last")


def test_state_dict_both_ways(case):
    name, original, _, converted, x, _ = case
    assert sorted(converted.state_dict()) == sorted(original.state_dict())  # a GraphModule: in the order of use
    theirs, ours = copy.deepcopy(original), copy.deepcopy(converted)
    with torch.no_grad():
        for t in theirs.state_dict().values():
            t.copy_(t * 0.5 + 0.25 if t.is_floating_point() else t + 3)
    ours.load_state_dict(theirs.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs.state_dict()[key]), key
    again = copy.deepcopy(original)
    again.load_state_dict(converted.state_dict())
    for key, value in again.state_dict().items():
        assert torch.equal(value, converted.state_dict()[key]), key


@pytest.mark.parametrize("converter", ["bnfast", "torch"])
@pytest.mark.parametrize("fused", [False, True], ids=["original", "converted"])
def test_sync_batch_norm_converters_keep_the_function(case, converter, fused):
    """Eval (SyncBatchNorm is the plain module without a process group): the logits stay. A BatchNorm subclass a
    converter does not know (timm's BatchNormAct2d under torch's converter) is left as it is, with a warning."""
    name, original, ref64, converted, x, _ = case
    convert = {
        "bnfast": bnfast.FusedSyncBatchNorm.convert_sync_batchnorm,
        "torch": nn.SyncBatchNorm.convert_sync_batchnorm,
    }[converter]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "bnfast: .*convert_sync_batchnorm leaves")
        synced = convert(copy.deepcopy(converted if fused else original)).eval()
    if fused or converter == "bnfast":  # bnfast's modules and timm's norm-act layers become FusedSyncBatchNorm
        assert any(type(m) is bnfast.FusedSyncBatchNorm for m in synced.modules())
    with torch.no_grad():
        assert_near(synced(x), *EVAL[name], f"{converter} SyncBatchNorm converter")


def test_fold(case):
    name, original, ref64, converted, x, _ = case
    with torch.no_grad():
        expected, exact = EVAL[name]
        for model in (original, converted):
            folded = bnfast.fold(model.eval())
            left = {p for p, m in folded.named_modules() if isinstance(m, BN_TYPES)}
            if name in ("resnet18", "bottleneck"):  # every Conv -> BN pair folds, except a BN that adds the residual
                with_residual = {
                    n.target
                    for n in getattr(model, "graph", torch.fx.Graph()).nodes
                    if len(n.args) == 2 and n.op == "call_module"
                }
                assert left == with_residual
            assert_near(folded(x), expected, exact, f"fold({type(model).__name__})")


def test_frozen_batch_norm_resnet():
    """torchvision's detection backbones: FrozenBatchNorm2d, fused by tracing like BatchNorm, in train() too."""
    tv = pytest.importorskip("torchvision")
    original = randomized(tv.models.resnet18(weights=None, num_classes=10, norm_layer=tv.ops.FrozenBatchNorm2d))
    original = original.to(DEVICE)
    ref64 = copy.deepcopy(original).double()
    converted = bnfast.convert(copy.deepcopy(original), trace=True)
    frozen = bnfast_bns(converted)
    assert len(frozen) == 20 and all(type(m) is FusedFrozenBatchNorm2d for m in frozen.values())
    report = converted.bnfast_report
    assert (len(report.pairs), len(report.triples)) == (9, 8)
    assert list(converted.state_dict()) == list(original.state_dict())
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    cotangent = torch.randn(2, 10, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with kernel_launches_per_module(converted) as launches:
        y, g, b = step(converted.train(), x, cotangent)
    assert set(launches) == set(frozen) and all(n >= 1 for n in launches.values())
    y32, g32, b32 = step(original.train(), x, cotangent)
    y64, g64, _ = step(ref64.train(), x.double(), cotangent.double())
    assert_near(y, y32, y64, "frozen output")
    for key in g32:
        assert_near(g[key], g32[key], g64[key], f"grad {key}")
    assert all(torch.equal(b[k], b32[k]) for k in b32)  # frozen: nothing changes


def test_timm_frozen_norm_act():
    """timm.layers.freeze_batch_norm_2d turns BatchNormAct2d into FrozenBatchNormAct2d: converted, act fused."""
    timm = pytest.importorskip("timm")
    original = timm.layers.freeze_batch_norm_2d(randomized(timm_model("test_efficientnet")())).to(DEVICE).eval()
    ref64 = copy.deepcopy(original).double()
    kinds = {type(m).__name__ for m in original.modules()}
    assert "FrozenBatchNormAct2d" in kinds
    converted = bnfast.convert(copy.deepcopy(original))
    frozen = bnfast_bns(converted)
    assert frozen and all(type(m) is FusedFrozenBatchNorm2d for m in frozen.values())
    assert any(m.activation.name == "silu" for m in frozen.values())
    assert list(converted.state_dict()) == list(original.state_dict())
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        assert_near(converted(x), original(x), ref64(x.double()), "timm frozen eval")


@pytest.mark.parametrize("name", ["bottleneck", "resnet18"])
def test_ghost_batch_norm_on_a_real_model_is_the_model_run_per_chunk(name):
    """virtual_batch_size on every BatchNorm of a converted torchvision model: everything else in the model is per
    sample, so its training step on the batch is torch's model run on each chunk in order (outputs, parameter
    gradients summed over the chunks, running stats and counters after the last chunk), in float64."""
    build, shape = MODELS[name]
    torch_model = randomized(build()).double().to(DEVICE)
    ours = bnfast.convert(copy.deepcopy(torch_model), trace=True)
    for m in bnfast_bns(ours).values():
        m.virtual_batch_size = 2
    x = torch.randn((4, *shape[1:]), generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE)
    cotangent = torch.randn(4, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(DEVICE)
    y, grads, buffers = step(ours, x, cotangent)
    torch_model.zero_grad(set_to_none=True)
    y_ref = torch.cat([torch_model(chunk) for chunk in x.split(2)])
    y_ref.backward(cotangent)
    tol = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(y, y_ref.detach(), **tol)
    for n, p in torch_model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, **tol, msg=lambda m, n=n: f"{n}: {m}")
    for n, b in torch_model.named_buffers():
        torch.testing.assert_close(buffers[n], b, **tol, msg=lambda m, n=n: f"{n}: {m}")
