"""`lorafleet train`, `plan` and `report`: a fleet YAML trained, its memory predicted, its run drawn."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train the adapters of a fleet YAML together",
        description="Train every adapter of FLEET.yaml together in one batched pass over the frozen base.",
    )
    train.add_argument("fleet", type=Path, help="fleet spec (YAML): base, output, adapters")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(command="train", run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from lorafleet.config import load_fleet_spec
    from lorafleet.report import write_report
    from lorafleet.train.distributed import is_main_process
    from lorafleet.train.trainer import train_fleet

    spec = load_fleet_spec(args.fleet)
    result = train_fleet(spec, resume=args.resume, progress=not args.no_progress)
    if not is_main_process():  # under torchrun, process 0 reports for the whole fleet
        return 0
    for name, directory in result.adapters.items():
        losses = result.losses.get(name, [])
        last = f"final loss {losses[-1]:.4f}" if losses else ""
        print(f"{name}: {directory} {last}")
    for name, problems in result.skipped.items():
        print(f"{name}: skipped {len(problems)} bad records; first: {problems[0]}", file=sys.stderr)
    print(f"report: {write_report(spec.output)}")
    return 0


def add_plan_parser(commands: argparse._SubParsersAction) -> None:
    plan = commands.add_parser(
        "plan",
        help="predict a fleet's peak training memory and how many adapters fit",
        description="Read FLEET.yaml and its data (no weights are loaded) and predict peak memory per "
        "adapter, for the adapters trained together, and how many adapters like the largest fit the budget.",
    )
    plan.add_argument("fleet", type=Path, help="fleet spec (YAML)")
    plan.add_argument(
        "--budget-gb", type=float, help="memory to plan for (default: memory_budget_gb, or 90%% of this GPU)"
    )
    plan.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="compute dtype (default: what training would use: the spec's, else bfloat16 on a GPU, float32 on CPU)",
    )
    plan.set_defaults(command="plan", run=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    import torch

    from lorafleet.config import load_fleet_spec
    from lorafleet.train.plan import format_plan, plan_fleet

    spec = load_fleet_spec(args.fleet)
    fleet_plan = plan_fleet(spec, args.budget_gb, getattr(torch, args.dtype) if args.dtype else None)
    print(format_plan(fleet_plan, spec))
    return 0


def add_report_parser(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser(
        "report",
        help="one self-contained HTML page of a training run: curves, throughput, admission, evals",
        description="Draw a training run (the output directory of `lorafleet train`) as one HTML file with "
        "embedded plots: loss and learning rate per adapter, tokens/s, which adapters ran together, "
        "checkpoints and resumes, and the tables of any eval*.json written there by `lorafleet eval --json`.",
    )
    report.add_argument("run_dir", type=Path, help="the training output directory (holds metrics.jsonl)")
    report.add_argument("--out", type=Path, help="the HTML file to write (default: RUN_DIR/report.html)")
    report.add_argument(
        "--smooth",
        type=float,
        default=0.0,
        metavar="WEIGHT",
        help="draw each loss curve as TensorBoard's moving average with this weight (0 to <1, e.g. 0.9), "
        "the raw curve faint behind it (default: 0, raw)",
    )
    report.set_defaults(command="report", run=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from lorafleet.report import write_report

    print(write_report(args.run_dir, args.out, smoothing=args.smooth))
    return 0
