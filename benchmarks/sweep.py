"""A hyperparameter sweep: one fleet with successive halving, against the same configurations
trained one after another with peft and against one fleet that stops none.

    python benchmarks/sweep.py                                   # 4 learning rates x 4 ranks, the demo's task
    python benchmarks/sweep.py --model qwen2.5-1.5b --seq-len 512 # CUDA: a random-weight Qwen2.5, synthetic chats
    python benchmarks/sweep.py --lrs 5e-3,1e-3 --ranks 4 --steps 4 --min-steps 1 --train-size 16 \
        --test-size 4 --json r.json                              # smallest (tests/test_benchmarks.py)

Three ways to train the same grid on one base loaded once: each configuration alone with peft, one
after another (a plain loop: AdamW, transformers' schedule, clipping, the held-out loss once at the
end: what a user writes without a sweep); all of them as one lorafleet fleet that trains every
trial its whole budget; and `lorafleet sweep`'s fleet, which stops the worst at the rungs and
starts queued trials in their slots. It reports the wall time of each, and the sweep's winner
against the best of the full grid by final held-out loss (the fleet without stopping trains every
configuration exactly as alone: tests/sweep/test_sweep.py). `--model demo` is the demo's marketing
task on the tiny InternVL-style model; any other model is a random-weight Qwen2 of that size
(benchmarks/train_throughput.py's presets) on synthetic chats of about --seq-len tokens.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from train_throughput import PRESETS, build_base, write_data
from transformers import get_scheduler

from lorafleet.adapters.peft_io import peft_target_modules
from lorafleet.config import AdapterSpec
from lorafleet.data.batch import IGNORE_INDEX, collate
from lorafleet.data.dataset import load_examples
from lorafleet.data.stream import ExampleStream
from lorafleet.demo.synthetic import TASKS, write_task
from lorafleet.fleet_dir import FleetDir
from lorafleet.models.attention import training_attention
from lorafleet.models.loading import FrozenBase, load_base
from lorafleet.models.tiny import build_tiny_internvl
from lorafleet.sweep.run import run_sweep
from lorafleet.sweep.space import sweep_spec_from_dict
from lorafleet.train.admission import target_modules
from lorafleet.train.trainer import FleetTrainer

MARKETING = next(task for task in TASKS if task.department == "marketing")
# transformers' names for the schedules an adapter spec names (as the fleet's own schedule uses)
SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def sweep_file(base: str, data: tuple[Path, Path], output: Path, args: argparse.Namespace) -> dict:
    return {
        "base": base,
        "output": str(output),
        "department": "marketing",
        "adapter": {
            "data": str(data[0]),
            "eval_data": str(data[1]),
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
        # no checkpoints in either timed run, as docs/benchmarks.md measured (a sweep keeps one every min_steps)
        "fleet": {"max_concurrent": args.max_concurrent, "checkpoint_every": 0},
    }


def prepare(root: Path, args: argparse.Namespace) -> tuple[FrozenBase, tuple[Path, Path]]:
    """The base (loaded once, on the GPU when there is one) and the training and held-out files."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = root / "data"
    data.mkdir()
    if args.model == "demo":
        build_tiny_internvl(FleetDir(root).base, seed=0)
        write_task(MARKETING, data, args.train_size, seed=0, split="train")
        write_task(MARKETING, data, args.test_size, seed=0, split="test")
        base = load_base(FleetDir(root).base, device=str(device))
        return base, (data / "marketing.jsonl", data / "marketing-test.jsonl")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    train = write_data(data, "train", args.train_size, args.seq_len, seed=0)
    test = write_data(data, "test", args.test_size, args.seq_len, seed=1)
    return build_base(args.model, device, dtype), (train, test)


def synchronize(base: FrozenBase) -> None:
    if base.device.type == "cuda":
        torch.cuda.synchronize(base.device)


def peft_one_after_another(base: FrozenBase, adapters: list[AdapterSpec], held_out: Path) -> dict[str, float]:
    """Each configuration alone with peft on the shared base, one after another; its final held-out
    loss (the mean over every held-out answer token, as the fleet's eval_loss). The data is read
    once for all configurations, as the sweep reads it once for all its trials."""
    finals = {}
    examples, _ = load_examples(adapters[0].data, base)
    held_out_examples, _ = load_examples(held_out, base)
    for spec in adapters:
        config = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=peft_target_modules(target_modules(base, spec), base.language_prefix),
        )
        model = get_peft_model(base.model, config)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
        scheduler = get_scheduler(
            SCHEDULES[spec.schedule], optimizer, num_warmup_steps=spec.warmup_steps, num_training_steps=spec.steps
        )
        stream = ExampleStream(examples, spec.micro_batch_size, spec.seed, spec.shuffle)
        model.train()
        for _ in range(spec.steps):
            batch = collate(stream.next_micro_batch(), base.tokenizer.pad_token_id).to(base.device)
            with training_attention():
                loss = model(**batch.model_inputs(), labels=batch.labels).loss
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()  # a loop that logs its loss reads it every step, as the fleet does
        finals[spec.name] = held_out_loss(model, base, held_out_examples, spec.micro_batch_size)
        base.model = model.unload()
    synchronize(base)
    return finals


@torch.no_grad()
def held_out_loss(model, base: FrozenBase, examples: list, batch_size: int) -> float:
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], base.tokenizer.pad_token_id).to(base.device)
        logits = model(**batch.model_inputs()).logits[:, :-1].float()
        labels = batch.labels[:, 1:]
        total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        tokens += int((labels != IGNORE_INDEX).sum())
    return float(total) / max(tokens, 1)


def final_eval_losses(output: str) -> dict[str, float]:
    finals = {}
    for line in (Path(output) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "eval_loss" in record:
            finals[record["adapter"]] = record["eval_loss"]
    return finals


def timed(base: FrozenBase, run) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all its threads) of `run`: on a CPU shared with
    other work the second moves far less than the first."""
    synchronize(base)
    started, cpu = time.perf_counter(), time.process_time()
    run()
    synchronize(base)
    return time.perf_counter() - started, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["demo", *PRESETS], default="demo")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per synthetic chat (not --model demo)")
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
        base, data = prepare(root, args)
        where = "benchmarks/sweep.py"
        sweep = sweep_spec_from_dict(sweep_file(str(base.path), data, root / "sweep", args), where)
        marketing = sweep.departments["marketing"]
        every = sweep_spec_from_dict(sweep_file(str(base.path), data, root / "fleet", args), where).fleet
        peft_finals = {}
        peft_s, peft_cpu = timed(
            base, lambda: peft_finals.update(peft_one_after_another(base, every.adapters, data[1]))
        )
        fleet_s, fleet_cpu = timed(base, lambda: FleetTrainer(every, base=base, progress=False).run())
        result = {}
        sweep_s, sweep_cpu = timed(
            base, lambda: result.update(outcome=run_sweep(sweep, progress=False, base=base)["marketing"])
        )
        grid = final_eval_losses(every.output)
        best, best_with_peft = min(grid, key=grid.get), min(peft_finals, key=peft_finals.get)
        outcome = result["outcome"]
        winner = next(trial for trial in outcome.trials if trial.name == outcome.winner)
        summary = {
            "model": args.model,
            "device": str(base.device),
            "trials": len(grid),
            "steps": args.steps,
            "rungs": marketing.rungs.steps(),
            "wall_s": {"peft_one_after_another": peft_s, "fleet_no_stopping": fleet_s, "sweep": sweep_s},
            "cpu_s": {"peft_one_after_another": peft_cpu, "fleet_no_stopping": fleet_cpu, "sweep": sweep_cpu},
            "speedup_vs_peft": peft_s / sweep_s,
            "speedup_vs_fleet": fleet_s / sweep_s,
            "cpu_ratio_vs_peft": peft_cpu / sweep_cpu,
            "stopped": sum(t.stopped_at is not None for t in outcome.trials),
            # its held-out loss in the sweep, and the same configuration's in the fleet that stops none
            "winner": {"trial": winner.name, "values": winner.values, "eval_loss": winner.final},
            "winner_in_full_grid_eval_loss": grid[winner.name],
            "best_of_grid": {"trial": best, "values": marketing.trials[best], "eval_loss": grid[best]},
            "same_winner": outcome.winner == best,
            # peft's own grid (its dropout and initial weights drawn by peft, not the fleet's seeds)
            "best_with_peft": {"trial": best_with_peft, "eval_loss": peft_finals[best_with_peft]},
            "peft_eval_loss": peft_finals,
        }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
