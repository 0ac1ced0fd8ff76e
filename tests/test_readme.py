"""The README against the repository: CI runs its commands as written."""

import importlib.util
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
