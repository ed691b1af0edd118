"""Signed checkpoints of the audit chain (Ed25519), checked with the public key alone.

A hash chain shows that no line was changed relative to the lines around it, but whoever can
write the log can rebuild it from some entry on. A checkpoint signs (seq, hash) of the newest
entry with a private key that writer does not hold; a verifier with the public key then knows the
chain up to that entry is the one that was signed, and that the log was not cut off before it.
Checkpoints are appended to `audit/checkpoints.jsonl` (sign periodically, e.g. from cron, and copy
the file somewhere the fleet's host cannot write for the strongest guarantee).
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
from lorafleet.governance.audit import AuditLog, VerifyReport, audit_dir, utc_now, verify_chain

CHECKPOINTS = "checkpoints.jsonl"


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


def _message(seq: int, digest: str, time: str) -> bytes:
    return json.dumps({"hash": digest, "seq": seq, "time": time}, sort_keys=True, separators=(",", ":")).encode()


def sign_checkpoint(fleet_dir: str | Path, key: Ed25519PrivateKey) -> dict:
    """Verify the chain, sign its newest entry and append the checkpoint; the signing itself is
    recorded in the chain as an `audit.checkpoint` entry (signed by the next checkpoint)."""
    report = verify_chain(fleet_dir)
    time = utc_now()
    signature = key.sign(_message(report.last_seq, report.last_hash, time))
    checkpoint = {"seq": report.last_seq, "hash": report.last_hash, "time": time, "signature": signature.hex()}
    with (audit_dir(fleet_dir) / CHECKPOINTS).open("a") as handle:
        handle.write(json.dumps(checkpoint, sort_keys=True) + "\n")
    AuditLog(fleet_dir).append("audit.checkpoint", {"seq": report.last_seq, "hash": report.last_hash})
    return checkpoint


@dataclass
class CheckpointReport:
    checked: int  # signatures that held, over entries still in the log
    before_retention: int  # checkpoints of entries retention has since deleted


def verify_checkpoints(fleet_dir: str | Path, key: Ed25519PublicKey, report: VerifyReport) -> CheckpointReport:
    """Every signed checkpoint must carry a valid signature by `key` and name an entry the chain
    still holds, with the same hash. A checkpoint past the chain's end means it was truncated."""
    path = audit_dir(fleet_dir) / CHECKPOINTS
    if not path.exists():
        raise AuditError(f"{path} does not exist: the log has no signed checkpoints (`lorafleet audit sign`)")
    checked = before = 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        where = f"{path}:{number}"
        try:
            checkpoint = json.loads(line)
            message = _message(checkpoint["seq"], checkpoint["hash"], checkpoint["time"])
            key.verify(bytes.fromhex(checkpoint["signature"]), message)
        except InvalidSignature as err:
            raise AuditError(
                f"{where}: the signature does not verify with this public key (wrong key, or edited)"
            ) from err
        except (json.JSONDecodeError, KeyError, ValueError, TypeError) as err:
            raise AuditError(f"{where}: not a signed checkpoint ({err})") from err
        seq = checkpoint["seq"]
        if seq > report.last_seq:
            raise AuditError(
                f"{where}: signed entry seq {seq} is past the log's end (seq {report.last_seq}): the log was truncated"
            )
        if seq < report.first_seq:
            before += 1
            continue
        if report.hashes[seq] != checkpoint["hash"]:
            raise AuditError(f"{where}: entry seq {seq} differs from the one that was signed (the chain was rebuilt)")
        checked += 1
    return CheckpointReport(checked, before)
