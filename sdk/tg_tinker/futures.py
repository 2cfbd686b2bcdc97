"""Futures for queued operations, resolved by long-polling the trainer's operation records.

A poll for one future names the other unfinished futures of the same connection too, and settles every
one the answer reports finished: operations of a client finish in order, so after waiting on the last
of many futures the others need no round trip of their own."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from typing import Any, Callable, Generic, Optional, TypeVar

from .errors import (
    FutureTimeoutError,
    OperationCancelledError,
    OperationLostError,
    TGTinkerError,
    error_from_wire,
)
from .transport import Transport
from .types import MAX_WAITED_OPERATIONS, OperationRecord, OperationStatus
from .wire import WireModel

T = TypeVar("T")
log = logging.getLogger("tg_tinker")
POLL_S = 30.0


class _Unfinished:
    """The unfinished futures of one transport, oldest first; weakly held, so a future the caller dropped
    without waiting on it is not kept alive here."""

    def __init__(self):
        self._lock = threading.Lock()
        self._futures: "weakref.WeakValueDictionary[str, Future]" = weakref.WeakValueDictionary()

    def __len__(self) -> int:
        return len(self._futures)

    def add(self, future: "Future") -> None:
        with self._lock:
            self._futures[future._operation_id] = future

    def discard(self, future: "Future") -> None:
        with self._lock:
            self._futures.pop(future._operation_id, None)

    def besides(self, future: "Future") -> list["Future"]:
        with self._lock:
            others = (f for f in list(self._futures.values()) if f is not future)
            return [f for _, f in zip(range(MAX_WAITED_OPERATIONS - 1), others)]


_unfinished: "weakref.WeakKeyDictionary[Transport, _Unfinished]" = weakref.WeakKeyDictionary()
_unfinished_lock = threading.Lock()


def _unfinished_of(transport: Transport) -> _Unfinished:
    with _unfinished_lock:
        return _unfinished.setdefault(transport, _Unfinished())


class Future(Generic[T]):
    """The eventual result of one operation. Operations of a client run in submission order,
    whatever order their futures are waited on.

    A future exists before its operation reaches the trainer: the client's submitter sends it in the
    background and then calls ``_accepted`` (the trainer queued it) or ``_refused`` (it never will run)."""

    def __init__(self, transport: Transport, request_type: str, result_type: type[WireModel],
                 on_result: Optional[Callable[[Any], None]] = None, idempotency_key: Optional[str] = None,
                 withdraw: Optional[Callable[["Future"], bool]] = None):
        self._transport = transport
        self._result_type = result_type
        self._on_result = on_result
        self._withdraw = withdraw
        self._lock = threading.Lock()
        self._callbacks: list[Callable[["Future[T]"], None]] = []
        self._sent = threading.Event()
        self._operation_id: Optional[str] = None
        self.type = request_type
        self.idempotency_key = idempotency_key
        self._outcome: Optional[tuple[bool, Any]] = None
        self._retrieved = False  # the caller has seen the outcome (result() or exception() returned it)
        self._unfinished = _unfinished_of(transport)

    def __repr__(self) -> str:
        state = "pending" if self._outcome is None else ("done" if self._outcome[0] else "failed")
        return f"<Future {self.type} {self._operation_id or 'unsent'} {state}>"

    @property
    def operation_id(self) -> Optional[str]:
        """The trainer's id for this operation; waits until it is sent. None if the trainer refused it."""
        self._sent.wait()
        return self._operation_id

    # --- submission (called by the client's submitter) -----------------------------------------

    def _accepted(self, record: OperationRecord) -> None:
        self._operation_id = record.operation_id
        self._unfinished.add(self)
        self._sent.set()
        self._absorb(record)

    def _refused(self, error: TGTinkerError) -> None:
        self._settle((False, error))

    # --- resolution -------------------------------------------------------------------------

    def _absorb(self, record: OperationRecord) -> None:
        if not record.status.finished:
            return
        if record.status is OperationStatus.SUCCEEDED:
            outcome = (True, self._result_type.parse(record.result))
        else:
            outcome = (False, error_from_wire(record.error.model_dump() if record.error else {}))
        self._settle(outcome)

    def _settle(self, outcome: tuple[bool, Any]) -> None:
        with self._lock:
            if self._outcome is not None:
                return
            self._outcome = outcome
            callbacks, self._callbacks = self._callbacks, []
        self._sent.set()  # a refused future is settled without being sent; nothing waits for it any longer
        if self._operation_id is not None:
            self._unfinished.discard(self)
        if outcome[0] and self._on_result is not None:
            self._on_result(outcome[1])
        for callback in callbacks:
            try:
                callback(self)
            except Exception:  # noqa: BLE001 - as concurrent.futures does: one bad callback stops nothing
                log.exception("a done callback of %r raised", self)

    def _poll(self, wait: float) -> None:
        polled = {f._operation_id: f for f in [self, *self._unfinished.besides(self)]}
        try:
            data = self._transport.request("POST", "/v1/operations/wait", timeout=wait + 30.0,
                                           json={"operation_ids": list(polled), "wait": wait})
        except OperationLostError as exc:
            self._settle((False, exc))
            return
        for item in data:
            record = OperationRecord.parse(item)
            if record.operation_id in polled:
                polled[record.operation_id]._absorb(record)

    def _wait(self, timeout: Optional[float]) -> tuple[bool, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._outcome is None:
            remaining = None if deadline is None else deadline - time.monotonic()
            if (remaining is not None and remaining <= 0) or not self._sent.wait(remaining):
                raise FutureTimeoutError(
                    f"{self.type} operation {self._operation_id or '(not sent yet)'} not finished after "
                    f"{timeout}s; it goes on", {"operation_id": self._operation_id, "timeout": timeout})
            if self._outcome is None:
                left = POLL_S if deadline is None else max(deadline - time.monotonic(), 0.0)
                self._poll(min(left, POLL_S))
        self._retrieved = True
        return self._outcome

    # --- the concurrent.futures-like surface -------------------------------------------------

    def done(self) -> bool:
        if self._outcome is None and self._sent.is_set():
            self._poll(0.0)
        return self._outcome is not None

    def result(self, timeout: Optional[float] = None) -> T:
        ok, value = self._wait(timeout)
        if ok:
            return value
        raise value

    def exception(self, timeout: Optional[float] = None) -> Optional[TGTinkerError]:
        ok, value = self._wait(timeout)
        return None if ok else value

    def cancel(self) -> bool:
        """Cancel if the operation has not started; True only then."""
        if self._outcome is not None:
            return False
        if self._withdraw is not None and self._withdraw(self):  # still unsent: it never reaches the trainer
            self._refused(OperationCancelledError("cancelled before it was sent"))
            return True
        self._sent.wait()
        if self._outcome is not None:
            return False
        data = self._transport.request("POST", f"/v1/operations/{self._operation_id}/cancel")
        self._absorb(OperationRecord.parse(data["record"]))
        return bool(data["cancelled"])

    def cancelled(self) -> bool:
        return self._outcome is not None and isinstance(self._outcome[1], OperationCancelledError)

    def add_done_callback(self, fn: Callable[["Future[T]"], None]) -> None:
        with self._lock:
            if self._outcome is None:
                self._callbacks.append(fn)
                start_watcher = len(self._callbacks) == 1
            else:
                start_watcher = None
        if start_watcher is None:
            fn(self)
        elif start_watcher:
            threading.Thread(target=self._watch, name=f"watch-{self.type}", daemon=True).start()

    def _watch(self) -> None:
        self._sent.wait()
        while self._outcome is None:
            try:
                self._poll(POLL_S)
            except TGTinkerError as exc:  # transport gave up: the callbacks learn of it as the outcome
                self._settle((False, exc))

    # --- asyncio -----------------------------------------------------------------------------

    async def result_async(self, timeout: Optional[float] = None) -> T:
        return await asyncio.to_thread(self.result, timeout)

    def __await__(self):
        return self.result_async().__await__()
