#!/usr/bin/env bash
# bnfast on a CUDA machine in one command: the headline benchmarks, then the rest on a second call.
#
#     BNFAST_COMMIT=<sha> bash bench/run_gpu.sh            # headline mode (default): <= 330 s on an H200
#     BNFAST_COMMIT=<sha> bash bench/run_gpu.sh --full     # the rest (or BNFAST_FULL=1): a second call, warm machine
#     bash bench/run_gpu.sh --select 'fwd+bwd and 16384x1024'   # benchmarks of the whole matrix, a pytest -k expression
#     bash bench/run_gpu.sh --select @ids.txt               # node ids, one a line: bench/... timed, tests/... on CUDA
#     bash bench/run_gpu.sh --collect-only                  # no GPU needed: list what each stage would run
#
# From the repo root, no network: torch, triton, numpy, pytest, pytest-benchmark (matplotlib for the plot); a tree
# that is not installed yet gets `pip install --no-deps --no-build-isolation -e .` first (offline).
# Headline mode, in this order (the cases: bench/cases.py "headline" set; the tests: bench/headline_tests.txt):
#   0. native    `python -m bnfast.native`: build the eager entry's C++ autograd node (cached per machine)
#   1. sanity    python -m bench.sanity check: bnfast fwd+bwd vs the float64 reference on CUDA, in its own process
#                (CUDA_LAUNCH_BLOCKING=1), so that an illegal address cannot poison the stages after it
#   2. bn        fwd+bwd BN+ReLU, bnfast vs eager vs torch.compile: float32 (32, 32), (4096, 256); float32 and bf16
#                (65536, 512); float32 and bf16 (256, 256, 56, 56) NCHW and channels_last; BN+add+ReLU float32
#                (256, 256, 56, 56): 9 cases x 3 providers = 27 benchmarks
#   3. mnist     the MNIST training step, batch x hidden (32, 32) and (1024, 1024), 6 models each (no-BN, torch-BN,
#                bnfast, each also CUDA-graphed): 12 benchmarks, timed before the profiler counts launches
#   4. parity    the ~20 tests of bench/headline_tests.txt with BNFAST_TEST_DEVICE=cuda (both plans, train/eval, bf16,
#                channels_last, residual, torch.compile)
# --full: sanity again (cached compiles), the rest of the BatchNorm matrix (most wanted first, bench/cases.py),
# SyncBatchNorm + the BatchNorm variants (masked vs the torch snippet) + host overhead + the other MNIST
# configurations, then every test of tests/ on CUDA (cut when the budget runs out: all of it needs ~970 Triton
# compiles). The kernel report needs no GPU and never runs here
# (`python -m bench.kernel_report` anywhere).
#
# Time: BNFAST_GPU_BUDGET_S (default 315 s headline, 540 s otherwise) for all stages; each has a cap and is
# interrupted (SIGINT, then SIGKILL 10 s later) when it runs out, and a benchmark stage's remaining benchmarks skip
# min(30 s, a quarter of the cap) before that (BNFAST_BENCH_DEADLINE); pytest-benchmark writes the JSON of what ran,
# and the summary is written after a stage that was cut and at the end. Headline caps: sanity 45 s, bn 200 s,
# mnist 45 s, parity what is left (at least 25 s); 10 s are kept for the summary: the call ends by ~330 s.
# PREDICTION for the headline mode on an H200 (fresh machine: no Triton or inductor cache), from the counts:
#   sanity  4 s start + 20 Triton configurations x ~1 s (4 cases: 2 + 3 x 6 kernels; the bn stage compiles the same
#           ones and finds them in Triton's on-disk cache) + 4 checks x ~0.5 s                  ~ 26 s
#   bn      8 s start (torch, inductor imports) + 7 more Triton configurations x ~1 s (27 in all for the 9 cases)
#           + 9 torch.compile fwd+bwd compiles x ~12 s (10-20 s each; dynamo reset per case)
#           + 27 benchmarks x ~0.5 s (0.2 s of rounds; inputs, float64 reference, warm-up, calibration)
#           = 8 + 7 + 108 + 14                                                                   ~ 137 s
#           (at 20 s per compile: 209 s, and the cap cuts the last case's torch.compile provider)
#   mnist   8 s start + 2 x 4 Triton configurations x ~1 s + 12 benchmarks x ~1.8 s (10-call estimate, ~1 s of
#           rounds, graph capture, then the profiler pass) = 8 + 8 + 22                          ~ 38 s
#   parity  6 s start + ~45 Triton configurations (20 tests, tiny shapes, both plans) x ~1 s
#           + 1 inductor compile (~15 s)                                                         ~ 66 s
#   install (a fresh tree), summaries, nvidia-smi, environment                                   ~ 18 s
#   native  the C++ node: one g++ compile of bnfast/csrc/autograd_node.cpp (25-30 s on this project's 2-core CPU;
#           the GPU machine's 16 cores do not speed up one file)                                 ~ 25 s
#   total   26 + 137 + 38 + 66 + 18 + 25                                                         ~ 310 s (<= 330 s)
#
# Writes into $OUT if set (the device tool's output folder), else bench/results/<date>-<device>/:
#   run.log          command, date, commit (BNFAST_COMMIT, else git), device, versions, nvidia-smi; each stage's
#                    command, time, exit code and output
#   env.json         device, python, torch, CUDA, triton, numpy, commit, date; sanity.json: the sanity check
#   bench-*.json     pytest-benchmark JSON per stage; parity.xml: the parity tests (JUnit XML)
#   summary.md       everything; headline.md: the table for the README; gbps_vs_size.png
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
COMMAND=""
for v in BNFAST_COMMIT BNFAST_FULL BNFAST_GPU_BUDGET_S BENCH_ARGS; do
    [ -n "${!v:-}" ] && COMMAND+="$v=${!v} "
done
COMMAND+="bash bench/run_gpu.sh${*:+ $*}"

MODE=headline
[ "${BNFAST_FULL:-0}" = 1 ] && MODE=full
SELECT="" COLLECT=0
while [ $# -gt 0 ]; do
    case $1 in
        --full) MODE=full ;;
        --select)
            [ $# -ge 2 ] || { echo "run_gpu.sh: --select needs a -k expression or @file" >&2; exit 2; }
            MODE=select SELECT=$2
            shift ;;
        --collect-only) COLLECT=1 ;;
        -h | --help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "run_gpu.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done
BUDGET=${BNFAST_GPU_BUDGET_S:-$([ $MODE = headline ] && echo 315 || echo 540)}

# bnfast.kernels is the top-level kernels/ folder, mapped by pyproject.toml: a fresh tree needs the editable install
# (offline: no dependencies, no build isolation; ~10 s of the budget)
START=$(date +%s)
if ! $PY -c "import bnfast.kernels" >/dev/null 2>&1; then
    echo "run_gpu.sh: bnfast is not installed here; pip install --no-deps --no-build-isolation -e ." >&2
    $PY -m pip install -q --no-deps --no-build-isolation -e . >&2 || { echo "run_gpu.sh: install failed" >&2; exit 3; }
fi
RESERVE=10  # kept back for the final summary

if [ $COLLECT = 1 ]; then
    DEST=$(mktemp -d)
    trap 'rm -rf "$DEST"' EXIT
else
    envfile=$(mktemp)
    rc=0
    err=$($PY -m bench.sanity env --json "$envfile" 2>&1 >/dev/null) || rc=$?
    if [ $rc -ne 0 ]; then
        rm -f "$envfile"
        if [ $rc -ne 2 ]; then
            echo "run_gpu.sh: python -m bench.sanity env failed (exit $rc):" >&2
            echo "$err" >&2
            exit $rc
        fi
        echo "run_gpu.sh: no CUDA device visible to torch; this script times bnfast on a GPU. Without one:" \
            "'pytest bench --benchmark-disable' (each benchmark once, tiny shapes, interpreter) or" \
            "'python -m bench.kernel_report' (the static kernel report)." >&2
        exit 2
    fi
    device=$($PY -c 'import json, sys; print(json.load(open(sys.argv[1]))["device"])' "$envfile")
    DEST=${OUT:-bench/results/$(date -u +%Y-%m-%d)-$(echo "$device" | tr -c 'A-Za-z0-9\n' '-')}
    mkdir -p "$DEST"
    mv "$envfile" "$DEST/env.json"
fi
LOG="$DEST/run.log"

left() { echo $((BUDGET - ($(date +%s) - START))); }
summarize() {
    [ $COLLECT = 1 ] && return 0
    local args=() f
    for f in "$DEST"/bench-*.json; do [ -s "$f" ] && args+=("$f"); done
    for f in env sanity; do [ -s "$DEST/$f.json" ] && args+=(--"$f" "$DEST/$f.json"); done
    for f in "$DEST"/parity*.xml; do [ -s "$f" ] && args+=(--parity "$f"); done
    $PY -m bench.summarize "${args[@]}" --out "$DEST" --command "$COMMAND" 2>&1 | tee -a "$LOG"
}
stage() {  # stage NAME CAP CMD...: run with a time cap (SIGINT), log command, time and exit code
    local name=$1 cap=$2
    shift 2
    if [ $COLLECT = 1 ]; then  # list what a pytest stage would run, run nothing
        case " $* " in
            *" -m pytest "*)
                echo "== $name"
                local out rc=0
                out=$("$@" --collect-only -q 2>&1) || rc=$?
                echo "$out" | grep '::'
                echo "== $name: collect exit $rc"
                [ $rc -eq 0 ] || echo "$out" | tail -20 ;;
            *) echo "== $name: not a pytest stage: $*" ;;
        esac
        return 0
    fi
    local room=$(($(left) - RESERVE))
    [ "$cap" -gt "$room" ] && cap=$room
    if [ "$cap" -le 5 ]; then
        echo "== $name: skipped, no time left" | tee -a "$LOG"
        return 0
    fi
    echo "== $name (cap ${cap}s): $*" | tee -a "$LOG"
    local t0 rc=0
    t0=$(date +%s)
    # benchmarks past the deadline skip (bench/conftest.py): the stage ends by itself, its JSON written
    local margin=$((cap / 4 < 30 ? cap / 4 : 30))
    BNFAST_BENCH_DEADLINE=$((t0 + cap - margin)) timeout -s INT -k 10 "$cap" "$@" >>"$LOG" 2>&1 || rc=$?
    local took=$(($(date +%s) - t0)) cut=""
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        cut=" (CUT: time cap)"
    elif [[ " $* " == *" --benchmark-only "* ]] && [ $took -ge $((cap - margin)) ]; then
        cut=" (CUT: benchmarks past the deadline skipped)"
    fi
    echo "== $name: exit $rc after ${took}s$cut" | tee -a "$LOG"
    if [ -n "$cut" ]; then summarize; fi
}

if [ $COLLECT = 0 ]; then
    {
        echo "bnfast GPU run ($MODE), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "command: $COMMAND (budget ${BUDGET}s)"
        $PY -c 'import json, sys; print(" | ".join(f"{k} {v}" for k, v in json.load(open(sys.argv[1])).items()))' \
            "$DEST/env.json"
        nvidia-smi || true
    } >"$LOG" 2>&1
    cat "$LOG"
fi

# the pieces of the stages' commands
BENCH=($PY -m pytest -p no:cacheprovider --benchmark-only --benchmark-columns=min,median,iqr,rounds)
# shellcheck disable=SC2206
EXTRA=(${BENCH_ARGS:-})
ON_CUDA=(env BNFAST_TEST_DEVICE=cuda TRITON_INTERPRET=0)
TESTS=($PY -m pytest --tb=short -p no:cacheprovider -rfE)
SANITY=(env CUDA_LAUNCH_BLOCKING=1 $PY -m bench.sanity check --json "$DEST/sanity.json")
node_ids() { grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$1" | sed 's/[[:space:]]*$//'; }
mapfile -t HEADLINE_TESTS < <(node_ids bench/headline_tests.txt)

# the eager entry's C++ node (bnfast.native): compiled once per machine (~20-30 s, cached), before any timed or
# capped stage needs it; without a compiler the stages run the torch.autograd.Function entry (logged here)
[ $COLLECT = 1 ] || stage native 90 $PY -m bnfast.native
case $MODE in
    headline)
        stage sanity 45 "${SANITY[@]}"
        stage bn 200 "${BENCH[@]}" bench/test_batch_norm.py --bench-set headline --benchmark-json="$DEST/bench-bn.json" \
            "${EXTRA[@]}"
        stage mnist 45 "${BENCH[@]}" bench/test_mnist_step.py --bench-set headline \
            --benchmark-json="$DEST/bench-mnist.json" "${EXTRA[@]}"
        stage parity 999 "${ON_CUDA[@]}" "${TESTS[@]}" --junitxml="$DEST/parity.xml" "${HEADLINE_TESTS[@]}"
        ;;
    full)
        stage sanity 45 "${SANITY[@]}"
        # the rest of the matrix takes all but 240 s (the other benchmarks 120 s, the tests what is left)
        stage bn $(($(left) - 240)) "${BENCH[@]}" bench/test_batch_norm.py --bench-set rest \
            --benchmark-json="$DEST/bench-bn-rest.json" "${EXTRA[@]}"
        stage other 120 "${BENCH[@]}" bench/test_mnist_step.py bench/test_sync_batch_norm.py bench/test_variants.py \
            bench/test_host_overhead.py --bench-set rest --benchmark-json="$DEST/bench-other-rest.json" "${EXTRA[@]}"
        deselect=()
        for id in "${HEADLINE_TESTS[@]}"; do deselect+=(--deselect "$id"); done
        # bench's own CPU tests and the kernel report (no GPU needed) stay out; a module that imports a package
        # this machine lacks is reported as a collection error, the others run
        stage parity 9999 "${ON_CUDA[@]}" "${TESTS[@]}" --junitxml="$DEST/parity-rest.xml" tests \
            --continue-on-collection-errors --ignore=tests/test_kernel_report.py --ignore=tests/test_bench_smoke.py \
            --ignore=tests/test_headline.py "${deselect[@]}"
        ;;
    select)
        if [ "${SELECT:0:1}" = @ ]; then
            [ -r "${SELECT:1}" ] || { echo "run_gpu.sh: --select: cannot read ${SELECT:1}" >&2; exit 2; }
            mapfile -t ids < <(node_ids "${SELECT:1}")
            bench_ids=() test_ids=()
            for id in "${ids[@]}"; do
                case $id in bench/*) bench_ids+=("$id") ;; *) test_ids+=("$id") ;; esac
            done
            [ ${#bench_ids[@]} -gt 0 ] && stage bn 9999 "${BENCH[@]}" --bench-set full \
                --benchmark-json="$DEST/bench-select.json" "${EXTRA[@]}" "${bench_ids[@]}"
            [ ${#test_ids[@]} -gt 0 ] && stage parity 9999 "${ON_CUDA[@]}" "${TESTS[@]}" \
                --junitxml="$DEST/parity-select.xml" "${test_ids[@]}"
        else
            stage bn 9999 "${BENCH[@]}" bench --bench-set full -k "$SELECT" --benchmark-json="$DEST/bench-select.json" \
                "${EXTRA[@]}"
        fi
        ;;
esac
[ $COLLECT = 1 ] && exit 0
summarize
echo "== total $(($(date +%s) - START))s; results in $DEST" | tee -a "$LOG"
