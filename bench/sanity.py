"""The GPU run's first two steps, each in its own process (bash bench/run_gpu.sh): what the machine is, then whether
bnfast computes the right thing on it at all.

    python -m bench.sanity env [--json PATH]     # device, versions, commit, date; exit 2 without a CUDA device
    python -m bench.sanity check [--json PATH]   # fwd+bwd bnfast vs the float64 reference on CUDA; exit 1 if wrong

`env` reads the commit from BNFAST_COMMIT (the tree may travel without .git), else `git rev-parse HEAD`.
`check` runs FusedBatchNorm (+ReLU) forward and backward on a few benchmark shapes (bench/cases.py SANITY_CASES:
both launch plans, bfloat16 and channels_last among them) with CUDA_LAUNCH_BLOCKING=1 set by the caller, and
compares y, dx, dweight, dbias with the float64 reference (bench/harness.py `check`: normalised error <=
1e-4 in float32, 3e-2 in bfloat16), on the first call and again on the fourth, which the call cache replays from
C++ where it can (the case's "replays": forward and backward replays of that call). A CUDA fault (an illegal
address) ends this process only: the stages after it run in fresh ones. The same Triton configurations are compiled
again by the benchmarks: Triton's on-disk cache serves them there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import traceback


def commit() -> str:
    if os.environ.get("BNFAST_COMMIT"):
        return os.environ["BNFAST_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], capture_output=True, timeout=10).returncode != 0
        return sha.stdout.strip() + (" (dirty)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no .git and no BNFAST_COMMIT)"


def environment() -> dict:
    """Device, versions (python, torch, CUDA, triton, numpy), commit and date: what run.log and the summary record."""
    import numpy
    import torch
    import triton

    info = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "numpy": numpy.__version__,
        "host": platform.node(),
        "device": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            sm=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            memory_GiB=round(props.total_memory / 2**30, 1),
        )
    return info


def _replays() -> tuple[int, int]:
    """The call cache's (forward, backward) replays so far (0, 0 without the C++ node)."""
    from bnfast import ops

    node = ops.native_node()
    stats = node.stats() if node is not None else {}
    return stats.get("forward_replays", 0), stats.get("backward_replays", 0)


def check(device="cuda", sanity_cases=None) -> dict:
    """Run SANITY_CASES through bnfast (CUDA; on CPU under the interpreter in tests/test_bench_smoke.py with tiny
    cases); {"cases": [{id, max_err, max_err_replayed, replays | error}], "ok": bool}."""
    import torch

    from bench import harness
    from bench.cases import SANITY_CASES

    device = torch.device(device)
    sanity_cases = SANITY_CASES if sanity_cases is None else sanity_cases
    results = []
    for case in sanity_cases:
        entry = {"id": case.id}
        try:
            inputs = harness.make_inputs(case, device, 1)
            module = harness.build_module("bnfast", case, device)
            step = harness.make_step(module, case)
            expected = harness.reference(case, harness.initial_state(module), *inputs[0])
            out = step(*inputs[0])
            if device.type == "cuda":
                torch.cuda.synchronize()
            entry["max_err"] = harness.check(out, expected, case.torch_dtype)
            # the call cache (bnfast.ops): a module's third and later calls replay from C++, checked the same way
            for _ in range(2):
                step(*inputs[0])
            before = _replays()
            expected = harness.reference(case, harness.initial_state(module), *inputs[0])
            out = step(*inputs[0])
            if device.type == "cuda":
                torch.cuda.synchronize()
            entry["replays"] = [a - b for a, b in zip(_replays(), before, strict=True)]
            entry["max_err_replayed"] = harness.check(out, expected, case.torch_dtype)
        except AssertionError as e:  # a wrong result: keep going, the next case may tell more
            entry["error"] = f"wrong result: {e}"
        except Exception as e:  # a CUDA fault poisons the context: report and stop
            entry["error"] = f"{type(e).__name__}: {e}"
            results.append(entry)
            traceback.print_exc()
            break
        results.append(entry)
        ok_text = f"ok, max normalised error {entry.get('max_err', 0):.3g}"
        if "max_err_replayed" in entry:
            ok_text += f"; fourth call {entry['max_err_replayed']:.3g} (replays {entry['replays']})"
        print(f"{case.id}: " + (entry.get("error") or ok_text), flush=True)
    ok = len(results) == len(sanity_cases) and all("error" not in r for r in results)
    return {"ok": ok, "cases": results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("env", "check"))
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = parser.parse_args(argv)
    if args.what == "env":
        result = environment()
        print(" | ".join(f"{k} {v}" for k, v in result.items()))
        code = 0 if result["device"] else 2
        if not result["device"]:
            print("no CUDA device visible to torch (torch.cuda.is_available() is False)", file=sys.stderr)
    else:
        result = check()
        code = 0 if result["ok"] else 1
        print("sanity: " + ("ok" if result["ok"] else "FAILED"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return code


if __name__ == "__main__":
    sys.exit(main())
