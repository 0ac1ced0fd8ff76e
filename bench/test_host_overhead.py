"""bnfast's own host time per layer call, with the Triton launches recorded instead of run (CPU; no GPU needed).

On a GPU a layer of the MNIST model (batch 32, 32 channels) computes for ~3 us, so the Python between
`module(x)` and the kernel launches decides the step time. This benchmark times exactly that Python:
`bnfast.testing.record_launches()` swaps every kernel for a recorder, so what is left is bnfast's checks,
routing, autograd bookkeeping, launch configuration and output allocation (plus torch's autograd engine for
the backward), per forward and per forward+backward of FusedBatchNorm1d(32, activation="relu") on (32, 32).
Triton's own launch path (`JITFunction.run`: argument binding, cache lookup, the driver call) is excluded:
it is the same for every Triton kernel and bnfast cannot shorten it except by launching fewer kernels.

Beside it, as yardsticks on the same shape: torch's own CPU `F.batch_norm` + `F.relu` (real compute, tiny),
and the two autograd entries of bnfast/ops.py called directly (the torch.library op in eager vs the
autograd.Function), which is the measurement behind keeping the Function as the eager entry.

    PYTHONPATH=. pytest bench/test_host_overhead.py --benchmark-only      # CPU or CUDA (CUDA tensors then)
Runs under `--benchmark-disable` (CI) as a smoke test: each body once.
"""

import pytest
import torch
import torch.nn.functional as F

import bnfast
from bnfast import ops

SHAPE = (32, 32)  # the MNIST layer
PROVIDERS = ("bnfast", "op-entry", "function-entry", "torch")


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
    benchmark.group = f"host time per {mode}, {SHAPE[0]}x{SHAPE[1]} (launches recorded, not run)"
    benchmark.extra_info.update(provider=provider, mode=mode, shape=list(SHAPE))
    step = _step(provider, mode, _device())
    if provider == "torch":  # a yardstick that really computes (on CPU) or launches (CUDA)
        benchmark.pedantic(step, rounds=200 if not benchmark.disabled else 1, iterations=10, warmup_rounds=5)
        return
    with bnfast.testing.record_launches() as log:
        step()
        launches = len(log)
        benchmark.pedantic(lambda: (step(), log.clear()), rounds=200 if not benchmark.disabled else 1,
                           iterations=10, warmup_rounds=5)  # fmt: skip
    benchmark.extra_info["launches"] = launches
    assert launches == (1 if mode == "fwd" else 2)  # (32, 32) is single-pass: one launch each way
