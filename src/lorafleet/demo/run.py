"""`lorafleet demo`: the whole training story on the built-in tiny model, in a few CPU minutes.

It builds the tiny InternVL-style model, draws a dataset per department, checks it as a user
would (`lorafleet data check`), writes the fleet YAML a user would write, trains every adapter
together from it, and compares held-out accuracy of the base model and of each adapter (greedy
replies from the serving engine, as `lorafleet eval` decodes).
Everything lands in one directory (the layout `lorafleet serve` and later stages read): base/,
data/, fleet.yaml, adapters/<name>/, metrics.jsonl, report.html (the page `lorafleet train` writes
for every run), and the governance records: audit/ (the hash-chained log) and lorafleet.sqlite (the
lineage registry).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from lorafleet.adapters.fleet import LoRAFleet
from lorafleet.adapters.peft_io import load_adapter
from lorafleet.config import load_fleet_spec
from lorafleet.data.check import CheckReport, check_files, counting_base
from lorafleet.data.records import read_records
from lorafleet.demo.synthetic import TASKS, write_task
from lorafleet.eval.chat import exact_match_accuracy, reference_answers
from lorafleet.eval.greedy import generate_replies
from lorafleet.eval.run import BASE as BASE_MODEL
from lorafleet.eval.run import record_scores
from lorafleet.fleet_dir import BASE, FleetDir
from lorafleet.governance.audit import verify_chain
from lorafleet.models.loading import load_base
from lorafleet.models.tiny import build_tiny_internvl
from lorafleet.report import write_report
from lorafleet.train.trainer import train_fleet


@dataclass
class DemoRow:
    adapter: str
    base_accuracy: float
    adapter_accuracy: float


def write_fleet_yaml(out: Path, steps: int) -> Path:
    adapters = [
        {
            "name": task.department,
            "data": f"data/{task.department}.jsonl",
            "rank": 16,
            "alpha": 32,
            "learning_rate": 5e-3,
            "micro_batch_size": 8,
            "grad_accum": 1,
            "steps": steps,
            "warmup_steps": 10,
            "schedule": "cosine",
            "seed": index,
        }
        for index, task in enumerate(TASKS)
    ]
    spec = {"base": BASE, "output": ".", "checkpoint_every": 50, "adapters": adapters}
    path = out / "fleet.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_demo(
    out: str | Path,
    train_size: int = 1024,
    test_size: int = 60,
    steps: int = 1000,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
    preference_steps: int = 0,
) -> list[DemoRow]:
    """The demo; with `preference_steps`, also the preference stage (demo/preference.py)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log(f"[1/5] building the tiny InternVL-style model in {FleetDir(out).base}")
    build_tiny_internvl(FleetDir(out).base, seed=0)
    log(f"[2/5] drawing {train_size} training and {test_size} held-out pictures per department in {out / 'data'}")
    for task in TASKS:
        write_task(task, out / "data", train_size, seed=0, split="train")
        write_task(task, out / "data", test_size, seed=0, split="test")
    log("[3/5] checking each department's data (lorafleet data check)")
    for line in check_departments(out):
        log(line)
    spec_path = write_fleet_yaml(out, steps)
    log(f"[4/5] training {len(TASKS)} adapters together ({spec_path})")
    spec = load_fleet_spec(spec_path)
    _clear_previous_run(out)
    train_fleet(spec, progress=progress)
    report = write_report(out)  # as `lorafleet train` does, before the evaluation can fail
    log("[5/5] held-out accuracy, greedy decoding")
    rows = evaluate_fleet(out)
    record_demo_scores(out, rows)
    log(format_table(rows))
    if preference_steps:
        from lorafleet.demo.preference import describe, run_preference_stage

        log(f"[+] preference stage: DPO on {out / 'data'} pairs, {preference_steps} steps ({out / 'preference'})")
        log(describe(run_preference_stage(out, preference_steps, progress)))
        log(f"    report: {write_report(out / 'preference')}")
    log(audit_summary(out))
    log(f"done in {time.perf_counter() - started:.0f} s; adapters in {FleetDir(out).adapters}; report: {report}")
    return rows


def audit_summary(out: Path) -> str:
    """Where the run's audit log is, checked as `lorafleet audit verify` checks it."""
    report = verify_chain(out)
    return (
        f"audit log: {FleetDir(out).audit} valid, {report.entries} entries (lorafleet audit verify {out}); "
        f"lineage: lorafleet registry list --fleet {out}"
    )


def check_departments(out: Path) -> list[str]:
    """One line per department: its training file checked together with its held-out file."""
    base, tokenizer = counting_base(FleetDir(out).base)
    lines = []
    for task in TASKS:
        data = out / "data"
        report = check_files(
            [data / f"{task.department}.jsonl", data / f"{task.department}-test.jsonl"], base, tokenizer
        )
        lines.append(f"  {task.department}: {summarise_check(report)}")
    return lines


def summarise_check(report: CheckReport) -> str:
    train, test = report.files
    tokens = sorted(train.tokens + test.tokens)
    duplicates = len(train.duplicates) + len(test.duplicates)
    leaked = sum(len(overlap.matches) for overlap in report.overlaps)
    pii = sum(train.pii.values()) + sum(test.pii.values())
    return (
        f"{train.records} train + {test.records} held-out records, {tokens[0]}-{tokens[-1]} tokens each, "
        f"{report.errors} malformed, {duplicates} repeated records, {leaked} held-out records repeat "
        f"training ones, {pii} PII findings"
    )


def evaluate_fleet(out: Path) -> list[DemoRow]:
    base = load_base(FleetDir(out).base)
    fleet = LoRAFleet(base.model, base.language_prefix)
    rows = []
    for task in TASKS:
        load_adapter(fleet, task.department, FleetDir(out).adapter(task.department))
        records, _ = read_records(out / "data" / f"{task.department}-test.jsonl")
        answers = reference_answers(records)
        base_accuracy = exact_match_accuracy(generate_replies(base, fleet, None, records), answers)
        adapter_accuracy = exact_match_accuracy(generate_replies(base, fleet, task.department, records), answers)
        rows.append(DemoRow(task.department, base_accuracy, adapter_accuracy))
    return rows


def record_demo_scores(out: Path, rows: list[DemoRow]) -> None:
    """Each adapter's held-out accuracy, with the base's on the same file, into its registry record
    (as `lorafleet eval` records them), so the fleet says what each adapter adds without a rerun."""
    for row in rows:
        held_out = out / "data" / f"{row.adapter}-test.jsonl"
        scores = {row.adapter: {"accuracy": row.adapter_accuracy}, BASE_MODEL: {"accuracy": row.base_accuracy}}
        record_scores(out, held_out, "chat", scores)


def format_table(rows: list[DemoRow]) -> str:
    lines = [f"{'adapter':<12} {'base':>6} {'adapter':>8}", "-" * 28]
    lines += [f"{r.adapter:<12} {r.base_accuracy:>6.0%} {r.adapter_accuracy:>8.0%}" for r in rows]
    return "\n".join(lines)


def _clear_previous_run(out: Path) -> None:
    """A demo run always starts fresh: old checkpoints would otherwise ask for --resume."""
    for old in FleetDir(out).checkpoint_files():
        old.unlink()
