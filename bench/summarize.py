"""Summary of a benchmark run, from pytest-benchmark's JSON alone: markdown tables and a GB/s-vs-size plot.

    PYTHONPATH=. python -m bench.summarize RUN.json [--out DIR] [--reasons REASONS.json] [--command "..."]

Writes DIR/summary.md (run info; the BatchNorm table with every case, its three providers, GB/s, fraction of
the measured copy bandwidth, speedups and the targets each case misses; the MNIST step table), DIR/headline.md
(the float32 BN+ReLU rows, for the README) and DIR/gbps_vs_size.png. Every figure is read from the JSON: the
medians pytest-benchmark recorded and the extra_info the benchmarks attached (bench/test_batch_norm.py).

Targets (issue 4): fwd+bwd BN+ReLU in float32 on 16M+ elements at >= 2x torch eager, >= 1.2x torch.compile and
>= 80% of the copy bandwidth by the minimum-bytes count; no case slower than torch eager. A case that misses
one is flagged in the `targets` column; REASONS.json ({case id: "reason found"}) puts the reason beside it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

PROVIDERS = ("bnfast", "eager", "compile")
MNIST_MODELS = ("no-BN", "torch-BN", "bnfast", "torch-BN+graph", "bnfast+graph")
BIG_NUMEL = 16 * 2**20  # "shapes of 16M elements and more"
TARGETS = {"vs_eager": 2.0, "vs_compile": 1.2, "frac_of_copy_bw": 0.8}


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)


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


def misses(case: dict) -> list[str]:
    """The issue's targets this case misses (measured figures, never asserted in tests)."""
    out = []
    ours, eager, compiled = (case.get(p) for p in PROVIDERS)
    if ours is None:
        return out
    if eager and ours["median"] > eager["median"]:
        out.append(f"slower than eager ({eager['median'] / ours['median']:.2f}x)")
    info = case["info"]
    big = math.prod(info["shape"]) >= BIG_NUMEL
    if info["mode"] == "fwd+bwd" and info["activation"] == "relu" and info["dtype"] == "float32" and big:
        if eager and eager["median"] / ours["median"] < TARGETS["vs_eager"]:
            out.append(f"< {TARGETS['vs_eager']}x eager")
        if compiled and compiled["median"] / ours["median"] < TARGETS["vs_compile"]:
            out.append(f"< {TARGETS['vs_compile']}x compile")
        if ours.get("frac_of_copy_bw", 1.0) < TARGETS["frac_of_copy_bw"]:
            out.append(f"< {TARGETS['frac_of_copy_bw']:.0%} of copy BW")
    return out


def _us(p):
    return "" if p is None else f"{p['median'] * 1e6:.1f}"


def _ratio(case, other):
    ours, theirs = case.get("bnfast"), case.get(other)
    return "" if not (ours and theirs) else f"{theirs['median'] / ours['median']:.2f}x"


def _shape(info):
    """e.g. 256x64x112x112 cl+add: channels_last, with the fused residual add."""
    extra = (" cl" if info.get("layout") == "channels_last" else "") + ("+add" if info.get("residual") else "")
    return "x".join(map(str, info["shape"])) + extra


def bn_table(cases: dict, reasons: dict, select=None) -> list[str]:
    head = ["mode", "act", "dtype", "shape", "bnfast us", "eager us", "compile us", "bnfast GB/s", "of copy BW",
            "vs eager", "vs compile", "targets"]  # fmt: skip
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
        cells = [info["mode"], info["activation"], info["dtype"], _shape(info), _us(case.get("bnfast")),
                 _us(case.get("eager")), _us(case.get("compile")), f"{ours['GBps']:.1f}" if "GBps" in ours else "",
                 f"{ours['frac_of_copy_bw']:.0%}" if "frac_of_copy_bw" in ours else "", _ratio(case, "eager"),
                 _ratio(case, "compile"), flag]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def mnist_table(run: dict) -> list[str]:
    groups = {}
    for b in run["benchmarks"]:
        info = b.get("extra_info", {})
        if "model" in info and "hidden" in info:
            groups.setdefault((info["batch"], info["hidden"]), {})[info["model"]] = {"median": b["stats"]["median"],
                                                                                     **info}  # fmt: skip
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
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (batch, hidden), g in sorted(groups.items()):
        t = {m: g[m]["median"] for m in MNIST_MODELS if m in g}
        ops = ", ".join(str(g.get(m, {}).get("gpu_ops_per_step", "")) for m in ("no-BN", "torch-BN", "bnfast"))
        launches = ", ".join(str(g.get(m, {}).get("host_launches_per_step", ""))
                             for m in ("torch-BN", "bnfast", "bnfast+graph"))  # fmt: skip
        pairs = (("bnfast", "torch-BN"), ("bnfast+graph", "torch-BN+graph"))
        vs = [f"{t[base] / t[m]:.2f}x" if base in t and m in t else "" for m, base in pairs]
        cells = [str(batch), str(hidden)] + [f"{t[m] * 1e6:.1f}" if m in t else "" for m in MNIST_MODELS]
        lines.append("| " + " | ".join(cells + [ops, launches, *vs]) + " |")
    return lines


def run_info(run: dict, command: str | None) -> list[str]:
    m = run.get("machine_info", {})
    lines = [
        f"- device: {m.get('cuda_device', 'no CUDA device')} ({m.get('sm_count', '?')} SMs, "
        f"L2 {m.get('l2_bytes', 0) / 2**20:.0f} MiB), measured copy bandwidth {m.get('copy_GBps', '?')} GB/s "
        "(device-to-device, read + write)",
        f"- torch {m.get('torch', '?')} (CUDA {m.get('cuda_version', '?')}), triton {m.get('triton', '?')}, "
        f"python {m.get('python_version', '?')}",
        f"- date: {run.get('datetime', '?')}; commit: {run.get('commit_info', {}).get('id', '?')}"
        + (" (dirty)" if run.get("commit_info", {}).get("dirty") else ""),
    ]
    if command:
        lines.append(f"- command: `{command}`")
    lines.append("- times: median device time per call (CUDA events; bench/harness.py); GB/s counts the minimum "
                 "bytes of bench/traffic.py")  # fmt: skip
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


def summarize(json_path, out_dir, reasons_path=None, command=None) -> dict:
    run = load(json_path)
    reasons = load(reasons_path) if reasons_path else {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases = bn_cases(run)
    copy_gbps = run.get("machine_info", {}).get("copy_GBps")
    headline = bn_table(cases, reasons, select=lambda i: i["dtype"] == "float32" and i["activation"] == "relu")
    missed = {cid: misses(c) for cid, c in cases.items() if misses(c)}
    md = ["# bnfast benchmarks", "", *run_info(run, command), "", "## Headline: BatchNorm1d + ReLU, float32", "",
          *headline, "", "## Every case", "", *bn_table(cases, reasons), ""]  # fmt: skip
    mnist = mnist_table(run)
    if mnist:
        md += ["## MNIST training step (wall clock per step, host included)", "", *mnist, ""]
    md += [f"Targets missed: {len(missed)} of {len(cases)} cases." if cases else "No BatchNorm results in this run."]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    (out / "headline.md").write_text("\n".join(run_info(run, command) + [""] + headline) + "\n")
    plotted = plot(cases, out / "gbps_vs_size.png", copy_gbps) if cases else False
    return {"cases": len(cases), "missed": missed, "plot": plotted, "out": str(out)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", default=None, help="output folder (default: beside the JSON)")
    parser.add_argument("--reasons", default=None, help="JSON {case id: reason} for the targets missed")
    parser.add_argument("--command", default=None, help="the command that produced the JSON, for the record")
    args = parser.parse_args(argv)
    result = summarize(args.json, args.out or Path(args.json).parent, args.reasons, args.command)
    print(f"{result['cases']} cases, {len(result['missed'])} missing a target; wrote {result['out']}/summary.md"
          + (", gbps_vs_size.png" if result["plot"] else ""))  # fmt: skip


if __name__ == "__main__":
    main()
