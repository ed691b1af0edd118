"""Tokens per second of the tiny fleet on one process and on N CPU processes (gloo), per mode.

    python benchmarks/distributed_cpu.py --processes 2 --steps 40
    python benchmarks/distributed_cpu.py --steps 2 --modes fsdp2 --json r.json   # smallest (the suite's)

Builds the tiny Qwen2-style model and four text adapters in a temporary directory, trains them with
`lorafleet train` (one process) and with `torchrun --nproc-per-node N -m lorafleet train` in
adapter mode, data mode and data mode over a sharded base (FSDP2), one intra-op thread per
process, and reads tokens and time from each run's metrics.jsonl (time from the trainer's start to
its last optimizer step: start-up not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from lorafleet.models.tiny import build_tiny_qwen2

WORDS = "red green blue circle square triangle invoice contract policy total one two three".split()


def write_chats(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w") as out:
        for _ in range(n):
            question = " ".join(rng.choices(WORDS, k=rng.randint(4, 24)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(2, 12)))
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            out.write(json.dumps({"messages": messages}) + "\n")


PARALLEL = {"adapter": "{mode: adapter}", "data": "{mode: data}", "fsdp2": "{mode: data, shard_base: true}"}


def fleet_yaml(root: Path, base: Path, mode: str, steps: int) -> Path:
    adapters = "".join(
        f"  - {{name: a{i}, data: d{i}.jsonl, rank: 8, micro_batch_size: 4, steps: {steps}, learning_rate: 0.003}}\n"
        for i in range(4)
    )
    path = root / f"fleet-{mode}.yaml"
    path.write_text(
        f"base: {base}\noutput: out-{mode}\nlength_multiple: 8\ncheckpoint_every: 0\n"
        f"parallel: {PARALLEL[mode]}\nadapters:\n{adapters}"
    )
    return path


def tokens_per_second(output: Path) -> float:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    last = {record["adapter"]: record for record in records}  # tokens are cumulative per adapter
    return sum(record["tokens"] for record in last.values()) / max(record["elapsed_s"] for record in records)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--modes", nargs="+", choices=PARALLEL, default=list(PARALLEL), help="the N-process runs")
    parser.add_argument("--json", type=Path, help="also write tokens/s of each run here")
    args = parser.parse_args()
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        base = build_tiny_qwen2(root / "base", seed=0)
        for i in range(4):
            write_chats(root / f"d{i}.jsonl", n=64, seed=i)
        runs = [("one process", "adapter", [sys.executable, "-m", "lorafleet"])]
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.processes}"]
        runs += [(f"{args.processes} processes, {mode}", mode, [*launcher, "-m", "lorafleet"]) for mode in args.modes]
        measured = {}
        for label, mode, command in runs:
            spec = fleet_yaml(root, base, mode, args.steps)
            output = root / f"out-{mode}"
            subprocess.run(["rm", "-rf", str(output)], check=True)
            done = subprocess.run([*command, "train", str(spec), "--no-progress"], cwd=root, env=environment,
                                  capture_output=True, text=True)  # fmt: skip
            if done.returncode != 0:
                sys.exit(f"{label}: `{' '.join(done.args)}` failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
            measured[label] = tokens_per_second(output)
            print(f"{label:<24} {measured[label]:8.0f} tokens/s")
    if args.json:
        result = {"processes": args.processes, "steps": args.steps, "tokens_per_s": measured}
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
