"""The README against the repository: its Quickstart runs, CI runs its commands as written, its set-up notes hold.

The Quickstart runs in a fresh interpreter with TRITON_INTERPRET=1 and no CUDA device visible, bnfast importable
from this checkout: the CPU branch of its `device = ...` line, on the Triton kernels (about 10 s).
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text of the README's `## <title>...` section, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def readme_command_module():
    spec = importlib.util.spec_from_file_location("readme_command", REPO / ".ci" / "readme_command.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_runs_without_cuda(tmp_path):
    code = re.search(r"```python\n(.*?)```", section("Quickstart"), re.S).group(1)
    checks = "\nassert device == 'cpu' and bnfast.uses_triton(x) and y.shape == x.shape\nprint('quickstart ok')\n"
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-c", code + checks], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "quickstart ok" in result.stdout


def test_ci_runs_the_readme_test_command_with_nothing_pinned():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert not (REPO / ".ci" / "constraints.txt").exists()
    assert not re.search(r"pip install.*(\s-c\s|--constraint|constraints)", ci), "CI must install what pip resolves"
    assert "python .ci/readme_command.py 2" in ci  # read from the README, not copied: they cannot drift apart
    commands = readme_command_module().setup_commands(README)
    assert set(commands) == {1, 2}
    assert commands[1].startswith("pip install ") and "examples/mnist_compare.py" in commands[1]
    assert commands[2].startswith("pip install ") and "python -m pytest tests bench" in commands[2]
    printed = subprocess.run([sys.executable, ".ci/readme_command.py", "2"], cwd=REPO, capture_output=True, text=True)
    assert printed.stdout.strip() == commands[2]


def test_setup_names_the_download_the_cpu_build_and_the_fallback():
    setup = " ".join(section("Set-up").split())  # lines wrap anywhere
    assert "torch's CUDA build: about 5.5 GB" in setup
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in setup
    assert "without `TRITON_INTERPRET=1`" in setup and "the bnfast column is torch's own fallback" in setup


def test_readme_names_the_tested_stacks():
    from test_kernel_report import TESTED_STACKS

    setup = " ".join(section("Set-up").split())
    for torch_version, triton_version in TESTED_STACKS:
        named = f"torch {torch_version} + triton {triton_version}"
        assert named in setup, named
