"""`lorafleet data redact` replaces planted personal data of every type in both layouts, leaves the
rest of the text alone, keeps placeholders consistent, strips image metadata, and never loses data
on bad input."""

from __future__ import annotations

import base64
import difflib
import io
import json
import re
import subprocess
import sys

import pytest
from PIL import Image

from lorafleet.data.pii import EntityRecognizer, PiiDetector
from lorafleet.data.records import read_records
from lorafleet.data.redact import redact_file
from lorafleet.errors import ConfigError, DataError
from tests.data.test_pii import PLANTED

# Realistic support and HR paragraphs; {TYPE} slots take the planted values, and everything else
# (dates, amounts, order numbers, times, versions) must come through untouched.
PARAGRAPHS = [
    "Hi team, the customer wrote in on 12 March 2024 about invoice 20240312-7 for $1,250.00. Please reply "
    "to {EMAIL} before Friday and copy the account manager. The ticket stays open until 17:30.",
    "Refund approved: transfer EUR 480.50 to {IBAN} within five working days. The original order 4481-2290 "
    "shipped from the Leeds warehouse on 3 April and arrived damaged.",
    "The caller could not log in to the portal version 4.2.1; our logs show the attempts came from {IP} "
    "between 09:15 and 09:40. Reset the password and ask them to call back on {PHONE}.",
    "Payroll update for the new starter: tax identifier {DE_STEUER_ID} has been checked by the finance office "
    "and the first salary of 3,100 euros is due on the 28th of the month.",
    "Chargeback received for card {CARD}; the merchant category was travel and the amount was 212.40 GBP. "
    "Freeze the card only if the customer confirms the transaction was not theirs.",
    "Benefits enrolment needs the social security number {US_SSN} and a copy of the signed form 401-B. "
    "Open enrolment closes on 15 November, and late forms go to the regional office.",
    "For the UK contractor, national insurance number {UK_NINO} is on file; the contract runs for 6 months "
    "from 1 July with a review after 90 days and a notice period of 4 weeks.",
    "The French subsidiary sent the employee's social security number {FR_INSEE} with the sick note; keep the "
    "note for 2 years and delete the scan from the shared drive after upload.",
    "Dutch onboarding: citizen service number {NL_BSN} is required by the tax authority before the first "
    "payment, which the Amsterdam office schedules for week 14.",
    "The Madrid office asked whether identity document {ES_DNI} can be used for the building badge; security "
    "said yes, valid until 2031, and the badge costs 15 euros if lost.",
    "Quarterly review: 37 tickets were closed within 24 hours, 5 escalated, and satisfaction rose to 4.6 out "
    "of 5. Nothing personal here, and nothing here should change.",
    "Second reminder sent to {EMAIL} and to the backup number {PHONE}; if {EMAIL} bounces again, mark the "
    "account dormant after 30 days as the retention policy says.",
]


def planted(paragraph: str) -> str:
    return paragraph.format(**PLANTED)


def write_lines(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def chat_string(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "Noted: " + text}]}


def chat_parts(text: str) -> dict:
    parts = [{"type": "text", "text": "Context: "}, {"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "Done."}]}


def chat_internvl(text: str) -> dict:
    return {"conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "Understood."}]}


@pytest.fixture(scope="module")
def detector():
    return PiiDetector()


@pytest.mark.parametrize("layout", [chat_string, chat_parts, chat_internvl])
def test_every_planted_value_is_replaced_and_only_it(tmp_path, detector, layout):
    source = write_lines(tmp_path / "in.jsonl", [layout(planted(p)) for p in PARAGRAPHS])
    before = source.read_bytes()
    report = redact_file(source, tmp_path / "out.jsonl", detector)
    written = (tmp_path / "out.jsonl").read_text()
    assert source.read_bytes() == before  # IN is never touched
    for value in PLANTED.values():
        assert value not in written
    assert set(report.counts) == set(PLANTED)
    records, _ = read_records(tmp_path / "out.jsonl")  # the trainer still reads every record
    assert len(records) == len(PARAGRAPHS)
    kept, total = 0, 0
    for paragraph, record in zip(PARAGRAPHS, records, strict=True):
        # Words of the paragraph with each slot (and each placeholder) written as PII: the words
        # around them, punctuation attached, must be the same.
        expected = re.sub(r"\{[A-Z_]+\}", "PII", paragraph).split()
        got = re.sub(r"<[A-Z_]+_\d+>", "PII", record.messages[0].text.removeprefix("Context: ")).split()
        matcher = difflib.SequenceMatcher(a=expected, b=got, autojunk=False)
        for block in matcher.get_matching_blocks():
            kept += sum(word != "PII" for word in expected[block.a : block.a + block.size])
        total += sum(word != "PII" for word in expected)
    print(f"{layout.__name__}: {kept}/{total} non-PII words unchanged")
    assert kept / total >= 0.95, f"only {kept}/{total} non-PII words unchanged"


def test_a_paragraph_without_personal_data_comes_out_byte_for_byte(tmp_path, detector):
    text = PARAGRAPHS[10]
    source = write_lines(tmp_path / "in.jsonl", [chat_parts(text), chat_internvl(text)])
    report = redact_file(source, tmp_path / "out.jsonl", detector)
    assert report.records_changed == 0 and not report.counts
    assert [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()] == [
        chat_parts(text),
        chat_internvl(text),
    ]


def test_placeholders_are_consistent_within_a_record_and_restart_in_the_next(tmp_path, detector):
    other = "erik.jansen@example.org"
    text = f"Mail {PLANTED['EMAIL']} first, then {other}; {PLANTED['EMAIL'].upper()} is the same person."
    source = write_lines(tmp_path / "in.jsonl", [chat_string(text), chat_string(f"Only {other} here.")])
    redact_file(source, tmp_path / "out.jsonl", detector)
    first, second = [json.loads(line)["messages"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert first[0]["content"] == "Mail <EMAIL_1> first, then <EMAIL_2>; <EMAIL_1> is the same person."
    assert first[1]["content"] == "Noted: " + first[0]["content"]  # same record, same names across turns
    assert second[0]["content"] == "Only <EMAIL_1> here."


def test_an_address_written_to_escape_harvesters_gets_the_placeholder_of_the_plain_one(tmp_path, detector):
    text = "Mail max.weber@firma.de or max.weber [at] firma (dot) de; Herr Weber answers."
    source = write_lines(tmp_path / "in.jsonl", [chat_string(text)])
    redact_file(source, tmp_path / "out.jsonl", detector)
    content = json.loads((tmp_path / "out.jsonl").read_text())["messages"][0]["content"]
    assert content == "Mail <EMAIL_1> or <EMAIL_1>; Herr <PERSON_1> answers."


def test_tool_call_arguments_are_redacted_too(tmp_path, detector):
    email = PLANTED["EMAIL"]
    call = {"id": "c1", "type": "function", "function": {"name": "send", "arguments": json.dumps({"to": email})}}
    nested = {
        "id": "c2",
        "type": "function",
        "function": {"name": "call", "arguments": {"numbers": [PLANTED["PHONE"]]}},
    }
    record = {
        "messages": [
            {"role": "user", "content": f"Write to {email} and call {PLANTED['PHONE']}."},
            {"role": "assistant", "content": None, "tool_calls": [call, nested]},
            {"role": "tool", "tool_call_id": "c1", "content": f"sent to {email}"},
            {"role": "assistant", "content": "Done."},
        ]
    }
    source = write_lines(tmp_path / "in.jsonl", [record])
    redact_file(source, tmp_path / "out.jsonl", detector)
    written = json.loads((tmp_path / "out.jsonl").read_text())["messages"]
    assert json.loads(written[1]["tool_calls"][0]["function"]["arguments"]) == {"to": "<EMAIL_1>"}
    assert written[1]["tool_calls"][1]["function"]["arguments"] == {"numbers": ["<PHONE_1>"]}
    assert written[2]["content"] == "sent to <EMAIL_1>"
    read_records(tmp_path / "out.jsonl")


def test_names_are_replaced_when_a_local_ner_pipeline_is_given(tmp_path):
    spacy = pytest.importorskip("spacy")
    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("entity_ruler")
    ruler.add_patterns(
        [
            {"label": "PERSON", "pattern": [{"LOWER": "anna"}, {"LOWER": "schmidt"}]},
            {"label": "PERSON", "pattern": [{"LOWER": "schmidt"}]},
            {"label": "ORG", "pattern": [{"LOWER": "acme"}, {"LOWER": "gmbh"}]},
            {"label": "GPE", "pattern": "Hamburg"},
        ]
    )
    nlp.to_disk(tmp_path / "ner")
    detector = PiiDetector(ner=EntityRecognizer(tmp_path / "ner"))
    text = f"Anna Schmidt of Acme GmbH in Hamburg ({PLANTED['EMAIL']}) called; anna schmidt wants a callback."
    source = write_lines(tmp_path / "in.jsonl", [chat_string(text)])
    report = redact_file(source, tmp_path / "out.jsonl", detector)
    content = json.loads((tmp_path / "out.jsonl").read_text())["messages"][0]["content"]
    assert content == "<PERSON_1> of <ORG_1> in <LOCATION_1> (<EMAIL_1>) called; <PERSON_1> wants a callback."
    assert report.counts == {"PERSON": 4, "ORG": 2, "LOCATION": 2, "EMAIL": 2}


def test_a_missing_ner_model_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        EntityRecognizer(tmp_path / "nowhere")
    pytest.importorskip("spacy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a spaCy pipeline"):
        EntityRecognizer(tmp_path / "empty")


def jpeg_with_exif(path):
    image = Image.new("RGB", (80, 48), (200, 30, 30))
    exif = Image.Exif()
    exif[0x013B] = "Maria Lopez"  # Artist
    exif[0x010F] = "SecretCam"  # Make
    exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.0)}  # GPS
    image.save(path, format="JPEG", exif=exif.tobytes(), comment=b"shot at home")
    return path


def png_with_text() -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Maria Lopez")
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "blue").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def test_images_are_rewritten_without_metadata_and_records_point_at_the_copies(tmp_path, detector):
    jpeg_with_exif(tmp_path / "photo.jpg")
    assert b"Maria Lopez" in (tmp_path / "photo.jpg").read_bytes()
    url = "data:image/png;base64," + base64.b64encode(png_with_text()).decode()
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "And this?"}]
    records = [
        {
            "image": "photo.jpg",
            "conversations": [{"from": "human", "value": "<image>\nWho?"}, {"from": "gpt", "value": "x"}],
        },
        {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "A blue square."}]},
    ]
    source = write_lines(tmp_path / "in.jsonl", records)
    report = redact_file(source, tmp_path / "clean" / "out.jsonl", detector)
    assert report.images_rewritten == 2
    first, second = [json.loads(line) for line in (tmp_path / "clean" / "out.jsonl").read_text().splitlines()]
    copy = tmp_path / "clean" / first["image"]
    assert copy.parent.name == "out-images" and copy.exists()
    data = copy.read_bytes()
    assert b"Maria Lopez" not in data and b"SecretCam" not in data and b"shot at home" not in data
    with Image.open(copy) as image:
        assert len(image.getexif()) == 0 and "exif" not in image.info
        assert image.size == (80, 48)
    inline = base64.b64decode(second["messages"][0]["content"][0]["image_url"]["url"].split(",", 1)[1])
    assert b"Maria Lopez" not in inline
    with Image.open(io.BytesIO(inline)) as image:
        assert image.getpixel((5, 5)) == (0, 0, 255) and not image.text
    assert (tmp_path / "photo.jpg").read_bytes().count(b"Maria Lopez") == 1  # the original is untouched
    records, _ = read_records(tmp_path / "clean" / "out.jsonl")
    assert len(records[0].load_images()) == 1


def test_a_dry_run_counts_and_writes_nothing(tmp_path, detector):
    source = write_lines(tmp_path / "in.jsonl", [chat_string(planted(PARAGRAPHS[0]))])
    report = redact_file(source, tmp_path / "out.jsonl", detector, dry_run=True)
    assert report.counts == {"EMAIL": 2} and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "binary file"),
        (b"\xff\xfe\xfd not utf-8\n", r"in\.jsonl:1: not UTF-8"),
        (
            b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n',
            r"in\.jsonl:2: not valid JSON",
        ),
    ],
)
def test_bad_input_is_a_clear_error_and_nothing_is_lost(tmp_path, detector, content, message):
    source = tmp_path / "in.jsonl"
    source.write_bytes(content)
    out = tmp_path / "out.jsonl"
    out.write_text("previous output\n")
    with pytest.raises(DataError, match=message):
        redact_file(source, out, detector)
    assert source.read_bytes() == content and out.read_text() == "previous output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_unreadable_and_same_file_inputs_are_refused(tmp_path, detector):
    with pytest.raises(DataError, match="does not exist"):
        redact_file(tmp_path / "missing.jsonl", tmp_path / "out.jsonl", detector)
    with pytest.raises(DataError, match="is a directory"):
        redact_file(tmp_path, tmp_path / "out.jsonl", detector)
    source = write_lines(tmp_path / "in.jsonl", [chat_string("hello")])
    with pytest.raises(DataError, match="never overwrites its input"):
        redact_file(source, source, detector)


def test_the_command_reports_counts_and_never_the_values(tmp_path):
    from lorafleet.governance.audit import verify_chain
    from lorafleet.governance.lineage import sha256_file

    source = write_lines(tmp_path / "in.jsonl", [chat_string(planted(p)) for p in PARAGRAPHS])
    out, fleet = tmp_path / "out.jsonl", tmp_path / "fleet"
    run = subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", "data", "redact", str(source), str(out),
         "--json", str(tmp_path / "counts.json"), "--fleet", str(fleet), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "EMAIL 6" in run.stdout and "written to" in run.stdout and "data.redact" in run.stdout
    audit = "".join(path.read_text() for path in (fleet / "audit").glob("*.jsonl"))
    shown = run.stdout + run.stderr + (tmp_path / "counts.json").read_text() + audit
    for value in PLANTED.values():
        assert value not in shown
    assert json.loads((tmp_path / "counts.json").read_text())["pii_counts"]["IBAN"] == 2
    assert verify_chain(fleet).entries == 1
    (entry,) = [json.loads(line) for line in audit.splitlines()]
    assert entry["event"] == "data.redact" and entry["data"]["pii_counts"]["EMAIL"] == 6
    assert (entry["data"]["in_sha256"], entry["data"]["out_sha256"]) == (sha256_file(source), sha256_file(out))
