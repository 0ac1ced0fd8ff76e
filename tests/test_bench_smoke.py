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

from bench import harness  # noqa: E402
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
    cases = harness.cases(smoke=False)
    one_d, two_d = [c for c in cases if len(c.shape) <= 3], [c for c in cases if len(c.shape) == 4]
    assert len(one_d) == 3 * 2 * 2 * 8  # modes x activations x dtypes x shapes
    assert len(two_d) == 2 * 2 * 2 * 4  # residual x layouts x dtypes x ResNet-50 shapes, fwd+bwd BN+ReLU
    assert {c.shape for c in two_d} == {(256, 64, 112, 112), (256, 256, 56, 56), (256, 512, 28, 28), (256, 2048, 7, 7)}
    assert cases[0] == harness.Case("fwd+bwd", "relu", "float32", (32, 32))  # headline cases run first
    assert len({c.id for c in cases}) == len(cases)


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
            info = dict(mode=mode, activation=act, dtype=dtype, shape=list(shape), provider=provider,
                        min_bytes=case.min_bytes(), GBps=case.min_bytes() / t / 1e9,
                        frac_of_copy_bw=case.min_bytes() / t / 3e12)  # fmt: skip
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
    assert "3.00x | 1.50x | met |" in summary
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
