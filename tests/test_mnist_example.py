"""examples/mnist_compare.py end to end: the CI smoke run of issue 3, on the real MNIST files, on CPU.

The script runs as a subprocess with TRITON_INTERPRET=1, so the bnfast model trains on bnfast's Triton kernels
in the interpreter: 1 epoch on the first 2000 training and 1000 test images (62 steps of batch 32). One run,
shared by the tests below, took 30 to 45 s on a 2-core CPU. The data comes from $BNFAST_MNIST_RAW or the repo's
../shared/data/MNIST/raw, copied into the run's own data dir; without either the run is skipped.

Tolerances, torch-BN vs bnfast after 62 Adam steps:
- weights and running stats: 1e-4. The two BN implementations round differently (float32, ~1e-7 relative per
  op); Adam's steps are bounded by lr and depend smoothly on well-scaled gradients, so the weights drift apart
  slowly: 3e-6 to 1.5e-5 measured (1.5e-5 on 2026-12-02, torch 2.14.1, triton 3.8). The Linear biases that feed a
  BN are left out: their gradient is zero in exact arithmetic, so Adam turns rounding noise into lr-sized steps
  (0.06 to 0.14 measured) that the BN cancels.
- logits in training mode: 1e-4 (2.9e-6 to 4e-6 measured): the same function, redundant biases included.
- test accuracy: within 0.02 (20 of 1000 images). Eval mode uses running means that lag those biases, so a few
  borderline images may flip (up to 3 seen).
"""

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "examples" / "mnist_compare.py"
SHARED_RAW_DIR = REPO_ROOT.parent / "shared" / "data" / "MNIST" / "raw"
MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
MODELS = ("no-BN", "torch-BN", "bnfast")
PLOTS = ("train_loss.png", "train_acc.png", "valid_loss.png", "valid_acc.png")
WEIGHT_ATOL = 1e-4
TRAIN_LOGITS_ATOL = 1e-4
ACCURACY_GAP = 0.02
MIN_ACCURACY = 0.6  # chance is 0.1; one short epoch reaches about 0.8
OPTIONS = (
    "--epochs",
    "--batch-size",
    "--lr",
    "--hidden",
    "--activation",
    "--seed",
    "--device",
    "--data-dir",
    "--download",
    "--limit-train",
    "--limit-test",
    "--models",
    "--no-plots",
    "--out",
    "--recalibrate",
    "--cuda-graphs",
)


def local_mnist_dir() -> Path | None:
    """Where the script will find the .gz files: $BNFAST_MNIST_RAW if set, else the shared folder."""
    folder = Path(os.environ.get("BNFAST_MNIST_RAW") or SHARED_RAW_DIR)
    return folder if all((folder / name).is_file() for name in MNIST_FILES) else None


@pytest.fixture(scope="module")
def example():
    """examples/mnist_compare.py as a module, for its functions."""
    spec = importlib.util.spec_from_file_location("mnist_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
        pytest.skip(
            f"no MNIST .gz files: set BNFAST_MNIST_RAW to a folder holding {', '.join(MNIST_FILES)} "
            f"(default {SHARED_RAW_DIR})"
        )
    tmp = tmp_path_factory.mktemp("mnist")
    out = tmp / "out"
    result = run_example(
        tmp,
        "--data-dir",
        tmp / "data",
        "--out",
        out,
        "--epochs",
        1,
        "--limit-train",
        2000,
        "--limit-test",
        1000,
        "--no-download",
        "--recalibrate",
    )
    assert result.returncode == 0, result.stderr
    return json.loads((out / "results.json").read_text()), out, result.stdout


@pytest.fixture(scope="module")
def cnn_smoke_run(tmp_path_factory):
    """The CNN in channels_last, 2 steps on 64 images (BatchNorm2d on (32, 16, 26, 26) under the interpreter
    costs seconds per step: about a minute in all on 2 cores)."""
    if local_mnist_dir() is None:
        pytest.skip("no MNIST .gz files (see smoke_run)")
    tmp = tmp_path_factory.mktemp("mnist_cnn")
    out = tmp / "out"
    result = run_example(
        tmp,
        "--data-dir",
        tmp / "data",
        "--out",
        out,
        "--arch",
        "cnn",
        "--channels-last",
        "--epochs",
        1,
        "--limit-train",
        64,
        "--limit-test",
        64,
        "--no-download",
        "--no-plots",
    )
    assert result.returncode == 0, result.stderr
    return json.loads((out / "results.json").read_text())


CNN_ATOL = 2e-3  # 2 Adam steps; measured 2.6e-4 (weights) and 3.2e-4 (training-mode logits)


def test_cnn_channels_last_bnfast_matches_torch_bn(cnn_smoke_run):
    """2 Adam steps of the CNN: BatchNorm2d + ReLU fused in channels_last tracks torch's BN2d -> ReLU (the
    redundant conv biases aside, as for the MLP). Looser than the MLP's bound: Adam's first steps are lr*sign(g),
    and a conv weight whose gradient is rounding noise (ReLU-dead patches) moves by +-lr in either model; the
    gradients themselves match to float32 rounding (tests/test_batch_norm2d.py::test_convert_small_cnn)."""
    results = cnn_smoke_run
    assert results["config"]["arch"] == "cnn" and results["config"]["channels_last"]
    assert results["bnfast_backend"] == "interpreter"
    match = results["torch_bn_vs_bnfast"]
    assert match["max_abs_diff"] < CNN_ATOL and match["train_mode_logits_max_abs_diff"] < CNN_ATOL, match
    for name in MODELS:
        assert results["models"][name][-1]["train_loss"] < results["models"][name][0]["train_loss"], name


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


def test_progress_without_a_terminal_is_one_line_per_epoch(smoke_run):
    # the subprocess's stdout is a pipe, as in CI or `> log`: no progress bars, one line when the epoch's training ends
    _, _, stdout = smoke_run
    line = r"^\[Epoch 1/1\] 62 steps \| no-BN [0-9.]+ s \| torch-BN [0-9.]+ s \| bnfast [0-9.]+ s$"
    assert re.search(line, stdout, re.M), stdout
    assert "\r" not in stdout and "batch/s" not in stdout


def test_readme_figures_bound_the_smoke_run(smoke_run):
    """The README states the smoke run's torch-BN vs bnfast differences as bounds: they must hold today."""
    results, _, _ = smoke_run
    readme = " ".join((REPO_ROOT / "README.md").read_text(encoding="utf-8").split())  # lines wrap anywhere
    match = results["torch_bn_vs_bnfast"]
    for phrase, key in (
        ("weights and running stats agree within", "max_abs_diff"),
        ("training-mode logits within", "train_mode_logits_max_abs_diff"),
    ):
        stated = re.search(re.escape(phrase) + r" ([0-9.]+e-[0-9]+)", readme)
        assert stated, f"README.md no longer says '{phrase} <bound>'"
        assert match[key] <= float(stated.group(1)), f"README: {phrase} {stated.group(1)}; measured {match[key]:.2g}"


def test_missing_data_exits_with_a_clear_message(tmp_path):
    empty = tmp_path / "no-mnist-here"
    empty.mkdir()
    result = run_example(tmp_path, "--data-dir", tmp_path / "data", "--no-download", BNFAST_MNIST_RAW=str(empty))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "train-images-idx3-ubyte.gz" in result.stderr and str(tmp_path / "data" / "MNIST" / "raw") in result.stderr
    assert f"{empty} ($BNFAST_MNIST_RAW)" in result.stderr  # every folder searched is named


def test_missing_data_message_names_the_folders_and_the_right_remedy(example, tmp_path, monkeypatch):
    raw_dir = tmp_path / "data" / "MNIST" / "raw"
    monkeypatch.delenv("BNFAST_MNIST_RAW", raising=False)
    offline = example.missing_data_message(raw_dir, download_error=None)  # --no-download given
    assert str(raw_dir) in offline and f"{example.SHARED_RAW_DIR} (the repo's shared data" in offline
    assert "$BNFAST_MNIST_RAW" in offline and "drop --no-download" in offline
    monkeypatch.setenv("BNFAST_MNIST_RAW", str(tmp_path / "elsewhere"))
    failed = example.missing_data_message(raw_dir, download_error="<urlopen error [Errno -2] Name not known>")
    assert str(raw_dir) in failed and f"{tmp_path / 'elsewhere'} ($BNFAST_MNIST_RAW)" in failed
    assert "Name not known" in failed and "network access" in failed
    assert "--download" not in failed  # it is the default, and it was on: suggesting it would be no help


def test_help_documents_every_option(tmp_path):
    result = run_example(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    for option in OPTIONS:
        assert option in result.stdout, option
    help_text = " ".join(result.stdout.split())  # argparse wraps lines
    assert "(default: None)" not in help_text and "(default: False)" not in help_text
    assert help_text.count("runs/mnist-<timestamp>") == 1


def one_epoch_history(models=MODELS) -> dict[str, list[dict]]:
    rows = lambda acc: [{"epoch": 0, "valid_acc": 0.1}, {"epoch": 1, "valid_acc": acc}]
    return {name: rows(0.8 + 0.01 * i) for i, name in enumerate(models)}


def test_plots_name_dataset_device_backend(example):
    context = example.plot_context(torch.device("cpu"))
    assert context.startswith("MNIST MLP | CPU (") and "| bnfast: " in context
    assert example.plot_context(torch.device("cpu"), "cnn", True).startswith("MNIST CNN, channels_last | CPU (")
    assert context.endswith(("interpreter", "torch fallback"))
    fig = example.plot_metric(one_epoch_history(), "valid_acc", "Test accuracy", "accuracy", context)
    assert fig.axes[0].get_title().endswith(context)


def test_one_epoch_plot_shows_markers_on_integer_ticks(example):
    fig = example.plot_metric(one_epoch_history(), "valid_acc", "Test accuracy", "accuracy", "MNIST")
    fig.draw_without_rendering()
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks == [1.0], ticks  # the one epoch, not 0.94 ... 1.06
    assert [t.get_text() for t in ax.get_xticklabels() if t.get_position()[0] in ticks] == ["1"]
    for line in ax.get_lines():
        assert line.get_marker() not in (None, "", "None") and line.get_xdata().tolist() == [1], line.get_label()


def test_cuda_graphs_without_cuda_exits_with_a_clear_message(tmp_path):
    result = run_example(tmp_path, "--cuda-graphs", "--device", "cpu", "--data-dir", tmp_path / "data", "--no-download")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--cuda-graphs: CUDA graphs capture GPU work" in result.stderr


def test_warm_up_before_capture_leaves_no_trace(example):
    """What a capture's warm-up steps change (weights, BatchNorm's running stats and num_batches_tracked, Adam's
    state) is restored in the same tensors: the next step is bit for bit a fresh model's and optimizer's first."""
    torch.manual_seed(0)
    model = example.build_mlp(16, "relu", batch_norm=True)
    fresh = copy.deepcopy(model)
    x, y = torch.rand(32, 784), torch.randint(0, 10, (32,))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    tensors = [*model.parameters(), *model.buffers()]
    with example.training_state_kept(model, optimizer):
        for _ in range(3):
            example.train_step(model, optimizer, x, y)
        assert not torch.equal(model[1].running_mean, fresh[1].running_mean)  # the warm-up did move them
    assert all(a is b for a, b in zip(tensors, [*model.parameters(), *model.buffers()], strict=True))
    for a, b in zip([*model.parameters(), *model.buffers()], [*fresh.parameters(), *fresh.buffers()], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    example.train_step(model, optimizer, x, y)
    example.train_step(fresh, torch.optim.Adam(fresh.parameters(), lr=0.01), x, y)
    for a, b in zip([*model.parameters(), *model.buffers()], [*fresh.parameters(), *fresh.buffers()], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_eager_steps_are_train_step(example):
    models = {"a": torch.nn.Linear(784, 10)}
    optimizers = {"a": torch.optim.Adam(models["a"].parameters())}
    steps = example.make_steps(models, optimizers, None, cuda_graphs=False)
    assert steps["a"].func is example.train_step and steps["a"].args == (models["a"], optimizers["a"])
