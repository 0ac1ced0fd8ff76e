"""Summary of a benchmark run, from pytest-benchmark's JSON alone: markdown tables and a GB/s-vs-size plot.

    PYTHONPATH=. python -m bench.summarize RUN.json [MORE.json ...] [--out DIR] [--reasons REASONS.json]
        [--command "..."] [--env env.json] [--sanity sanity.json] [--parity parity.xml ...]

Several JSONs (one per stage of bench/run_gpu.sh) are read as one run. Writes DIR/summary.md (run info: device,
versions, commit, date, command; the sanity check and the parity tests' outcome; the BatchNorm table with every
case, its three providers, GB/s, fraction of the measured copy bandwidth, speedups and the targets each case misses;
the MNIST step table), DIR/headline.md (the fwd+bwd BN+ReLU rows and the MNIST step, for the README) and
DIR/gbps_vs_size.png. Every figure is read from the files: the medians pytest-benchmark recorded and the extra_info
the benchmarks attached (bench/test_batch_norm.py), env.json and sanity.json (bench/sanity.py), the JUnit XML of
the parity tests.

Targets (issue 18; fwd+bwd BN+ReLU, float32 and bfloat16, x's size in MiB):
- x >= 64 MiB: >= 1.55x eager, >= 1.1x torch.compile, >= 85% of the measured copy bandwidth on the standalone floor
  (bench/traffic.py standalone_bytes);
- 4-40 MiB: >= 2.0x eager, >= 1.3x torch.compile;
- launch-bound ((32, 32)): bnfast's host time per fwd+bwd <= torch eager's (host_us);
- every case: never slower than eager.
A case that misses one is flagged in the `targets` column; REASONS.json ({case id: "reason found"}) puts the
reason beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

from bench.cases import DTYPES, MNIST_MODELS, PROVIDERS

MIB = 2**20
# (smallest x in bytes, largest x in bytes or None, {target: figure}); fwd+bwd BN+ReLU (issue 18)
TARGETS = [
    (64 * MIB, None, {"vs_eager": 1.55, "vs_compile": 1.1, "standalone_frac_of_copy_bw": 0.85}),
    (4 * MIB, 40 * MIB, {"vs_eager": 2.0, "vs_compile": 1.3}),
]
LAUNCH_BOUND_NUMEL = 32 * 32  # at most this many elements: host time per call decides


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)


def load_runs(paths) -> dict:
    """One run from several pytest-benchmark JSONs: the benchmarks of all, machine_info merged (first file wins)."""
    run = {"benchmarks": [], "machine_info": {}}
    for path in paths:
        part = load(path)
        run["benchmarks"] += part.get("benchmarks", [])
        for k, v in part.get("machine_info", {}).items():
            run["machine_info"].setdefault(k, v)
        for k in ("datetime", "commit_info"):
            if k in part:
                run.setdefault(k, part[k])
    return run


def parity_results(paths) -> dict:
    """{"tests", "failures", "errors", "skipped", "failed": [node ids]} over JUnit XML files (pytest --junitxml)."""
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": []}
    for path in paths:
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as e:  # a run cut mid-write
            out["failed"].append(f"{path}: unreadable ({e})")
            continue
        for suite in root.iter("testsuite"):
            for key in ("tests", "failures", "errors", "skipped"):
                out[key] += int(suite.get(key, 0))
        for case in root.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                out["failed"].append(f"{case.get('classname')}::{case.get('name')}")
    return out


def bn_cases(run: dict) -> dict[str, dict]:
    """case id -> {"info": case fields, provider: {"median": s, **extra_info}} for the BN benchmarks."""
    cases = {}
    for b in run["benchmarks"]:
        info = b.get("extra_info", {})
        if "provider" not in info or "mode" not in info:
            continue
        keys = ("mode", "activation", "dtype", "shape", "layout", "residual")
        case = cases.setdefault(b["group"], {"info": {k: info.get(k) for k in keys}})
        case[info["provider"]] = {"median": b["stats"]["median"], **info}
    return cases


def x_bytes(info) -> int:
    return math.prod(info["shape"]) * DTYPES[info["dtype"]].itemsize


def misses(case: dict) -> list[str]:
    """The issue's targets this case misses (measured figures, never asserted in tests)."""
    out = []
    ours, eager, compiled = (case.get(p) for p in PROVIDERS)
    if ours is None:
        return out
    if eager and ours["median"] > eager["median"]:
        out.append(f"slower than eager ({eager['median'] / ours['median']:.2f}x)")
    info = case["info"]
    if info["mode"] != "fwd+bwd" or info["activation"] != "relu":
        return out
    if math.prod(info["shape"]) <= LAUNCH_BOUND_NUMEL and eager and "host_us" in ours and "host_us" in eager:
        if ours["host_us"] > eager["host_us"]:
            out.append(f"host {ours['host_us']:.1f} us > eager's {eager['host_us']:.1f} us")
    size = x_bytes(info)
    for low, high, targets in TARGETS:
        if size < low or (high is not None and size > high):
            continue
        if eager and "vs_eager" in targets and eager["median"] / ours["median"] < targets["vs_eager"]:
            out.append(f"< {targets['vs_eager']}x eager")
        if compiled and "vs_compile" in targets and compiled["median"] / ours["median"] < targets["vs_compile"]:
            out.append(f"< {targets['vs_compile']}x compile")
        frac = targets.get("standalone_frac_of_copy_bw")
        if frac and ours.get("standalone_frac_of_copy_bw", 1.0) < frac:
            out.append(f"< {frac:.0%} of copy BW (standalone floor)")
    return out


def _us(p):
    return "" if p is None else f"{p['median'] * 1e6:.1f}"


def _ratio(case, other):
    ours, theirs = case.get("bnfast"), case.get(other)
    return "" if not (ours and theirs) else f"{theirs['median'] / ours['median']:.2f}x"


def _host(case):
    cells = [case.get(p, {}).get("host_us") for p in ("bnfast", "eager")]
    return "" if None in cells else f"{cells[0]:.1f} / {cells[1]:.1f}"


def _shape(info):
    """e.g. 256x64x112x112 cl+add: channels_last, with the fused residual add."""
    extra = (" cl" if info.get("layout") == "channels_last" else "") + ("+add" if info.get("residual") else "")
    return "x".join(map(str, info["shape"])) + extra


def bn_table(cases: dict, reasons: dict, select=None) -> list[str]:
    head = [
        "mode",
        "act",
        "dtype",
        "shape",
        "bnfast us",
        "eager us",
        "compile us",
        "bnfast GB/s",
        "of copy BW",
        "vs eager",
        "vs compile",
        "host us bnfast/eager",
        "targets",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case_id, case in cases.items():
        info = case["info"]
        if select and not select(info):
            continue
        ours = case.get("bnfast") or {}
        missed = misses(case)
        flag = "; ".join(missed) if missed else "met" if ours else ""
        if missed and case_id in reasons:
            flag += f" -- {reasons[case_id]}"
        cells = [
            info["mode"],
            info["activation"],
            info["dtype"],
            _shape(info),
            _us(case.get("bnfast")),
            _us(case.get("eager")),
            _us(case.get("compile")),
            f"{ours['GBps']:.1f}" if "GBps" in ours else "",
            f"{ours['frac_of_copy_bw']:.0%}" if "frac_of_copy_bw" in ours else "",
            _ratio(case, "eager"),
            _ratio(case, "compile"),
            _host(case),
            flag,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def mnist_table(run: dict) -> list[str]:
    groups = {}
    for b in run["benchmarks"]:
        info = b.get("extra_info", {})
        if "model" in info and "hidden" in info:
            groups.setdefault((info["batch"], info["hidden"]), {})[info["model"]] = {
                "median": b["stats"]["median"],
                **info,
            }
    if not groups:
        return []
    head = [
        "batch",
        "hidden",
        *(f"{m} us" for m in MNIST_MODELS),
        "GPU ops/step (no-BN, torch-BN, bnfast)",
        "host launches/step (torch-BN, bnfast, bnfast+graph)",
        "bnfast vs torch-BN",
        "bnfast+graph vs torch-BN+graph",
        "bnfast+graph / no-BN+graph",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (batch, hidden), g in sorted(groups.items()):
        t = {m: g[m]["median"] for m in MNIST_MODELS if m in g}
        ops = ", ".join(str(g.get(m, {}).get("gpu_ops_per_step", "")) for m in ("no-BN", "torch-BN", "bnfast"))
        launches = ", ".join(
            str(g.get(m, {}).get("host_launches_per_step", "")) for m in ("torch-BN", "bnfast", "bnfast+graph")
        )
        pairs = (("bnfast", "torch-BN"), ("bnfast+graph", "torch-BN+graph"))
        vs = [f"{t[base] / t[m]:.2f}x" if base in t and m in t else "" for m, base in pairs]
        graphed = ("bnfast+graph", "no-BN+graph")
        vs.append(f"{t[graphed[0]] / t[graphed[1]]:.2f}" if all(m in t for m in graphed) else "")
        cells = [str(batch), str(hidden)] + [f"{t[m] * 1e6:.1f}" if m in t else "" for m in MNIST_MODELS]
        lines.append("| " + " | ".join(cells + [ops, launches, *vs]) + " |")
    return lines


def run_info(run: dict, command: str | None, env: dict | None = None) -> list[str]:
    """Device, versions, date, commit and command: from bench/sanity.py's env.json where given (the commit passed
    in as BNFAST_COMMIT), else from pytest-benchmark's machine_info and commit_info."""
    m, env = run.get("machine_info", {}), env or {}
    commit = env.get("commit") or run.get("commit_info", {}).get("id", "?")
    if not env and run.get("commit_info", {}).get("dirty"):
        commit += " (dirty)"
    lines = [
        f"- device: {env.get('device') or m.get('cuda_device', 'no CUDA device')} "
        f"({m.get('sm_count') or env.get('sms', '?')} SMs, "
        f"L2 {m.get('l2_bytes', 0) / 2**20:.0f} MiB), measured copy bandwidth {m.get('copy_GBps', '?')} GB/s "
        "(device-to-device, read + write)",
        f"- python {env.get('python') or m.get('python_version', '?')}, torch {env.get('torch') or m.get('torch', '?')}"
        f" (CUDA {env.get('cuda') or m.get('cuda_version', '?')}), triton {env.get('triton') or m.get('triton', '?')}"
        + (f", numpy {env['numpy']}" if "numpy" in env else ""),
        f"- date: {env.get('date') or run.get('datetime', '?')}; commit: {commit}",
    ]
    if command:
        lines.append(f"- command: `{command}`")
    lines.append(
        "- times: median device time per call (CUDA events; bench/harness.py); GB/s counts the minimum "
        "bytes of bench/traffic.py; MNIST: wall clock per step"
    )
    return lines


def checks_lines(sanity: dict | None, parity: dict | None) -> list[str]:
    """The sanity check's and the parity tests' outcome (what outranks every speed figure)."""
    lines = []
    if sanity is not None:
        bad = [f"{c['id']}: {c['error'].splitlines()[0]}" for c in sanity.get("cases", []) if "error" in c]
        verdict = "ok" if sanity.get("ok") else "FAILED"
        passed = len(sanity.get("cases", [])) - len(bad)
        lines.append(
            f"- sanity (bnfast fwd+bwd vs float64 on CUDA): {verdict}, {passed} cases passed"
            + "".join(f"; {b}" for b in bad)
        )
    if parity is not None:
        passed = parity["tests"] - parity["failures"] - parity["errors"] - parity["skipped"]
        counts = f"{parity['failures']} failed, {parity['errors']} errors, {parity['skipped']} skipped"
        lines.append(
            f"- parity tests on CUDA: {passed} passed, {counts}"
            + "".join(f"\n  - FAILED {f}" for f in parity["failed"])
        )
    return lines


def plot(cases: dict, path: Path, copy_gbps) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    modes = ("fwd-train", "fwd-eval", "fwd+bwd")
    dtypes = sorted({c["info"]["dtype"] for c in cases.values()}, reverse=True)
    fig, axes = plt.subplots(len(dtypes), len(modes), figsize=(5 * len(modes), 4 * len(dtypes)), squeeze=False)
    colors = {"bnfast": "tab:red", "eager": "tab:blue", "compile": "tab:green"}
    for row, dtype in enumerate(dtypes):
        for col, mode in enumerate(modes):
            ax = axes[row][col]
            for act, style in (("relu", "-"), ("none", ":")):
                want = {"mode": mode, "dtype": dtype, "activation": act}
                sel = [c for c in cases.values() if all(c["info"][k] == v for k, v in want.items())]
                sel.sort(key=lambda c: math.prod(c["info"]["shape"]))
                for p in PROVIDERS:
                    pts = [(math.prod(c["info"]["shape"]), c[p]["GBps"]) for c in sel if p in c and "GBps" in c[p]]
                    if pts:
                        ax.plot(*zip(*pts, strict=True), style, marker="o", ms=3, color=colors[p], label=f"{p} ({act})")
            if copy_gbps:
                ax.axhline(copy_gbps, color="gray", lw=0.8, ls="--", label="copy bandwidth")
            ax.set_xscale("log")
            ax.set_title(f"{mode}, {dtype}")
            ax.set_xlabel("elements (N*C*L)")
            ax.set_ylabel("GB/s (minimum bytes / median time)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summarize(
    json_paths, out_dir, reasons_path=None, command=None, env_path=None, sanity_path=None, parity_paths=()
) -> dict:
    if isinstance(json_paths, str | Path):
        json_paths = [json_paths]
    run = load_runs(json_paths)
    reasons = load(reasons_path) if reasons_path else {}
    env = load(env_path) if env_path else None
    sanity = load(sanity_path) if sanity_path else None
    parity = parity_results(parity_paths) if parity_paths else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases = bn_cases(run)
    copy_gbps = run.get("machine_info", {}).get("copy_GBps")
    info = run_info(run, command, env) + checks_lines(sanity, parity)
    headline = bn_table(cases, reasons, select=lambda i: i["mode"] == "fwd+bwd" and i["activation"] == "relu")
    missed = {cid: misses(c) for cid, c in cases.items() if misses(c)}
    mnist = mnist_table(run)
    mnist_md = ["## MNIST training step (wall clock per step, host included)", "", *mnist, ""] if mnist else []
    md = [
        "# bnfast benchmarks",
        "",
        *info,
        "",
        "## Headline: fwd+bwd BatchNorm + ReLU",
        "",
        *headline,
        "",
        *mnist_md,
        "## Every case",
        "",
        *bn_table(cases, reasons),
        "",
    ]
    md += [f"Targets missed: {len(missed)} of {len(cases)} cases." if cases else "No BatchNorm results in this run."]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    (out / "headline.md").write_text("\n".join([*info, "", *headline, "", *mnist_md]) + "\n")
    plotted = plot(cases, out / "gbps_vs_size.png", copy_gbps) if cases else False
    return {"cases": len(cases), "missed": missed, "plot": plotted, "out": str(out)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="*", help="pytest-benchmark JSON files (--benchmark-json), read as one run")
    parser.add_argument("--out", default=None, help="output folder (default: beside the first JSON)")
    parser.add_argument("--reasons", default=None, help="JSON {case id: reason} for the targets missed")
    parser.add_argument("--command", default=None, help="the command that produced the JSON, for the record")
    parser.add_argument("--env", default=None, help="bench/sanity.py env JSON: device, versions, commit, date")
    parser.add_argument("--sanity", default=None, help="bench/sanity.py check JSON")
    parser.add_argument("--parity", action="append", default=[], help="JUnit XML of the parity tests (repeatable)")
    args = parser.parse_args(argv)
    if not (args.out or args.json):
        parser.error("--out is needed without a JSON")
    out = args.out or Path(args.json[0]).parent
    result = summarize(args.json, out, args.reasons, args.command, args.env, args.sanity, args.parity)
    print(
        f"{result['cases']} cases, {len(result['missed'])} missing a target; wrote {result['out']}/summary.md"
        + (", gbps_vs_size.png" if result["plot"] else "")
    )


if __name__ == "__main__":
    main()
