"""`lorafleet data synth`: question-answer chats grounded in the organisation's own documents.

Documents (text, Markdown, PDF text layers via `pypdf`; a PDF without one, a scan, is skipped
with a warning) are cut into chunks of whole paragraphs;
a generator writes question-answer pairs for each chunk from an editable prompt template; pairs
are kept only if they have sensible lengths, are not duplicates of pairs already kept, and their
answer is supported by the chunk (most of its content words occur in it: lexical support, not
entailment); personal data is then replaced as `lorafleet data redact` does. Each record carries
its provenance: source file, chunk number and SHA-256, generator model, prompt version.

The generator is any callable from (system, user) prompts to a reply: `OpenAIGenerator` talks to
an OpenAI-compatible endpoint (`lorafleet serve`, vLLM, ...), `extractive_pairs` needs no model
(questions built from sentences in the chunk's language, German, French or English, answers
copied: deterministic, for tests and offline use). A run
is resumable: records are appended chunk by chunk, each chunk's hash then goes in OUT's `.done`
list, and a new run skips the chunks listed there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.config import read_yaml
from lorafleet.data.dedup import DuplicateIndex, normalise
from lorafleet.data.language import STOPWORDS, detect_language
from lorafleet.data.pii import PiiDetector
from lorafleet.data.records import parse_record, write_atomically
from lorafleet.data.redact import Placeholders, redact_text
from lorafleet.errors import ConfigError, DataError
from lorafleet.governance.lineage import sha256_file

DEFAULT_PROMPTS = Path(__file__).with_name("synth_prompts.yaml")
DOCUMENT_SUFFIXES = (".txt", ".md", ".markdown", ".pdf")
CHUNK_WORDS = 220
EXTRACTIVE = "extractive"

Generator = Callable[[str, str], str]  # (system prompt, user prompt) -> reply


@dataclass(frozen=True)
class Chunk:
    source: str  # path relative to the documents directory
    index: int
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


@dataclass(frozen=True)
class Prompts:
    version: str
    pairs: int
    system: str
    user: str

    def render(self, chunk: Chunk) -> tuple[str, str]:
        return self.system, self.user.format(chunk=chunk.text, source=chunk.source, pairs=self.pairs)


@dataclass(frozen=True)
class Pair:
    question: str
    answer: str


def load_prompts(path: str | Path | None = None) -> Prompts:
    path = Path(path) if path is not None else DEFAULT_PROMPTS
    raw = read_yaml(path, "prompt file")
    missing = [key for key in ("version", "system", "user") if not isinstance((raw or {}).get(key), str)]
    if missing:
        raise ConfigError(f"{path}: needs string fields {', '.join(missing)} (see {DEFAULT_PROMPTS})")
    prompts = Prompts(raw["version"], int(raw.get("pairs", 3)), raw["system"], raw["user"])
    try:
        prompts.render(Chunk("x", 0, "x"))
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"{path}: 'user' may use {{chunk}}, {{source}} and {{pairs}} only ({err})") from err
    return prompts


@dataclass
class Documents:
    texts: list[tuple[str, str]]  # (path relative to the directory, text)
    sha256: dict[str, str]  # the same paths: SHA-256 of each file read
    skipped: list[str]  # why each document left out was left out


def read_documents(docs: str | Path) -> Documents:
    """Every document under `docs`. A PDF without a text layer (a scan) is skipped with a reason;
    any other unreadable document stops everything before anything is generated, naming the file."""
    docs = Path(docs)
    if not docs.is_dir():
        raise DataError(f"--docs {docs} is not a directory of documents")
    paths = sorted(p for p in docs.rglob("*") if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES)
    if not paths:
        raise DataError(f"{docs} holds no documents ({', '.join(DOCUMENT_SUFFIXES)})")
    documents = Documents([], {}, [])
    for path in paths:
        is_pdf = path.suffix.lower() == ".pdf"
        text = _pdf_text(path) if is_pdf else _plain_text(path)
        if not text.strip() and is_pdf:
            documents.skipped.append(f"{path} has no text layer (a scan? run OCR first); skipped")
            continue
        if not text.strip():
            raise DataError(f"{path} has no text")
        name = str(path.relative_to(docs))
        documents.texts.append((name, text))
        documents.sha256[name] = sha256_file(path)
    if not documents.texts:
        raise DataError(f"no document under {docs} has text: {'; '.join(documents.skipped)}")
    return documents


def _plain_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\0" in data:
        raise DataError(f"{path} is a binary file, not text or Markdown")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from err


def _pdf_text(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            raise DataError(f"{path} is an encrypted PDF; decrypt it first")
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as err:
        raise DataError(f"{path} is not a readable PDF ({type(err).__name__}: {err})") from err


def chunk_document(source: str, text: str, max_words: int = CHUNK_WORDS) -> list[Chunk]:
    """Whole paragraphs up to `max_words` a chunk; a longer paragraph is cut at sentence ends."""
    pieces = []
    for paragraph in re.split(r"\n\s*\n", text):
        words = paragraph.split()
        if len(words) <= max_words:
            pieces.append(" ".join(words))
            continue
        pieces += [" ".join(sentence.split()) for sentence in _sentences(paragraph)]
    chunks, current = [], []
    for piece in filter(None, pieces):
        if current and len(" ".join(current + [piece]).split()) > max_words:
            chunks.append("\n\n".join(current))
            current = []
        current.append(piece)
    if current:
        chunks.append("\n\n".join(current))
    return [Chunk(source, index, text) for index, text in enumerate(chunks)]


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-ZÀ-ÖØ-Þ0-9\"'(«])", " ".join(text.split())) if s.strip()]


_STOPWORDS = set(
    "a an the and or but of to in on at by for with from as is are was were be been it its this that these those "
    "which who what when where how why do does did can may must shall should will would not no any all each".split()
).union(*STOPWORDS.values())
# The extractive question of each language, about a document's title and a chunk sentence's topic.
QUESTIONS = {
    "en": "What does {title} say about {topic}?",
    "de": "Was sagt {title} über {topic}?",
    "fr": "Que dit {title} sur {topic} ?",
}


def content_words(text: str) -> list[str]:
    return [w for w in normalise(text).split() if w not in _STOPWORDS and len(w) > 1]


def extractive_pairs(chunk: Chunk, pairs: int) -> list[Pair]:
    """Questions made from the chunk's sentences (their first content words as the topic), asked in
    the chunk's language, the sentence itself as the answer: no model, same output every time."""
    found = []
    title = Path(chunk.source).stem.replace("-", " ").replace("_", " ")
    question = QUESTIONS[detect_language(chunk.text)]
    for paragraph in re.split(r"\n\s*\n", chunk.text):
        paragraph = re.sub(r"^\s*(?:#+|[-*>]|\d+\.)\s+", "", paragraph, flags=re.MULTILINE)  # Markdown marks
        for sentence in _sentences(paragraph):
            words = content_words(sentence)
            if 6 <= len(sentence.split()) <= 60 and len(words) >= 3 and len(found) < pairs:
                found.append(Pair(question.format(title=title, topic=" ".join(words[:3])), sentence))
    return found


_PAIR = re.compile(r"^\s*\**Q\**\s*[:.]\s*(?P<q>.+?)\s*\n\s*\**A\**\s*[:.]\s*(?P<a>.+?)\s*$", re.MULTILINE)


def parse_pairs(reply: str) -> list[Pair]:
    return [Pair(m["q"].strip(), m["a"].strip()) for m in _PAIR.finditer(reply)]


@dataclass
class PairFilter:
    """Keeps pairs of sensible length, supported by their chunk, and not seen before."""

    min_support: float = 0.6
    question_words: tuple[int, int] = (3, 60)
    answer_words: tuple[int, int] = (1, 200)
    seen: DuplicateIndex = field(default_factory=lambda: DuplicateIndex(0.8))

    def reason_to_drop(self, pair: Pair, chunk: Chunk) -> str | None:
        if not self.question_words[0] <= len(pair.question.split()) <= self.question_words[1]:
            return "question length"
        if not self.answer_words[0] <= len(pair.answer.split()) <= self.answer_words[1]:
            return "answer length"
        if support(pair.answer, chunk.text) < self.min_support:
            return "answer not supported by the chunk"
        text = f"{pair.question}\n{pair.answer}"
        if self.seen.find(text, []) is not None:
            return "duplicate"
        self.seen.add(text, [])
        return None


def support(answer: str, chunk: str) -> float:
    """Share of the answer's content words that occur in the chunk."""
    words = content_words(answer)
    if not words:
        return 0.0
    vocabulary = set(normalise(chunk).split())
    return sum(word in vocabulary for word in words) / len(words)


@dataclass
class SynthReport:
    documents: int = 0
    chunks: int = 0
    resumed: int = 0  # chunks skipped: already done by an earlier run
    generated: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    pii: Counter[str] = field(default_factory=Counter)
    out: Path | None = None
    skipped: list[str] = field(default_factory=list)  # documents left out, with the reason
    sources: dict[str, str] = field(default_factory=dict)  # document read -> its SHA-256

    def to_json(self) -> dict:
        fields = ("documents", "chunks", "resumed", "generated", "kept", "skipped")
        return {name: getattr(self, name) for name in fields} | {
            "dropped": dict(self.dropped),
            "pii_replaced": dict(sorted(self.pii.items())),
            "out": str(self.out),
        }

    def audit_summary(self, options: SynthOptions) -> dict:
        """What the fleet's audit log keeps of a synth run: each document and OUT by SHA-256, the
        generator and prompt version, and the counts (never a value)."""
        return self.to_json() | {
            "docs": str(options.docs.resolve()),
            "sources": dict(sorted(self.sources.items())),
            "out": str(options.out.resolve()),
            "out_sha256": sha256_file(options.out),
            "generator": options.generator_name,
            "prompt_version": options.prompts.version,
        }

    def summary(self) -> str:
        dropped = ", ".join(f"{reason} {n}" for reason, n in self.dropped.most_common()) or "none"
        pii = ", ".join(f"{kind} {n}" for kind, n in sorted(self.pii.items())) or "none"
        skipped = f" ({len(self.skipped)} skipped: no text)" if self.skipped else ""
        return (
            f"{self.documents} documents{skipped}, {self.chunks} chunks ({self.resumed} done before); "
            f"{self.generated} pairs generated, {self.kept} kept -> {self.out}; dropped: {dropped}; PII replaced: {pii}"
        )


@dataclass
class SynthOptions:
    docs: Path
    out: Path
    generator: Generator | None  # None: extractive
    generator_name: str = EXTRACTIVE
    prompts: Prompts = field(default_factory=load_prompts)
    chunk_words: int = CHUNK_WORDS
    min_support: float = 0.6


def synthesise(
    options: SynthOptions,
    detector: PiiDetector | None = None,
    progress: Callable[[list], Iterable] = lambda items: items,
) -> SynthReport:
    documents = read_documents(options.docs)
    chunks = [c for source, text in documents.texts for c in chunk_document(source, text, options.chunk_words)]
    done, earlier = _done_chunks(options.out)
    report = SynthReport(len(documents.texts), len(chunks), out=options.out)
    report.skipped, report.sources = documents.skipped, documents.sha256
    detector = detector or PiiDetector()
    keep = PairFilter(options.min_support)
    for text in earlier:  # pairs of an earlier run count as seen: a resumed run adds no duplicates
        keep.seen.add(text, [])
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.touch()
    for chunk in progress(chunks):
        if chunk.sha256 in done:
            report.resumed += 1
            continue
        records = _chunk_records(chunk, options, keep, detector, report)
        _append(options.out, records, chunk.sha256)
        done.add(chunk.sha256)
    return report


def _chunk_records(chunk: Chunk, options: SynthOptions, keep: PairFilter, detector, report) -> list[str]:
    if options.generator is None:
        pairs = extractive_pairs(chunk, options.prompts.pairs)
    else:
        reply = options.generator(*options.prompts.render(chunk))
        pairs = parse_pairs(reply)
        if not pairs:
            report.dropped["reply had no Q:/A: pairs"] += 1
    report.generated += len(pairs)
    records = []
    for pair in pairs:
        reason = keep.reason_to_drop(pair, chunk)
        if reason is not None:
            report.dropped[reason] += 1
            continue
        placeholders = Placeholders()  # one record: the same value, the same placeholder in Q and A
        question = redact_text(pair.question, detector, placeholders, report.pii)
        answer = redact_text(pair.answer, detector, placeholders, report.pii)
        record = {
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "provenance": {
                "source": chunk.source,
                "chunk": chunk.index,
                "chunk_sha256": chunk.sha256,
                "generator": options.generator_name,
                "prompt_version": options.prompts.version,
            },
        }
        line = json.dumps(record, ensure_ascii=False)
        parse_record(line, options.out.parent, f"{chunk.source} chunk {chunk.index}")  # the trainer reads it
        records.append(line)
        report.kept += 1
    return records


def _done_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.done")


def _done_chunks(out: Path) -> tuple[set[str], list[str]]:
    """Hashes of the chunks finished by earlier runs and the text of the pairs they kept. The
    `.done` list is the commit log: records of a chunk not in it (a run killed while writing them)
    are removed from OUT and the chunk is done again. A file that is not a synth output is refused."""
    done_file = _done_path(out)
    committed = set(done_file.read_text().split()) if done_file.exists() else None
    if not out.exists():
        return committed or set(), []
    data = out.read_bytes()
    lines, kept, texts = data.decode("utf-8", errors="replace").splitlines(keepends=True), [], []
    for number, line in enumerate(lines, start=1):
        if not line.endswith("\n"):
            break  # cut short by a kill
        try:
            record = json.loads(line)
            chunk_hash = record["provenance"]["chunk_sha256"]
            text = "\n".join(message["content"] for message in record["messages"])
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(
                f"{out}:{number} is not a record of `lorafleet data synth`; to keep that file, choose another --out"
            ) from err
        if committed is None or chunk_hash in committed:  # without a .done list, OUT is all there is
            kept.append(line)
            texts.append(text)
    if len(kept) != len(lines) or not data.endswith(b"\n") and data:
        write_atomically(out, "".join(kept))
    if committed is None:
        committed = {json.loads(line)["provenance"]["chunk_sha256"] for line in kept}
    return committed, texts


def _append(out: Path, records: list[str], chunk_hash: str) -> None:
    """The chunk's records, then its hash in the .done list (the commit: a kill before it leaves
    records that the next run removes and writes again)."""
    if records:
        with out.open("a", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in records))
            handle.flush()
            os.fsync(handle.fileno())
    with _done_path(out).open("a") as handle:
        handle.write(chunk_hash + "\n")


class OpenAIGenerator:
    """Replies from an OpenAI-compatible chat endpoint (`lorafleet serve`, vLLM, ...)."""

    def __init__(self, endpoint: str, model: str, api_key: str | None = None, max_tokens: int = 512):
        try:
            import openai
        except ImportError as err:
            raise ConfigError("--endpoint needs the openai client: pip install openai") from err
        base_url = endpoint.rstrip("/")
        base_url = base_url if base_url.endswith("/v1") else base_url + "/v1"
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=1)
        self.errors = openai.OpenAIError
        self.model, self.max_tokens, self.endpoint = model, max_tokens, endpoint

    def __call__(self, system: str, user: str) -> str:
        try:
            response = self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
                temperature=0.0,
                max_tokens=self.max_tokens,
            )
        except self.errors as err:
            raise DataError(
                f"the generator at {self.endpoint} failed ({type(err).__name__}: {err}); "
                "chunks done so far are kept, run again to resume"
            ) from err
        return response.choices[0].message.content or ""
