#!/usr/bin/env bash
# A short check of RecForge's PyTorch models on one CUDA GPU (under 11 minutes on one GPU):
#
#   1. the GPU and the PyTorch build (stops here, with a message, when there is no CUDA GPU);
#   2. SASRec (YAML defaults) on Amazon Beauty with device=cuda, seeds 0, 1, 2 run side by side on
#      the GPU, each stopped after SASREC_BUDGET seconds of training at most (best weights kept):
#      seconds per epoch and test NDCG@10 / HR@10 against the CPU figures of BENCHMARKS.md;
#   3. LightGCN on Gowalla with device=cuda, lr 1e-2, batch 8192 and a cosine schedule over as many
#      epochs as fit in LIGHTGCN_BUDGET seconds of training: Recall@20 / NDCG@20;
#   4. the evaluation benchmark (benchmarks/bench_eval.py) with the model and the ranking on the GPU;
#   5. language-model scoring and LoRA training tokens/s (benchmarks/llm_speed.py; float32 and
#      bfloat16; needs the llm extra; at most LLM_LIMIT seconds, default 180).
#
# Results: benchmarks/results/gpu_check_<date>.json (the summary) and gpu_check_<date>_*.json (each
# step), a log beside them. Exit status: 0 all done, 1 a step failed or ran out of time, 3 no GPU.
#
#   bash benchmarks/gpu_check.sh [--help]
#
# Environment: PYTHON (default .venv/bin/python; it needs a CUDA build of PyTorch), BEAUTY (default
# ../shared/data/amazon-beauty/Beauty.txt), GOWALLA (default ../shared/data/gowalla), SASREC_BUDGET
# (seconds, default 110), LIGHTGCN_BUDGET (seconds, default 210), SEQUENTIAL_SEEDS=1 to run the three
# SASRec seeds one after the other (cleaner seconds per epoch; about 4 more minutes), DEVICE (default
# cuda; DEVICE=cpu with small BEAUTY / GOWALLA files and budgets is a dry run of the plumbing only),
# EVAL_REPEATS (default 5).
set -u
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"
    exit 0
fi

PYTHON=${PYTHON:-.venv/bin/python}
BEAUTY=${BEAUTY:-../shared/data/amazon-beauty/Beauty.txt}
GOWALLA=${GOWALLA:-../shared/data/gowalla}
SASREC_BUDGET=${SASREC_BUDGET:-110}
LIGHTGCN_BUDGET=${LIGHTGCN_BUDGET:-210}
DEVICE=${DEVICE:-cuda}
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=benchmarks/results
PREFIX=$OUT/gpu_check_$STAMP
HELPER=benchmarks/gpu_check.py
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

if [[ ! -x "$PYTHON" ]] && ! command -v "$PYTHON" > /dev/null; then
    echo "gpu_check: no Python at $PYTHON; build the environment (make venv) or set PYTHON" >&2
    exit 3
fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" "$HELPER" info
status=$?
if [[ $status -ne 0 && $DEVICE == cuda* ]]; then
    exit 3  # the helper said why (no CUDA GPU, or a CPU build of PyTorch)
fi
mkdir -p "$OUT"
if [[ $status -eq 0 ]]; then
    "$PYTHON" "$HELPER" info --out "${PREFIX}_info.json" > /dev/null
else
    echo "gpu_check: dry run on DEVICE=$DEVICE (no GPU): the figures below say nothing about a GPU"
    echo "{\"gpu\": \"none (dry run on $DEVICE)\"}" > "${PREFIX}_info.json"
fi
for f in "$BEAUTY" "$GOWALLA"; do
    [[ -e "$f" ]] || echo "gpu_check: warning: $f not found; its step will fail (set BEAUTY / GOWALLA)" >&2
done
LOG=${PREFIX}.log
failed=0
t0=$SECONDS
step() {  # step NAME TIMEOUT_SECONDS COMMAND...: run with a hard time limit, log, remember failures
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s)"
    local before
    before=$(wc -l < "$LOG" 2> /dev/null || echo 0)
    timeout --signal=TERM --kill-after=15 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    tail -n +$((before + 1)) "$LOG" | grep -E "^(SASRec|LightGCN|full-ranking)" | sed 's/^/   /'
    if [[ $rc -ne 0 ]]; then
        echo "   $name FAILED (exit $rc; $( [[ $rc -eq 124 ]] && echo 'time limit' || echo "see $LOG"))"
        failed=1
    fi
}

# 2. SASRec on Beauty, three seeds (side by side unless SEQUENTIAL_SEEDS=1)
SAS_LIMIT=$((SASREC_BUDGET + 90))
concurrent=--concurrent-seeds
if [[ "${SEQUENTIAL_SEEDS:-0}" == "1" ]]; then
    concurrent=
    for seed in 0 1 2; do
        step "SASRec seed $seed" $SAS_LIMIT "$PYTHON" $HELPER sasrec --seed $seed --device "$DEVICE" \
            --budget "$SASREC_BUDGET" --data "$BEAUTY" --out "${PREFIX}_sasrec_s$seed.json"
    done
else
    echo "== SASRec on Beauty, seeds 0 1 2 side by side (at most ${SAS_LIMIT}s)"
    pids=()
    for seed in 0 1 2; do
        timeout --signal=TERM --kill-after=15 $SAS_LIMIT "$PYTHON" $HELPER sasrec --seed $seed --device "$DEVICE" \
            --budget "$SASREC_BUDGET" --data "$BEAUTY" --out "${PREFIX}_sasrec_s$seed.json" \
            > "${PREFIX}_sasrec_s$seed.log" 2>&1 &
        pids+=($!)
    done
    for i in 0 1 2; do
        if ! wait "${pids[$i]}"; then
            echo "   SASRec seed $i FAILED (see ${PREFIX}_sasrec_s$i.log)"
            failed=1
        fi
        cat "${PREFIX}_sasrec_s$i.log" >> "$LOG"
        grep -E "^SASRec" "${PREFIX}_sasrec_s$i.log" | sed 's/^/   /'
        rm -f "${PREFIX}_sasrec_s$i.log"
    done
fi

# 3. LightGCN on Gowalla, cosine schedule within the budget
step "LightGCN on Gowalla" $((LIGHTGCN_BUDGET + 90)) "$PYTHON" $HELPER lightgcn --budget "$LIGHTGCN_BUDGET" \
    --device "$DEVICE" --data "$GOWALLA" --out "${PREFIX}_lightgcn.json"

# 4. evaluation speed with the scores and the ranking on the GPU
step "evaluation benchmark on the GPU" 120 "$PYTHON" benchmarks/bench_eval.py --device "$DEVICE" \
    --repeats "${EVAL_REPEATS:-5}" --out "${PREFIX}_eval.json"

# 5. language-model scoring and LoRA training tokens/s (needs the llm extra; skipped without it)
if "$PYTHON" -c "import peft, transformers" 2> /dev/null; then
    step "language-model tokens/s" "${LLM_LIMIT:-180}" "$PYTHON" benchmarks/llm_speed.py --device "$DEVICE" \
        --batch-sizes 1,8,32 --dtypes float32,bfloat16 --out "${PREFIX}_llm_speed.json"
else
    echo "== language-model tokens/s: skipped (the llm extra is not installed)"
fi

echo "== summary ($((SECONDS - t0)) s of steps)"
"$PYTHON" $HELPER summary --out "${PREFIX}.json" $concurrent "${PREFIX}_info.json" "${PREFIX}_sasrec_s0.json" \
    "${PREFIX}_sasrec_s1.json" "${PREFIX}_sasrec_s2.json" "${PREFIX}_lightgcn.json" "${PREFIX}_eval.json" || failed=1
echo "log: $LOG"
exit $failed
