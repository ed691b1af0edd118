"""`lorafleet eval`: the base and each adapter on one held-out file (eval/)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_eval_parser(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="the base and each adapter on the same held-out questions (chat JSONL or MMMU format)",
        description="Decode a held-out file with the base and each adapter, batched together by lorafleet's "
        "engine, and score them: exact match and token F1 for chat JSONL, MMMU's rules for MMMU-format "
        "JSONL or Parquet (id, question, options, answer, image_1..image_7).",
    )
    evaluate.add_argument("--fleet", type=Path, required=True, help="fleet directory (base/ and adapters/<name>/)")
    evaluate.add_argument("--data", type=Path, required=True, help="held-out JSONL (chat or MMMU) or MMMU Parquet")
    evaluate.add_argument("--adapters", help="comma-separated adapters to evaluate (default: all)")
    evaluate.add_argument("--base", type=Path, help="base model directory (default: <fleet>/base)")
    evaluate.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (default: 64)")
    evaluate.add_argument("--max-batch", type=int, default=32, help="answers decoded together (default: 32)")
    evaluate.add_argument("--json", type=Path, help="also write the scores and every answer as JSON here")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(command="eval", run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from lorafleet.eval.preference import evaluate_preferences, format_scores, is_preference_file
    from lorafleet.eval.run import EvalOptions, evaluate, format_report

    adapters = [name.strip() for name in args.adapters.split(",") if name.strip()] if args.adapters else None
    options = EvalOptions(args.fleet, args.data, adapters, args.base, args.max_tokens, args.max_batch)
    if args.data.exists() and is_preference_file(args.data):  # pairs: which answer each model prefers
        scores = evaluate_preferences(options, progress=not args.no_progress)
        print(format_scores(scores))
        if args.json:
            result = {"format": "preference", "data": str(args.data)} | asdict(scores)
            args.json.write_text(json.dumps(result, indent=2))
            print(f"scores in {args.json}")
        return 0
    report = evaluate(options, progress=not args.no_progress)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2))
        print(f"scores and answers in {args.json}")
    return 0
