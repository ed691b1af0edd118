"""What the server writes to the fleet's audit log (EU AI Act Art. 12): every request and every
administrative event (start, stop, adapter load and unload, the key file in force).

A request's entry holds its time, tenant, key id (the first 16 hex digits of the key's SHA-256,
never the key), model, the served adapter's id (the SHA-256 over its weight files' hashes, the
same id the registry gives it), the SHA-256 of the input and of the output, token counts, status
and latency. Input and output are hashed as canonical JSON (sorted keys, no spaces, UTF-8): the
request's `messages` (or `prompt`), and the list of the choices' texts. The text itself is logged
only with `--log-content`, and then with personal data replaced by placeholders (`<EMAIL_1>`,
`<PHONE_1>`, ...: lorafleet's data redaction, data/redact.py) and the counts per type recorded;
the hashes are of what was sent, before redaction.

Appends take a file lock and write a file, so they run on one background thread, never on the
event loop; entries queued while one is written go in together (one lock, one write). If an
append fails the server keeps serving: the failure is printed to stderr and counted
(`lorafleet_audit_append_failures` in /metrics), because refusing every request over a full disk
would turn a logging fault into an outage, while a silent gap would be worse than either. Alert
on that metric. Entries are written in the order they were queued.

The same thread applies the fleet's retention (audit log and request log) at start and daily, and,
given a private key (`lorafleet serve --audit-key`), signs a checkpoint of the chain at start,
every `sign_every_s` while entries keep coming (default an hour), and after the stop entry at
shutdown, so a verifier with the public key finds at most that long unsigned. Signing verifies
the whole chain first (reading every line), which is what makes it worth an hour's wait; a log
that fails is never signed, and each failure is printed and counted like an append failure.

A replica of a gateway on the shared state (`lorafleet serve --state`) keeps a chain of its own
(`<fleet>/replicas/<id>/audit/`, its id in every entry: `replica`), rather than all replicas
appending to one chain in PostgreSQL under a lock: one lock would serialise every replica's
requests on one database row, make the audit log as available as the database, and leave the
signing, shipping and verifying of chains (governance/) to be built again for a table.
`lorafleet audit verify FLEET` verifies the fleet's chain and every replica's. A replica's
request entries are durable before the reply leaves (`record_durably`, which the request
awaits): a replica killed with -9 has logged every request it answered; entries queued together
are still written together.

Given a shipper (`lorafleet serve --audit-ship-to URL`: governance/shipping.py), each batch just
written is offered to it, which never waits: it ships on a thread of its own, from a bounded
queue, and counts what it could not ship (`lorafleet_audit_unshipped_total`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import queue
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lorafleet.data.pii import PiiDetector
from lorafleet.data.redact import Placeholders, redact_record, redact_text
from lorafleet.governance.audit import AuditLog
from lorafleet.governance.lineage import weight_hashes, weights_id
from lorafleet.governance.retention import apply_retention, retention_days
from lorafleet.governance.shipping import Shipper
from lorafleet.governance.signing import sign_checkpoint
from lorafleet.serve.gateway.request_log import apply_request_retention

RETENTION_CHECK_SECONDS = 24 * 3600
SIGN_EVERY_SECONDS = 3600
MAX_BATCH = 256  # entries written together when requests arrive faster than one append takes


def content_sha256(value: object) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # surrogatepass: a client may send a lone surrogate (\ud800); it is hashed, never an error.
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def utf8_only(data: dict) -> dict:
    """`data` with every lone surrogate a client sent (e.g. a model name "\\ud800") replaced by "?":
    the log is UTF-8, which cannot hold them, and the entry must still be written."""
    text = json.dumps(data, ensure_ascii=False)
    return json.loads(text.encode("utf-8", errors="replace").decode("utf-8"))


def redact_content(content: dict, detector: PiiDetector) -> dict:
    """A request's logged content with personal data replaced, placeholders consistent across the
    prompt and the reply, and `redacted` counting the replacements per type."""
    counts: Counter[str] = Counter()
    if "messages" in content:
        reply = [{"role": "assistant", "content": content["reply"]}] if content.get("reply") is not None else []
        record = {"messages": copy.deepcopy(content["messages"]) + reply}
        redact_record(record, detector, counts)
        redacted = {"messages": record["messages"][: len(content["messages"])]}
        redacted |= {"reply": record["messages"][-1]["content"]} if reply else {}
    else:
        placeholders, prompt = Placeholders(), content["prompt"]
        texts = [prompt] if isinstance(prompt, str) else prompt
        texts = [redact_text(t, detector, placeholders, counts) if isinstance(t, str) else t for t in texts]
        redacted = {"prompt": texts[0] if isinstance(prompt, str) else texts}
        if content.get("reply") is not None:
            redacted["reply"] = redact_text(content["reply"], detector, placeholders, counts)
    return redacted | {"redacted": dict(counts)}


def adapter_id(path: str | Path) -> str | None:
    """The registry id of the adapter in `path` (None when the directory is not on this machine)."""
    path = Path(path)
    return weights_id(weight_hashes(path)) if path.is_dir() else None


class AuditTrail:
    """Queues entries for the fleet's audit log and appends them on a background thread."""

    def __init__(
        self,
        fleet_dir: Path,
        redact: bool = False,
        signer: Ed25519PrivateKey | None = None,
        sign_every_s: float = SIGN_EVERY_SECONDS,
        shipper: Shipper | None = None,
        replica: str | None = None,
    ) -> None:
        self.fleet_dir = fleet_dir
        self.replica = replica  # named in every entry of a replica's own chain
        self.shipper = shipper
        self._detector = PiiDetector() if redact else None  # for content, logged with --log-content
        self.log = AuditLog(fleet_dir)
        self.failures = 0
        self.signer, self.sign_every_s = signer, sign_every_s
        self.signed = 0  # checkpoints signed since start
        self._unsigned = False  # entries written since the last checkpoint
        self._last_signed = 0.0
        self._queue: queue.Queue[tuple[str, dict, Future | None] | None] = queue.Queue()
        self._last_retention = 0.0
        self._writer = threading.Thread(target=self._write, name="lorafleet-audit", daemon=True)
        self._writer.start()

    def record(self, event: str, data: dict) -> None:
        self._queue.put((event, self._tagged(data), None))

    def record_durably(self, event: str, data: dict) -> Future:
        """Queue an entry; the future is done once it is written (or its write failed and was
        counted), so a caller can hold its reply until then."""
        written: Future = Future()
        self._queue.put((event, self._tagged(data), written))
        return written

    def _tagged(self, data: dict) -> dict:
        return data | {"replica": self.replica} if self.replica is not None else data

    def flush(self) -> None:
        """Wait until every queued entry is written (or has failed)."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join()
        if self.shipper is not None:
            self.shipper.close()

    def _write(self) -> None:
        closing = False
        while not closing:
            batch = self._next_batch()
            closing = None in batch
            items = [item for item in batch if item is not None]
            try:
                entries = [(event, utf8_only(self._redacted(data))) for event, data, _ in items]
                self._retain()
                if entries:
                    written = self.log.append_all(entries)
                    self._unsigned = True
                    if self.shipper is not None:
                        self.shipper.offer(written)
            except Exception as err:  # noqa: BLE001 - any failure must be counted, and serving go on
                self.failures += len(items)
                events = ", ".join(sorted({event for event, _, _ in items}))
                print(f"lorafleet: audit log append failed ({events}): {type(err).__name__}: {err}", file=sys.stderr)
            finally:
                for _, _, written in items:
                    if written is not None:
                        written.set_result(None)
                self._sign_if_due(closing)
                for _ in batch:
                    self._queue.task_done()

    def _next_batch(self) -> list[tuple[str, dict, Future | None] | None]:
        """The queued entries (waiting for one), or none when a checkpoint falls due first."""
        wait = None
        if self.signer is not None and self._unsigned:
            wait = max(0.0, self._last_signed + self.sign_every_s - time.monotonic())
        try:
            batch = [self._queue.get(timeout=wait)]
        except queue.Empty:
            return []
        while len(batch) < MAX_BATCH and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    def _sign_if_due(self, closing: bool) -> None:
        """Sign what was written: first thing, then every `sign_every_s`, and when closing."""
        never_tried = self._last_signed == 0.0
        due = never_tried or closing or time.monotonic() - self._last_signed >= self.sign_every_s
        if self.signer is None or not self._unsigned or not due:
            return
        self._last_signed = time.monotonic()
        try:
            sign_checkpoint(self.fleet_dir, self.signer)
            self.signed += 1
            self._unsigned = False
        except Exception as err:  # noqa: BLE001 - a log that fails verification is reported, never signed
            self.failures += 1
            print(f"lorafleet: audit checkpoint NOT signed: {type(err).__name__}: {err}", file=sys.stderr)

    def _redacted(self, data: dict) -> dict:
        if self._detector is None or "content" not in data:
            return data
        try:
            return data | {"content": redact_content(data["content"], self._detector)}
        except Exception as err:  # noqa: BLE001 - never log unredacted text, never lose the entry
            withheld = f"content withheld: redaction failed ({type(err).__name__}: {err})"
            return {key: value for key, value in data.items() if key != "content"} | {"content_withheld": withheld}

    def _retain(self) -> None:
        """Apply the fleet's retention period, to the audit log and the request log, at start and
        once a day after."""
        if time.monotonic() - self._last_retention >= RETENTION_CHECK_SECONDS or not self._last_retention:
            self._last_retention = time.monotonic()
            apply_retention(self.fleet_dir, via="lorafleet serve")
            keep_days = retention_days(self.fleet_dir)
            if keep_days is not None:
                apply_request_retention(self.fleet_dir, keep_days, via="lorafleet serve")
