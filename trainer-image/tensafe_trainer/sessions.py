"""One session per client: an ordered operation queue drained by a single worker thread.

Submissions are appended under a lock and executed strictly in that order. Each operation has an
asyncio future on the server's event loop, resolved from the worker thread, which is what the
long-poll endpoint awaits. Idempotency keys map a retried submission to the operation it already
created, so a retry never runs an operation twice.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import traceback
import uuid
from typing import Any, Callable, Optional

from tg_tinker.errors import (
    OperationCancelledError,
    ResourceExhaustedError,
    TGTinkerError,
    TrainingClientError,
    ValidationError,
    error_from_wire,
)
from tg_tinker.types import ClientInfo, ClientStatus, ErrorInfo, OperationRecord, OperationStatus

from . import metrics
from .audit import request_hash
from .audit_writer import AuditWriter
from .engine_process import EngineProcess

log = logging.getLogger("tensafe.trainer")

DURABLE_OPERATIONS = {"save_state", "load_state"}


class Operation:
    def __init__(self, client_id: str, request: Any, key: Optional[str], fingerprint: str,
                 loop: asyncio.AbstractEventLoop):
        self.id = f"op-{uuid.uuid4().hex}"
        self.client_id = client_id
        self.type: str = request.type
        self.request = request  # dropped once executed: a long run must not keep every batch
        self.key = key
        self.fingerprint = fingerprint
        self.status = OperationStatus.PENDING
        self.created_at = time.time()
        self.started_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self.result: Optional[dict] = None
        self.error: Optional[ErrorInfo] = None
        self._loop = loop
        # Made by the first long-poll: finish() wakes the event loop only for an operation someone waits on.
        self._waiter: Optional[asyncio.Future] = None
        self._finish_lock = threading.Lock()

    def finish(self, status: OperationStatus, result: Optional[dict] = None, error: Optional[ErrorInfo] = None):
        with self._finish_lock:
            self.status, self.result, self.error = status, result, error
            self.request = None
            self.finished_at = time.time()
            waiter = self._waiter
        if waiter is not None:
            self._loop.call_soon_threadsafe(lambda: waiter.done() or waiter.set_result(None))

    def waiter(self) -> Optional[asyncio.Future]:
        """Called on the event loop: a future resolved when this operation finishes; None once it has."""
        with self._finish_lock:
            if self.status.finished:
                return None
            if self._waiter is None:
                self._waiter = self._loop.create_future()
            return self._waiter

    def record(self) -> OperationRecord:
        return OperationRecord(
            operation_id=self.id, client_id=self.client_id, type=self.type, status=self.status,
            created_at=self.created_at, started_at=self.started_at, finished_at=self.finished_at,
            result=self.result, error=self.error,
        )


class OperationIndex:
    """Operation id -> (operation, session), forgetting the oldest finished ones past ``capacity``.
    A forgotten operation answers OperationLostError, as after a restart."""

    def __init__(self, capacity: int = 100_000):
        self.capacity = capacity
        self._ops: collections.OrderedDict[str, tuple[Operation, "Session"]] = collections.OrderedDict()

    def add(self, op: Operation, session: "Session") -> None:
        self._ops[op.id] = (op, session)
        while len(self._ops) > self.capacity:
            oldest_id, (oldest, owner) = next(iter(self._ops.items()))
            if not oldest.status.finished:
                break
            del self._ops[oldest_id]
            owner.forget(oldest)

    def get(self, operation_id: str) -> tuple[Operation, "Session"]:
        return self._ops[operation_id]

    def __len__(self) -> int:
        return len(self._ops)


def fingerprint(request: Any) -> str:
    """The request's SHA-256: matches idempotent retries, and is the audit log's request_hash."""
    return request_hash(request.model_dump_json().encode())


class Session:
    def __init__(self, client_id: str, tenant_id: str, kind: str, start_engine: Callable[[], EngineProcess],
                 audit: AuditWriter, loop: asyncio.AbstractEventLoop, *, max_pending: int, config=None):
        self.client_id, self.tenant_id, self.kind, self.config = client_id, tenant_id, kind, config
        self._start_engine = start_engine
        self._audit = audit
        self._loop = loop
        self._max_pending = max_pending
        self._cond = threading.Condition()
        self._queue: collections.deque[Operation] = collections.deque()
        self._by_key: dict[str, Operation] = {}
        self.status = ClientStatus.INITIALIZING
        self.error: Optional[str] = None
        self.error_type: Optional[str] = None
        self.engine: Optional[EngineProcess] = None
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name=f"session-{client_id}", daemon=True)
        self._thread.start()

    # --- called from the event loop ----------------------------------------------------------

    def submit(self, request: Any, key: Optional[str]) -> tuple[Operation, bool]:
        """Queue ``request``; returns (operation, created). A repeated key returns the first operation."""
        fp = fingerprint(request)
        with self._cond:
            if key is not None and key in self._by_key:
                existing = self._by_key[key]
                if existing.fingerprint != fp:
                    raise ValidationError("idempotency key reused for a different request",
                                          {"idempotency_key": key, "operation_id": existing.id})
                return existing, False
            if self.status in (ClientStatus.TERMINATED, ClientStatus.ERROR):
                raise TrainingClientError(
                    f"client {self.client_id} is {self.status.value}" + (f": {self.error}" if self.error else ""),
                    {"status": self.status.value})
            if len(self._queue) >= self._max_pending:
                raise ResourceExhaustedError(
                    f"client {self.client_id} already has {len(self._queue)} operations queued; "
                    "wait for some to finish", {"max_pending": self._max_pending})
            op = Operation(self.client_id, request, key, fp, self._loop)
            if key is not None:
                self._by_key[key] = op
            self._queue.append(op)
            self._cond.notify()
        metrics.QUEUE_DEPTH.inc()
        return op, True

    def _close_unrun(self, op: Operation, status: OperationStatus, error: dict) -> None:
        """Finish an operation that never ran (cancelled, or failed with its client), audited like any other."""
        metrics.QUEUE_DEPTH.dec()
        op.finish(status, error=ErrorInfo(**error))
        self._audit.submit(operation=op.type, training_client_id=self.client_id, tenant_id=self.tenant_id,
                           request_hash=op.fingerprint, success=False, error=error["message"])

    def forget(self, op: Operation) -> None:
        """Drop a finished operation's idempotency key (its retries are long over)."""
        with self._cond:
            if op.key is not None and self._by_key.get(op.key) is op:
                del self._by_key[op.key]

    def cancel(self, op: Operation) -> bool:
        with self._cond:
            if op.status is not OperationStatus.PENDING or op not in self._queue:
                return False
            self._queue.remove(op)
        cancelled = OperationCancelledError("cancelled before it started")
        self._close_unrun(op, OperationStatus.CANCELLED, cancelled.to_wire())
        return True

    def info(self) -> ClientInfo:
        summary = self.engine.summary if self.engine else {}
        return ClientInfo(
            client_id=self.client_id, kind=self.kind, status=self.status, tenant_id=self.tenant_id,
            step=summary.get("step", 0), config=self.config, total_epsilon=summary.get("total_epsilon"),
            last_checkpoint=summary.get("last_checkpoint"), error=self.error, error_type=self.error_type,
            queue_depth=len(self._queue),
        )

    @property
    def stopping(self) -> bool:
        return self._stopping

    def terminate(self) -> None:
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify()
        terminated = OperationCancelledError("the client was terminated").to_wire()
        for op in pending:
            self._close_unrun(op, OperationStatus.CANCELLED, terminated)

    # --- the worker thread -------------------------------------------------------------------

    def _work(self) -> None:
        try:
            self.engine = self._start_engine()
        except Exception as exc:  # noqa: BLE001 - reported to every caller, never swallowed
            self._enter_error(exc, f"client {self.client_id} failed to start")
            return
        resumed = self.engine.summary.get("resumed_from")
        if resumed:
            self._audit.submit(durable=True, operation="resume", training_client_id=self.client_id,
                               tenant_id=self.tenant_id, request_hash=request_hash(resumed.encode()),
                               success=True, consumed=[resumed])
        with self._cond:
            if self.status is ClientStatus.INITIALIZING:
                self.status = ClientStatus.READY
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    self.status = ClientStatus.TERMINATED
                    self.engine.close()
                    return
                op = self._queue.popleft()
                op.status = OperationStatus.RUNNING
                self.status = ClientStatus.BUSY
            metrics.QUEUE_DEPTH.dec()
            if not self._run(op):
                return
            with self._cond:
                if self.status is ClientStatus.BUSY:
                    self.status = ClientStatus.READY

    def _run(self, op: Operation) -> bool:
        """Execute one operation; False when the engine process is gone and the client is in ERROR."""
        op.started_at = time.time()
        try:
            reply = self.engine.execute(op.request)
        except TGTinkerError as exc:
            reply, error = None, exc.to_wire()
        else:
            error = reply.error
        self._audit.submit(
            durable=op.type in DURABLE_OPERATIONS, operation=op.type, training_client_id=self.client_id,
            tenant_id=self.tenant_id, request_hash=op.fingerprint, success=error is None,
            produced=reply.produced if reply else [], consumed=reply.consumed if reply else [],
            dp_metrics=reply.dp_metrics if reply else None, error=error["message"] if error else None,
        )
        status = OperationStatus.FAILED if error else OperationStatus.SUCCEEDED
        tokens = (reply.result or {}).get("tokens_processed", 0) if reply else 0
        metrics.observe(op.type, status.value, time.time() - op.started_at, tokens)
        if error:
            op.finish(status, error=ErrorInfo(**error))
        else:
            op.finish(status, result=reply.result)
        if reply is None:
            self._enter_error(error_from_wire(error), f"client {self.client_id} lost its engine")
            return False
        return True

    def _enter_error(self, exc: Exception, context: str) -> None:
        """Move to ERROR and fail everything still queued with the reason."""
        if isinstance(exc, TGTinkerError):
            self.error, self.error_type = exc.message, type(exc).__name__
        else:
            log.error("%s:\n%s", context, traceback.format_exc())
            self.error, self.error_type = f"{type(exc).__name__}: {exc}", "TrainingClientError"
        with self._cond:
            self.status = ClientStatus.ERROR
            pending = list(self._queue)
            self._queue.clear()
        wire = {"type": self.error_type, "message": f"{context}: {self.error}", "details": {"status": "ERROR"}}
        for op in pending:
            self._close_unrun(op, OperationStatus.FAILED, wire)
