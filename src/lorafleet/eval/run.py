"""Evaluate the base and a fleet's adapters on one held-out file, decoded by the serving engine.

Every (question, model) pair is submitted to lorafleet's engine at once, so the base and all the
adapters are decoded together in mixed batches, greedily, as `lorafleet serve` would answer them
(images tiled as each adapter was trained). Scores are tallied per model, overall, per subfield
and per difficulty (MMMU's `topic_difficulty`), with the number of answers that could not be
parsed; every answer is kept beside the gold answer it was scored against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorafleet.adapters.fleet import LoRAFleet
from lorafleet.adapters.peft_io import load_adapter, training_settings
from lorafleet.data.encode import Example, encode_prompt
from lorafleet.data.records import ChatRecord
from lorafleet.errors import ConfigError, DataError
from lorafleet.eval.chat import read_chats
from lorafleet.eval.greedy import GreedyRequest, decode_greedy
from lorafleet.eval.mmmu import DIFFICULTIES, is_mmmu_file, read_mmmu
from lorafleet.fleet_dir import FleetDir, find_base_dir, fleet_adapters
from lorafleet.governance.audit import AuditLog, utc_now
from lorafleet.governance.lineage import record_evaluation, sha256_file, weight_hashes, weights_id, write_lineage
from lorafleet.governance.registry import Registry
from lorafleet.models.loading import FrozenBase, load_base

BASE = "base"


@dataclass
class Judgement:
    correct: bool
    parsed: bool = True
    f1: float | None = None


@dataclass
class Item:
    id: str
    prompt: ChatRecord
    subfield: str
    judge: Callable[[str], Judgement]
    gold: str | list[str]  # the answer the judge scores against, as the file gives it
    difficulty: str = ""


@dataclass
class Tally:
    questions: int = 0
    correct: int = 0
    unparseable: int = 0
    f1_sum: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / self.questions if self.questions else 0.0

    def add(self, judgement: Judgement) -> None:
        self.questions += 1
        self.correct += judgement.correct
        self.unparseable += not judgement.parsed
        self.f1_sum += judgement.f1 or 0.0


@dataclass
class EvalOptions:
    fleet_dir: Path
    data: Path
    adapters: list[str] | None = None  # None: every adapter of the fleet
    base_dir: Path | None = None  # default: <fleet>/base, or the base the adapters name
    max_tokens: int = 64
    max_batch: int = 32


@dataclass
class EvalReport:
    data: str
    format: str  # "chat" | "mmmu"
    models: list[str]
    overall: dict[str, Tally]
    by_subfield: dict[str, dict[str, Tally]]
    by_difficulty: dict[str, dict[str, Tally]] = field(default_factory=dict)  # Easy, Medium, Hard first
    answers: list[dict] = field(default_factory=list)  # id, model, reply, gold, correct, parsed (chat: token_f1)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict:
        def tallies(by_model: dict[str, Tally]) -> dict:
            return {m: {**asdict(t), "accuracy": t.accuracy} | _f1(t, self.format) for m, t in by_model.items()}

        report = {k: v for k, v in asdict(self).items() if k not in ("overall", "by_subfield", "by_difficulty")}
        report["overall"] = tallies(self.overall)
        report["by_subfield"] = {name: tallies(by_model) for name, by_model in self.by_subfield.items()}
        report["by_difficulty"] = {name: tallies(by_model) for name, by_model in self.by_difficulty.items()}
        report["tokens_per_s"] = self.tokens_per_s
        return report


def _f1(tally: Tally, kind: str) -> dict:
    return {"token_f1": tally.f1_sum / tally.questions if tally.questions else 0.0} if kind == "chat" else {}


def read_items(path: Path) -> tuple[str, list[Item]]:
    if not path.exists():
        raise DataError(f"evaluation data {path} does not exist")
    if is_mmmu_file(path):
        questions = read_mmmu(path)
        return "mmmu", [Item(q.id, q.prompt(), q.subfield, _mmmu_judge(q), q.answer, q.difficulty) for q in questions]
    return "chat", [Item(q.id, q.record, "", _chat_judge(q), q.answer) for q in read_chats(path)]


def _mmmu_judge(question) -> Callable[[str], Judgement]:
    return lambda reply: Judgement(*question.score(reply))


def _chat_judge(question) -> Callable[[str], Judgement]:
    def judge(reply: str) -> Judgement:
        exact, f1 = question.score(reply)
        return Judgement(exact, bool(reply.strip()), f1)

    return judge


def evaluate(options: EvalOptions, progress: bool = True) -> EvalReport:
    kind, items = read_items(options.data)
    base = load_base(options.base_dir or find_base_dir(options.fleet_dir))
    fleet = LoRAFleet(base.model, base.language_prefix)
    tiling = {BASE: None} | _load_adapters(fleet, options)
    replies, (prompt_tokens, completion_tokens, seconds) = decode_all(base, fleet, items, tiling, options, progress)
    report = score(str(options.data), kind, items, list(tiling), replies)
    report.prompt_tokens, report.completion_tokens, report.seconds = prompt_tokens, completion_tokens, seconds
    record_in_registry(options.fleet_dir, options.data, report)
    return report


def record_in_registry(fleet_dir: Path, data: Path, report: EvalReport) -> list[str]:
    """Store each registered adapter's scores in its lineage record (the fleet's registry and its
    lineage.json, keyed by the held-out file's SHA-256, with its path) and log the evaluation; a
    fleet without a registry is left alone. Returns the adapters recorded."""
    scores = {
        name: {"accuracy": tally.accuracy, "questions": tally.questions, "unparseable": tally.unparseable}
        | _f1(tally, report.format)
        for name, tally in report.overall.items()
    }
    return record_scores(fleet_dir, data, report.format, scores)


def record_scores(fleet_dir: Path, data: Path, kind: str, scores: dict[str, dict]) -> list[str]:
    """`record_in_registry` for any evaluation: `scores` maps each model to its numbers. Each
    adapter's record keeps the base's accuracy on the same file beside its own (`base_accuracy`),
    so that what an adapter adds can be read from its record alone."""
    if not FleetDir(fleet_dir).database.exists():
        return []
    data_sha256, adapters, recorded = sha256_file(data), fleet_adapters(fleet_dir), {}
    base_accuracy = scores.get(BASE, {}).get("accuracy")
    registry = Registry(fleet_dir)
    try:
        for name, numbers in scores.items():
            lineage = registry.get(weights_id(weight_hashes(adapters[name]))) if name in adapters else None
            if lineage is None:
                continue
            against_base = {"base_accuracy": base_accuracy} if base_accuracy is not None and name != BASE else {}
            record_evaluation(
                lineage, data, data_sha256, {"format": kind, "evaluated": utc_now()} | numbers | against_base
            )
            registry.add(lineage)
            write_lineage(lineage, adapters[name], fleet_dir)
            recorded[name] = lineage.id
    finally:
        registry.close()
    overall = {model: numbers.get("accuracy", numbers.get("prefers_chosen")) for model, numbers in scores.items()}
    AuditLog(fleet_dir).append(
        "eval.finish", {"data": str(data), "data_sha256": data_sha256, "accuracy": overall, "lineage_ids": recorded}
    )
    return sorted(recorded)


def score(data: str, kind: str, items: list[Item], models: list[str], replies: list[str]) -> EvalReport:
    """Tally the replies of every model to every item (item-major, as `decode_all` returns them)."""
    report = EvalReport(data, kind, models, {m: Tally() for m in models}, {})
    for (item, model), reply in zip([(i, m) for i in items for m in models], replies, strict=True):
        judgement = item.judge(reply)
        report.overall[model].add(judgement)
        for group, name in ((report.by_subfield, item.subfield), (report.by_difficulty, item.difficulty)):
            if name:
                group.setdefault(name, {m: Tally() for m in models})[model].add(judgement)
        report.answers.append(_answer(item, model, reply, judgement))
    report.by_difficulty = dict(sorted(report.by_difficulty.items(), key=lambda entry: _difficulty_rank(entry[0])))
    return report


def _answer(item: Item, model: str, reply: str, judgement: Judgement) -> dict:
    """One line of the answers JSON: the reply beside the gold answer it was scored against."""
    answer = {"id": item.id, "model": model, "reply": reply, "gold": item.gold}
    answer |= {"correct": judgement.correct, "parsed": judgement.parsed}
    return answer | ({"token_f1": judgement.f1} if judgement.f1 is not None else {})


def _difficulty_rank(name: str) -> tuple[int, str]:
    """MMMU's difficulties in their own order, any others after them by name."""
    return (DIFFICULTIES.index(name), "") if name in DIFFICULTIES else (len(DIFFICULTIES), name)


def _load_adapters(fleet: LoRAFleet, options: EvalOptions) -> dict[str, int | None]:
    available = fleet_adapters(options.fleet_dir) if FleetDir(options.fleet_dir).adapters.exists() else {}
    names = options.adapters if options.adapters is not None else sorted(available)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ConfigError(
            f"--adapters: {', '.join(unknown)} not in {FleetDir(options.fleet_dir).adapters} "
            f"(it holds: {', '.join(sorted(available)) or 'none'})"
        )
    tiling = {}
    for name in names:
        load_adapter(fleet, name, available[name])
        tiling[name] = training_settings(available[name]).get("max_tiles")  # as `lorafleet serve` tiles
    return tiling


def decode_all(
    base: FrozenBase,
    fleet: LoRAFleet,
    items: list[Item],
    tiling: dict[str, int | None],
    options: EvalOptions,
    progress: bool,
) -> tuple[list[str], tuple[int, int, float]]:
    """Greedy replies of every model to every item (item-major), and (prompt tokens, completion
    tokens, seconds) of the decoding."""
    prompts: dict[tuple[int, int | None], Example] = {}
    for index, item in enumerate(items):
        for tiles in set(tiling.values()):
            prompts[index, tiles] = encode_prompt(item.prompt, base, tiles)
    requests = [
        GreedyRequest(prompts[index, tiling[model]], None if model == BASE else model, f"{item.id} ({model})")
        for index, item in enumerate(items)
        for model in tiling
    ]
    decoded = decode_greedy(base, fleet, requests, options.max_tokens, options.max_batch, progress)
    return decoded.replies, (decoded.prompt_tokens, decoded.completion_tokens, decoded.seconds)


def format_report(report: EvalReport) -> str:
    """Accuracy of every model, overall, per subfield and per difficulty, with counts and unparseable
    answers."""
    width = max(12, *(len(m) for m in report.models))
    header = f"{'':<24} {'questions':>9} " + " ".join(f"{m:>{width}}" for m in report.models)
    lines = [header, "-" * len(header)]
    rows = [("overall", report.overall)] + sorted(report.by_subfield.items())
    rows += [(f"difficulty: {name}", by_model) for name, by_model in report.by_difficulty.items()]
    for name, by_model in rows:
        questions = next(iter(by_model.values())).questions
        cells = [f"{t.accuracy:>6.1%} ({t.correct})".rjust(width) for t in by_model.values()]
        lines.append(f"{name[:24]:<24} {questions:>9} " + " ".join(cells))
    lines.append(
        f"{'unparseable':<24} {'':>9} " + " ".join(f"{t.unparseable:>{width}}" for t in report.overall.values())
    )
    if report.format == "chat":
        f1 = [f"{t.f1_sum / max(t.questions, 1):.3f}".rjust(width) for t in report.overall.values()]
        lines.append(f"{'token F1':<24} {'':>9} " + " ".join(f1))
    lines.append(
        f"{report.completion_tokens} tokens generated in {report.seconds:.1f} s: {report.tokens_per_s:,.1f} tokens/s "
        f"({report.prompt_tokens} prompt tokens)"
    )
    return "\n".join(lines)
