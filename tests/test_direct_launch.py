"""The direct launch (kernels/launch.py `_launch`): a cached compiled kernel is called without JITFunction.run
only when every component Triton specialises on is the same, and its launcher then gets exactly the arguments
JITFunction.run gives it; the device guard; the switch; recording.

The kernels must be compiled (not interpreted) for this, so the checks run in a subprocess without
TRITON_INTERPRET (tests/direct_launch_checks.py), with `bnfast.testing.standin_driver()`: Triton's real launch
path, compiled for sm_90 with ptxas, nothing launched. Each component: a base configuration launched twice, then
the same with that one component changed, twice. `runs` counts the launches that went through JITFunction.run,
`loads` the new compiled kernels, `functions` the function handle the launcher got.
"""

import os
import subprocess
import sys

import pytest
from compiled import run_checks

from bnfast.kernels import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_checks(**env_updates):
    return run_checks("direct_launch_checks.py", **env_updates)


@pytest.fixture(scope="module")
def checks():
    result = _run_checks()
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


# the first launch of the base may find it compiled by an earlier component (runs/loads 0 then): only the
# second base launch and the variant's launches are asserted
@pytest.mark.parametrize("component", ["dtype", "int_eq_1", "int_div_16", "constexpr", "num_warps", "device"])
def test_a_changed_key_component_reaches_a_fresh_compile(checks, component):
    c = checks["components"][component]
    assert c["runs"][1] == 0 and c["loads"][1] == 0  # base again: direct, nothing compiled
    assert c["runs"][2] == 1 and c["loads"][2] == 1  # the change: through JITFunction.run, a new binary
    assert c["functions"][2] != c["functions"][1]
    assert c["runs"][3] == 0 and c["loads"][3] == 0  # the changed configuration again: direct
    assert c["functions"][3] == c["functions"][2]


def test_a_misaligned_pointer_always_takes_triton_s_path(checks):
    c = checks["components"]["alignment"]
    assert c["runs"][1] == 0
    assert c["runs"][2:] == [1, 1] and c["loads"][2] == 1  # its own binary, and never the direct launch
    assert c["functions"][2] != c["functions"][1]


def test_the_key_is_never_coarser_than_triton_s(checks):
    """An integer changed within its specialisation class (2 -> 18: neither 1 nor divisible by 16): the key
    misses (exact values), JITFunction.run finds its binary, nothing is compiled."""
    c = checks["components"]["int_same_class"]
    assert c["runs"][2] == 1 and c["loads"][2] == 0 and c["functions"][2] == c["functions"][1]


def test_direct_launch_hands_the_launcher_exactly_what_jitfunction_run_hands_it(checks):
    assert checks["same_arguments_runs"] == 1  # the first through JITFunction.run, the second direct
    assert checks["same_arguments"]
    assert checks["arguments_count"] == 4 + 41  # metadata, two hooks; the kernel's 41 (5 mask, 2 ghost)


def test_a_launch_plan_replays_direct_with_jitfunction_run_s_arguments(checks):
    """bn_fwd's first call of a signature launches through JITFunction.run and captures a plan; the next calls
    replay it direct, handing the launcher the same arguments, each tensor in the same role."""
    assert checks["plan_planned"] == 1
    assert checks["plan_runs"] == [1, 0, 0]
    assert checks["plan_same_arguments"]


def test_device_guard_switches_only_when_the_device_differs_and_restores(checks):
    """The stand-in's current device is -1 (the CPU tensors'); launches on device 0 switch to it and back,
    the others switch nothing."""
    assert checks["device_switches"] == [0, -1, 0, -1]  # the variant's two launches (one through run, one direct)
    assert checks["device_after"] == -1


def test_the_switch_and_recording(checks):
    assert checks["switched_off_runs"] == 3
    assert checks["recorded"] == ["_bn_normalize_kernel"] and checks["launched_while_recording"] == 0


def test_environment_switch_turns_it_off():
    code = "from bnfast.kernels import launch; print(launch.DIRECT_LAUNCH)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for value, expected in (("0", "False"), ("1", "True" if launch.triton_launch_support() is None else "False")):
        env["BNFAST_DIRECT_LAUNCH"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
        assert out.stdout.strip() == expected, out.stderr[-2000:]


def test_unknown_triton_versions_fall_back():
    assert launch.triton_launch_support("3.6.0") is None and launch.triton_launch_support("3.8.1") is None
    assert "3.7.0" in launch.triton_launch_support("3.7.0")
    assert launch.triton_launch_support("3.9.0") is not None


def test_the_interpreter_keeps_kernel_grid():
    assert launch.is_interpreted() and not launch.DIRECT_LAUNCH  # tests/conftest.py sets TRITON_INTERPRET=1


@pytest.mark.parametrize("which", ["weight", "running_mean"])
def test_tensors_on_different_devices_get_torch_s_error(which):
    """Launching on the input's device is only right when every tensor is there: what torch rejects (here a
    meta parameter beside a CPU input, the CUDA-free stand-in for cuda:1 beside cuda:0) raises torch's error."""
    import torch
    import torch.nn.functional as F

    import bnfast

    x = torch.randn(4, 3)
    args = {"running_mean": torch.zeros(3), "running_var": torch.ones(3), "weight": torch.ones(3)}
    args[which] = torch.ones(3, device="meta")
    with pytest.raises(Exception) as expected:
        F.batch_norm(x, args["running_mean"], args["running_var"], args["weight"], None, True)
    with pytest.raises(type(expected.value), match=str(expected.value)):
        bnfast.batch_norm(x, args["running_mean"], args["running_var"], args["weight"], None, True)
