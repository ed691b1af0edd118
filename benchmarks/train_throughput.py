"""K adapters trained together by lorafleet vs the same K trained one after another with peft.

Both run in this process on the same random-weight base, the same synthetic data (chats of about
--seq-len tokens) and the same number of optimizer steps; the report gives tokens/s of each, their
ratio, peak memory and, on CUDA, model FLOP utilisation (4·N FLOPs per token for a frozen base:
forward 2N, backward through activations 2N, no weight gradients for the base).

    python benchmarks/train_throughput.py                                  # CPU, tiny model
    python benchmarks/train_throughput.py --model qwen2.5-1.5b --adapters 4 --seqs 1   # CUDA
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging

from lorafleet.config import ALL_PROJECTIONS, AdapterSpec, FleetSpec
from lorafleet.data.batch import collate
from lorafleet.data.dataset import load_examples
from lorafleet.data.stream import ExampleStream
from lorafleet.models.attention import TRAINING_BACKENDS, training_attention
from lorafleet.models.loading import FrozenBase
from lorafleet.models.tiny import build_tokenizer
from lorafleet.train.trainer import FleetTrainer

# Qwen2.5 dimensions (from the published configs); weights are random, nothing is downloaded.
PRESETS = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=516,
    ),
    "small": dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=4096,
    ),
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
    ),
}
WORDS = "the invoice total contract policy team report shape colour red blue green one two three".split()


def build_base(preset: str, device: torch.device, dtype: torch.dtype) -> FrozenBase:
    tokenizer = build_tokenizer()
    config = Qwen2Config(**PRESETS[preset], max_position_embeddings=8192, tie_word_embeddings=False)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.requires_grad_(False).eval()
    return FrozenBase(model, tokenizer, None, Path(preset), language_prefix="")


def write_data(directory: Path, name: str, rows: int, seq_len: int, seed: int, min_len: int | None = None) -> Path:
    """Chats of about seq_len tokens of the built-in tokenizer, chat template included (or, with
    min_len, uniformly between min_len and seq_len): a question of 3/4 of them, an answer of 1/4."""
    rng = random.Random(seed)
    per_word, overhead = _tokens_per_word()
    path = directory / f"{name}.jsonl"
    with path.open("w") as out:
        for _ in range(rows):
            length = rng.randint(min_len, seq_len) if min_len else seq_len
            words = max((length - overhead) / per_word, 2)
            question = " ".join(rng.choices(WORDS, k=max(round(words * 3 / 4), 1)))
            answer = " ".join(rng.choices(WORDS, k=max(round(words / 4), 1)))
            chat = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            out.write(json.dumps({"messages": chat}) + "\n")
    return path


def _tokens_per_word() -> tuple[float, int]:
    """(tokens per word of WORDS, tokens the chat template adds) for the built-in tokenizer."""
    tokenizer = build_tokenizer()
    sample = " ".join(WORDS * 20)
    per_word = len(tokenizer(sample)["input_ids"]) / (len(WORDS) * 20)
    chat = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=True)
    rendered = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
    return per_word, len(rendered) - 2


def adapter_specs(args, data: list[Path]) -> list[AdapterSpec]:
    return [
        AdapterSpec(
            name=f"adapter{i}",
            data=str(path),
            rank=args.rank,
            alpha=2 * args.rank,
            target_modules=list(ALL_PROJECTIONS),
            learning_rate=1e-4,
            micro_batch_size=args.seqs,
            steps=args.warmup + args.steps,
            seed=i,
            schedule="constant",
            variant="dora" if i < args.dora else "lora",
        )
        for i, path in enumerate(data)
    ]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last reset; None on CPU (no per-phase peak there)."""
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class KernelWatch:
    """Profiles one step (the second: never inside the timed window) and keeps the names of the
    attention kernels the GPU ran, so the report says which SDPA backend each side really used."""

    PATTERNS = ("flash", "fmha", "cudnn", "attention", "attn", "sdpa")

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self.profiler = None
        self.kernels: list[str] = []

    def before_step(self, index: int) -> None:
        if self.enabled and index == 1:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self.profiler.start()

    def after_step(self, index: int) -> None:
        if self.profiler is not None and index == 1:
            torch.cuda.synchronize()
            self.profiler.stop()
            names = {event.key for event in self.profiler.key_averages()}
            self.kernels = sorted(n for n in names if any(p in n.lower() for p in self.PATTERNS))[:8]
            self.profiler = None


def run_fleet(args, base: FrozenBase, specs: list[AdapterSpec], output: Path) -> dict:
    """lorafleet: every adapter in each fleet step; timed after `warmup` steps."""
    marks: list[tuple[float, int, float]] = []  # (time, tokens so far, process CPU time) after each fleet step
    watch = KernelWatch(base.device)
    watch.before_step(0)

    def mark(step: int) -> None:
        synchronize(base.device)
        marks.append((time.perf_counter(), trainer.result.tokens, time.process_time()))
        watch.after_step(step - 1)
        watch.before_step(step)

    spec = FleetSpec(
        base=str(base.path),
        output=str(output),
        adapters=specs,
        checkpoint_every=0,
        max_concurrent=len(specs),
        packing=args.packing,
        chunked_loss=not args.full_logits,
        activation_checkpointing=args.activation_checkpointing,
        attention=args.attention,
        length_multiple=args.length_multiple,
        compile=args.compile,
    )
    attention = args.attention or ("varlen" if args.packing else None)  # the trainer's default
    if attention:  # the base is built here, not loaded: switch its kernel the way load_base would
        from lorafleet.models import varlen

        base.model.set_attn_implementation(varlen.register() if attention == "varlen" else attention)
    trainer = FleetTrainer(spec, base=base, progress=False, on_step=mark)
    predicted = trainer.admission.predicted_memory(specs)
    trainer.run()
    # The last step also writes the finished adapters to disk: time up to the step before it.
    (start, start_tokens, start_cpu), (end, end_tokens, end_cpu) = marks[args.warmup - 1], marks[-2]
    timed_steps = len(marks) - 1 - args.warmup
    return {
        "tokens_per_s": (end_tokens - start_tokens) / (end - start),
        "seconds": end - start,
        # CPU seconds this process spent per timed step (all its threads): on a shared CPU it moves
        # far less with other work than wall time does
        "cpu_ms_per_step": round(1000 * (end_cpu - start_cpu) / max(timed_steps, 1), 1),
        "step_ms": [round(1000 * (b[0] - a[0]), 1) for a, b in zip(marks, marks[1:], strict=False)],
        "predicted_peak_gib": predicted.total / 2**30,
        "predicted": {part: getattr(predicted, part) / 2**30 for part in PREDICTED_PARTS},
        "attention_kernels": watch.kernels,
    }


PREDICTED_PARTS = ("weights", "adapter_state", "activations", "loss", "margin")


def run_peft_sequential(args, base: FrozenBase, specs: list[AdapterSpec]) -> dict:
    """peft: one adapter after another, each a plain training loop; timed after `warmup` steps each.
    It gets the same SDPA backends as lorafleet (flash, memory-efficient, math; not cuDNN)."""
    seconds, tokens = 0.0, 0
    watch = KernelWatch(base.device)
    for spec in specs:
        examples, _ = load_examples(spec.data, base)
        config = LoraConfig(
            r=spec.rank, lora_alpha=spec.alpha, target_modules=list(ALL_PROJECTIONS), use_dora=spec.variant == "dora"
        )
        model = get_peft_model(base.model, config)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=spec.learning_rate)
        stream = ExampleStream(examples, spec.micro_batch_size, spec.seed)
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                synchronize(base.device)
                started = time.perf_counter()
            if spec is specs[0]:
                watch.before_step(step)
            batch = collate(stream.next_micro_batch(), base.tokenizer.pad_token_id).to(base.device)
            with training_attention():  # the same SDPA backends as lorafleet's trainer
                loss = model(**batch.model_inputs(), labels=batch.labels).loss
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()  # the fleet trainer reads each loss too
            if spec is specs[0]:
                watch.after_step(step)
            if step >= args.warmup:
                tokens += int(batch.attention_mask.sum())
        synchronize(base.device)
        seconds += time.perf_counter() - started
        base.model = model.unload()
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "attention_kernels": watch.kernels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=PRESETS, default="tiny")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--seqs", type=int, default=1, help="sequences per adapter per step")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per adapter")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--packing", action="store_true", help="lorafleet packs sequences instead of padding")
    parser.add_argument("--min-len", type=int, help="mixed lengths: sequences between this and --seq-len tokens")
    parser.add_argument("--full-logits", action="store_true", help="lorafleet computes full logits (no chunked loss)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="lorafleet recomputes decoder layers")
    parser.add_argument("--attention", help="lorafleet's attention kernel (e.g. varlen with --packing)")
    parser.add_argument("--length-multiple", type=int, default=64, help="lorafleet pads lengths to a multiple of this")
    parser.add_argument("--compile", action="store_true", help="lorafleet compiles each decoder layer")
    parser.add_argument("--fused", action="store_true", help="lorafleet with the fused Triton LoRA kernels (CUDA)")
    parser.add_argument("--dora", type=int, default=0, help="the first this many adapters are DoRA (peft: use_dora)")
    parser.add_argument("--skip-peft", action="store_true", help="measure lorafleet only (e.g. padding vs packing)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    logging.set_verbosity_error()
    if args.fused:
        os.environ["LORAFLEET_FUSED_LORA"] = "1"

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    base = build_base(args.model, device, dtype)
    n_params = sum(p.numel() for p in base.model.parameters()) - base.model.lm_head.weight.numel()
    with tempfile.TemporaryDirectory() as tmp:
        data = [write_data(Path(tmp), f"adapter{i}", 64, args.seq_len, i, args.min_len) for i in range(args.adapters)]
        specs = adapter_specs(args, data)
        peft = None
        if not args.skip_peft:
            reset_peak(device)
            peft = run_peft_sequential(args, base, specs)
            peft["peak_memory_gib"] = peak_memory_gib(device)
        reset_peak(device)
        fleet = run_fleet(args, base, specs, Path(tmp) / "fleet")
        fleet["peak_memory_gib"] = peak_memory_gib(device)

    result = {
        "model": args.model,
        "adapters": args.adapters,
        "seqs_per_adapter": args.seqs,
        "dora_adapters": args.dora,
        "seq_len": args.seq_len,
        "rank": args.rank,
        "steps": args.steps,
        "packing": args.packing,
        "min_len": args.min_len,
        "attention": args.attention or ("varlen" if args.packing else "sdpa"),
        "chunked_loss": not args.full_logits,
        "activation_checkpointing": args.activation_checkpointing,
        "length_multiple": args.length_multiple,
        "compile": args.compile,
        "sdpa_backends": [backend.name for backend in TRAINING_BACKENDS],
        "fused_lora": device.type == "cuda" and args.fused,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "peft": peft,
        "lorafleet": fleet,
        "process_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "speedup": fleet["tokens_per_s"] / peft["tokens_per_s"] if peft else None,
    }
    if device.type == "cuda":
        for run in (peft, fleet) if peft else (fleet,):
            run["mfu"] = 4 * n_params * run["tokens_per_s"] / (args.peak_tflops * 1e12)
        fleet["measured_over_predicted"] = fleet["peak_memory_gib"] / fleet["predicted_peak_gib"]
    print(json.dumps(result, indent=2))
    compared = f"peft sequential {peft['tokens_per_s']:.0f} tok/s, " if peft else ""
    ratio = f" ({result['speedup']:.2f}x)" if peft else ""
    print(
        f"\n{args.model}, {args.adapters} adapters x {args.seqs} seq x ~{args.seq_len} tokens, rank {args.rank}: "
        f"{compared}lorafleet {fleet['tokens_per_s']:.0f} tok/s{ratio}",
        file=sys.stderr,
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
