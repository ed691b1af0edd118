"""Reference log-probabilities of DPO pairs: computed once per pair and kept, or again every step.

    python benchmarks/preference_reference.py --steps 60 --pairs 48
    python benchmarks/preference_reference.py --steps 2 --pairs 8 --json r.json   # smallest (the suite's)

The fleet keeps each pair's reference log-probabilities from the first time it meets the pair
(the reference never changes); TRL's default computes them in every step. This trains the same DPO
adapter on the tiny model both ways — the second by emptying the trainer's cache after every step,
so that each step runs the no-grad reference pass over its pairs as TRL does — and reports the time
per optimizer step of each. With E epochs over the data, the cache saves (E - 1) / E of the
reference passes; each pass is a forward over 2 sequences per pair, about a third of the cost of
the training step's forward and backward over the same rows.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lorafleet.config import AdapterSpec, FleetSpec
from lorafleet.models.tiny import build_tiny_qwen2
from lorafleet.train.trainer import FleetTrainer


def write_pairs(path: Path, n: int) -> Path:
    colours = ["red", "blue", "green", "yellow", "white", "black", "orange"]
    lines = [
        {
            "messages": [{"role": "user", "content": f"Which colour is item {i}? Say it in a short sentence."}],
            "chosen": f"Item {i} is {colours[i % len(colours)]}, as the catalogue says.",
            "rejected": f"Item {i} is purple, I think.",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def seconds_per_step(base: Path, data: Path, output: Path, steps: int, keep_references: bool) -> float:
    adapter = AdapterSpec(name="dpo", data=str(data), objective="dpo", rank=8, micro_batch_size=8, steps=steps)
    spec = FleetSpec(base=str(base), output=str(output), adapters=[adapter], checkpoint_every=0)
    trainer = FleetTrainer(spec, progress=False)
    if not keep_references:
        trainer.on_step = lambda step: trainer.references.logps.clear()
    started = time.perf_counter()
    trainer.run()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--pairs", type=int, default=48, help="pairs in the data: epochs = steps * 8 / pairs")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        base = build_tiny_qwen2(root / "base")
        data = write_pairs(root / "pairs.jsonl", args.pairs)
        kept = seconds_per_step(base, data, root / "kept", args.steps, keep_references=True)
        every = seconds_per_step(base, data, root / "every", args.steps, keep_references=False)
    epochs = args.steps * 8 / args.pairs
    print(f"{args.steps} steps of 8 pairs over {args.pairs} pairs ({epochs:.1f} epochs), tiny model, CPU")
    print(f"reference kept per pair:         {kept * 1000:.1f} ms per step")
    print(f"reference again in every step:   {every * 1000:.1f} ms per step ({every / kept:.2f}x)")
    if args.json:
        result = {"steps": args.steps, "pairs": args.pairs, "epochs": epochs, "kept_ms_per_step": kept * 1000,
                  "every_step_ms_per_step": every * 1000, "every_step_over_kept": every / kept}  # fmt: skip
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
