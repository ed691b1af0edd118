"""`lorafleet demo`: the whole story on the built-in tiny model (demo/run.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_demo_parser(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="train three adapters together on the built-in tiny model")
    demo.add_argument("--out", type=Path, default=Path("demo-out"), help="where to put everything (default: demo-out)")
    demo.add_argument("--steps", type=int, default=1000, help="optimizer steps per adapter (default: 1000)")
    demo.add_argument("--train-size", type=int, default=1024, help="training pictures per department (default: 1024)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument(
        "--preference",
        type=int,
        nargs="?",
        const=30,
        default=0,
        metavar="STEPS",
        help="then correct marketing's adapter with DPO on right/wrong colour pairs (default 30 steps)",
    )
    demo.set_defaults(command="demo", run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from lorafleet.demo.run import run_demo

    rows = run_demo(
        args.out,
        train_size=args.train_size,
        steps=args.steps,
        progress=not args.no_progress,
        log=print,
        preference_steps=args.preference,
    )
    return 0 if all(row.adapter_accuracy > row.base_accuracy for row in rows) else 1
