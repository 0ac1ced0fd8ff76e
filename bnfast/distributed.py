"""SyncBatchNorm on torch.distributed: the collectives that sit between the launch stages, and their autograd.

`sync_batch_norm_impl` is what `FusedSyncBatchNorm.forward` calls. In training, with an initialised process
group of world size W > 1, it runs `SyncBatchNormFunction`; otherwise (eval, no process group, W = 1) exactly
the non-synced path, `functional.batch_norm_impl`, with no communication. One collective each way:

    forward   part, shift = stats_partial(x)       split plan forced: K rows of (count, mean of x - shift, M2)
              local = stats_merge(part, shift)     this rank's K rows merged in order: one packed (4, C) tensor
                                                   (count, mean of x - shift, M2, shift), whatever N and K are
              all_gather(local) -> (W, 4, C)       a fixed size per rank: uneven batches just work, and a rank
                                                   with no samples sends count-0 rows, which add nothing
              stats_finalize(rows, row shifts)     ranks merged in rank order (parallel formula, never
                                                   E[x^2]-E[x]^2; means rebased to the first non-empty rank's
                                                   shift): identical bits on every rank; the running stats
                                                   move with the global unbiased variance on every rank alike
              y = normalize(x, mean, rstd)
    backward  sums = grad_finalize(grad_partial)   (2, C) sum g, sum g*xhat; also writes the LOCAL dweight and
                                                   dbias, as torch does (DDP averages them over ranks)
              all_reduce(sums); sums /= M_global   M_global = the gathered counts' sum, on device
              dx = grad_input(dy, x, sums, count=1)
No `.item()` / `.cpu()`: nothing waits for the device (torch's SyncBatchNorm drops empty ranks by boolean
indexing, a host sync). The accuracy is the single-device split plan's: each rank's partials are the same
shifted (count, mean, M2) rows, and ranks merge like splits.

Bytes communicated per layer per step, ACC = 4 bytes (float32 and 16-bit inputs) or 8 (float64):
                  bnfast FusedSyncBatchNorm                 torch.nn.SyncBatchNorm
    forward       all_gather, 4C ACC values per rank:       all_gather, 2C+1 values per rank (mean, invstd,
                  W * 16C bytes received                    count): W * (8C + 4) bytes received
    backward      all_reduce of 2C ACC values: 8C bytes     all_reduce of 2C values: 8C bytes
At BatchNorm sizes (C <= a few thousand) both are a few KiB: latency, not bandwidth, decides, and both issue
one collective each way. The two extra values per channel carry M2 (exact, where invstd folds in eps) and the
shift (what keeps partial means small; see the Accuracy note in kernels/batch_norm.py).

Backends. NCCL with CUDA tensors; gloo with CPU tensors (and CUDA ones). torch's SyncBatchNorm refuses CPU
tensors outright; bnfast runs them on gloo: the Triton kernels under TRITON_INTERPRET=1, else the same stages in
torch ops (`_TorchStages`) with the same collectives. A tensor the group's backend cannot carry (CPU on NCCL)
raises a ValueError before any state changes, as torch raises for it.

Not covered: double backward (`once_differentiable`), functorch transforms, and torch.compile, which runs the
synced forward eagerly (`torch.compiler.disable`: a graph break, as torch's own SyncBatchNorm has).

Imports: torch, torch.distributed, bnfast.activations, bnfast.functional, bnfast.ops (the torch-op math shared
with the backward's slow path), bnfast.kernels.launch.
"""

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from . import functional, ops
from .activations import Activation
from .kernels import launch

# all_gather into one tensor; `all_gather_single` is its name since torch 2.10 (gloo and NCCL both take it)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def process_group_of(process_group):
    """The group a module syncs over: its own, or the default (WORLD) one."""
    return process_group if process_group is not None else dist.group.WORLD


def sync_world_size(process_group) -> int:
    """World size of the module's group, or 1 when torch.distributed is not initialised (no sync)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group_of(process_group))


def _check_device(x: torch.Tensor, group) -> None:
    """torch refuses CPU tensors in SyncBatchNorm whatever the backend; bnfast refuses only what the group's backend
    cannot carry (CPU tensors on NCCL), with the same exception type."""
    device_types = getattr(group, "_device_types", None)
    if device_types is not None and x.device.type not in {d.type for d in device_types}:
        raise ValueError(
            f"SyncBatchNorm: the process group's backend ({dist.get_backend(group)}) cannot communicate "
            f"{x.device.type} tensors; use a gloo process group for CPU tensors, NCCL for CUDA ones"
        )


def _check_inputs(x, weight, bias, running_mean, running_var, eps) -> None:
    """functional's fast checks, without the one-value-per-channel rule: under SyncBatchNorm a rank may hold one
    sample, or none. Anything else gets torch's verdict (in eval mode, which has no batch-size rule)."""
    if functional._half_pair(running_mean, running_var):  # torch's training verdict (eval's would differ)
        raise ValueError(functional.HALF_PAIR_MESSAGE)
    if functional._common_layout(x, (weight, bias, running_mean, running_var), eps):
        return
    C = x.shape[1]
    dtype = x.dtype if x.is_floating_point() else torch.float32
    rm = running_mean if running_mean is not None else torch.zeros(C, dtype=dtype, device=x.device)
    rv = running_var if running_var is not None else torch.ones(C, dtype=dtype, device=x.device)
    functional._torch_verdict(x, rm, rv, weight, bias, False, eps)


def sync_batch_norm_impl(
    x,
    running_mean,
    running_var,
    weight,
    bias,
    training,
    bn_training,
    momentum,
    eps,
    act: Activation,
    num_batches_tracked,
    count_batch: bool,
    process_group,
):
    """FusedSyncBatchNorm's forward after the module's bookkeeping: `training` is the module's flag, `bn_training`
    whether batch statistics are used (training, or no buffers), `count_batch` whether to increment
    num_batches_tracked (after the checks, so that a rejected call changes nothing)."""
    if x.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")
    if x.shape[1] == 0:
        raise ValueError("SyncBatchNorm number of input channels should be non-zero")
    world = sync_world_size(process_group) if training and bn_training else 1
    if world == 1:
        return functional.batch_norm_impl(
            x,
            running_mean,
            running_var,
            weight,
            bias,
            bn_training,
            momentum,
            eps,
            act,
            num_batches_tracked,
            count_batch,
        )
    group = process_group_of(process_group)
    _check_device(x, group)
    _check_inputs(x, weight, bias, running_mean, running_var, eps)
    cumulative = momentum is None and num_batches_tracked is not None  # without the counter: factor 0, as torch
    if count_batch:
        num_batches_tracked.add_(1)
    return _synced(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        num_batches_tracked if cumulative else None,
        0.0 if momentum is None else float(momentum),
        cumulative,
        eps,
        act,
        group,
        world,
    )


@torch.compiler.disable
def _synced(x, weight, bias, running_mean, running_var, nbt, momentum, cumulative, eps, act, group, world):
    return SyncBatchNormFunction.apply(
        x, weight, bias, running_mean, running_var, nbt, momentum, cumulative, eps, act.name, act.param, group, world
    )


def _gather_rows(local: torch.Tensor, group, world: int) -> torch.Tensor:
    """all_gather of every rank's packed (4, C) partials: (world, 4, C), in rank order."""
    rows = local.new_empty((world, *local.shape))
    _all_gather_single(rows.view(world * local.shape[0], *local.shape[1:]), local, group=group)
    return rows


def _global_count(rows: torch.Tensor) -> torch.Tensor:
    """M over the process group (every channel has the same count: channel 0's), a device scalar."""
    return rows[:, 0, 0].sum()


# ----------------------------------------------------------------------------------------------- the stages
class _KernelStages:
    """The launch stages (Triton kernels: CUDA tensors, or CPU tensors under the interpreter)."""

    @staticmethod
    def local_stats(x, x3, cfg):
        part, shift = launch.stats_partial(x3, cfg)
        return launch.stats_merge(part, shift)

    @staticmethod
    def finalize(rows, running, nbt, *, eps, momentum, cumulative):
        C = rows.shape[2]
        mean, rstd = (torch.empty(C, dtype=rows.dtype, device=rows.device) for _ in range(2))
        launch.stats_finalize(
            rows[:, :3].transpose(0, 1),
            rows[:, 3],
            mean,
            rstd,
            running,
            nbt,
            eps=eps,
            momentum=momentum,
            cumulative=cumulative,
        )
        return mean, rstd

    @staticmethod
    def normalize(x, x3, y, y3, weight, bias, mean, rstd, cfg, act):
        launch.normalize(
            x3, y3, weight, bias, mean, rstd, cfg, stat_is_var=False, eps=0.0, activation=act.name, act_param=act.param
        )

    @staticmethod
    def grad_sums(dy, dy3, x, x3, weight, bias, mean, rstd, dw, db, cfg, act):
        part = launch.grad_partial(
            dy3, x3, weight, bias, mean, rstd, cfg, training=True, eps=0.0, activation=act.name, act_param=act.param
        )
        return launch.grad_finalize(part, dw, db)

    @staticmethod
    def grad_input(dy, dy3, x, x3, dx, dx3, weight, bias, mean, rstd, mean_sums, cfg, act):
        launch.grad_input(
            dy3, x3, dx3, weight, bias, mean, rstd, mean_sums, cfg, count=1, activation=act.name, act_param=act.param
        )


def _channel_rows(t: torch.Tensor, acc) -> torch.Tensor:
    """t (N, C, *) as (C, M) in ACC (a copy: the torch path is the slow one)."""
    return t.to(acc).transpose(0, 1).reshape(t.shape[1], -1)


class _TorchStages:
    """The same stages in torch ops, for CPU tensors without the interpreter (same math, same partials; the
    normalisation and g = dy * act'(z) are ops' torch-op helpers, which the backward's slow path uses too)."""

    @staticmethod
    def local_stats(x, x3, cfg):
        xc = _channel_rows(x, launch.acc_dtype(x.dtype))
        shift = xc[:, 0]
        shift = torch.where(shift.abs() < float("inf"), shift, 0.0)  # NaN/inf: no shift, as the kernel
        d = xc - shift[:, None]
        mean_rel = d.mean(1)
        m2 = (d - mean_rel[:, None]).square().sum(1)
        return torch.stack([torch.full_like(shift, xc.shape[1]), mean_rel, m2, shift])

    @staticmethod
    def finalize(rows, running, nbt, *, eps, momentum, cumulative):
        cnt, mean_k, m2_k, shift_k = rows.unbind(1)  # each (W, C)
        first = (cnt > 0).to(torch.uint8).argmax(0)  # the first non-empty rank (0 when none)
        shift = shift_k.gather(0, first[None])[0]
        mean_k = torch.where(cnt > 0, mean_k + (shift_k - shift), 0.0)
        total = cnt.sum(0)
        safe_total = total.clamp_min(1.0)
        mean_rel = (cnt * mean_k).sum(0) / safe_total
        m2 = (m2_k + torch.where(cnt > 0, cnt * (mean_k - mean_rel).square(), 0.0)).sum(0)
        var = m2 / safe_total
        mean = shift + mean_rel
        if running is not None:
            rm, rv = running
            factor = nbt.reciprocal().to(rows.dtype) if cumulative else momentum
            unbiased = var * (safe_total / (safe_total - 1.0).clamp_min(1.0))
            with torch.no_grad():
                rm.copy_((1.0 - factor) * rm.to(rows.dtype) + factor * mean)
                rv.copy_((1.0 - factor) * rv.to(rows.dtype) + factor * unbiased)
        return mean, torch.rsqrt(var + eps)

    @staticmethod
    def normalize(x, x3, y, y3, weight, bias, mean, rstd, cfg, act):
        _, z, _, _ = ops.torch_pre_activation(x, weight, bias, mean, rstd)
        y.copy_(act.apply(z))

    @staticmethod
    def grad_sums(dy, dy3, x, x3, weight, bias, mean, rstd, dw, db, cfg, act):
        xhat, z, _, _ = ops.torch_pre_activation(x, weight, bias, mean, rstd)
        g = ops.torch_grad(dy, z, act)
        dims = [0, *range(2, x.dim())]
        sums = torch.stack([g.sum(dims), (g * xhat).sum(dims)])
        if dw is not None:
            dw.copy_(sums[1])
        if db is not None:
            db.copy_(sums[0])
        return sums

    @staticmethod
    def grad_input(dy, dy3, x, x3, dx, dx3, weight, bias, mean, rstd, mean_sums, cfg, act):
        xhat, z, w, shape = ops.torch_pre_activation(x, weight, bias, mean, rstd)
        g = ops.torch_grad(dy, z, act)
        dx.copy_((w * rstd).view(shape) * (g - mean_sums[0].view(shape) - xhat * mean_sums[1].view(shape)))


def local_partials(x: torch.Tensor) -> torch.Tensor:
    """x's packed (4, C) partials in ACC (count, mean of x - shift, M2, shift), as the forward sends them: the
    kernels' stats stages on the split plan, or the torch-op stages. Also `bnfast.recalibrate`'s unit."""
    acc = launch.acc_dtype(x.dtype)
    if x.numel() == 0:
        return torch.zeros((4, x.shape[1]), dtype=acc, device=x.device)
    if not functional.uses_triton(x):
        return _TorchStages.local_stats(x, None, None)
    x3, cfg = launch.prepare(x, widen=launch.register_widening(acc), split=True)
    return _KernelStages.local_stats(x, x3, cfg)


# ------------------------------------------------------------------------------------------------- autograd
class SyncBatchNormFunction(torch.autograd.Function):
    """Training forward and backward over a process group (see the module docstring). Inputs: (x, weight, bias,
    running_mean, running_var, num_batches_tracked (cumulative only), momentum, cumulative, eps, activation name,
    activation parameter, process group, world size); returns y. The running stats are updated in place."""

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        running_mean,
        running_var,
        nbt,
        momentum,
        cumulative,
        eps,
        activation,
        act_param,
        group,
        world,
    ):
        act = Activation(activation, act_param)
        stages = _KernelStages if functional.uses_triton(x) else _TorchStages
        acc = launch.acc_dtype(x.dtype)
        C = x.shape[1]
        y = launch.new_output(x)
        x3, y3, cfg = launch.prepare(x, y, widen=launch.register_widening(acc), split=True)
        if x.numel():
            local = stages.local_stats(x, x3, cfg)
        else:  # no samples here: count 0, which every merge skips; the collective still needs this rank
            local = torch.zeros((4, C), dtype=acc, device=x.device)
        rows = _gather_rows(local, group, world)
        running = (running_mean, running_var) if running_mean is not None else None
        if stages is _KernelStages and running is not None:
            running = (*running, *running)  # read and written in place
        mean, rstd = stages.finalize(rows, running, nbt, eps=eps, momentum=momentum, cumulative=cumulative)
        if x.numel():
            stages.normalize(x, x3, y, y3, weight, bias, mean, rstd, cfg, act)
        ctx.save_for_backward(x, weight, bias, mean, rstd, rows)
        ctx.stages, ctx.act, ctx.group = stages, act, group
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, rstd, rows = ctx.saved_tensors
        needs_dx, needs_dw, needs_db = ctx.needs_input_grad[:3]
        stages, act = ctx.stages, ctx.act
        dx, dw, db = launch.backward_outputs(x, weight, bias, (needs_dx, needs_dw, needs_db))[:3]
        widen = launch.register_widening(mean.dtype, act.name, backward=True)
        x3, dy3, dx3, cfg = launch.prepare(x, dy, dx, widen=widen, split=True)
        if x.numel():
            sums = stages.grad_sums(dy, dy3, x, x3, weight, bias, mean, rstd, dw, db, cfg, act)
        else:  # this rank's sums are 0, and so are its dweight and dbias
            sums = torch.zeros((2, x.shape[1]), dtype=mean.dtype, device=x.device)
            for grad in (dw, db):
                if grad is not None:
                    grad.zero_()
        if needs_dx:  # every rank of the group takes part: all or none need dx (one model, one graph)
            dist.all_reduce(sums, group=ctx.group)
            sums /= _global_count(rows)  # means over the global batch, on device: grad_input's count is 1
            if x.numel():
                stages.grad_input(dy, dy3, x, x3, dx, dx3, weight, bias, mean, rstd, sums, cfg, act)
        # one gradient per input: x, weight, bias; none for the buffers, the scalars, the group
        return dx, dw, db, *(None,) * 10
