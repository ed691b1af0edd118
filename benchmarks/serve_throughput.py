"""Decode throughput with mixed adapters: lorafleet's engine vs peft's mixed-batch `generate`.

N concurrent streams spread over K adapters, each generating exactly --tokens tokens (end of text
ignored), on the same random-weight base in the same process. Reports output tokens/s for
  - peft: one `generate` call over all streams with `adapter_names` (peft's mixed-adapter batches),
  - plain HF `generate` without any LoRA (the ceiling of the transformers path),
  - lorafleet's engine: all streams submitted at once, continuous batching (a CUDA graph per
    decode bucket on a GPU), with each stream's time to first token (p50, p99) under that load.

    python benchmarks/serve_throughput.py                       # CPU, tiny model
    python benchmarks/serve_throughput.py --model qwen2.5-1.5b  # CUDA
    python benchmarks/serve_throughput.py --model qwen2.5-1.5b --adapters 32 --engine-only
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers.utils import logging

from lorafleet.adapters.fleet import LoRAFleet, LoRAShape, find_target_modules
from lorafleet.adapters.peft_io import load_adapter, save_adapter
from lorafleet.config import ALL_PROJECTIONS
from lorafleet.data.encode import IGNORE_INDEX, Example
from lorafleet.serve.engine.engine import Engine
from lorafleet.serve.engine.sampling import SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import PRESETS, build_base, synchronize  # noqa: E402


def write_adapters(base, directory: Path, count: int, rank: int) -> list[Path]:
    fleet = LoRAFleet(copy.deepcopy(base.model), base.language_prefix)
    modules = find_target_modules(fleet.model, "", ALL_PROJECTIONS)
    paths = []
    for i in range(count):
        fleet.add_adapter(f"a{i}", LoRAShape(rank, 2 * rank, 0.0, modules), seed=i)
        with torch.no_grad():
            for weight in fleet.parameters(f"a{i}"):
                weight.normal_(0, 0.02)
        paths.append(save_adapter(fleet, f"a{i}", directory / f"a{i}", "random"))
    return paths


def prompts(base, streams: int, length: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    vocab = len(base.tokenizer)
    return [torch.randint(10, vocab - 10, (length + i % 7,), generator=generator) for i in range(streams)]


def as_prompt(ids: torch.Tensor) -> Example:
    return Example(ids, torch.full_like(ids, IGNORE_INDEX), None)


def left_padded_inputs(prompts: list[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """HF `generate`'s inputs for the baselines: prompts left-padded so that every row ends where
    generation starts."""
    length = max(p.num_tokens for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - prompt.num_tokens :] = prompt.input_ids
        attention_mask[row, length - prompt.num_tokens :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def time_generate(model, inputs, tokens: int, pad_id: int, **kwargs) -> float:
    synchronize(inputs["input_ids"].device)
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=pad_id, **kwargs
        )
    synchronize(inputs["input_ids"].device)
    assert out.shape[1] - inputs["input_ids"].shape[1] == tokens
    return time.perf_counter() - started


def time_engine(base, adapter_dirs, batch, names, tokens: int, max_batch: int) -> tuple[float, list[float]]:
    """All streams submitted at once; `names[i]` is the adapter of stream i. Returns the seconds
    it took and each stream's time to its first token.

    The engine runs in this thread (`run_until_idle`), as `generate` does: with two threads doing
    torch work, the idle thread's OpenMP workers keep spinning and the 2-core machine measures
    contention instead of the engine.
    """
    fleet = LoRAFleet(base.model, base.language_prefix)
    for path in adapter_dirs:
        load_adapter(fleet, path.name, path)
    engine = Engine(base, fleet, max_batch=max_batch, max_seq_len=max(len(p) for p in batch) + tokens + 8)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    try:
        # One untimed run of the same requests first: on a GPU it captures the CUDA graph of every
        # (rows, span) bucket the timed run meets — once per server lifetime, not per request.
        for ids, name in zip(batch, names, strict=True):
            engine.submit(as_prompt(ids), name, params)
        engine.run_until_idle()
        synchronize(base.device)
        started = time.perf_counter()
        streams = [engine.submit(as_prompt(p), n, params) for p, n in zip(batch, names, strict=True)]
        engine.run_until_idle()
        synchronize(base.device)
        seconds = time.perf_counter() - started
    finally:
        for name in list(fleet.shapes):
            fleet.remove_adapter(name)
    finals = [list(s)[-1] for s in streams]
    assert [f.completion_tokens for f in finals] == [tokens] * len(batch), finals[0].error
    # When the engine chose each first token: streamed text may come later (random weights make
    # incomplete UTF-8, held back until it is whole).
    return seconds, [stream.first_token_at - started for stream in streams]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=PRESETS, default="tiny")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per stream")
    parser.add_argument("--engine-only", action="store_true", help="measure lorafleet's engine alone")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.set_verbosity_error()
    logging.disable_progress_bar()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    base = build_base(args.model, device, dtype)
    pad = base.tokenizer.pad_token_id
    batch = prompts(base, args.streams, args.prompt_len)
    names = [f"a{i % args.adapters}" for i in range(args.streams)]
    order = sorted(range(args.streams), key=lambda i: names[i])  # peft wants nothing; sorting is free
    batch, names = [batch[i] for i in order], [names[i] for i in order]
    inputs = left_padded_inputs([as_prompt(ids) for ids in batch], pad, device)
    output_tokens = args.streams * args.tokens
    plain = peft_seconds = None
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dirs = write_adapters(base, Path(tmp), args.adapters, args.rank)
        if not args.engine_only:
            time_generate(base.model, inputs, 2, pad)  # warm-up
            plain = time_generate(base.model, inputs, args.tokens, pad)
            peft_model = PeftModel.from_pretrained(base.model, adapter_dirs[0], adapter_name="a0")
            for i, path in enumerate(adapter_dirs[1:], start=1):
                peft_model.load_adapter(path, adapter_name=f"a{i}")
            peft_model.eval()
            time_generate(peft_model, inputs, 2, pad, adapter_names=names)
            peft_seconds = time_generate(peft_model, inputs, args.tokens, pad, adapter_names=names)
            base.model = peft_model.unload()
        ours, first_token = time_engine(base, adapter_dirs, batch, names, args.tokens, max_batch=args.streams)

    result = {
        "model": args.model,
        "streams": args.streams,
        "adapters": args.adapters,
        "rank": args.rank,
        "prompt_len": args.prompt_len,
        "tokens": args.tokens,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "hf_generate_no_lora_tok_s": output_tokens / plain if plain else None,
        "peft_mixed_generate_tok_s": output_tokens / peft_seconds if peft_seconds else None,
        "lorafleet_engine_tok_s": output_tokens / ours,
        "lorafleet_ms_per_token_step": 1000 * ours / args.tokens,
        "time_to_first_token_s": {"p50": percentile(first_token, 0.5), "p99": percentile(first_token, 0.99)},
        "speedup_vs_peft": peft_seconds / ours if peft_seconds else None,
        "speedup_vs_hf_generate": plain / ours if plain else None,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
