"""The GPU run's headline mode, held on CPU: `bash bench/run_gpu.sh --collect-only` runs every stage's own pytest
command with `--collect-only` (the same selection the GPU run uses: bench/cases.py's "headline" set and
bench/headline_tests.txt), and these tests hold what it collects to what issue 17 asks for:
- benchmarks: fwd+bwd BN+ReLU, bnfast vs eager vs torch.compile, on float32 (32, 32), float32 (4096, 256), float32
  and bf16 (65536, 512), float32 and bf16 (256, 256, 56, 56) NCHW and channels_last, one BN+add+ReLU ResNet case;
  then the MNIST step, every model, eager and CUDA-graphed;
- the parity smoke: ~20 tests of tests/ that exist, covering both plans, train and eval, bf16, channels_last, the
  residual and the compiled path.
And the script itself: it parses, and without CUDA it stops with a clear message and a nonzero code.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "run_gpu.sh"

# the issue's cases, written out here (not read from bench/cases.py: this is what cases.py is held to)
HEADLINE_CASE_IDS = [
    "fwd+bwd-relu-float32-32x32",
    "fwd+bwd-relu-float32-4096x256",
    "fwd+bwd-relu-float32-65536x512",
    "fwd+bwd-relu-bfloat16-65536x512",
    "fwd+bwd-relu-float32-256x256x56x56",
    "fwd+bwd-relu-bfloat16-256x256x56x56",
    "fwd+bwd-relu-float32-256x256x56x56-channels_last",
    "fwd+bwd-relu-bfloat16-256x256x56x56-channels_last",
    "fwd+bwd-relu-float32-256x256x56x56-add",
]
PROVIDERS = ("bnfast", "eager", "compile")
MNIST_MODELS = {"no-BN", "torch-BN", "bnfast", "no-BN+graph", "torch-BN+graph", "bnfast+graph"}


def _run(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BNFAST_TEST_DEVICE")}
    env["PYTHON"] = sys.executable
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _stages(stdout: str) -> dict[str, list[str]]:
    """{stage name: collected node ids} from `run_gpu.sh --collect-only`; each stage must have collected cleanly."""
    stages, name = {}, None
    for line in stdout.splitlines():
        if m := re.fullmatch(r"== (\S+): collect exit (\d+)", line):
            assert m.group(2) == "0", f"stage {m.group(1)} failed to collect:\n{stdout[-3000:]}"
            name = None
        elif m := re.fullmatch(r"== (\S+)", line):
            name = m.group(1)
            stages[name] = []
        elif name and "::" in line:
            stages[name].append(line.strip())
    return stages


@pytest.fixture(scope="module")
def headline():
    proc = _run("--collect-only")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return _stages(proc.stdout), proc.stdout


def test_run_gpu_sh_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_run_gpu_sh_without_cuda_stops_clearly():
    proc = _run(timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device visible to torch" in proc.stderr
    assert not proc.stdout.strip()  # nothing ran


def test_headline_stages_in_order(headline):
    stages, stdout = headline
    assert list(stages) == ["bn", "mnist", "parity"]
    # the sanity check comes first, in its own process (not pytest)
    assert stdout.splitlines()[0].startswith("== sanity: not a pytest stage:")
    assert "-m bench.sanity check" in stdout.splitlines()[0]


def test_headline_benchmarks_are_the_issue_cases(headline):
    stages, _ = headline
    expected = [
        f"bench/test_batch_norm.py::test_batch_norm[{case}-{p}]" for case in HEADLINE_CASE_IDS for p in PROVIDERS
    ]
    assert stages["bn"] == expected  # exactly these, in this order (a case's providers side by side)


def test_headline_mnist_is_every_model(headline):
    stages, _ = headline
    found = {}
    for node in stages["mnist"]:
        m = re.fullmatch(r"bench/test_mnist_step\.py::test_mnist_step\[batch(\d+)-hidden(\d+)-(.+)\]", node)
        assert m, node
        found.setdefault((int(m.group(1)), int(m.group(2))), set()).add(m.group(3))
    assert (32, 32) in found  # the reference layer
    assert all(models == MNIST_MODELS for models in found.values()), found


def test_parity_smoke_exists_and_covers(headline):
    stages, _ = headline
    listed = [
        line.strip()
        for line in (REPO / "bench" / "headline_tests.txt").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    ids = stages["parity"]
    assert ids == listed  # every listed test exists (collected), nothing else runs
    assert 15 <= len(ids) <= 25
    text = "\n".join(ids)
    for need, pattern in {
        "single-pass plan": r"\[single",
        "split plan": r"\[split",
        "train": r"train",
        "eval": r"eval",
        "bfloat16": r"bfloat16",
        "channels_last": r"channels_last",
        "residual": r"test_residual\.py",
        "compiled path": r"test_compile\.py::test_compiled",
    }.items():
        assert re.search(pattern, text), f"the parity smoke covers no {need} test"


def test_select_routes_benchmarks_and_tests(tmp_path):
    """--select @file: bench/ node ids are timed, tests/ ones run on CUDA; --select EXPR: a -k over the matrix."""
    ids = tmp_path / "ids.txt"
    bench_id = "bench/test_batch_norm.py::test_batch_norm[fwd-eval-none-bfloat16-262144x64-compile]"
    test_id = "tests/test_batch_norm.py::test_split_path_is_deterministic"
    ids.write_text(f"# a comment\n{bench_id}\n\n{test_id}\n")
    proc = _run("--select", f"@{ids}", "--collect-only")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = _stages(proc.stdout)
    assert stages == {"bn": [bench_id], "parity": [test_id]}
    proc = _run("--select", "fwd+bwd and 16384x1024 and bfloat16 and relu", "--collect-only")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _stages(proc.stdout) == {
        "bn": [f"bench/test_batch_norm.py::test_batch_norm[fwd+bwd-relu-bfloat16-16384x1024-{p}]" for p in PROVIDERS]
    }


FAKE_CUDA_PYTHON = """#!/usr/bin/env bash
# a CUDA machine's python at the environment check only: every stage after it runs for real (and finds no GPU)
if [ "$1 $2 $3" = "-m bench.sanity env" ]; then
    exec {python} -c "import json, sys; from bench.sanity import environment; e = environment(); \\
e['device'] = 'Fake GPU'; json.dump(e, open(sys.argv[1], 'w'))" "$5"
fi
exec {python} "$@"
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="stands in for a GPU machine")
def test_run_gpu_sh_stages_budget_and_summary(tmp_path):
    """The script's own flow, the device check stubbed: the stages run in order under a 40 s budget (10 s of it
    kept for the summary, so a stage is cut or skipped on any machine: five stages are five fresh Pythons that import
    torch), the commit passed in and the versions land in run.log and the summary, written after the cut stage."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_CUDA_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BNFAST_TEST_DEVICE")}
    env.update(PYTHON=str(fake), OUT=str(out), BNFAST_COMMIT="abc1234", BNFAST_GPU_BUDGET_S="40", OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "run.log").read_text()
    assert "commit abc1234" in log and "device Fake GPU" in log and "numpy" in log
    assert "command: BNFAST_COMMIT=abc1234 BNFAST_GPU_BUDGET_S=40 bash bench/run_gpu.sh" in log
    stages = re.findall(r"^== (\w+)", log, flags=re.M)
    # the C++ node's build first, then sanity, in order
    assert stages[:2] == ["native", "native"] and stages[-1] == "total", log[-3000:]
    order = [s for s in dict.fromkeys(stages) if s != "total"]
    assert order == ["native", "sanity", "bn", "mnist", "parity"][: len(order)], order
    total = int(re.search(r"== total (\d+)s", log).group(1))
    assert total <= 40 + 10 + 15, log[-3000:]  # budget + SIGKILL grace + the last summary
    assert "CUT" in log or "skipped, no time left" in log
    summary = (out / "summary.md").read_text()
    assert "commit: abc1234" in summary and "Fake GPU" in summary
    assert "sanity (bnfast fwd+bwd vs float64 on CUDA): FAILED" in summary  # no GPU behind the stub
    assert (out / "headline.md").exists()
