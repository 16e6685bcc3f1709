#!/usr/bin/env bash
# The one-command GPU suite, the most valuable figures first: the pretraining step at batch 256
# (the official implementation, then ours, each with a profiled step), ours with CUDA graphs,
# batch 512, the tokenizer forward and the other training steps, then the build, the `cuda`
# tests, the segmentation step, the input pipeline, the kernels at the pretraining shapes and the
# kernel tests on the GPU with what time is left. Each step's cap is a share of the 9 minutes; a
# step stopped at its cap keeps the rows it measured.
#
#   bash bench/gpu_suite.sh              # on one GPU, in the repository root, in under 9 minutes
#   bash bench/gpu_suite.sh --dry-run    # the same steps on the CPU with tiny shapes (or BEITV2_GPU_SUITE_CPU=1)
#
# Needs only what the GPU machine has (python3 with torch, triton, timm, pytest; nvcc); no network.
# Writes bench/results/<date>-<gpu>.md (every step's status, the tables and the log tails) and
# appends to bench/results/kernels.csv and bench/results/train_step.csv. Every step runs under
# its own `timeout`, and the Python benchmarks get a time budget 15 s shorter than that
# (BEITV2_TIME_BUDGET), so they stop on their own and keep the rows they measured; the suite ends
# before BEITV2_SUITE_SECONDS.
# When $OUT is set (the device tool's folder of files to bring back), the results are copied
# there after every step.
#
# Environment:
#   BEITV2_SUITE_SECONDS   total time (default 525: under 9 minutes with room to spare; less
#                          shrinks every step's cap in proportion)
#   BEITV2_UNILM_DIR       a microsoft/unilm checkout for the official provider
#                          (default: outputs/unilm when it exists, an ignored folder that can travel)
#   BEITV2_GPU_SUITE_CPU   1: dry run on the CPU, results under /tmp/beitv2-gpu-suite-dry
#   BEITV2_SUITE_BUILD     0: skip building the CUDA extension (default: build, except in dry runs)
#   BEITV2_COMMIT          the commit to record where the tree has no .git (e.g. a copy on a lent GPU)
#   PYTHON                 the interpreter (default python3)
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
PY=${PYTHON:-python3}
TOTAL=${BEITV2_SUITE_SECONDS:-525}
START=$(date +%s)
DRY=${BEITV2_GPU_SUITE_CPU:-0}
if [ "${1:-}" = "--dry-run" ]; then DRY=1; fi

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}

if [ "$DRY" = 1 ]; then
    RESULTS=/tmp/beitv2-gpu-suite-dry
    DEVICE_ARGS=(--device cpu)
    BUILD=${BEITV2_SUITE_BUILD:-0}
else
    RESULTS=$REPO/bench/results
    DEVICE_ARGS=()
    BUILD=${BEITV2_SUITE_BUILD:-1}
fi
mkdir -p "$RESULTS"
LOGS=$(mktemp -d /tmp/beitv2-gpu-suite-logs.XXXXXX)
TABLES=$LOGS/tables.md  # the Markdown tables a step writes, moved into the report after it

GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo unknown)
SLUG=$(printf '%s' "$GPU" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
STAMP=$(date -u +%Y-%m-%d)
REPORT=$RESULTS/$STAMP-${SLUG:-unknown}.md
if [ "$DRY" != 1 ] && [ "$GPU" = cpu ]; then
    echo "no CUDA GPU visible; for a dry run on the CPU use: bash bench/gpu_suite.sh --dry-run" >&2
    exit 2
fi

UNILM=${BEITV2_UNILM_DIR:-}
if [ -z "$UNILM" ] && [ -d outputs/unilm ]; then UNILM=$REPO/outputs/unilm; fi
UNILM_ARGS=()
if [ -n "$UNILM" ]; then UNILM_ARGS=(--unilm-dir "$UNILM"); fi

elapsed() { echo $(($(date +%s) - START)); }
remaining() { echo $((TOTAL - $(elapsed))); }

bring_back() {
    # The device tool returns at most 8 files from $OUT: the report and the two CSVs.
    if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
        cp -f "$REPORT" "$OUT/" 2>/dev/null
        cp -f "$RESULTS/kernels.csv" "$RESULTS/train_step.csv" "$OUT/" 2>/dev/null
    fi
    return 0
}

# run_step NAME CAP_SECONDS COMMAND...: run under `timeout` for min(CAP, time left - 5 s), with
# BEITV2_TIME_BUDGET 15 s shorter; record its status, duration, output tail and tables in the report.
run_step() {
    local name=$1 cap=$2
    shift 2
    local left limit log rc began status
    # A suite given less than the full 525 s shrinks every step's cap in proportion.
    if [ "$TOTAL" -lt 525 ]; then cap=$((cap * TOTAL / 525)); fi
    left=$(($(remaining) - 5))
    limit=$((cap < left ? cap : left))
    log=$LOGS/$(printf '%s' "$name" | tr -cs 'A-Za-z0-9' '-').log
    if [ "$limit" -lt 15 ]; then
        printf '\n## %s\n\nskipped: %s s left of the suite'"'"'s %s s\n' "$name" "$(remaining)" "$TOTAL" >>"$REPORT"
        echo "== $name: skipped (no time left)" >&2
        return 0
    fi
    echo "== $name (at most ${limit} s)" >&2
    began=$(date +%s)
    BEITV2_TIME_BUDGET=$((limit - 15)) timeout --signal=INT --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    case $rc in
        0) status="passed" ;;
        124 | 137) status="stopped at its ${limit} s limit (what it measured is kept)" ;;
        *) status="failed (exit code $rc)" ;;
    esac
    echo "   $status after $(($(date +%s) - began)) s" >&2
    {
        # shellcheck disable=SC2016 # the backticks are Markdown
        printf '\n## %s\n\n%s after %s s: `%s`\n\n```\n' "$name" "$status" "$(($(date +%s) - began))" "$*"
        grep -v -e 'Warning' -e 'warnings.warn' "$log" | tail -n 60
        printf '```\n'
        if [ -f "$TABLES" ]; then cat "$TABLES"; fi
    } >>"$REPORT"
    rm -f "$TABLES"
    bring_back
    return 0
}

{
    printf '# GPU suite, %s, %s\n\n' "$STAMP" "$GPU"
    [ "$DRY" = 1 ] && printf '**Dry run on the CPU with tiny shapes: these are not GPU figures.**\n\n'
    printf -- '- commit: %s\n' "${BEITV2_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    printf -- '- %s\n' "$("$PY" -c 'import sys, torch, triton; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}")' 2>&1 | tail -n 1)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        printf -- '- nvidia-smi: %s\n' "$(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -n 1)"
    fi
    printf -- '- official implementation: %s\n' "${UNILM:-not given (set BEITV2_UNILM_DIR or carry outputs/unilm)}"
    printf -- '- time limit: %s s\n' "$TOTAL"
} >"$REPORT"
bring_back

run_step "kernel backends" 20 "$PY" -m kernels.env

# 1. The most valuable figures first: the pretraining step at batch 256, the official
#    implementation then ours, each followed by one profiled step (phase times from CUDA events,
#    device time by kernel category, the 15 longest kernels).
if [ "$DRY" = 1 ]; then
    SIZE_ARGS=(--model tiny --img-size 64 --warmup 1 --steps 2)
    BATCH_MAIN=(2)
    BATCH_LARGE=(4)
    TOKENIZER_BATCHES=(2)
else
    SIZE_ARGS=(--model base --warmup 3 --steps 10)
    BATCH_MAIN=(256)
    BATCH_LARGE=(512)
    TOKENIZER_BATCHES=(128)
fi
PROFILES=$LOGS/profiles
TRAIN_COMMON=(--csv "$RESULTS/train_step.csv" --markdown "$TABLES" "${DEVICE_ARGS[@]}" "${UNILM_ARGS[@]}")
run_step "training step: pretraining, official and ours, profiled" 170 \
    "$PY" -m bench.train_step --task pretrain --batch "${BATCH_MAIN[@]}" "${SIZE_ARGS[@]}" --providers official ours \
    --profile "$PROFILES" "${TRAIN_COMMON[@]}"

# 2. Ours with CUDA graphs (left out on the CPU), then both at batch 512.
run_step "training step: pretraining, ours with CUDA graphs" 80 \
    "$PY" -m bench.train_step --task pretrain --batch "${BATCH_MAIN[@]}" "${SIZE_ARGS[@]}" --providers ours-graphs \
    "${TRAIN_COMMON[@]}"
run_step "training step: pretraining at the larger batch" 110 \
    "$PY" -m bench.train_step --task pretrain --batch "${BATCH_LARGE[@]}" "${SIZE_ARGS[@]}" --providers official ours \
    "${TRAIN_COMMON[@]}"

# 3. The tokenizer forward (compiled, bf16 against the official under autocast), then the rest of
#    the pretraining providers, the tokenizer-training step.
run_step "training step: tokenizer forward" 60 \
    "$PY" -m bench.train_step --task tokenize --batch "${TOKENIZER_BATCHES[@]}" "${SIZE_ARGS[@]}" \
    --providers official ours ours-torch "${TRAIN_COMMON[@]}"
run_step "training step: pretraining, timm and our torch backend" 60 \
    "$PY" -m bench.train_step --task pretrain --batch "${BATCH_MAIN[@]}" "${SIZE_ARGS[@]}" --providers timm ours-torch \
    "${TRAIN_COMMON[@]}"
run_step "training step: tokenizer training" 60 \
    "$PY" -m bench.train_step --task tokenizer --batch "${TOKENIZER_BATCHES[@]}" "${SIZE_ARGS[@]}" \
    --providers official ours "${TRAIN_COMMON[@]}"

# 4. The CUDA extension (the Triton and PyTorch backends serve every op if it does not build) and
#    the tests that need the GPU.
if [ "$BUILD" = 1 ]; then
    ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2>/dev/null || echo "9.0")
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH} run_step "build the CUDA extension" 150 \
        "$PY" setup.py build_ext --inplace
fi
run_step "cuda tests" 60 "$PY" -m pytest -m cuda -q -p no:cacheprovider tests

# 5. The segmentation step (ViT-B + UperNet at 512 px, 1025 tokens): ours against the same model
#     with SDPA float-mask attention (the official mmseg stack does not install on current torch).
if [ "$DRY" = 1 ]; then
    SEGMENT_ARGS=(--model tiny --seg-img-size 64 --seg-batch 2 --warmup 1 --steps 2)
else
    SEGMENT_ARGS=(--model base --seg-img-size 512 --seg-batch 8 --warmup 3 --steps 10)
fi
run_step "training step: segmentation" 90 \
    "$PY" -m bench.train_step --task segment --providers ours ours-sdpa "${SEGMENT_ARGS[@]}" "${TRAIN_COMMON[@]}"

# 5b. The input pipeline at 224 px: the GPU-decode backend and our CPU workers (uint8 views),
#     2 workers each, against the official pipeline, on JPEGs written for the run.
if [ "$DRY" = 1 ]; then
    DATA_ARGS=(--num-images 64 --batch-size 8 --warmup 1 --device cpu)
else
    DATA_ARGS=(--num-images 2048 --batch-size 256 --warmup 1 --batches 6)
fi
run_step "data pipeline" 60 \
    "$PY" -m bench.data_pipeline --task pretrain --workers 2 --pipelines official ours-uint8 ours-gpu \
    "${DATA_ARGS[@]}" "${UNILM_ARGS[@]}" --markdown "$TABLES"

# 6. The kernels at the pretraining shapes (ViT-B, batch 256).
if [ "$DRY" = 1 ]; then
    KERNEL_ARGS=(--batch 2 --m 392 --no-memory)
else
    KERNEL_ARGS=(--batch 256)
fi
run_step "kernels at the pretraining shapes" 100 \
    "$PY" -m bench.bench_kernels codebook attention masked_ce "${KERNEL_ARGS[@]}" "${DEVICE_ARGS[@]}" \
    --csv "$RESULTS/kernels.csv" --markdown "$TABLES"

# 7. The kernel tests on the GPU (their fixtures run every backend there), with what is left.
if [ "$DRY" != 1 ]; then
    run_step "kernel tests on the GPU" 600 \
        "$PY" -m pytest -q -x -p no:cacheprovider -m "not slow" tests/test_codebook.py tests/test_attention.py \
        tests/test_masked_ce.py tests/test_kernels_framework.py
fi

printf '\nTotal: %s s of %s s.\n' "$(elapsed)" "$TOTAL" >>"$REPORT"
bring_back
rm -rf "$LOGS"
echo "report: $REPORT ($(elapsed) s)" >&2
