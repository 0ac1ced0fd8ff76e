"""bnfast's whole host time per layer call, Triton's launch path included, beside torch's (no GPU needed).

On a GPU a layer of the MNIST model (batch 32, 32 channels) computes for ~3 us, so the Python between
`module(x)` and the kernel launches decides the step time. This benchmark times that Python per forward and per
forward+backward of FusedBatchNorm1d(32, activation="relu") on (32, 32), in one process, providers interleaved
round by round (minimum over rounds; each round runs the step `iterations` times):

- "bnfast": the module as a user calls it, Triton's launch path included. Without CUDA, Triton's active driver
  is `bnfast.testing.standin_driver()`: Triton really binds, specialises, looks up its cache (and compiles for
  sm_90 with ptxas on the first call); only the launcher's C call (argument packing, cuLaunchKernel: the same
  for any Triton kernel, a few us) is replaced by a recorder. With CUDA, the real driver on CUDA tensors.
  With the C++ node (bnfast.native) built, its call cache replays the module's call and its backward from C++
  (bnfast.ops "call cache").
- "bnfast-python": the same with the call cache off (`bnfast.testing.call_cache(False)`): bnfast's Python path
  with the C++ node as its autograd entry.
- "bnfast-function": the same, also with the eager entry's torch.autograd.Function (`bnfast.testing.eager_entry`)
  instead of the C++ node: the Python path as it runs where the node cannot be built.
- "bnfast-grid": the same with bnfast's direct launch turned off (`launch.DIRECT_LAUNCH = False`): every
  launch through Triton's `kernel[grid](...)`, i.e. `JITFunction.run`.
- "bnfast-own": launches recorded by `bnfast.testing.record_launches` (no Triton at all, direct launch off, so
  no call cache either): the Python path's own Python plus torch's share. Triton's share per launch =
  (bnfast-python - bnfast-own) / launches (the direct launch's key and lookup included), and likewise for -grid.
- "autograd-floor": an autograd.Function with the eager entry's inputs and output (ops.BatchNormFunction: the
  protocol's 13 inputs, y alone) that only allocates: what any Function-based layer pays torch (apply, save,
  the engine). Beside it the same with 13 inputs and 3 outputs (the entry before) and with 4 inputs, 1 output
  (the fewest a BN entry could take): how the floor grows with inputs and outputs.
- "native-floor": the C++ node (bnfast/csrc/autograd_node.cpp) around allocate-only forward and backward
  callbacks: what a layer pays torch through the node (the "autograd-floor" row's counterpart).
- "torch": torch's CPU F.batch_norm + F.relu, really computing (tiny).

    python -m bench.test_host_overhead [--rounds 200] [--iterations 10] [--json PATH]   # TRITON_INTERPRET unset
    PYTHONPATH=. pytest bench/test_host_overhead.py -s        # runs the above in a subprocess, prints the table

The measurement needs compiled kernels, so it always runs in a subprocess without TRITON_INTERPRET (bench's
conftest sets it on CPU-only machines). Supported where `bnfast.testing.triton_launch_support()` is None (triton
3.6 and 3.8); elsewhere the test skips and says why. Under `--benchmark-disable` (CI) it runs 2 rounds.
"""

import argparse
import json
import os
import subprocess
import sys
import timeit

import pytest

SHAPE = (32, 32)  # the MNIST layer
PROVIDERS = (
    "bnfast",
    "bnfast-python",
    "bnfast-function",
    "bnfast-grid",
    "bnfast-own",
    "native-floor",
    "autograd-floor",
    "floor-13in-3out",
    "floor-4in-1out",
    "torch",
)
MODES = ("fwd", "fwd+bwd")


def _floor_function(torch, outputs: int):
    class _AllocateOnly(torch.autograd.Function):
        """The autograd floor: the entry's inputs, `outputs` outputs (y, then mean and rstd), no work."""

        @staticmethod
        def forward(ctx, x, weight, bias, *rest):
            C = x.shape[1]
            y, mean, rstd = torch.empty_like(x), x.new_empty(C), x.new_empty(C)
            ctx.save_for_backward(x, weight, bias, mean, rstd)
            ctx.inputs = 3 + len(rest)
            if outputs == 1:
                return y
            ctx.mark_non_differentiable(mean, rstd)
            return y, mean, rstd

        @staticmethod
        def backward(ctx, dy, *_):
            x, weight, bias, _, _ = ctx.saved_tensors
            grads = torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)
            return *grads, *(None,) * (ctx.inputs - 3)

    return _AllocateOnly


def _native_floor(torch, node, args):
    """The C++ node's floor: its apply around callbacks that allocate what bnfast's forward and backward do."""

    def forward(inputs):
        x = inputs[0]
        C = x.shape[1]
        y, mean, rstd = torch.empty_like(x), x.new_empty(C), x.new_empty(C)
        return y, (x, inputs[1], inputs[2], mean, rstd, None, None), None

    def backward(state, needs, dy, x, weight, bias, *_):
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias), None

    x, w, b, r, inputs = args
    return lambda x: node.apply(forward, backward, x, w, b, r, inputs)


# the floors: allocate-only autograd.Functions called with: the eager entry's inputs (ops.BatchNormFunction:
# x, weight, bias, residual, one tuple) and y alone; the entry before (13 inputs, y + mean + rstd); and 4 inputs
# (x, weight, bias, one object), y alone
FLOORS = ("autograd-floor", "floor-13in-3out", "floor-4in-1out")


def measure(rounds: int, iterations: int) -> dict:
    """{"skip": reason} or {"versions", "launches", "us": {mode: {provider: min us per call}}, "derived"}."""
    import contextlib

    import torch
    import torch.nn.functional as F
    import triton

    import bnfast
    from bnfast import testing
    from bnfast.kernels import launch

    reason = testing.triton_launch_support()
    if reason is not None:
        return {"skip": reason}
    if launch.is_interpreted():
        return {"skip": "the kernels are interpreted (TRITON_INTERPRET=1): run without it"}
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    driver = contextlib.nullcontext() if cuda else testing.standin_driver()
    inputs = getattr(bnfast.ops, "EAGER_INPUTS", 13)  # the eager autograd entry's input count
    out = {
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0]},
        "device": "cuda" if cuda else "cpu, stand-in driver (sm_90)",
        "floor_inputs": inputs,
        "us": {m: {} for m in MODES},
        "launches": {},
    }
    with driver as standin:
        x = torch.randn(SHAPE, device=device, requires_grad=True)
        dy = torch.randn(SHAPE, device=device)
        module = bnfast.FusedBatchNorm1d(SHAPE[1], activation="relu", device=device)
        w, b, rm, rv = module.weight, module.bias, module.running_mean, module.running_var

        spec = object()  # stands for everything but x, weight and bias
        full = (x, w, b, rm, rv, None, True, 0.1, False, 1e-5, "relu", 0.0, None)

        def floor_forward(args, n_outputs):
            function = _floor_function(torch, n_outputs)
            if n_outputs == 1:
                return lambda x: function.apply(*args)
            return lambda x: function.apply(*args)[0]

        eager_args = (x, w, b, None, full) if inputs == 5 else full
        floors = {
            "autograd-floor": (eager_args, 1),
            "floor-13in-3out": (full, 3),
            "floor-4in-1out": ((x, w, b, spec), 1),
        }

        def torch_forward(x):
            return F.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))

        node = bnfast.ops.native_node() if hasattr(bnfast.ops, "native_node") else None
        out["native"] = node is not None
        forwards = {
            name: module for name in ("bnfast", "bnfast-python", "bnfast-function", "bnfast-grid", "bnfast-own")
        }
        if node is not None:
            forwards["native-floor"] = _native_floor(torch, node, (x, w, b, None, full))
        forwards.update({name: floor_forward(*floors[name]) for name in FLOORS})
        forwards["torch"] = torch_forward
        with testing.record_launches() as log:
            module(x).backward(dy)
            out["launches"] = {"fwd+bwd": len(log)}
        steps = {}
        for mode in MODES:
            for provider, forward in forwards.items():
                if mode == "fwd":

                    def step(forward=forward):
                        with torch.no_grad():
                            forward(x)
                else:

                    def step(forward=forward):
                        forward(x).backward(dy)

                steps[mode, provider] = step
        direct = getattr(launch, "DIRECT_LAUNCH", None)
        best = {key: float("inf") for key in steps}
        for _ in range(rounds):
            for (mode, provider), step in steps.items():
                if direct is not None:  # -own: the direct launch's key counts as Triton's
                    launch.DIRECT_LAUNCH = direct and provider in ("bnfast", "bnfast-python", "bnfast-function")
                ctx = testing.record_launches() if provider == "bnfast-own" else contextlib.nullcontext()
                entry = contextlib.ExitStack()
                if node is not None and provider != "bnfast":
                    entry.enter_context(testing.call_cache(False))
                if node is not None and provider == "bnfast-function":
                    entry.enter_context(testing.eager_entry("function"))
                with entry, ctx as recorded:
                    step()  # warm-up (and the first compile)
                    t = timeit.timeit(step, number=iterations) / iterations
                    if recorded is not None:
                        recorded.clear()
                best[mode, provider] = min(best[mode, provider], t)
                if standin is not None:
                    standin.launches.clear()
        if direct is not None:
            launch.DIRECT_LAUNCH = direct
    for (mode, provider), t in best.items():
        out["us"][mode][provider] = round(t * 1e6, 2)
    n = out["launches"]["fwd+bwd"]
    us = out["us"]["fwd+bwd"]
    out["derived"] = {
        "triton_per_launch_direct": round((us["bnfast-python"] - us["bnfast-own"]) / n, 2),
        "triton_per_launch_grid": round((us["bnfast-grid"] - us["bnfast-own"]) / n, 2),
        "launches_per_fwd_bwd": n,
    }
    return out


def format_table(result: dict) -> str:
    us, d = result["us"], result["derived"]
    rows = [
        ("bnfast (module, Triton's launch included; call cache replays)", "bnfast"),
        ("bnfast, call cache off (the Python path, the C++ node)", "bnfast-python"),
        ("bnfast, call cache off, torch.autograd.Function entry", "bnfast-function"),
        ("bnfast, every launch through kernel[grid]", "bnfast-grid"),
        ("bnfast's own Python + torch (launches recorded)", "bnfast-own"),
        ("autograd floor: the C++ node (bnfast.native), allocating", "native-floor"),
        (f"autograd floor: the Function entry's {result['floor_inputs']} inputs, y alone", "autograd-floor"),
        ("autograd floor: 13 inputs, y + mean + rstd (the entry before)", "floor-13in-3out"),
        ("autograd floor: 4 inputs (x, weight, bias, one object), y alone", "floor-4in-1out"),
        ("torch F.batch_norm + relu, computing", "torch"),
    ]
    lines = [
        f"host time per layer call, {SHAPE[0]}x{SHAPE[1]}, {result['device']}; {result['versions']}",
        "| per layer call | forward | forward+backward |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {us['fwd'][p]:.1f} us | {us['fwd+bwd'][p]:.1f} us |" for label, p in rows if p in us["fwd"]]
    lines.append(
        f"| Triton's share per launch: direct / kernel[grid] | | {d['triton_per_launch_direct']:.1f} / "
        f"{d['triton_per_launch_grid']:.1f} us ({d['launches_per_fwd_bwd']} launches) |"
    )
    return "\n".join(lines)


def run_subprocess(rounds: int, iterations: int) -> dict:
    """`measure` in a fresh process without TRITON_INTERPRET (the kernels must be compiled JIT functions)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    cmd = [
        sys.executable,
        "-m",
        "bench.test_host_overhead",
        "--rounds",
        str(rounds),
        "--iterations",
        str(iterations),
        "--json",
        "-",
    ]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.host_overhead
def test_host_overhead(request):
    smoke = bool(request.config.getoption("benchmark_disable", False))
    result = run_subprocess(2 if smoke else 200, 2 if smoke else 10)
    if "skip" in result:
        pytest.skip(result["skip"])
    print("\n" + format_table(result))
    assert result["derived"]["launches_per_fwd_bwd"] == 2  # (32, 32) is single-pass: one launch each way
    assert all(t > 0 for mode in MODES for t in result["us"][mode].values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--json", metavar="PATH", help="write the result as JSON ('-': stdout, last line)")
    args = parser.parse_args(argv)
    result = measure(args.rounds, args.iterations)
    if args.json == "-":
        print(json.dumps(result))
        return
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(result["skip"] if "skip" in result else format_table(result))


if __name__ == "__main__":
    main()
