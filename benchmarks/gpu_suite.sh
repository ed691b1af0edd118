#!/usr/bin/env bash
# Every GPU measurement the training-speed and serving issues ask for, in one go, each result as
# JSON in $OUT (default ./gpu-results), and the GPU tests first (the fused kernels, bf16 training,
# the memory model against the measured CUDA peak). Run from the repository root on a machine with
# an NVIDIA GPU, after `pip install -e '.[test]'`. A failing step is reported and the rest still run.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
failed=0

step() {  # step NAME COMMAND...: run, keep its log, note a failure
    local name=$1
    shift
    echo "== $name: $*"
    if ! "$@" >"$OUT/$name.log" 2>&1; then
        echo "   FAILED (see $OUT/$name.log)"
        failed=1
    fi
    tail -n 2 "$OUT/$name.log"
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
step gpu-tests python -m pytest -q tests/adapters/test_fused.py tests/train/test_gpu.py tests/train/test_equivalence.py

train() {  # train NAME ARGS...: one training-throughput row
    local name=$1
    shift
    step "train-$name" python benchmarks/train_throughput.py "$@" --json "$OUT/train-$name.json"
}
train 1.5b-4x1 --model qwen2.5-1.5b --adapters 4 --seqs 1
train 1.5b-4x1-fused --model qwen2.5-1.5b --adapters 4 --seqs 1 --fused
train 7b-4x1 --model qwen2.5-7b --adapters 4 --seqs 1
train 7b-4x2 --model qwen2.5-7b --adapters 4 --seqs 2
train 7b-4x2-fused --model qwen2.5-7b --adapters 4 --seqs 2 --fused
train 7b-8x4-recomputed --model qwen2.5-7b --adapters 8 --seqs 4 --activation-checkpointing --steps 10
train 1.5b-mixed-padded --model qwen2.5-1.5b --min-len 64 --seq-len 2048 --skip-peft
train 1.5b-mixed-packed --model qwen2.5-1.5b --min-len 64 --seq-len 2048 --skip-peft --packing

step serve-1.5b python benchmarks/serve_throughput.py --model qwen2.5-1.5b --json "$OUT/serve-1.5b.json"
exit $failed
