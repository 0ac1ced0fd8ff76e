"""`recalibrate(model, loader, num_batches=None)`: exact population statistics for every BatchNorm layer.

The running stats of a trained model are a momentum average of batch statistics: the mean of batch means
matches the data's mean, but the average of batch variances misses the spread of the batch means themselves
(and weighs recent batches most). `recalibrate` replaces running_mean / running_var of every BatchNorm module
(torch's `_BatchNorm` subclasses: BatchNorm1d/2d/3d, SyncBatchNorm, bnfast's) by the exact mean and unbiased
variance of that layer's input over the data:

- One pass over `loader` (its first `num_batches` batches), under no_grad. The BatchNorm modules run in training
  mode with momentum 0: each normalises with its batch's statistics, as in training, so every layer sees the
  inputs training produced (the "precise BatchNorm" recipe); other modules keep their mode (call model.eval()
  first to keep dropout off). Batches are `(input, target, ...)` tuples/lists (the first item is fed) or plain
  tensors, moved to the model's device.
- A forward pre-hook takes each layer's input partial: the kernels' stats stages on the split plan (the same
  (count, mean of x - shift, M2) rows SyncBatchNorm gathers, merged to one row: `distributed.local_partials`),
  or the same in torch ops off the kernels' path; the partials are merged batch by batch in float64 with the
  parallel formula (never E[x^2] - E[x]^2).
- With an initialised process group (every rank calls `recalibrate` on its shard of the data, for the same
  number of batches: SyncBatchNorm layers communicate in each forward), one all_gather of every layer's
  (count, mean, M2) and a merge in rank order: every rank ends with the same statistics.
- Afterwards each module's training flag, momentum and num_batches_tracked are restored, and the running stats
  set to mean and M2 / (count - 1). A layer that saw fewer than two values keeps its stats (with a warning).
  Modules without running stats (track_running_stats=False) are left alone.

Imports: torch, torch.distributed, bnfast.distributed.
"""

import warnings

import torch
import torch.distributed as dist
from torch import nn

from .distributed import local_partials


def _merge(a, b):
    """Chan's parallel merge of two (count, mean, M2) triples of float64 (C,) tensors."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    delta = mean_b - mean_a
    frac = n_b / n.clamp_min(1.0)
    cross = torch.where((n_a > 0) & (n_b > 0), delta * delta * n_a * frac, 0.0)
    return n, torch.where(n_b > 0, mean_a + delta * frac, mean_a), m2_a + m2_b + cross


def _partial64(x: torch.Tensor):
    """(count, mean, M2) of x's channels in float64, from the packed (count, mean - shift, M2, shift) row."""
    count, mean_rel, m2, shift = local_partials(x.detach()).double()
    return count, shift + mean_rel, m2


def _batches(loader, num_batches):
    for i, batch in enumerate(loader):
        if num_batches is not None and i >= num_batches:
            return
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def _device_of(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def recalibrate(model: nn.Module, loader, num_batches: int | None = None) -> nn.Module:
    """Set every BatchNorm's running_mean/running_var to the exact mean and unbiased variance of its input over
    `loader` (across ranks when a process group is initialised); see the module docstring. Returns `model`."""
    bn_type = nn.modules.batchnorm._BatchNorm
    layers = [m for m in model.modules() if isinstance(m, bn_type) and m.running_mean is not None]
    if not layers:
        return model
    stats: dict[nn.Module, tuple] = {}

    def observe(module, args):
        x = args[0]
        if x.numel() == 0:
            return
        part = _partial64(x)
        stats[module] = _merge(stats[module], part) if module in stats else part

    saved = [
        (m.training, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
        for m in layers
    ]
    handles = [m.register_forward_pre_hook(observe) for m in layers]
    try:
        for m in layers:
            m.train()
            m.momentum = 0.0  # batch statistics, running stats untouched: they are replaced below
        device = _device_of(model)
        for x in _batches(loader, num_batches):
            model(x.to(device))
    finally:
        for h in handles:
            h.remove()
        for m, (training, momentum, nbt) in zip(layers, saved, strict=True):
            m.train(training)
            m.momentum = momentum
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)
    merged = _across_ranks([stats.get(m) for m in layers], [m.num_features for m in layers], device)
    for m, (count, mean, m2) in zip(layers, merged, strict=True):
        if not bool((count >= 2).all()):
            warnings.warn(
                f"bnfast.recalibrate: {type(m).__name__} saw fewer than 2 values; its stats are kept", stacklevel=2
            )
            continue
        m.running_mean.copy_(mean)
        m.running_var.copy_(m2 / (count - 1.0))
    return model


def _across_ranks(stats, sizes, device):
    """Each layer's (count, mean, M2) merged over the process group's ranks in rank order (one all_gather of all
    layers at once); as they are without a process group."""
    zeros = [tuple(torch.zeros(C, dtype=torch.float64, device=device) for _ in range(3)) for C in sizes]
    stats = [s if s is not None else z for s, z in zip(stats, zeros, strict=True)]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    local = torch.cat([torch.stack(s) for s in stats], dim=1)  # (3, sum C)
    every = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(every, local)
    merged = every[0]
    merged = [tuple(merged[i].split(sizes)) for i in range(3)]
    out = [tuple(merged[i][j] for i in range(3)) for j in range(len(sizes))]
    for other in every[1:]:
        parts = [other[i].split(sizes) for i in range(3)]
        out = [_merge(out[j], tuple(parts[i][j] for i in range(3))) for j in range(len(sizes))]
    return out
