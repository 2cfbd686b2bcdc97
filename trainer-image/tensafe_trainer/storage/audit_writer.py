"""Writes audit entries off the hot path: a background thread commits them in groups (one fsync).

An operation's outcome is published only once its entry is on disk: ``submit(on_written=...)`` calls back
from the writer thread with the entry, or with the error if the write failed (the chain refused to grow,
the disk is full), and the operation then fails: the audit fails closed. ``submit(durable=True)`` waits for
the entry instead and raises that error.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from tg_tinker.errors import AuditIntegrityError, TGTinkerError
from tg_tinker.types import AuditEntry

from tensafe_trainer.storage.audit import AuditTrail

log = logging.getLogger("tensafe.audit")

Written = Callable[[Optional[AuditEntry], Optional[TGTinkerError]], None]


@dataclass
class _Item:
    event: Optional[dict]
    on_written: Optional[Written] = None
    done: Optional[threading.Event] = None
    entry: Optional[AuditEntry] = None
    error: Optional[TGTinkerError] = None


class AuditWriter:
    def __init__(self, trail: AuditTrail):
        self.trail = trail
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def submit(self, *, durable: bool = False, on_written: Optional[Written] = None,
               **event: Any) -> Optional[AuditEntry]:
        item = _Item(event, on_written, threading.Event() if durable else None)
        self._queue.put(item)
        if item.done is None:
            return None
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.entry

    def flush(self) -> None:
        item = _Item(None, done=threading.Event())
        self._queue.put(item)
        item.done.wait()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            self._commit([i for i in batch if i.event is not None])
            for i in batch:
                if i.on_written is not None:
                    try:
                        i.on_written(i.entry, i.error)
                    except Exception:  # noqa: BLE001 - one broken callback must not stop the writer
                        log.exception("audit callback failed")
                if i.done is not None:
                    i.done.set()

    def _commit(self, items: list[_Item]) -> None:
        """One write per tenant's chain; a chain that refuses fails its own items only."""
        by_tenant: dict[str, list[_Item]] = {}
        for item in items:
            by_tenant.setdefault(item.event["tenant_id"], []).append(item)
        for tenant_id, group in by_tenant.items():
            try:
                for item, entry in zip(group, self.trail.log(tenant_id).append_many([i.event for i in group])):
                    item.entry = entry
            except Exception as exc:  # noqa: BLE001 - every operation in the group fails with the reason
                error = exc if isinstance(exc, AuditIntegrityError) else AuditIntegrityError(
                    f"the audit log could not be written ({type(exc).__name__}: {exc}); the operation's outcome "
                    "is not recorded and it is reported failed", {"tenant_id": tenant_id})
                log.error("could not write %d audit entries of tenant %s: %s", len(group), tenant_id, error.message)
                for item in group:
                    item.entry, item.error = None, error
