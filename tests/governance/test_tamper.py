"""An auditor's attacks on a signed, pruned audit log, each checked with and without the public key.

The log: a month from 2001 that retention deleted, a recent month, the current month; the
retention recorded; three signed checkpoints with a copy of checkpoints.jsonl kept off the host;
two entries written after the last checkpoint. Every attack edits the files as someone who can
write the fleet directory (but holds no private key) would, then runs `lorafleet audit verify`
without a key ("unsigned") and with `--public-key` and `--checkpoints COPY` ("signed"). The table
in docs/security.md states each outcome; the last test holds the table to what these attacks do.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lorafleet.cli import main
from lorafleet.errors import AuditError
from lorafleet.governance.audit import AuditLog, entry_hash, list_segments, utc_now
from lorafleet.governance.retention import prune, set_retention
from lorafleet.governance.signing import generate_key, load_private_key, sign_checkpoint

KEEP_DAYS = 184
SECURITY_MD = Path(__file__).parents[2] / "docs" / "security.md"


@dataclass
class SignedLog:
    fleet: Path
    key: Path
    public: Path
    copy: Path  # checkpoints.jsonl as copied off the host after the third checkpoint

    @property
    def audit(self) -> Path:
        return self.fleet / "audit"


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def build_log(root: Path) -> SignedLog:
    """seq 1-3 in January 2001, 4-6 forty days ago, then this month: 7 retention set, 8 checkpoint
    of 7, 9-12, 13 the prune of January 2001, 14 checkpoint of 13, 15-18, 19 checkpoint of 18, 20-21."""
    fleet = root / "fleet"
    ancient = AuditLog(fleet, clock=lambda: "2001-01-15T12:00:00.000000Z")
    recent = AuditLog(fleet, clock=lambda: iso(datetime.now(UTC) - timedelta(days=40)))
    for log, event in ((ancient, "train.start"), (recent, "serve.request")):
        for index in range(3):
            log.append(event, {"index": index})
    set_retention(fleet, KEEP_DAYS, via="lorafleet train")
    public = generate_key(root / "audit.key")
    key = load_private_key(root / "audit.key")
    sign_checkpoint(fleet, key)
    log = AuditLog(fleet)
    for index in range(4):
        log.append("serve.request", {"index": index})
    assert [path.name for path in prune(fleet, KEEP_DAYS, via="lorafleet serve")] == ["2001-01.jsonl"]
    sign_checkpoint(fleet, key)
    for index in range(4):
        log.append("serve.request", {"index": 10 + index})
    sign_checkpoint(fleet, key)
    offhost = root / "offhost"
    offhost.mkdir()
    shutil.copy(fleet / "audit" / "checkpoints.jsonl", offhost / "checkpoints.jsonl")
    for index in range(2):
        log.append("serve.request", {"index": 20 + index})
    return SignedLog(fleet, root / "audit.key", public, offhost / "checkpoints.jsonl")


# --- what an attacker does to the files ----------------------------------------------------------


def entries(signed: SignedLog) -> list[tuple[Path, dict]]:
    segments = list_segments(signed.audit)
    return [(segment, json.loads(line)) for segment in segments for line in segment.read_text().splitlines()]


def write_entries(signed: SignedLog, rows: list[tuple[Path, dict]], rechain: bool) -> None:
    """Write `rows` back as the log (and head.json); `rechain` recomputes every seq, prev and hash
    after the first entry, as anyone can for an unkeyed chain."""
    for segment in list_segments(signed.audit):
        segment.unlink()
    previous = None
    for segment, entry in rows:
        if rechain and previous is not None:
            entry = entry | {"seq": previous["seq"] + 1, "prev": previous["hash"]}
            entry["hash"] = entry_hash(entry)
        with segment.open("a") as handle:
            handle.write(json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n")
        previous = entry
    (signed.audit / "head.json").write_text(json.dumps({"seq": previous["seq"], "hash": previous["hash"]}))


def drop_checkpoint_lines(signed: SignedLog, keep: int) -> None:
    path = signed.audit / "checkpoints.jsonl"
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:keep]))


def seq_of(rows: list[tuple[Path, dict]], seq: int) -> int:
    return next(index for index, (_, entry) in enumerate(rows) if entry["seq"] == seq)


def recent_month(signed: SignedLog) -> Path:
    return list_segments(signed.audit)[0]


def forge_prune(signed: SignedLog, data: dict, time: str | None = None) -> None:
    AuditLog(signed.fleet, clock=lambda: time or utc_now()).append("audit.pruned", data)


def by_hand() -> dict:
    return {"user": "root", "host": "fleet-host", "pid": 1, "via": "lorafleet audit prune"}


def edit(signed: SignedLog) -> None:
    rows = entries(signed)
    rows[seq_of(rows, 10)][1]["data"]["index"] = 99
    write_entries(signed, rows, rechain=False)


def delete_line(signed: SignedLog) -> None:
    rows = entries(signed)
    del rows[seq_of(rows, 10)]
    write_entries(signed, rows, rechain=False)


def reorder(signed: SignedLog) -> None:
    rows = entries(signed)
    at = seq_of(rows, 10)
    rows[at], rows[at + 1] = rows[at + 1], rows[at]
    write_entries(signed, rows, rechain=False)


def insert(signed: SignedLog) -> None:
    rows = entries(signed)
    at = seq_of(rows, 10)
    forged = {"seq": 10, "time": utc_now(), "event": "serve.request", "data": {"index": 0}}
    forged["prev"] = rows[at - 1][1]["hash"]
    forged["hash"] = entry_hash(forged)
    rows.insert(at, (rows[at][0], forged))
    write_entries(signed, rows, rechain=False)


def cut_line(signed: SignedLog) -> None:
    segment = list_segments(signed.audit)[-1]
    segment.write_bytes(segment.read_bytes()[:-20])


def truncate(signed: SignedLog) -> None:
    rows = entries(signed)
    segment = rows[-1][0]
    segment.write_text("".join(line + "\n" for line in segment.read_text().splitlines()[:-2]))


def truncate_head(signed: SignedLog) -> None:
    rows = entries(signed)
    write_entries(signed, rows[: seq_of(rows, 16) + 1], rechain=False)


def truncate_unsigned_tail(signed: SignedLog) -> None:
    rows = entries(signed)
    write_entries(signed, rows[: seq_of(rows, 19) + 1], rechain=False)


def delete_first(signed: SignedLog) -> None:
    rows = entries(signed)
    write_entries(signed, rows[2:], rechain=False)


def delete_month(signed: SignedLog) -> None:
    recent_month(signed).unlink()


def forged_prune_bare(signed: SignedLog) -> None:
    """As found: the first entries deleted, a chained entry naming the new first one."""
    rows = entries(signed)
    write_entries(signed, rows[2:], rechain=False)
    first = rows[2][1]
    forge_prune(signed, {"kept_from_seq": first["seq"], "kept_from_prev": first["prev"]})


def _prune_record(first: dict, deleted: str, keep_days: int, retention_days: int) -> dict:
    return {
        "deleted_segments": [deleted],
        "keep_days": keep_days,
        "retention_days": retention_days,
        "kept_from_seq": first["seq"],
        "kept_from_prev": first["prev"],
        "by": by_hand(),
    }


def forged_prune(signed: SignedLog) -> None:
    """Every field present; it names the month it deleted from."""
    rows = entries(signed)
    write_entries(signed, rows[2:], rechain=False)
    forge_prune(signed, _prune_record(rows[2][1], recent_month(signed).name, KEEP_DAYS, KEEP_DAYS))


def forged_prune_crafted(signed: SignedLog) -> None:
    """Every field consistent: it claims an old month was deleted."""
    rows = entries(signed)
    write_entries(signed, rows[2:], rechain=False)
    forge_prune(signed, _prune_record(rows[2][1], "2000-12.jsonl", KEEP_DAYS, KEEP_DAYS))


def delete_recent_month(signed: SignedLog) -> None:
    rows = entries(signed)
    recent_month(signed).unlink()
    forge_prune(signed, _prune_record(rows[3][1], recent_month_name(rows), 1, 1))


def future_prune(signed: SignedLog) -> None:
    rows = entries(signed)
    recent_month(signed).unlink()
    future = iso(datetime.now(UTC) + timedelta(days=365))
    forge_prune(signed, _prune_record(rows[3][1], recent_month_name(rows), KEEP_DAYS, KEEP_DAYS), future)


def recent_month_name(rows: list[tuple[Path, dict]]) -> str:
    return rows[0][0].name


def lower_retention_then_prune(signed: SignedLog) -> None:
    """What an operator may do; the server signs again within the hour."""
    set_retention(signed.fleet, 1, via="lorafleet train")
    prune(signed.fleet, 1, via="lorafleet audit prune")
    sign_checkpoint(signed.fleet, load_private_key(signed.key))


def rebuild(signed: SignedLog) -> None:
    rows = entries(signed)
    rows[seq_of(rows, 16)][1]["data"]["index"] = 99
    write_entries(signed, rows, rechain=True)


def rebuild_dropping_signatures(signed: SignedLog) -> None:
    rows = entries(signed)
    rows[seq_of(rows, 16)][1]["data"]["index"] = 99
    del rows[seq_of(rows, 19)]  # the newest checkpoint's entry
    write_entries(signed, rows, rechain=True)
    drop_checkpoint_lines(signed, keep=2)


def drop_checkpoint_lines_only(signed: SignedLog) -> None:
    drop_checkpoint_lines(signed, keep=1)


def foreign_key(signed: SignedLog) -> None:
    rows = [(path, entry) for path, entry in entries(signed) if entry["event"] != "audit.checkpoint"]
    rows[seq_of(rows, 16)][1]["data"]["index"] = 99
    write_entries(signed, rows, rechain=True)
    (signed.audit / "checkpoints.jsonl").unlink()
    generate_key(signed.key.parent / "attacker.key")
    sign_checkpoint(signed.fleet, load_private_key(signed.key.parent / "attacker.key"))


def forged_checkpoint_entry(signed: SignedLog) -> None:
    rows = entries(signed)
    last = rows[-1][1]
    fake = {"seq": last["seq"], "hash": last["hash"], "time": utc_now(), "months": {}, "signature": "00" * 64}
    AuditLog(signed.fleet).append("audit.checkpoint", fake)


ATTACKS: dict[str, tuple[Callable[[SignedLog], None], bool]] = {  # name -> (attack, verifier has the copy)
    "edit": (edit, True),
    "delete-line": (delete_line, True),
    "reorder": (reorder, True),
    "insert": (insert, True),
    "cut-line": (cut_line, True),
    "truncate": (truncate, True),
    "truncate-head": (truncate_head, True),
    "truncate-unsigned-tail": (truncate_unsigned_tail, True),
    "delete-first": (delete_first, True),
    "delete-month": (delete_month, True),
    "forged-prune-bare": (forged_prune_bare, True),
    "forged-prune": (forged_prune, True),
    "forged-prune-crafted": (forged_prune_crafted, True),
    "delete-recent-month": (delete_recent_month, True),
    "future-prune": (future_prune, True),
    "lower-retention": (lower_retention_then_prune, True),
    "rebuild": (rebuild, True),
    "rebuild-drop-signatures": (rebuild_dropping_signatures, True),
    "rebuild-drop-signatures-no-copy": (rebuild_dropping_signatures, False),
    "drop-checkpoint-lines": (drop_checkpoint_lines_only, True),
    "foreign-key": (foreign_key, True),
    "forged-checkpoint-entry": (forged_checkpoint_entry, True),
}


def caught(signed: SignedLog, capsys, with_key: bool, with_copy: bool = True) -> bool:
    argv = ["audit", "verify", str(signed.fleet)]
    if with_key:
        argv += ["--public-key", str(signed.public)] + (["--checkpoints", str(signed.copy)] if with_copy else [])
    code = main(argv)
    capsys.readouterr()
    assert code in (0, 1)  # never a usage error or a crash
    return code == 1


@pytest.fixture
def signed_log(tmp_path) -> SignedLog:
    return build_log(tmp_path)


def test_the_untouched_log_verifies_with_and_without_the_key(signed_log, capsys):
    assert not caught(signed_log, capsys, with_key=False)
    assert not caught(signed_log, capsys, with_key=True)
    assert main(["audit", "verify", str(signed_log.fleet), "--public-key", str(signed_log.public)]) == 0
    out = capsys.readouterr().out
    assert "signed checkpoints: 3 verified, 0 before retention" in out
    assert f"retention: {KEEP_DAYS} days" in out and "1 prune" in out


def documented_outcomes() -> dict[str, tuple[str, str]]:
    """attack -> (unsigned, signed) as the tamper table in docs/security.md states them."""
    rows = re.findall(r"^\| `([a-z-]+)`[^|]*\| (\w+)[^|]*\| (\w+)[^|]*\|", SECURITY_MD.read_text(), flags=re.MULTILINE)
    return {name: (unsigned, signed) for name, unsigned, signed in rows}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_each_attack_has_the_outcome_docs_security_md_states(name, signed_log, capsys):
    attack, with_copy = ATTACKS[name]
    attack(signed_log)
    outcome = (
        "caught" if caught(signed_log, capsys, with_key=False) else "missed",
        "caught" if caught(signed_log, capsys, with_key=True, with_copy=with_copy) else "missed",
    )
    assert documented_outcomes().get(name) == outcome


def test_the_table_lists_exactly_these_attacks():
    assert sorted(documented_outcomes()) == sorted(ATTACKS)


def test_every_attack_a_signature_can_catch_is_caught_signed():
    """What signing misses is what no signature has seen yet, or what the key holder allowed."""
    missed = {name for name, (_, signed) in documented_outcomes().items() if signed == "missed"}
    assert missed == {"truncate-unsigned-tail", "lower-retention", "rebuild-drop-signatures-no-copy"}


def test_the_forged_prune_as_found_is_named(signed_log, capsys):
    forged_prune_bare(signed_log)
    assert main(["audit", "verify", str(signed_log.fleet)]) == 1
    assert "lacks by, deleted_segments, keep_days, retention_days" in capsys.readouterr().err


def test_a_prune_of_part_of_a_month_is_named(signed_log, capsys):
    forged_prune(signed_log)
    assert main(["audit", "verify", str(signed_log.fleet)]) == 1
    assert "only whole months older than the retention may be deleted" in capsys.readouterr().err


def test_a_crafted_prune_is_caught_by_what_the_checkpoints_signed(signed_log, capsys):
    forged_prune_crafted(signed_log)
    argv = ["audit", "verify", str(signed_log.fleet), "--public-key", str(signed_log.public)]
    assert main(argv) == 1
    assert "part of a month was deleted" in capsys.readouterr().err


def test_the_server_would_not_sign_a_forged_prune(signed_log):
    forged_prune_crafted(signed_log)
    with pytest.raises(AuditError, match="part of a month was deleted"):
        sign_checkpoint(signed_log.fleet, load_private_key(signed_log.key))
