#!/usr/bin/env bash
# One command on a CUDA machine: GPU parity tests, benchmarks, summary, kernel report.
#
#     bash bench/run_gpu.sh            # from the repo root; no pip, no network
#
# Writes into $OUT if set (the device tool's output folder), else bench/results/<date>-<device>/:
#     run.log            versions, nvidia-smi, each stage's command, time and output (tests, bench)
#     bench.json         pytest-benchmark JSON of `pytest bench --benchmark-only`
#     summary.md         every case; headline.md: the float32 BN+ReLU table for the README; gbps_vs_size.png
#     kernel_report.md   `python -m bench.kernel_report` (sm_80 + sm_90); kernel_report.json
# Time: BNFAST_GPU_BUDGET_S (default 520 s) for everything. Each stage has a cap and is interrupted with SIGINT
# when it runs out (pytest-benchmark still writes the JSON of what ran): tests 150 s, benchmarks all but 90 s
# of what is left, kernel report 120 s (about 45 s on 16 cores).
# BENCH_ARGS adds pytest arguments to the benchmark run (e.g. BENCH_ARGS="-k fwd+bwd").
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=${BNFAST_GPU_BUDGET_S:-520}

device=$($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')") || device=""
if [ -z "$device" ]; then
    echo "run_gpu.sh: no CUDA device visible to torch" >&2
    exit 2
fi
DEST=${OUT:-bench/results/$(date -u +%Y-%m-%d)-$(echo "$device" | tr -c 'A-Za-z0-9\n' '-')}
mkdir -p "$DEST"
LOG="$DEST/run.log"
left() { echo $((BUDGET - ($(date +%s) - START))); }
stage() {  # stage NAME CAP_SECONDS CMD...: run with a time cap (SIGINT), log command, time and exit code
    local name=$1 cap=$2
    shift 2
    [ "$cap" -gt "$(left)" ] && cap=$(left)
    if [ "$cap" -le 5 ]; then
        echo "== $name: skipped, no time left" | tee -a "$LOG"
        return 0
    fi
    echo "== $name (cap ${cap}s): $*" | tee -a "$LOG"
    local t0=$(date +%s) rc=0
    timeout -s INT -k 20 "$cap" "$@" >>"$LOG" 2>&1 || rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - t0))s" | tee -a "$LOG"
}

{
    echo "bnfast GPU run, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "command: bash bench/run_gpu.sh (BNFAST_GPU_BUDGET_S=$BUDGET BENCH_ARGS=${BENCH_ARGS:-})"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (dirty)')"
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| CUDA', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name(0), \
torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
    nvidia-smi || true
} >"$LOG" 2>&1

stage "GPU parity tests" 150 env BNFAST_TEST_DEVICE=cuda TRITON_INTERPRET=0 \
    $PY -m pytest tests -q --tb=short -p no:cacheprovider --deselect tests/test_kernel_report.py
# MNIST and SyncBatchNorm first (cheap), then the BN matrix (headline cases first: bench/harness.py cases()); 90 s kept back for
# the summary and the kernel report
# shellcheck disable=SC2086
stage "benchmarks" $(($(left) - 90)) $PY -m pytest bench/test_mnist_step.py bench/test_sync_batch_norm.py bench/test_batch_norm.py -q \
    -p no:cacheprovider --benchmark-only --benchmark-json="$DEST/bench.json" --benchmark-columns=min,median,iqr,rounds \
    ${BENCH_ARGS:-}
if [ -s "$DEST/bench.json" ]; then
    $PY -m bench.summarize "$DEST/bench.json" --out "$DEST" --command "bash bench/run_gpu.sh" 2>&1 | tee -a "$LOG"
fi
stage "kernel report" 120 bash -c "exec $PY -m bench.kernel_report --json '$DEST/kernel_report.json' >'$DEST/kernel_report.md'"
echo "== total $(($(date +%s) - START))s; results in $DEST" | tee -a "$LOG"
