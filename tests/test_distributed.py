"""FusedSyncBatchNorm over gloo on CPU processes: torch.multiprocessing spawn, a file store in a tmp dir.

One spawn per run (`RUNS`: world sizes 2 and 3 with the kernels under the interpreter, and world size 2 with the
torch-op stages, TRITON_INTERPRET=0 in the workers). Each rank runs every case of its world size, under
`force_plan("split", tile_elements=8)` so that each rank's partials have several splits, and saves what it
computed; the tests compare in this process against torch's non-synced BatchNorm + activation on the
concatenated global batch, in float64: y, dx, the all-reduced dweight/dbias (the sum over ranks: what DDP
averages), running stats on every rank (bit-identical across ranks), num_batches_tracked, eval outputs; DDP
training of a converted MLP; `bnfast.recalibrate` on each rank's shard against float64 over all the data.
Masked cases (`lengths`: valid positions per sample, ragged across ranks, a rank with one valid position or
none) compare against torch's BatchNorm on the gathered valid positions of all ranks, the padded outputs from
the same statistics (or pad_value), gradients through both; fewer than 2 valid positions over the group raise on
every rank before any state changes (and the group goes on).
A spawn costs a few seconds (each worker imports torch, triton and bnfast), so cases share one.
"""

import dataclasses
import os
import time
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")  # spawned workers import this module first: before triton

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from test_recalibrate import make_batches, make_model, population_stats  # noqa: E402
from torch import nn  # noqa: E402

import bnfast  # noqa: E402
from bnfast import FusedBatchNorm1d, FusedBatchNorm2d, FusedSyncBatchNorm  # noqa: E402

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)
SPAWN_TIMEOUT_S = 240


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    sizes: tuple  # samples per rank: len(sizes) is the world size
    tail: tuple  # (C, *spatial)
    activation: str | None = None
    momentum: float | None = 0.1
    steps: int = 1
    affine: bool = True
    track: bool = True
    lengths: tuple | None = None  # masked: valid positions of each sample of the global batch (a prefix of L)
    pad_value: float | None = None
    residual: bool = False

    @property
    def C(self):
        return self.tail[0]

    def mask(self):
        """(N, L) (or (N,) for (N, C)) bool: sample n valid on [0, lengths[n]); None when unmasked."""
        if self.lengths is None:
            return None
        L = self.tail[1] if len(self.tail) > 1 else 1
        mask = torch.arange(L)[None, :] < torch.tensor(self.lengths)[:, None]
        return mask if len(self.tail) > 1 else mask[:, 0]

    def data(self):
        """(initial state, [(x, dy) of the global batch per step]); mean 10, std 3: the shifts matter."""
        gen = torch.Generator().manual_seed(zlib.crc32(self.name.encode()))
        C = self.C
        init = dict(
            weight=torch.rand(C, generator=gen, dtype=F64) + 0.5,
            bias=torch.randn(C, generator=gen, dtype=F64),
            running_mean=torch.randn(C, generator=gen, dtype=F64),
            running_var=torch.rand(C, generator=gen, dtype=F64) + 0.5,
        )
        shape = (sum(self.sizes), *self.tail)
        batches = [
            (torch.randn(shape, generator=gen, dtype=F64) * 3 + 10, torch.randn(shape, generator=gen, dtype=F64))
            for _ in range(self.steps)
        ]
        if self.residual:
            init["residual"] = torch.randn(shape, generator=gen, dtype=F64)
        return init, batches

    def state(self, module):
        init, _ = self.data()
        with torch.no_grad():
            for name, value in init.items():
                if name != "residual" and getattr(module, name, None) is not None:
                    getattr(module, name).copy_(value)
        return module


CASES = [
    Case("NC-3+5-momentum-2-steps", (3, 5), (4,), steps=2),
    Case("NCL-3+5-relu", (3, 5), (3, 4), "relu"),
    Case("NCL-0+4-silu", (0, 4), (3, 2), "silu"),
    Case("NCHW-2+3-leaky_relu", (2, 3), (3, 2, 3), "leaky_relu"),
    Case("NC-4+4-cumulative-2-steps", (4, 4), (3,), momentum=None, steps=2),
    Case("NC-1+1-one-sample-per-rank", (1, 1), (3,)),
    Case("NC-3+4-no-affine-no-running", (3, 4), (3,), affine=False, track=False),
    Case("NC-2+3+4-gelu", (2, 3, 4), (4,), "gelu"),
    Case("NCL-3+0+5-relu-cumulative-2-steps", (3, 0, 5), (3, 4), "relu", momentum=None, steps=2),
    # masked: ragged valid counts per rank (1 + 11, 5 + 2, 1 + 3, 0 + 0 + 6 with a rank of padding only)
    Case("masked-NCL-2+3-one-valid-on-rank-0-relu-pad", (2, 3), (3, 5), "relu", lengths=(1, 0, 5, 4, 2), pad_value=0.0),
    Case(
        "masked-NCL-3+2-silu-cumulative-2-steps",
        (3, 2),
        (2, 4),
        "silu",
        momentum=None,
        steps=2,
        lengths=(4, 0, 1, 2, 0),
    ),
    Case(
        "masked-NC-2+3-leaky_relu-residual-pad",
        (2, 3),
        (3,),
        "leaky_relu",
        lengths=(0, 1, 1, 1, 1),
        pad_value=-1.5,
        residual=True,
    ),
    Case("masked-NCL-2+0+3-gelu-padded-rank-pad", (2, 0, 3), (3, 4), "gelu", lengths=(0, 0, 3, 1, 2), pad_value=0.5),
]
RUNS = {"kernels-world2": (2, "1"), "kernels-world3": (3, "1"), "torch-ops-world2": (2, "0")}
MLP_STEPS, MLP_BATCH = 3, 8


def _cases(world):
    return [c for c in CASES if len(c.sizes) == world]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()


def _mlp_data():
    gen = torch.Generator().manual_seed(7)
    return [
        (torch.randn(MLP_BATCH, 6, generator=gen, dtype=F64) * 2 + 1, torch.randint(0, 3, (MLP_BATCH,), generator=gen))
        for _ in range(MLP_STEPS)
    ]


def _train_mlp(model, lo, hi):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for x, target in _mlp_data():
        opt.zero_grad()
        F.cross_entropy(model(x[lo:hi]), target[lo:hi]).backward()
        opt.step()


# --------------------------------------------------------------------------------------------- worker side
def _run_case(case, rank, world):
    _, batches = case.data()
    lo = sum(case.sizes[:rank])
    hi = lo + case.sizes[rank]
    module = FusedSyncBatchNorm(
        case.C,
        momentum=case.momentum,
        affine=case.affine,
        track_running_stats=case.track,
        activation=case.activation,
        dtype=F64,
    )
    module = case.state(module)
    mask = case.mask()[lo:hi] if case.lengths is not None else None
    residual = case.data()[0]["residual"][lo:hi] if case.residual else None
    masked = dict(mask=mask, pad_value=case.pad_value) if mask is not None else {}
    out = {"y": [], "dx": [], "dweight": [], "dbias": []}
    for x_all, dy_all in batches:
        x = x_all[lo:hi].clone().requires_grad_()
        y = module(x, residual, **masked)
        params = [p for p in (module.weight, module.bias) if p is not None]
        dx, *dparams = torch.autograd.grad(y, [x, *params], dy_all[lo:hi])
        for g in dparams:
            dist.all_reduce(g)  # the sum of the ranks' local gradients
        out["y"].append(y.detach())
        out["dx"].append(dx)
        for name, g in zip(("dweight", "dbias"), dparams, strict=False):
            out[name].append(g)
    if case.track:
        for name in ("running_mean", "running_var"):
            mine = getattr(module, name)
            every = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(every, mine)
            out[name] = mine.clone()
            out[f"{name}_same_on_every_rank"] = all(torch.equal(t, mine) for t in every)
        out["num_batches_tracked"] = module.num_batches_tracked.item()
    if case.track or min(case.sizes) > 1:  # no collective: must not hang
        out["y_eval"] = module.eval()(batches[-1][0][lo:hi], residual, **masked).detach()
    return out


def _run_too_few_valid(rank, world):
    """One valid position over the group (on the last rank): every rank raises torch's ValueError, with its state
    unchanged, then the group goes on (a collective afterwards completes)."""
    module = FusedSyncBatchNorm(3, dtype=F64)
    x = torch.randn(2, 3, 4, dtype=F64)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    if rank == world - 1:
        mask[1, 2] = True
    before = {k: v.clone() for k, v in module.state_dict().items()}
    try:
        module(x, mask=mask)
        message = None
    except ValueError as e:
        message = str(e)
    unchanged = all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())
    ok = torch.ones(1)
    dist.all_reduce(ok)
    return {"message": message, "unchanged": unchanged, "group_goes_on": ok.item() == world}


def _world_size_one_group(rank):
    """A group holding rank 0 alone: FusedSyncBatchNorm over it is FusedBatchNorm1d, bit for bit (created by every
    rank, as torch requires; used by rank 0)."""
    group = dist.new_group([0])
    if rank != 0:
        return None
    case = CASES[0]
    sync = case.state(FusedSyncBatchNorm(case.C, process_group=group, activation="relu", dtype=F64))
    plain = case.state(FusedBatchNorm1d(case.C, activation="relu", dtype=F64))
    x = case.data()[1][0][0]
    return all(torch.equal(a, b) for a, b in [(sync(x), plain(x)), (sync.running_var, plain.running_var)])


def _run_ddp(rank, world):
    model = FusedSyncBatchNorm.convert_sync_batchnorm(bnfast.convert(_mlp()))
    info = {"bn": type(model[1]).__name__, "activation": repr(model[1].activation), "slot": type(model[2]).__name__}
    ddp = nn.parallel.DistributedDataParallel(model)
    per_rank = MLP_BATCH // world
    _train_mlp(ddp, rank * per_rank, (rank + 1) * per_rank)
    info["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return info


def _run_recalibrate(rank, world):
    """Each rank recalibrates on its shard of the batches: the statistics of the whole data set on every rank."""
    model = make_model().eval()
    bnfast.recalibrate(model, make_batches(n=2 * world)[rank::world])
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in bns}


def _worker(rank, world, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = {"interpreted": bnfast.kernels.is_interpreted()}
        with bnfast.testing.force_plan("split", tile_elements=8):
            for case in _cases(world):
                results[case.name] = _run_case(case, rank, world)
            results["recalibrate"] = _run_recalibrate(rank, world)
            results["too-few-valid"] = _run_too_few_valid(rank, world)
            if world == 2:
                results["world-size-one-group"] = _world_size_one_group(rank)
                results["ddp"] = _run_ddp(rank, world)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- parent side
def _spawn(world, interpret, out_dir):
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = interpret  # the workers inherit it: decided before they import triton
    try:
        ctx = mp.spawn(_worker, args=(world, os.path.join(out_dir, "store"), out_dir), nprocs=world, join=False)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"world size {world}: the workers did not finish in {SPAWN_TIMEOUT_S} s (a collective hangs?)")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def get(run):
        if run not in cache:
            world, interpret = RUNS[run]
            cache[run] = _spawn(world, interpret, str(tmp_path_factory.mktemp(run)))
            assert all(r["interpreted"] == (interpret == "1") for r in cache[run])
        return cache[run]

    return get


def _reference(case):
    """torch's BatchNorm (non-synced) + the activation on the global batch, stepped like the workers."""
    if case.lengths is not None:
        return _masked_reference(case)
    _, batches = case.data()
    bn_type = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(case.tail) + 1]
    bn = case.state(
        bn_type(case.C, momentum=case.momentum, affine=case.affine, track_running_stats=case.track, dtype=F64)
    )
    act = bnfast.resolve_activation(case.activation)
    out = {"y": [], "dx": [], "dweight": [], "dbias": []}
    for x_all, dy_all in batches:
        x = x_all.clone().requires_grad_()
        y = act.apply(bn(x))
        params = [p for p in (bn.weight, bn.bias) if p is not None]
        dx, *dparams = torch.autograd.grad(y, [x, *params], dy_all)
        out["y"].append(y.detach())
        out["dx"].append(dx)
        for name, g in zip(("dweight", "dbias"), dparams, strict=False):
            out[name].append(g)
    if case.track:
        out.update(
            running_mean=bn.running_mean, running_var=bn.running_var, num_batches_tracked=bn.num_batches_tracked.item()
        )
    out["eval"] = act.apply(bn.eval()(batches[-1][0])).detach() if case.track else None
    return out


def _masked_reference(case):
    """torch's BatchNorm1d on the gathered valid positions of the global batch ((M, C) rows) + the residual and the
    activation; the padded positions normalised with the same batch statistics (taken from the same rows,
    differentiably), or pad_value; stepped like the workers."""
    init, batches = case.data()
    mask, residual = case.mask(), init.get("residual")
    bn = case.state(
        nn.BatchNorm1d(case.C, momentum=case.momentum, affine=case.affine, track_running_stats=case.track, dtype=F64)
    )
    act = bnfast.resolve_activation(case.activation)

    def finish(z_rows, x):  # (rows, C) in mask order at valid positions, then padded ones -> y of x's shape
        z = torch.zeros_like(x.movedim(1, -1)).index_put((mask,), z_rows[0]).index_put((~mask,), z_rows[1])
        z = z.movedim(-1, 1)
        y = act.apply(z if residual is None else z + residual)
        if case.pad_value is None:
            return y
        return torch.where(mask.unsqueeze(1), y, torch.tensor(case.pad_value, dtype=F64))

    out = {"y": [], "dx": [], "dweight": [], "dbias": []}
    for x_all, dy_all in batches:
        x = x_all.clone().requires_grad_()
        rows, padded = x.movedim(1, -1)[mask], x.movedim(1, -1)[~mask]
        z_valid = bn(rows)
        mean, var = rows.mean(0), rows.var(0, unbiased=False)
        z_pad = (padded - mean) * torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            z_pad = z_pad * bn.weight + bn.bias
        y = finish((z_valid, z_pad), x)
        params = [p for p in (bn.weight, bn.bias) if p is not None]
        dx, *dparams = torch.autograd.grad(y, [x, *params], dy_all)
        out["y"].append(y.detach())
        out["dx"].append(dx)
        for name, g in zip(("dweight", "dbias"), dparams, strict=False):
            out[name].append(g)
    if case.track:
        out.update(
            running_mean=bn.running_mean, running_var=bn.running_var, num_batches_tracked=bn.num_batches_tracked.item()
        )
        x = batches[-1][0]
        with torch.no_grad():  # eval: the running stats everywhere; the mask only places pad_value
            bn.eval()
            out["eval"] = finish((bn(x.movedim(1, -1)[mask]), bn(x.movedim(1, -1)[~mask])), x)
    return out


PARAMS = [
    pytest.param(run, case, id=f"{run}-{case.name}") for run, (world, _) in RUNS.items() for case in _cases(world)
]


@pytest.mark.parametrize("run, case", PARAMS)
def test_sync_matches_the_global_batch(runs, run, case):
    ranks = [r[case.name] for r in runs(run)]
    ref = _reference(case)
    for rank, got in enumerate(ranks):
        lo = sum(case.sizes[:rank])
        rows = slice(lo, lo + case.sizes[rank])
        for step in range(case.steps):
            for name in ("y", "dx", "dweight", "dbias"):
                expected = ref[name][step][rows] if name in ("y", "dx") else ref[name][step] if ref[name] else None
                if expected is not None:
                    where = f"rank {rank} step {step} {name}"
                    torch.testing.assert_close(got[name][step], expected, **TOL, msg=lambda m, w=where: f"{w}: {m}")
        if case.track:
            for name in ("running_mean", "running_var"):
                where = f"rank {rank} {name}"
                torch.testing.assert_close(got[name], ref[name], **TOL, msg=lambda m, w=where: f"{w}: {m}")
                assert got[f"{name}_same_on_every_rank"], f"{name} differs between ranks"
            assert got["num_batches_tracked"] == ref["num_batches_tracked"] == case.steps
            torch.testing.assert_close(got["y_eval"], ref["eval"][rows], **TOL)
        elif "y_eval" in got:  # no running stats: eval uses this rank's own batch, without sync
            assert case.lengths is None
            act = bnfast.resolve_activation(case.activation)
            x = case.data()[1][-1][0][rows]
            torch.testing.assert_close(got["y_eval"], act.apply(F.batch_norm(x, None, None, training=True)), **TOL)


@pytest.mark.parametrize("run", [r for r, (world, _) in RUNS.items() if world == 2])
def test_ddp_training_of_a_converted_mlp_matches_full_batch_training(runs, run):
    """bnfast.convert (fuses BN + ReLU) then FusedSyncBatchNorm.convert_sync_batchnorm, under DDP on 2 ranks with
    half the batch each: the same parameters and running stats as single-process full-batch training."""
    reference = _mlp()
    _train_mlp(reference, 0, MLP_BATCH)
    expected = reference.state_dict()
    for rank, result in enumerate(runs(run)):
        ddp = result["ddp"]
        assert (ddp["bn"], ddp["activation"], ddp["slot"]) == ("FusedSyncBatchNorm", "'relu'", "Identity")
        assert ddp["state"].keys() == expected.keys()
        for key, value in expected.items():
            where = f"rank {rank} {key}"
            torch.testing.assert_close(ddp["state"][key], value, **TOL, msg=lambda m, w=where: f"{w}: {m}")


@pytest.mark.parametrize("run", list(RUNS))
def test_recalibrate_across_ranks_equals_float64_over_all_shards(runs, run):
    world = RUNS[run][0]
    expected = population_stats(make_model().eval(), [x for x, _ in make_batches(n=2 * world)])
    for rank, result in enumerate(runs(run)):
        for name, (mean, var) in expected.items():
            got_mean, got_var = result["recalibrate"][name]
            torch.testing.assert_close(got_mean, mean, rtol=1e-12, atol=1e-12, msg=f"rank {rank} {name} mean")
            torch.testing.assert_close(got_var, var, rtol=1e-12, atol=1e-12, msg=f"rank {rank} {name} var")


@pytest.mark.parametrize("run", list(RUNS))
def test_masked_too_few_valid_positions_raise_on_every_rank_before_any_state_change(runs, run):
    for rank, result in enumerate(runs(run)):
        got = result["too-few-valid"]
        assert got["message"] is not None, f"rank {rank} did not raise"
        assert got["message"].startswith("Expected more than 1 value per channel when training, got 1 valid")
        assert got["unchanged"] and got["group_goes_on"], f"rank {rank}: {got}"


def test_world_size_one_is_the_plain_module(runs):
    assert runs("kernels-world2")[0]["world-size-one-group"] is True
    assert runs("torch-ops-world2")[0]["world-size-one-group"] is True


# ------------------------------------------------------------------------------- without a process group
def test_without_process_group_it_is_the_plain_module():
    """No initialised process group: FusedSyncBatchNorm is FusedBatchNorm1d (train and eval), for 2-D to 4-D."""
    assert not dist.is_initialized()
    for shape in [(6, 3), (4, 3, 5), (2, 3, 2, 3)]:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=gen) * 2 + 1
        sync = FusedSyncBatchNorm(3, activation="silu")
        plain = (FusedBatchNorm2d if len(shape) == 4 else FusedBatchNorm1d)(3, activation="silu")
        plain.load_state_dict(sync.state_dict())
        for mode in (True, False):
            sync.train(mode), plain.train(mode)
            xs, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
            ys, yp = sync(xs), plain(xp)
            ys.sum().backward(), yp.sum().backward()
            assert torch.equal(ys, yp) and torch.equal(xs.grad, xp.grad)
        assert torch.equal(sync.running_var, plain.running_var)


def test_drop_in_for_nn_sync_batch_norm():
    m = FusedSyncBatchNorm(5, momentum=None, activation=nn.LeakyReLU(0.2), process_group=None)
    ref = nn.SyncBatchNorm(5, momentum=None)
    assert isinstance(m, nn.SyncBatchNorm) and m.process_group is None
    assert m.state_dict().keys() == ref.state_dict().keys()
    m.load_state_dict(ref.state_dict())
    assert "activation=leaky_relu(0.2)" in repr(m)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        m(torch.randn(5))
    m.eval()
    x = torch.randn(4, 5, 2, 2, 2)  # 5-D is fine, as for nn.SyncBatchNorm
    torch.testing.assert_close(m(x), F.leaky_relu(ref.eval()(x), 0.2))


def test_convert_sync_batchnorm_keeps_activation_tensors_hooks_and_attributes():
    bn = FusedBatchNorm1d(4, activation="relu")
    bn.custom = "kept"
    calls = []
    bn.register_forward_pre_hook(lambda m, args: calls.append(1))
    plain2d = nn.BatchNorm2d(3).eval()
    model = nn.Sequential(nn.Linear(3, 4), bn, nn.Sequential(plain2d), nn.SyncBatchNorm(2, process_group="g0"))
    weight, running_var = bn.weight, bn.running_var
    converted = FusedSyncBatchNorm.convert_sync_batchnorm(model, process_group="g1")
    assert converted is model
    sync = model[1]
    assert type(sync) is FusedSyncBatchNorm and sync.activation == bnfast.resolve_activation("relu")
    assert sync.weight is weight and sync.running_var is running_var and sync.custom == "kept"
    assert sync.process_group == "g1" and model[3].process_group == "g1"
    assert type(model[2][0]) is FusedSyncBatchNorm and not model[2][0].training and not model[2][0].activation
    sync.eval()(torch.randn(5, 4))
    assert calls == [1]
    single = FusedSyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(3, affine=False, momentum=None))
    assert type(single) is FusedSyncBatchNorm and single.weight is None and single.momentum is None
    # torch's own converter, which existing DDP scripts call, does the same for bnfast's modules
    fused = FusedBatchNorm1d(3, activation="relu")
    by_torch = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(fused, nn.BatchNorm1d(3)), process_group="g2")
    assert type(by_torch[0]) is FusedSyncBatchNorm and by_torch[0].activation.name == "relu"
    assert by_torch[0].weight is fused.weight and by_torch[0].process_group == "g2"
    assert type(by_torch[1]) is nn.SyncBatchNorm  # torch's modules: torch's answer
