"""Shared machinery of the benchmarks: the providers, device timing, checks, ratios, and `run_case`, the one runner
(check / smoke / time / record) every benchmark file calls. The shapes and cases are in bench/cases.py.

Timing (CUDA), and why it is fed to pytest-benchmark this way. pytest-benchmark times each round with a host
timer, but a GPU call returns before the GPU has run it. So each round is one call bracketed by CUDA events,
and the benchmark's timer is `device_clock`, a clock that advances only by the measured event interval (set
with pytest-benchmark's public `timer` option of the benchmark marker: `pytestmark = harness.timed_by("device")`):
every round pytest-benchmark records is the device time of one call, and its JSON, its stats
(min/median/IQR/outliers) and `pytest-benchmark compare` work on device times.
- Before each call the GPU is kept busy by `torch.cuda._sleep` for longer than the host takes to enqueue the
  call (measured per provider after warm-up), so the start event fires right before the call's first kernel:
  the interval is device time, not host launch latency (which `host_us` in extra_info reports instead).
- Inputs are rotated over `copies` copies, enough that the bytes the other copies move between two uses of the
  same copy exceed twice the L2 size: large cases read from DRAM, as in training, not from L2 (copies are
  capped at 64, so the smallest cases stay L2-resident: they are launch-bound anyway).
- Warm-up first (JIT / torch.compile compilation, autotuning, allocator), then `rounds` rounds.
The same figure as `triton.testing.do_bench(..., return_mode="median")` would give, with L2 handled by rotation
rather than a 256 MB memset between calls (whose dirty lines would be written back during the timed call).

Speedups are computed within the session: every provider's median is kept in `SESSION` per case, and each
result's extra_info gets `speedup_vs_eager` / `speedup_vs_compile` (other time / this time) as soon as the
other provider of the same case has run, so the ratios always come from one run.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import statistics
import time

import torch
from torch import nn

from bench.cases import Case

MOMENTUM, EPS = 0.1, 1e-5
# max |out - ref64| / max(1, max |ref64|): a wrong formula is off by O(1); bf16 output rounding is 2**-8 relative
CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
ROUND_BUDGET_S = float(os.environ.get("BNFAST_BENCH_ROUND_BUDGET_S", "0.2"))  # device time per benchmark, roughly
MIN_ROUNDS, MAX_ROUNDS, WARMUP_ROUNDS = 10, 200, 3
MAX_COPIES, MAX_COPY_BYTES = 64, 4 << 30


# ---------------------------------------------------------------------------------------------------- providers
class TorchTail(nn.Module):
    """torch's BN -> add -> activation, called as module(x, residual) like bnfast's fused module."""

    def __init__(self, bn: nn.Module, act: nn.Module):
        super().__init__()
        self.bn, self.act = bn, act

    def forward(self, x, residual):
        return self.act(self.bn(x) + residual)


def build_module(provider: str, case: Case, device: torch.device) -> nn.Module:
    """BN(C) (+ activation, + residual) for `provider`, with random affine parameters and running stats (seeded,
    so every provider starts from the same state), cast to the case's dtype like `model.to(dtype)`."""
    import bnfast

    C, dims = case.shape[1], max(1, len(case.shape) - 2)
    gen = torch.Generator().manual_seed(0)
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](C, momentum=MOMENTUM, eps=EPS)
    with torch.no_grad():
        ranges = ((bn.weight, 0.5, 1.5), (bn.bias, -0.5, 0.5), (bn.running_mean, -1, 1), (bn.running_var, 0.5, 2))
        for t, lo, hi in ranges:
            t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)
    act = bnfast.resolve_activation(None if case.activation == "none" else case.activation)
    if provider == "bnfast":
        fused = {1: bnfast.FusedBatchNorm1d, 2: bnfast.FusedBatchNorm2d, 3: bnfast.FusedBatchNorm3d}[dims]
        module = fused(C, momentum=MOMENTUM, eps=EPS, activation=act or None)
        module.load_state_dict(bn.state_dict())
    elif provider in ("eager", "compile"):
        # nn.Identity for no activation: no kernel
        module = TorchTail(bn, act.module()) if case.residual else nn.Sequential(bn, act.module())
    else:
        raise ValueError(f"unknown provider {provider!r}")
    module = module.to(device=device, dtype=case.torch_dtype).train(case.mode != "fwd-eval")
    if provider == "compile":
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no dynamic-shape reuse across cases
        # default inductor on CUDA; on CPU (the smoke run) aot_eager: same tracing, no C++ compile
        module = torch.compile(module, backend="inductor" if device.type == "cuda" else "aot_eager")
    return module


def make_step(module: nn.Module, case: Case):
    """step(x, [residual,] dy) -> tuple of outputs: (y,) for the forward modes (under no_grad: forward cost only);
    (y, dx, [dresidual,] dweight, dbias) for fwd+bwd (autograd.grad: nothing accumulates into .grad)."""
    if case.mode != "fwd+bwd":

        def step(x, *rest):
            with torch.no_grad():
                return (module(x, *rest[:-1]),)

        return step
    params = [p for p in module.parameters() if p.requires_grad]

    def step(x, *rest):
        y = module(x, *rest[:-1])
        return (y, *torch.autograd.grad(y, (x, *rest[:-1], *params), rest[-1]))

    return step


def make_inputs(case: Case, device: torch.device, copies: int):
    """[(x, [residual,] dy)] * copies, in the case's memory format."""
    gen = torch.Generator(device=device).manual_seed(1)
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(case.shape), torch.contiguous_format)
    fmt = fmt if case.layout == "channels_last" else torch.contiguous_format
    grad = case.mode == "fwd+bwd"

    def tensor(scale=1.0, shift=0.0):
        t = torch.randn(case.shape, generator=gen, device=device) * scale + shift
        return t.to(case.torch_dtype).contiguous(memory_format=fmt)

    out = []
    for _ in range(copies):
        x = tensor(2.0, 0.5).requires_grad_(grad)
        residual = (tensor().requires_grad_(grad),) if case.residual else ()
        out.append((x, *residual, tensor()))
    return out


def reference(case: Case, state: dict, x: torch.Tensor, *rest):
    """The float64 reference outputs (bnfast.reference.batch_norm_ref) from the module's initial state; `rest` is
    (dy,) or (residual, dy)."""
    from bnfast.reference import batch_norm_ref

    grad = case.mode == "fwd+bwd"
    x64 = x.detach().double().requires_grad_(grad)
    r64 = [r.detach().double().requires_grad_(grad) for r in rest[:-1]]
    w64, b64 = (state[k].double().requires_grad_(grad) for k in ("weight", "bias"))
    act = bnfast_activation(case)
    z, _, _ = batch_norm_ref(
        x64,
        state["running_mean"].double(),
        state["running_var"].double(),
        w64,
        b64,
        case.mode != "fwd-eval",
        MOMENTUM,
        EPS,
        None,
        upcast=True,
    )
    y = act.apply(z + r64[0] if r64 else z)
    if not grad:
        return (y.detach(),)
    return (y.detach(), *torch.autograd.grad(y, (x64, *r64, w64, b64), rest[-1].double()))


def bnfast_activation(case: Case):
    import bnfast

    return bnfast.resolve_activation(None if case.activation == "none" else case.activation)


def initial_state(module: nn.Module) -> dict:
    sd = {k.split(".")[-1]: v.detach().clone() for k, v in module.state_dict().items()}
    return {k: sd[k] for k in ("weight", "bias", "running_mean", "running_var")}


def check(outputs, expected, dtype) -> float:
    """Largest normalised error over the outputs; raises AssertionError past CHECK_TOL[dtype]."""
    worst = 0.0
    names = ("y", "dx", "dresidual", "dweight", "dbias") if len(expected) == 5 else ("y", "dx", "dweight", "dbias")
    names = names[: len(expected)]
    for name, out, ref in zip(names, outputs, expected, strict=True):
        err = (out.detach().double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
        assert err <= CHECK_TOL[dtype], f"{name}: normalised error {err:.3g} > {CHECK_TOL[dtype]:g} ({dtype})"
        worst = max(worst, err)
    return worst


# -------------------------------------------------------------------------------------------------------- clocks
class _DeviceClock:
    seconds = 0.0  # advanced by DeviceTimer.round: the sum of the timed calls' CUDA-event intervals


def device_clock() -> float:
    """pytest-benchmark's timer for device-timed benchmarks (see the module docstring)."""
    return _DeviceClock.seconds


def synced_clock() -> float:
    """Wall clock, read once the device has run everything queued (CUDA); plain perf_counter otherwise."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


CLOCKS = {"device": device_clock, "synced": synced_clock, "host": time.perf_counter}


def timed_by(timing: str):
    """The benchmark marker a test module carries (`pytestmark = harness.timed_by("device")`): pytest-benchmark's
    public `timer` option, so the fixture reads `CLOCKS[timing]` for every round."""
    import pytest

    return pytest.mark.benchmark(timer=CLOCKS[timing])


# --------------------------------------------------------------------------------------------------- CUDA timing
@functools.cache
def _sleep_cycles_per_us() -> float:
    torch.cuda._sleep(1000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(2_000_000)
    end.record()
    end.synchronize()
    return 2_000_000 / (start.elapsed_time(end) * 1e3)


def l2_bytes(device) -> int:
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)


@functools.cache
def copy_bandwidth(device_index: int = 0) -> float:
    """The device's copy bandwidth in bytes/s: median of a 1 GiB device-to-device copy, counting read + write."""
    device = torch.device("cuda", device_index)
    free = torch.cuda.mem_get_info(device)[0]
    nbytes = min(1 << 30, free // 8)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


def rotation_copies(case: Case, device) -> int:
    """Copies such that between two uses of one copy the others move more than 2x L2 (see module docstring)."""
    per_call = case.min_bytes()
    input_bytes = case.numel * case.element_size
    input_bytes *= (2 if case.mode == "fwd+bwd" else 1) + case.residual  # x, dy, residual
    copies = math.ceil(2 * l2_bytes(device) / per_call) + 1
    return max(1, min(copies, MAX_COPIES, MAX_COPY_BYTES // max(1, input_bytes)))


class DeviceTimer:
    """One call per round, bracketed by CUDA events, after a GPU-side sleep that covers the host's enqueue."""

    def __init__(self, step, inputs):
        self.step, self.inputs, self.i = step, inputs, 0
        self.gate_cycles = 0
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def _next(self):
        args = self.inputs[self.i % len(self.inputs)]
        self.i += 1
        return args

    def host_enqueue_seconds(self, n=5) -> float:
        """Median host time to enqueue one call (GPU kept busy, so enqueue never waits on it)."""
        times = []
        for _ in range(n):
            torch.cuda._sleep(int(2000 * _sleep_cycles_per_us()))
            t = time.perf_counter()
            self.step(*self._next())
            times.append(time.perf_counter() - t)
            torch.cuda.synchronize()
        return statistics.median(times)

    def calibrate(self) -> tuple[float, float]:
        """(host enqueue seconds, device seconds of one call); sets the sleep gate to 2x host + 20 us."""
        host = self.host_enqueue_seconds()
        self.gate_cycles = int((2 * host + 20e-6) * 1e6 * _sleep_cycles_per_us())
        device = statistics.median(self.timed_call() for _ in range(3))
        return host, device

    def timed_call(self) -> float:
        args = self._next()
        torch.cuda._sleep(self.gate_cycles)
        self.start.record()
        self.step(*args)
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3

    def round(self):
        """pytest-benchmark's target: one timed call; `device_clock` advances by its device time."""
        _DeviceClock.seconds += self.timed_call()


def rounds_for(seconds_per_round: float) -> int:
    return max(MIN_ROUNDS, min(MAX_ROUNDS, int(ROUND_BUDGET_S / max(seconds_per_round, 1e-6))))


# ------------------------------------------------------------------------------------------------------ run_case
SYNCED_ROUND_S, SYNCED_BUDGET_S = 0.1, 1.0  # "synced": wall time of one round (k calls) and of all rounds, roughly
HOST_ROUNDS, HOST_ITERATIONS, HOST_WARMUP_ROUNDS = 200, 10, 5


def run_case(benchmark, step, inputs, *, group: str, provider: str, timing: str, check=None, baselines=()):
    """Check, smoke, time and record one benchmark (every file in bench/ runs through here):

    1. check: the first call, `step(*inputs[0])` (which also compiles), goes to `check(outputs)`, which raises on
       a wrong result and returns a dict for extra_info (max_err, launches, ...);
    2. smoke (`--benchmark-disable`): one more call through benchmark.pedantic, untimed; returns None;
    3. time, by `timing`, on the clock the test's marker names (`timed_by(timing)`; checked here):
       "device": one call per round bracketed by CUDA events, inputs rotated (DeviceTimer; module docstring);
       "synced": k calls per round back to back as a training loop runs them, the clock read after a device sync
                 (pytest-benchmark's iterations=k: stats per call); k from a 10-call estimate, ~SYNCED_ROUND_S per
                 round, ~SYNCED_BUDGET_S in all;
       "host": the host's time only (CPU benchmarks): HOST_ROUNDS rounds of HOST_ITERATIONS calls;
    4. record: the median into SESSION[group][provider]; extra_info gets median_us (host_us: "device"), and
       speedup_vs_<b> for each provider b of `baselines` that has run in this session.
    Returns the median seconds per call (pytest-benchmark's own statistic of the recorded rounds).
    """
    if timing not in CLOCKS:
        raise ValueError(f"timing must be one of {tuple(CLOCKS)}, got {timing!r}")
    benchmark.group = group
    info = benchmark.extra_info
    info["provider"] = provider
    first = step(*inputs[0])
    if check is not None:
        info.update(check(first) or {})
    if benchmark.disabled:
        benchmark.pedantic(step, args=inputs[0])  # --benchmark-disable: the body once more, untimed
        return None

    if timing == "device":
        timer = DeviceTimer(step, inputs)
        for _ in range(3):  # warm-up: compile caches, allocator, autotuning
            timer.timed_call()
        host_s, device_s = timer.calibrate()
        rounds = rounds_for(device_s + 2 * host_s + 50e-6)
        benchmark.pedantic(timer.round, rounds=rounds, warmup_rounds=WARMUP_ROUNDS, iterations=1)
        info["host_us"] = round(host_s * 1e6, 2)
    elif timing == "synced":
        calls = itertools.count()

        def one_call():
            step(*inputs[next(calls) % len(inputs)])

        for _ in range(5):  # warm-up: JIT, cuBLAS, allocator
            one_call()
        start = synced_clock()
        for _ in range(10):
            one_call()
        per_call = (synced_clock() - start) / 10
        k = max(5, min(500, int(SYNCED_ROUND_S / per_call)))
        rounds = max(5, min(30, int(SYNCED_BUDGET_S / (k * per_call))))
        benchmark.pedantic(one_call, rounds=rounds, iterations=k, warmup_rounds=1)
        info["calls_per_round"] = k
    else:
        args = inputs[0]
        benchmark.pedantic(
            step, args=args, rounds=HOST_ROUNDS, iterations=HOST_ITERATIONS, warmup_rounds=HOST_WARMUP_ROUNDS
        )
    # `benchmark.stats` (the Metadata pytest-benchmark writes to its JSON) is the one non-underscore attribute that
    # holds the recorded rounds and the options they were timed with; pytest-benchmark has no other accessor
    used = benchmark.stats.options.get("timer")
    if timing != "host" and used is not CLOCKS[timing]:
        raise RuntimeError(
            f"{benchmark.fullname} was timed with {used!r}, not {timing!r}'s clock: mark its module "
            f"with `pytestmark = harness.timed_by({timing!r})`"
        )
    median = benchmark.stats.stats.median
    info["median_us"] = round(median * 1e6, 3)
    record(group, provider, median, info, baselines)
    return median


# ------------------------------------------------------------------------------------------------ session ratios
SESSION: dict[str, dict[str, tuple[float, dict]]] = {}  # case id -> provider -> (median seconds, extra_info)


def record(case_id: str, provider: str, seconds: float, extra_info: dict, baselines=("eager", "compile")):
    """Keep this median and (re)compute every provider's speedups of this case from this session's medians."""
    group = SESSION.setdefault(case_id, {})
    group[provider] = (seconds, extra_info)
    for t, info in group.values():
        for other in baselines:
            if other in group:
                info[f"speedup_vs_{other}"] = round(group[other][0] / t, 4)
