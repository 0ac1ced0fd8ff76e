"""bnfast's benchmarks and static kernel report (issue 4). Run from the repo root with PYTHONPATH=. :

    pytest bench --benchmark-only --benchmark-json=run.json   # CUDA: bnfast vs torch eager vs torch.compile
    pytest bench --benchmark-disable                          # anywhere (CI): each body once, tiny shapes
    python -m bench.summarize run.json --out DIR              # summary.md, headline.md, gbps_vs_size.png
    python -m bench.kernel_report [--json PATH]               # no GPU: regs, spills, smem, access widths
    bash bench/run_gpu.sh                                     # all of it on a CUDA machine -> bench/results/

traffic.py: the minimum-bytes formula (GB/s); harness.py: cases, providers, device timing, checks, ratios;
test_batch_norm.py: the BatchNorm1d matrix; test_mnist_step.py: the MNIST training step; conftest.py: CUDA or
interpreter, skips, smoke shapes.
"""
