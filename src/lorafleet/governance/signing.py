"""Signed checkpoints of the audit chain (Ed25519), checked with the public key alone.

A hash chain shows that no line was changed relative to the lines around it, but whoever can
write the log can rebuild it from some entry on. A checkpoint signs the newest entry's (seq, hash),
the time, and where each monthly segment then began (`months`), with a private key that writer
does not hold. A verifier with the public key then knows that the chain up to that entry is the
one that was signed, that the log was not cut off before it, and which months any later deletion
removed: retention may delete only whole months older than its period, and only a prune that a
later checkpoint covers (the signer verifies everything, signatures included, before it signs, so
it never covers a forged prune its own checkpoints contradict).

Each checkpoint is appended to `audit/checkpoints.jsonl` and recorded, signature and all, as an
`audit.checkpoint` entry of the chain: with the public key, every such entry must carry a valid
signature and the file must hold every checkpoint the chain records. What neither can show is a
chain rebuilt from before the newest checkpoints with those checkpoints dropped from both: keep a
copy of checkpoints.jsonl where the fleet's host cannot write and verify with `--checkpoints COPY`.
Sign from cron (`lorafleet audit sign`) or let the server sign (`lorafleet serve --audit-key`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lorafleet.errors import AuditError
from lorafleet.governance.audit import (
    CHECKPOINT,
    AuditLog,
    VerifyReport,
    audit_dir,
    month_end,
    prune_cutoff,
    utc_now,
    verify_chain,
)

CHECKPOINTS = "checkpoints.jsonl"
SIGNED_FIELDS = ("hash", "months", "seq", "time")  # `months` is absent from checkpoints made before it was signed


def generate_key(private_path: str | Path) -> Path:
    """Write a new Ed25519 private key (PEM, owner-only) and its public key beside it (.pub)."""
    private_path = Path(private_path)
    if private_path.exists():
        raise AuditError(f"{private_path} exists; choose another path (a key is never overwritten)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    public_path = private_path.with_name(private_path.name + ".pub")
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return public_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    key = _load(path, serialization.load_pem_private_key, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditError(f"{path} is not an Ed25519 private key; make one with `lorafleet audit keygen`")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    key = _load(path, serialization.load_pem_public_key)
    if not isinstance(key, Ed25519PublicKey):
        raise AuditError(f"{path} is not an Ed25519 public key (the .pub file `lorafleet audit keygen` writes)")
    return key


def _load(path: str | Path, loader, **kwargs):
    path = Path(path)
    if not path.exists():
        raise AuditError(f"key file {path} does not exist")
    try:
        return loader(path.read_bytes(), **kwargs)
    except (ValueError, TypeError) as err:
        raise AuditError(f"{path} is not a PEM key: {err}") from err


def _message(checkpoint: dict) -> bytes:
    signed = {name: checkpoint[name] for name in SIGNED_FIELDS if name in checkpoint}
    return json.dumps(signed, sort_keys=True, separators=(",", ":")).encode()


def sign_checkpoint(fleet_dir: str | Path, key: Ed25519PrivateKey) -> dict:
    """Verify the chain and its checkpoints, sign the newest entry and the months the log holds,
    append the checkpoint to checkpoints.jsonl and record it in the chain (`audit.checkpoint`)."""
    report = verify_chain(fleet_dir)
    if report.checkpoints or (audit_dir(fleet_dir) / CHECKPOINTS).exists():
        verify_checkpoints(fleet_dir, key.public_key(), report, require_coverage=False)
    checkpoint = {"seq": report.last_seq, "hash": report.last_hash, "time": utc_now(), "months": report.segment_starts}
    checkpoint["signature"] = key.sign(_message(checkpoint)).hex()
    with (audit_dir(fleet_dir) / CHECKPOINTS).open("a") as handle:
        handle.write(json.dumps(checkpoint, sort_keys=True) + "\n")
    AuditLog(fleet_dir).append(CHECKPOINT, checkpoint)
    return checkpoint


@dataclass
class CheckpointReport:
    checked: int  # signatures that held, over entries still in the log
    before_retention: int  # checkpoints of entries retention has since deleted


@dataclass
class _Signed:
    checkpoint: dict
    where: str


def verify_checkpoints(
    fleet_dir: str | Path,
    key: Ed25519PublicKey,
    report: VerifyReport,
    copy: Path | None = None,
    require_coverage: bool = True,
) -> CheckpointReport:
    """Check every signed checkpoint, in the chain's `audit.checkpoint` entries, in checkpoints.jsonl
    and in `copy` (an off-host copy of it): each must carry a valid signature by `key` and name an
    entry the chain still holds with the same hash, or one a whole-month prune allowed deleting.
    A checkpoint past the chain's end means it was truncated; a prune no checkpoint covers, or a
    signed month deleted in part or too young, that the log was cut from the start."""
    local = _read_file(audit_dir(fleet_dir) / CHECKPOINTS) if not report.exported else []
    copied = _read_file(copy, must_exist=True) if copy else []
    in_chain = _chain_checkpoints(report, local + copied)
    signed = in_chain + local + copied
    if not signed:
        raise AuditError(
            f"{audit_dir(fleet_dir)}: the log has no signed checkpoints (`lorafleet audit sign`, or serve --audit-key)"
        )
    for item in signed:
        _check_signature(item, key)
    _check_file_holds_chain(fleet_dir, report, in_chain, local)
    in_log = {item.checkpoint["signature"]: _check_against_chain(item, report) for item in signed}
    checked = sum(in_log.values())
    before = len(in_log) - checked
    if require_coverage and not report.exported:
        _check_prunes_covered(report, signed)
    return CheckpointReport(checked, before)


def _read_file(path: Path, must_exist: bool = False) -> list[_Signed]:
    if not path.exists():
        if must_exist:
            raise AuditError(f"checkpoints file {path} does not exist")
        return []
    found = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            checkpoint = json.loads(line)
            ok = isinstance(checkpoint, dict) and {"seq", "hash", "time", "signature"} <= set(checkpoint)
        except json.JSONDecodeError:
            ok = False
        if not ok:
            raise AuditError(f"{path}:{number}: not a signed checkpoint (edited or cut off)")
        found.append(_Signed(checkpoint, f"{path}:{number}"))
    return found


def _chain_checkpoints(report: VerifyReport, files: list[_Signed]) -> list[_Signed]:
    """The checkpoints the chain records. An entry written before entries carried their signature
    holds only (seq, hash): its signature must then be in a checkpoints file."""
    found = []
    for entry in report.checkpoints:
        data, where = entry["data"], f"audit entry seq {entry['seq']}"
        if "signature" not in data:
            recorded = (data.get("seq"), data.get("hash"))
            if not any((f.checkpoint["seq"], f.checkpoint["hash"]) == recorded for f in files):
                raise AuditError(
                    f"{where} records a checkpoint of seq {data.get('seq')} without its signature, and no "
                    "checkpoints file holds it: the signature was removed"
                )
            continue
        found.append(_Signed(data, where))
    return found


def _check_signature(item: _Signed, key: Ed25519PublicKey) -> None:
    try:
        key.verify(bytes.fromhex(item.checkpoint["signature"]), _message(item.checkpoint))
    except InvalidSignature as err:
        raise AuditError(
            f"{item.where}: the signature does not verify with this public key (wrong key, or edited)"
        ) from err
    except (KeyError, ValueError, TypeError) as err:
        raise AuditError(f"{item.where}: not a signed checkpoint ({err})") from err


def _check_file_holds_chain(fleet_dir, report: VerifyReport, in_chain: list[_Signed], local: list[_Signed]) -> None:
    """Lines dropped from checkpoints.jsonl are caught: the chain records every checkpoint."""
    if report.exported:
        return
    held = {item.checkpoint["signature"] for item in local}
    for item in in_chain:
        if item.checkpoint["signature"] not in held:
            raise AuditError(
                f"{audit_dir(fleet_dir) / CHECKPOINTS} lacks the checkpoint of seq {item.checkpoint['seq']} that "
                f"{item.where} records: signed checkpoints were removed from the file"
            )


def _check_against_chain(item: _Signed, report: VerifyReport) -> bool:
    """True when the signed entry is in the log (and matches); False when retention deleted it."""
    checkpoint, where = item.checkpoint, item.where
    seq = checkpoint["seq"]
    if seq > report.last_seq:
        if report.exported:
            return False
        raise AuditError(
            f"{where}: signed entry seq {seq} is past the log's end (seq {report.last_seq}): the log was truncated"
        )
    if seq >= report.first_seq:
        if report.hashes[seq] != checkpoint["hash"]:
            raise AuditError(f"{where}: entry seq {seq} differs from the one that was signed (the chain was rebuilt)")
    if not report.exported:
        _check_signed_months(item, report)
    return seq >= report.first_seq


def _check_signed_months(item: _Signed, report: VerifyReport) -> None:
    """What a checkpoint signed about the months the log then held must agree with any deletion
    since: every month begun before the log's first entry wholly gone and older than some prune
    in the log allowed, and the first entry the start of a month wherever the checkpoint saw it."""
    months, first = item.checkpoint.get("months") or {}, report.first_seq
    if first == 1 or not months:
        return
    if first <= item.checkpoint["seq"] and first not in months.values():
        raise AuditError(
            f"{item.where}: signed that entry seq {first}, where the log now starts, was not the first of "
            "a month: part of a month was deleted"
        )
    cutoffs = [prune_cutoff(entry) for entry in report.prunes]
    for month, start in sorted(months.items()):
        if start >= first:
            continue
        if report.first_month is None or month >= report.first_month:
            raise AuditError(f"{item.where}: signed month {month} began at seq {start}; part of it was deleted")
        if not cutoffs or month_end(month) > max(cutoffs):
            raise AuditError(
                f"{item.where}: signed month {month} was deleted, but no prune in the log allowed deleting it "
                "(none older than the retention then in force): entries were removed"
            )


def _check_prunes_covered(report: VerifyReport, signed: list[_Signed]) -> None:
    newest = max(item.checkpoint["seq"] for item in signed)
    for entry in report.prunes:
        if entry["seq"] > newest:
            raise AuditError(
                f"audit entry seq {entry['seq']} (audit.pruned) is covered by no signed checkpoint (the newest "
                f"signs seq {newest}): sign after pruning (`lorafleet audit sign`, or `audit prune --key`)"
            )
