"""BatchNorm (+ activation, + residual) microbenchmarks: bnfast vs torch eager vs torch.compile, side by side.

BatchNorm1d on the 1-D matrix, then BatchNorm2d on ResNet-50's BN shapes at batch 256 (NCHW and channels_last,
BN + ReLU and BN + add + ReLU); the cases and their order: bench/cases.py.

One pytest-benchmark group per case (mode, activation, dtype, shape), holding the three providers. Modes:
fwd-train and fwd-eval (forward under no_grad: the forward's own cost) and fwd+bwd (training forward, then
autograd.grad of x, weight and bias). Check, timing and speedups: bench/harness.py run_case. Bytes: bench/traffic.py.

extra_info of every result: the case, min_bytes and standalone_bytes (bench/traffic.py), GBps (min_bytes /
median device time), copy_GBps (the session's measured device-to-device copy), frac_of_copy_bw (and
standalone_frac_of_copy_bw, on the standalone floor), speedup_vs_eager and speedup_vs_compile (from this
session's medians), host_us (host time to enqueue one call), copies (input rotation), max_err (normalised error
of the first call against the float64 reference).
"""

from bench import harness

pytestmark = harness.timed_by("device")


def test_batch_norm(benchmark, case, provider, device, copy_bandwidth):
    info = benchmark.extra_info
    info.update(
        mode=case.mode,
        activation=case.activation,
        dtype=case.dtype,
        shape=list(case.shape),
        layout=case.layout,
        residual=case.residual,
        provider=provider,
        min_bytes=case.min_bytes(),
        standalone_bytes=case.standalone_bytes(),
    )
    copies = 1 if benchmark.disabled else harness.rotation_copies(case, device)
    inputs = harness.make_inputs(case, device, copies)
    module = harness.build_module(provider, case, device)
    # the first call (which also compiles) is checked against the float64 reference from the same state
    expected = harness.reference(case, harness.initial_state(module), *inputs[0])

    def check(outputs):
        return {"max_err": harness.check(outputs, expected, case.torch_dtype)}

    median = harness.run_case(
        benchmark,
        harness.make_step(module, case),
        inputs,
        group=case.id,
        provider=provider,
        timing="device",
        check=check,
        baselines=("eager", "compile"),
    )
    if median is None:  # --benchmark-disable
        return
    info.update(
        copies=copies,
        GBps=round(case.min_bytes() / median / 1e9, 3),
        copy_GBps=round(copy_bandwidth / 1e9, 1),
        frac_of_copy_bw=round(case.min_bytes() / median / copy_bandwidth, 4),
        standalone_frac_of_copy_bw=round(case.standalone_bytes() / median / copy_bandwidth, 4),
    )
