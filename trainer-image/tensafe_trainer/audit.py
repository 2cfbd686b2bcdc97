"""Append-only, hash-chained audit log (JSON lines), safe for several writer processes.

``record_hash = SHA-256(prev_hash || canonical JSON of the entry without record_hash)``; the first
entry's ``prev_hash`` is 64 zeros. Each entry also carries its sequence number, so a verifier finds
any edited, dropped, inserted or reordered entry. Request payloads are never logged; ``request_hash``
is an HMAC-SHA256 under the tenant's audit key (keys.py), so the log cannot confirm a guessed record.
Nothing computed from a private batch is logged: DP steps carry only their public dp_metrics.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

from tg_tinker.types import AuditEntry

from .crypto import canonical_json

GENESIS = "0" * 64


def request_hash(key: bytes, payload: Any) -> str:
    """HMAC-SHA256 of a request under the tenant's audit key: of its canonical JSON, or of the bytes given
    (already canonical)."""
    data = payload if isinstance(payload, (bytes, bytearray)) else canonical_json(payload)
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def _entry_hash(fields: dict) -> str:
    body = {k: v for k, v in fields.items() if k != "record_hash"}
    return hashlib.sha256(fields["prev_hash"].encode() + canonical_json(body)).hexdigest()


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


def _fields(prev: Optional[dict], *, operation: str, training_client_id: Optional[str], tenant_id: Optional[str],
            request_hash: str, success: bool, produced: list[str] = (), consumed: list[str] = (),
            dp_metrics: Optional[dict] = None, error: Optional[str] = None) -> dict:
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
    fields["record_hash"] = _entry_hash(fields)
    return fields


class AuditLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch(exist_ok=True)

    def append(self, **event: Any) -> AuditEntry:
        return self.append_many([event])[0]

    def append_many(self, events: list[dict[str, Any]]) -> list[AuditEntry]:
        """Chain and write ``events`` (keyword sets of :func:`_fields`) under one lock and one fsync."""
        written = []
        with open(self.path, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # the chain head is read and extended under one lock
            try:
                last = _last_line(f)
                prev = json.loads(last) if last else None
                lines = []
                for event in events:
                    fields = _fields(prev, **event)
                    lines.append(json.dumps(fields, sort_keys=True).encode() + b"\n")
                    written.append(AuditEntry(**fields))
                    prev = fields
                f.seek(0, os.SEEK_END)
                f.write(b"".join(lines))
                f.flush()
                os.fsync(f.fileno())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return written

    def entries(self) -> Iterator[AuditEntry]:
        with open(self.path, "rb") as f:
            for line in f:
                if line.strip():
                    yield AuditEntry.model_validate_json(line)

    def query(self, training_client_id: Optional[str] = None, operation: Optional[str] = None,
              tenant_id: Optional[str] = None, limit: int = 100) -> list[AuditEntry]:
        hits = [e for e in self.entries()
                if (training_client_id is None or e.training_client_id == training_client_id)
                and (operation is None or e.operation == operation)
                and (tenant_id is None or e.tenant_id == tenant_id)]
        return hits[-limit:] if limit else hits


def verify(path: Path) -> tuple[bool, int, str]:
    """Check the whole chain. Returns (ok, entries checked, message naming the first broken link)."""
    expected_prev, count = GENESIS, 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except ValueError:
                return False, count, f"line {lineno}: not valid JSON"
            if fields.get("sequence") != count:
                return False, count, (f"line {lineno}: sequence {fields.get('sequence')} where {count} was "
                                      "expected (an entry was dropped, inserted or reordered)")
            if fields.get("prev_hash") != expected_prev:
                return False, count, f"line {lineno}: prev_hash does not match the previous entry's record_hash"
            if _entry_hash(fields) != fields.get("record_hash"):
                return False, count, f"line {lineno}: record_hash does not match the entry (it was edited)"
            expected_prev, count = fields["record_hash"], count + 1
    return True, count, f"ok: {count} entries, chain intact"
