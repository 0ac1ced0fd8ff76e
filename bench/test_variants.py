"""BatchNorm variants: bnfast vs the torch snippet users write today, side by side (issue 22).

    PYTHONPATH=. pytest bench/test_variants.py --benchmark-only     # CUDA

One pytest-benchmark group per case (bench/cases.py VARIANT_CASES: masked BN+ReLU fwd+bwd on (N, C, L) with random
lengths), two providers: "bnfast" and "snippet" (bench/variants.py). Timing, checks and extra_info as
bench/test_batch_norm.py (bench/harness.py run_case), speedup_vs_snippet; GBps on `VariantCase.min_bytes` (the BN+ReLU
fwd+bwd floor plus one read of the mask). Each provider's first call is checked against the snippet in float64.
Under `--benchmark-disable` (no CUDA): each body once on the smoke case, kernels interpreted.
"""

import pytest

from bench import cases, harness, variants

pytestmark = harness.timed_by("device")  # cases: bench/cases.py variant_cases (parametrized in bench/conftest.py)


@pytest.mark.parametrize("provider", cases.VARIANT_PROVIDERS)
def test_variant(benchmark, variant_case, provider, device, copy_bandwidth):
    case = variant_case
    info = benchmark.extra_info
    # no "mode" key: bench/summarize.py's BatchNorm tables (bnfast vs eager vs compile) take results that have one
    info.update(
        variant=case.variant, variant_case=case.id, dtype=case.dtype, shape=list(case.shape), min_bytes=case.min_bytes()
    )
    copies = 1 if benchmark.disabled else harness.rotation_copies(case.base, device)
    inputs = variants.make_inputs(case, device, copies)
    module = variants.build(provider, case, device)
    expected = variants.reference(case, device, inputs[0])

    def check(outputs):
        return {"max_err": harness.check(outputs, expected, case.base.torch_dtype)}

    median = harness.run_case(
        benchmark,
        variants.make_step(module, case),
        inputs,
        group=f"variant {case.id}",
        provider=provider,
        timing="device",
        check=check,
        baselines=("snippet",),
    )
    if median is None:
        return
    info.update(
        copies=copies,
        GBps=round(case.min_bytes() / median / 1e9, 3),
        copy_GBps=round(copy_bandwidth / 1e9, 1),
        frac_of_copy_bw=round(case.min_bytes() / median / copy_bandwidth, 4),
    )
