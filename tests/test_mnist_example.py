"""examples/mnist_compare.py end to end: the CI smoke run of issue 3, on the real MNIST files, on CPU.

The script runs as a subprocess with TRITON_INTERPRET=1, so the bnfast model trains on bnfast's Triton kernels
in the interpreter: 1 epoch on the first 2000 training and 1000 test images (62 steps of batch 32). One run,
shared by the tests below, took 30 to 45 s on a 2-core CPU. The data comes from $BNFAST_MNIST_RAW or the repo's
../shared/data/MNIST/raw, copied into the run's own data dir; without either the run is skipped.

Tolerances, torch-BN vs bnfast after 62 Adam steps:
- weights and running stats: 1e-4. The two BN implementations round differently (float32, ~1e-7 relative per
  op); Adam's steps are bounded by lr and depend smoothly on well-scaled gradients, so the weights drift apart
  slowly: 3e-6 to 6e-6 measured (1e-5 after 100 steps). The Linear biases that feed a BN are left out: their
  gradient is zero in exact arithmetic, so Adam turns rounding noise into lr-sized steps (0.06 to 0.14 measured)
  that the BN cancels.
- logits in training mode: 1e-4 (4e-6 measured): the same function, redundant biases included.
- test accuracy: within 0.02 (20 of 1000 images). Eval mode uses running means that lag those biases, so a few
  borderline images may flip (up to 3 seen).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "examples" / "mnist_compare.py"
SHARED_RAW_DIR = REPO_ROOT.parent / "shared" / "data" / "MNIST" / "raw"
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
               "t10k-labels-idx1-ubyte.gz")  # fmt: skip
MODELS = ("no-BN", "torch-BN", "bnfast")
PLOTS = ("train_loss.png", "train_acc.png", "valid_loss.png", "valid_acc.png")
WEIGHT_ATOL = 1e-4
TRAIN_LOGITS_ATOL = 1e-4
ACCURACY_GAP = 0.02
MIN_ACCURACY = 0.6  # chance is 0.1; one short epoch reaches about 0.8
OPTIONS = ("--epochs", "--batch-size", "--lr", "--hidden", "--activation", "--seed", "--device", "--data-dir",
           "--download", "--limit-train", "--limit-test", "--models", "--no-plots", "--out",
           "--recalibrate")  # fmt: skip


def local_mnist_dir() -> Path | None:
    """Where the script will find the .gz files: $BNFAST_MNIST_RAW if set, else the shared folder."""
    folder = Path(os.environ.get("BNFAST_MNIST_RAW") or SHARED_RAW_DIR)
    return folder if all((folder / name).is_file() for name in MNIST_FILES) else None


def run_example(cwd: Path, *args, **env) -> subprocess.CompletedProcess:
    """The script in a fresh interpreter, bnfast importable from this checkout, kernels interpreted."""
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, "PYTHONPATH": python_path, "TRITON_INTERPRET": "1", **env}
    command = [sys.executable, str(SCRIPT), *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """(results.json as a dict, output folder, stdout) of the short run."""
    if local_mnist_dir() is None:
        pytest.skip(f"no MNIST .gz files: set BNFAST_MNIST_RAW to a folder holding {', '.join(MNIST_FILES)} "
                    f"(default {SHARED_RAW_DIR})")  # fmt: skip
    tmp = tmp_path_factory.mktemp("mnist")
    out = tmp / "out"
    result = run_example(tmp, "--data-dir", tmp / "data", "--out", out, "--epochs", 1, "--limit-train", 2000,
                         "--limit-test", 1000, "--no-download", "--recalibrate")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads((out / "results.json").read_text()), out, result.stdout


def test_all_models_train(smoke_run):
    results, _, _ = smoke_run
    for name in MODELS:
        before, after = results["models"][name][0], results["models"][name][-1]  # epoch 0 = before training
        assert after["train_loss"] < 0.5 * before["train_loss"], name
        assert after["train_acc"] > MIN_ACCURACY and after["valid_acc"] > MIN_ACCURACY, name
        assert after["train_time_s"] > 0 and after["steps_per_s"] > 0, name


def test_bnfast_matches_torch_bn(smoke_run):
    results, _, _ = smoke_run
    assert results["bnfast_backend"] == "interpreter"  # the Triton kernels ran, not the torch fallback
    match = results["torch_bn_vs_bnfast"]
    assert match["max_abs_diff"] < WEIGHT_ATOL, match
    assert match["train_mode_logits_max_abs_diff"] < TRAIN_LOGITS_ATOL, match
    torch_bn, fused = (results["models"][name][-1]["valid_acc"] for name in ("torch-BN", "bnfast"))
    assert abs(torch_bn - fused) <= ACCURACY_GAP


def test_recalibrate_reports_accuracy_before_and_after(smoke_run):
    results, _, stdout = smoke_run
    assert set(results["recalibrate"]) == {"torch-BN", "bnfast"}  # the models with BatchNorm
    for name, row in results["recalibrate"].items():
        assert row["valid_acc_before"] == results["models"][name][-1]["valid_acc"]
        assert row["valid_acc_after"] > MIN_ACCURACY, (name, row)
    assert "recalibrated bnfast: test acc" in stdout


def test_outputs_written(smoke_run):
    results, out, stdout = smoke_run
    assert set(results) >= {"config", "versions", "device", "models", "summary"}
    assert [row["model"] for row in results["summary"]] == list(MODELS)
    for name in PLOTS:
        assert (out / name).stat().st_size > 0, name
    assert "[Epoch 1-VALID] no-BN loss" in stdout and "final test acc" in stdout


def test_missing_data_exits_with_a_clear_message(tmp_path):
    empty = tmp_path / "no-mnist-here"
    empty.mkdir()
    result = run_example(tmp_path, "--data-dir", tmp_path / "data", "--no-download", BNFAST_MNIST_RAW=str(empty))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "train-images-idx3-ubyte.gz" in result.stderr and str(tmp_path / "data" / "MNIST" / "raw") in result.stderr


def test_help_documents_every_option(tmp_path):
    result = run_example(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    for option in OPTIONS:
        assert option in result.stdout, option
