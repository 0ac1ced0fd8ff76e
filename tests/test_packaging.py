"""What setup.py declares: read from its source (ast), so a checkout is checked, not a stale installed copy."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def setup_kwargs() -> dict:
    """The literal keyword arguments of the setup(...) call in setup.py."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    kwargs = {}
    for keyword in call.keywords:
        try:
            kwargs[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:  # computed values (long_description) are not checked here
            pass
    return kwargs


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", r.strip()).group(0).lower() for r in requirements}


def test_license_file_matches_setup():
    license_file = REPO / "LICENSE"
    assert license_file.is_file(), "setup.py says MIT: the repository needs the LICENSE text"
    text = license_file.read_text(encoding="utf-8")
    assert setup_kwargs()["license"] == "MIT"
    assert text.startswith("MIT License") and "Permission is hereby granted, free of charge" in text
    assert re.search(r"Copyright \(c\) \d{4} the bnfast authors", text)


def test_numpy_is_an_install_requirement():
    # Triton's interpreter imports numpy, torch warns at import without it, and neither declares it: a plain
    # `pip install .` must bring it, or the README's CPU one-liner dies with "No module named 'numpy'".
    assert "numpy" in requirement_names(setup_kwargs()["install_requires"])


def test_hypothesis_is_a_test_requirement():
    # tests/test_differential.py draws its examples with hypothesis
    assert "hypothesis" in requirement_names(setup_kwargs()["extras_require"]["test"])
