"""`lorafleet sweep`: a sweep file's trials trained as one fleet, halved at rungs, the winner saved."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorafleet.sweep.space import SweepSpec


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
    sweep.add_argument("--no-progress", action="store_true", help="no progress display")
    _add_plan_arguments(sweep)
    sweep.set_defaults(command="sweep", run=_run_sweep)


def _add_plan_arguments(sweep: argparse.ArgumentParser) -> None:
    sweep.add_argument(
        "--plan",
        action="store_true",
        help="train nothing: predict the sweep's peak memory and the steps, tokens (and, with a rate, time) it spends",
    )
    sweep.add_argument("--budget-gb", type=float, help="--plan: memory to plan for (default: as lorafleet plan)")
    sweep.add_argument(
        "--dtype", choices=["bfloat16", "float16", "float32"], help="--plan: compute dtype (default: as training)"
    )
    rate = sweep.add_mutually_exclusive_group()
    rate.add_argument("--tokens-per-s", type=float, help="--plan: the fleet's measured tokens/s, for the time")
    rate.add_argument(
        "--rate-from", type=Path, metavar="RUN_DIR", help="--plan: take tokens/s from an earlier run's metrics.jsonl"
    )


def _run_sweep(args: argparse.Namespace) -> int:
    from lorafleet.report import write_report
    from lorafleet.sweep.run import SWEEP_FILE, run_sweep
    from lorafleet.sweep.space import load_sweep_spec

    spec = load_sweep_spec(args.sweep)
    if args.plan:
        return _plan_sweep(spec, args)
    _refuse_plan_options_without_plan(args)
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


def _refuse_plan_options_without_plan(args: argparse.Namespace) -> None:
    from lorafleet.errors import ConfigError

    given = [name for name in ("budget_gb", "dtype", "tokens_per_s", "rate_from") if getattr(args, name) is not None]
    if given:  # the sweep would train while the user asked for a prediction
        option = "--" + given[0].replace("_", "-")
        raise ConfigError(f"{option} is an option of --plan; add --plan to predict, or leave it out to run the sweep")


def _plan_sweep(spec: SweepSpec, args: argparse.Namespace) -> int:
    import torch

    from lorafleet.errors import ConfigError
    from lorafleet.sweep.plan import format_sweep_plan, plan_sweep

    if args.resume:  # the plan counts a whole sweep from its start: a resumed one has spent part of it
        raise ConfigError(
            "--plan predicts a sweep before it starts and --resume continues one that started; leave out --resume "
            "to see the whole sweep's plan, or --plan to continue it"
        )

    dtype = getattr(torch, args.dtype) if args.dtype else None
    print(format_sweep_plan(plan_sweep(spec, args.budget_gb, dtype, args.tokens_per_s, args.rate_from), spec))
    return 0
