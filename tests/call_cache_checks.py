"""Runs in a process WITHOUT TRITON_INTERPRET (tests/test_call_cache.py starts it): the kernels are compiled for
sm_90 and launched through `bnfast.testing.standin_driver()`, which records what Triton's launcher receives.

The call cache (bnfast.ops "call cache") replays a module's eager call from C++. Each scenario runs four training
steps (forward + backward) of a fresh module with the cache on and the same steps with it off, and reports, per
step, whether the launcher got the same calls (each tensor in the same role: the step's x, dy, residual, the
module's parameters and buffers; outputs by layout; everything else equal), the same num_batches_tracked, and
how many forward and backward replays C++ made. Invalidation scenarios change one thing the slow path depends
on after the cache is warm and report whether the next call replayed (it must not) and matched the slow path.

Prints one JSON line: {"skip": reason} or {"scenarios": {...}, "invalidations": {...}}.
"""

import contextlib
import json
import os
import sys
import warnings

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

import bnfast  # noqa: E402
from bnfast import ops, testing  # noqa: E402
from bnfast.kernels import launch  # noqa: E402

STEPS = 4


def _module(kind, C, dtype=torch.float32, **kwargs):
    cls = {1: bnfast.FusedBatchNorm1d, 2: bnfast.FusedBatchNorm2d}[kind]
    torch.manual_seed(1)
    m = cls(C, dtype=dtype, **kwargs)
    if m.weight is not None:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
    return m


SCENARIOS = {
    "train-relu": dict(kind=1, shape=(32, 32), activation="relu"),
    "eval": dict(kind=1, shape=(32, 32), activation="relu", eval=True),
    "residual-act": dict(kind=1, shape=(16, 8, 5), activation="silu", residual=True),
    "residual-no-act": dict(kind=1, shape=(16, 8), residual=True),
    "no-affine": dict(kind=1, shape=(16, 8), affine=False),
    "no-running-stats": dict(kind=1, shape=(16, 8), track_running_stats=False),
    "cumulative": dict(kind=1, shape=(16, 8), momentum=None),
    "channels-last": dict(kind=2, shape=(4, 8, 3, 5), layout="channels_last", activation="relu"),
    "bfloat16": dict(kind=1, shape=(16, 8), dtype=torch.bfloat16, activation="gelu"),
    "only-x-grad": dict(kind=1, shape=(16, 8), frozen=True),
    "ghost-no-stats": dict(kind=1, shape=(16, 8), virtual_batch_size=4, track_running_stats=False),
    "split-plan": dict(kind=1, shape=(64, 8), plan=("split", 64)),
}


def _inputs(spec, step):
    torch.manual_seed(100 + step)
    dtype = spec.get("dtype", torch.float32)
    x = torch.randn(spec["shape"], dtype=dtype)
    if spec.get("layout") == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    r = torch.randn(spec["shape"], dtype=dtype).requires_grad_(True) if spec.get("residual") else None
    return x, r, torch.randn(spec["shape"], dtype=dtype)


def _roles(m, x, r, dy):
    roles = {id(x): "x", id(dy): "dy"}
    if r is not None:
        roles[id(r)] = "residual"
    for name, t in [*m.named_parameters(), *m.named_buffers()]:
        roles[id(t)] = name
    return roles


def _canon(obj, roles):
    """A launcher argument, comparable across runs: tensors by role (or layout), LazyDicts by content."""
    if isinstance(obj, torch.Tensor):
        return roles.get(id(obj)) or ("tensor", tuple(obj.shape), obj.stride(), str(obj.dtype))
    if type(obj).__name__ == "LazyDict":
        return ("LazyDict", _canon(obj.get(), roles))
    if isinstance(obj, dict):
        return {k: _canon(v, roles) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [_canon(v, roles) for v in obj]
    if isinstance(obj, bool | int | float | str) or obj is None:
        return [type(obj).__name__, obj]
    return [type(obj).__name__, repr(obj) if type(obj).__name__ == "HookChain" else id(obj)]


def _run(spec, cached: bool, standin, change=None):
    """STEPS steps of a fresh module; per step (canonical launches, num_batches_tracked, replays)."""
    kwargs = {
        k: spec[k]
        for k in ("activation", "affine", "track_running_stats", "momentum", "virtual_batch_size")
        if k in spec
    }
    m = _module(spec["kind"], spec["shape"][1], spec.get("dtype", torch.float32), **kwargs)
    if spec.get("eval"):
        m.eval()
    if spec.get("frozen"):
        m.requires_grad_(False)
    plan = testing.force_plan(*spec["plan"]) if "plan" in spec else contextlib.nullcontext()
    node = ops.native_node()
    steps = []
    with plan, testing.call_cache(cached):
        for step in range(STEPS):
            x, r, dy = _inputs(spec, step)
            context = contextlib.nullcontext()
            if change is not None and step == STEPS - 1:
                made = change(m, x)  # a context manager to run the step in, or a change already made
                if isinstance(made, contextlib.AbstractContextManager):
                    context = made
            before = dict(node.stats())
            standin.launches.clear()
            with context:
                y = m(x, r) if r is not None else m(x)
                if y.requires_grad:
                    y.backward(dy)
            after = node.stats()
            roles = _roles(m, x, r, dy)
            launches = [_canon(list(launch_args), roles) for launch_args in standin.launches]
            nbt = m.num_batches_tracked.item() if m.num_batches_tracked is not None else None
            replays = [
                after["forward_replays"] - before["forward_replays"],
                after["backward_replays"] - before["backward_replays"],
            ]
            steps.append({"launches": launches, "nbt": nbt, "replays": replays})
    return steps


def _changes():
    def attribute(name, value):
        def change(m, x):
            setattr(m, name, value)

        return change

    def swap_weight(m, x):
        m.weight.data = m.weight.data.double().float()  # same dtype and layout, a new tensor: still replayable

    def weight_strided(m, x):  # the same values in a strided view: another layout, another plan
        C = m.weight.shape[0]
        m.weight.data = torch.zeros(2 * C)[::2].copy_(m.weight.data)

    def context(factory):
        return lambda m, x: factory()

    class Mode(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    return {
        "eps": (attribute("eps", 1e-3), False),
        "momentum": (attribute("momentum", 0.2), False),
        "activation": (lambda m, x: setattr(m, "activation", bnfast.activations.Activation("silu")), False),
        "eval": (lambda m, x: m.eval(), False),
        "weight-strided": (weight_strided, False),
        "weight-swapped": (swap_weight, True),
        "direct-launch-off": (lambda m, x: setattr(launch, "DIRECT_LAUNCH", False), False),
        "plan-forced": (context(lambda: testing.force_plan("split", 64)), False),
        "function-entry": (context(lambda: testing.eager_entry("function")), False),
        "dispatch-mode": (context(Mode), False),
        "no-grad": (context(torch.no_grad), True),
        # x unpacked in another layout (column-major) than it was saved in: the forward replays, the backward not
        "saved-hook-layout": (
            context(lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t, _column_major)),
            True,
        ),
    }


def _column_major(t):
    return t.t().contiguous().t() if t.dim() == 2 and min(t.shape) > 1 else t


def main():
    reason = testing.triton_launch_support()
    if reason is not None:
        print(json.dumps({"skip": reason}))
        return 0
    if ops.native_node() is None:
        print(json.dumps({"skip": f"no C++ node: {testing.native_reason()}"}))
        return 0
    result = {"scenarios": {}, "invalidations": {}}
    with testing.standin_driver() as standin:
        for name, spec in SCENARIOS.items():
            on, off = _run(spec, True, standin), _run(spec, False, standin)
            result["scenarios"][name] = {
                "same_launches": [a["launches"] == b["launches"] for a, b in zip(on, off, strict=True)],
                "same_nbt": [a["nbt"] == b["nbt"] for a, b in zip(on, off, strict=True)],
                "replays": [a["replays"] for a in on],
                "replays_off": [b["replays"] for b in off],
                "launches": [len(a["launches"]) for a in on],
            }
        spec = SCENARIOS["train-relu"]
        for name, (change, replayable) in _changes().items():
            direct = launch.DIRECT_LAUNCH
            try:
                on, off = _run(spec, True, standin, change), _run(spec, False, standin, change)
            finally:
                launch.DIRECT_LAUNCH = direct
            result["invalidations"][name] = {
                "replayable": replayable,
                "last_replays": on[-1]["replays"],
                "warm_replays": on[-2]["replays"],
                "same_launches": on[-1]["launches"] == off[-1]["launches"],
                "same_nbt": on[-1]["nbt"] == off[-1]["nbt"],
            }
        spec = SCENARIOS["train-relu"]

        # subclasses: one that overrides how the call is computed is never replayed, one that only adds is
        class Overrides(bnfast.FusedBatchNorm1d):
            def _batch_norm(self, *args, **kwargs):
                return super()._batch_norm(*args, **kwargs)

        class Adds(bnfast.FusedBatchNorm1d):
            def extra(self):
                return 1

        result["subclasses"] = {}
        for cls in (Overrides, Adds):
            m = cls(32, activation="relu")
            with testing.call_cache(True):
                before = ops.native_node().stats()["forward_replays"]
                for step in range(4):
                    m(_inputs(spec, step)[0])
                result["subclasses"][cls.__name__] = ops.native_node().stats()["forward_replays"] - before
        # a warm cache under torch.jit.trace: the trace must see the call (the slow path's torch ops), not nothing
        m = _module(1, 32, activation="relu")
        with testing.call_cache(True):
            for step in range(3):
                m(_inputs(spec, step)[0])
            warm = ops.native_node().stats()["forward_replays"]
            m(_inputs(spec, 3)[0])
            replayed = ops.native_node().stats()["forward_replays"] - warm
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(m, _inputs(spec, 4)[0].detach(), check_trace=False)
        result["jit_trace"] = {"warm_replayed": replayed, "graph_has_batch_norm": "batch_norm" in str(traced.graph)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
