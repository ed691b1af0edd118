"""`lorafleet data check` counts what training would see, finds malformed records, duplicates,
held-out records that leak into training and personal data (by type, never the values)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from lorafleet.data.check import check_files, counting_base, format_report
from lorafleet.data.encode import encode_record, tile_images
from lorafleet.data.records import read_records
from lorafleet.governance.lineage import sha256_file
from lorafleet.models.loading import load_base
from tests.conftest import write_image_dataset, write_text_dataset


def chat(question: str, answer: str = "Noted.") -> str:
    return json.dumps({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})


@pytest.fixture
def files(tmp_path):
    """A training file (images, text, PII, one malformed line, one repeat) and a held-out file that
    shares one record with it."""
    train = write_image_dataset(tmp_path / "train.jsonl", 12, seed=1)
    write_text_dataset(tmp_path / "text.jsonl", 20, seed=2)
    private = chat("Please call +44 20 7946 0958 or mail maria.lopez@example.eu about card 4111 1111 1111 1111.")
    leaked = chat("When is the quarterly invoice total due to the finance department?", "In thirty days.")
    lines = train.read_text().splitlines() + (tmp_path / "text.jsonl").read_text().splitlines()
    lines += [private, '{"messages": [}', leaked, lines[-1]]
    train.write_text("\n".join(lines) + "\n")
    held_out = tmp_path / "held-out.jsonl"
    held_out.write_text("\n".join([chat("A question nobody asked in training, about the policy?"), leaked]) + "\n")
    return train, held_out


@pytest.fixture(scope="module")
def counting(tiny_vlm_dir):
    return counting_base(tiny_vlm_dir)


def test_check_counts_what_training_would_see(files, counting, tiny_vlm_dir):
    train, held_out = files
    report = check_files([train, held_out], *counting)
    first = report.files[0]
    records, skipped = read_records(train, skip_bad=True)
    assert first.records == len(records) == 12 + 20 + 3 and len(skipped) == 1
    base = load_base(tiny_vlm_dir)  # weights and all: the counts must not depend on them
    assert first.tokens == [encode_record(r, base).num_tokens for r in records]
    assert first.turns == [len(r.messages) for r in records]
    tiles = [n for r in records if r.images for n in tile_images(r, base, None)[1]]
    assert sorted(first.tiles.elements()) == sorted(tiles) and max(tiles) > 1
    sizes = [f"{w}x{h}" for r in records for w, h in (image.size for image in r.load_images())]
    assert sum(first.image_sizes.values()) == 12 and set(first.image_sizes) == set(sizes)
    assert first.errors == [f"{train}:{12 + 20 + 2}: not valid JSON (Expecting value at column 15)"]
    assert report.errors == 1


def test_check_finds_duplicates_leaks_and_personal_data_without_values(files, counting):
    train, held_out = files
    report = check_files([train, held_out], *counting)
    first, second = report.files
    assert (f"{train}:36", f"{train}:32", "exact") in [(d.source, d.duplicate_of, d.kind) for d in first.duplicates]
    (overlap,) = report.overlaps
    assert (overlap.file, overlap.against) == (held_out, train)
    assert [(m.source, m.duplicate_of, m.kind) for m in overlap.matches] == [(f"{held_out}:2", f"{train}:35", "exact")]
    assert first.pii == {"PHONE": 1, "EMAIL": 1, "CARD": 1} and not second.pii
    assert first.pii_counts()["IBAN"] == 0 and first.pii_counts()["CARD"] == 1  # every type looked for
    shown = json.dumps(report.to_json()) + format_report(report)
    for value in ("7946", "maria.lopez", "4111"):
        assert value not in shown


def test_the_command_writes_json_and_a_histogram_and_exits_1_on_errors(files, tmp_path):
    train, held_out = files
    args = [sys.executable, "-m", "lorafleet.cli", "data", "check", str(train), str(held_out), "--no-progress"]
    fleet = tmp_path / "fleet"
    run = subprocess.run(
        [*args, "--json", str(tmp_path / "r.json"), "--histogram", str(tmp_path / "h.png"), "--fleet", str(fleet)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1, run.stderr
    assert "built-in tiny model's tokenizer" in run.stdout and "1 errors" in run.stdout
    assert "overlap: 1 records of" in run.stdout
    found = json.loads((tmp_path / "r.json").read_text())["files"][0]["pii"]
    assert {kind: n for kind, n in found.items() if n} == {"CARD": 1, "EMAIL": 1, "PHONE": 1}
    assert {"DE_RVNR", "FR_SPI", "PERSON", "ADDRESS", "DATE_OF_BIRTH"} <= set(found)
    with Image.open(tmp_path / "h.png") as png:
        assert png.format == "PNG" and png.width > 300
    (entry,) = [json.loads(line) for path in (fleet / "audit").glob("*.jsonl") for line in path.open()]
    assert entry["event"] == "data.check" and entry["data"]["files"][0]["sha256"] == sha256_file(train)
    assert {kind: n for kind, n in entry["data"]["files"][0]["pii"].items() if n} == {"CARD": 1, "EMAIL": 1, "PHONE": 1}
    assert "maria.lopez" not in json.dumps(entry) and entry["data"]["overlaps"][0]["records"] == 1
    clean = tmp_path / "clean.jsonl"
    clean.write_text(chat("What is the policy?") + "\n")
    run = subprocess.run([*args[:5], str(clean), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "no errors" in run.stdout, run.stdout + run.stderr


def test_a_record_too_long_to_train_on_is_an_error_naming_its_line(tmp_path, counting):
    path = tmp_path / "long.jsonl"
    path.write_text(chat("What is the policy?") + "\n" + chat("word " * 300) + "\n")
    report = check_files([path], *counting, max_seq_len=200)
    (error,) = report.files[0].errors
    assert error.startswith(f"{path}:2: ") and "exceed max_seq_len 200" in error
    assert report.files[0].records == 1


def test_unreadable_files_are_errors_and_the_other_files_are_still_checked(tmp_path, counting):
    empty, junk, good = tmp_path / "empty.jsonl", tmp_path / "junk.jsonl", tmp_path / "good.jsonl"
    empty.write_text("")
    junk.write_bytes(bytes(range(256)) * 4)
    good.write_text(chat("What is the policy?") + "\n")
    report = check_files([empty, junk, tmp_path / "missing.jsonl", good], *counting)
    assert [f.records for f in report.files] == [0, 0, 0, 1]
    assert ["is empty" in report.files[0].errors[0], "binary" in report.files[1].errors[0]] == [True, True]
    assert "does not exist" in report.files[2].errors[0] and report.errors == 3


def test_the_demo_checks_each_departments_data_in_one_line(tmp_path, tiny_vlm_dir):
    from lorafleet.demo.run import check_departments
    from lorafleet.demo.synthetic import TASKS, write_task

    (tmp_path / "base").symlink_to(tiny_vlm_dir)
    for task in TASKS:
        write_task(task, tmp_path / "data", 40, seed=0, split="train")
        write_task(task, tmp_path / "data", 10, seed=0, split="test")
    lines = check_departments(tmp_path)
    assert [line.split(":")[0].strip() for line in lines] == [task.department for task in TASKS]
    assert all("40 train + 10 held-out records" in line and "0 malformed" in line for line in lines)
    assert all(line.startswith("  ") for line in lines)  # not taken for rows of the demo's accuracy table


def test_a_line_that_is_not_utf8_is_an_error_naming_it_and_the_other_lines_are_checked(tmp_path, counting):
    path = tmp_path / "mixed.jsonl"
    latin1 = json.dumps(json.loads(chat("Café résumé für Müller")), ensure_ascii=False).encode("latin-1")
    path.write_bytes(b"\n".join([chat("First?").encode(), latin1, chat("Third?").encode(), b"{bad", b""]))
    report = check_files([path], *counting)
    (check,) = report.files
    assert check.records == 2
    assert (
        check.errors[0].startswith(f"{path}:2: not UTF-8 text (byte ") and "save the file as UTF-8" in check.errors[0]
    )
    assert check.errors[1].startswith(f"{path}:4: not valid JSON")
    records, skipped = read_records(path, skip_bad=True)  # the trainer's reader says the same line
    assert len(records) == 2 and skipped[0].startswith(f"{path}:2: not UTF-8")


def test_the_json_report_holds_every_error_and_duplicate(tmp_path, counting):
    path = tmp_path / "many.jsonl"
    lines = [chat("What is the policy on travel?")] * 8 + ["{broken"] * 7
    path.write_text("\n".join(lines) + "\n")
    report = check_files([path], *counting)
    shown = report.to_json()["files"][0]
    assert shown["errors"]["count"] == len(shown["errors"]["all"]) == 7
    assert shown["duplicates"]["exact"] == len(shown["duplicates"]["all"]) == 7
    text = format_report(report)
    assert "... and 2 more errors (all in --json)" in text and "... and 2 more duplicates (all in --json)" in text


def test_check_counts_the_eu_pattern_pack_and_names_per_type(tmp_path, counting):
    path = tmp_path / "hr.jsonl"
    path.write_text(
        chat("Frau Anna Schmidt, geb. 12.03.1985, SV-Nummer 15 070649 C 103, wohnt Hauptstraße 12, 10115 Berlin.")
        + "\n"
    )
    (check,) = check_files([path], *counting).files
    counts = check.pii_counts()
    assert {kind: n for kind, n in counts.items() if n} == {
        "PERSON": 1,
        "DATE_OF_BIRTH": 1,
        "DE_RVNR": 1,
        "ADDRESS": 1,
    }
    assert counts["FR_SPI"] == 0 and counts["IBAN"] == 0
