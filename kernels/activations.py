"""Activations fused into the BatchNorm kernels: THE table of what bnfast fuses, and the jit helpers.

`ACTIVATIONS` is the one place that names an activation. Everything else reads it: `bnfast.activations`
(names, aliases, the torch modules they stand for), the launchers (which backward needs half-size tiles),
the kernel report and the examples. `_act(z)` / `_act_grad(z)` implement each name; a name missing there
fails to compile (`tl.static_assert`), it never runs as the identity.

Everything is evaluated in the accumulation dtype (float32 for 16-bit inputs, float64 for float64), on the
pre-activation z = xhat * weight + bias, so 16-bit inputs round once, at the store. `param` carries the one
parameter an activation may have (negative_slope for leaky_relu, alpha for elu); it arrives as a float64
kernel argument and is rounded to the accumulation dtype here, so float64 models keep it exact.

Where torch is exact near 0 we are too: ELU/SELU use expm1 and mish uses log1p, both through Kahan's
correction (u = exp(z); (u - 1) * z / log(u)), which needs only exp/log and so runs on every backend,
the interpreter included. Derivatives follow torch's backward kernels, including the choice at the kink:
relu'(0) = 0, leaky_relu'(0) = slope, elu'(0) = alpha (torch tests `z > 0` everywhere).

Imports: triton only (no torch.nn: `torch_module` is the *name* of the torch.nn class).
"""

import dataclasses

import triton
import triton.language as tl


@dataclasses.dataclass(frozen=True)
class ActivationInfo:
    torch_module: str  # the torch.nn class it stands for (resolved by bnfast.activations)
    default_param: float = 0.0  # negative_slope / alpha; 0 where there is no parameter
    has_param: bool = False
    # the derivative keeps many temporaries live per value (exp/erf/tanh chains): the split backward kernels
    # spill at full-size tiles (bench/kernel_report.py), so the launchers give them half-size tiles
    heavy_backward: bool = False


ACTIVATIONS = {
    "relu": ActivationInfo("ReLU"),
    "leaky_relu": ActivationInfo("LeakyReLU", 0.01, has_param=True),
    "elu": ActivationInfo("ELU", 1.0, has_param=True, heavy_backward=True),
    "selu": ActivationInfo("SELU", heavy_backward=True),
    "silu": ActivationInfo("SiLU", heavy_backward=True),
    "gelu": ActivationInfo("GELU", heavy_backward=True),
    "gelu_tanh": ActivationInfo("GELU", heavy_backward=True),  # nn.GELU(approximate="tanh")
    "sigmoid": ActivationInfo("Sigmoid", heavy_backward=True),
    "tanh": ActivationInfo("Tanh", heavy_backward=True),
    "mish": ActivationInfo("Mish", heavy_backward=True),
    "hardswish": ActivationInfo("Hardswish"),  # MobileNetV3 (timm's BatchNormAct2d with nn.Hardswish)
}
ALIASES = {"swish": "silu", "hard_swish": "hardswish"}

# Globals a @triton.jit function reads must be tl.constexpr instances (the interpreter accepts plain floats, the
# compiler does not: bench/kernel_report.py compiles every activation to catch exactly this). They multiply
# tensors from the right: `constexpr * tensor` fails under the interpreter for float64 tensors.
SELU_ALPHA = tl.constexpr(1.6732632423543772848170429916717)
SELU_SCALE = tl.constexpr(1.0507009873554804934193349852946)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
INV_SQRT_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
GELU_TANH_COEF = tl.constexpr(0.044715)


@triton.jit
def _div_rn(a, b):
    """a / b, correctly rounded in float32 (but within 2**-40 of a rounding tie) and IEEE in float64.

    Compiled float32 `/` is `div.full.f32`, up to 2 ulp off; `tl.div_rn` is IEEE but ptxas compiles it with a call
    to a slow path whose frame it counts as spilled bytes (8 bytes in the eval backward, bench.kernel_report). So:
    the approximate reciprocal, one Newton step in float64 (relative error ~2**-44), the product in float64, one
    rounding to float32. A zero, infinite or NaN divisor keeps the approximate reciprocal (0 -> inf, inf -> 0)."""
    if a.dtype == tl.float32:
        r = (1.0 / b).to(tl.float64)
        refined = r + r * (1.0 - b.to(tl.float64) * r)
        r = tl.where((r != 0.0) & (tl.abs(r) < float("inf")), refined, r)
        return (a.to(tl.float64) * r).to(tl.float32)
    else:
        return a / b


@triton.jit
def _expm1(z):
    # Kahan: exact to a few ulp near 0, where exp(z) - 1 cancels.
    u = tl.exp(z)
    um1 = u - 1.0
    safe_log = tl.where((u == 1.0) | (um1 == -1.0), 1.0, tl.log(u))
    corrected = _div_rn(um1 * z, safe_log)
    return tl.where(u == 1.0, z, tl.where(um1 == -1.0, -1.0, tl.where(u == float("inf"), u, corrected)))


@triton.jit
def _log1p(w):
    # Kahan: exact to a few ulp for tiny w, where log(1 + w) rounds to 0.
    u = 1.0 + w
    safe_den = tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, w, tl.where(u == float("inf"), u, _div_rn(tl.log(u) * w, safe_den)))


@triton.jit
def _tanh(z):
    # tanh(z) = sign(z) * (1 - e) / (1 + e), e = exp(-2|z|) in (0, 1]: no overflow; -expm1 keeps small z exact.
    e = tl.exp(-2.0 * tl.abs(z))
    # plain `/`: 1 + e is in [1, 2], where a 2-ulp quotient is within torch's own tanh error; _div_rn here made
    # ptxas spill 8 bytes in gelu_tanh's sm_80 backward (kernel report)
    t = -_expm1(-2.0 * tl.abs(z)) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _softplus(z):
    # torch's mish uses softplus with threshold 20: z itself above it.
    return tl.where(z > 20.0, z, _log1p(tl.exp(tl.minimum(z, 20.0))))


@triton.jit
def _act(z, ACTIVATION: tl.constexpr, param):
    """act(z); ACTIVATION "" is the identity."""
    PARAM = tl.full([], param, z.dtype)  # a float64 argument, rounded once to ACC
    if ACTIVATION == "":
        return z
    elif ACTIVATION == "relu":
        return tl.where(z > 0, z, 0.0)
    elif ACTIVATION == "leaky_relu":
        return tl.where(z > 0, z, z * PARAM)
    elif ACTIVATION == "elu":
        return tl.where(z > 0, z, PARAM * _expm1(tl.minimum(z, 0.0)))
    elif ACTIVATION == "selu":
        return tl.where(z > 0, z, _expm1(tl.minimum(z, 0.0)) * SELU_ALPHA) * SELU_SCALE
    elif ACTIVATION == "silu":
        return z * tl.sigmoid(z)
    elif ACTIVATION == "gelu":
        return 0.5 * z * (1.0 + tl.erf(z * INV_SQRT_2))
    elif ACTIVATION == "gelu_tanh":
        return 0.5 * z * (1.0 + _tanh((z + z * z * z * GELU_TANH_COEF) * SQRT_2_OVER_PI))
    elif ACTIVATION == "sigmoid":
        return tl.sigmoid(z)
    elif ACTIVATION == "tanh":
        return _tanh(z)
    elif ACTIVATION == "mish":
        return z * _tanh(_softplus(z))
    elif ACTIVATION == "hardswish":
        # torch: x * min(max(x + 3, 0), 6) / 6, the division correctly rounded as torch's
        return _div_rn(z * tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0), tl.full(z.shape, 6.0, z.dtype))
    else:
        tl.static_assert(False, "bnfast: unknown activation (kernels/activations.py ACTIVATIONS)")


@triton.jit
def _act_grad(z, ACTIVATION: tl.constexpr, param):
    """d act / d z at the pre-activation z (1 for no activation)."""
    PARAM = tl.full([], param, z.dtype)  # a float64 argument, rounded once to ACC
    if ACTIVATION == "":
        return tl.full(z.shape, 1.0, z.dtype)
    elif ACTIVATION == "relu":
        return tl.where(z > 0, 1.0, 0.0)
    elif ACTIVATION == "leaky_relu":
        return tl.where(z > 0, 1.0, PARAM)
    elif ACTIVATION == "elu":
        return tl.where(z > 0, 1.0, PARAM * tl.exp(tl.minimum(z, 0.0)))
    elif ACTIVATION == "selu":
        return tl.where(z > 0, 1.0, tl.exp(tl.minimum(z, 0.0)) * SELU_ALPHA) * SELU_SCALE
    elif ACTIVATION == "silu":
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    elif ACTIVATION == "gelu":
        return 0.5 * (1.0 + tl.erf(z * INV_SQRT_2)) + z * INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    elif ACTIVATION == "gelu_tanh":
        t = _tanh((z + z * z * z * GELU_TANH_COEF) * SQRT_2_OVER_PI)
        dinner = (1.0 + z * z * (3.0 * GELU_TANH_COEF)) * SQRT_2_OVER_PI
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dinner
    elif ACTIVATION == "sigmoid":
        s = tl.sigmoid(z)
        return s * (1.0 - s)
    elif ACTIVATION == "tanh":
        t = _tanh(z)
        return 1.0 - t * t
    elif ACTIVATION == "mish":
        t = _tanh(_softplus(z))
        return t + z * (1.0 - t * t) * tl.sigmoid(z)
    elif ACTIVATION == "hardswish":
        # torch's hardswish_backward: 0 up to -3, x / 3 + 0.5 strictly between -3 and 3, 1 from 3 on
        return tl.where(z <= -3.0, 0.0, tl.where(z < 3.0, _div_rn(z, tl.full(z.shape, 3.0, z.dtype)) + 0.5, 1.0))
    else:
        tl.static_assert(False, "bnfast: unknown activation (kernels/activations.py ACTIVATIONS)")


@triton.jit
def _grad_pre_activation(dy, xhat, w, shift, ACTIVATION: tl.constexpr, param):
    """g = dL/dz = dy * act'(z), z = w*xhat + shift recomputed (shift = bias, plus the residual when one is fused;
    w and bias broadcast as [1, C, 1])."""
    if ACTIVATION == "":
        return dy
    else:
        return dy * _act_grad(xhat * w + shift, ACTIVATION, param)
