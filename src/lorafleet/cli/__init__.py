"""The `lorafleet` command: one entry point for every stage of the fleet.

This module builds the top-level parser and runs the chosen command; each command group has a
module of its own beside it, with its parser next to the handler that reads it: `demo`, `train`
(train, plan, report), `sweep`, `serve`, `keys` (keys, usage), `console`, `compress`, `cost`,
`evaluate` (eval), `governance` (audit, registry, docs) and `data`. It is the only place that parses
arguments and prints.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from lorafleet import __version__
from lorafleet.cli import compress, console, cost, data, demo, evaluate, governance, keys, serve, sweep, train
from lorafleet.errors import LorafleetError

EXAMPLES = """\
examples:
  lorafleet demo                          tiny model, three departments, trained together (CPU, ~1 min)
  lorafleet demo --out my-demo            keep everything in ./my-demo
  lorafleet demo --preference             then correct one department's adapter with DPO on preference pairs
  lorafleet train fleet.yaml              train every adapter listed in fleet.yaml together
  lorafleet train fleet.yaml --resume     continue an interrupted run from its last checkpoint
  torchrun --nproc-per-node 4 -m lorafleet train fleet.yaml   the fleet on 4 GPUs (parallel: adapter or data)
  lorafleet sweep sweep.yaml              search one adapter's settings as one fleet; the worst trials stop early
  lorafleet plan fleet.yaml --budget-gb 80   predicted peak memory; how many adapters like these fit
  lorafleet serve --fleet demo-out        OpenAI-compatible API on 127.0.0.1:8000 (base + adapters), console at /ui
  lorafleet serve --fleet demo-out --keys keys.yaml --host 0.0.0.0    with tenants, keys and limits
  lorafleet console --fleet demo-out      the web console alone (runs, lineage, audit) at http://127.0.0.1:8000/ui
  lorafleet keys new                      a fresh API key and the hash that goes in keys.yaml
  lorafleet keys create finance-team      a key made live on a running gateway (admin key in $LORAFLEET_ADMIN_KEY)
  lorafleet compress --base demo-out/base --calib demo-out/data/marketing.jsonl --prune-mlp 0.5 --plan
                                          what pruning half the MLP would remove
  lorafleet compress --base demo-out/base --adapter demo-out/adapters/marketing --calib demo-out/data/marketing.jsonl
      --eval demo-out/data/marketing-test.jsonl --prune-mlp 0.5 --distil-steps 100 --quantize int4 --out small
                                          merged, pruned, distilled, int4 (GPTQ), compressed-tensors
  lorafleet eval --fleet demo-out --data demo-out/data/marketing-test.jsonl
                                          base and every adapter on the same held-out questions (or MMMU)
  lorafleet data check demo-out/data/marketing.jsonl demo-out/data/marketing-test.jsonl
                                          records, tokens, images, duplicates, train/test overlap, personal data
  lorafleet data redact raw.jsonl clean.jsonl    personal data replaced by <EMAIL_1>-style placeholders
  lorafleet data synth --docs handbook/ --out qa.jsonl --endpoint http://127.0.0.1:8000 --model base
                                          question-answer chats grounded in your own documents
  lorafleet cost --gpu-price 3.5 --gpus 2 --tokens-per-s 1700 --api-input-price 3 --api-output-price 15
                                          self-hosted cost per million tokens and break-even against the API
"""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    _quiet_libraries()
    try:
        return args.run(args)
    except LorafleetError as err:
        print(f"lorafleet: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "lorafleet: interrupted; `lorafleet train FLEET.yaml --resume` continues from the last checkpoint",
            file=sys.stderr,
        )
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafleet",
        description="Train, compress and serve a fleet of LoRA adapters on one frozen open model.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lorafleet {__version__}")
    parser.set_defaults(command=None)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    demo.add_demo_parser(commands)
    train.add_train_parser(commands)
    train.add_plan_parser(commands)
    sweep.add_sweep_parser(commands)
    serve.add_serve_parser(commands)
    console.add_console_parser(commands)
    compress.add_compress_parser(commands)
    keys.add_keys_parser(commands)
    keys.add_usage_parser(commands)
    cost.add_cost_parser(commands)
    evaluate.add_eval_parser(commands)
    train.add_report_parser(commands)
    governance.add_governance_parsers(commands)
    data.add_data_parsers(commands)
    return parser


def _quiet_libraries() -> None:
    """Our progress bars and messages only: silence transformers' per-file bars and notices."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
