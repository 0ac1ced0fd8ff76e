"""BatchNorm (+ activation, + residual) microbenchmarks: bnfast vs torch eager vs torch.compile, side by side.

BatchNorm1d on the 1-D matrix, then BatchNorm2d on ResNet-50's BN shapes at batch 256 (NCHW and channels_last,
BN + ReLU and BN + add + ReLU; bench/harness.py `cases_2d`).

One pytest-benchmark group per case (mode, activation, dtype, shape), holding the three providers. Modes:
fwd-train and fwd-eval (forward under no_grad: the forward's own cost) and fwd+bwd (training forward, then
autograd.grad of x, weight and bias). Timing: bench/harness.py. Bytes: bench/traffic.py.

extra_info of every result: the case, min_bytes and standalone_bytes (bench/traffic.py), GBps (min_bytes /
median device time), copy_GBps (the session's measured device-to-device copy), frac_of_copy_bw (and
standalone_frac_of_copy_bw, on the standalone floor), speedup_vs_eager and speedup_vs_compile (from this
session's medians), host_us (host time to enqueue one call), copies (input rotation), max_err (normalised error
of the first call against the float64 reference).
"""

from bench import harness


def test_batch_norm(benchmark, case, provider, device, copy_bandwidth):
    benchmark.group = case.id
    info = benchmark.extra_info
    info.update(mode=case.mode, activation=case.activation, dtype=case.dtype, shape=list(case.shape),
                layout=case.layout, residual=case.residual, provider=provider, min_bytes=case.min_bytes(),
                standalone_bytes=case.standalone_bytes())  # fmt: skip
    smoke = benchmark.disabled
    copies = 1 if smoke else harness.rotation_copies(case, device)
    inputs = harness.make_inputs(case, device, copies)
    module = harness.build_module(provider, case, device)
    step = harness.make_step(module, case)

    # the first call (which also compiles) is checked against the float64 reference from the same state
    expected = harness.reference(case, harness.initial_state(module), *inputs[0])
    info["max_err"] = harness.check(step(*inputs[0]), expected, case.torch_dtype)
    if smoke:
        benchmark.pedantic(step, args=inputs[0])  # --benchmark-disable: runs the body once more, untimed
        return

    host_s, median = harness.time_on_device(benchmark, step, inputs)
    info.update(
        copies=copies,
        host_us=round(host_s * 1e6, 2),
        median_us=round(median * 1e6, 3),
        GBps=round(case.min_bytes() / median / 1e9, 3),
        copy_GBps=round(copy_bandwidth / 1e9, 1),
        frac_of_copy_bw=round(case.min_bytes() / median / copy_bandwidth, 4),
        standalone_frac_of_copy_bw=round(case.standalone_bytes() / median / copy_bandwidth, 4),
    )
    harness.record(case.id, provider, median, info)
