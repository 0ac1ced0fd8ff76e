"""pytest configuration of the benchmarks: CUDA or not, benchmarks on or off.

    PYTHONPATH=. pytest bench --benchmark-only --benchmark-json=out.json   # CUDA: the full matrix, timed
    PYTHONPATH=. pytest bench --benchmark-disable                           # anywhere: each body once, tiny shapes
    PYTHONPATH=. pytest bench --benchmark-only --bench-set headline         # what bash bench/run_gpu.sh times

- `--bench-set headline|rest|full` (default full; env BNFAST_BENCH_SET) picks the cases (bench/cases.py: the one
  place run_gpu.sh and tests/test_headline.py both read); `--benchmark-disable` always runs the "smoke" set.

- With CUDA: the kernels are compiled (TRITON_INTERPRET is cleared before bnfast is imported; see _use_cuda).
- Without CUDA: TRITON_INTERPRET=1 is set before bnfast is imported, so `--benchmark-disable` runs every bench
  body once on tiny CPU shapes through Triton's interpreter (and checks every provider's output against the
  float64 reference); with benchmarks enabled, every benchmark is skipped with "CUDA device required".
- `--benchmark-disable` also shrinks the matrix (the "smoke" set) anywhere, CUDA included.
"""

import os
import sys
import time

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

from bench import cases, harness  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
SKIP_REASON = "CUDA device required"


def smoke_run(config) -> bool:
    return bool(config.getoption("benchmark_disable", False))


def bench_set(config) -> str:
    """The set of cases this run takes (bench/cases.py): "smoke" under --benchmark-disable, else --bench-set."""
    return "smoke" if smoke_run(config) else config.getoption("bench_set")


def pytest_addoption(parser):
    parser.addoption(
        "--bench-set",
        choices=[s for s in cases.SETS if s != "smoke"],
        default=os.environ.get("BNFAST_BENCH_SET", "full"),
        help="bnfast benchmarks: which cases (bench/cases.py; --benchmark-disable runs the smoke set)",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "host_overhead: a CPU benchmark (bnfast's host time), runs without CUDA")


def pytest_generate_tests(metafunc):
    chosen = bench_set(metafunc.config)
    if "case" in metafunc.fixturenames and "provider" in metafunc.fixturenames:
        params, ids = [], []
        for case in cases.bn_cases(chosen):
            for provider in cases.PROVIDERS:  # innermost: a case's providers run one after another
                params.append(
                    (case.mode, case.activation, case.dtype, case.shape, case.layout, case.residual, provider)
                )
                ids.append(f"{case.id}-{provider}")
        metafunc.parametrize(
            ("mode", "activation", "dtype", "shape", "layout", "residual", "provider"), params, ids=ids
        )
    elif {"batch", "hidden", "model"} <= set(metafunc.fixturenames):
        params = cases.mnist_params(chosen)
        metafunc.parametrize(("batch", "hidden", "model"), params, ids=[cases.mnist_id(*p) for p in params])
    elif "sync_shape" in metafunc.fixturenames:
        metafunc.parametrize("sync_shape", cases.sync_shapes(chosen), ids=cases.shape_id)
    elif "variant_case" in metafunc.fixturenames:
        metafunc.parametrize("variant_case", cases.variant_cases(chosen), ids=lambda c: c.id)


def pytest_collection_modifyitems(config, items):
    """Without CUDA the GPU benchmarks skip (unless --benchmark-disable). The set decides which files take part:
    the host-overhead benchmark (CPU by design), SyncBatchNorm and the variants are not in the headline
    (bench/cases.py)."""
    chosen = bench_set(config)
    skip_cuda = pytest.mark.skip(reason=SKIP_REASON)
    keep, drop = [], []
    for item in items:
        if not str(item.path).startswith(BENCH_DIR):
            keep.append(item)
            continue
        host = "host_overhead" in item.keywords
        fixtures = getattr(item, "fixturenames", ())
        if (
            (host and not cases.host_overhead_runs(chosen))
            or ("sync_shape" in fixtures and not cases.sync_shapes(chosen))
            or ("variant_case" in fixtures and not cases.variant_cases(chosen))
        ):
            drop.append(item)
            continue
        if not (HAS_CUDA or smoke_run(config) or host):
            item.add_marker(skip_cuda)
        keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_runtest_setup(item):
    """BNFAST_BENCH_DEADLINE (epoch seconds; bash bench/run_gpu.sh sets it a margin before a stage's time cap): past
    it, the remaining benchmarks skip, so the stage ends by itself and pytest-benchmark writes its JSON (the cap's
    SIGINT is the backstop)."""
    deadline = os.environ.get("BNFAST_BENCH_DEADLINE")
    if deadline and str(item.path).startswith(BENCH_DIR) and time.time() > float(deadline):
        pytest.skip("this stage's time budget is spent (BNFAST_BENCH_DEADLINE)")


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
