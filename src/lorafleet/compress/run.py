"""`lorafleet compress`: prune a base (optionally with one adapter merged in) and report the cost.

This covers the pruning stage of prune → distil → quantize; it writes an ordinary HF model
directory plus `compress_report.json` (parameters, bytes on disk, calibration loss before/after).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafleet.compress.distil import DistilOptions, distil, held_out_kl
from lorafleet.compress.prune import PruneRequest, apply_plan, measure_importance, plan_pruning
from lorafleet.compress.quantize import Int8Linear, quantize_int8, save_quantized
from lorafleet.data.batch import collate
from lorafleet.data.dataset import load_examples
from lorafleet.data.encode import Example
from lorafleet.errors import ConfigError
from lorafleet.models.loading import BaseModel, load_base


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
    quantize: str | None = None  # "int8": weight-only int8 language model


def compress(options: CompressOptions, log=print) -> dict:
    request = options.prune or PruneRequest()
    base = load_base(options.base, device="cpu", dtype=torch.float32)
    request.validate(base.language_model.config)
    if options.adapter is not None:
        _merge_adapter(base, options.adapter)
    if options.calib is None:
        raise ConfigError("--calib FILE is needed: pruning ranks neurons and heads by activations on real data")
    examples, _ = load_examples(options.calib, base)
    examples = examples[: options.calib_limit]
    before = _stage(base, examples, options.base, None)
    plan = plan_pruning(base.language_model.config, measure_importance(base, examples), request)
    log("pruning plan:\n" + plan.describe())
    report = {
        "adapter_merged": str(options.adapter) if options.adapter else None,
        "plan": plan.removed,
        "stages": {"original": before},
    }
    if options.plan_only:
        return report
    if options.quantize not in (None, "int8"):
        raise ConfigError(f"--quantize {options.quantize!r} is not supported yet; use int8")
    if options.out is None:
        raise ConfigError("--out DIR is needed (or --plan for a dry run)")
    distilling = options.distil is not None and options.distil.steps > 0
    teacher = _teacher(options) if distilling or options.quantize else None
    apply_plan(base, plan)
    report["stages"]["pruned"] = _stage(base, examples, None, teacher)
    if distilling:
        distil_examples = load_examples(options.distil_data, base)[0] if options.distil_data else examples
        log(f"distilling for {options.distil.steps} steps on {len(distil_examples)} examples")
        losses = distil(base, teacher, distil_examples, options.distil)
        report["distil_loss"] = {"first": losses[0], "last": losses[-1]} if losses else None
        report["stages"]["distilled"] = _stage(base, examples, None, teacher)
    quantized = None
    if options.quantize:
        quantized = quantize_int8(base.language_model)
        report["stages"]["quantized"] = _stage(base, examples, None, teacher)
    _save(base, options.out, quantized)
    if options.distil is not None and options.distil.checkpoint is not None:
        options.distil.checkpoint.unlink(missing_ok=True)  # the finished model supersedes it
    last = list(report["stages"])[-1]
    report["stages"][last]["bytes"] = _bytes(options.out)
    (options.out / "compress_report.json").write_text(json.dumps(report, indent=2))
    log(format_report(report))
    return report


def format_report(report: dict) -> str:
    header = f"{'stage':<10} {'weights':>12} {'bytes':>12} {'calib loss':>10} {'KL to teacher':>14} {'tokens/s':>9}"
    lines = [header]
    for name, stage in report["stages"].items():
        size = f"{stage['bytes']:,}" if stage["bytes"] is not None else "-"
        kl = f"{stage['kl_to_teacher']:.4f}" if stage.get("kl_to_teacher") is not None else "-"
        lines.append(
            f"{name:<10} {stage['parameters']:>12,} {size:>12} {stage['calib_loss']:>10.4f} {kl:>14}"
            f" {stage['tokens_per_s']:>9.0f}"
        )
    return "\n".join(lines)


def _stage(base: BaseModel, examples: list[Example], directory: Path | None, teacher: BaseModel | None) -> dict:
    return {
        "parameters": _weights_count(base.model),
        "bytes": _bytes(directory) if directory is not None else None,
        "calib_loss": _mean_loss(base, examples),
        "kl_to_teacher": held_out_kl(base, teacher, examples) if teacher is not None else None,
        "tokens_per_s": _engine_speed(base, examples),
    }


def _engine_speed(base: BaseModel, examples: list[Example], streams: int = 16, tokens: int = 16) -> float:
    """Decode throughput of lorafleet's engine on this model: `streams` prompts, `tokens` each."""
    from lorafleet.adapters.fleet import LoRAFleet
    from lorafleet.serve.engine import Engine
    from lorafleet.serve.sampling import SamplingParams

    engine = Engine(base, LoRAFleet(base.model), max_batch=streams)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    prompts = [examples[i % len(examples)] for i in range(streams)]
    engine.submit(prompts[0], None, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    engine.run_until_idle()  # warm-up
    started = time.perf_counter()
    replies = [engine.submit(prompt, None, params) for prompt in prompts]
    engine.run_until_idle()
    seconds = time.perf_counter() - started
    return sum(list(reply)[-1].completion_tokens for reply in replies) / seconds


def _weights_count(model: torch.nn.Module) -> int:
    """Parameters, counting int8-stored weights too (they are buffers, not parameters)."""
    int8 = sum(m.weight_int8.numel() for m in model.modules() if isinstance(m, Int8Linear))
    return sum(p.numel() for p in model.parameters()) + int8


def _bytes(directory: Path) -> int | None:
    files = list(Path(directory).glob("*.safetensors"))  # model.safetensors or quantized.safetensors
    return sum(f.stat().st_size for f in files) if files else None


def _teacher(options: CompressOptions) -> BaseModel:
    teacher = load_base(options.base, device="cpu", dtype=torch.float32)
    if options.adapter is not None:
        _merge_adapter(teacher, options.adapter)
    return teacher


@torch.no_grad()
def _mean_loss(base: BaseModel, examples: list[Example], batch_size: int = 8) -> float:
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], base.tokenizer.pad_token_id)
        loss = base.model(**batch.model_inputs(), labels=batch.labels, use_cache=False).loss
        tokens = int((batch.labels[:, 1:] != -100).sum())
        total, count = total + float(loss) * tokens, count + tokens
    return total / max(count, 1)


def _merge_adapter(base: BaseModel, adapter: Path) -> None:
    from peft import PeftModel

    base.model = PeftModel.from_pretrained(base.model, adapter).merge_and_unload()


def _save(base: BaseModel, out: Path, quantized: list[str] | None) -> None:
    from transformers import AutoProcessor

    out.mkdir(parents=True, exist_ok=True)
    if quantized is None:
        base.model.save_pretrained(out)
    else:
        prefix = next(name for name, module in base.model.named_modules() if module is base.language_model)
        save_quantized(base.model, prefix, quantized, out)
    if base.is_multimodal:
        AutoProcessor.from_pretrained(base.path, local_files_only=True).save_pretrained(out)
    else:
        base.tokenizer.save_pretrained(out)
