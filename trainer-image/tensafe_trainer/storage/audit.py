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
not precede a head this process already wrote or read; otherwise it refuses (AuditIntegrityError), and the
operation being audited fails. Reads verify too (``AuditLog.read``: ``GET /v1/audit``, ``/v1/audit/head``,
``resume_from="latest"``): the whole chain under the key set, and its tail against the furthest head this
process wrote or served; a log that does not verify, or ends before that head, is an AuditIntegrityError,
never served. A trainer that restarted knows no head: a published one (``--expect-head``) is the check then.

Key rotation (keys.py, ``tensafe artifact rotate``) gives the chain a new segment. Each record carries the
``key_id`` of the secrets generation whose chain key MACs it (records without one: the first generation, in
logs written before generations). ``AuditLog.rotate_keys`` writes, under the chain's lock, a ``rotate_keys``
record under the retiring key naming the next (``next_key_id``), then retires that key in the key set at the
record's sequence, with the record's hash. The rule ``verify`` enforces: every sequence number belongs to
exactly one generation (up to and including its retirement sequence, else the active one); a record under
another key than its sequence's (a retired key after its retirement, a key the key set does not know) is
refused; the record at a retirement sequence must be that very ``rotate_keys`` record (so whoever keeps a
retired key cannot rewrite its segment either); a log that ends before a retirement the key set records was
truncated. A rotation interrupted after its record was written is completed by running it again.

Request payloads are never logged; ``request_hash`` is an HMAC-SHA256 under the tenant's audit key, so
the log cannot confirm a guessed record. Client ids (user-chosen) are sealed on disk (AES-SIV under the
tenant's names key, ``crypto.seal_id``), so the file alone does not say which client did what; reads open them. Nothing computed from a private batch is logged: DP steps carry
only their public dp_metrics.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import hmac
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from tg_tinker.errors import AuditIntegrityError, ValidationError
from tg_tinker.operations import AUDITED
from tg_tinker.types import AuditEntry, AuditHead

from tensafe_keys.private_files import FILE_MODE, private_dir
from tensafe_trainer.storage.crypto import canonical_json, open_id, seal_id
from tensafe_keys.store import KeyProvider, new_secrets_id, secret_generations
from tg_tinker.types import check_tenant

GENESIS = "0" * 64
ROTATE = "rotate_keys"  # (tg_tinker.operations.SERVICE_EVENTS) the last record of a secrets generation's segment


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


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates)


def parse_record(line: bytes) -> dict:
    return _DECODER.decode(line.decode() if isinstance(line, (bytes, bytearray)) else line)


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


def next_record(generation: dict, prev: Optional[dict], *, operation: str, training_client_id: Optional[str],
                tenant_id: str, request_hash: str, success: bool, produced: list[str] = (),
                consumed: list[str] = (), dp_metrics: Optional[dict] = None, error: Optional[str] = None,
                next_key_id: Optional[str] = None) -> dict:
    """The record that follows ``prev`` in a chain, MACed under ``generation``'s chain key."""
    if operation not in AUDITED:  # a bug: every audited name is declared (tg_tinker.operations)
        raise ValueError(f"{operation!r} is not an audited operation or event (tg_tinker.operations.AUDITED)")
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
        "key_id": generation["id"],
    }
    if next_key_id is not None:
        fields["next_key_id"] = next_key_id
    fields["record_hash"] = record_mac(generation["chain_key"], fields)
    return fields


class Generations:
    """Which chain key MACs which sequence number, from a tenant's key set (``keys.secret_generations``), or one
    bare chain key (no generations: every record checked under it, whatever key it names)."""

    def __init__(self, keys: Union[dict, bytes, "Generations"]):
        if isinstance(keys, Generations):
            self.all = keys.all
        elif isinstance(keys, (bytes, bytearray)):
            self.all = [{"id": None, "chain_key": bytes(keys), "retired_at": None, "head": None, "successor": None}]
        else:
            self.all = secret_generations(keys)
        self.active, self.retired = self.all[-1], self.all[:-1]
        self._by_id = {g["id"]: g for g in self.all}

    def at(self, sequence: int) -> dict:
        for generation in self.retired:
            if sequence <= generation["retired_at"]:
                return generation
        return self.active

    def problem(self, fields: dict) -> Optional[str]:
        """Why ``fields`` (a parsed record) is not this chain's record at its sequence; None if it is."""
        sequence = fields["sequence"]
        own = self.at(sequence)
        named = fields.get("key_id")
        if own["id"] is not None and named != own["id"] and not (named is None and own is self.all[0]):
            other = self._by_id.get(named)
            if named is None:
                return (f"record {sequence} names no key, but the tenant's key set gives sequence {sequence} to key "
                        f"{own['id']}")
            if other is None:
                return f"record {sequence} is under key {named!r}, which the tenant's key set does not know"
            if other["retired_at"] is not None and sequence > other["retired_at"]:
                return (f"record {sequence} is under key {named}, retired at sequence {other['retired_at']}: made "
                        "with a retired key after its retirement")
            return f"record {sequence} is under key {named}, but the tenant's key set gives it to key {own['id']}"
        if not hmac.compare_digest(record_mac(own["chain_key"], fields), str(fields.get("record_hash"))):
            hint = "" if own["id"] is not None or named is None else (
                f"; it names key {named}: verify with the tenant's whole key set")
            return ("record_hash does not verify under the tenant's key (the entry was edited, or the chain "
                    f"rewritten without the key){hint}")
        if own["retired_at"] == sequence and (fields.get("operation") != ROTATE or fields.get("record_hash") != own["head"]
                                              or fields.get("next_key_id") != own["successor"]):
            return (f"record {sequence} is not the key rotation the key set records there (key {own['id']} retired in "
                    f"favour of {own['successor']}): the segment was rewritten")
        return None


@dataclass(frozen=True)
class _Verified:
    """A prefix of the log already verified under a key set: its bytes' digest, so a later read that finds the same
    bytes checks only what follows them (an edit anywhere in the prefix changes the digest: all is checked again)."""

    keyset: bytes  # SHA-256 of the key set it was verified under
    offset: int
    digest: bytes
    count: int
    lines: int
    last_hash: str


class _Broken(Exception):
    def __init__(self, count: int, message: str):
        super().__init__(message)
        self.count, self.message = count, message


def _walk(f, generations: Generations, expect_head: Optional[tuple[int, str]] = None,
          after: Optional["_Verified"] = None) -> Iterator[dict]:
    """Each record of the chain in ``f`` (an iterable of lines), checked; raises _Broken at the first broken link,
    or at the end if the log ends before ``expect_head`` or before a retirement the key set records. ``after``: a
    prefix already verified (``f`` holds the lines that follow it)."""
    expected_prev, count, lines = (after.last_hash, after.count, after.lines) if after else (GENESIS, 0, 0)
    seen_head = expect_head is None or expect_head[0] < 0
    if not seen_head and expect_head[0] < count:  # inside the verified prefix: its last record, by AuditLog.read
        if expect_head[0] == count - 1 and expect_head[1] != expected_prev:
            raise _Broken(count, f"the entry at sequence {count - 1} is not the published head")
        seen_head = True
    for lineno, line in enumerate(f, start=lines + 1):
        if not line.strip():
            continue
        try:
            fields = parse_record(line)
            if not isinstance(fields, dict):
                raise ValueError("not an object")
            sequence_ok = fields.get("sequence") == count and not isinstance(fields.get("sequence"), bool)
            problem = (generations.problem(fields) if sequence_ok and fields.get("prev_hash") == expected_prev
                       else None)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise _Broken(count, f"line {lineno}: not a valid audit record") from None
        if not sequence_ok:
            raise _Broken(count, f"line {lineno}: sequence {fields.get('sequence')} where {count} was expected (an "
                                 "entry was dropped, inserted or reordered)")
        if fields.get("prev_hash") != expected_prev:
            raise _Broken(count, f"line {lineno}: prev_hash does not match the previous entry's record_hash")
        if problem is not None:
            raise _Broken(count, f"line {lineno}: {problem}")
        if expect_head is not None and count == expect_head[0]:
            if fields["record_hash"] != expect_head[1]:
                raise _Broken(count, f"line {lineno}: the entry at sequence {count} is not the published head (the "
                                     "log was rewritten from there)")
            seen_head = True
        yield fields
        expected_prev, count = fields["record_hash"], count + 1
    if not seen_head:
        raise _Broken(count, f"the log ends at sequence {count - 1}, before the published head {expect_head[0]}: it "
                             "was truncated")
    for generation in generations.retired:
        if count - 1 < generation["retired_at"]:
            raise _Broken(count, f"the log ends at sequence {count - 1}, before the key rotation at sequence "
                                 f"{generation['retired_at']} that the tenant's key set records: it was truncated")


def _opened(names_key: bytes, tenant_id: str, fields: dict) -> dict:
    """A record as the trainer reads it: its client id unsealed (on disk it is sealed: crypto.seal_id)."""
    return {**fields, "training_client_id": open_id(names_key, tenant_id, fields.get("training_client_id"))}


def _head_of(tenant_id: str, fields: Optional[dict]) -> AuditHead:
    if fields is None:
        return AuditHead(tenant_id=tenant_id, sequence=-1, record_hash=GENESIS)
    return AuditHead(tenant_id=tenant_id, sequence=fields["sequence"], record_hash=fields["record_hash"])


class AuditLog:
    """One tenant's chain in one file, keyed by the tenant's key set (read again for every write and read, so a
    rotation by another process is followed at once)."""

    def __init__(self, path: Path, keys: KeyProvider, tenant_id: str):
        self.path, self.tenant_id = Path(path), tenant_id
        self._keys = keys
        # The furthest record this process wrote or read verified: the log may not end before it.
        self._known: Optional[dict] = None
        self._known_lock = threading.Lock()
        self._checked = False  # the whole chain is verified once per process, before the first append
        self._verified: Optional[_Verified] = None  # the prefix the last read verified
        private_dir(self.path.parent)
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE))

    @functools.cached_property
    def _names(self) -> bytes:
        """The tenant's names key (client ids are sealed on disk): never replaced, so read once, not per append."""
        return self._keys.names_key(self.tenant_id)

    def generations(self) -> Generations:
        return Generations(self._keys.complete(self.tenant_id))

    def _refuse(self, message: str, **details) -> AuditIntegrityError:
        return AuditIntegrityError(message, {"tenant_id": self.tenant_id, **details})

    def _not_behind(self, last: Optional[dict]) -> None:
        """Refuse a log whose last record precedes, or differs from, the furthest one this process knows."""
        known = self._known
        if known is not None and (last is None or last["sequence"] < known["sequence"] or (
                last["sequence"] == known["sequence"] and last["record_hash"] != known["record_hash"])):
            raise self._refuse(f"{self.path} ends before sequence {known['sequence']}, which this trainer wrote or "
                               "served: the log was truncated or replaced", expected_sequence=known["sequence"])

    def _advance(self, last: Optional[dict]) -> None:
        with self._known_lock:
            if last is not None and (self._known is None or last["sequence"] > self._known["sequence"]):
                self._known = {"sequence": last["sequence"], "record_hash": last["record_hash"]}

    def _tail(self, f, generations: Generations) -> Optional[dict]:
        """The last record, checked: it must verify and must not precede what this process wrote or read."""
        if not self._checked:
            ok, _, message = verify(self.path, generations)
            if not ok:
                raise self._refuse(f"{self.path} does not verify ({message}): refusing to extend the chain")
            self._checked = True
        last = _last_line(f)
        try:
            prev = parse_record(last) if last else None
            problem = None if prev is None else generations.problem(prev)
        except (ValueError, KeyError, TypeError, AttributeError):
            problem = "not a valid audit record"
        if problem is not None:
            raise self._refuse(f"the last record of {self.path} does not verify under tenant {self.tenant_id!r}'s "
                               f"keys ({problem}; edited or torn): refusing to extend the chain; run `tensafe audit "
                               "verify`")
        self._not_behind(prev)
        return prev

    def _extendable(self, prev: Optional[dict], generations: Generations) -> None:
        """The next record goes under the active key; refuse a log that ends inside a retired segment."""
        following = prev["sequence"] + 1 if prev else 0
        owner = generations.at(following)
        if owner is not generations.active:
            raise self._refuse(f"{self.path} ends at sequence {following - 1}, before the key rotation at sequence "
                               f"{owner['retired_at']} that the tenant's key set records: the log was truncated; "
                               "refusing to extend it")
        if prev is not None and prev.get("operation") == ROTATE and generations.at(prev["sequence"]) is owner:
            raise self._refuse(f"{self.path} ends with a key rotation to {prev.get('next_key_id')!r} that the tenant's "
                               "key set does not hold (interrupted): run `tensafe artifact rotate` again to complete "
                               "it")

    def _append(self, f, lines: list[bytes]) -> None:
        f.seek(0, os.SEEK_END)
        f.write(b"".join(lines))
        f.flush()
        os.fsync(f.fileno())

    def append_many(self, events: list[dict[str, Any]]) -> list[AuditEntry]:
        """Chain and write ``events`` (keyword sets of :func:`next_record`) under one lock and one fsync."""
        written = []
        with open(self.path, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # the chain head is read and extended under one lock
            try:
                generations = self.generations()
                prev = self._tail(f, generations)
                self._extendable(prev, generations)
                lines = []
                names = self._names
                for event in events:
                    client = event.get("training_client_id")
                    fields = next_record(generations.active, prev, **{
                        **event, "training_client_id": seal_id(names, self.tenant_id, client)})
                    lines.append(json.dumps(fields, sort_keys=True).encode() + b"\n")
                    written.append(AuditEntry(**{**fields, "training_client_id": client}))
                    prev = fields
                self._append(f, lines)
                self._advance(prev)
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return written

    def rotate_keys(self) -> tuple[str, AuditEntry]:
        """Close the active secrets generation's segment and retire it (keys.py): a ``rotate_keys`` record under
        it, naming its successor, is written and synced first; then the key set gets the new generation, retired
        at that record. All under the chain's lock, so no record slips in between. Returns (new generation id,
        the rotation's record). Run again after an interruption between the two steps, it completes that one."""
        with open(self.path, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                keyset = self._keys.complete(self.tenant_id)
                generations = Generations(keyset)
                prev = self._tail(f, generations)
                active = generations.active
                if prev is not None and prev.get("operation") == ROTATE and generations.at(prev["sequence"]) is active:
                    record, successor = prev, prev["next_key_id"]  # written, but the key set never got it
                else:
                    self._extendable(prev, generations)
                    self._keys.check_writable(self.tenant_id)  # a read-only key set fails here, the log untouched
                    successor = new_secrets_id(keyset)
                    record = next_record(active, prev, operation=ROTATE, training_client_id=None,
                                     tenant_id=self.tenant_id, success=True, next_key_id=successor,
                                     request_hash=request_hash(self._keys.audit_key(self.tenant_id),
                                                               successor.encode()))
                    self._append(f, [json.dumps(record, sort_keys=True).encode() + b"\n"])
                self._keys.rotate_secrets(self.tenant_id, retiring=active["id"], successor=successor,
                                          retired_at=record["sequence"], head=record["record_hash"])
                self._advance(record)
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return successor, AuditEntry(**record)

    def read(self, records: bool = True) -> list[dict]:
        """Every record (or, with ``records=False``, the last one only), once the whole chain verifies under the
        tenant's key set and does not end before the furthest record this process wrote or served (else
        AuditIntegrityError: nothing is served). A prefix this process verified before and whose bytes are
        unchanged (same SHA-256) is not checked again."""
        keyset = self._keys.complete(self.tenant_id)
        generations, fingerprint = Generations(keyset), hashlib.sha256(canonical_json(keyset)).digest()
        known = self._known
        expect = (known["sequence"], known["record_hash"]) if known is not None else None
        found: list[dict] = []
        last: Optional[dict] = None
        with open(self.path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH)  # never a half-written append
            try:
                digest, prefix, lines = hashlib.sha256(), self._verified, [0]
                if prefix is not None and prefix.keyset == fingerprint:
                    data = f.read(prefix.offset)
                    if len(data) == prefix.offset and hashlib.sha256(data).digest() == prefix.digest:
                        digest.update(data)
                        lines[0] = prefix.lines
                        if records:  # verified bytes: parsed, not checked again
                            found = [json.loads(line) for line in data.splitlines() if line.strip()]
                        last = found[-1] if found else {"sequence": prefix.count - 1, "record_hash": prefix.last_hash}
                    else:
                        f.seek(0)
                        prefix = None
                else:
                    prefix = None

                def hashed(rest):
                    for line in rest:
                        digest.update(line)
                        lines[0] += 1
                        yield line

                for fields in _walk(hashed(f), generations, expect, prefix):
                    if records:
                        found.append(fields)
                    last = fields
                offset = f.tell()
            except _Broken as broken:
                raise self._refuse(f"the audit log of tenant {self.tenant_id!r} does not verify ({broken.message}): "
                                   "it was edited, truncated or replaced; nothing is served from it "
                                   "(`tensafe audit verify` finds the first broken link)") from None
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        if last is not None and last["sequence"] >= 0:
            self._verified = _Verified(fingerprint, offset, digest.digest(), last["sequence"] + 1, lines[0],
                                       last["record_hash"])
        self._advance(last if last is not None and last["sequence"] >= 0 else None)
        if not records:
            return [last] if last is not None and last["sequence"] >= 0 else []
        names = self._names
        return [_opened(names, self.tenant_id, fields) for fields in found]

    def head(self) -> AuditHead:
        tail = self.read(records=False)
        return _head_of(self.tenant_id, tail[-1] if tail else None)

    def entries(self) -> list[AuditEntry]:
        return [AuditEntry(**fields) for fields in self.read()]


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
                self._logs[tenant_id] = AuditLog(self.path(tenant_id), self.keys, tenant_id)
            return self._logs[tenant_id]

    def forget(self, tenant_id: str) -> None:
        """After the tenant was shredded: its chain and key are gone."""
        with self._lock:
            self._logs.pop(tenant_id, None)

    def records(self, tenant_id: str, every: bool = True) -> Optional[list[dict]]:
        """Every record of the tenant's chain (``every=False``: the last), verified (``AuditLog.read``); None where it
        has no log and this process never knew one (a log it wrote or read that is gone is an AuditIntegrityError)."""
        if not self.path(tenant_id).exists():
            with self._lock:
                log = self._logs.get(tenant_id)
            if log is not None and log._known is not None:
                raise AuditIntegrityError(f"the audit log of tenant {tenant_id!r} is gone, though this trainer wrote "
                                          f"or served it up to sequence {log._known['sequence']}: nothing is served",
                                          {"tenant_id": tenant_id})
            return None
        return self.log(tenant_id).read(records=every)

    def head(self, tenant_id: str) -> AuditHead:
        records = self.records(tenant_id, every=False)
        return _head_of(tenant_id, records[-1] if records else None)

    def query(self, tenant_id: str, training_client_id: Optional[str] = None, operation: Optional[str] = None,
              limit: int = 100) -> list[AuditEntry]:
        if operation is not None and operation not in AUDITED:  # would match nothing: a typo, not an empty log
            raise ValidationError(f"{operation[:100]!r} is not an operation or event the audit log records; these "
                                  f"are: {sorted(AUDITED)}", {"field": "operation"})
        hits = [fields for fields in self.records(tenant_id) or ()
                if (training_client_id is None or fields.get("training_client_id") == training_client_id)
                and (operation is None or fields.get("operation") == operation)]
        return [AuditEntry(**fields) for fields in (hits[-limit:] if limit else hits)]

    def rotate_keys(self, tenant_id: str) -> tuple[str, AuditEntry]:
        """Rotate the tenant's audit, receipt and sealing secrets, closing its chain's segment (AuditLog.rotate_keys)."""
        return self.log(check_tenant(tenant_id)).rotate_keys()


def parse_head(text: str) -> tuple[int, str]:
    """``SEQUENCE:RECORD_HASH`` as published (``AuditHead.text``)."""
    sequence, _, record = text.partition(":")
    if not sequence.lstrip("-").isdigit() or len(record) != 64:
        raise ValueError(f"an audit head looks like <sequence>:<64 hex digits>, not {text!r}")
    return int(sequence), record


def verify(path: Path, keys: Union[dict, bytes, Generations], expect_head: Optional[tuple[int, str]] = None
           ) -> tuple[bool, int, str]:
    """Check the whole chain under ``keys``: the tenant's key set (every secrets generation; see the module's
    docstring), or one chain key (a chain that was never rotated). Returns (ok, entries checked, message naming
    the first broken link). ``expect_head`` (sequence, record_hash), a head published earlier, must be in the
    log: a log that ends before it was truncated."""
    generations, count = Generations(keys), 0
    try:
        with open(path, "rb") as f:
            for _ in _walk(f, generations, expect_head):
                count += 1
    except _Broken as broken:
        return False, broken.count, broken.message
    return True, count, f"ok: {count} entries, chain intact" + (
        f", published head {expect_head[0]} present" if expect_head and expect_head[0] >= 0 else "") + (
        f", {len(generations.retired)} key rotation(s)" if generations.retired else "")
