"""bnfast.fuse / convert(trace=True): fusion by torch.fx tracing; fx leaves; converters and unknown BatchNorm
subclasses; frozen BatchNorm; fold of convolutions. Small hand-written models (the real ones: test_real_models.py)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from parity import DEVICE
from torch import nn

import bnfast
from bnfast import FusedBatchNorm2d, FusedFrozenBatchNorm2d

F32 = dict(rtol=1e-5, atol=1e-5)
TRAIN_EVAL = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])


class Block(nn.Module):
    """The patterns as forwards write them: attribute modules, functions, methods, in-place variants, `+=`."""

    def __init__(self, variant):
        super().__init__()
        self.variant = variant
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn1, self.bn2, self.bn3, self.bn4 = (nn.BatchNorm2d(3) for _ in range(4))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        v = self.variant
        y = self.bn1(self.conv(x))
        y = {
            "module": lambda: self.act(y),
            "F.relu": lambda: F.relu(y, inplace=True),
            "torch.relu_": lambda: torch.relu_(y),
            "method": lambda: y.relu(),
            "leaky": lambda: F.leaky_relu(y, 0.2),
            "elu": lambda: F.elu(y, alpha=0.5),
            "gelu_tanh": lambda: F.gelu(y, approximate="tanh"),
            "silu": lambda: F.silu(y),
        }[v]()
        z = self.bn2(y)
        z += x  # traced as operator.add
        z = self.act(z)
        return torch.sigmoid(x + self.bn3(z)) + self.bn4(z)  # the BN as the add's second operand; no activation


VARIANTS = ["module", "F.relu", "torch.relu_", "method", "leaky", "elu", "gelu_tanh", "silu"]
EXPECTED_ACT = {"leaky": "leaky_relu(0.2)", "elu": "elu(0.5)", "gelu_tanh": "'gelu_tanh'", "silu": "'silu'"}


def _randomized(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    return model.to(DEVICE)


@pytest.mark.parametrize("variant", VARIANTS)
def test_patterns_are_fused_and_compute_the_same(variant):
    model = _randomized(Block(variant))
    fused = bnfast.convert(copy.deepcopy(model), trace=True)
    report = fused.bnfast_report
    assert (report.pairs, report.triples, report.adds) == (["bn1"], ["bn2", "bn3"], ["bn4"]), report
    assert repr(fused.bn1.activation) == EXPECTED_ACT.get(variant, "'relu'")
    assert (fused.bn2.activation.name, fused.bn3.activation.name, fused.bn4.activation.name) == ("relu", "sigmoid", "")
    residual_calls = [n.target for n in fused.graph.nodes if n.op == "call_module" and len(n.args) == 2]
    assert residual_calls == ["bn2", "bn3", "bn4"]
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    for training in (True, False):
        model.train(training), fused.train(training)
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        y_ref, y = model(xs[0]), fused(xs[1])
        torch.testing.assert_close(y, y_ref, **F32)
        y_ref.backward(torch.ones_like(y)), y.backward(torch.ones_like(y))
        torch.testing.assert_close(xs[1].grad, xs[0].grad, **F32)
        for (name, p), p_ref in zip(fused.named_parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(p.grad, p_ref.grad, **F32, msg=name)
        for (name, b), b_ref in zip(fused.named_buffers(), model.buffers(), strict=True):
            torch.testing.assert_close(b, b_ref, **F32, msg=name)


class NotFusable(nn.Module):
    """Two users of a BN output, a non-constant slope, an unsupported activation, hooks, a shared BN."""

    def __init__(self):
        super().__init__()
        self.bn1, self.bn2, self.bn3, self.bn4 = (nn.BatchNorm2d(3) for _ in range(4))
        self.bn4.register_forward_hook(lambda m, a, y: None)

    def forward(self, x):
        a = self.bn1(x)
        b = torch.relu(a) + a  # bn1's output has two users
        c = F.softplus(self.bn2(b))  # not supported
        d = torch.relu(self.bn4(c))  # a hook would see relu's output
        return torch.relu(self.bn3(d)) + torch.relu(self.bn3(d))  # bn3 called twice


def test_what_must_not_be_fused_is_not():
    model = _randomized(NotFusable())
    fused = bnfast.convert(copy.deepcopy(model), trace=True)
    assert (fused.bnfast_report.pairs, fused.bnfast_report.triples, fused.bnfast_report.adds) == ([], [], [])
    assert not any(m.activation for m in fused.modules() if isinstance(m, FusedBatchNorm2d))
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    torch.testing.assert_close(fused(x), model(x), **F32)


def test_residual_of_another_shape_computes_torchs_expression():
    """fx cannot see shapes: an add whose other operand broadcasts is fused, and the module computes it unfused."""

    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.scale = nn.Parameter(torch.randn(3, 1, 1))

        def forward(self, x):
            return torch.relu(self.bn(x) + self.scale)

    model = _randomized(Broadcast())
    fused = bnfast.convert(copy.deepcopy(model), trace=True)
    assert fused.bnfast_report.triples == ["bn"]
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    y, y_ref = fused(x), model(x)
    torch.testing.assert_close(y, y_ref, **F32)
    y.sum().backward(), y_ref.sum().backward()
    torch.testing.assert_close(fused.scale.grad, model.scale.grad, **F32)


def test_untraceable_model_falls_back_with_a_warning():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU())

        def forward(self, x):
            return self.body(x) if x.sum() > 0 else -x

    model = DataDependent()
    with pytest.warns(UserWarning, match=r"torch\.fx cannot trace DataDependent .*module by module"):
        converted = bnfast.convert(model, trace=True)
    assert converted is model and not converted.bnfast_report.traced
    assert converted.body[1].activation.name == "relu"  # the Sequential pair, module by module


@TRAIN_EVAL
def test_symbolic_trace_keeps_bnfast_modules_as_leaves_that_follow_the_mode(training):
    """torch.fx.symbolic_trace of a model holding bnfast modules: one call_module node each, like torch's
    BatchNorm, so the traced model switches train/eval (it used to freeze the mode it was traced in)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), bnfast.FusedBatchNorm1d(4, activation="relu"), nn.Linear(4, 2))
    model.train(training)
    reference = copy.deepcopy(model)  # the eager model follows the mode
    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["0", "1", "2"]
    x = torch.randn(6, 3)
    for mode in (not training, training):
        traced.train(mode), reference.train(mode)
        torch.testing.assert_close(traced(x), reference(x), **F32)
    torch.testing.assert_close(traced.state_dict()["1.running_mean"], reference[1].running_mean, **F32)


# ---- converters and BatchNorm subclasses they do not know ----------------------------------------------------------


class ScaledBN(nn.BatchNorm2d):
    """A BatchNorm subclass whose forward does more (as timm's BatchNormAct2d runs .drop and .act)."""

    def __init__(self, c):
        super().__init__(c)
        self.post = nn.Tanh()

    def forward(self, x):
        return self.post(super().forward(x)) * 3


def test_every_converter_leaves_an_unknown_subclass_alone():
    model = _randomized(nn.Sequential(nn.Conv2d(3, 3, 1), ScaledBN(3), nn.ReLU(), nn.BatchNorm2d(3))).eval()
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    expected = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = {
            "convert": bnfast.convert(copy.deepcopy(model)),
            "trace": bnfast.convert(copy.deepcopy(model), trace=True),
            "bnfast sync": bnfast.FusedSyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)),
            "torch sync": nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)),
            "fold": bnfast.fold(model),
        }
    assert sum("leaves ScaledBN as it is" in str(w.message) for w in caught) == 2  # the two sync converters
    for name, converted in results.items():
        assert type(converted.get_submodule("1")) is ScaledBN, name
        torch.testing.assert_close(converted.eval()(x), expected, **F32, msg=name)
    assert type(results["torch sync"][3]) is nn.SyncBatchNorm
    assert type(results["bnfast sync"][3]) is bnfast.FusedSyncBatchNorm
    for fuse in (torch.nn.utils.fusion.fuse_conv_bn_eval,):
        with pytest.raises(TypeError, match="ScaledBN, whose forward is not BatchNorm's"):
            fuse(model[0], model[1])


def test_torch_sync_converter_converts_bnfast_modules_and_keeps_the_activation():
    model = _randomized(bnfast.convert(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU()))).eval()
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert type(synced[1]) is bnfast.FusedSyncBatchNorm and synced[1].activation.name == "relu"
    torch.testing.assert_close(synced.eval()(x), model(x), **F32)
    with pytest.raises(TypeError, match="would drop the activation"):
        torch.nn.utils.fusion.fuse_conv_bn_eval(model[0], model[1])


# ---- frozen BatchNorm ----------------------------------------------------------------------------------------------


def test_frozen_batch_norm_matches_torchvision():
    ops = pytest.importorskip("torchvision.ops")
    torch.manual_seed(0)
    frozen = ops.FrozenBatchNorm2d(5)
    for t in (frozen.weight, frozen.bias, frozen.running_mean):
        t.uniform_(-1, 1)
    frozen.running_var.uniform_(0.5, 2)
    model = nn.Sequential(nn.Conv2d(3, 5, 1), frozen, nn.ReLU()).to(DEVICE)
    converted = bnfast.convert(copy.deepcopy(model))
    assert type(converted[1]) is FusedFrozenBatchNorm2d and converted[1].activation.name == "relu"
    assert converted[1].running_var is not frozen.running_var  # a deepcopy: the copy's buffers, taken over
    assert list(converted.state_dict()) == list(model.state_dict())
    x64 = torch.randn(2, 3, 4, 4, device=DEVICE, dtype=torch.float64)
    x = x64.float().requires_grad_(True)
    for mode in (True, False):  # frozen in both
        converted.train(mode), model.train(mode)
        y, y_ref = converted(x), model(x)
        y64 = copy.deepcopy(model).double()(x64)
        err = (y_ref.double() - y64).abs().max().item()
        torch.testing.assert_close(y.double(), y64, rtol=0, atol=4 * err + 1e-6)
    (g,) = torch.autograd.grad(y.sum(), x)
    (g_ref,) = torch.autograd.grad(model(x).sum(), x)
    torch.testing.assert_close(g, g_ref, **F32)
    # load a torchvision state_dict (with a num_batches_tracked entry, dropped like torchvision does)
    state = dict(model.state_dict(), **{"1.num_batches_tracked": torch.tensor(3)})
    converted.load_state_dict(state)
    # a float16 input with float32 buffers: torch's formula promotes to float32; so does the module
    half = torch.randn(2, 5, 4, 4, device=DEVICE, dtype=torch.float16)
    assert converted[1](half).dtype == frozen(half).dtype == torch.float32


# ---- fold: convolutions, traced pairs ------------------------------------------------------------------------------


class ConvNet(nn.Module):
    """Conv1d/2d/3d -> BN pairs called from forward, one in a Sequential, a conv whose output has two users."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(3, 4, 3, bias=False), nn.BatchNorm1d(4)
        self.c2, self.b2 = nn.Conv2d(3, 4, 3, groups=1), bnfast.FusedBatchNorm2d(4, activation="silu")
        self.c3, self.b3 = nn.Conv3d(3, 4, 1), nn.BatchNorm3d(4)
        self.seq = nn.Sequential(nn.Conv2d(4, 4, 1, groups=2), nn.BatchNorm2d(4), nn.ReLU())
        self.c4, self.b4 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x1, x2, x3):
        y2 = self.seq(self.b2(self.c2(x2)))
        t = self.c4(y2)
        return self.b1(self.c1(x1)).sum() + self.b3(self.c3(x3)).sum() + (self.b4(t) + t).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fold_convolutions(dtype):
    model = _randomized(ConvNet()).to(dtype).eval()
    for m in (model.b1, model.b3):
        with torch.no_grad():
            m.running_var.uniform_(0.5, 2.0), m.running_mean.uniform_(-0.5, 0.5)
    folded = bnfast.fold(model)
    assert [type(m).__name__ for m in (folded.b1, folded.b2, folded.b3, folded.seq[1])] == [
        "Identity",
        "SiLU",
        "Identity",
        "Identity",
    ]
    assert type(folded.b4) is nn.BatchNorm2d  # c4's output has two users: not folded
    inputs = [torch.randn(2, 3, *s, dtype=dtype) for s in ((7,), (5, 5), (2, 3, 3))]
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}[dtype]
    with torch.no_grad():
        torch.testing.assert_close(folded(*inputs), model(*inputs), **tol)
    with pytest.raises(ValueError, match="training mode"):
        bnfast.fold(model.train())


# ---- timm's norm-act layers ----------------------------------------------------------------------------------------


def test_timm_norm_act_layers_convert_only_when_the_tail_fuses():
    norm_act = pytest.importorskip("timm.layers.norm_act")
    torch.manual_seed(0)
    hooked = norm_act.BatchNormAct2d(4, act_layer=nn.ReLU)
    hooked.act.register_forward_hook(lambda m, a, y: None)
    layers = {
        "leaky": norm_act.BatchNormAct2d(4, act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.3}),
        "no act": norm_act.BatchNormAct2d(4, apply_act=False),
        "dropout": norm_act.BatchNormAct2d(4, act_layer=nn.ReLU, drop_layer=nn.Dropout),
        "hardswish": norm_act.BatchNormAct2d(4, act_layer=nn.Hardswish),
        "hardsigmoid": norm_act.BatchNormAct2d(4, act_layer=nn.Hardsigmoid),  # not fused by bnfast: stays
        "hooked act": hooked,
        "sync": norm_act.SyncBatchNormAct(4, process_group=None),
    }
    layers["sync"].act, layers["sync"].drop = nn.SiLU(), nn.Identity()
    model = _randomized(nn.ModuleDict(layers)).eval()
    converted = bnfast.convert(copy.deepcopy(model))
    kinds = {k: (type(m).__name__, repr(getattr(m, "activation", None))) for k, m in converted.items()}
    assert kinds == {
        "leaky": ("FusedBatchNorm2d", "leaky_relu(0.3)"),
        "no act": ("FusedBatchNorm2d", "None"),
        "dropout": ("BatchNormAct2d", "None"),
        "hardswish": ("FusedBatchNorm2d", "'hardswish'"),
        "hardsigmoid": ("BatchNormAct2d", "None"),
        "hooked act": ("BatchNormAct2d", "None"),
        "sync": ("FusedSyncBatchNorm", "'silu'"),
    }
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    for key, layer in model.items():
        assert sorted(converted[key].state_dict()) == sorted(layer.state_dict()), key
        torch.testing.assert_close(converted[key](x), layer(x), **F32, msg=key)


def test_import_loads_neither_timm_nor_torchvision():
    import subprocess
    import sys

    code = "import sys, bnfast; assert not {'timm', 'torchvision'} & set(sys.modules), sorted(sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
