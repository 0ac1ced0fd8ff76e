"""The launch layer (kernels/launch.py): stages callable on their own, the (N, C, S) view, stride-driven tiles.

Stage compositions are compared bitwise with `bn_fwd`/`bn_bwd` (the same kernels in the same order must give
the same bits), and with torch's F.batch_norm at float32 tolerances where the inputs are layouts of their own.
"""

import pytest
import torch
import torch.nn.functional as F
from parity import DEVICE, assert_matches_ref

import bnfast
from bnfast.kernels import launch
from bnfast.reference import batch_norm_ref


def _inputs(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3 + 100).to(DEVICE)
    dy = torch.randn(shape, generator=gen).to(DEVICE)
    C = shape[1]
    w, b = (torch.rand(C, generator=gen) + 0.5).to(DEVICE), torch.randn(C, generator=gen).to(DEVICE)
    return x, dy, w, b


def test_stages_compose_to_bn_fwd_and_bn_bwd():
    """split plan by hand: stats_partial -> stats_finalize -> normalize, and grad_partial -> grad_finalize ->
    grad_input, give bn_fwd's and bn_bwd's bits."""
    x, dy, w, b = _inputs((12, 5, 7))
    with bnfast.testing.force_plan("split", tile_elements=16):
        y_ref, mean_ref, rstd_ref = launch.bn_fwd(
            x,
            w,
            b,
            None,
            None,
            None,
            training=True,
            momentum=0.1,
            cumulative=False,
            eps=1e-5,
            activation="gelu",
            act_param=0.0,
        )
        dx_ref, dw_ref, db_ref, _ = launch.bn_bwd(
            dy, x, w, b, mean_ref, rstd_ref, training=True, eps=1e-5, activation="gelu", act_param=0.0
        )
        x3 = launch.as_ncs(x)
        cfg = launch.config_for(x3, 1)
        assert cfg.plan == "split" and cfg.num_splits > 1
        part, shift = launch.stats_partial(x3, cfg)
        assert part.shape == (3, cfg.num_splits, 5) and shift.shape == (5,)
        torch.testing.assert_close(part[0].sum(0), torch.full((5,), 12.0 * 7, device=DEVICE), rtol=0, atol=0)
        mean, rstd = torch.empty(5, device=DEVICE), torch.empty(5, device=DEVICE)
        launch.stats_finalize(part, shift, mean, rstd, None, None, eps=1e-5, momentum=0.1, cumulative=False)
        y = torch.empty_like(x)
        launch.normalize(
            x3, launch.as_ncs(y), w, b, mean, rstd, cfg, stat_is_var=False, eps=1e-5, activation="gelu", act_param=0.0
        )
        bcfg = launch.config_for(x3, launch.register_widening(torch.float32, "gelu", backward=True))
        gpart = launch.grad_partial(
            launch.as_ncs(dy), x3, w, b, mean, rstd, bcfg, training=True, eps=1e-5, activation="gelu", act_param=0.0
        )
        dw, db = torch.empty(5, device=DEVICE), torch.empty(5, device=DEVICE)
        sums = launch.grad_finalize(gpart, dw, db)
        dx = torch.empty_like(x)
        launch.grad_input(
            launch.as_ncs(dy),
            x3,
            launch.as_ncs(dx),
            w,
            b,
            mean,
            rstd,
            sums,
            bcfg,
            count=12 * 7,
            activation="gelu",
            act_param=0.0,
        )
    for name, a, r in [
        ("y", y, y_ref),
        ("mean", mean, mean_ref),
        ("rstd", rstd, rstd_ref),
        ("dx", dx, dx_ref),
        ("dw", dw, dw_ref),
        ("db", db, db_ref),
    ]:
        torch.testing.assert_close(a, r, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(sums, torch.stack([db_ref, dw_ref]), rtol=0, atol=0)


def test_partials_of_two_tensors_merge_like_one():
    """The partials' format is what SyncBatchNorm gathers: the stats partials of two halves of a batch, rebased to
    one shift (mean_k += shift_half - shift) and concatenated along K, finalize to the whole batch's statistics;
    the grad partials of the halves, concatenated, to its sums."""
    x, dy, w, b = _inputs((10, 3, 6))
    whole_mean, whole_rstd = torch.empty(3, device=DEVICE), torch.empty(3, device=DEVICE)
    with bnfast.testing.force_plan("split", tile_elements=8):
        halves = [launch.as_ncs(x[:4]), launch.as_ncs(x[4:])]
        parts = [launch.stats_partial(h, launch.config_for(h, 1)) for h in halves]
        shift = parts[0][1]
        for part, own_shift in parts[1:]:
            part[1] += own_shift - shift
        merged = torch.cat([p for p, _ in parts], dim=1)
        launch.stats_finalize(
            merged, shift, whole_mean, whole_rstd, None, None, eps=1e-5, momentum=0.1, cumulative=False
        )
        gparts = [
            launch.grad_partial(
                launch.as_ncs(d),
                h,
                w,
                b,
                whole_mean,
                whole_rstd,
                launch.config_for(h, 1),
                training=True,
                eps=1e-5,
                activation="",
                act_param=0.0,
            )
            for d, h in zip((dy[:4], dy[4:]), halves, strict=True)
        ]
        sums = launch.grad_finalize(torch.cat(gparts, dim=1))
    x64 = x.double()
    dims = (0, 2)
    torch.testing.assert_close(whole_mean.double(), x64.mean(dims), rtol=1e-7, atol=0)
    torch.testing.assert_close(whole_rstd.double(), (x64.var(dims, correction=0) + 1e-5).rsqrt(), rtol=1e-6, atol=0)
    xhat = (x64 - x64.mean(dims)[None, :, None]) * (x64.var(dims, correction=0) + 1e-5).rsqrt()[None, :, None]
    expected = torch.stack([dy.double().sum(dims), (dy.double() * xhat).sum(dims)])
    torch.testing.assert_close(sums.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make, c_fast",
    [
        (lambda: torch.empty(64, 32), True),  # (N, C): c is contiguous
        (lambda: torch.empty(8, 32, 50), False),  # NCL: s is contiguous
        (lambda: torch.empty(8, 50, 32).transpose(1, 2), True),  # channels-last (N, C, L)
        (lambda: torch.empty(8, 32, 5, 6).to(memory_format=torch.channels_last), True),
        (lambda: torch.empty(8, 32, 5, 6), False),
        (lambda: torch.empty(32, 64).t(), False),  # transposed (N, C): seen as (1, C, N), s contiguous
    ],
    ids=["NC", "NCL", "NLC-transposed", "NCHW-channels_last", "NCHW", "NC-transposed"],
)
def test_tile_long_axis_follows_the_strides(make, c_fast):
    x = make()
    x3 = launch.as_ncs(x, launch.is_transposed_2d(x))
    assert x3.t.data_ptr() == x.data_ptr(), "a mergeable layout must not be copied"
    assert x3.N * x3.C * x3.S == x.numel() and x3.C == x.shape[1]
    assert (x3.sc == 1) == c_fast or (not c_fast and x3.ss == 1)
    with bnfast.testing.force_plan("split"):
        cfg = launch.config_for(x3, 1)
    if c_fast:
        assert cfg.BLOCK_C >= 16, cfg  # >= 16 contiguous channels: 128-bit accesses (bench.kernel_report)
    else:
        assert cfg.BLOCK_S >= 16, cfg


def test_unmergeable_spatial_dims_are_copied():
    x = torch.randn(2, 3, 4, 5).permute(0, 1, 3, 2)  # H and W swapped: no single S stride
    x3 = launch.as_ncs(x)
    assert x3.t.data_ptr() != x.data_ptr() and x3.S == 20
    torch.testing.assert_close(x3.t.reshape(2, 3, 20), x.reshape(2, 3, 20), rtol=0, atol=0)


def test_launch_config_is_memoised():
    launch.launch_config.cache_clear()
    for _ in range(3):
        launch.config_for(launch.as_ncs(torch.empty(32, 32)), 1)
    info = launch.launch_config.cache_info()
    assert info.misses == 1 and info.hits == 2


@pytest.mark.parametrize("layout", ["NCHW", "channels_last", "NCDHW", "channels_last_3d", "permuted"])
def test_functional_4d_5d_layouts_match_torch(layout, kernel_path):
    """bnfast.batch_norm on 4-D/5-D inputs in every layout: torch's values, and torch's output memory format."""
    shape = (3, 4, 5, 6) if layout in ("NCHW", "channels_last", "permuted") else (2, 4, 3, 2, 5)
    x, dy, w, b = _inputs(shape)
    if layout == "channels_last":
        x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x, dy = x.to(memory_format=torch.channels_last_3d), dy.to(memory_format=torch.channels_last_3d)
    elif layout == "permuted":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    results = []
    for fn in (F.batch_norm, bnfast.batch_norm, "ref64"):
        xr, wr, br = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
        rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
        if fn == "ref64":
            xr, wr, br = (t.detach().double().requires_grad_(True) for t in (x, w, b))
            y, rm, rv = batch_norm_ref(xr, rm.double(), rv.double(), wr, br, True, 0.1, 1e-5)
        else:
            y = fn(xr, rm, rv, wr, br, True, 0.1, 1e-5)
        y.backward(dy.to(y.dtype))
        results.append((y.detach(), xr.grad, wr.grad, br.grad, rm, rv))
    names = ("y", "dx", "dw", "db", "running_mean", "running_var")
    for name, theirs, ours, ref in zip(names, *results, strict=True):
        assert_matches_ref(ours, theirs, ref, torch.float32, name)
        assert ours.stride() == theirs.stride(), (name, ours.stride(), theirs.stride())


def test_channels_last_rows_merge_into_one_axis():
    """A channels_last (N, C, H, W) is launched as (N*H*W, C, 1): dense rows (7x7 = 49 fills the tile's rows instead
    of 49 of 64 s-lanes); a channels-last (N, C, L) whose y is contiguous NCL keeps its (n, s) tiles."""
    x = torch.empty(4, 32, 7, 7, device="meta").to(memory_format=torch.channels_last)
    w = torch.empty(32, device="meta")
    with bnfast.testing.record_launches() as log:
        launch.bn_fwd(
            x,
            w,
            w,
            None,
            None,
            None,
            training=True,
            momentum=0.1,
            cumulative=False,
            eps=1e-5,
            activation="relu",
            act_param=0.0,
        )
    name, _, args, kwargs = log[0]
    assert name == "_bn_fwd_single_kernel"
    N, C, S = args[14:17]  # after its 14 pointers (the mask's last)
    assert (N, C, S) == (4 * 49, 32, 1) and kwargs["BLOCK_S"] == 1, (name, N, C, S, kwargs)
    x3 = torch.empty(4, 49, 32, device="meta").transpose(1, 2)  # (N, C, L) channels-last; y will be NCL
    with bnfast.testing.record_launches() as log:
        launch.bn_fwd(
            x3,
            w,
            w,
            None,
            None,
            None,
            training=True,
            momentum=0.1,
            cumulative=False,
            eps=1e-5,
            activation="relu",
            act_param=0.0,
        )
    assert tuple(log[0][2][14:17]) == (4, 32, 49)
