"""`lorafleet compress`: prune → distil → quantize a base (optionally with one adapter merged in).

Writes an ordinary HF model directory plus `compress_report.json`: per stage the weights, bytes
on disk, calibration loss, KL to the uncompressed model, exact-match accuracy on held-out data
(with --eval; greedy replies from lorafleet's engine) and decode tokens/s in that engine.
`lineage.json` beside it links the model to its base ("compressed_from") and merged adapter
("merged") and names the calibration data by hash; it is registered (and the run logged) in the
fleet the output lies in, or the one given.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafleet.compress.distil import DistilOptions, distil, held_out_kl
from lorafleet.compress.gptq import gptq_language_model
from lorafleet.compress.prune import PruneRequest, apply_plan, measure_importance, plan_pruning
from lorafleet.compress.quantize import quantize_language_model, round_unquantized, save_quantized
from lorafleet.data.batch import collate
from lorafleet.data.dataset import load_examples
from lorafleet.data.encode import Example
from lorafleet.data.records import ChatRecord, read_records
from lorafleet.errors import ConfigError
from lorafleet.fleet_dir import FleetDir
from lorafleet.governance.audit import AuditLog, utc_now
from lorafleet.governance.lineage import (
    LINEAGE_FILE,
    Lineage,
    base_model_name,
    describe_data,
    hardware,
    parent_link,
    record_evaluation,
    sha256_file,
    software,
    weight_hashes,
    write_lineage,
)
from lorafleet.governance.registry import register
from lorafleet.models.loading import FrozenBase, load_base
from lorafleet.models.quantized import QuantizedLinear, scheme_named


@dataclass
class CompressOptions:
    base: Path
    out: Path | None
    adapter: Path | None = None
    calib: Path | None = None
    prune: PruneRequest | None = None
    plan_only: bool = False
    calib_limit: int = 256
    distil_data: Path | None = None  # default: the calibration data
    distil: DistilOptions | None = None  # None or steps == 0: no distillation
    quantize: str | None = None  # int8 | int4 (w4a16) | fp8: weight-only, compressed-tensors on disk
    # On-disk dtype of the weights that are not quantized; None: bf16 when quantizing, else as loaded.
    dtype: torch.dtype | None = None
    gptq: bool = True  # int8/int4 by GPTQ on the calibration data; False: round to nearest
    progress: bool = True
    eval_data: Path | None = None  # held-out chat JSONL: exact-match accuracy per stage
    eval_limit: int = 64
    fleet: Path | None = None  # register the output here; default: a fleet directory it lies in


def _quiet(message: str) -> None:
    pass


def compress(
    options: CompressOptions,
    log: Callable[[str], None] = _quiet,
    decode_speed: Callable[[FrozenBase, list[Example]], float] | None = None,
    exact_match: Callable[[FrozenBase, list[ChatRecord]], float] | None = None,
) -> dict:
    """Prune, distil, quantize (as `options` asks) and report every stage. `log` receives progress
    lines; `decode_speed(model, prompts)`, when given, measures each stage's tokens/s, and
    `exact_match(model, records)` scores each stage on the held-out records of `eval_data` (the
    CLI passes the serving engine's `decode_speed` and `lorafleet.eval.greedy.base_exact_match`:
    compression itself depends on neither serving nor evaluation)."""
    if options.eval_data is not None and exact_match is None:
        raise ConfigError("eval_data needs exact_match to score it: pass lorafleet.eval.greedy.base_exact_match")
    request = options.prune or PruneRequest()
    started = utc_now()
    base = load_base(options.base, device="cpu", dtype=torch.float32)
    request.validate(base.language_model.config)
    if options.adapter is not None:
        _merge_adapter(base, options.adapter)
    if options.calib is None:
        raise ConfigError("--calib FILE is needed: pruning ranks neurons and heads by activations on real data")
    examples, _ = load_examples(options.calib, base)
    examples = examples[: options.calib_limit]
    held_out = read_records(options.eval_data)[0][: options.eval_limit] if options.eval_data else None
    scheme = scheme_named(options.quantize) if options.quantize else None
    store_dtype = options.dtype or (torch.bfloat16 if scheme else None)
    stage = functools.partial(
        _stage, examples=examples, held_out=held_out, decode_speed=decode_speed, exact_match=exact_match
    )
    before = stage(base, directory=options.base)
    plan = plan_pruning(base.language_model.config, measure_importance(base, examples), request)
    log("pruning plan:\n" + plan.describe())
    report = {
        "adapter_merged": str(options.adapter) if options.adapter else None,
        "adapters": "merged into the compressed model"
        if options.adapter
        else "none merged: re-fit the fleet on the result",
        "quantization": _describe(scheme, options.gptq),
        "stored_dtype": str(store_dtype).removeprefix("torch.") if store_dtype else None,
        "plan": plan.removed,
        "stages": {"original": before},
    }
    if options.plan_only:
        return report
    if options.out is None:
        raise ConfigError("--out DIR is needed (or --plan for a dry run)")
    distilling = options.distil is not None and options.distil.steps > 0
    teacher = _teacher(options) if distilling or scheme else None
    apply_plan(base, plan)
    report["stages"]["pruned"] = stage(base, teacher=teacher)
    if distilling:
        distil_examples = load_examples(options.distil_data, base)[0] if options.distil_data else examples
        log(f"distilling for {options.distil.steps} steps on {len(distil_examples)} examples")
        losses = distil(base, teacher, distil_examples, options.distil)
        report["distil_loss"] = {"first": losses[0], "last": losses[-1]} if losses else None
        report["stages"]["distilled"] = stage(base, teacher=teacher)
    if store_dtype is not None:
        round_unquantized(base.model, store_dtype)  # measure what will be on disk
    if scheme:
        if options.gptq and scheme.kind == "int":
            log(f"GPTQ on {len(examples)} calibration examples, one decoder layer at a time")
            gptq_language_model(base, scheme, examples, scale_dtype=store_dtype, progress=options.progress)
        else:
            quantize_language_model(base.language_model, scheme, scale_dtype=store_dtype)
        report["stages"]["quantized"] = stage(base, teacher=teacher)
    _save(base, options.out, scheme is not None, store_dtype)
    if options.distil is not None and options.distil.checkpoint is not None:
        options.distil.checkpoint.unlink(missing_ok=True)  # the finished model supersedes it
    last = list(report["stages"])[-1]
    report["stages"][last]["bytes"] = _bytes(options.out)
    (options.out / "compress_report.json").write_text(json.dumps(report, indent=2))
    lineage = record_lineage(options, report, started, examples)
    log(format_report(report))
    log(f"adapters: {report['adapters']}; quantization: {report['quantization'] or 'none'}; wrote {options.out}")
    fleet = registered_in(options)
    log(f"lineage: {options.out / LINEAGE_FILE}" + (f", registered in {fleet} as {lineage.id[:12]}" if fleet else ""))
    return report


def record_lineage(options: CompressOptions, report: dict, started: str, examples: list[Example]) -> Lineage:
    """Write the compressed model's lineage.json and, when it belongs to a fleet, register and log it."""
    records, _ = read_records(options.calib)
    last = report["stages"][list(report["stages"])[-1]]
    parents = [parent_link(options.base, "compressed_from")]
    parents += [parent_link(options.adapter, "merged")] if options.adapter else []
    lineage = Lineage(
        name=options.out.name,
        kind="model",
        directory=str(options.out.resolve()),
        weights_sha256=weight_hashes(options.out),
        base={
            "path": str(options.base.resolve()),
            "name": base_model_name(options.base),
            "weights_sha256": weight_hashes(options.base),
        },
        data=[describe_data(options.calib, records, examples, skipped=0)],
        software=software(),
        hardware=hardware("cpu"),
        started=started,
        finished=utc_now(),
        parents=parents,
        compression=report,
    )
    if options.eval_data is not None and last["accuracy"] is not None:
        scores = {"format": "chat", "evaluated": utc_now(), "accuracy": last["accuracy"]}
        record_evaluation(lineage, options.eval_data, sha256_file(options.eval_data), scores)
    fleet = registered_in(options)
    write_lineage(lineage, options.out, fleet)
    if fleet is not None:
        register(fleet, lineage)
        AuditLog(fleet).append(
            "compress.finish",
            {"out": lineage.directory, "lineage_id": lineage.id, "parents": parents, "plan": report["plan"]}
            | {"quantization": report["quantization"], "weights_sha256": lineage.weights_sha256},
        )
    return lineage


def registered_in(options: CompressOptions) -> Path | None:
    """The fleet directory whose registry records the output: the one given, or the fleet the
    output lies in (FLEET/OUT or FLEET/models/OUT)."""
    if options.fleet is not None:
        return options.fleet
    nearest = list(options.out.resolve().parents)[:2]
    return next((parent for parent in nearest if FleetDir(parent).database.exists()), None)


def _describe(scheme, gptq: bool) -> str | None:
    if scheme is None:
        return None
    return f"{scheme.name}, " + ("GPTQ" if gptq and scheme.kind == "int" else "round to nearest")


def format_report(report: dict) -> str:
    header = (
        f"{'stage':<10} {'weights':>12} {'bytes':>12} {'calib loss':>10} {'KL to teacher':>14} "
        f"{'accuracy':>8} {'tokens/s':>9}"
    )
    lines = [header]
    for name, stage in report["stages"].items():
        size = f"{stage['bytes']:,}" if stage["bytes"] is not None else "-"
        kl = f"{stage['kl_to_teacher']:.4f}" if stage.get("kl_to_teacher") is not None else "-"
        accuracy = f"{stage['accuracy']:.1%}" if stage.get("accuracy") is not None else "-"
        speed = f"{stage['tokens_per_s']:.0f}" if stage.get("tokens_per_s") is not None else "-"
        lines.append(
            f"{name:<10} {stage['parameters']:>12,} {size:>12} {stage['calib_loss']:>10.4f} {kl:>14}"
            f" {accuracy:>8} {speed:>9}"
        )
    first, last = report["stages"]["original"], report["stages"][list(report["stages"])[-1]]
    if first["bytes"] and last["bytes"]:
        lines.append(f"{first['bytes'] / last['bytes']:.2f}× smaller on disk")
    return "\n".join(lines)


def _stage(
    base: FrozenBase,
    examples: list[Example],
    held_out: list[ChatRecord] | None,
    directory: Path | None = None,
    teacher: FrozenBase | None = None,
    decode_speed: Callable[[FrozenBase, list[Example]], float] | None = None,
    exact_match: Callable[[FrozenBase, list[ChatRecord]], float] | None = None,
) -> dict:
    accuracy = exact_match(base, held_out) if held_out else None
    return {
        "parameters": _weights_count(base.model),
        "bytes": _bytes(directory) if directory is not None else None,
        "calib_loss": _mean_loss(base, examples),
        "kl_to_teacher": held_out_kl(base, teacher, examples) if teacher is not None else None,
        "accuracy": accuracy,
        "tokens_per_s": decode_speed(base, examples) if decode_speed is not None else None,
    }


def _weights_count(model: torch.nn.Module) -> int:
    """Parameters, counting quantized weights too (they are buffers, not parameters)."""
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    return sum(p.numel() for p in model.parameters()) + quantized


def _bytes(directory: Path) -> int | None:
    files = list(Path(directory).glob("*.safetensors"))  # one file, or the shards of a large model
    return sum(f.stat().st_size for f in files) if files else None


def _teacher(options: CompressOptions) -> FrozenBase:
    teacher = load_base(options.base, device="cpu", dtype=torch.float32)
    if options.adapter is not None:
        _merge_adapter(teacher, options.adapter)
    return teacher


@torch.no_grad()
def _mean_loss(base: FrozenBase, examples: list[Example], batch_size: int = 8) -> float:
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], base.tokenizer.pad_token_id)
        loss = base.model(**batch.model_inputs(), labels=batch.labels, use_cache=False).loss
        tokens = int((batch.labels[:, 1:] != -100).sum())
        total, count = total + float(loss) * tokens, count + tokens
    return total / max(count, 1)


def _merge_adapter(base: FrozenBase, adapter: Path) -> None:
    from peft import PeftModel

    base.model = PeftModel.from_pretrained(base.model, adapter).merge_and_unload()


def _save(base: FrozenBase, out: Path, quantized: bool, store_dtype: torch.dtype | None) -> None:
    from transformers import AutoProcessor

    out.mkdir(parents=True, exist_ok=True)
    if quantized:
        save_quantized(base.model, out, store_dtype)
    else:
        base.model.to(store_dtype or base.dtype).save_pretrained(out)
    if base.is_multimodal:
        AutoProcessor.from_pretrained(base.path, local_files_only=True).save_pretrained(out)
    else:
        base.tokenizer.save_pretrained(out)
