#!/usr/bin/env bash
# Every GPU check and measurement of the training and serving issues in one run that fits a short
# lease: highest priority first, each row under its own timeout and all under a global deadline
# (DEADLINE seconds, default 330), results packed into $OUT/gpu-results.tgz after every row so that
# a kill still returns what finished, and a one-line summary per row in summary.txt (also printed).
#
#   OUT=/tmp/out benchmarks/gpu_suite.sh              # from the repository root, on a CUDA machine
#   ROWS="tests t-1.5b-4x1" benchmarks/gpu_suite.sh   # only some rows (SKIP_ROWS: all but some)
#
# Wheels in .whl/ (if any) are installed to /tmp/site first: for a machine whose transformers/peft
# are older than the suite needs (pip download them elsewhere, carry the folder).
#
# The test suite runs it end to end on a CPU before any GPU run (tests/test_benchmarks.py), every
# row at its smallest size and without the packages the GPU machine's image lacks:
#   M15=tiny M7=tiny TRAIN_ARGS="--seq-len 64 --steps 2 --warmup 1" ... benchmarks/gpu_suite.sh
# TRAIN_ARGS, SERVE_ARGS, PROFILE_ARGS and SWEEP_ARGS are appended to every row of that script (the last value
# of an option wins), TEST_ARGS to the pytest row (e.g. -m gpu); TIME_FACTOR multiplies every
# row's time limit (a slow, shared CPU); RESULTS is where the rows' logs and JSON go.
set -u
DEADLINE=${DEADLINE:-330}
OUT=$(mkdir -p "${OUT:-gpu-results}" && cd "${OUT:-gpu-results}" && pwd)
R=${RESULTS:-/tmp/lorafleet-gpu}  # the rows' logs and JSON, packed into $OUT/gpu-results.tgz
rm -rf "$R" && mkdir -p "$R"
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >$R/pip.log 2>&1 || { cat $R/pip.log; exit 1; }
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:$PWD:$PWD/benchmarks:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi >$R/nvidia-smi.txt 2>&1
python3 -c "import torch, transformers, peft
device = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'
print(torch.__version__, transformers.__version__, peft.__version__, device)" >$R/versions.txt 2>&1
cat $R/versions.txt

pack() { tar -czf "$OUT/gpu-results.tgz" -C "$(dirname "$R")" "$(basename "$R")" 2>/dev/null; }
wanted() { { [ -z "${ROWS:-}" ] || [[ " $ROWS " == *" $1 "* ]]; } && [[ " ${SKIP_ROWS:-} " != *" $1 "* ]]; }
row() {  # row NAME MAXSECONDS COMMAND...
    local name=$1 max=$2
    shift 2
    wanted "$name" || return 0
    local left=$((DEADLINE - SECONDS - 5))
    if [ $left -lt 20 ]; then
        echo "$name: skipped, no time left ($SECONDS s used)" | tee -a $R/summary.txt
        return
    fi
    max=$((max * ${TIME_FACTOR:-1}))
    [ "$max" -gt $left ] && max=$left
    local t0=$SECONDS
    timeout "$max" "$@" >$R/$name.log 2>&1
    local rc=$?
    local said
    said=$(grep -E 'tok/s|engine_tok_s|passed|failed|skipped|error|Error' $R/$name.log | tail -n 2 | tr '\n' ' ' | cut -c1-400)
    echo "$name: rc=$rc $((SECONDS - t0))s $said" | tee -a $R/summary.txt
    pack
}

T="python3 benchmarks/train_throughput.py"
S="python3 benchmarks/serve_throughput.py"
P="python3 benchmarks/profile_train.py"
W="python3 benchmarks/sweep.py"
M15=${M15:-qwen2.5-1.5b} M7=${M7:-qwen2.5-7b}
TA=${TRAIN_ARGS:-} SA=${SERVE_ARGS:-} PA=${PROFILE_ARGS:-} WA=${SWEEP_ARGS:-}
# Highest priority first: under the default deadline the last rows are skipped on a slow start;
# run them with ROWS="..." in a second call.
row tests 120 python3 -m pytest -q -p no:cacheprovider tests/train/test_gpu.py tests/serve/test_decode.py \
    tests/adapters/test_fused.py ${TEST_ARGS:-}
row t-1.5b-4x1 70 $T --model $M15 --adapters 4 --seqs 1 --steps 8 --warmup 3 --json $R/t-1.5b-4x1.json $TA
row serve-1.5b 90 $S --model $M15 --json $R/serve-1.5b.json $SA
row t-7b-4x2 90 $T --model $M7 --adapters 4 --seqs 2 --steps 6 --warmup 3 --json $R/t-7b-4x2.json $TA
row serve-1.5b-32-adapters 60 $S --model $M15 --adapters 32 --engine-only --json $R/serve-1.5b-32.json $SA
row t-1.5b-2lora-2dora 70 $T --model $M15 --adapters 4 --dora 2 --seqs 1 --steps 8 --warmup 3 \
    --json $R/t-1.5b-2lora-2dora.json $TA
row t-7b-4x1 80 $T --model $M7 --adapters 4 --seqs 1 --steps 6 --warmup 3 --json $R/t-7b-4x1.json $TA
row t-1.5b-mix-pad 45 $T --model $M15 --min-len 64 --seq-len 2048 --skip-peft --steps 6 --warmup 3 \
    --json $R/t-1.5b-mix-pad.json $TA
row t-1.5b-mix-pack 45 $T --model $M15 --min-len 64 --seq-len 2048 --skip-peft --steps 6 --warmup 3 --packing \
    --json $R/t-1.5b-mix-pack.json $TA
row t-7b-8x4-ckpt 60 $T --model $M7 --adapters 8 --seqs 4 --steps 4 --warmup 3 --skip-peft --activation-checkpointing \
    --json $R/t-7b-8x4-ckpt.json $TA
row serve-7b 90 $S --model $M7 --engine-only --json $R/serve-7b.json $SA
row t-1.5b-4x1-compiled 100 $T --model $M15 --adapters 4 --seqs 1 --steps 8 --warmup 4 --skip-peft --compile \
    --json $R/t-1.5b-4x1-compiled.json $TA
# 16 trials (4 learning rates x 4 ranks) of 27 steps: peft one after another, one fleet, the sweep
row sweep-1.5b 120 $W --model $M15 --seq-len 512 --json $R/sweep-1.5b.json $WA
row profile-1.5b 50 $P --model $M15 --adapters 4 --seqs 1 --json $R/profile-1.5b.json $PA
echo "total ${SECONDS}s" | tee -a $R/summary.txt
pack
