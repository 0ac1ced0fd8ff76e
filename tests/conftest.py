"""Run bnfast's Triton kernels on CPU tensors through Triton's interpreter (CI has no GPU).

TRITON_INTERPRET must be set before triton decorates the kernels, so before anything imports bnfast; a run
that sets it to 0 tests the torch fallback instead. On a CUDA machine the tests still use CPU tensors
unless BNFAST_TEST_DEVICE=cuda.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from parity import DEVICE  # noqa: E402

import bnfast  # noqa: E402

# the eager entry's C++ node (and with it the call cache) from the first test on, whatever the order of the tests:
# built here once per machine where a C++ compiler is (bnfast.native), the Function entry elsewhere
bnfast.ops.native_node()


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=["single", "split"])
def kernel_path(request):
    """Run a test on both launch plans: single-pass (one program per channel block's column), and the split
    reduction with many small tiles (64 elements: several splits and tiles on the tests' small shapes)."""
    with bnfast.testing.force_plan(request.param, tile_elements=64 if request.param == "split" else None):
        yield request.param
