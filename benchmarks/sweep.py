"""A hyperparameter sweep of the demo's marketing adapter: one fleet with successive halving, against
the same configurations trained one after another and against one fleet that stops none.

    python benchmarks/sweep.py                                   # 4 learning rates x 4 ranks, the demo's task
    python benchmarks/sweep.py --lrs 5e-3,1e-3 --ranks 4 --steps 4 --min-steps 1 --train-size 16 \
        --test-size 4 --json r.json                              # smallest (tests/test_benchmarks.py)

Three ways to train the same grid on the tiny InternVL-style model (demo/): each configuration
alone, one after another (a fleet of one each: what a user does without a sweep); all of them as
one fleet that trains every trial its whole budget; and `lorafleet sweep`'s fleet, which stops the
worst at the rungs and starts queued trials in their slots. It reports the wall time of each, and
the sweep's winner against the best of the full grid by final held-out loss (the fleet without
stopping trains every configuration exactly as alone: tests/sweep/test_sweep.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lorafleet.config import FleetSpec
from lorafleet.demo.synthetic import TASKS, write_task
from lorafleet.fleet_dir import FleetDir
from lorafleet.models.tiny import build_tiny_internvl
from lorafleet.sweep.run import run_sweep
from lorafleet.sweep.space import sweep_spec_from_dict
from lorafleet.train.trainer import FleetTrainer

MARKETING = next(task for task in TASKS if task.department == "marketing")


def sweep_file(root: Path, output: Path, args: argparse.Namespace) -> dict:
    return {
        "base": str(FleetDir(root).base),
        "output": str(output),
        "department": "marketing",
        "adapter": {
            "data": str(root / "data" / "marketing.jsonl"),
            "eval_data": str(root / "data" / "marketing-test.jsonl"),
            "steps": args.steps,
            "alpha": 32,
            "micro_batch_size": args.micro_batch_size,
            "schedule": "cosine",
            "warmup_steps": max(args.steps // 10, 1) if args.steps > 1 else 0,
        },
        "space": {
            "learning_rate": {"choice": [float(lr) for lr in args.lrs.split(",")]},
            "rank": {"choice": [int(rank) for rank in args.ranks.split(",")]},
        },
        "sampler": "grid",
        "asha": {"min_steps": args.min_steps, "reduction_factor": args.reduction_factor},
        "fleet": {"max_concurrent": args.max_concurrent},
    }


def final_eval_losses(output: str) -> dict[str, float]:
    finals = {}
    for line in (Path(output) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "eval_loss" in record:
            finals[record["adapter"]] = record["eval_loss"]
    return finals


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lrs", default="2e-2,5e-3,1e-3,2e-4")
    parser.add_argument("--ranks", default="4,8,16,32")
    parser.add_argument("--steps", type=int, default=27, help="each trial's budget (optimizer steps)")
    parser.add_argument("--min-steps", type=int, default=9, help="the first rung (one at step 3 favoured the top rate)")
    parser.add_argument("--reduction-factor", type=int, default=3)
    parser.add_argument("--max-concurrent", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--train-size", type=int, default=64)
    parser.add_argument("--test-size", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        build_tiny_internvl(FleetDir(root).base, seed=0)
        write_task(MARKETING, root / "data", args.train_size, seed=0, split="train")
        write_task(MARKETING, root / "data", args.test_size, seed=0, split="test")
        sweep = sweep_spec_from_dict(sweep_file(root, root / "sweep", args), "benchmarks/sweep.py")
        every = sweep_spec_from_dict(sweep_file(root, root / "fleet", args), "benchmarks/sweep.py").fleet

        def one_after_another() -> None:
            for adapter in every.adapters:
                output = str(root / "alone" / adapter.name)
                alone = FleetSpec(base=every.base, output=output, adapters=[adapter], checkpoint_every=0)
                FleetTrainer(alone, progress=False).run()

        sequential_s = timed(one_after_another)
        fleet_s = timed(lambda: FleetTrainer(every, progress=False).run())
        result = {}
        sweep_s = timed(lambda: result.update(outcome=run_sweep(sweep, progress=False)))
        grid = final_eval_losses(every.output)
        best = min(grid, key=grid.get)
        outcome = result["outcome"]
        winner = next(trial for trial in outcome.trials if trial.name == outcome.winner)
        summary = {
            "trials": len(grid),
            "steps": args.steps,
            "rungs": sweep.rungs.steps(),
            "wall_s": {"sequential": sequential_s, "fleet_no_stopping": fleet_s, "sweep": sweep_s},
            "speedup_vs_sequential": sequential_s / sweep_s,
            "speedup_vs_fleet": fleet_s / sweep_s,
            "stopped": sum(t.stopped_at is not None for t in outcome.trials),
            # its held-out loss in the sweep, and the same configuration's in the fleet that stops none
            "winner": {"trial": winner.name, "values": winner.values, "eval_loss": winner.final},
            "winner_in_full_grid_eval_loss": grid[winner.name],
            "best_of_grid": {"trial": best, "values": sweep.trials[best], "eval_loss": grid[best]},
            "same_winner": outcome.winner == best,
        }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
