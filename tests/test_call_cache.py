"""The call cache (bnfast.ops "call cache", bnfast/csrc/autograd_node.cpp): a module's repeated eager call and its
backward replayed from C++ hand Triton's launcher exactly what the Python path hands it, and anything the Python
path depends on, once changed, sends the next call back to it.

The kernels must be compiled for this (a replay only exists for launches that go direct), so the checks run in a
subprocess without TRITON_INTERPRET (tests/call_cache_checks.py) through `bnfast.testing.standin_driver()`:
Triton's real launch path compiled for sm_90, with the launcher's arguments recorded instead of launched. Per
scenario, four training steps of a fresh module with the cache on are compared with the same steps with it off,
launch by launch, each tensor argument by its role (the step's x, dy, residual, the module's parameters and
buffers) and outputs by layout, and num_batches_tracked after each step. The cache needs two calls to warm up
(the first captures the launch plans, the second is stored): steps 3 and 4 are replayed.
"""

import pytest
from compiled import run_checks

from bnfast import native, ops

# scenarios whose plans need a workspace (the split plan's partials, ghost BatchNorm's per-chunk gradient sums)
# are not planned (kernels/launch.py "launch plans"), so not cached: only their forward or nothing replays
NOT_PLANNED_BACKWARD = {"ghost-no-stats"}
NOT_PLANNED = {"split-plan"}


@pytest.fixture(scope="module")
def checks():
    if ops.native_node() is None:
        pytest.skip(f"no C++ node: {native.reason()}")
    result = run_checks("call_cache_checks.py")
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


SCENARIOS = [
    "train-relu",
    "eval",
    "residual-act",
    "residual-no-act",
    "no-affine",
    "no-running-stats",
    "cumulative",
    "channels-last",
    "bfloat16",
    "only-x-grad",
    "ghost-no-stats",
    "split-plan",
]


@pytest.mark.parametrize("name", SCENARIOS)
def test_replays_hand_the_launcher_what_the_python_path_hands_it(checks, name):
    s = checks["scenarios"][name]
    assert all(s["same_launches"]) and all(s["same_nbt"]), s
    assert s["replays_off"] == [[0, 0]] * 4
    forward = 0 if name in NOT_PLANNED else 1
    backward = 0 if name in NOT_PLANNED | NOT_PLANNED_BACKWARD else 1
    # step 1 captures the plans, step 2 is stored (its node has no entry), step 3's backward stores the backward
    assert s["replays"] == [[0, 0], [0, 0], [forward, 0], [forward, backward]], s


INVALIDATIONS = {
    "eps": False,
    "momentum": False,
    "activation": False,
    "eval": False,
    "weight-strided": False,
    "weight-swapped": True,  # a new tensor of the same dtype and layout: replayed with the new tensor
    "direct-launch-off": False,
    "plan-forced": False,
    "function-entry": False,
    "dispatch-mode": False,
    "no-grad": True,  # replayed, and no node (so no backward)
    "saved-hook-layout": True,  # the forward replayed; the backward not: x unpacks in another layout
}


@pytest.mark.parametrize("name", INVALIDATIONS)
def test_a_change_the_python_path_depends_on_is_not_replayed(checks, name):
    s = checks["invalidations"][name]
    assert s["warm_replays"] == [1, 1]  # the step before the change was replayed, forward and backward
    expected = ([1, 0] if name in ("no-grad", "saved-hook-layout") else [1, 1]) if INVALIDATIONS[name] else [0, 0]
    assert s["last_replays"] == expected, s
    assert s["same_launches"] and s["same_nbt"], s


def test_a_subclass_that_overrides_the_call_is_not_replayed(checks):
    # the one that only adds: calls 3 and 4 at least (the layout's plans, captured by earlier checks, may already
    # let call 2 be stored)
    assert checks["subclasses"]["Overrides"] == 0 and checks["subclasses"]["Adds"] >= 2, checks["subclasses"]


def test_jit_trace_is_not_replayed(checks):
    assert checks["jit_trace"]["warm_replayed"] == 1
    assert checks["jit_trace"]["graph_has_batch_norm"]
