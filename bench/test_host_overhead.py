"""bnfast's own host time per layer call, with the Triton launches recorded instead of run (CPU; no GPU needed).

On a GPU a layer of the MNIST model (batch 32, 32 channels) computes for ~3 us, so the Python between
`module(x)` and the kernel launches decides the step time. This benchmark times exactly that Python:
`bnfast.testing.record_launches()` swaps every kernel for a recorder, so what is left is bnfast's checks,
routing, autograd bookkeeping, launch configuration and output allocation (plus torch's autograd engine for
the backward), per forward and per forward+backward of FusedBatchNorm1d(32, activation="relu") on (32, 32).
Triton's own launch path (`JITFunction.run`: argument binding, cache lookup, the driver call) is excluded:
it is the same for every Triton kernel and bnfast cannot shorten it except by launching fewer kernels.

Beside it, as yardsticks on the same shape: torch's own CPU `F.batch_norm` + `F.relu` (real compute, tiny);
"autograd-floor", an autograd.Function with bnfast's 13 inputs that only allocates its outputs (y, mean, rstd;
dx, dweight, dbias): what any autograd.Function-based layer pays to torch (apply, save, the engine), so
bnfast's own Python is the "bnfast" figure minus this one; and the two autograd entries of bnfast/ops.py
called directly (the torch.library op in eager vs the autograd.Function), which is the measurement behind
keeping the Function as the eager entry.

    PYTHONPATH=. pytest bench/test_host_overhead.py --benchmark-only      # CPU or CUDA (CUDA tensors then)
Runs under `--benchmark-disable` (CI) as a smoke test: each body once.
"""

import pytest
import torch
import torch.nn.functional as F

import bnfast
from bench import harness
from bench.cases import HOST_OVERHEAD_SHAPE as SHAPE  # the MNIST layer
from bnfast import ops

PROVIDERS = ("bnfast", "op-entry", "function-entry", "autograd-floor", "torch")
BASELINES = ("torch", "autograd-floor")  # speedup_vs_torch, speedup_vs_autograd-floor in extra_info


class _AllocateOnly(torch.autograd.Function):
    """The autograd floor: bnfast's inputs and outputs, no work."""

    @staticmethod
    def forward(ctx, x, weight, bias, rm, rv, nbt, training, momentum, cumulative, eps, activation, param, residual):
        C = x.shape[1]
        y, mean, rstd = torch.empty_like(x), x.new_empty(C), x.new_empty(C)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)
        return y, mean, rstd

    @staticmethod
    def backward(ctx, dy, *_):
        x, weight, bias, _, _ = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias), *(None,) * 10


def _device():
    if torch.cuda.is_available() and not bnfast.kernels.is_interpreted():
        return torch.device("cuda")
    return torch.device("cpu")  # the interpreter routes CPU tensors to the (recorded) kernels


def _step(provider, mode, device):
    x = torch.randn(SHAPE, device=device, requires_grad=mode == "fwd+bwd")
    dy = torch.randn(SHAPE, device=device)
    module = bnfast.FusedBatchNorm1d(SHAPE[1], activation="relu", device=device)
    w, b, rm, rv = module.weight, module.bias, module.running_mean, module.running_var
    if provider == "bnfast":
        forward = module
    elif provider == "op-entry":
        forward = lambda x: ops.batch_norm_op(x, w, b, rm, rv, None, True, 0.1, False, 1e-5, "relu", 0.0)[0]  # noqa: E731
    elif provider == "function-entry":
        forward = lambda x: ops.BatchNormFunction.apply(x, w, b, rm, rv, None, True, 0.1, False, 1e-5, "relu",  # noqa: E731
                                                        0.0, None)[0]  # fmt: skip
    elif provider == "autograd-floor":
        forward = lambda x: _AllocateOnly.apply(x, w, b, rm, rv, None, True, 0.1, False, 1e-5, "relu", 0.0,  # noqa: E731
                                                None)[0]  # fmt: skip
    else:
        forward = lambda x: F.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))  # noqa: E731
    if mode == "fwd":

        def step():
            with torch.no_grad():
                return forward(x)
    else:

        def step():
            forward(x).backward(dy)

    return step


@pytest.mark.host_overhead
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_host_overhead(benchmark, provider, mode):
    if not bnfast.uses_triton(torch.empty(0, device=_device())):
        pytest.skip("bnfast routes these tensors to torch (no CUDA, no TRITON_INTERPRET=1): nothing to time")
    benchmark.extra_info.update(provider=provider, mode=mode, shape=list(SHAPE))
    group = f"host time per {mode}, {SHAPE[0]}x{SHAPE[1]} (launches recorded, not run)"
    step = _step(provider, mode, _device())
    if provider in ("torch", "autograd-floor"):  # yardsticks: no bnfast launch to record
        harness.run_case(benchmark, step, [()], group=group, provider=provider, timing="host", baselines=BASELINES)
        return
    expected = 1 if mode == "fwd" else 2  # (32, 32) is single-pass: one launch each way
    with bnfast.testing.record_launches() as log:

        def call():
            step()
            launches = len(log)
            log.clear()
            return launches

        def check(launches):
            assert launches == expected, f"{launches} launches, expected {expected}"
            return {"launches": launches}

        harness.run_case(benchmark, call, [()], group=group, provider=provider, timing="host", check=check,
                         baselines=BASELINES)  # fmt: skip
