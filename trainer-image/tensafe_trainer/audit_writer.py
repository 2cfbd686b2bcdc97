"""Writes audit entries off the hot path: a background thread commits them in groups (one fsync).

High-rate operations (forward_backward, optim_step, sample) are queued; durable operations
(save_state, load_state) wait until their entry, and everything queued before it, is on disk.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from .audit import AuditLog

log = logging.getLogger("tensafe.audit")


class AuditWriter:
    def __init__(self, audit_log: AuditLog):
        self.log = audit_log
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def submit(self, *, durable: bool = False, **event: Any) -> None:
        done = threading.Event() if durable else None
        self._queue.put((event, done))
        if done is not None:
            done.wait()

    def flush(self) -> None:
        done = threading.Event()
        self._queue.put((None, done))
        done.wait()

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
            events = [event for event, _ in batch if event is not None]
            try:
                if events:
                    self.log.append_many(events)
            except Exception:  # noqa: BLE001 - keep serving; the failure is loud in the log
                log.exception("could not write %d audit entries", len(events))
            for _, done in batch:
                if done is not None:
                    done.set()
