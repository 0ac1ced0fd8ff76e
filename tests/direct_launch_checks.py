"""Runs in a process WITHOUT TRITON_INTERPRET (tests/test_direct_launch.py starts it): the kernels are compiled
for sm_90 and launched through `bnfast.testing.standin_driver()`, which records what the launcher receives.

Prints one JSON line: {"skip": reason} or {"components": {...}, "same_arguments": ..., ...}. Each component
launches a base configuration twice, then one with exactly one key component changed, twice; it reports how
many of those launches went through JITFunction.run, how many new compiled kernels were loaded, and whether the
launcher got a different function handle.
"""

import dataclasses
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from bnfast import testing  # noqa: E402
from bnfast.kernels import batch_norm as _k  # noqa: E402
from bnfast.kernels import launch  # noqa: E402

C = 32


class Counted:
    """Counts the calls of JITFunction.run of one kernel (kernel[grid] resolves `self.run` on the instance)."""

    def __init__(self, kernel):
        self.kernel, self.calls, self.run = kernel, 0, kernel.run
        kernel.run = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.run(*args, **kwargs)


def _vec(dtype=torch.float32, stride=1, offset=0):
    return torch.rand(C * stride + offset, dtype=dtype)[offset:][::stride]


def _normalize(x=None, w=None, activation="relu", num_warps=None, device=None):
    """The eval forward's one stage (`launch.normalize`) on (16, C); `device` calls the launch with that device
    index instead of the tensors' (the stand-in's CPU tensors are all on -1)."""
    x = torch.randn(16, C) if x is None else x
    w = _vec() if w is None else w
    mean, var = _vec(), _vec()
    x3, y3 = launch.as_ncs(x), launch.as_ncs(torch.empty(16, C, dtype=x.dtype))
    cfg = launch.config_for(x3, 1)
    if num_warps is not None:
        cfg = dataclasses.replace(cfg, num_warps=num_warps)
    if device is None:
        launch.normalize(
            x3, y3, w, None, mean, var, cfg, stat_is_var=True, eps=1e-5, activation=activation, act_param=0.0
        )
        return
    saved = torch.Tensor.get_device
    torch.Tensor.get_device = lambda self: device
    try:
        launch.normalize(
            x3, y3, w, None, mean, var, cfg, stat_is_var=True, eps=1e-5, activation=activation, act_param=0.0
        )
    finally:
        torch.Tensor.get_device = saved


def _component(standin, counted, base, variant):
    """Launch base twice, then variant twice: JITFunction.run calls and loads per launch, function handles."""
    out = {"runs": [], "loads": [], "functions": []}
    for call in (base, base, variant, variant):
        runs, loads = counted.calls, len(standin.loaded)
        call()
        out["runs"].append(counted.calls - runs)
        out["loads"].append(len(standin.loaded) - loads)
        out["functions"].append(standin.launches[-1][3])
    return out


def main():
    reason = testing.triton_launch_support()
    if reason is not None or not launch.DIRECT_LAUNCH:
        print(json.dumps({"skip": reason or "direct launch off (BNFAST_DIRECT_LAUNCH=0)"}))
        return
    bf16 = torch.randn(16, C).to(torch.bfloat16)
    misaligned = torch.randn(16 * C + 1)[1:].view(16, C)  # 4 bytes past a 64-byte aligned allocation
    result = {"components": {}}
    with testing.standin_driver() as standin:
        counted = Counted(_k._bn_normalize_kernel)
        cases = {
            "dtype": (lambda: _normalize(bf16, _vec(torch.float32)), lambda: _normalize(bf16, _vec(torch.bfloat16))),
            "alignment": (lambda: _normalize(), lambda: _normalize(misaligned)),
            "int_eq_1": (lambda: _normalize(w=_vec(stride=1)), lambda: _normalize(w=_vec(stride=2))),
            "int_div_16": (lambda: _normalize(w=_vec(stride=2)), lambda: _normalize(w=_vec(stride=32))),
            "int_same_class": (lambda: _normalize(w=_vec(stride=2)), lambda: _normalize(w=_vec(stride=18))),
            "constexpr": (lambda: _normalize(activation="relu"), lambda: _normalize(activation="gelu")),
            "num_warps": (lambda: _normalize(num_warps=1), lambda: _normalize(num_warps=2)),
            "device": (lambda: _normalize(), lambda: _normalize(device=0)),
        }
        for name, (base, variant) in cases.items():
            result["components"][name] = _component(standin, counted, base, variant)
        result["device_switches"] = list(standin.device_switches)
        result["device_after"] = standin.get_current_device()

        # the same arguments: a launch through JITFunction.run, then the same launch direct
        x, w = torch.randn(16, C), _vec()
        launch.clear_direct_cache()
        runs = counted.calls
        x3, y3 = launch.as_ncs(x), launch.as_ncs(torch.empty_like(x))
        cfg = launch.config_for(x3, 1)
        for _ in range(2):
            launch.normalize(x3, y3, w, None, w, w, cfg, stat_is_var=True, eps=1e-5, activation="silu", act_param=0.0)
        first, second = standin.launches[-2:]
        result["same_arguments_runs"] = counted.calls - runs
        result["same_arguments"] = _same(first, second)
        result["arguments_count"] = len(first[4])

        # a launch plan (bn_fwd's second call of a signature): replayed direct, and the launcher gets what
        # JITFunction.run gave it on the first call, each tensor in the same role (the call's own tensors)
        fwd_counted = Counted(_k._bn_fwd_single_kernel)
        launch.clear_direct_cache()
        launch._PLANS.clear()
        w, b, rm, rv = _vec(), _vec(), torch.zeros(C), torch.ones(C)
        calls = []
        for _ in range(3):
            x = torch.randn(16, C)
            runs = fwd_counted.calls
            outs = launch.bn_fwd(
                x,
                w,
                b,
                rm,
                rv,
                None,
                training=True,
                momentum=0.1,
                cumulative=False,
                eps=1e-5,
                activation="relu",
                act_param=0.0,
            )
            calls.append((fwd_counted.calls - runs, _roles(standin.launches[-1], (x, w, b, rm, rv, *outs))))
        result["plan_runs"] = [c[0] for c in calls]
        result["plan_same_arguments"] = all(_same(calls[0][1], c[1]) for c in calls[1:])
        result["plan_planned"] = len(launch._PLANS)

        # off switch at run time: every launch through JITFunction.run
        launch.DIRECT_LAUNCH = False
        runs = counted.calls
        for _ in range(3):
            _normalize()
        result["switched_off_runs"] = counted.calls - runs
        launch.DIRECT_LAUNCH = True

        # record_launches still records (and nothing reaches the driver)
        launched = len(standin.launches)
        with testing.record_launches() as log:
            _normalize()
        result["recorded"] = [entry[0] for entry in log]
        result["launched_while_recording"] = len(standin.launches) - launched
    print(json.dumps(result))


def _roles(record, tensors):
    """A recorded launcher call with each tensor argument replaced by its position among `tensors` (-1: none)."""
    name, grid, stream, function, args = record

    def role(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", next((i for i, t in enumerate(tensors) if t is v), -1))
        return v

    return name, grid, stream, function, tuple(role(a) for a in args)


def _same(a, b):
    """Launcher calls equal: tensors the same objects, everything else equal and of the same type."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if type(a).__name__ == "LazyDict":  # Triton's launch metadata: a fresh object per launch, compared by content
        return type(b) is type(a) and _same(a.get(), b.get())
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


if __name__ == "__main__":
    sys.exit(main())
