"""Checks that need the kernels compiled, not interpreted (direct launch, call cache): their script runs in a
fresh process without TRITON_INTERPRET (tests' conftest sets it, and Triton reads it once, at import) and prints
its result as one JSON line."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_checks(script: str, **env_updates) -> dict:
    """Run tests/`script` without TRITON_INTERPRET (plus `env_updates`); its last stdout line, parsed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_updates)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", script)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
