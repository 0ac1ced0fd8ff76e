"""The activations bnfast fuses into BatchNorm: names, the torch modules they stand for, and their parameter.

An activation spec is a name ("relu"), a matching torch module instance (`nn.LeakyReLU(0.2)`), or None.
`resolve_activation` turns a spec into `Activation(name, param)`: the kernel's ACTIVATION constexpr and its one
float parameter (negative_slope or alpha; 0 for the others).
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

# name -> (torch module type, default parameter)
_SUPPORTED = {
    "relu": (nn.ReLU, 0.0),
    "leaky_relu": (nn.LeakyReLU, 0.01),
    "elu": (nn.ELU, 1.0),
    "selu": (nn.SELU, 0.0),
    "silu": (nn.SiLU, 0.0),
    "gelu": (nn.GELU, 0.0),
    "gelu_tanh": (nn.GELU, 0.0),
    "sigmoid": (nn.Sigmoid, 0.0),
    "tanh": (nn.Tanh, 0.0),
    "mish": (nn.Mish, 0.0),
}
_ALIASES = {"swish": "silu"}
SUPPORTED_ACTIVATIONS = tuple(_SUPPORTED)


@dataclasses.dataclass(frozen=True)
class Activation:
    name: str  # "" for none
    param: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.name)

    def __repr__(self) -> str:
        if self.name in ("leaky_relu", "elu"):
            return f"{self.name}({self.param:g})"
        return repr(self.name or None)

    def module(self) -> nn.Module:
        """The equivalent torch module (nn.Identity for none)."""
        if not self.name:
            return nn.Identity()
        if self.name == "leaky_relu":
            return nn.LeakyReLU(self.param)
        if self.name == "elu":
            return nn.ELU(self.param)
        if self.name == "gelu_tanh":
            return nn.GELU(approximate="tanh")
        return _SUPPORTED[self.name][0]()

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """The activation with torch ops: the CPU fallback and the tests' reference."""
        if not self.name:
            return z
        if self.name == "leaky_relu":
            return F.leaky_relu(z, self.param)
        if self.name == "elu":
            return F.elu(z, self.param)
        return self.module()(z)


def _unsupported(spec) -> ValueError:
    names = ", ".join(SUPPORTED_ACTIVATIONS)
    return ValueError(
        f"unsupported activation {spec!r}: bnfast fuses {names} (aliases: swish), given as a name or as the "
        "matching torch.nn module (nn.ReLU(), nn.LeakyReLU(slope), nn.ELU(alpha), nn.GELU(approximate=...), ...)"
    )


def resolve_activation(spec) -> Activation:
    """Name, supported nn.Module instance, or None -> Activation. Raises ValueError listing what is supported."""
    if spec is None:
        return Activation("")
    if isinstance(spec, Activation):
        return spec
    if isinstance(spec, str):
        name = _ALIASES.get(spec.lower(), spec.lower())
        if name not in _SUPPORTED:
            raise _unsupported(spec)
        return Activation(name, _SUPPORTED[name][1])
    if isinstance(spec, nn.Module):
        activation = activation_of_module(spec)
        if activation is None:
            raise _unsupported(spec)
        return activation
    raise _unsupported(spec)


def activation_of_module(module: nn.Module) -> Activation | None:
    """The Activation a torch module computes, or None if bnfast cannot fuse it.

    Exact types only: a subclass may override forward. `inplace=True` is fine: fused, there is nothing to
    write in place.
    """
    kind = type(module)
    if kind is nn.LeakyReLU:
        return Activation("leaky_relu", float(module.negative_slope))
    if kind is nn.ELU:
        return Activation("elu", float(module.alpha))
    if kind is nn.GELU:
        if module.approximate == "tanh":
            return Activation("gelu_tanh")
        return Activation("gelu") if module.approximate == "none" else None
    for name, (module_type, _) in _SUPPORTED.items():
        if kind is module_type and name not in ("leaky_relu", "elu", "gelu", "gelu_tanh"):
            return Activation(name)
    return None
