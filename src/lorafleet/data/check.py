"""`lorafleet data check`: what is in a set of chat JSONL files before anything trains on them.

Per file: records and turns, tokens per record as training would encode them (chat template,
image tokens included, with a model's own tokenizer and tiling), images with their sizes and tiles,
malformed records by file:line, exact and near duplicates (`dedup`), and personal data by type
(`pii`; counts only). Across files: records of a later file that duplicate a record of an earlier
one, e.g. a held-out set that leaks into training (give the training file first).
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.data.dedup import Dropped, DuplicateIndex, ImageHash, ImageIndex, hash_image, record_text
from lorafleet.data.encode import encode_record, tile_images
from lorafleet.data.pii import PiiDetector
from lorafleet.data.records import ChatRecord, parse_record, read_jsonl
from lorafleet.errors import DataError
from lorafleet.governance.lineage import sha256_file
from lorafleet.models.loading import FrozenBase

EXAMPLES = 5  # duplicates and errors listed per file in the text report; --json holds them all


@dataclass
class FileCheck:
    path: Path
    records: int = 0
    turns: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    image_sizes: Counter[str] = field(default_factory=Counter)
    tiles: Counter[int] = field(default_factory=Counter)
    duplicate_images: int = 0
    errors: list[str] = field(default_factory=list)
    duplicates: list[Dropped] = field(default_factory=list)
    pii: Counter[str] = field(default_factory=Counter)
    pii_types: list[str] = field(default_factory=list)  # every type looked for, found or not
    index: DuplicateIndex | None = None
    sources: list[str] = field(default_factory=list)  # file:line of each record in `index`

    @property
    def images(self) -> int:
        return sum(self.image_sizes.values())

    def pii_counts(self) -> dict[str, int]:
        """Findings per type, with 0 for each type looked for and not found."""
        return {kind: self.pii[kind] for kind in sorted(set(self.pii_types) | set(self.pii))}

    def to_json(self) -> dict:
        kinds = Counter(d.kind for d in self.duplicates)
        return {
            "path": str(self.path),
            "records": self.records,
            "errors": {"count": len(self.errors), "all": self.errors},
            "turns": _spread(self.turns),
            "tokens": _spread(self.tokens) | {"total": sum(self.tokens), "histogram": histogram(self.tokens)},
            "images": {
                "count": self.images,
                "sizes": dict(self.image_sizes.most_common()),
                "tiles_per_image": {str(k): v for k, v in sorted(self.tiles.items())},
                "duplicates": self.duplicate_images,
            },
            "duplicates": {"exact": kinds["exact"], "near": kinds["near"], "all": _described(self.duplicates)},
            "pii": self.pii_counts(),
        }


@dataclass
class Overlap:
    file: Path
    against: Path
    matches: list[Dropped]

    def to_json(self) -> dict:
        kinds = Counter(m.kind for m in self.matches)
        return {
            "file": str(self.file),
            "against": str(self.against),
            "exact": kinds["exact"],
            "near": kinds["near"],
            "all": _described(self.matches),
        }


@dataclass
class CheckReport:
    files: list[FileCheck]
    overlaps: list[Overlap]
    tokenizer: str
    threshold: float

    @property
    def errors(self) -> int:
        return sum(len(f.errors) for f in self.files)

    def audit_summary(self) -> dict:
        """What the fleet's audit log keeps of a check: each file by SHA-256, its counts, no values."""
        files = []
        for check in self.files:
            kinds = Counter(d.kind for d in check.duplicates)
            readable = check.path.is_file() and check.records > 0
            files.append(
                {
                    "path": str(check.path.resolve()),
                    "sha256": sha256_file(check.path) if readable else None,
                    "records": check.records,
                    "errors": len(check.errors),
                    "tokens": sum(check.tokens),
                    "images": check.images,
                    "duplicates": {"exact": kinds["exact"], "near": kinds["near"]},
                    "pii": check.pii_counts(),
                }
            )
        overlaps = [
            {"file": str(o.file.resolve()), "against": str(o.against.resolve()), "records": len(o.matches)}
            for o in self.overlaps
        ]
        return {"tokenizer": self.tokenizer, "files": files, "overlaps": overlaps}

    def to_json(self) -> dict:
        return {
            "tokenizer": self.tokenizer,
            "near_duplicate_threshold": self.threshold,
            "errors": self.errors,
            "files": [f.to_json() for f in self.files],
            "overlaps": [o.to_json() for o in self.overlaps],
        }


def check_files(
    paths: Iterable[str | Path],
    base: FrozenBase,
    tokenizer: str,
    detector: PiiDetector | None = None,
    threshold: float = 0.8,
    max_tiles: int | None = None,
    progress: Callable[[list, str], Iterable] = lambda items, label: items,
    max_seq_len: int = 4096,
) -> CheckReport:
    """Check every file; a file that cannot be read at all is one error, the others go on. A record
    longer than `max_seq_len` tokens is an error, as it is for the trainer."""
    checker = _Checker(base, detector or PiiDetector(), threshold, max_tiles, max_seq_len)
    for path in map(Path, paths):
        checker.check_file(path, progress)
    return CheckReport(checker.files, checker.overlaps, tokenizer, threshold)


class _Checker:
    """One pass over the files: each record is parsed, encoded, hashed and scanned once, and
    compared with the records of the files checked before it."""

    def __init__(self, base: FrozenBase, detector: PiiDetector, threshold: float, max_tiles, max_seq_len: int):
        self.base, self.detector, self.threshold = base, detector, threshold
        self.max_tiles, self.max_seq_len = max_tiles, max_seq_len
        self.images = ImageIndex()  # across files: a picture seen in any earlier record
        self.files: list[FileCheck] = []
        self.overlaps: list[Overlap] = []

    def check_file(self, path: Path, progress: Callable[[list, str], Iterable]) -> None:
        check = FileCheck(path, pii_types=self.detector.types, index=DuplicateIndex(self.threshold))
        try:
            read = read_jsonl(path)
        except DataError as err:
            check.errors.append(str(err))
            self.files.append(check)
            return
        undecodable = list(read.errors)  # lines that are not UTF-8: errors, in line order with the others
        earlier = [f for f in self.files if f.records]
        matches: dict[Path, list[Dropped]] = {f.path: [] for f in earlier}
        for number, line in progress(read.lines, path.name):
            while undecodable and undecodable[0][0] < number:
                check.errors.append(undecodable.pop(0)[1])
            self._check_line(check, line, f"{path}:{number}", earlier, matches)
        check.errors += [message for _, message in undecodable]
        self.overlaps += [Overlap(path, against, found) for against, found in matches.items()]
        self.files.append(check)

    def _check_line(self, check: FileCheck, line: str, source: str, earlier: list[FileCheck], matches) -> None:
        try:
            record = parse_record(line, check.path.parent, source)
            loaded = record.load_images()
            tokens = encode_record(record, self.base, self.max_tiles, self.max_seq_len).num_tokens
            tiles = tile_images(record, self.base, self.max_tiles)[1] if record.images else []
        except DataError as err:
            check.errors.append(str(err))
            return
        check.records += 1
        check.turns.append(len(record.messages))
        check.tokens.append(tokens)
        hashes = [hash_image(image) for image in loaded]
        for image, image_hash, count in zip(loaded, hashes, tiles, strict=True):
            check.image_sizes[f"{image.width}x{image.height}"] += 1
            check.tiles[count] += 1
            if self.images.find(image_hash) is None:
                self.images.add(image_hash)
            else:
                check.duplicate_images += 1
        for message in record.messages:
            check.pii.update(finding.type for finding in self.detector.find(message.text))
        self._find_duplicates(check, record, hashes, earlier, matches)

    @staticmethod
    def _find_duplicates(check: FileCheck, record: ChatRecord, hashes: list[ImageHash], earlier, matches) -> None:
        text = record_text(record)
        for other in earlier:
            if (match := other.index.find(text, hashes)) is not None:
                matches[other.path].append(
                    Dropped(record.source, other.sources[match.of], match.kind, match.similarity)
                )
        match = check.index.find(text, hashes)
        if match is not None:
            check.duplicates.append(Dropped(record.source, check.sources[match.of], match.kind, match.similarity))
        else:
            check.index.add(text, hashes)
            check.sources.append(record.source)


def histogram(values: list[int], bins: int = 10) -> dict:
    """Equal-width bins over [min, max]: edges (bins + 1) and counts."""
    if not values:
        return {"edges": [], "counts": []}
    low, high = min(values), max(values)
    width = max(1, -(-(high - low + 1) // bins))
    edges = [low + i * width for i in range(bins + 1) if low + (i - 1) * width <= high]
    counts = [0] * (len(edges) - 1)
    for value in values:
        counts[min((value - low) // width, len(counts) - 1)] += 1
    return {"edges": edges, "counts": counts}


def _spread(values: list[int]) -> dict:
    if not values:
        return {"min": 0, "median": 0, "mean": 0.0, "max": 0}
    return {
        "min": min(values),
        "median": statistics.median(values),
        "mean": round(statistics.fmean(values), 2),
        "max": max(values),
    }


def _described(items: list[Dropped]) -> list[dict]:
    return [
        {"record": d.source, "duplicate_of": d.duplicate_of, "kind": d.kind, "similarity": round(d.similarity, 3)}
        for d in items
    ]


def one_line(check: FileCheck) -> str:
    """A file in one line: records, tokens, images, errors, duplicates, personal data."""
    if check.records == 0 and check.errors:
        return f"{check.path.name}: {check.errors[0]}"
    tokens = _spread(check.tokens)
    kinds = Counter(d.kind for d in check.duplicates)
    pii = ", ".join(f"{kind} {n}" for kind, n in sorted(check.pii.items())) or "none"
    return (
        f"{check.path.name}: {check.records} records, tokens/record {tokens['min']}-{tokens['max']} "
        f"(median {tokens['median']:g}), {check.images} images, {len(check.errors)} malformed, "
        f"duplicates {kinds['exact']} exact + {kinds['near']} near, PII: {pii}"
    )


def format_report(report: CheckReport) -> str:
    lines = [f"tokens counted with {report.tokenizer}", ""]
    for check in report.files:
        lines += [one_line(check)]
        if not check.records:
            lines += [f"  error: {error}" for error in check.errors[1:EXAMPLES]] + [""]
            continue
        turns = _spread(check.turns)
        lines += [f"  turns/record {turns['min']}-{turns['max']} (mean {turns['mean']})"]
        if check.images:
            sizes = ", ".join(f"{size} x{n}" for size, n in check.image_sizes.most_common(4))
            tiles = ", ".join(f"{k} tiles: {v}" for k, v in sorted(check.tiles.items()))
            lines += [f"  images: {sizes}; {tiles}; {check.duplicate_images} seen before (same or near-same picture)"]
        lines += ["  tokens per record:"] + [f"    {row}" for row in text_histogram(check.tokens)]
        lines += [f"  error: {error}" for error in check.errors[:EXAMPLES]]
        if len(check.errors) > EXAMPLES:
            lines += [f"  ... and {len(check.errors) - EXAMPLES} more errors (all in --json)"]
        lines += [f"  {_describe(d)}" for d in check.duplicates[:EXAMPLES]]
        if len(check.duplicates) > EXAMPLES:
            lines += [f"  ... and {len(check.duplicates) - EXAMPLES} more duplicates (all in --json)"]
        lines += [""]
    for overlap in (o for o in report.overlaps if o.matches):
        lines += [f"overlap: {len(overlap.matches)} records of {overlap.file} duplicate records of {overlap.against}"]
        lines += [f"  {_describe(d)}" for d in overlap.matches[:EXAMPLES]]
        if len(overlap.matches) > EXAMPLES:
            lines += [f"  ... and {len(overlap.matches) - EXAMPLES} more (all in --json)"]
    verdict = f"{report.errors} errors" if report.errors else "no errors"
    return "\n".join(lines + [verdict])


def _describe(item: Dropped) -> str:
    return f"{item.source} is a{'n' if item.kind == 'exact' else ''} {item.kind} duplicate of {item.duplicate_of} " + (
        f"(Jaccard {item.similarity:.2f})" if item.kind == "near" else ""
    )


def text_histogram(values: list[int], width: int = 40) -> list[str]:
    bins = histogram(values)
    if not bins["counts"]:
        return []
    top = max(bins["counts"])
    return [
        f"{low:>6}-{high - 1:<6} {'#' * round(width * count / top):<{width}} {count}"
        for low, high, count in zip(bins["edges"][:-1], bins["edges"][1:], bins["counts"], strict=True)
    ]


def write_histogram(report: CheckReport, png: str | Path) -> Path:
    """Tokens per record of every file, one panel each, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [check for check in report.files if check.tokens]
    figure, axes = plt.subplots(len(shown) or 1, 1, figsize=(7, 2.4 * max(1, len(shown))), squeeze=False)
    for axis, check in zip(axes[:, 0], shown, strict=False):
        bins = histogram(check.tokens, bins=30)
        axis.hist(check.tokens, bins=bins["edges"], color="#4c72b0", edgecolor="white")
        axis.set_title(f"{check.path.name}: {check.records} records", fontsize=9)
        axis.set_xlabel("tokens per record")
        axis.set_ylabel("records")
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)
    return Path(png)


def counting_base(base_dir: str | Path | None) -> tuple[FrozenBase, str]:
    """A model's tokenizer and image processor (its weights are not read), and how to name them in
    the report. Without a model directory, the built-in tiny model's (the demo's)."""
    import tempfile

    from lorafleet.models.loading import load_base
    from lorafleet.models.tiny import build_tiny_internvl

    if base_dir is not None:
        return load_base(base_dir, device="cpu", weights=False), f"the tokenizer of {base_dir}"
    with tempfile.TemporaryDirectory() as scratch:
        base = load_base(build_tiny_internvl(Path(scratch) / "tiny"), device="cpu", weights=False)
    return base, "the built-in tiny model's tokenizer and tiling (pass --base MODEL_DIR to count for your model)"
