"""The demo's optional preference stage (`lorafleet demo --preference`).

Marketing's adapter names colours; the stage corrects it the way a department would: pairs of the
same picture and question, the right colour chosen and a wrong colour word rejected, trained with
DPO on top of the SFT adapter (init_from), against that adapter's own frozen weights as the
reference. It writes preference/ (fleet YAML, metrics, the `marketing-dpo` adapter) beside the
demo's main run and reports the held-out reward accuracy (how often the adapter now prefers the
right answer more than its starting point did) and the exact-match accuracy after the correction.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from lorafleet.adapters.fleet import LoRAFleet
from lorafleet.adapters.peft_io import load_adapter
from lorafleet.config import load_fleet_spec
from lorafleet.data.records import read_records
from lorafleet.demo.synthetic import COLOURS
from lorafleet.eval.chat import exact_match_accuracy, reference_answers
from lorafleet.eval.greedy import generate_replies
from lorafleet.fleet_dir import ADAPTERS, BASE, FleetDir
from lorafleet.models.loading import load_base
from lorafleet.train.trainer import train_fleet

DEPARTMENT = "marketing"
ADAPTER = f"{DEPARTMENT}-dpo"


@dataclass
class PreferenceResult:
    reward_accuracy_first: float  # held-out, after the first optimizer step
    reward_accuracy_last: float  # held-out, after the last
    accuracy_before: float  # exact match of the SFT adapter
    accuracy_after: float  # exact match of the corrected one


def write_pairs(source: Path, out: Path, seed: int) -> Path:
    """Each record of `source` as a pair: its answer chosen, another colour word rejected."""
    rng = random.Random(seed)
    lines = []
    for line in source.read_text().splitlines():
        record = json.loads(line)
        *prompt, answer = record["conversations"]
        wrong = rng.choice([colour for colour in COLOURS if colour != answer["value"]])
        lines.append(
            {
                "image": f"{record['image']}",
                "conversations": prompt,
                "chosen": answer["value"],
                "rejected": wrong,
            }
        )
    out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return out


def write_preference_yaml(out: Path, steps: int) -> Path:
    spec = {
        "base": f"../{BASE}",  # the demo fleet's, one directory up
        "output": ".",
        "checkpoint_every": 0,
        "adapters": [
            {
                "name": ADAPTER,
                "data": f"../data/{DEPARTMENT}-pairs.jsonl",
                "eval_data": f"../data/{DEPARTMENT}-pairs-test.jsonl",
                "eval_every": max(1, steps // 5),
                "objective": "dpo",
                "init_from": f"../{ADAPTERS}/{DEPARTMENT}",
                "reference": "init",
                "beta": 0.5,
                "learning_rate": 1e-3,
                "micro_batch_size": 8,
                "steps": steps,
            }
        ],
    }
    path = out / "preference" / "fleet.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_preference_stage(out: Path, steps: int = 30, progress: bool = True) -> PreferenceResult:
    data = out / "data"
    write_pairs(data / f"{DEPARTMENT}.jsonl", data / f"{DEPARTMENT}-pairs.jsonl", seed=1)
    write_pairs(data / f"{DEPARTMENT}-test.jsonl", data / f"{DEPARTMENT}-pairs-test.jsonl", seed=2)
    spec = load_fleet_spec(write_preference_yaml(out, steps))
    FleetDir(spec.output).metrics.unlink(missing_ok=True)
    train_fleet(spec, progress=progress)
    metrics = [json.loads(line) for line in FleetDir(spec.output).metrics.read_text().splitlines()]
    evaluated = [record["eval_reward_accuracy"] for record in metrics if "eval_reward_accuracy" in record]

    base = load_base(FleetDir(out).base)
    fleet = LoRAFleet(base.model, base.language_prefix)
    load_adapter(fleet, DEPARTMENT, FleetDir(out).adapter(DEPARTMENT))
    load_adapter(fleet, ADAPTER, FleetDir(spec.output).adapter(ADAPTER))
    records, _ = read_records(data / f"{DEPARTMENT}-test.jsonl")
    answers = reference_answers(records)
    before = exact_match_accuracy(generate_replies(base, fleet, DEPARTMENT, records), answers)
    after = exact_match_accuracy(generate_replies(base, fleet, ADAPTER, records), answers)
    return PreferenceResult(evaluated[0], evaluated[-1], before, after)


def describe(result: PreferenceResult) -> str:
    return (
        f"{ADAPTER} (DPO against {DEPARTMENT}'s own weights): held-out pairs preferring the right colour "
        f"{result.reward_accuracy_first:.0%} after the first step, {result.reward_accuracy_last:.0%} at the end; "
        f"exact match {result.accuracy_before:.0%} -> {result.accuracy_after:.0%}"
    )
