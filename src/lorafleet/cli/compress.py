"""`lorafleet compress`: prune, distil and quantize a base, each stage measured by the serving engine
(decode speed) and the evaluation package (exact match on --eval)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_compress_parser(commands: argparse._SubParsersAction) -> None:
    compress = commands.add_parser(
        "compress",
        help="prune, distil and quantize a base (optionally with an adapter merged in) into a smaller model",
        description="Minitron-style structured pruning of the language model, ranked on calibration data. "
        "Optionally distils the pruned student toward the original (forward KL on logits). "
        "--quantize stores the language model's Linear weights as int8, int4 (w4a16) or fp8 in the "
        "compressed-tensors format: vLLM serves it, and lorafleet's engine and trainer run on it.",
    )
    compress.add_argument("--base", type=Path, required=True, help="base model directory")
    compress.add_argument("--adapter", type=Path, help="PEFT adapter to merge before compressing")
    compress.add_argument("--out", type=Path, help="output model directory")
    compress.add_argument("--calib", type=Path, help="calibration JSONL (training-data layout)")
    compress.add_argument("--prune-mlp", type=float, default=0.0, help="fraction of MLP neurons to remove")
    compress.add_argument("--prune-heads", type=float, default=0.0, help="fraction of key/value head groups to remove")
    compress.add_argument("--prune-layers", type=int, default=0, help="number of decoder layers to remove")
    compress.add_argument("--distil-steps", type=int, default=0, help="distillation steps after pruning (0: none)")
    compress.add_argument("--distil-data", type=Path, help="distillation JSONL (default: the calibration data)")
    compress.add_argument("--distil-lr", type=float, default=1e-4, help="distillation learning rate")
    compress.add_argument(
        "--quantize",
        choices=["int8", "int4", "w4a16", "w8a16", "fp8"],
        help="weight-only quantization of the language model (int4 = w4a16: groups of 128; int8, fp8: per channel)",
    )
    compress.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="on-disk dtype of the weights that stay unquantized (default: bfloat16 with --quantize, else as loaded)",
    )
    compress.add_argument(
        "--rtn", action="store_true", help="round int8/int4 weights to nearest instead of GPTQ on the calibration data"
    )
    compress.add_argument("--eval", type=Path, help="held-out chat JSONL: exact-match accuracy after every stage")
    compress.add_argument("--plan", action="store_true", help="show what would be removed; write nothing")
    compress.add_argument(
        "--fleet", type=Path, help="register the output in this fleet (default: the fleet directory --out lies in)"
    )
    compress.set_defaults(command="compress", run=_run_compress)


def _run_compress(args: argparse.Namespace) -> int:
    import torch

    from lorafleet.compress.distil import DistilOptions
    from lorafleet.compress.prune import PruneRequest
    from lorafleet.compress.run import CompressOptions, compress
    from lorafleet.eval.greedy import base_exact_match
    from lorafleet.serve.engine.speed import decode_speed

    request = PruneRequest(mlp=args.prune_mlp, heads=args.prune_heads, layers=args.prune_layers)
    distillation = DistilOptions(
        steps=args.distil_steps,
        learning_rate=args.distil_lr,
        checkpoint=args.out / "distil-checkpoint.pt" if args.out else None,
    )
    compress(
        CompressOptions(
            args.base,
            args.out,
            args.adapter,
            args.calib,
            request,
            plan_only=args.plan,
            distil_data=args.distil_data,
            distil=distillation,
            quantize=args.quantize,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            eval_data=args.eval,
            gptq=not args.rtn,
            fleet=args.fleet,
        ),
        log=print,
        decode_speed=decode_speed,
        exact_match=base_exact_match,
    )
    return 0
