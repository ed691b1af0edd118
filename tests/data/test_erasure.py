"""A person asks to be forgotten: planted in two of three departments' data and in the request log,
found exactly, removed, and the adapters that learned from them retrained, equal to training those
departments from scratch on the cleaned files; the third department's adapter is left alone, and
afterwards no byte of the fleet holds the person (the audit log keeps hashes only)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from lorafleet.cli import main
from lorafleet.config import AdapterSpec, FleetSpec
from lorafleet.data.erasure import find_person
from lorafleet.data.person import PersonMatcher, load_person
from lorafleet.data.pii import PiiDetector
from lorafleet.fleet_dir import FleetDir
from lorafleet.governance.audit import verify_chain
from lorafleet.governance.lineage import weight_hashes, weights_id
from lorafleet.governance.registry import Registry
from lorafleet.serve.gateway.audit_trail import AuditTrail
from lorafleet.serve.gateway.request_log import RequestLog, RequestRecord
from lorafleet.train.trainer import train_fleet
from tests.conftest import write_text_dataset

PERSON = {
    "names": ["Anna Schmidt"],
    "emails": ["anna.schmidt@example.org"],
    "phones": ["+49 30 12345678"],
    "ibans": ["DE89 3704 0044 0532 0130 00"],
}
# How the person appears in the data: other spacing, case and formats than the person file's.
WRITTEN = ["Anna Schmidt", "ANNA SCHMIDT", "anna.schmidt@example.org", "030 1234 5678", "DE89370400440532013000"]
PLANTED = {
    "hr": [
        (3, "Please update the file of Anna Schmidt, mail anna.schmidt@example.org", "Done."),
        (6, "Salary for ANNA SCHMIDT goes to IBAN DE89370400440532013000", "Noted."),
    ],
    "finance": [(2, "Call back on 030 1234 5678 about the invoice", "I will call.")],
}


def _plant(path: Path, records: list[tuple[int, str, str]]) -> list[int]:
    """Insert chats holding the person at the given line numbers; returns them."""
    lines = path.read_text().splitlines()
    for number, question, answer in records:
        chat = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        lines.insert(number - 1, json.dumps(chat))
    path.write_text("".join(line + "\n" for line in lines))
    return [number for number, _, _ in records]


def _adapters(data: dict[str, Path], held_out: Path) -> list[AdapterSpec]:
    """hr is scored on a held-out file too (the person is in it as well)."""
    settings = {"hr": (4, 3, 2e-3), "finance": (2, 5, 1e-3), "legal": (4, 7, 1e-3)}
    return [
        AdapterSpec(name=name, data=str(data[name]), rank=rank, target_modules=["q_proj", "v_proj"], steps=3, seed=seed,
                    learning_rate=lr, eval_data=str(held_out) if name == "hr" else None)
        for name, (rank, seed, lr) in settings.items()
        if name in data
    ]  # fmt: skip


def _weights(directory: Path) -> dict:
    return load_file(directory / "adapter_model.safetensors")


def _log_requests(fleet: Path) -> dict[str, bool]:
    """Three served requests, two holding the person, as the gateway logs them (content on), in a
    request log written before content went to the audit log only: its rows hold the content too."""
    log, trail = RequestLog(FleetDir(fleet).database), AuditTrail(fleet, redact=True)
    requests = {
        "req-mail": ("Is my address anna.schmidt@example.org on file?", "Yes, Anna Schmidt is on file.", True),
        "req-name": ("Write to Frau Anna Schmidt about her leave.", "Dear Anna Schmidt, ...", True),
        "req-other": ("What is the policy total?", "Three.", False),
    }
    for request_id, (prompt, reply, _) in requests.items():
        content = {"messages": [{"role": "user", "content": prompt}], "reply": reply}
        log.record(RequestRecord(request_id, "hr-team", "hr", 10, 5, 12.0, 200, None))
        log._db.execute("UPDATE requests SET content = ? WHERE request_id = ?", (json.dumps(content), request_id))
        log._db.commit()
        trail.record("serve.request", {"request_id": request_id, "model": "hr", "content": content})
    trail.close()
    log.close()
    return {request_id: holds for request_id, (_, _, holds) in requests.items()}


def _bytes_holding_the_person(roots: list[Path]) -> list[str]:
    forms = [form.encode() for form in WRITTEN] + [form.lower().encode() for form in WRITTEN]
    found = []
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            data = path.read_bytes()
            found += [f"{path}: {form!r}" for form in forms if form in data]
    return found


@pytest.mark.slow
def test_a_person_is_found_forgotten_and_the_adapters_that_learned_them_retrained(tiny_lm_dir, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data = {
        name: write_text_dataset(data_dir / f"{name}.jsonl", n=6, seed=i)
        for i, name in enumerate(PLANTED | {"legal": 0})
    }
    planted = {name: _plant(data[name], PLANTED[name]) for name in PLANTED}
    held_out = write_text_dataset(data_dir / "hr-test.jsonl", n=3, seed=9)
    planted["hr-test"] = _plant(held_out, [(2, "Is ANNA SCHMIDT on leave?", "Yes.")])
    fleet = tmp_path / "fleet"
    settings = {"base": str(tiny_lm_dir), "checkpoint_every": 2, "dtype": "float32", "device": "cpu"}
    train_fleet(FleetSpec(output=str(fleet), adapters=_adapters(data, held_out), **settings), progress=False)
    expected_requests = {request_id for request_id, holds in _log_requests(fleet).items() if holds}
    registry = Registry.open(fleet)
    before = {lineage.name: lineage for lineage in registry.all()}
    registry.close()
    legal_bytes = {p.name: p.read_bytes() for p in FleetDir(fleet).adapter("legal").iterdir()}
    person_file = tmp_path / "person.yaml"
    person_file.write_text(yaml.safe_dump(PERSON))
    detector = PiiDetector()
    matcher = PersonMatcher(load_person(person_file, detector.patterns.phone_regions), detector)

    person = ["--fleet", str(fleet), "--person", str(person_file)]
    assert main(["data", "find", *person, "--json", str(tmp_path / "found.json")]) == 1  # found: exit 1
    assert json.loads((tmp_path / "found.json").read_text())["person_sha256"] == matcher.person.sha256
    report = find_person(fleet, matcher)
    found = {(hits.path.name, record.line) for hits in report.files for record in hits.records}
    assert found == {(f"{name}.jsonl", line) for name, lines in planted.items() for line in lines}
    roles = {hits.path.name: hits.roles for hits in report.files}
    assert roles == {"hr.jsonl": ["training"], "finance.jsonl": ["training"], "hr-test.jsonl": ["held-out"]}
    learned = {hit.name: hit.id for hit in report.adapters if hit.learned}
    assert learned == {"hr": before["hr"].id, "finance": before["finance"].id}
    assert [hit.name for hit in report.adapters] == ["finance", "hr"]
    assert {hit.request_id for hit in report.requests} == expected_requests
    assert report.audit_entries == []  # the server logged the content redacted
    assert report.checkpoints and all(set(hit.adapters) <= {"hr", "finance"} for hit in report.checkpoints)

    assert main(["data", "forget", *person, "--retrain", "--no-progress"]) == 0

    cleaned = {name: data[name] for name in PLANTED}
    assert all(len(path.read_text().splitlines()) == 6 for path in cleaned.values())
    assert len(held_out.read_text().splitlines()) == 3
    reference = tmp_path / "reference"
    train_fleet(FleetSpec(output=str(reference), adapters=_adapters(cleaned, held_out), **settings), progress=False)
    for name in cleaned:  # the same computation: equal to the last bit
        ours, theirs = _weights(FleetDir(fleet).adapter(name)), _weights(FleetDir(reference).adapter(name))
        assert ours.keys() == theirs.keys()
        assert all(ours[key].equal(theirs[key]) for key in theirs), name
    assert {p.name: p.read_bytes() for p in FleetDir(fleet).adapter("legal").iterdir()} == legal_bytes

    registry = Registry.open(fleet)
    withdrawn = registry.withdrawn()
    assert set(withdrawn) == {before["hr"].id, before["finance"].id}
    for name in cleaned:
        new = registry.find(name)
        assert new.id == weights_id(weight_hashes(FleetDir(fleet).adapter(name)))
        assert withdrawn[before[name].id]["replaced_by"] == new.id
        assert (new.parents[-1]["relation"], new.parents[-1]["id"]) == ("retrained_after_erasure", before[name].id)
        assert new.data[0].sha256 != before[name].data[0].sha256  # the old hash stays in the old lineage
    assert registry.find("legal").to_dict() == before["legal"].to_dict()
    registry.close()

    assert find_person(fleet, matcher).empty
    assert main(["data", "find", *person]) == 0
    assert _bytes_holding_the_person([fleet, data_dir]) == []
    verify_chain(fleet)
    events = [json.loads(line)["event"] for path in FleetDir(fleet).audit.glob("*.jsonl") for line in path.open()]
    assert events[-4:] == ["data.find", "data.forget", "data.retrained", "data.find"]
    rows = sqlite3.connect(FleetDir(fleet).database).execute("SELECT request_id, content FROM requests").fetchall()
    assert {request_id for request_id, content in rows if "ERASED" in content} == expected_requests
