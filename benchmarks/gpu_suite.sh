#!/usr/bin/env bash
# Every GPU check and measurement of the training and serving issues in one run that fits a short
# lease: highest priority first, each row under its own timeout and all under a global deadline
# (DEADLINE seconds, default 330), results packed into $OUT/gpu-results.tgz after every row so that
# a kill still returns what finished, and a one-line summary per row in summary.txt (also printed).
#
#   OUT=/tmp/out benchmarks/gpu_suite.sh              # from the repository root, on a CUDA machine
#   ROWS="tests t-1.5b-4x1" benchmarks/gpu_suite.sh   # only some rows
#
# Wheels in .whl/ (if any) are installed to /tmp/site first: for a machine whose transformers/peft
# are older than the suite needs (pip download them elsewhere, carry the folder).
set -u
DEADLINE=${DEADLINE:-330}
OUT=${OUT:-gpu-results}
R=/tmp/lorafleet-gpu
rm -rf $R && mkdir -p $R "$OUT"
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >$R/pip.log 2>&1 || { cat $R/pip.log; exit 1; }
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:$PWD:$PWD/benchmarks:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi >$R/nvidia-smi.txt 2>&1
python3 -c "import torch,transformers,peft;print(torch.__version__,transformers.__version__,peft.__version__,torch.cuda.get_device_name())" \
    >$R/versions.txt 2>&1
cat $R/versions.txt

pack() { tar -czf "$OUT/gpu-results.tgz" -C /tmp lorafleet-gpu 2>/dev/null; }
wanted() { [ -z "${ROWS:-}" ] || [[ " $ROWS " == *" $1 "* ]]; }
row() {  # row NAME MAXSECONDS COMMAND...
    local name=$1 max=$2
    shift 2
    wanted "$name" || return 0
    local left=$((DEADLINE - SECONDS - 5))
    if [ $left -lt 20 ]; then
        echo "$name: skipped, no time left ($SECONDS s used)" | tee -a $R/summary.txt
        return
    fi
    [ "$max" -gt $left ] && max=$left
    local t0=$SECONDS
    timeout "$max" "$@" >$R/$name.log 2>&1
    local rc=$?
    local said
    said=$(grep -E 'tok/s|engine_tok_s|passed|failed|error|Error' $R/$name.log | tail -n 2 | tr '\n' ' ' | cut -c1-400)
    echo "$name: rc=$rc $((SECONDS - t0))s $said" | tee -a $R/summary.txt
    pack
}

T="python3 benchmarks/train_throughput.py"
S="python3 benchmarks/serve_throughput.py"
M15=${M15:-qwen2.5-1.5b} M7=${M7:-qwen2.5-7b}
# Highest priority first: under the default deadline the last rows are skipped on a slow start;
# run them with ROWS="..." in a second call.
row tests 120 python3 -m pytest -q -p no:cacheprovider tests/train/test_gpu.py tests/serve/test_decode.py \
    tests/adapters/test_fused.py
row t-1.5b-4x1 70 $T --model $M15 --adapters 4 --seqs 1 --steps 8 --warmup 3 --json $R/t-1.5b-4x1.json
row serve-1.5b 90 $S --model $M15 --json $R/serve-1.5b.json
row t-7b-4x2 90 $T --model $M7 --adapters 4 --seqs 2 --steps 6 --warmup 3 --json $R/t-7b-4x2.json
row serve-1.5b-32-adapters 60 $S --model $M15 --adapters 32 --engine-only --json $R/serve-1.5b-32.json
row t-7b-4x1 80 $T --model $M7 --adapters 4 --seqs 1 --steps 6 --warmup 3 --json $R/t-7b-4x1.json
row t-1.5b-mix-pad 45 $T --model $M15 --min-len 64 --seq-len 2048 --skip-peft --steps 6 --warmup 3 \
    --json $R/t-1.5b-mix-pad.json
row t-1.5b-mix-pack 45 $T --model $M15 --min-len 64 --seq-len 2048 --skip-peft --steps 6 --warmup 3 --packing \
    --json $R/t-1.5b-mix-pack.json
row t-7b-8x4-ckpt 60 $T --model $M7 --adapters 8 --seqs 4 --steps 4 --warmup 3 --skip-peft --activation-checkpointing \
    --json $R/t-7b-8x4-ckpt.json
row serve-7b 90 $S --model $M7 --engine-only --json $R/serve-7b.json
row t-1.5b-4x1-compiled 100 $T --model $M15 --adapters 4 --seqs 1 --steps 8 --warmup 4 --skip-peft --compile \
    --json $R/t-1.5b-4x1-compiled.json
row profile-1.5b 50 python3 benchmarks/profile_train.py --model $M15 --adapters 4 --seqs 1
echo "total ${SECONDS}s" | tee -a $R/summary.txt
pack
