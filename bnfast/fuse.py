"""`fuse(model)` (also `convert(model, trace=True)`): fusion by tracing, wherever the forward writes it.

`convert` fuses what the module tree shows (a BatchNorm then an activation in an nn.Sequential, timm's norm-act
layers). Most CNNs write the rest in their forward: torchvision's BasicBlock is
`out = self.relu(self.bn1(self.conv1(x)))` ... `out = self.bn2(...); out += identity; out = self.relu(out)`.
`fuse` first runs `convert(model)` (in place), then traces the model with torch.fx (`Tracer`: every BatchNorm,
bnfast's, torch's, frozen and timm's norm-act, is a leaf, like torch's BatchNorm under any tracer) and rewrites
the graph:

- pair:   BN -> activation                    =>  bn'(x)            (bn' = the BN with the activation fused)
- triple: BN -> add(residual) -> activation   =>  bn'(x, residual)  (one pass: bnfast's residual kernel)
- add:    BN -> add(residual), no activation  =>  bn'(x, residual)  (timm's inverted residuals)

The activation is a supported module (`nn.ReLU(inplace=True)` included), a function (F.relu, torch.relu,
relu_, F.leaky_relu(x, slope), F.elu(x, alpha), F.gelu(x, approximate=...), F.silu, F.selu, F.mish,
torch.sigmoid, torch.tanh) or a method (x.relu(), x.relu_(), x.sigmoid(), x.tanh()); the add is `a + b`,
`a += b` (traced as an add), torch.add(a, b) or a.add(b) (in place only on the BN's output). nn.Identity calls
(convert's emptied slots, drop_path at rate 0) are skipped over. A pattern is fused only when it means the same
function: the BN is called once in the graph, takes one input, has no hooks (they would see the activation's
output) and its output has exactly one user (so does the add's); the activation module has no hooks. The add's
other operand may have any shape: where it is not the input's shape and dtype (broadcast, promoted) the fused
module computes `act(BN(x) + residual)` unfused, at run time. FusedSyncBatchNorm takes pairs only.

The result is a `torch.fx.GraphModule` with the model's class name, its parameters and buffers (the same
objects), the same state_dict keys (listed in the order the forward uses the modules), following train()/eval()
(the BatchNorms are leaves). The model passed in is converted module by module in place, as by `convert`; the
fusion by tracing lives in the GraphModule only: the BN at each fused path there is a new bnfast module taking
over the same tensors. Python attributes of the model that are not modules, parameters or buffers are not part of a
GraphModule (as with any fx trace), nor are its methods. Where a trace would not be the same function, `fuse` warns,
says why and returns the module-level conversion (`convert(model)`): fx cannot trace the forward (data-dependent
control flow, ...); the forward reads `self.training` outside the BatchNorms (dropout, drop path: a trace fixes
the mode; found by tracing again with every flag flipped); a module that is not a leaf of the trace has hooks (the
model's own included); a trace would drop state_dict keys (submodules the forward never calls). A BN -> add is
not fused where a node between the BatchNorm and the add may write in place (the fused call runs at the add).

What was fused is in the result's `bnfast_report` (a `FusionReport`: counts and the BN paths of each pattern,
`str()` gives one line) and logged at INFO on the "bnfast" logger.

Imports: torch (torch.fx), bnfast.activations, bnfast.convert, bnfast.known, bnfast.modules.
"""

import dataclasses
import logging
import operator
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from .activations import Activation, activation_of_module
from .convert import convert_modules
from .known import has_hooks, timm_norm_act_types, torchvision_frozen_type
from .modules import FusedBatchNormBase, FusedFrozenBatchNorm2d, FusedSyncBatchNorm, adopt_state

logger = logging.getLogger("bnfast")


@dataclasses.dataclass
class FusionReport:
    """What `fuse` (`convert(..., trace=True)`) did: BN paths per pattern fused by tracing, the bnfast
    modules of the result that carry an activation (fused by tracing or module by module), and the reason
    tracing failed (then `traced` is False and nothing was fused by tracing)."""

    traced: bool
    pairs: list[str] = dataclasses.field(default_factory=list)  # BN -> activation
    triples: list[str] = dataclasses.field(default_factory=list)  # BN -> add -> activation
    adds: list[str] = dataclasses.field(default_factory=list)  # BN -> add
    batch_norms: int = 0  # bnfast BatchNorm modules in the result
    with_activation: int = 0  # of which fuse an activation
    error: str = ""

    def __str__(self) -> str:
        if not self.traced:
            return f"bnfast.fuse: not traced ({self.error}); converted module by module only"
        return (
            f"bnfast.fuse: {len(self.pairs)} BN+activation pairs, {len(self.triples)} BN+add+activation triples, "
            f"{len(self.adds)} BN+add fused by tracing; {self.with_activation} of {self.batch_norms} bnfast "
            "BatchNorms fuse an activation"
        )


class Tracer(fx.Tracer):
    """torch.fx's Tracer with every BatchNorm a leaf: torch's and bnfast's modules, torchvision's frozen one and
    timm's norm-act layers (their forward is one fusable unit). With timm loaded, timm's own leaf modules and
    functions too (as timm's feature extraction traces its models)."""

    def __init__(self):
        timm_fx = sys.modules.get("timm.layers._fx")
        functions = tuple(f for f in timm_fx.get_notrace_functions() if callable(f)) if timm_fx else ()
        self._timm_leaves = tuple(timm_fx.get_notrace_modules()) if timm_fx else ()
        super().__init__(autowrap_functions=functions)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, FusedFrozenBatchNorm2d)):
            return True
        if type(m) is torchvision_frozen_type() or type(m) in timm_norm_act_types().values():
            return True
        if self._timm_leaves and isinstance(m, self._timm_leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


# function -> (activation name, names of the arguments after the input, in order)
_FUNCTIONS = {
    F.relu: ("relu", ("inplace",)),
    torch.relu: ("relu", ()),
    torch.relu_: ("relu", ()),
    F.leaky_relu: ("leaky_relu", ("negative_slope", "inplace")),
    F.leaky_relu_: ("leaky_relu", ("negative_slope",)),
    F.elu: ("elu", ("alpha", "inplace")),
    F.elu_: ("elu", ("alpha",)),
    F.selu: ("selu", ("inplace",)),
    torch.selu: ("selu", ()),
    torch.selu_: ("selu", ()),
    F.silu: ("silu", ("inplace",)),
    F.mish: ("mish", ("inplace",)),
    F.gelu: ("gelu", ("approximate",)),
    torch.sigmoid: ("sigmoid", ()),
    torch.sigmoid_: ("sigmoid", ()),
    F.sigmoid: ("sigmoid", ()),
    torch.tanh: ("tanh", ()),
    torch.tanh_: ("tanh", ()),
    F.tanh: ("tanh", ()),
}
_DEFAULTS = {"negative_slope": 0.01, "alpha": 1.0, "approximate": "none", "inplace": False}
_METHODS = {
    "relu": "relu",
    "relu_": "relu",
    "sigmoid": "sigmoid",
    "sigmoid_": "sigmoid",
    "tanh": "tanh",
    "tanh_": "tanh",
}
_ADDS = (operator.add, operator.iadd, torch.add)


def _activation_of(node: fx.Node, source: fx.Node, modules: dict) -> Activation | None:
    """The activation `node` applies to `source` (its only tensor argument), or None."""
    if not node.args or node.args[0] is not source:
        return None
    if node.op == "call_module":
        module = modules[node.target]
        if len(node.args) != 1 or node.kwargs or has_hooks(module):
            return None
        return activation_of_module(module)
    if node.op == "call_method":
        name = _METHODS.get(node.target)
        return Activation(name) if name and len(node.args) == 1 and not node.kwargs else None
    if node.op != "call_function" or node.target not in _FUNCTIONS:
        return None
    name, params = _FUNCTIONS[node.target]
    if len(node.args) - 1 > len(params) or set(node.kwargs) - set(params):
        return None
    values = dict(_DEFAULTS, **dict(zip(params, node.args[1:], strict=False)), **node.kwargs)
    if any(isinstance(values[p], fx.Node) for p in params):  # computed in the forward: not a constant
        return None
    if name == "gelu":
        return {"none": Activation("gelu"), "tanh": Activation("gelu_tanh")}.get(values["approximate"])
    if name in ("leaky_relu", "elu"):
        param = values["negative_slope" if name == "leaky_relu" else "alpha"]
        return Activation(name, float(param)) if isinstance(param, (int, float)) else None
    return Activation(name)


def _residual_of(node: fx.Node, source: fx.Node) -> fx.Node | None:
    """The other operand when `node` adds a tensor to `source` (and nothing else), or None."""
    if node.kwargs or len(node.args) != 2 or source not in node.args:
        return None
    a, b = node.args
    in_place_on_source = a is source  # an in-place add writes its first operand: only the BN output may be it
    if node.op == "call_function" and node.target in _ADDS:
        if node.target is operator.iadd and not in_place_on_source:
            return None
    elif not (node.op == "call_method" and (node.target == "add" or node.target == "add_" and in_place_on_source)):
        return None
    other = b if a is source else a
    return other if isinstance(other, fx.Node) and other is not source else None


def _skip_identities(graph: fx.Graph, modules: dict) -> None:
    for node in list(graph.nodes):
        if node.op == "call_module" and type(modules[node.target]) is nn.Identity and len(node.args) == 1:
            if not node.kwargs and not has_hooks(modules[node.target]) and isinstance(node.args[0], fx.Node):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)


def _with_activation(bn: nn.Module, activation: Activation) -> nn.Module:
    """A new module of `bn`'s type and options with `activation`, taking over `bn`'s tensors and hooks."""
    new = bn.__class__.__new__(bn.__class__)
    nn.Module.__init__(new)
    new = adopt_state(new, bn)
    if hasattr(bn, "process_group"):
        new.process_group = bn.process_group
    new.activation = activation
    return new


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent), name, module)


_IN_PLACE_OPERATORS = (
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ilshift,
    operator.irshift,
    operator.imatmul,
)


def _may_write_in_place(node: fx.Node, modules: dict) -> bool:
    """Whether `node` may write into one of its inputs: a method or function named `..._`, an in-place operator,
    `inplace=True` (or a literal True argument: conservative), a module whose `inplace` flag is set."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (
            node.target in _IN_PLACE_OPERATORS
            or (name.endswith("_") and not name.startswith("__"))
            or node.kwargs.get("inplace") is True
            or any(a is True for a in node.args)
        )
    if node.op == "call_module":
        return getattr(modules[node.target], "inplace", False) is True
    return False


def _written_between(first: fx.Node, last: fx.Node, modules: dict) -> bool:
    """Whether a node strictly between `first` and `last` (graph order) may write in place: moving `first`'s call
    to `last` would then read its input after that write."""
    node = first.next
    while node is not last:
        if _may_write_in_place(node, modules):
            return True
        node = node.next
    return False


def _fuse_graph(gm: fx.GraphModule, report: FusionReport) -> None:
    graph = gm.graph
    modules = dict(gm.named_modules())
    _skip_identities(graph, modules)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(graph.nodes):
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        bn = modules[node.target]
        if not isinstance(bn, (FusedBatchNormBase, FusedFrozenBatchNorm2d)) or bn.activation or has_hooks(bn):
            continue
        if len(node.args) != 1 or node.kwargs or len(node.users) != 1:
            continue
        (user,) = node.users
        activation = _activation_of(user, node, modules)
        if activation is not None:
            _set_module(gm, node.target, _with_activation(bn, activation))
            user.replace_all_uses_with(node)
            graph.erase_node(user)
            report.pairs.append(node.target)
            continue
        residual = _residual_of(user, node)
        if residual is None or isinstance(bn, FusedSyncBatchNorm):
            continue
        last, activation = user, None
        if len(user.users) == 1:
            activation = _activation_of(next(iter(user.users)), user, modules)
            if activation is not None:
                last = next(iter(user.users))
        if _written_between(node, last, modules):  # the fused call runs at `last`: x must be unchanged there
            continue
        with graph.inserting_before(last):  # the residual is computed before the add, maybe after the BN
            fused = graph.call_module(node.target, (node.args[0], residual))
        last.replace_all_uses_with(fused)
        for dead in (last, user, node) if last is not user else (user, node):
            graph.erase_node(dead)
        _set_module(gm, node.target, _with_activation(bn, activation or Activation("")))
        (report.triples if activation else report.adds).append(node.target)


def _mode_dependence(model: nn.Module, graph: fx.Graph) -> str | None:
    """Why a trace would fix the train/eval mode, or None: the forward, traced with every module's flag flipped,
    differs (dropout or drop path reading `self.training` outside the BatchNorm leaves)."""
    flags = {m: m.training for m in model.modules()}
    try:
        for m in flags:
            m.training = not flags[m]
        flipped = Tracer().trace(model)
    finally:
        for m, flag in flags.items():
            m.training = flag
    if flipped.python_code("self").src != graph.python_code("self").src:
        return "its forward depends on train()/eval() beyond its BatchNorms (dropout, drop path): a trace fixes it"
    return None


def _hooks_lost(model: nn.Module, tracer: Tracer) -> str | None:
    """Why a trace would drop hooks (and run them on fx proxies while tracing), or None: only leaf modules keep
    theirs; checked before tracing, with the tracer's own leaf rule."""
    leaves = []
    for name, module in model.named_modules():
        if any(name.startswith(leaf + ".") for leaf in leaves):
            continue
        if name and tracer.is_leaf_module(module, name):
            leaves.append(name)
        elif has_hooks(module):
            return f"module {name or '(the model)'!r} has hooks, which a trace would drop"
    return None


def _state_lost(model: nn.Module, gm: fx.GraphModule) -> str | None:
    """Why the traced module's state_dict would differ, or None (submodules the forward never calls vanish)."""
    missing = sorted(set(model.state_dict()) - set(gm.state_dict()))
    return f"a trace would drop state_dict keys {missing[:3]} (modules its forward does not call)" if missing else None


def convert(model: nn.Module, *, trace: bool = False) -> nn.Module:
    """Replace every BatchNorm bnfast knows by its bnfast module in place, fusing BN -> activation pairs in
    nn.Sequential (bnfast/convert.py); returns `model`.

    With `trace=True`: `fuse(model)`, which fuses BN -> activation and BN -> add -> activation wherever the traced
    forward writes them and returns a `torch.fx.GraphModule` (or `model`, with a warning, where a trace would not
    be the same function); either carries the `bnfast_report` of what was fused. Use
    `convert(copy.deepcopy(model))` to keep the original."""
    return fuse(model) if trace else convert_modules(model)


def fuse(model: nn.Module) -> nn.Module:
    """`convert(model)` (in place), then fuse BN -> activation, BN -> add -> activation and BN -> add wherever
    the traced forward has them (see the module docstring). Returns a torch.fx.GraphModule, or the converted
    `model` (with a warning) where torch.fx cannot trace it; the result's `bnfast_report` says what was fused."""
    model = convert_modules(model, sequential_pairs=False)  # the trace confirms each pair (one user)
    gm, reason = None, None
    try:
        reason = _hooks_lost(model, Tracer())
        graph = Tracer().trace(model) if reason is None else None
        reason = reason or _mode_dependence(model, graph)
        if reason is None:
            gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
            reason = _state_lost(model, gm)
    except Exception as error:  # noqa: BLE001 - whatever fx raises, the module-level conversion stands
        reason = f"torch.fx cannot trace {type(model).__name__} ({type(error).__name__}: {error})".splitlines()[0]
    else:
        reason = reason and f"{type(model).__name__}: {reason}"
    if reason is not None:
        model = convert_modules(model)  # the module-level conversion: its Sequential pairs
        report = FusionReport(traced=False, error=reason)
        warnings.warn(f"bnfast.fuse: {reason}; converted module by module only, nothing fused by tracing", stacklevel=2)
    else:
        gm.training = model.training  # the submodules keep their own flags
        report = FusionReport(traced=True)
        _fuse_graph(gm, report)
        gm.graph.lint()
        gm.recompile()
        model = gm
    bns = [m for m in model.modules() if isinstance(m, (FusedBatchNormBase, FusedFrozenBatchNorm2d))]
    report.batch_norms, report.with_activation = len(bns), sum(bool(m.activation) for m in bns)
    model.bnfast_report = report
    logger.info("%s", report)
    return model
