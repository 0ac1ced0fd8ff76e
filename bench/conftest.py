"""pytest configuration of the benchmarks: CUDA or not, benchmarks on or off.

    PYTHONPATH=. pytest bench --benchmark-only --benchmark-json=out.json   # CUDA: the full matrix, timed
    PYTHONPATH=. pytest bench --benchmark-disable                           # anywhere: each body once, tiny shapes

- With CUDA: the kernels are compiled (TRITON_INTERPRET is cleared before bnfast is imported; see _use_cuda).
- Without CUDA: TRITON_INTERPRET=1 is set before bnfast is imported, so `--benchmark-disable` runs every bench
  body once on tiny CPU shapes through Triton's interpreter (and checks every provider's output against the
  float64 reference); with benchmarks enabled, every benchmark is skipped with "CUDA device required".
- `--benchmark-disable` also shrinks the matrix (harness.cases(smoke=True)) anywhere, CUDA included.
"""

import os
import sys

import torch


def _use_cuda() -> bool:
    """CUDA, with compiled kernels. TRITON_INTERPRET must be decided before bnfast is imported (Triton decorates
    the kernels at import); if bnfast was already imported under the interpreter (`pytest tests bench`:
    tests/conftest.py sets it), the benchmarks take the CPU path."""
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        return False
    if "bnfast" in sys.modules:
        from bnfast.kernels import is_interpreted

        return not is_interpreted()
    os.environ.pop("TRITON_INTERPRET", None)
    return True


HAS_CUDA = _use_cuda()

import pytest  # noqa: E402

from bench import harness  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
SKIP_REASON = "CUDA device required"


def smoke_run(config) -> bool:
    return bool(config.getoption("benchmark_disable", False))


def pytest_configure(config):
    config.addinivalue_line("markers", "host_overhead: a CPU benchmark (bnfast's host time), runs without CUDA")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA or smoke_run(config):
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if str(item.path).startswith(BENCH_DIR) and "host_overhead" not in item.keywords:
            item.add_marker(skip)


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames and "provider" in metafunc.fixturenames:
        params, ids = [], []
        for case in harness.cases(smoke_run(metafunc.config)):
            for provider in harness.PROVIDERS:  # innermost: a case's providers run one after another
                params.append((case.mode, case.activation, case.dtype, case.shape, case.layout, case.residual,
                               provider))  # fmt: skip
                ids.append(f"{case.id}-{provider}")
        metafunc.parametrize(("mode", "activation", "dtype", "shape", "layout", "residual", "provider"), params,
                             ids=ids)  # fmt: skip
    elif {"batch", "hidden", "model"} <= set(metafunc.fixturenames):
        params = metafunc.module.params(smoke_run(metafunc.config))
        ids = [f"batch{b}-hidden{h}-{m}" for b, h, m in params]
        metafunc.parametrize(("batch", "hidden", "model"), params, ids=ids)


@pytest.fixture
def case(mode, activation, dtype, shape, layout, residual):
    return harness.Case(mode, activation, dtype, tuple(shape), layout, residual)


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="session")
def copy_bandwidth(device):
    """Bytes/s of a large device-to-device copy, measured once per session (None without CUDA)."""
    return harness.copy_bandwidth(device.index or 0) if device.type == "cuda" else None


def pytest_benchmark_update_machine_info(config, machine_info):
    import triton

    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__
    if HAS_CUDA:
        props = torch.cuda.get_device_properties(0)
        machine_info["cuda_device"] = props.name
        machine_info["cuda_version"] = torch.version.cuda
        machine_info["sm_count"] = props.multi_processor_count
        machine_info["l2_bytes"] = harness.l2_bytes(0)
        if harness.copy_bandwidth.cache_info().currsize:  # measured during the session
            machine_info["copy_GBps"] = round(harness.copy_bandwidth(0) / 1e9, 1)
