"""`lorafleet cost`: self-hosting against an API, from a measured throughput (cost.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_cost_parser(commands: argparse._SubParsersAction) -> None:
    cost = commands.add_parser(
        "cost",
        help="self-hosting vs an API: cost per million tokens and break-even, from measured throughput",
        description="Cost per million tokens of serving on your own GPUs, and the volume at which that beats an "
        "API, from a measured output throughput (tokens/s, end to end, prefill included).",
    )
    node = cost.add_mutually_exclusive_group(required=True)
    node.add_argument("--gpu-price", type=float, help="USD per GPU-hour (times --gpus and 730 hours a month)")
    node.add_argument("--monthly", type=float, help="USD a month for the whole node")
    cost.add_argument("--gpus", type=int, default=1, help="GPUs in the node (default: 1)")
    speed = cost.add_mutually_exclusive_group(required=True)
    speed.add_argument("--tokens-per-s", type=float, help="output tokens/s the node serves at full load")
    speed.add_argument("--benchmark", type=Path, help="a benchmarks/*.json result to read tokens/s from")
    speed.add_argument("--metrics-url", help="a running server's /metrics: its current output tokens/s")
    cost.add_argument(
        "--benchmark-key", default="lorafleet_engine_tok_s", help="tokens/s field of --benchmark (dotted for nested)"
    )
    cost.add_argument("--sample-seconds", type=float, default=10.0, help="--metrics-url: seconds between scrapes")
    cost.add_argument("--utilisation", type=float, default=0.5, help="fraction of the time at full load (0.5)")
    cost.add_argument("--api-input-price", type=float, required=True, help="USD per million input tokens")
    cost.add_argument("--api-output-price", type=float, required=True, help="USD per million output tokens")
    cost.add_argument(
        "--input-per-output", type=float, default=3.0, help="input tokens per output token in your traffic (3)"
    )
    cost.add_argument("--json", action="store_true", help="print JSON instead of the table")
    cost.set_defaults(command="cost", run=_run_cost)


def _run_cost(args: argparse.Namespace) -> int:
    import json

    from lorafleet import cost

    if args.metrics_url:
        load = cost.measure_metrics(args.metrics_url, args.sample_seconds)
        tokens_per_s = load.output_tokens_per_s
        print(
            f"measured over {load.seconds:.1f} s: {load.output_tokens_per_s:,.1f} output and "
            f"{load.input_tokens_per_s:,.1f} input tokens/s (the current load, not the capacity)",
            file=sys.stderr,
        )
    elif args.benchmark:
        tokens_per_s = cost.tokens_per_s_from_benchmark(args.benchmark, args.benchmark_key)
    else:
        tokens_per_s = args.tokens_per_s
    node = args.monthly if args.monthly is not None else cost.monthly_cost(args.gpu_price, args.gpus)
    inputs = cost.CostInputs(
        node, tokens_per_s, args.utilisation, args.api_input_price, args.api_output_price, args.input_per_output
    )
    report = cost.estimate(inputs)
    print(json.dumps(report.to_json(), indent=2) if args.json else cost.format_report(report))
    return 0
