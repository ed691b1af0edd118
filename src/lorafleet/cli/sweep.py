"""`lorafleet sweep`: a sweep file's trials trained as one fleet, halved at rungs, the winner saved."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_sweep_parser(commands: argparse._SubParsersAction) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="search departments' adapter settings: every trial an adapter of one fleet, the worst stopped early",
        description="Train the trials of SWEEP.yaml (a search space over adapter settings, for one department "
        "or several) side by side in one fleet, stop the worst at each rung on their held-out loss (successive "
        "halving, each department's trials ranked among themselves), and save each department's best "
        "full-budget trial as its adapter, its lineage recording the whole sweep.",
    )
    sweep.add_argument(
        "sweep", type=Path, help="sweep file (YAML): base, output, department (or departments), adapter, space, trials"
    )
    sweep.add_argument(
        "--retrain-full",
        action="store_true",
        help="after the sweep, train each winner's configuration on its training and held-out files together "
        "(full budget, no stopping) and save that as the department's adapter",
    )
    sweep.add_argument("--resume", action="store_true", help="continue a killed sweep from its last checkpoint")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bars")
    sweep.set_defaults(command="sweep", run=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> int:
    from lorafleet.report import write_report
    from lorafleet.sweep.run import SWEEP_FILE, run_sweep
    from lorafleet.sweep.space import load_sweep_spec

    spec = load_sweep_spec(args.sweep)
    results = run_sweep(spec, progress=not args.no_progress, retrain_full=args.retrain_full, resume=args.resume)
    for department, result in results.items():
        metric = spec.departments[department].metric
        for trial in result.trials:
            where = "full budget" if trial.stopped_at is None else f"stopped at step {trial.stopped_at}"
            if trial.diverged:
                where = f"diverged at step {trial.stopped_at + 1}: the loss was no longer a number"
            final = "-" if trial.final is None else f"{trial.final:.4f}"
            values = ", ".join(
                f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                for key, value in trial.values.items()
            )
            print(f"{trial.name}: {metric} {final} ({where}) {values}")
        retrained = " (retrained on the training and held-out data)" if "retrained" in result.record else ""
        print(f"winner: {result.winner} -> {result.adapter}{retrained}")
        print(f"why: {result.record['winner']['why']}")
    print(f"sweep: {spec.output / SWEEP_FILE}")
    print(f"report: {write_report(spec.output)}")
    return 0
