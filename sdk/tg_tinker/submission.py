"""Sends one client's operations to its trainer, in call order, from a background thread.

A call such as ``forward_backward`` returns its future at once. The client's sender thread sends
whatever has queued up meanwhile in one request (``POST /v1/clients/{id}/operations/batch``), so a
pipelined loop pays one round trip per burst of calls, not one per call, and the caller's thread does
no HTTP at all. Every operation carries an idempotency key, so a retried request never runs one twice.

What the caller sees:
- Back-pressure: when the trainer's queue for this client is full, the sender waits and retries, and
  once ``MAX_UNSENT`` operations wait here, the next call blocks until there is room.
- A refused submission (the client is in ERROR or terminated, a bad token, the trainer unreachable
  after the transport's retries) fails that operation's future, and every operation queued behind it
  fails too without being sent: they were meant to run after it. The next call on the client raises
  the same error, unless one of those futures has already reported it, so a loop that never waits on
  its futures still stops at the first lost operation.
"""

from __future__ import annotations

import atexit
import collections
import json
import threading
import time
import uuid
import weakref
from typing import Any, Callable, Optional

from .errors import OperationCancelledError, ResourceExhaustedError, TGTinkerError, error_from_wire
from .futures import Future
from .transport import Transport
from .operations import RESULT_TYPES
from .types import MAX_PACKED_BYTES, MAX_SUBMISSIONS, SubmittedOperations

MAX_UNSENT = 256  # operations waiting to be sent before a call blocks
IDLE_EXIT_S = 5.0  # the sender thread ends after this long with nothing to send
BUSY_RETRY_S = (0.02, 1.0)  # first and longest wait while the trainer's queue is full
EXIT_FLUSH_S = 30.0  # at interpreter exit, how long to wait for operations still unsent

_queues: "weakref.WeakSet[OperationQueue]" = weakref.WeakSet()


@atexit.register
def _send_what_is_left() -> None:
    """A script that ends right after its last call still gets that operation to the trainer."""
    for queue in list(_queues):
        queue.flush(EXIT_FLUSH_S)


class _Unsent:
    __slots__ = ("future", "body")

    def __init__(self, future: Future, body: bytes):
        self.future, self.body = future, body


class _Refusal:
    """A refused submission and the futures it failed; raised once by the next call unless seen."""

    def __init__(self, error: TGTinkerError, futures: list[Future]):
        self.error, self.futures = error, futures

    def unseen(self) -> bool:
        return not any(f._retrieved for f in self.futures)


class OperationQueue:
    def __init__(self, transport: Transport, client_id: str):
        self._transport = transport
        self.client_id = client_id
        self._path = f"/v1/clients/{client_id}/operations/batch"
        self._cond = threading.Condition()
        self._unsent: collections.deque[_Unsent] = collections.deque()
        self._in_flight = 0  # operations taken by the sender and not yet answered
        self._sender: Optional[threading.Thread] = None
        self._refusal: Optional[_Refusal] = None
        self._closed: Optional[TGTinkerError] = None
        _queues.add(self)

    @property
    def transport(self) -> Transport:
        """The transport this queue's operations, and their futures, go through."""
        return self._transport

    def submit(self, request: Any, on_result: Optional[Callable[[Any], None]] = None,
               idempotency_key: Optional[str] = None) -> Future:
        key = idempotency_key or uuid.uuid4().hex
        body = b'{"idempotency_key":%s,"request":%s}' % (json.dumps(key).encode(), request.model_dump_json().encode())
        future = Future(self._transport, request.type, RESULT_TYPES[request.type], on_result, key, self._withdraw)
        with self._cond:
            refusal, self._refusal = self._refusal, None
            if refusal is not None and refusal.unseen():
                raise refusal.error
            while len(self._unsent) >= MAX_UNSENT and self._closed is None:
                self._cond.wait()
            if self._closed is not None:
                raise self._closed
            self._unsent.append(_Unsent(future, body))
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_loop, name=f"submit-{self.client_id}",
                                                daemon=True)
                self._sender.start()
            self._cond.notify_all()
        return future

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every operation submitted so far has been answered by the trainer (queued or refused);
        False if ``timeout`` ran out first."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._unsent or self._in_flight), timeout)

    def close(self, error: TGTinkerError) -> None:
        """No more operations: later calls raise ``error``. Those not sent yet are cancelled (they never reach
        the trainer); a request already on its way is waited for."""
        with self._cond:
            self._closed = error
            unsent = list(self._unsent)
            self._unsent.clear()
            self._cond.notify_all()
        for item in unsent:
            item.future._refused(OperationCancelledError(f"cancelled before it was sent: {error.message}"))
        self.flush()

    def _withdraw(self, future: Future) -> bool:
        with self._cond:
            for item in self._unsent:
                if item.future is future:
                    self._unsent.remove(item)
                    self._cond.notify_all()
                    return True
        return False

    # --- the sender thread ---------------------------------------------------------------------

    def _send_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    if not self._unsent:
                        self._cond.wait(IDLE_EXIT_S)
                        if not self._unsent:
                            return
                    batch = self._take()
                    self._in_flight = len(batch)
                    self._cond.notify_all()  # room for a blocked caller
                try:
                    self._send(batch)
                finally:
                    batch = None  # held no longer than needed: a dropped future must be collectable
                    with self._cond:
                        self._in_flight = 0
                        self._cond.notify_all()
        finally:
            with self._cond:
                if self._sender is threading.current_thread():
                    self._sender = None

    def _take(self) -> list[_Unsent]:
        batch = [self._unsent.popleft()]
        size = len(batch[0].body)
        while self._unsent and len(batch) < MAX_SUBMISSIONS and size + len(self._unsent[0].body) < MAX_PACKED_BYTES:
            batch.append(self._unsent.popleft())
            size += len(batch[-1].body)
        return batch

    def _send(self, batch: list[_Unsent]) -> None:
        busy_wait = BUSY_RETRY_S[0]
        while batch:
            try:
                data = self._transport.request(
                    "POST", self._path, content=b'{"submissions":[' + b",".join(i.body for i in batch) + b"]}")
                answer = SubmittedOperations.parse(data)
            except Exception as exc:  # noqa: BLE001 - whatever it is, these operations were not queued
                self._refuse(batch, exc if isinstance(exc, TGTinkerError) else TGTinkerError(
                    f"could not submit to the trainer: {type(exc).__name__}: {exc}"))
                return
            for item, record in zip(batch, answer.records):
                item.future._accepted(record)
            batch = batch[len(answer.records):]
            if answer.error is None:
                return
            error = error_from_wire(answer.error.model_dump())
            if not isinstance(error, ResourceExhaustedError):
                self._refuse(batch, error)
                return
            time.sleep(busy_wait)  # the trainer's queue is full: wait for it to drain, then send the rest
            busy_wait = min(busy_wait * 2, BUSY_RETRY_S[1])

    def _refuse(self, batch: list[_Unsent], error: TGTinkerError) -> None:
        """``batch[0]`` was refused; it and everything queued behind it fail."""
        first = batch[0].future
        with self._cond:
            behind = [item.future for item in batch[1:] + list(self._unsent)]
            self._unsent.clear()
            self._refusal = _Refusal(error, [first, *behind])
            self._cond.notify_all()
        first._refused(error)
        consequence = type(error)(
            f"not sent: the {first.type} operation queued before it was refused ({error.message})",
            {**error.details, "refused_idempotency_key": first.idempotency_key})
        for future in behind:
            future._refused(consequence)
