"""The parts of the benchmark suite (bench/) that `pytest bench --benchmark-disable` (run by .ci/run: every bench
body once, tiny shapes, under the interpreter) does not reach: the minimum-bytes formula, the case matrix, the
summary script on a synthetic pytest-benchmark JSON, and `pytest bench --benchmark-only` on a machine without
CUDA, which must skip every case with "CUDA device required" and exit 0.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # bench/ is not installed with the package
    sys.path.insert(0, str(REPO))

from bench import cases, harness  # noqa: E402
from bench.summarize import summarize  # noqa: E402
from bench.traffic import min_bytes, standalone_bytes  # noqa: E402

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")


def test_min_bytes_formula():
    # (16384, 1024) float32: x is 64 MiB; fwd+bwd = 5 passes + 8 fp32 vectors of C
    assert min_bytes("fwd+bwd", (16384, 1024), 4) == 5 * 16384 * 1024 * 4 + 8 * 1024 * 4
    assert min_bytes("fwd-train", (8, 4, 5), 2) == 2 * 160 * 2 + 6 * 4 * 2
    assert min_bytes("fwd-eval", (8, 4), 2, param_size=4) == 2 * 32 * 2 + 4 * 4 * 4
    with pytest.raises(ValueError):
        min_bytes("bwd", (8, 4), 4)
    # the residual: read r in the forward, write dr in the backward; the standalone floor also reads x (and dy)
    # twice and r again in the backward
    assert min_bytes("fwd+bwd", (2, 4, 3, 5), 4, residual=True) == 7 * 120 * 4 + 8 * 4 * 4
    assert standalone_bytes("fwd+bwd", (2, 4, 3, 5), 4) == 8 * 120 * 4 + 8 * 4 * 4
    assert standalone_bytes("fwd+bwd", (2, 4, 3, 5), 4, residual=True) == 11 * 120 * 4 + 8 * 4 * 4


def test_case_matrix_matches_the_issues():
    full = cases.bn_cases("full")
    one_d, two_d = [c for c in full if len(c.shape) <= 3], [c for c in full if len(c.shape) == 4]
    assert len(one_d) == 3 * 2 * 2 * 8  # modes x activations x dtypes x shapes
    assert len(two_d) == 2 * 2 * 2 * 4  # residual x layouts x dtypes x ResNet-50 shapes, fwd+bwd BN+ReLU
    assert {c.shape for c in two_d} == {(256, 64, 112, 112), (256, 256, 56, 56), (256, 512, 28, 28), (256, 2048, 7, 7)}
    assert full[0] == harness.Case("fwd+bwd", "relu", "float32", (32, 32))  # the most wanted cases run first
    assert len({c.id for c in full}) == len(full)
    # the headline and the rest: together the whole matrix, each case once
    headline, rest = cases.bn_cases("headline"), cases.bn_cases("rest")
    assert set(headline) <= set(full) and not set(headline) & set(rest)
    assert sorted(c.id for c in headline + rest) == sorted(c.id for c in full)
    mnist = {s: cases.mnist_params(s) for s in ("headline", "rest", "full")}
    assert sorted(mnist["headline"] + mnist["rest"]) == sorted(mnist["full"])
    assert cases.sync_shapes("headline") == [] and cases.sync_shapes("rest") == cases.SYNC_SHAPES
    # the sanity check runs headline cases (its compiles are reused) and both plans' shapes among them
    assert set(cases.SANITY_CASES) <= set(headline)


def test_variant_cases():
    """The masked and ghost variant cases run in the rest / full sets (bnfast vs the torch snippet), never in the
    headline; ids are unique and carry the variant."""
    assert cases.variant_cases("headline") == []
    assert cases.variant_cases("rest") == cases.variant_cases("full") == cases.VARIANT_CASES
    assert [c.variant for c in cases.VARIANT_CASES] == ["masked", "ghost"]
    assert cases.VARIANT_PROVIDERS == ("bnfast", "snippet")
    ids = [c.id for c in cases.VARIANT_CASES + cases.VARIANT_SMOKE_CASES]
    assert len(set(ids)) == len(ids) and all(i.startswith(("masked-fwd+bwd-relu-", "ghost")) for i in ids)
    masked, ghost = cases.VARIANT_CASES
    assert masked.min_bytes() == masked.base.min_bytes() + masked.shape[0] * masked.shape[2]  # + one read of the mask
    assert ghost.min_bytes() == ghost.base.min_bytes() and ghost.id == "ghost512-fwd+bwd-relu-float32-16384x256"


def test_masked_snippet_is_bnfast_masked_batch_norm(kernel_path):
    """The benchmark's baseline (bench/variants.py MaskedBatchNorm1d, + ReLU and `y * mask`) computes what bnfast's
    FusedBatchNorm1d(activation="relu") does with mask= and pad_value=0.0, in float64 on both plans: y, dx,
    dweight, dbias over two training steps, running stats and num_batches_tracked, then eval."""
    import bnfast
    from bench import variants

    gen = torch.Generator().manual_seed(3)
    N, C, L = 4, 3, 9
    snippet = variants.MaskedSnippetReLU(variants.MaskedBatchNorm1d(C, dtype=torch.float64))
    with torch.no_grad():
        for t in (snippet.bn.weight, snippet.bn.bias, snippet.bn.running_mean):
            t.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
    fused = variants.BnfastMasked(bnfast.FusedBatchNorm1d(C, activation="relu", dtype=torch.float64))
    fused.bn.load_state_dict(snippet.bn.state_dict())
    tol = dict(rtol=1e-10, atol=1e-12)
    for _ in range(2):
        x = torch.randn(N, C, L, generator=gen, dtype=torch.float64) * 2 + 3
        lengths = torch.randint(1, L + 1, (N,), generator=gen)
        mask = torch.arange(L)[None, :] < lengths[:, None]
        x[~mask.unsqueeze(1).expand_as(x)] = 100.0  # padded values must not count
        dy = torch.randn(N, C, L, generator=gen, dtype=torch.float64)
        outs = []
        for module in (snippet, fused):
            xi = x.clone().requires_grad_()
            y = module(xi, mask)
            outs.append((y, *torch.autograd.grad(y, (xi, module.bn.weight, module.bn.bias), dy)))
        for name, got, want in zip(("y", "dx", "dweight", "dbias"), outs[1], outs[0], strict=True):
            torch.testing.assert_close(got, want, **tol, msg=lambda m, n=name: f"{n}: {m}")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused.bn, name), getattr(snippet.bn, name), **tol)
    snippet.eval(), fused.eval()
    torch.testing.assert_close(fused(x, mask), snippet(x, mask), **tol)


def test_ghost_snippet_is_bnfast_ghost_batch_norm(kernel_path):
    """The ghost benchmark's baseline (bench/variants.py GhostBatchNorm: torch's BatchNorm per chunk, + ReLU)
    computes what FusedBatchNorm1d(activation="relu", virtual_batch_size=G) does, in float64 on both plans: y, dx,
    dweight, dbias over two steps (a last chunk shorter than G), running stats, num_batches_tracked, then eval."""
    import bnfast
    from bench import variants

    gen = torch.Generator().manual_seed(4)
    N, C, G = 11, 3, 4
    snippet = variants.GhostSnippetReLU(variants.GhostBatchNorm(C, G, dtype=torch.float64))
    with torch.no_grad():
        for t in (snippet.bn.weight, snippet.bn.bias, snippet.bn.running_mean):
            t.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
    fused = bnfast.FusedBatchNorm1d(C, activation="relu", virtual_batch_size=G, dtype=torch.float64)
    fused.load_state_dict(snippet.bn.state_dict())
    tol = dict(rtol=1e-10, atol=1e-12)
    for _ in range(2):
        x = torch.randn(N, C, generator=gen, dtype=torch.float64) * 2 + 3
        dy = torch.randn(N, C, generator=gen, dtype=torch.float64)
        outs = []
        for module, bn in ((snippet, snippet.bn), (fused, fused)):
            xi = x.clone().requires_grad_()
            y = module(xi)
            outs.append((y, *torch.autograd.grad(y, (xi, bn.weight, bn.bias), dy)))
        for name, got, want in zip(("y", "dx", "dweight", "dbias"), outs[1], outs[0], strict=True):
            torch.testing.assert_close(got, want, **tol, msg=lambda m, n=name: f"{n}: {m}")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused, name), getattr(snippet.bn, name), **tol)
    snippet.eval(), fused.eval()
    torch.testing.assert_close(fused(x), snippet(x), **tol)


def test_sanity_check_runs_and_catches_a_wrong_result(monkeypatch):
    """bench/sanity.py's check on tiny CPU cases (the kernels under the interpreter): passes on bnfast as it is, and
    reports a case whose result is off (here: the reference's tolerance made impossible) without stopping."""
    from bench import sanity

    tiny = [
        cases.Case("fwd+bwd", "relu", "float32", (8, 4)),
        cases.Case("fwd+bwd", "relu", "bfloat16", (2, 4, 3, 5), "channels_last", residual=True),
    ]
    result = sanity.check("cpu", tiny)
    assert result["ok"] and [c["id"] for c in result["cases"]] == [c.id for c in tiny], result
    assert all("max_err_replayed" in c for c in result["cases"])  # the fourth call checked too
    monkeypatch.setitem(harness.CHECK_TOL, torch.float32, -1.0)
    result = sanity.check("cpu", tiny)
    assert not result["ok"] and "wrong result" in result["cases"][0]["error"] and "error" not in result["cases"][1]
    assert sanity.environment()["commit"]


def _fake_run(tmp_path):
    """A pytest-benchmark JSON as bench/ writes it: two BN cases x 3 providers and one MNIST group."""
    benchmarks = []
    times = {  # (case) -> provider -> median seconds
        ("fwd+bwd", "relu", "float32", (16384, 1024)): {"bnfast": 100e-6, "eager": 300e-6, "compile": 150e-6},
        ("fwd-eval", "none", "bfloat16", (32, 32)): {"bnfast": 9e-6, "eager": 8e-6, "compile": 20e-6},
    }
    for (mode, act, dtype, shape), providers in times.items():
        case = harness.Case(mode, act, dtype, shape)
        for provider, t in providers.items():
            info = dict(
                mode=mode,
                activation=act,
                dtype=dtype,
                shape=list(shape),
                provider=provider,
                min_bytes=case.min_bytes(),
                GBps=case.min_bytes() / t / 1e9,
                frac_of_copy_bw=case.min_bytes() / t / 3e12,
            )
            benchmarks.append({"group": case.id, "stats": {"median": t}, "extra_info": info})
    models = (
        ("torch-BN", 300e-6, 40),
        ("bnfast", 250e-6, 30),
        ("torch-BN+graph", 120e-6, 40),
        ("bnfast+graph", 90e-6, 30),
    )
    for model, t, ops in models:
        info = dict(batch=32, hidden=32, model=model, gpu_ops_per_step=ops, host_launches_per_step=ops)
        benchmarks.append({"group": "mnist step batch=32 hidden=32", "stats": {"median": t}, "extra_info": info})
    machine = {"cuda_device": "Fake GPU", "copy_GBps": 3000.0, "torch": torch.__version__, "triton": "x"}
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"machine_info": machine, "benchmarks": benchmarks, "datetime": "2026-01-01"}))
    return path


def test_summarize_writes_tables_flags_and_plot(tmp_path):
    reasons = tmp_path / "reasons.json"
    reasons.write_text(json.dumps({"fwd+bwd-relu-float32-16384x1024": "split path reads x twice"}))
    result = summarize(_fake_run(tmp_path), tmp_path / "out", reasons, command="pytest bench --benchmark-only")
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert result["cases"] == 2
    # 3x eager met, 1.5x compile met, but 100 us for 335 MB is 3.35 TB/s > copy: all fwd+bwd targets met
    assert "| fwd+bwd | relu | float32 | 16384x1024 | 100.0 | 300.0 | 150.0 |" in summary
    assert "3.00x | 1.50x |  | met |" in summary
    assert "slower than eager (0.89x)" in summary  # the bf16 eval case: 9 us vs 8 us
    assert "Fake GPU" in summary and "pytest bench --benchmark-only" in summary
    assert "| 32 | 32 |" in summary and "1.20x | 1.33x |" in summary  # MNIST: speedups vs torch-BN
    headline = (tmp_path / "out" / "headline.md").read_text()
    assert "| fwd+bwd | relu | float32 | 16384x1024 |" in headline and "bfloat16" not in headline
    assert (tmp_path / "out" / "gbps_vs_size.png").stat().st_size > 1000


def _pytest_bench(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BNFAST_TEST_DEVICE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", "bench", "-q", "-rs", "-p", "no:cacheprovider", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@needs_no_cuda
def test_benchmark_only_skips_without_cuda():
    """Every GPU benchmark skips; the host-overhead ones (CPU by design) are deselected here."""
    proc = _pytest_bench("--benchmark-only", "-m", "not host_overhead")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CUDA device required" in proc.stdout
    assert " passed" not in proc.stdout and " failed" not in proc.stdout


def _bench_json(path, benchmarks, machine=None):
    path.write_text(json.dumps({"machine_info": machine or {}, "benchmarks": benchmarks, "datetime": "2026-01-01"}))
    return path


def _bn_result(case, provider, seconds, **extra):
    info = dict(
        mode=case.mode,
        activation=case.activation,
        dtype=case.dtype,
        shape=list(case.shape),
        layout=case.layout,
        residual=case.residual,
        provider=provider,
        **extra,
    )
    return {"group": case.id, "stats": {"median": seconds}, "extra_info": info}


def test_summarize_issue18_targets_env_and_checks(tmp_path):
    """Several stage JSONs read as one run; issue 18's size bands; env.json's commit; sanity and parity outcome."""
    big = cases.Case("fwd+bwd", "relu", "bfloat16", (65536, 512))  # 64 MiB: >= 1.55x eager, 1.1x compile, 85% floor
    mid = cases.Case("fwd+bwd", "relu", "float32", (4096, 256))  # 4 MiB: >= 2.0x eager, 1.3x compile
    tiny = cases.Case("fwd+bwd", "relu", "float32", (32, 32))  # launch-bound: host time <= eager's
    first = _bench_json(
        tmp_path / "bench-bn.json",
        [
            _bn_result(big, "bnfast", 100e-6, standalone_frac_of_copy_bw=0.8),
            _bn_result(big, "eager", 140e-6),
            _bn_result(big, "compile", 120e-6),
            _bn_result(mid, "bnfast", 10e-6),
            _bn_result(mid, "eager", 18e-6),
            _bn_result(mid, "compile", 14e-6),
            _bn_result(tiny, "bnfast", 5e-6, host_us=20.0),
            _bn_result(tiny, "eager", 9e-6, host_us=15.0),
        ],
        machine={"cuda_device": "Fake GPU", "copy_GBps": 4000.0},
    )
    mnist = [
        {
            "group": "mnist step batch=32 hidden=32",
            "stats": {"median": t},
            "extra_info": dict(batch=32, hidden=32, model=m),
        }
        for m, t in (("no-BN+graph", 100e-6), ("bnfast+graph", 104e-6))
    ]
    second = _bench_json(tmp_path / "bench-mnist.json", mnist)
    env = tmp_path / "env.json"
    env.write_text(
        json.dumps(
            {
                "commit": "abc1234",
                "device": "Fake GPU",
                "python": "3.12",
                "torch": "2.11",
                "cuda": "13.0",
                "triton": "3.6.0",
                "numpy": "2.5",
                "date": "2026-12-02",
            }
        )
    )
    sanity = tmp_path / "sanity.json"
    sanity.write_text(json.dumps({"ok": True, "cases": [{"id": tiny.id, "max_err": 1e-7}]}))
    parity = tmp_path / "parity.xml"
    parity.write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="0">'
        '<testcase classname="tests.test_x" name="test_a"/>'
        '<testcase classname="tests.test_x" name="test_b">'
        '<failure message="boom"/></testcase><testcase classname="tests.test_x" name="test_c"/>'
        "</testsuite></testsuites>"
    )
    result = summarize(
        [first, second],
        tmp_path / "out",
        command="bash bench/run_gpu.sh",
        env_path=env,
        sanity_path=sanity,
        parity_paths=[parity],
    )
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert result["missed"][big.id] == ["< 1.55x eager", "< 85% of copy BW (standalone floor)"]  # 1.4x; 1.2x met
    assert result["missed"][mid.id] == ["< 2.0x eager"]  # 1.8x; 1.4x compile met
    assert result["missed"][tiny.id] == ["host 20.0 us > eager's 15.0 us"]
    assert "commit: abc1234" in summary and "numpy 2.5" in summary and "triton 3.6.0" in summary
    assert "sanity (bnfast fwd+bwd vs float64 on CUDA): ok" in summary
    assert "2 passed, 1 failed" in summary and "FAILED tests.test_x::test_b" in summary
    headline = (tmp_path / "out" / "headline.md").read_text()
    assert "bfloat16 | 65536x512" in headline and "| 1.04 |" in headline  # bnfast+graph / no-BN+graph


RUN_CASE_FILE = '''
import pytest
from bench import harness

pytestmark = harness.timed_by("synced")


def test_synced(benchmark):
    calls = []
    median = harness.run_case(benchmark, lambda x: calls.append(x) or x, [(1,), (2,)], group="g", provider="p",
                              timing="synced", check=lambda first: {"first": first}, baselines=("p",))
    assert calls[0] == 1 and benchmark.extra_info["first"] == 1
    assert median > 0 and benchmark.extra_info["median_us"] > 0 and benchmark.extra_info["speedup_vs_p"] == 1.0
    assert benchmark.extra_info["calls_per_round"] >= 5


class FixedTimer(harness.DeviceTimer):
    """DeviceTimer without CUDA: every call "takes" 1 ms of device time, whatever the host spends."""

    def __init__(self, step, inputs):
        self.step, self.inputs, self.i = step, inputs, 0

    def timed_call(self):
        self.step(*self._next())
        return 1e-3

    def calibrate(self):
        return 2e-6, 1e-3


@pytest.mark.benchmark(timer=harness.CLOCKS["device"])
def test_device(benchmark, monkeypatch):
    monkeypatch.setattr(harness, "DeviceTimer", FixedTimer)
    median = harness.run_case(benchmark, lambda x: x, [(1,)], group="g3", provider="p", timing="device")
    assert median == pytest.approx(1e-3, rel=1e-9)  # the rounds are the timer's intervals, not host time
    assert benchmark.extra_info["host_us"] == 2.0 and benchmark.stats.stats.rounds == harness.rounds_for(1e-3 + 54e-6)


@pytest.mark.benchmark(timer=harness.CLOCKS["host"])
def test_wrong_clock(benchmark):
    with pytest.raises(RuntimeError, match="timed_by"):
        harness.run_case(benchmark, lambda: None, [()], group="g2", provider="p", timing="synced")
'''


def test_run_case_times_on_the_marked_clock(tmp_path):
    """run_case on pytest-benchmark's public `timer` option (no CUDA needed for the synced clock; the device clock fed
    by a fixed-interval timer): the rounds are recorded with the marked clock, another clock is refused."""
    (tmp_path / "test_run_case.py").write_text(RUN_CASE_FILE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(tmp_path / "test_run_case.py"),
        "-q",
        "-p",
        "no:cacheprovider",
        "--benchmark-only",
        f"--benchmark-json={tmp_path / 'out.json'}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    timers = {b["name"]: b["options"]["timer"] for b in json.loads((tmp_path / "out.json").read_text())["benchmarks"]}
    assert timers["test_synced"].endswith("synced_clock") and timers["test_device"].endswith("device_clock"), timers
