"""`lorafleet data redact`: replace personal data in every text turn of a chat JSONL file, and
rewrite its images without their metadata.

Each record keeps its layout (InternVL `conversations` or OpenAI `messages`, string content or
content parts); only text changes. Within a record the same value always becomes the same
placeholder (`<EMAIL_1>` twice is one address, `<PERSON_2>` another person), so a conversation
about one customer still reads as one. Images are decoded and re-encoded from their pixels alone,
which drops EXIF (GPS, camera, author), XMP, ICC and text chunks; they are written beside OUT and
the records point at the copies. OUT is written atomically, IN is never touched, and a report has
counts per type, never the values.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lorafleet.data.pii import Finding, PiiDetector, email_address
from lorafleet.data.records import decode_data_url, image_fields, parse_record, read_jsonl_lines, write_atomically
from lorafleet.errors import DataError
from lorafleet.governance.lineage import sha256_file


class Placeholders:
    """`<TYPE_n>` names for the values of one record: the n-th distinct value of each type."""

    def __init__(self) -> None:
        self.names: dict[tuple[str, str], str] = {}
        self.per_type: Counter[str] = Counter()

    def name(self, finding: Finding) -> str:
        key = (finding.type, canonical_value(finding.type, finding.value))
        if key not in self.names:
            self.per_type[finding.type] += 1
            self.names[key] = f"<{finding.type}_{self.per_type[finding.type]}>"
        return self.names[key]


def canonical_value(kind: str, value: str) -> str:
    """The same person, number or address however it is written: digits only for numbers. A
    person's identifiers (data/person.py) are compared in the same form."""
    if kind == "EMAIL":
        return email_address(value)
    if kind in ("PERSON", "ORG", "LOCATION", "IP", "ADDRESS", "DATE_OF_BIRTH"):
        return " ".join(value.casefold().split()).removesuffix("'s")
    return re.sub(r"[^0-9A-Za-z]", "", value).upper()


def redact_text(text: str, detector: PiiDetector, placeholders: Placeholders, counts: Counter[str]) -> str:
    pieces, position = [], 0
    for finding in detector.find(text):
        pieces += [text[position : finding.start], placeholders.name(finding)]
        counts[finding.type] += 1
        position = finding.end
    return "".join(pieces) + text[position:]


def text_fields(raw: dict) -> Iterator[tuple[dict | list, str | int]]:
    """(container, key) of every text of a raw record, in either layout: a turn's `value`, a
    message's string `content`, a content part's `text`, and the strings in the arguments of an
    assistant's tool calls (a send_email call carries an address as surely as the text does)."""
    for turn in raw.get("conversations") or []:
        yield turn, "value"
    for message in raw.get("messages") or []:
        content = message.get("content")
        if isinstance(content, str):
            yield message, "content"
        for part in content if isinstance(content, list) else []:
            if part.get("type") == "text":
                yield part, "text"
        for call in message.get("tool_calls") or []:
            yield from _strings(call.get("function") or {}, "arguments")


def _strings(container: dict | list, key: str | int) -> Iterator[tuple[dict | list, str | int]]:
    """Every string below container[key]: arguments come as a JSON string or as an object. Inside a
    JSON string a placeholder is safe: findings never hold quotes or backslashes."""
    value = container[key] if isinstance(container, list) or key in container else None
    if isinstance(value, str):
        yield container, key
    elif isinstance(value, dict):
        for inner in value:
            yield from _strings(value, inner)
    elif isinstance(value, list):
        for index in range(len(value)):
            yield from _strings(value, index)


@dataclass
class RedactReport:
    records: int = 0
    records_changed: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    images_rewritten: int = 0
    source: Path | None = None
    out: Path | None = None

    def to_json(self) -> dict:
        return {
            "records": self.records,
            "records_changed": self.records_changed,
            "pii_counts": dict(sorted(self.counts.items())),
            "images_rewritten": self.images_rewritten,
            "out": str(self.out) if self.out else None,
        }

    def audit_summary(self) -> dict:
        """What the fleet's audit log keeps of a redaction: both files by SHA-256, counts per type."""
        files = {"in": self.source, "out": self.out}
        hashes = {f"{key}_sha256": sha256_file(path) if path else None for key, path in files.items()}
        paths = {key: str(path.resolve()) if path else None for key, path in files.items()}
        return paths | hashes | self.to_json() | {"out": paths["out"]}

    def summary(self) -> str:
        found = ", ".join(f"{kind} {n}" for kind, n in sorted(self.counts.items())) or "none"
        where = f"written to {self.out}" if self.out else "dry run, nothing written"
        return (
            f"{self.records} records, {self.records_changed} changed; replaced: {found}; "
            f"{self.images_rewritten} images rewritten without metadata; {where}"
        )


def redact_file(
    source: str | Path,
    out: str | Path,
    detector: PiiDetector,
    dry_run: bool = False,
    progress: Callable[[Iterator], Iterator] = lambda lines: lines,
) -> RedactReport:
    """Redact every record of `source` into `out` (images into `<out stem>-images/`). Any bad record
    stops the run before anything is written, naming its file:line."""
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve():
        raise DataError(f"OUT is IN ({source}); redaction never overwrites its input, name another file")
    report = RedactReport(source=source)
    images = ImageRewriter(source.parent, out.parent / f"{out.stem}-images", dry_run)
    lines = []
    for number, line in progress(read_jsonl_lines(source)):
        where = f"{source}:{number}"
        parse_record(line, source.parent, where)  # the trainer's checks: a bad record stops here
        raw = json.loads(line)
        changed = redact_record(raw, detector, report.counts)
        report.images_rewritten += images.rewrite(raw, where)
        parse_record(json.dumps(raw), out.parent, where)  # still a record the trainer reads
        report.records += 1
        report.records_changed += changed
        lines.append(json.dumps(raw, ensure_ascii=False))
    if not dry_run:
        write_atomically(out, "".join(line + "\n" for line in lines))
        report.out = out
    return report


def redact_record(raw: dict, detector: PiiDetector, counts: Counter[str]) -> bool:
    placeholders, changed = Placeholders(), False
    for container, key in text_fields(raw):
        redacted = redact_text(container[key], detector, placeholders, counts)
        changed |= redacted != container[key]
        container[key] = redacted
    return changed


class ImageRewriter:
    """Copies of a record's images with pixels only; data-URL images are re-encoded in place."""

    def __init__(self, source_root: Path, out_dir: Path, dry_run: bool):
        self.source_root, self.out_dir, self.dry_run = source_root, out_dir, dry_run
        self.written: dict[Path, str] = {}  # one copy per source image, however many records use it

    def rewrite(self, raw: dict, where: str) -> int:
        count = 0
        for container, key in image_fields(raw):
            ref = container[key]
            if ref.startswith("data:"):
                container[key] = self._data_url(ref, where)
            else:
                container[key] = self._file(ref.removeprefix("file://"), where)
            count += 1
        return count

    def _file(self, name: str, where: str) -> str:
        path = (self.source_root / name).resolve()
        if path not in self.written:
            with _open_image(path, where) as image:
                suffix = path.suffix if path.suffix.lower() in _FORMATS else ".png"
                target = self.out_dir / f"{len(self.written):06d}{suffix}"
                if not self.dry_run:
                    self.out_dir.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(strip_metadata(image, _FORMATS.get(suffix.lower(), "PNG")))
            self.written[path] = f"{self.out_dir.name}/{target.name}"
        return self.written[path]

    def _data_url(self, url: str, where: str) -> str:
        with _open_image(io.BytesIO(decode_data_url(url, where)), where) as image:
            fmt = image.format if image.format in ("PNG", "JPEG", "WEBP") else "PNG"
            encoded = base64.b64encode(strip_metadata(image, fmt)).decode()
        return f"data:image/{fmt.lower()};base64,{encoded}"


_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".gif": "GIF"}


def _open_image(source: Path | io.BytesIO, where: str) -> Image.Image:
    try:
        return Image.open(source)
    except FileNotFoundError as err:
        raise DataError(f"{where}: image {source} does not exist") from err
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(
            f"{where}: cannot read image {source if isinstance(source, Path) else '(data URL)'}: {err}"
        ) from err


def strip_metadata(image: Image.Image, fmt: str) -> bytes:
    """The image re-encoded from its pixels (and palette) alone: no EXIF, XMP, ICC or text chunks."""
    image.load()
    clean = Image.frombytes(image.mode, image.size, image.tobytes())
    if image.mode == "P":
        clean.putpalette(image.getpalette())
    if fmt == "JPEG" and clean.mode not in ("RGB", "L", "CMYK"):
        clean = clean.convert("RGB")
    buffer = io.BytesIO()
    clean.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()
