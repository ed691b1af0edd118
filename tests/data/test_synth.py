"""`lorafleet data synth` turns Markdown and PDF documents into chats the trainer reads, with
provenance; it resumes where it stopped; it runs against a real `lorafleet serve`; bad documents
get clear errors and nothing is lost."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from lorafleet.data.records import read_records
from lorafleet.data.synth import (
    Chunk,
    OpenAIGenerator,
    SynthOptions,
    chunk_document,
    load_prompts,
    parse_pairs,
    support,
    synthesise,
)
from lorafleet.errors import ConfigError, DataError

HANDBOOK = """# Travel policy

Employees book travel through the internal portal at least 14 days before departure. Economy class is
the default for flights shorter than six hours. Business class needs written approval from a
department head.

Hotel costs are reimbursed up to 150 euros per night in most cities. In London, Paris and New York the
limit is 220 euros per night. Receipts must be uploaded within 30 days of return.

Questions about this policy go to travel.desk@example.org or to the finance office on the second floor.
"""

SECURITY = [
    "Laptops must be locked whenever they are left unattended in the office.",
    "Passwords are changed every ninety days and never shared with colleagues.",
    "Report lost badges to the security desk on extension 4410 within one hour.",
    "Visitors sign in at reception and wear a visitor badge at all times.",
]


def write_pdf(path, lines: list[str]) -> None:
    """A one-page PDF with a real text layer (Helvetica, one line per string), written by hand."""
    escaped = [line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") for line in lines]
    content = "BT /F1 11 Tf 72 720 Td 16 TL " + " ".join(f"({line}) '" for line in escaped) + " ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        "/Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(content)} >>\nstream\n{content}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    data, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(data))
        data += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(data)
    data += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    data += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    data += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(data)


@pytest.fixture
def docs(tmp_path):
    root = tmp_path / "docs"
    (root / "policies").mkdir(parents=True)
    (root / "policies" / "travel-handbook.md").write_text(HANDBOOK)
    write_pdf(root / "security.pdf", SECURITY)
    (root / "notes.txt").write_text("Short note.\n")
    (root / "logo.png").write_bytes(b"\x89PNG not a document")  # ignored: not a document type
    return root


def run_extractive(docs, out, **kwargs):
    return synthesise(SynthOptions(docs, out, generator=None, **kwargs))


def test_extractive_mode_writes_records_the_trainer_reads_with_provenance(docs, tmp_path):
    out = tmp_path / "qa.jsonl"
    report = run_extractive(docs, out)
    assert report.documents == 3 and report.kept >= 6
    records, _ = read_records(out)
    raw = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(raw) == report.kept
    sources = {r["provenance"]["source"] for r in raw}
    assert sources == {"policies/travel-handbook.md", "security.pdf"}  # the note is too short to ask about
    for record, line in zip(records, raw, strict=True):
        provenance = line["provenance"]
        assert provenance["generator"] == "extractive" and provenance["prompt_version"] == "qa-v1"
        assert len(provenance["chunk_sha256"]) == 64
        answer = record.messages[1].text
        assert support(answer, HANDBOOK + " ".join(SECURITY)) == 1.0  # copied from the documents
    pdf_answers = [r["messages"][1]["content"] for r in raw if r["provenance"]["source"] == "security.pdf"]
    assert pdf_answers[0] == SECURITY[0]  # the PDF's text layer, read back by pypdf


def test_personal_data_in_documents_is_redacted_in_the_records(docs, tmp_path):
    (docs / "contacts.md").write_text("Questions about invoices go to maria.lopez@example.org every working day.\n")
    out = tmp_path / "qa.jsonl"
    report = run_extractive(docs, out)
    assert report.pii["EMAIL"] >= 1
    assert "maria.lopez@example.org" not in out.read_text() and "<EMAIL_1>" in out.read_text()


def test_a_run_resumes_after_a_kill_without_repeating_or_losing_chunks(docs, tmp_path):
    full = tmp_path / "full.jsonl"
    run_extractive(docs, full)
    lines = full.read_text().splitlines(keepends=True)
    finished = (tmp_path / ".full.jsonl.done").read_text().splitlines(keepends=True)
    last_chunk = json.loads(lines[-1])["provenance"]["chunk_sha256"]
    assert finished[-1].strip() == last_chunk
    # Killed while writing the last chunk: one record written, the next cut short, no commit.
    first_of_last = next(i for i, line in enumerate(lines) if last_chunk in line)
    out = tmp_path / "resumed.jsonl"
    out.write_text("".join(lines[: first_of_last + 1]) + lines[first_of_last + 1][:25])
    (tmp_path / ".resumed.jsonl.done").write_text("".join(finished[:-1]))
    report = run_extractive(docs, out)
    assert report.resumed == report.chunks - 1
    assert out.read_text() == full.read_text()
    again = run_extractive(docs, out)
    assert again.resumed == again.chunks and again.kept == 0 and out.read_text() == full.read_text()


def test_chunks_hold_whole_paragraphs_up_to_the_word_limit():
    text = "\n\n".join(f"Paragraph {i} " + "word " * 30 for i in range(10))
    chunks = chunk_document("a.md", text, max_words=100)
    assert [c.index for c in chunks] == list(range(len(chunks))) and len(chunks) == 4
    assert all(len(c.text.split()) <= 100 for c in chunks)
    assert "\n\n".join(c.text for c in chunks).split() == text.split()  # nothing lost, nothing repeated


def test_generated_pairs_are_parsed_and_filtered_with_reasons(tmp_path, docs):
    reply = "Q: How many days ahead is travel booked?\nA: at least 14 days before departure\n"
    assert parse_pairs(reply)[0].answer == "at least 14 days before departure"
    unsupported = "Q: Who approves business class?\nA: the chief executive, personally\n"

    def scripted(system: str, user: str) -> str:  # a generator that only knows the travel handbook
        return reply + unsupported + reply if "Travel policy" in user else "I cannot help with that."

    out = tmp_path / "qa.jsonl"
    report = synthesise(SynthOptions(docs, out, scripted, "scripted"))
    assert report.generated == 3 and report.kept == 1
    assert report.dropped == {"answer not supported by the chunk": 1, "duplicate": 1, "reply had no Q:/A: pairs": 2}
    assert json.loads(out.read_text())["provenance"]["generator"] == "scripted"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("broken.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 9 0 R", "broken.pdf"),
        ("empty.md", b"", "empty.md has no text"),
        ("junk.txt", bytes(range(256)), "junk.txt is a binary file"),
        ("latin1.txt", "Café résumé".encode("latin-1"), "not UTF-8"),
    ],
)
def test_bad_documents_stop_the_run_before_anything_is_written(docs, tmp_path, name, content, message):
    (docs / name).write_bytes(content)
    out = tmp_path / "qa.jsonl"
    out.write_text("")
    with pytest.raises(DataError, match=message):
        run_extractive(docs, out)
    assert out.read_text() == "" and not (tmp_path / ".qa.jsonl.done").exists()


def test_a_scanned_pdf_is_skipped_with_a_warning_and_the_other_documents_are_used(docs, tmp_path):
    write_pdf(docs / "scan.pdf", [])  # a page without a text layer, as a scanner writes it
    out = tmp_path / "qa.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", "data", "synth", "--docs", str(docs), "--out", str(out),
         "--extractive", "--no-progress", "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert f"warning: {docs / 'scan.pdf'} has no text layer (a scan? run OCR first); skipped" in run.stderr
    assert "3 documents (1 skipped: no text)" in run.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["kept"] >= 6 and len(report["skipped"]) == 1
    for name in ("travel-handbook.md", "security.pdf", "notes.txt"):
        (docs / name).unlink(missing_ok=True)
    (docs / "policies" / "travel-handbook.md").unlink()
    with pytest.raises(DataError, match="no document under .* has text: .*scan.pdf has no text layer"):
        run_extractive(docs, tmp_path / "other.jsonl")


GERMAN = """Reisekosten werden nur erstattet, wenn die Belege innerhalb von dreißig Tagen eingereicht werden.
Die Abteilungsleitung muss jede Dienstreise ins Ausland vorher schriftlich genehmigen."""
FRENCH = """Les frais de déplacement sont remboursés sur présentation des justificatifs dans un délai de trente
jours. Chaque mission à l'étranger doit être autorisée par écrit par le responsable du service."""


@pytest.mark.parametrize(
    ("text", "language", "question"),
    [
        (GERMAN, "de", r"^Was sagt reiserichtlinie über \w+ \w+ \w+\?$"),
        (FRENCH, "fr", r"^Que dit reiserichtlinie sur \w+ \w+ \w+ \?$"),
        (HANDBOOK, "en", r"^What does reiserichtlinie say about \w+ \w+ \w+\?$"),
    ],
)
def test_extractive_questions_are_asked_in_the_documents_language(tmp_path, text, language, question):
    from lorafleet.data.language import detect_language

    assert detect_language(text) == language
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "reiserichtlinie.md").write_text(text)
    out = tmp_path / "qa.jsonl"
    report = run_extractive(docs, out)
    questions = [json.loads(line)["messages"][0]["content"] for line in out.read_text().splitlines()]
    assert report.kept == len(questions) >= 2
    assert all(re.match(question, q) for q in questions), questions
    assert "der" not in questions[0].split() and "les" not in questions[0].split()  # topics are content words


def test_an_output_that_is_not_ours_is_never_appended_to(docs, tmp_path):
    out = tmp_path / "train.jsonl"
    out.write_text('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:1 is not a record of `lorafleet data synth`"):
        run_extractive(docs, out)
    assert out.read_text().count("\n") == 1
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="holds no documents"):
        run_extractive(tmp_path / "nothing", tmp_path / "x.jsonl")


def test_a_prompt_file_must_name_its_version_and_known_fields(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text("version: v2\nsystem: s\nuser: 'Text: {chunk} {unknown}'\n")
    with pytest.raises(ConfigError, match="may use"):
        load_prompts(path)
    path.write_text("system: s\nuser: u\n")
    with pytest.raises(ConfigError, match="needs string fields version"):
        load_prompts(path)
    path.write_text("version: v2\npairs: 1\nsystem: s\nuser: 'From {source}: {chunk}'\n")
    assert load_prompts(path).render(Chunk("a.md", 0, "text")) == ("s", "From a.md: text")


def test_against_a_real_lorafleet_serve_of_the_tiny_model(docs, tmp_path, tiny_vlm_dir):
    """The tiny model's replies are nonsense: the pipeline is real, and it says why it kept nothing."""
    from lorafleet.serve.gateway.server import ServeOptions
    from tests.serve.conftest import running_server

    fleet = tmp_path / "fleet"
    shutil.copytree(tiny_vlm_dir, fleet / "base")
    out = tmp_path / "qa.jsonl"
    with running_server(ServeOptions(fleet_dir=fleet)) as (url, _server):
        command = [sys.executable, "-m", "lorafleet.cli", "data", "synth", "--docs", str(docs), "--out", str(out)]
        run = subprocess.run(
            [*command, "--endpoint", url, "--model", "base", "--max-tokens", "24", "--json", str(tmp_path / "r.json")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
        generator = OpenAIGenerator(url, "base", max_tokens=24)
        reply = generator("You write questions.", "Write one question.")
    assert isinstance(reply, str) and reply  # the server really answered
    assert "3 documents, 3 chunks" in run.stdout and "synth: 100%" in run.stderr  # with a progress bar
    report = json.loads((tmp_path / "r.json").read_text())
    lines = out.read_text().splitlines()
    assert len(lines) == report["kept"]
    if lines:
        records, _ = read_records(out)
        assert all(json.loads(line)["provenance"]["generator"] == "base" for line in lines)
    # Every pair generated was kept or dropped for a reason, and every reply without pairs was counted.
    no_pairs = report["dropped"].pop("reply had no Q:/A: pairs", 0)
    assert report["kept"] + sum(report["dropped"].values()) == report["generated"]
    assert report["generated"] > 0 or no_pairs == 3
    assert (tmp_path / ".qa.jsonl.done").read_text().count("\n") == 3  # every chunk was sent and finished


def test_a_dead_endpoint_is_a_clear_error_and_keeps_what_was_done(docs, tmp_path):
    from tests.serve.conftest import free_port

    generator = OpenAIGenerator(f"http://127.0.0.1:{free_port()}", "base", max_tokens=8)
    out = tmp_path / "qa.jsonl"
    with pytest.raises(DataError, match="run again to resume"):
        synthesise(SynthOptions(docs, out, generator, "base"))
    assert out.read_text() == ""


def test_dedup_and_synth_are_recorded_in_the_audit_log_like_check_and_redact(docs, tmp_path):
    from lorafleet.governance.audit import verify_chain
    from lorafleet.governance.lineage import sha256_file

    fleet, out, unique = tmp_path / "fleet", tmp_path / "qa.jsonl", tmp_path / "unique.jsonl"
    cli = [sys.executable, "-m", "lorafleet.cli", "data"]
    synth = [*cli, "synth", "--docs", str(docs), "--out", str(out), "--extractive", "--fleet", str(fleet)]
    run = subprocess.run([*synth, "--no-progress"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "data.synth" in run.stdout, run.stderr
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines + lines[:2]) + "\n")  # two repeats for dedup to drop
    dedup = [*cli, "dedup", str(out), str(unique), "--fleet", str(fleet), "--no-progress"]
    run = subprocess.run(dedup, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "data.dedup" in run.stdout, run.stderr
    entries = [json.loads(line) for path in sorted((fleet / "audit").glob("*.jsonl")) for line in path.open()]
    assert [e["event"] for e in entries] == ["data.synth", "data.dedup"]
    synthesised, deduplicated = entries[0]["data"], entries[1]["data"]
    assert synthesised["generator"] == "extractive" and synthesised["prompt_version"] == "qa-v1"
    assert synthesised["sources"]["security.pdf"] == sha256_file(docs / "security.pdf")
    assert synthesised["kept"] == len(lines) and len(synthesised["out_sha256"]) == 64
    assert deduplicated["in_sha256"] == sha256_file(out) and deduplicated["out_sha256"] == sha256_file(unique)
    assert deduplicated["kept"] == len(lines) and deduplicated["dropped"] == {"exact": 2, "near": 0}
    assert verify_chain(fleet).entries == 2
