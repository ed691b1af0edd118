"""The audit log's hash chain catches every kind of tampering, and survives concurrent writers."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from lorafleet.cli import main
from lorafleet.errors import AuditError
from lorafleet.governance.audit import AuditLog, export_entries, list_segments, verify_chain
from lorafleet.governance.retention import prune
from lorafleet.governance.signing import (
    generate_key,
    load_private_key,
    load_public_key,
    sign_checkpoint,
    verify_checkpoints,
)


@pytest.fixture
def fleet(tmp_path):
    log = AuditLog(tmp_path)
    for index in range(6):
        log.append("test.event", {"index": index, "note": "é" * index})
    return tmp_path


def segment(fleet):
    (only,) = list_segments(fleet / "audit")
    return only


def rewrite(fleet, change) -> None:
    path = segment(fleet)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(change(lines)))


def test_an_untouched_log_verifies(fleet):
    report = verify_chain(fleet)
    assert (report.entries, report.first_seq, report.last_seq) == (6, 1, 6)
    assert verify_chain(fleet / "audit").last_hash == report.last_hash


def test_one_changed_byte_in_a_middle_line_is_named(fleet):
    def edit(lines):
        lines[2] = lines[2].replace('"index":2', '"index":7')
        return lines

    rewrite(fleet, edit)
    with pytest.raises(AuditError, match=r":3: entry seq 3 was changed"):
        verify_chain(fleet)


def test_a_deleted_line_is_named(fleet):
    rewrite(fleet, lambda lines: lines[:2] + lines[3:])
    with pytest.raises(AuditError, match=r":3: entry seq 4 does not follow entry seq 2"):
        verify_chain(fleet)


def test_two_swapped_lines_are_named(fleet):
    rewrite(fleet, lambda lines: lines[:1] + [lines[2], lines[1]] + lines[3:])
    with pytest.raises(AuditError, match=r":2: entry seq 3 does not follow entry seq 1"):
        verify_chain(fleet)


def test_an_inserted_line_with_a_correct_hash_still_breaks_the_chain(tmp_path, fleet):
    other = AuditLog(tmp_path / "other")
    forged = json.dumps(other.append("test.event", {"index": 99}), sort_keys=True) + "\n"
    rewrite(fleet, lambda lines: lines[:3] + [forged] + lines[3:])
    with pytest.raises(AuditError, match=r":4: entry seq 1 does not follow entry seq 3"):
        verify_chain(fleet)


def test_a_cut_off_last_line_is_caught(fleet):
    path = segment(fleet)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(AuditError, match=r":6: not a complete audit entry"):
        verify_chain(fleet)


def test_whole_lines_cut_off_the_end_are_caught(fleet):
    rewrite(fleet, lambda lines: lines[:4])
    with pytest.raises(AuditError, match=r"entries 5..6 were cut off \(truncated\)"):
        verify_chain(fleet)


def test_deleting_the_first_lines_is_caught(fleet):
    rewrite(fleet, lambda lines: lines[2:])
    with pytest.raises(AuditError, match=r":1: the log starts at entry seq 3, not 1"):
        verify_chain(fleet)


def _append_many(fleet_dir, writer: int, count: int) -> None:
    log = AuditLog(fleet_dir)
    for index in range(count):
        log.append("test.concurrent", {"writer": writer, "index": index})


def test_two_processes_appending_at_once_keep_one_valid_chain(tmp_path):
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_append_many, args=(tmp_path, writer, 150)) for writer in range(2)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=60)
        assert process.exitcode == 0
    report = verify_chain(tmp_path)
    assert report.entries == 300
    entries = [json.loads(line) for line in segment(tmp_path).read_text().splitlines()]
    written = {(entry["data"]["writer"], entry["data"]["index"]) for entry in entries}
    assert written == {(writer, index) for writer in range(2) for index in range(150)}


def _append_batches(directory, writer: int, batches: int) -> None:
    log = AuditLog(directory)
    for batch in range(batches):
        log.append_all([("test.batch", {"writer": writer, "batch": batch, "index": index}) for index in range(5)])


def test_batches_from_two_processes_stay_whole_and_in_one_valid_chain(tmp_path):
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_append_batches, args=(tmp_path, writer, 40)) for writer in range(2)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert verify_chain(tmp_path).entries == 400
    entries = [json.loads(line)["data"] for line in segment(tmp_path).read_text().splitlines()]
    for start in range(0, 400, 5):  # a batch's entries are consecutive: one lock, one write
        batch = entries[start : start + 5]
        assert [e["index"] for e in batch] == list(range(5))
        assert len({(e["writer"], e["batch"]) for e in batch}) == 1


def test_export_of_a_time_range_verifies_on_its_own(fleet, tmp_path):
    entries = [json.loads(line) for line in segment(fleet).read_text().splitlines()]
    out = tmp_path / "export.jsonl"
    count = export_entries(fleet, out, since=entries[2]["time"], until=entries[5]["time"])
    assert count == 3
    assert [json.loads(line)["seq"] for line in out.read_text().splitlines()] == [3, 4, 5]
    assert verify_chain(out).entries == 3
    with pytest.raises(AuditError, match="no audit entries between"):
        export_entries(fleet, tmp_path / "none.jsonl", since="2001-01-01", until="2001-02-01")


def old_month(directory, entries: int) -> None:
    """`entries` entries written in January 2001 (a log's clock can be set), then one now."""
    old = AuditLog(directory, clock=lambda: "2001-01-15T12:00:00.000000Z")
    for index in range(entries):
        old.append("test.event", {"index": index})
    AuditLog(directory).append("test.event", {"index": entries})


def test_retention_deletes_whole_old_months_and_the_chain_still_verifies(tmp_path):
    old_month(tmp_path, 6)
    deleted = prune(tmp_path, keep_days=30, via="test")
    assert [path.name for path in deleted] == ["2001-01.jsonl"] and not deleted[0].exists()
    report = verify_chain(tmp_path)
    assert (report.first_seq, report.last_seq) == (7, 8)
    pruned = report.prunes[0]["data"]
    assert (pruned["keep_days"], pruned["retention_days"], pruned["kept_from_seq"]) == (30, None, 7)
    assert pruned["by"]["via"] == "test" and pruned["by"]["user"]


def test_deleting_an_old_month_without_retention_is_caught(tmp_path):
    old_month(tmp_path, 6)
    (tmp_path / "audit" / "2001-01.jsonl").unlink()
    with pytest.raises(AuditError, match="the log starts at entry seq 7, not 1"):
        verify_chain(tmp_path)


def test_signed_checkpoints_verify_with_the_public_key_only(fleet, tmp_path):
    public = generate_key(tmp_path / "audit.key")
    checkpoint = sign_checkpoint(fleet, load_private_key(tmp_path / "audit.key"))
    assert checkpoint["seq"] == 6
    AuditLog(fleet).append("test.event", {"index": 7})
    signed = verify_checkpoints(fleet, load_public_key(public), verify_chain(fleet))
    assert signed.checked == 1


def test_a_wrong_public_key_is_refused(fleet, tmp_path):
    generate_key(tmp_path / "signer.key")
    other = generate_key(tmp_path / "other.key")
    sign_checkpoint(fleet, load_private_key(tmp_path / "signer.key"))
    with pytest.raises(AuditError, match="does not verify with this public key"):
        verify_checkpoints(fleet, load_public_key(other), verify_chain(fleet))


def test_a_rebuilt_chain_fails_the_signed_checkpoint(fleet, tmp_path):
    """Rewriting every hash from some entry on passes the chain check; the signature catches it."""
    public = generate_key(tmp_path / "audit.key")
    sign_checkpoint(fleet, load_private_key(tmp_path / "audit.key"))
    entries = [json.loads(line) for line in segment(fleet).read_text().splitlines()]
    segment(fleet).unlink()
    (fleet / "audit" / "head.json").unlink()
    log = AuditLog(fleet)
    for entry in entries:
        data = entry["data"] | ({"index": 42} if entry["seq"] == 4 else {})
        log.append(entry["event"], data)
    with pytest.raises(AuditError, match="entry seq 6 differs from the one that was signed"):
        verify_checkpoints(fleet, load_public_key(public), verify_chain(fleet))


def test_audit_verify_command_exits_non_zero_and_names_the_entry(fleet, tmp_path, capsys):
    assert main(["audit", "verify", str(fleet)]) == 0
    assert "audit log valid: 6 entries" in capsys.readouterr().out
    assert main(["audit", "keygen", str(tmp_path / "k")]) == 0
    assert main(["audit", "sign", str(fleet), "--key", str(tmp_path / "k")]) == 0
    assert main(["audit", "verify", str(fleet), "--public-key", str(tmp_path / "k.pub")]) == 0
    assert "signed checkpoints: 1 verified" in capsys.readouterr().out
    rewrite(fleet, lambda lines: lines[:1] + lines[2:])
    assert main(["audit", "verify", str(fleet)]) == 1
    assert "entry seq 3 does not follow entry seq 1" in capsys.readouterr().err
    assert main(["audit", "export", str(fleet), "--out", str(tmp_path / "x.jsonl")]) == 2


def test_a_key_file_that_is_not_a_public_key_is_a_usage_error_not_a_bad_log(fleet, tmp_path, capsys):
    (tmp_path / "not-a-key.pub").write_text("-----BEGIN NOTHING-----\n")
    assert main(["audit", "verify", str(fleet), "--public-key", str(tmp_path / "not-a-key.pub")]) == 2
    err = capsys.readouterr().err
    assert "is not a PEM key" in err and "NOT valid" not in err
    assert main(["audit", "verify", str(fleet), "--checkpoints", str(tmp_path / "copy.jsonl")]) == 2
    assert "--checkpoints needs --public-key" in capsys.readouterr().err


def test_a_checkpoint_entry_without_its_signature_fails_with_the_key(fleet, tmp_path):
    """Entries written before entries carried their signature hold only (seq, hash): the file must."""
    public = generate_key(tmp_path / "audit.key")
    sign_checkpoint(fleet, load_private_key(tmp_path / "audit.key"))
    AuditLog(fleet).append("audit.checkpoint", {"seq": 7, "hash": verify_chain(fleet).hashes[7]})
    with pytest.raises(AuditError, match="entry seq 8 records a checkpoint of seq 7 without its signature"):
        verify_checkpoints(fleet, load_public_key(public), verify_chain(fleet))
