"""SyncBatchNorm: the cost of the collective path itself, world size 1 over NCCL, providers side by side.

    PYTHONPATH=. pytest bench/test_sync_batch_norm.py --benchmark-only     # CUDA

One pytest-benchmark group per shape (fwd+bwd, float32, no activation), three providers:
- "bnfast-sync": FusedSyncBatchNorm's synced autograd Function (bnfast/distributed.py), called directly: at world
  size 1 the module itself takes the non-synced path, so this forces what W > 1 runs: stats partials, merge,
  all_gather, finalize over the gathered rows, normalize; grad partials, finalize, all_reduce, dx;
- "bnfast": FusedBatchNorm1d (no collective; the launch plan it picks);
- "torch-sync": torch's SyncBatchNorm autograd Function (torch.nn.modules._functions), called directly for the same
  reason (nn.SyncBatchNorm falls back to F.batch_norm at world size 1): batch_norm_stats, all_gather, the empty-rank
  mask (a host sync), gather_stats_with_counts, elemt; backward_reduce, all_reduce, backward_elemt.
At world size 1 NCCL's collectives are local copies: the difference to "bnfast" is the path's launches and host
work, not the network. Bytes per layer per step at world size W (float32; bnfast/distributed.py and the README):
forward all_gather W * 16C bytes (bnfast) vs W * (8C + 4) (torch); backward all_reduce 8C both.
Timing, checks and extra_info as bench/test_batch_norm.py (bench/harness.py); speedups vs torch-sync and bnfast.
Under `--benchmark-disable` (no CUDA): each body once on the smoke shapes, gloo on CPU, kernels interpreted;
torch-sync is skipped there (its kernels are CUDA-only).
"""

import pytest
import torch.distributed as dist
from torch import nn

from bench import harness

PROVIDERS = ("bnfast-sync", "bnfast", "torch-sync")
pytestmark = harness.timed_by("device")  # shapes: bench/cases.py SYNC_SHAPES (parametrized in bench/conftest.py)


@pytest.fixture(scope="module")
def process_group(device):
    """World size 1 in this process: NCCL on CUDA, gloo on CPU (an in-process store)."""
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


class ForcedSync(nn.Module):
    """A BatchNorm's parameters and buffers, forward through a provider's synced autograd Function at world size 1."""

    def __init__(self, bn: nn.Module, provider: str, group):
        super().__init__()
        self.bn, self.provider, self.group = bn, provider, group

    def forward(self, x):
        bn = self.bn
        if self.provider == "torch-sync":
            from torch.nn.modules._functions import SyncBatchNorm

            return SyncBatchNorm.apply(
                x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, bn.momentum, self.group, 1
            )
        from bnfast.distributed import SyncBatchNormFunction

        return SyncBatchNormFunction.apply(
            x,
            bn.weight,
            bn.bias,
            bn.running_mean,
            bn.running_var,
            bn.num_batches_tracked,
            True,  # count the batch (after the all_gather)
            bn.momentum,
            False,
            bn.eps,
            "",
            0.0,
            self.group,
            1,
            None,  # no mask
            None,
        )


def _module(provider, case, device, group):
    module = harness.build_module("bnfast", case, device)  # FusedBatchNorm1d with the seeded state
    return module if provider == "bnfast" else ForcedSync(module, provider, group)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_sync_bn(benchmark, sync_shape, provider, device, process_group, copy_bandwidth):
    case = harness.Case("fwd+bwd", "none", "float32", tuple(sync_shape))
    info = benchmark.extra_info
    # no "mode" key: bench/summarize.py's BatchNorm tables (bnfast vs eager vs compile) take results that have one
    info.update(sync_case=case.id, shape=list(case.shape), provider=provider, min_bytes=case.min_bytes(), world_size=1)
    if provider == "torch-sync" and device.type != "cuda":
        pytest.skip("torch's SyncBatchNorm kernels (batch_norm_stats, ...) are CUDA-only")
    copies = 1 if benchmark.disabled else harness.rotation_copies(case, device)
    inputs = harness.make_inputs(case, device, copies)
    module = _module(provider, case, device, process_group)
    expected = harness.reference(case, harness.initial_state(module), *inputs[0])

    def check(outputs):
        return {"max_err": harness.check(outputs, expected, case.torch_dtype)}

    median = harness.run_case(
        benchmark,
        harness.make_step(module, case),
        inputs,
        group=f"sync {case.id}",
        provider=provider,
        timing="device",
        check=check,
        baselines=("torch-sync", "bnfast"),
    )
    if median is None:
        return
    C = case.shape[1]
    info.update(
        copies=copies,
        GBps=round(case.min_bytes() / median / 1e9, 3),
        copy_GBps=round(copy_bandwidth / 1e9, 1),
        bytes_all_gather={"bnfast-sync": 16 * C, "torch-sync": 8 * C + 4}.get(provider, 0),
        bytes_all_reduce=8 * C if provider != "bnfast" else 0,
    )
