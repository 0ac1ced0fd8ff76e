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
shifted (count, mean, M2) rows, and ranks merge like splits. num_batches_tracked moves after the all_gather,
just before the running stats: a call that raises changes no state.

Masked (`mask=`, `pad_value=`; semantics as `bnfast.batch_norm`'s): each rank's partials are over its valid
positions (their count is its valid count: 0 for a rank with none, which sends count-0 rows like an empty rank),
so the gathered rows give the global valid count M, the statistics over all ranks' valid positions and the
running variance's M/(M-1). The backward all-reduces the same (2, C) sums (the grad partials' third plane, the
local valid count, is replaced by the gathered M) and grad_input honours the mask (a padded x is outside the
statistics; under pad_value no gradient flows through padded outputs). Fewer than 2 valid positions over the
group raise ValueError (torch's message) before any state changes. Only the gathered counts know M, so the
check reads them on the host after the all_gather (one device sync per masked training call, as the non-synced
masked check has): every rank reads the same rows, so all raise together and no rank is left waiting in a
collective. Before the collective each rank checks only what is its own (the mask's shape, dtype, device and
pad_value's type: a wrong one raises on that rank, as a wrong input does; a local count below 2 is legal).

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
    mask=None,
    pad_value=None,
):
    """FusedSyncBatchNorm's forward after the module's bookkeeping: `training` is the module's flag, `bn_training`
    whether batch statistics are used (training, or no buffers), `count_batch` whether to increment
    num_batches_tracked (after the checks, so that a rejected call changes nothing); `mask`, `pad_value`: masked
    BatchNorm (see the module docstring)."""
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
            mask=mask,
            pad_value=pad_value,
        )
    group = process_group_of(process_group)
    _check_device(x, group)
    _check_inputs(x, weight, bias, running_mean, running_var, eps)
    if mask is not None:  # this rank's own mask; the valid count is checked over the group, after the gather
        functional._check_mask(x, mask, False, pad_value)
        pad_value = None if pad_value is None else float(pad_value)
    elif pad_value is not None:
        raise ValueError("bnfast.batch_norm: pad_value needs a mask (it is written where the mask is False)")
    cumulative = momentum is None and num_batches_tracked is not None  # without the counter: factor 0, as torch
    return _synced(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        num_batches_tracked if cumulative or count_batch else None,
        count_batch,
        0.0 if momentum is None else float(momentum),
        cumulative,
        eps,
        act,
        group,
        world,
        mask,
        pad_value,
    )


@torch.compiler.disable
def _synced(
    x,
    weight,
    bias,
    running_mean,
    running_var,
    nbt,
    count_batch,
    momentum,
    cumulative,
    eps,
    act,
    group,
    world,
    mask,
    pad_value,
):
    return SyncBatchNormFunction.apply(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        nbt,
        count_batch,
        momentum,
        cumulative,
        eps,
        act.name,
        act.param,
        group,
        world,
        mask,
        pad_value,
    )


def _gather_rows(local: torch.Tensor, group, world: int) -> torch.Tensor:
    """all_gather of every rank's packed (4, C) partials: (world, 4, C), in rank order."""
    rows = local.new_empty((world, *local.shape))
    _all_gather_single(rows.view(world * local.shape[0], *local.shape[1:]), local, group=group)
    return rows


def _global_count(rows: torch.Tensor) -> torch.Tensor:
    """M over the process group (every channel has the same count: channel 0's; masked: the valid count), a device
    scalar."""
    return rows[:, 0, 0].sum()


def _check_global_count(rows: torch.Tensor, x: torch.Tensor, world: int) -> None:
    """Masked training: fewer than 2 valid positions over the group raise torch's ValueError. A host read of the
    gathered counts, identical on every rank: all ranks raise together (see the module docstring)."""
    valid = int(_global_count(rows))
    if valid < 2:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {valid} valid position(s) over the "
            f"{world} ranks of the process group (input size {x.shape} on this rank)"
        )


# ----------------------------------------------------------------------------------------------- the stages
class _KernelStages:
    """The launch stages (Triton kernels: CUDA tensors, or CPU tensors under the interpreter). `m3` is the mask's
    (N, 1, S) view beside x3 (None: unmasked), `pad` the pad value (None: padded outputs are normalised)."""

    @staticmethod
    def local_stats(x, x3, cfg, mask=None, m3=None):
        part, shift = launch.stats_partial(x3, cfg, m3)
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
    def normalize(x, x3, y, y3, weight, bias, mean, rstd, cfg, act, mask=None, m3=None, pad=None):
        launch.normalize(
            x3,
            y3,
            weight,
            bias,
            mean,
            rstd,
            cfg,
            stat_is_var=False,
            eps=0.0,
            activation=act.name,
            act_param=act.param,
            m=m3,
            pad=pad,
        )

    @staticmethod
    def grad_sums(dy, dy3, x, x3, weight, bias, mean, rstd, dw, db, cfg, act, mask=None, m3=None, pad=None):
        part = launch.grad_partial(
            dy3,
            x3,
            weight,
            bias,
            mean,
            rstd,
            cfg,
            training=True,
            eps=0.0,
            activation=act.name,
            act_param=act.param,
            m=m3,
            pad=pad,
        )
        return launch.grad_finalize(part, dw, db)  # masked: (3, C), the third row this rank's valid count

    @staticmethod
    def grad_input(
        dy, dy3, x, x3, dx, dx3, weight, bias, mean, rstd, mean_sums, cfg, act, mask=None, m3=None, pad=None
    ):
        if m3 is not None:  # the masked kernel takes 1/M from the sums' third row: the sums are means already
            mean_sums = torch.cat([mean_sums[:2], torch.ones_like(mean_sums[:1])])
        launch.grad_input(
            dy3,
            x3,
            dx3,
            weight,
            bias,
            mean,
            rstd,
            mean_sums,
            cfg,
            count=1,
            activation=act.name,
            act_param=act.param,
            m=m3,
            pad=pad,
        )


def _channel_rows(t: torch.Tensor, acc) -> torch.Tensor:
    """t (N, C, *) as (C, M) in ACC (a copy: the torch path is the slow one)."""
    return t.to(acc).transpose(0, 1).reshape(t.shape[1], -1)


def _valid(x: torch.Tensor, mask):
    """The mask as a channel-broadcast view of x's rank ((N, 1, *spatial)), or None."""
    return None if mask is None else mask.unsqueeze(1)


class _TorchStages:
    """The same stages in torch ops, for CPU tensors without the interpreter (same math, same partials; the
    normalisation and g = dy * act'(z) are ops' torch-op helpers, which the backward's slow path uses too)."""

    @staticmethod
    def local_stats(x, x3, cfg, mask=None, m3=None):
        xc = _channel_rows(x, launch.acc_dtype(x.dtype))
        if mask is None:
            v, count = None, torch.tensor(float(xc.shape[1]), dtype=xc.dtype)
            shift = xc[:, 0]
        else:  # over the valid positions; none: count 0, shift 0 (the kernel's values)
            v = mask.reshape(1, -1)
            count = v.sum().to(xc.dtype)
            shift = torch.where(count > 0, xc[:, v[0].to(torch.uint8).argmax()], 0.0)
        shift = torch.where(shift.abs() < float("inf"), shift, 0.0)  # NaN/inf: no shift, as the kernel
        d = xc - shift[:, None]
        if v is not None:
            d = torch.where(v, d, 0.0)
        mean_rel = d.sum(1) / count.clamp_min(1.0)
        dev = d - mean_rel[:, None]
        m2 = (dev if v is None else torch.where(v, dev, 0.0)).square().sum(1)
        return torch.stack([count.expand_as(shift), mean_rel, m2, shift])

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
    def normalize(x, x3, y, y3, weight, bias, mean, rstd, cfg, act, mask=None, m3=None, pad=None):
        _, z, _, _ = ops.torch_pre_activation(x, weight, bias, mean, rstd)
        y.copy_(act.apply(z))
        if pad is not None:
            y.masked_fill_(~_valid(x, mask), pad)

    @staticmethod
    def _grad(dy, x, weight, bias, mean, rstd, act, mask, pad):
        """(xhat, g, w, shape), g zeroed at padded positions under a pad value (their y was the constant)."""
        xhat, z, w, shape = ops.torch_pre_activation(x, weight, bias, mean, rstd)
        g = ops.torch_grad(dy, z, act)
        if pad is not None:
            g = torch.where(_valid(x, mask), g, 0.0)
        return xhat, g, w, shape

    @staticmethod
    def grad_sums(dy, dy3, x, x3, weight, bias, mean, rstd, dw, db, cfg, act, mask=None, m3=None, pad=None):
        xhat, g, _, _ = _TorchStages._grad(dy, x, weight, bias, mean, rstd, act, mask, pad)
        dims = [0, *range(2, x.dim())]
        sums = torch.stack([g.sum(dims), (g * xhat).sum(dims)])
        if dw is not None:
            dw.copy_(sums[1])
        if db is not None:
            db.copy_(sums[0])
        return sums

    @staticmethod
    def grad_input(
        dy, dy3, x, x3, dx, dx3, weight, bias, mean, rstd, mean_sums, cfg, act, mask=None, m3=None, pad=None
    ):
        xhat, g, w, shape = _TorchStages._grad(dy, x, weight, bias, mean, rstd, act, mask, pad)
        stats_term = mean_sums[0].view(shape) + xhat * mean_sums[1].view(shape)
        if mask is not None:  # a padded x is outside the statistics: only the direct term
            stats_term = torch.where(_valid(x, mask), stats_term, 0.0)
        dx.copy_((w * rstd).view(shape) * (g - stats_term))


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
    running_mean, running_var, num_batches_tracked (cumulative, or to count the batch; else None), whether to
    count the batch, momentum, cumulative, eps, activation name, activation parameter, process group, world
    size, mask (or None), pad value (or None)); returns y. The running stats and num_batches_tracked are updated
    in place, after the all_gather."""

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        running_mean,
        running_var,
        nbt,
        count_batch,
        momentum,
        cumulative,
        eps,
        activation,
        act_param,
        group,
        world,
        mask,
        pad,
    ):
        act = Activation(activation, act_param)
        stages = _KernelStages if functional.uses_triton(x) else _TorchStages
        acc = launch.acc_dtype(x.dtype)
        C = x.shape[1]
        y = launch.new_output(x)
        widen = launch.register_widening(acc)
        if mask is not None:
            x3, y3, m3, cfg = launch.prepare(x, y, launch.mask_view(mask), widen=widen, split=True)
        else:
            (x3, y3, cfg), m3 = launch.prepare(x, y, widen=widen, split=True), None
        if x.numel():
            local = stages.local_stats(x, x3, cfg, mask, m3)
        else:  # no samples here: count 0, which every merge skips; the collective still needs this rank
            local = torch.zeros((4, C), dtype=acc, device=x.device)
        rows = _gather_rows(local, group, world)
        if mask is not None:
            _check_global_count(rows, x, world)  # every rank alike, before any state changes
        if count_batch:
            nbt.add_(1)
        running = (running_mean, running_var) if running_mean is not None else None
        if stages is _KernelStages and running is not None:
            running = (*running, *running)  # read and written in place
        nbt = nbt if cumulative else None
        mean, rstd = stages.finalize(rows, running, nbt, eps=eps, momentum=momentum, cumulative=cumulative)
        if x.numel():
            stages.normalize(x, x3, y, y3, weight, bias, mean, rstd, cfg, act, mask, m3, pad)
        ctx.save_for_backward(x, weight, bias, mean, rstd, rows, mask)
        ctx.stages, ctx.act, ctx.group, ctx.pad = stages, act, group, pad
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, rstd, rows, mask = ctx.saved_tensors
        needs_dx, needs_dw, needs_db = ctx.needs_input_grad[:3]
        stages, act, pad = ctx.stages, ctx.act, ctx.pad
        dx, dw, db = launch.backward_outputs(x, weight, bias, (needs_dx, needs_dw, needs_db))[:3]
        widen = launch.register_widening(mean.dtype, act.name, backward=True)
        if mask is not None:
            x3, dy3, dx3, m3, cfg = launch.prepare(x, dy, dx, launch.mask_view(mask), widen=widen, split=True)
        else:
            (x3, dy3, dx3, cfg), m3 = launch.prepare(x, dy, dx, widen=widen, split=True), None
        masked = (mask, m3, pad)
        if x.numel():
            # masked kernels: (3, C), the third row this rank's valid count; the gathered rows hold the global one
            sums = stages.grad_sums(dy, dy3, x, x3, weight, bias, mean, rstd, dw, db, cfg, act, *masked)[:2]
        else:  # this rank's sums are 0, and so are its dweight and dbias
            sums = torch.zeros((2, x.shape[1]), dtype=mean.dtype, device=x.device)
            for grad in (dw, db):
                if grad is not None:
                    grad.zero_()
        if needs_dx:  # every rank of the group takes part: all or none need dx (one model, one graph)
            dist.all_reduce(sums, group=ctx.group)
            sums /= _global_count(rows)  # means over the global batch (its valid positions), on device
            if x.numel():
                stages.grad_input(dy, dy3, x, x3, dx, dx3, weight, bias, mean, rstd, sums, cfg, act, *masked)
        # one gradient per input: x, weight, bias; none for the buffers, the flags, the scalars, the group, the mask
        return dx, dw, db, *(None,) * 13
