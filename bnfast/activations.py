"""The activations bnfast fuses into BatchNorm, on the torch side: specs, the torch modules they stand for.

The names, default parameters and flags come from the one table, `bnfast.kernels.activations.ACTIVATIONS`.
An activation spec is a name ("relu"), a matching torch module instance (`nn.LeakyReLU(0.2)`), or None;
`resolve_activation` turns it into `Activation(name, param)`: the kernel's ACTIVATION constexpr and its one
float parameter (negative_slope or alpha; 0 for the others).

Imports: torch, bnfast.kernels.activations (the table; no Triton code runs here).
"""

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn

from .kernels.activations import ACTIVATIONS, ALIASES

SUPPORTED_ACTIVATIONS = tuple(ACTIVATIONS)


@dataclasses.dataclass(frozen=True)
class Activation:
    name: str  # "" for none
    param: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.name)

    def __repr__(self) -> str:
        if self.name and ACTIVATIONS[self.name].has_param:
            return f"{self.name}({self.param:g})"
        return repr(self.name or None)

    def module(self) -> nn.Module:
        """The equivalent torch module (nn.Identity for none)."""
        if not self.name:
            return nn.Identity()
        module_type = getattr(nn, ACTIVATIONS[self.name].torch_module)
        if ACTIVATIONS[self.name].has_param:
            return module_type(self.param)
        if self.name == "gelu_tanh":
            return module_type(approximate="tanh")
        return module_type()

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """The activation with torch ops: the CPU fallback, the slow differentiable backward, the tests' reference."""
        if not self.name:
            return z
        if self.name == "leaky_relu":
            return F.leaky_relu(z, self.param)
        if self.name == "elu":
            return F.elu(z, self.param)
        return self.module()(z)

    def derivative(self, z: torch.Tensor) -> torch.Tensor:
        """act'(z) in differentiable torch ops (forward-mode AD of `apply`; it composes with vmap and with
        double backward): the slow backward path."""
        if not self.name:
            return torch.ones_like(z)
        return torch.func.jvp(self.apply, (z,), (torch.ones_like(z),))[1]


def _unsupported(spec) -> ValueError:
    names = ", ".join(SUPPORTED_ACTIVATIONS)
    aliases = ", ".join(ALIASES)
    return ValueError(
        f"unsupported activation {spec!r}: bnfast fuses {names} (aliases: {aliases}), given as a name or as the "
        "matching torch.nn module (nn.ReLU(), nn.LeakyReLU(slope), nn.ELU(alpha), nn.GELU(approximate=...), ...)"
    )


@functools.lru_cache(maxsize=64)
def _from_name(spec: str) -> Activation:
    name = ALIASES.get(spec.lower(), spec.lower())
    if name not in ACTIVATIONS:
        raise _unsupported(spec)
    return Activation(name, ACTIVATIONS[name].default_param)


def resolve_activation(spec) -> Activation:
    """Name, supported nn.Module instance, or None -> Activation. Raises ValueError listing what is supported."""
    if isinstance(spec, Activation):
        return spec
    if spec is None:
        return Activation("")
    if isinstance(spec, str):
        return _from_name(spec)
    if isinstance(spec, nn.Module):
        activation = activation_of_module(spec)
        if activation is None:
            raise _unsupported(spec)
        return activation
    raise _unsupported(spec)


def activation_of_module(module: nn.Module) -> Activation | None:
    """The Activation a torch module computes, or None if bnfast cannot fuse it.

    Exact types only: a subclass may override forward. `inplace=True` is fine: fused, there is nothing to
    write in place. The parameter is kept as a Python float (a float64: the kernels take it as float64).
    """
    kind = type(module)
    if kind is nn.GELU:
        return (
            Activation({"tanh": "gelu_tanh", "none": "gelu"}[module.approximate])
            if module.approximate in ("tanh", "none")
            else None
        )
    for name, info in ACTIVATIONS.items():
        if name == "gelu_tanh" or kind is not getattr(nn, info.torch_module):
            continue
        if name == "leaky_relu":
            return Activation(name, float(module.negative_slope))
        if name == "elu":
            return Activation(name, float(module.alpha))
        return Activation(name)
    return None
