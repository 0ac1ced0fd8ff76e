"""What pyproject.toml declares: read from the checkout's file (tomllib), so a checkout is checked, not a stale
installed copy."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

REPO = Path(__file__).resolve().parent.parent


def pyproject() -> dict:
    with (REPO / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", r.strip()).group(0).lower() for r in requirements}


def test_license_file_matches_metadata():
    license_file = REPO / "LICENSE"
    assert license_file.is_file(), "pyproject.toml says MIT: the repository needs the LICENSE text"
    text = license_file.read_text(encoding="utf-8")
    assert pyproject()["project"]["license"] == {"text": "MIT"}
    assert text.startswith("MIT License") and "Permission is hereby granted, free of charge" in text
    assert re.search(r"Copyright \(c\) \d{4} the bnfast authors", text)


def test_numpy_is_an_install_requirement():
    # Triton's interpreter imports numpy, torch warns at import without it, and neither declares it: a plain
    # `pip install .` must bring it, or the README's CPU one-liner dies with "No module named 'numpy'".
    assert "numpy" in requirement_names(pyproject()["project"]["dependencies"])


def test_hypothesis_is_a_test_requirement():
    # tests/test_differential.py draws its examples with hypothesis
    assert "hypothesis" in requirement_names(pyproject()["project"]["optional-dependencies"]["test"])


def test_extras():
    # test: the suite (real-model tests need timm and torchvision); examples: examples/; timm: models convert maps
    extras = {name: requirement_names(reqs) for name, reqs in pyproject()["project"]["optional-dependencies"].items()}
    assert {"pytest", "pytest-benchmark", "hypothesis", "timm", "torchvision"} <= extras["test"]
    assert {"torchvision", "matplotlib", "tqdm"} <= extras["examples"]
    assert extras["timm"] == {"timm"}
    assert "ruff" in extras["lint"]


def test_kernels_folder_installs_as_bnfast_kernels():
    # PyPI already has an unrelated top-level package named `kernels`
    tool = pyproject()["tool"]["setuptools"]
    assert sorted(tool["packages"]) == ["bnfast", "bnfast.kernels"]
    assert tool["package-dir"] == {"bnfast": "bnfast", "bnfast.kernels": "kernels"}
    assert not (REPO / "setup.py").exists(), "one place for the metadata: pyproject.toml"
