"""examples/padded_sequences.py end to end on CPU, tiny settings (one epoch of 32 steps, about 10 s).

The script runs as a subprocess with TRITON_INTERPRET=0: bnfast's masked BatchNorm then runs in torch ops (the CPU
fallback a user without a GPU gets), which must compute the masked statistics, not drop the mask. The check that
can fail: the masked model's first BatchNorm's running mean is much closer to the true mean of its input over the
valid positions than the unmasked (torch) model's, whose statistics count the padding. Measured on 2026-12 (torch
2.14.1): 0.036 vs 0.44 valid standard deviations, mean over channels; the bound is half the unmasked error.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "examples" / "padded_sequences.py"
TINY = ["--epochs", "1", "--train", "512", "--test", "128", "--length", "32", "--batch-size", "16", "--hidden", "8"]


def _run(args, timeout=120):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_the_options(capsys):
    spec = importlib.util.spec_from_file_location("padded_sequences", SCRIPT)  # in-process: no second torch import
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--epochs", "--batch-size", "--length", "--min-length", "--hidden", "--lr", "--seed", "--json"):
        assert option in text


def test_tiny_run_masked_running_mean_is_closer_to_the_valid_data(tmp_path):
    out = tmp_path / "results.json"
    proc = _run([*TINY, "--json", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| test accuracy" in proc.stdout and "torch ops (CPU fallback" in proc.stdout, proc.stdout
    results = json.loads(out.read_text())
    unmasked = results["unmasked"]["running_stats"][0]["mean_error_in_std"]
    masked = results["masked"]["running_stats"][0]["mean_error_in_std"]
    assert masked < 0.5 * unmasked, (masked, unmasked)
    for name in ("unmasked", "masked"):
        assert 0.0 <= results[name]["test_accuracy"] <= 1.0
