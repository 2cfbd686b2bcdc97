"""Append-only, keyed audit chain (JSON lines), one per tenant, safe for several writer processes.

``record_hash = HMAC-SHA256(chain key, prev_hash || canonical JSON of the entry without record_hash)``;
the first entry's ``prev_hash`` is 64 zeros. The chain key is the tenant's (keys.py: derived from its
audit key, kept in its key set, on Kubernetes in its Secret), never in the log's folder, so someone who
can write the log but not read the key set cannot edit, drop or reorder entries and recompute the chain:
verification needs the key and finds the first broken link. Each entry carries its sequence number.

Truncating the tail leaves a valid shorter chain; the *head* (sequence and record_hash of the last
entry) is therefore published outside the log: in every save result and receipt, in ``ClientInfo`` and
on Kubernetes in the TrainingClient status. ``verify(..., expect_head=...)`` catches a log that ends
before a published head or differs from it.

Writes fail closed: before extending the chain the writer checks that the last record verifies and does
not precede a head this process already wrote; otherwise it refuses (AuditIntegrityError), and the
operation being audited fails.

Request payloads are never logged; ``request_hash`` is an HMAC-SHA256 under the tenant's audit key, so
the log cannot confirm a guessed record. Nothing computed from a private batch is logged: DP steps carry
only their public dp_metrics.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

from tg_tinker.errors import AuditIntegrityError
from tg_tinker.types import AuditEntry, AuditHead

from .artifacts import FILE_MODE, private_dir
from .crypto import canonical_json
from tg_tinker.keys import KeyProvider, check_tenant

GENESIS = "0" * 64


def request_hash(key: bytes, payload: Any) -> str:
    """HMAC-SHA256 of a request under the tenant's audit key: of its canonical JSON, or of the bytes given
    (already canonical)."""
    data = payload if isinstance(payload, (bytes, bytearray)) else canonical_json(payload)
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def record_mac(key: bytes, fields: dict) -> str:
    body = {k: v for k, v in fields.items() if k != "record_hash"}
    return hmac.new(key, fields["prev_hash"].encode() + canonical_json(body), hashlib.sha256).hexdigest()


def _no_duplicates(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("a key appears twice in one record")  # a MAC over the parsed JSON would hide the other
    return dict(pairs)


def parse_record(line: bytes) -> dict:
    return json.loads(line, object_pairs_hook=_no_duplicates)


def _last_line(f) -> Optional[bytes]:
    f.seek(0, os.SEEK_END)
    end = f.tell()
    if end == 0:
        return None
    block = min(end, 4096)
    while True:
        f.seek(end - block)
        data = f.read(block).rstrip(b"\n")
        start = data.rfind(b"\n")
        if start >= 0 or block == end:
            return data[start + 1:]
        block = min(end, block * 2)


def _fields(key: bytes, prev: Optional[dict], *, operation: str, training_client_id: Optional[str],
            tenant_id: str, request_hash: str, success: bool, produced: list[str] = (),
            consumed: list[str] = (), dp_metrics: Optional[dict] = None, error: Optional[str] = None) -> dict:
    fields = {
        "entry_id": f"aud-{uuid.uuid4().hex}",
        "sequence": prev["sequence"] + 1 if prev else 0,
        "timestamp": time.time(),
        "operation": operation,
        "training_client_id": training_client_id,
        "tenant_id": tenant_id,
        "request_hash": request_hash,
        "success": success,
        "artifact_ids_produced": list(produced),
        "artifact_ids_consumed": list(consumed),
        "dp_metrics": dp_metrics,
        "error": error,
        "prev_hash": prev["record_hash"] if prev else GENESIS,
    }
    fields["record_hash"] = record_mac(key, fields)
    return fields


def _head_of(tenant_id: str, fields: Optional[dict]) -> AuditHead:
    if fields is None:
        return AuditHead(tenant_id=tenant_id, sequence=-1, record_hash=GENESIS)
    return AuditHead(tenant_id=tenant_id, sequence=fields["sequence"], record_hash=fields["record_hash"])


class AuditLog:
    """One tenant's chain in one file."""

    def __init__(self, path: Path, key: bytes, tenant_id: str):
        self.path, self.tenant_id = Path(path), tenant_id
        self._key = key
        self._written: Optional[dict] = None  # the last record this process wrote: the tail may not precede it
        self._checked = False  # the whole chain is verified once per process, before the first append
        private_dir(self.path.parent)
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE))

    def _tail(self, f) -> Optional[dict]:
        """The last record, checked: it must verify and must not precede what this process wrote."""
        if not self._checked:
            ok, _, message = verify(self.path, self._key)
            if not ok:
                raise AuditIntegrityError(f"{self.path} does not verify ({message}): refusing to extend the chain",
                                          {"tenant_id": self.tenant_id})
            self._checked = True
        last = _last_line(f)
        try:
            prev = parse_record(last) if last else None
            ok = prev is None or hmac.compare_digest(record_mac(self._key, prev), str(prev.get("record_hash")))
        except (ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise AuditIntegrityError(f"the last record of {self.path} does not verify under tenant "
                                      f"{self.tenant_id!r}'s key (edited or torn): refusing to extend the chain; "
                                      "run `tensafe audit verify`", {"tenant_id": self.tenant_id})
        mine = self._written
        if mine is not None and (prev is None or prev["sequence"] < mine["sequence"] or (
                prev["sequence"] == mine["sequence"] and prev["record_hash"] != mine["record_hash"])):
            raise AuditIntegrityError(f"{self.path} ends before sequence {mine['sequence']}, which this trainer "
                                      "wrote: the log was truncated or replaced; refusing to extend it",
                                      {"tenant_id": self.tenant_id, "expected_sequence": mine["sequence"]})
        return prev

    def append_many(self, events: list[dict[str, Any]]) -> list[AuditEntry]:
        """Chain and write ``events`` (keyword sets of :func:`_fields`) under one lock and one fsync."""
        written = []
        with open(self.path, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # the chain head is read and extended under one lock
            try:
                prev = self._tail(f)
                lines = []
                for event in events:
                    fields = _fields(self._key, prev, **event)
                    lines.append(json.dumps(fields, sort_keys=True).encode() + b"\n")
                    written.append(AuditEntry(**fields))
                    prev = fields
                f.seek(0, os.SEEK_END)
                f.write(b"".join(lines))
                f.flush()
                os.fsync(f.fileno())
                self._written = prev
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return written

    def head(self) -> AuditHead:
        with open(self.path, "rb") as f:
            last = _last_line(f)
        return _head_of(self.tenant_id, json.loads(last) if last else None)

    def entries(self) -> Iterator[AuditEntry]:
        with open(self.path, "rb") as f:
            for line in f:
                if line.strip():
                    yield AuditEntry.model_validate_json(line)


class AuditTrail:
    """Every tenant's chain: ``<folder>/<tenant>.jsonl``, each keyed with that tenant's chain key."""

    def __init__(self, folder: Path, keys: KeyProvider):
        self.folder, self.keys = private_dir(Path(folder)), keys
        self._logs: dict[str, AuditLog] = {}
        self._lock = threading.Lock()

    def path(self, tenant_id: str) -> Path:
        return self.folder / f"{check_tenant(tenant_id)}.jsonl"

    def log(self, tenant_id: str) -> AuditLog:
        with self._lock:
            if tenant_id not in self._logs:
                self._logs[tenant_id] = AuditLog(self.path(tenant_id), self.keys.chain_key(tenant_id), tenant_id)
            return self._logs[tenant_id]

    def forget(self, tenant_id: str) -> None:
        """After the tenant was shredded: its chain and key are gone."""
        with self._lock:
            self._logs.pop(tenant_id, None)

    def head(self, tenant_id: str) -> AuditHead:
        if not self.path(tenant_id).exists():
            return _head_of(tenant_id, None)
        return self.log(tenant_id).head()

    def query(self, tenant_id: str, training_client_id: Optional[str] = None, operation: Optional[str] = None,
              limit: int = 100) -> list[AuditEntry]:
        if not self.path(tenant_id).exists():
            return []
        hits = [e for e in self.log(tenant_id).entries()
                if (training_client_id is None or e.training_client_id == training_client_id)
                and (operation is None or e.operation == operation)]
        return hits[-limit:] if limit else hits


def parse_head(text: str) -> tuple[int, str]:
    """``SEQUENCE:RECORD_HASH`` as published (``AuditHead.text``)."""
    sequence, _, record = text.partition(":")
    if not sequence.lstrip("-").isdigit() or len(record) != 64:
        raise ValueError(f"an audit head looks like <sequence>:<64 hex digits>, not {text!r}")
    return int(sequence), record


def verify(path: Path, key: bytes, expect_head: Optional[tuple[int, str]] = None) -> tuple[bool, int, str]:
    """Check the whole chain under ``key``. Returns (ok, entries checked, message naming the first broken link).
    ``expect_head`` (sequence, record_hash), a head published earlier, must be in the log: a log that ends
    before it was truncated."""
    expected_prev, count, seen_head = GENESIS, 0, expect_head is None or expect_head[0] < 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                fields = parse_record(line)
                mac = record_mac(key, fields)
            except (ValueError, KeyError, TypeError, AttributeError):
                return False, count, f"line {lineno}: not a valid audit record"
            if fields.get("sequence") != count:
                return False, count, (f"line {lineno}: sequence {fields.get('sequence')} where {count} was "
                                      "expected (an entry was dropped, inserted or reordered)")
            if fields.get("prev_hash") != expected_prev:
                return False, count, f"line {lineno}: prev_hash does not match the previous entry's record_hash"
            if not hmac.compare_digest(mac, str(fields.get("record_hash"))):
                return False, count, (f"line {lineno}: record_hash does not verify under the tenant's key (the entry "
                                      "was edited, or the chain rewritten without the key)")
            if expect_head is not None and count == expect_head[0]:
                if fields["record_hash"] != expect_head[1]:
                    return False, count, (f"line {lineno}: the entry at sequence {count} is not the published head "
                                          "(the log was rewritten from there)")
                seen_head = True
            expected_prev, count = fields["record_hash"], count + 1
    if not seen_head:
        return False, count, (f"the log ends at sequence {count - 1}, before the published head {expect_head[0]}: "
                              "it was truncated")
    return True, count, f"ok: {count} entries, chain intact" + (
        f", published head {expect_head[0]} present" if expect_head and expect_head[0] >= 0 else "")
