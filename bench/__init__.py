"""bnfast's benchmarks and static kernel report (issue 4). Run from the repo root with PYTHONPATH=. :

    pytest bench --benchmark-only --benchmark-json=run.json   # CUDA: bnfast vs torch eager vs torch.compile
    pytest bench --benchmark-disable                          # anywhere (CI): each body once, tiny shapes
    python -m bench.summarize run.json --out DIR              # summary.md, headline.md, gbps_vs_size.png
    python -m bench.kernel_report [--json PATH]               # no GPU: regs, spills, smem, access widths
    BNFAST_COMMIT=<sha> bash bench/run_gpu.sh                 # CUDA: the headline mode in one call (<= 330 s)
    bash bench/run_gpu.sh --full | --select EXPR|@FILE | --collect-only    # the rest; a selection; list only

cases.py: the one home of the shapes, cases, ids and sets (headline, rest, full, smoke); traffic.py: the
minimum-bytes formula (GB/s); harness.py: providers, device timing, checks, ratios, and run_case (check / smoke /
time / record) that every benchmark file calls; test_batch_norm.py: the BatchNorm matrix; test_mnist_step.py: the
MNIST training step; test_sync_batch_norm.py: SyncBatchNorm's collective path; test_host_overhead.py: bnfast's
host time (CPU); conftest.py: CUDA or interpreter, skips, --bench-set; sanity.py: the GPU run's environment record
and first check; run_gpu.sh + headline_tests.txt: the GPU run; summarize.py, kernel_report.py: reports.
"""
