"""Run bnfast's Triton kernels on CPU tensors through Triton's interpreter (CI has no GPU).

TRITON_INTERPRET must be set before triton decorates the kernels, so before anything imports bnfast; a run
that sets it to 0 tests the torch fallback instead. On a CUDA machine the tests still use CPU tensors
unless BNFAST_TEST_DEVICE=cuda.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from parity import DEVICE  # noqa: E402

import bnfast.kernels.launchers as launchers  # noqa: E402


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=["column_fits", "split"])
def kernel_path(request, monkeypatch):
    """Run a test on both launch plans: one program per column, and the split reduction with many small tiles."""
    if request.param == "split":
        monkeypatch.setattr(launchers, "FUSED_MAX_ELEMENTS", 0)
        monkeypatch.setattr(launchers, "TILE_ELEMENTS", 64)
    return request.param
