"""Exact and near-duplicate records, and `lorafleet data dedup`.

Threshold semantics. A record's text is all its turns, role by role, normalised (Unicode NFKC,
case-folded, punctuation dropped, whitespace collapsed) and cut into word shingles of K = 3
consecutive words (a text of fewer words is one shingle). Two records are

- *exact* duplicates when their normalised texts are equal and their images have the same pixels;
- *near* duplicates when the Jaccard similarity |A ∩ B| / |A ∪ B| of their shingle sets is at
  least the threshold (default 0.8) and their images look alike (same number; each pair within
  IMAGE_BITS of 64 bits of difference hash and within THUMBNAIL_TOLERANCE levels on average on an
  8x8 colour thumbnail).

MinHash LSH (`datasketch`, 128 permutations) only proposes candidate pairs: its bands are chosen
so that a pair at the threshold is missed with probability below MAX_MISS (1e-4), and each
candidate's Jaccard is then computed exactly from the shingle sets. The reported
similarity is that exact Jaccard. The first record of a group is kept; later ones are dropped.

Images are hashed twice: SHA-256 of the decoded pixels (exact) and a 64-bit difference hash
(dHash: the sign of horizontal gradients on a 9x8 grey thumbnail), which survives re-encoding,
resizing and small edits; as dHash cannot tell a red square from a blue one, nor tell apart flat
shapes that sit in different places on a plain background (the demo's pictures), a near match must
also agree on an 8x8 colour thumbnail. Both are a few lines of Pillow, so we take no dependency.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from datasketch import MinHash, MinHashLSH
from PIL import Image

from lorafleet.data.join import relocated
from lorafleet.data.records import ChatRecord, parse_record, read_jsonl_lines, write_atomically
from lorafleet.errors import DataError
from lorafleet.governance.lineage import sha256_file

SHINGLE_WORDS = 3
NUM_PERM = 128
MAX_MISS = 1e-4
IMAGE_BITS = 4  # dHash bits two images may differ in and still count as the same picture
THUMBNAIL_TOLERANCE = 8  # and the mean difference of their 8x8 colour thumbnails, in 0..255 levels


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold().replace("<image>", " ")
    return " ".join(re.sub(r"[^\w]+", " ", text).split())


def shingles(text: str, k: int = SHINGLE_WORDS) -> set[str]:
    words = normalise(text).split()
    if len(words) < k:
        return {" ".join(words)}
    return {" ".join(words[i : i + k]) for i in range(len(words) - k + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def record_text(record: ChatRecord) -> str:
    return "\n".join(f"{m.role}: {m.text}" for m in record.messages)


@dataclass(frozen=True)
class ImageHash:
    pixels: str  # SHA-256 of the RGB pixels
    dhash: int  # 64-bit difference hash
    thumbnail: bytes  # 8x8 RGB: dHash is blind to colour and to where flat shapes sit

    def looks_like(self, other: ImageHash) -> bool:
        if self.pixels == other.pixels:
            return True
        if (self.dhash ^ other.dhash).bit_count() > IMAGE_BITS:
            return False
        difference = sum(abs(a - b) for a, b in zip(self.thumbnail, other.thumbnail, strict=True))
        return difference <= THUMBNAIL_TOLERANCE * len(self.thumbnail)


def hash_image(image: Image.Image) -> ImageHash:
    rgb = image.convert("RGB")
    grey = rgb.convert("L").resize((9, 8), Image.Resampling.LANCZOS)
    values = list(grey.getdata())
    bits = 0
    for row in range(8):
        for col in range(8):
            bits = bits << 1 | (values[row * 9 + col] < values[row * 9 + col + 1])
    thumbnail = rgb.resize((8, 8), Image.Resampling.BOX).tobytes()
    return ImageHash(hashlib.sha256(rgb.tobytes()).hexdigest(), bits, thumbnail)


@dataclass(frozen=True)
class Match:
    of: int  # index of the earlier record
    kind: str  # "exact" | "near"
    similarity: float  # exact Jaccard of the shingle sets


@dataclass
class _Entry:
    shingles: set[str]
    images: list[ImageHash]


class DuplicateIndex:
    """Records added so far; `find` says which earlier one a record duplicates, if any."""

    def __init__(self, threshold: float = 0.8, k: int = SHINGLE_WORDS):
        if not 0.0 < threshold <= 1.0:
            raise DataError(f"the near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold, self.k = threshold, k
        self.lsh = MinHashLSH(num_perm=NUM_PERM, params=lsh_bands(threshold))
        self.exact: dict[str, int] = {}
        self.entries: list[_Entry] = []

    def find(self, text: str, images: list[ImageHash]) -> Match | None:
        key = _exact_key(text, images)
        if key in self.exact:
            return Match(self.exact[key], "exact", 1.0)
        entry = _Entry(shingles(text, self.k), images)
        best = None
        for candidate in self.lsh.query(_minhash(entry.shingles)):
            earlier = self.entries[candidate]
            similarity = jaccard(entry.shingles, earlier.shingles)
            if similarity >= self.threshold and _images_alike(images, earlier.images):
                if best is None or (similarity, -candidate) > (best.similarity, -best.of):
                    best = Match(candidate, "near", similarity)
        return best

    def add(self, text: str, images: list[ImageHash]) -> int:
        index = len(self.entries)
        entry = _Entry(shingles(text, self.k), images)
        self.entries.append(entry)
        self.exact.setdefault(_exact_key(text, images), index)
        self.lsh.insert(index, _minhash(entry.shingles))
        return index


def lsh_bands(threshold: float) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest spurious candidates) for which a pair with
    Jaccard `threshold` shares no band with probability (1 - t^rows)^bands below MAX_MISS."""
    rows = 1
    while rows < NUM_PERM and (1 - threshold ** (rows + 1)) ** (NUM_PERM // (rows + 1)) < MAX_MISS:
        rows += 1
    return NUM_PERM // rows, rows


def _exact_key(text: str, images: list[ImageHash]) -> str:
    return hashlib.sha256("\0".join([normalise(text), *(i.pixels for i in images)]).encode()).hexdigest()


def _minhash(items: set[str]) -> MinHash:
    minhash = MinHash(num_perm=NUM_PERM, seed=1)
    minhash.update_batch([item.encode() for item in items])
    return minhash


def _images_alike(a: list[ImageHash], b: list[ImageHash]) -> bool:
    return len(a) == len(b) and all(x.looks_like(y) for x, y in zip(a, b, strict=True))


class ImageIndex:
    """Images seen so far, found again by exact pixels or by a dHash within IMAGE_BITS bits. The
    64 bits are cut into IMAGE_BITS + 1 bands: two hashes that close share at least one band."""

    def __init__(self) -> None:
        self.hashes: list[ImageHash] = []
        self.bands: dict[tuple[int, int], list[int]] = defaultdict(list)

    def find(self, image: ImageHash) -> int | None:
        candidates = sorted({i for band in _bands(image.dhash) for i in self.bands.get(band, [])})
        return next((i for i in candidates if self.hashes[i].looks_like(image)), None)

    def add(self, image: ImageHash) -> int:
        self.hashes.append(image)
        for band in _bands(image.dhash):
            self.bands[band].append(len(self.hashes) - 1)
        return len(self.hashes) - 1


def _bands(bits: int) -> Iterator[tuple[int, int]]:
    width = -(-64 // (IMAGE_BITS + 1))
    for band in range(IMAGE_BITS + 1):
        yield band, bits >> (band * width) & ((1 << width) - 1)


@dataclass(frozen=True)
class Dropped:
    source: str  # file:line of the dropped record
    duplicate_of: str  # file:line of the record kept
    kind: str
    similarity: float


def record_images(record: ChatRecord) -> list[ImageHash]:
    return [hash_image(image) for image in record.load_images()] if record.images else []


def dedup_file(
    source: str | Path,
    out: str | Path,
    threshold: float = 0.8,
    progress: Callable[[Iterator], Iterator] = lambda lines: lines,
) -> tuple[int, list[Dropped]]:
    """Write the records of `source` to `out` without exact and near duplicates (the first of each
    group stays); return how many were kept and what was dropped, and why."""
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve():
        raise DataError(f"OUT is IN ({source}); dedup never overwrites its input, name another file")
    index = DuplicateIndex(threshold)
    kept_lines, kept_sources, dropped = [], [], []
    for number, line in progress(read_jsonl_lines(source)):
        record = parse_record(line, source.parent, f"{source}:{number}")
        text, images = record_text(record), record_images(record)
        match = index.find(text, images)
        if match is not None:
            dropped.append(Dropped(record.source, kept_sources[match.of], match.kind, match.similarity))
            continue
        index.add(text, images)
        kept_sources.append(record.source)
        kept_lines.append(relocated(line, source.parent, out.parent))
    write_atomically(out, "".join(line + "\n" for line in kept_lines))
    return len(kept_lines), dropped


def audit_summary(source: Path, out: Path, threshold: float, kept: int, dropped: list[Dropped]) -> dict:
    """What the fleet's audit log keeps of a dedup: both files by SHA-256, the threshold and the
    counts (which records were dropped is in the command's output, not in the log)."""
    kinds = Counter(d.kind for d in dropped)
    return {
        "in": str(source.resolve()),
        "in_sha256": sha256_file(source),
        "out": str(out.resolve()),
        "out_sha256": sha256_file(out),
        "threshold": threshold,
        "kept": kept,
        "dropped": {"exact": kinds["exact"], "near": kinds["near"]},
    }
