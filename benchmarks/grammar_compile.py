"""What the grammar sandbox adds to a structured request's latency, against compiling in-process.

    python benchmarks/grammar_compile.py --repeats 20
    python benchmarks/grammar_compile.py --repeats 2 --sizes 3,30 --json r.json   # smallest (the suite's)
    python benchmarks/grammar_compile.py --tokenizer ~/models/Qwen2.5-1.5B-Instruct   # a real vocabulary

The gateway used to compile a response_format schema on a thread of the event loop's pool
(validation) and build its matcher on the engine thread when the row started: `in_process_ms`
times that work (`Grammars.json_schema` then `Grammars.matcher`, the first mask computed). Now a
worker process compiles it under limits and the server rebuilds the matcher from the grammar's
text (`GrammarSandbox.compile`): `sandbox_cold_ms` is a schema never seen before (the worker's
round trip, its compile, the server's rebuild), `sandbox_cached_ms` the same schema from the same
tenant again, and `row_start_ms` what a row then costs the engine thread (a copy of the compiled
matcher). Schemas are objects of N string and integer properties, N from --sizes; each cold
compile gets property names of its own, so nothing is cached. `worker_start_s` is what the first
compiles wait for: the worker processes start then (all of them, before anything is timed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from lorafleet.models.tiny import build_tokenizer
from lorafleet.serve.engine.grammar import Grammars
from lorafleet.serve.engine.grammar_sandbox import GrammarSandbox


def schema(properties: int, tag: str) -> dict:
    kinds = ({"type": "string"}, {"type": "integer", "minimum": 0})
    return {
        "type": "object",
        "properties": {f"field_{tag}_{i}": kinds[i % 2] for i in range(properties)},
        "required": [f"field_{tag}_0"],
        "additionalProperties": False,
    }


def milliseconds(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def in_process_ms(grammars: Grammars, properties: int, tag: str) -> float:
    started = time.perf_counter()
    row = grammars.matcher(grammars.json_schema(schema(properties, tag)))
    row.fill(torch.empty(row.words, dtype=torch.int32))
    return milliseconds(started)


async def sandbox_ms(sandbox: GrammarSandbox, properties: int, tag: str) -> tuple[float, float, float]:
    """(cold, cached, row start) milliseconds for one schema."""
    spec = {"schema": schema(properties, tag)}
    started = time.perf_counter()
    await sandbox.compile("bench", "json_schema", spec, "response_format schema")
    cold = milliseconds(started)
    started = time.perf_counter()
    compiled = await sandbox.compile("bench", "json_schema", spec, "response_format schema")
    cached = milliseconds(started)
    started = time.perf_counter()
    compiled.row()
    return cold, cached, milliseconds(started)


async def measure(grammars: Grammars, sizes: list[int], repeats: int) -> dict:
    sandbox = GrammarSandbox(grammars)
    try:
        started = time.perf_counter()  # one compile per worker, at once (as tenants of their own)
        starting = [sandbox.compile(f"start{n}", "json_schema", {"schema": schema(1, f"start{n}")}, "schema")
                    for n in range(grammars.limits.compile_workers)]  # fmt: skip
        await asyncio.gather(*starting)
        worker_start_s = time.perf_counter() - started
        result = {"worker_start_s": worker_start_s, "in_process_ms": {}, "sandbox_cold_ms": {}}
        result |= {"sandbox_cached_ms": {}, "row_start_ms": {}}
        for size in sizes:
            local = [in_process_ms(grammars, size, f"l{n}") for n in range(repeats)]
            sandboxed = [await sandbox_ms(sandbox, size, f"s{n}") for n in range(repeats)]
            result["in_process_ms"][str(size)] = statistics.median(local)
            for index, key in enumerate(("sandbox_cold_ms", "sandbox_cached_ms", "row_start_ms")):
                result[key][str(size)] = statistics.median(times[index] for times in sandboxed)
        return result
    finally:
        sandbox.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sizes", default="3,30,300", help="properties per schema, comma-separated")
    parser.add_argument("--tokenizer", type=Path, help="a model or tokenizer directory (default: the tiny model's)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else build_tokenizer()
    grammars = Grammars.for_tokenizer(tokenizer, len(tokenizer))
    sizes = [int(size) for size in args.sizes.split(",")]
    result = {"tokenizer": str(args.tokenizer or "tiny"), "vocab": len(tokenizer), "repeats": args.repeats}
    result |= asyncio.run(measure(grammars, sizes, args.repeats))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
