"""`FusedBatchNorm1d/2d/3d`, `FusedSyncBatchNorm`: drop-in torch.nn.BatchNorm1d/2d/3d and nn.SyncBatchNorm on
Triton kernels, optionally fusing an activation.

Each module is a subclass of its torch class, so the constructor, parameters, buffers, state_dict,
reset_parameters, reset_running_stats, input-dim check, pickling and deepcopy are torch's own; `forward`
mirrors torch's (`num_batches_tracked += 1`, momentum=None is the cumulative average, batch statistics in
training or when the buffers are None) and calls `bnfast.functional` (`bnfast.distributed` for
FusedSyncBatchNorm, which syncs in training over a process group and is the plain module otherwise).

Saved for the backward: the input x and two per-channel vectors (mean and rstd in training; the running
buffers in eval), and the residual when one is added under an activation (bnfast/ops.py). nn.BatchNorm1d
followed by an activation module also keeps the BN output (or the activation's output) alive for the
activation's backward; bnfast recomputes it from x in the backward kernel instead, so a BN + activation layer
keeps one (N, C, L) tensor where torch keeps two.

torch.fx: inside a traced model each bnfast module is a leaf, as torch's BatchNorm is (`_fx_leaf`: one
call_module node), so the traced model follows train()/eval() like torch's; traced on its own (the module is the
root), `batch_norm_impl` (`sync_batch_norm_impl`) is an fx leaf (`torch.fx.wrap`), so `symbolic_trace`
records one call instead of tracing into the checks. torch.jit.script cannot compile Triton launches: scripting
raises a clear error.

The call cache: `FusedBatchNorm1d/2d/3d.forward` first asks bnfast.ops's call cache (C++) to replay the module's
last call; when it cannot (the first calls of a layout, any change: bnfast/ops.py "call cache"), the call takes the
path above through `ops.module_call`, which records it and stores it for the next.

Imports: torch, bnfast.activations, bnfast.ops (the call cache), bnfast.functional, bnfast.distributed,
bnfast.known.
"""

import inspect
import warnings

import torch
from torch import nn

from . import ops
from .activations import Activation, resolve_activation
from .distributed import sync_batch_norm_impl
from .functional import batch_norm_impl, virtual_batch_size_of
from .known import norm_act_activation, timm_norm_act_types

torch.fx.wrap("batch_norm_impl")
torch.fx.wrap("sync_batch_norm_impl")

_TORCH_HAS_BN_BIAS = "bias" in inspect.signature(nn.BatchNorm1d.__init__).parameters


class FusedBatchNormBase:
    """What FusedBatchNorm1d/2d/3d add to torch's class: `activation=`, the forward, repr, scripting refusal.

    Mixed in before the torch class, so the constructor, parameters, buffers, state_dict, reset_parameters,
    reset_running_stats, pickling and deepcopy stay torch's own.
    """

    _INPUT_DIMS: tuple[int, ...] = ()
    virtual_batch_size: int | None = None  # ghost BatchNorm (FusedBatchNorm1d/2d/3d's constructor); None: off

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation=None,
        virtual_batch_size: int | None = None,
    ) -> None:
        if virtual_batch_size is not None:
            virtual_batch_size = virtual_batch_size_of(virtual_batch_size)
        self.activation = resolve_activation(activation)  # before super(): reset_parameters may print repr
        self.virtual_batch_size = virtual_batch_size
        if _TORCH_HAS_BN_BIAS:  # super() is the torch class (the mixin comes first in the MRO)
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        else:  # older torch: no bias keyword; drop the bias ourselves
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
            if affine and not bias:
                self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        ghost = f", virtual_batch_size={self.virtual_batch_size}" if self.virtual_batch_size is not None else ""
        return f"{super().extra_repr()}, activation={self.activation!r}{ghost}"

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"bnfast: {type(self).__name__} cannot be compiled by torch.jit.script (its kernels are Triton "
            "launches); use torch.compile or torch.export, or bnfast.fold for inference"
        )

    def forward(
        self,
        input: torch.Tensor,
        residual: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        pad_value: float | None = None,
    ) -> torch.Tensor:
        """act(BN(input) + residual): `residual` (optional, any strides) is added before the activation, in the
        same passes, and receives the gradient dy * act'(z) (a ResNet block's tail). Whatever residual torch's
        expression accepts gets its answer (a broadcast one is a stride-0 view for the kernels; one that promotes
        the dtype or enlarges the shape is computed with torch's ops), one it rejects its error, before any state
        changes (`bnfast.functional`): a tracing fusion (bnfast.fuse) cannot see shapes, so any residual must do.
        `mask` (bool, the input's shape without the channel dim, True = valid) and `pad_value`: masked BatchNorm,
        statistics over the valid positions only (see `bnfast.batch_norm`)."""
        if mask is None and pad_value is None and _CACHE[0] is not None and not torch.compiler.is_compiling():
            y = _CACHE[0].forward(self, input, residual)  # C++: this module's last call again, or NotImplemented
            if y is not NotImplemented:
                return y
            state = _state(self) if _cacheable(self) else None
            return ops.module_call(self, input, residual, lambda: self._forward(input, residual), state)
        return self._forward(input, residual, mask, pad_value)

    def _forward(self, input, residual=None, mask=None, pad_value=None):
        leaf = _fx_leaf(self, input, residual, mask, pad_value)
        if leaf is not None:
            return leaf
        return self._batch_norm(input, residual, self.activation, mask, pad_value)

    def _batch_norm(
        self, input: torch.Tensor, residual, activation: Activation, mask=None, pad_value=None
    ) -> torch.Tensor:
        # the input-dim check (torch's message) runs inside batch_norm_impl: `input.dim()` would be an fx Proxy
        # here, and symbolic_trace cannot branch on one
        # num_batches_tracked is read in eval too: an fx-traced module keeps the buffer in its state_dict; fx
        # proxies and tensor subclasses read them as attributes (the tracer intercepts those reads)
        plain = type(input) is torch.Tensor
        weight, bias, running_mean, running_var, nbt = _state(self) if plain else [getattr(self, n) for n in _STATE]
        training = self.training
        count_batch = training and self.track_running_stats and nbt is not None  # `+= 1` after the checks pass
        bn_training = training or (running_mean is None and running_var is None)
        use_buffers = not training or self.track_running_stats  # only then are the buffers read or written
        return batch_norm_impl(
            input,
            running_mean if use_buffers else None,
            running_var if use_buffers else None,
            weight,
            bias,
            bn_training,
            self.momentum,
            self.eps,
            activation,
            nbt,
            count_batch,
            self._INPUT_DIMS,
            residual,
            mask,
            pad_value,
            self.virtual_batch_size if bn_training else None,  # batch statistics: per chunk
        )


_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_PLAIN_TYPES: dict[type, bool] = {}  # class -> no class attribute named in _STATE (a parametrization's property)


def _plain(module: nn.Module) -> bool:
    """No class attribute of `module`'s class is named in _STATE (a parametrization's property would be)."""
    cls = type(module)
    plain = _PLAIN_TYPES.get(cls)
    if plain is None:
        plain = _PLAIN_TYPES[cls] = not any(hasattr(cls, name) for name in _STATE)
    return plain


_CACHE = ops.CALL_CACHE  # [bnfast.native's module] once loaded, with the call cache on (bnfast.ops "call cache")
_FIELDS = ("training", "momentum", "eps", "track_running_stats", "activation", "virtual_batch_size")  # what C++ reads
_CACHEABLE: dict[type, bool] = {}


def _cacheable(module: nn.Module) -> bool:
    """The call cache may replay `module`'s calls: its class computes the call with bnfast's own `_forward` and
    `_batch_norm` (a subclass's override may read more than the cache compares), reads its state from the module's
    dicts (`_plain`), and no class attribute computes one of the fields the cache compares (a property)."""
    cls = type(module)
    cacheable = _CACHEABLE.get(cls)
    if cacheable is None:
        cacheable = _CACHEABLE[cls] = (
            _plain(module)
            and cls._forward is FusedBatchNormBase._forward
            and cls._batch_norm is FusedBatchNormBase._batch_norm
            and not any(hasattr(type(getattr(cls, name, None)), "__get__") for name in _FIELDS)
        )
    return cacheable


def _state(module: nn.Module) -> list:
    """[module.weight, .bias, .running_mean, .running_var, .num_batches_tracked] as attribute reads give them.
    They live in the module's _parameters / _buffers, which `nn.Module.__getattr__` searches (~0.5 us a read)
    only after the class and the instance dict: read from there directly (~0.1 us) when neither the class nor the
    instance holds any of the names (parametrize's property, weight_norm's instance attribute: then getattr), and
    not under torch.compile (dynamo traces attribute reads, not the module's dicts)."""
    d = module.__dict__
    if not _plain(module) or torch.compiler.is_compiling() or not d.keys().isdisjoint(_STATE):  # dynamo: its own reads
        return [getattr(module, name) for name in _STATE]
    params, buffers = d["_parameters"], d["_buffers"]
    return [
        params[name] if name in params else buffers[name] if name in buffers else getattr(module, name)
        for name in _STATE
    ]


def _fx_leaf(module: nn.Module, input, residual=None, mask=None, pad_value=None):
    """Under torch.fx tracing of a model that holds `module` (its input is a Proxy): one call_module node, as
    torch's BatchNorm gets from every tracer, so the traced model reads `training` when it runs (it follows
    train()/eval()) instead of freezing the mode it was traced in. None otherwise, and when `module` is the
    traced root itself (a GraphModule cannot call itself: then `batch_norm_impl` is the leaf)."""
    if not isinstance(input, torch.fx.Proxy):
        return None
    tracer = input.tracer
    if module is getattr(tracer, "root", None):
        return None
    args = (input,) if residual is None else (input, residual)
    kwargs = {k: v for k, v in (("mask", mask), ("pad_value", pad_value)) if v is not None}
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, kwargs)


def _residual_needs_torch(input, residual) -> bool:
    """A residual that is not of the input's shape, dtype and device (broadcast, promoted): the fused add would
    refuse it, torch's `act(BN(x) + residual)` accepts it. A tracing fusion (bnfast.fuse) cannot see shapes, so
    the module computes that expression itself then: the same function whatever the residual."""
    if residual is None or isinstance(residual, torch.fx.Proxy) or isinstance(input, torch.fx.Proxy):
        return False
    if not isinstance(residual, torch.Tensor):  # a number (`bn(x) + x.size(1)` fused by tracing)
        return True
    if (residual.shape, residual.dtype, residual.device) == (input.shape, input.dtype, input.device):
        return False
    torch.broadcast_shapes(input.shape, residual.shape)  # torch's RuntimeError, before any state changes
    return True


class FusedBatchNorm1d(FusedBatchNormBase, nn.BatchNorm1d):
    """Drop-in :class:`torch.nn.BatchNorm1d` ((N, C) or (N, C, L)) on Triton kernels, optionally fusing an
    activation: None, a name ("relu", "leaky_relu", "elu", "selu", "silu"/"swish", "gelu", "gelu_tanh",
    "sigmoid", "tanh", "mish") or the matching torch module (``nn.LeakyReLU(0.2)``, ``nn.GELU("tanh")``, ...).
    The activation has no state: the state_dict is exactly nn.BatchNorm1d's.
    """

    _INPUT_DIMS = (2, 3)


class FusedBatchNorm2d(FusedBatchNormBase, nn.BatchNorm2d):
    """Drop-in :class:`torch.nn.BatchNorm2d` ((N, C, H, W), NCHW or channels_last or any strides; the output
    keeps the input's memory format), with ``activation=`` as in :class:`FusedBatchNorm1d`."""

    _INPUT_DIMS = (4,)


class FusedBatchNorm3d(FusedBatchNormBase, nn.BatchNorm3d):
    """Drop-in :class:`torch.nn.BatchNorm3d` ((N, C, D, H, W), NCDHW or channels_last_3d or any strides), with
    ``activation=`` as in :class:`FusedBatchNorm1d`."""

    _INPUT_DIMS = (5,)


_OWN_STATE = ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules", "activation", "process_group")


def adopt_state(new: nn.Module, old: nn.Module) -> nn.Module:
    """`new` (a BatchNorm built on the meta device) takes over `old`'s very tensors (weight, bias, running stats,
    num_batches_tracked: same storage, device, dtype and requires_grad, so optimizers and DDP keep working), its
    hooks (the same dicts: handles keep working), training flag and custom attributes. For `bnfast.convert` and
    `FusedSyncBatchNorm.convert_sync_batchnorm`."""
    for name in ("weight", "bias"):
        if name in old._buffers:  # a frozen BatchNorm's weight and bias are buffers
            new.register_buffer(name, old._buffers[name], persistent=name not in old._non_persistent_buffers_set)
        else:
            new.register_parameter(name, getattr(old, name, None))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if name in old._buffers or not isinstance(new, FusedFrozenBatchNorm2d):
            new.register_buffer(name, getattr(old, name, None))
    new.__dict__.update({k: v for k, v in vars(old).items() if k not in _OWN_STATE})
    return new


class FusedSyncBatchNorm(FusedBatchNormBase, nn.SyncBatchNorm):
    """Drop-in :class:`torch.nn.SyncBatchNorm` (inputs (N, C, *), 2-D and up) on Triton kernels, with
    ``activation=`` as in :class:`FusedBatchNorm1d`. In training over an initialised process group of more than
    one rank it normalises with the global batch's statistics: one all_gather of each rank's packed (count, mean,
    M2) partials in the forward, one all_reduce of the (2, C) gradient sums in the backward
    (bnfast/distributed.py, which also lists the bytes per step against torch's). Otherwise (eval, no process
    group, world size 1) it is exactly the non-synced module. CUDA tensors on NCCL (or gloo), CPU tensors on gloo.
    Parameters, buffers and state_dict are nn.SyncBatchNorm's.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation=None,
    ) -> None:
        self.activation = resolve_activation(activation)  # before __init__: reset_parameters may print repr
        args = (num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype)
        if _TORCH_HAS_BN_BIAS:  # FusedBatchNormBase.__init__ passes no process_group: call torch's directly
            nn.SyncBatchNorm.__init__(self, *args, bias=bias)
        else:
            nn.SyncBatchNorm.__init__(self, *args)
            if affine and not bias:
                self.register_parameter("bias", None)

    def forward(
        self,
        input: torch.Tensor,
        residual: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        pad_value: float | None = None,
    ) -> torch.Tensor:
        """act(SyncBN(input) + residual); `residual` (optional: what `bnfast.fuse` passes to a FusedBatchNorm2d
        converted by `convert_sync_batchnorm` afterwards) is added by torch, before the activation: the synced
        stages take none. `mask` / `pad_value`: masked BatchNorm (see `bnfast.batch_norm`), the statistics over
        the valid positions of every rank (each rank's partials carry its valid count: bnfast/distributed.py)."""
        leaf = _fx_leaf(self, input, residual, mask, pad_value)
        if leaf is not None:
            return leaf
        if residual is not None:
            if not isinstance(residual, torch.fx.Proxy) and not isinstance(input, torch.fx.Proxy):
                torch.broadcast_shapes(input.shape, residual.shape)  # torch's error, before any state changes
            if pad_value is not None and (mask is None or not isinstance(pad_value, (int, float))):
                raise ValueError(f"bnfast.batch_norm: pad_value needs a mask and must be a number, got {pad_value!r}")
            y = self.activation.apply(self._sync_batch_norm(input, Activation(""), mask) + residual)
            if pad_value is None:
                return y
            # the pad value replaces act(z + residual) where the mask is False; no gradient flows there
            return torch.where(mask.unsqueeze(1), y, torch.tensor(float(pad_value), dtype=y.dtype, device=y.device))
        return self._sync_batch_norm(input, self.activation, mask, pad_value)

    def _sync_batch_norm(self, input: torch.Tensor, activation: Activation, mask=None, pad_value=None) -> torch.Tensor:
        count_batch = self.training and self.track_running_stats and self.num_batches_tracked is not None
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        return sync_batch_norm_impl(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            self.training,
            bn_training,
            self.momentum,
            self.eps,
            activation,
            self.num_batches_tracked,
            count_batch,
            self.process_group,
            mask,
            pad_value,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Every BatchNorm in `module` that bnfast knows becomes a FusedSyncBatchNorm over `process_group`,
        taking over the very same Parameter and buffer objects, hooks, training flag and custom attributes (as
        `bnfast.convert`), and the activation it applies: torch's BatchNorm1d/2d/3d and SyncBatchNorm, bnfast's
        modules (their fused activation), timm's BatchNormAct2d and SyncBatchNormAct when their activation is
        one bnfast fuses and their `drop` the identity (`known.norm_act_activation`). Any other BatchNorm
        (another subclass: its forward may do more) is left as it is, with a warning: it is not synchronised.
        Returns the converted module (a new one if `module` itself is a BatchNorm). To also fuse
        BatchNorm -> activation pairs, run `bnfast.convert(model)` first."""
        converted = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            activation = _sync_activation(module)
            if activation is None:
                warnings.warn(
                    f"bnfast: convert_sync_batchnorm leaves {type(module).__name__} as it is (not synchronised): "
                    "bnfast does not know what its forward computes",
                    stacklevel=2,
                )
            else:
                converted = adopt_state(
                    cls(
                        module.num_features,
                        module.eps,
                        module.momentum,
                        module.affine,
                        module.track_running_stats,
                        process_group,
                        device="meta",
                        bias=module.bias is not None if module.affine else True,
                        activation=activation,
                    ),
                    module,
                )
                if type(module) in timm_norm_act_types().values():
                    return converted  # its act and drop are fused: they are not children of the new module
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted


_SYNC_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _sync_activation(module: nn.Module) -> Activation | None:
    """The activation a BatchNorm applies, for convert_sync_batchnorm; None for a type bnfast does not know."""
    kind = type(module)
    if kind in _SYNC_CONVERTIBLE:
        return Activation("")
    if kind in (FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d, FusedSyncBatchNorm):
        # ghost BatchNorm normalises chunks of this rank's batch: synchronising would change what it computes
        return module.activation if module.virtual_batch_size is None else None
    timm = timm_norm_act_types()
    if kind in (timm.get("BatchNormAct2d"), timm.get("SyncBatchNormAct")):
        return norm_act_activation(module)
    return None


class FusedFrozenBatchNorm2d(nn.Module):
    """:class:`torchvision.ops.FrozenBatchNorm2d` (detection backbones; timm's ``FrozenBatchNormAct2d`` with
    ``activation=``) on the fused eval kernel: ``act(x * scale + shift (+ residual))`` in one pass, with
    ``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale`` from its buffers,
    in train() and eval() alike. Same buffers as torchvision's (weight, bias, running_mean, running_var: buffers,
    none of them trained) and state_dict keys; a ``num_batches_tracked`` entry is dropped on load, as there.

    Where torch's formula does something else than the kernel would, the forward is torch's formula itself:
    an input whose dtype differs from the buffers' (the product promotes: a float16 input with float32 buffers
    gives a float32 output) or that is not 4-D (the (1, C, 1, 1) buffers broadcast).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, *, activation=None, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.activation = resolve_activation(activation)
        factory = dict(device=device, dtype=dtype)
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, activation={self.activation!r}"

    def __prepare_scriptable__(self):
        return FusedBatchNormBase.__prepare_scriptable__(self)

    def torch_forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """torchvision's formula (in the buffers' dtype), then the residual and the activation: the reference."""
        shape = (1, -1, 1, 1)
        scale = self.weight.reshape(shape) * (self.running_var.reshape(shape) + self.eps).rsqrt()
        z = input * scale + (self.bias.reshape(shape) - self.running_mean.reshape(shape) * scale)
        return self.activation.apply(z if residual is None else z + residual)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        leaf = _fx_leaf(self, input, residual)
        if leaf is not None:
            return leaf
        buffers = (self.weight, self.bias, self.running_mean, self.running_var)
        if (
            isinstance(input, torch.fx.Proxy)
            or input.dim() != 4
            or _residual_needs_torch(input, residual)
            or any(t.dtype != input.dtype for t in buffers)
        ):
            return self.torch_forward(input, residual)
        return batch_norm_impl(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            False,
            0.0,
            self.eps,
            self.activation,
            None,
            False,
            (4,),
            residual,
        )
