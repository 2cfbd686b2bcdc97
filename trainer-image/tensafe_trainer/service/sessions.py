"""One session per client: an ordered operation queue drained by a single worker thread.

Submissions are appended under a lock and executed strictly in that order. The worker hands the
engine the next operation while the current one runs (see engine_process) and takes the replies in
order; an operation handed over but not yet started is still pending, and cancelling it withdraws
it. Each operation has an asyncio future on the server's event loop, resolved from the worker
thread, which is what the long-poll awaits. Operations are kept for polling, and retries matched to
them, by the future store (futures.py).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import threading
import time
import traceback
import uuid
from typing import Any, Callable, Optional

from tg_tinker.errors import (
    AuditIntegrityError,
    ClientFailedError,
    ClientTerminatedError,
    OperationCancelledError,
    ResourceExhaustedError,
    TGTinkerError,
    TrainingClientError,
)
from tg_tinker.types import ClientInfo, ClientStatus, ErrorInfo, OperationRecord, OperationStatus

from tensafe_trainer.service import metrics
from tensafe_trainer.service.admission import Limits
from tensafe_trainer.storage.audit import request_hash
from tensafe_trainer.storage.audit_writer import AuditWriter
from tensafe_trainer.engine.process import PIPELINE_DEPTH, EngineSlot
from tensafe_trainer.engine.protocol import SlotSummary
from tensafe_trainer.privacy.dp import public_dp_metrics

log = logging.getLogger("tensafe.trainer")

ENGINE_WATCH_S = 0.5  # how often an idle client's worker checks that its engine process is alive
Signer = Callable[[dict], dict]  # receipt claims -> signed receipt (tg_tinker.receipts)


class Operation:
    def __init__(self, client_id: str, request: Any, fingerprint: str, loop: asyncio.AbstractEventLoop):
        self.id = f"op-{uuid.uuid4().hex}"
        self.client_id = client_id
        self.type: str = request.type
        self.request = request  # dropped once executed: a long run must not keep every batch
        self.seq: Optional[int] = None  # its place among the operations handed to the engine
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

    def finish(self, status: OperationStatus, result: Optional[dict] = None, error: Optional[ErrorInfo] = None,
               finished_at: Optional[float] = None):
        with self._finish_lock:
            # finished_at first: the event loop reads ``finished`` (the status), then finished_at, without the lock
            self.finished_at = finished_at or time.time()
            self.status, self.result, self.error = status, result, error
            self.request = None
            waiter = self._waiter
        if waiter is not None:
            self._loop.call_soon_threadsafe(lambda: waiter.done() or waiter.set_result(None))

    @property
    def finished(self) -> bool:
        return self.status.finished

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


def fingerprint(key: bytes, request: Any) -> str:
    """The request's keyed hash: the audit log's request_hash."""
    return request_hash(key, request.model_dump_json().encode())


class Session:
    def __init__(self, client_id: str, tenant_id: str, kind: str, start_engine: Callable[[], EngineSlot],
                 audit: AuditWriter, loop: asyncio.AbstractEventLoop, *, max_pending: int, hash_key: Callable[[], bytes],
                 sign: Optional[Signer] = None, config=None):
        self.client_id, self.tenant_id, self.kind, self.config = client_id, tenant_id, kind, config
        self._hash_key = hash_key  # read per request: a key rotation applies at once
        self._sign = sign
        self.audit_head: Optional[dict] = None  # the head of the tenant's chain after this client's last entry
        self.granted: set[str] = set()  # other clients' artifact ids this client's token may use (audited grants)
        self.children: list["Session"] = []  # sampling clients this client's token made: they end with it
        # A DP client's token counts are statistics of private batches: kept out of the metrics.
        self._private = config is not None and config.dp_enabled
        self._start_engine = start_engine
        self._audit = audit
        self._loop = loop
        self._max_pending = max_pending
        self._cond = threading.Condition()
        self._queue: collections.deque[Operation] = collections.deque()
        self._handed: collections.deque[Operation] = collections.deque()  # handed to the engine, not answered
        self._next_seq = 0
        self.status = ClientStatus.INITIALIZING
        self.error: Optional[str] = None
        self.error_type: Optional[str] = None
        self.engine: Optional[EngineSlot] = None
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name=f"session-{client_id}", daemon=True)
        self._thread.start()

    # --- called from the event loop ----------------------------------------------------------

    def digests(self, request: Any) -> tuple[str, bytes]:
        """``request``'s keyed hash under the tenant's current audit key (the audit log's request_hash), and its
        SHA-256 (what a retry must match: kept in memory only, and unchanged by a key rotation)."""
        body = request.model_dump_json().encode()
        return request_hash(self._hash_key(), body), hashlib.sha256(body).digest()

    def submit(self, request: Any, fp: Optional[str] = None) -> Operation:
        """Queue ``request`` (idempotency is the future store's: service/futures.py)."""
        fp = fp or fingerprint(self._hash_key(), request)
        with self._cond:
            self.check_open()
            if len(self._queue) >= self._max_pending:
                raise ResourceExhaustedError(
                    f"client {self.client_id} already has {len(self._queue)} operations queued; "
                    "wait for some to finish", {"max_pending": self._max_pending})
            op = Operation(self.client_id, request, fp, self._loop)
            self._queue.append(op)
            self._cond.notify()
        self._count_queued(1)
        return op

    def check_open(self) -> None:
        """Refuse work once the client runs nothing more: 410 terminated, 409 in ERROR (never a 500)."""
        if self.status is ClientStatus.TERMINATED or self._stopping:
            raise ClientTerminatedError(f"client {self.client_id} is TERMINATED: it runs nothing more",
                                        {"status": ClientStatus.TERMINATED.value})
        if self.status is ClientStatus.ERROR:
            raise ClientFailedError(f"client {self.client_id} is ERROR: {self.error}; re-create it "
                                    "(resume_from='latest') to go on from its last checkpoint",
                                    {"status": ClientStatus.ERROR.value, "error_type": self.error_type})

    def _close_unrun(self, op: Operation, status: OperationStatus, error: dict) -> None:
        """Finish an operation that never ran (cancelled, or failed with its client), audited like any other."""
        self._count_queued(-1)
        op.finish(status, error=ErrorInfo(**error))
        self._audit.submit(operation=op.type, training_client_id=self.client_id, tenant_id=self.tenant_id,
                           request_hash=op.fingerprint, success=False, error=self._loggable(error))

    def cancel(self, op: Operation) -> bool:
        with self._cond:
            if op.status is not OperationStatus.PENDING:
                return False
            if op in self._queue:
                self._queue.remove(op)
            elif not (op in self._handed and self.engine.withdraw(op.seq)):
                return False
            op.status = OperationStatus.CANCELLED  # under the lock: the worker must not mark it running now
        cancelled = OperationCancelledError("cancelled before it started")
        self._close_unrun(op, OperationStatus.CANCELLED, cancelled.to_wire())
        return True

    def info(self) -> ClientInfo:
        summary = self.engine.summary if self.engine else SlotSummary()
        with self._cond:
            # A DP client's: what it sent and has not had back (not when each of its steps started).
            queued = len(self._queue) + (len(self._handed) if self._private else
                                         sum(op.status is OperationStatus.PENDING for op in self._handed))
        return ClientInfo(
            client_id=self.client_id, kind=self.kind, status=self.status, tenant_id=self.tenant_id,
            step=summary.step, config=self.config, total_epsilon=summary.total_epsilon,
            last_checkpoint=summary.last_checkpoint, error=self.error, error_type=self.error_type,
            queue_depth=queued, audit_head=self.audit_head,
        )

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait until the worker thread has ended (the client TERMINATED or in ERROR); False if ``timeout`` ran out."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def terminated(self) -> bool:
        return self._stopping or self.status is ClientStatus.TERMINATED

    @property
    def holds_engine(self) -> bool:
        """Whether this client still holds its slot: until it has left its host (or its host has died)."""
        if self.status in (ClientStatus.TERMINATED, ClientStatus.ERROR):
            return self.engine is not None and self.engine.alive
        return True

    @property
    def limits(self) -> Limits:
        """What one submission of this client may hold (checked at the door: admission.py)."""
        return Limits.of(self.kind, self.config, self.engine.summary if self.engine else SlotSummary())

    def terminate(self) -> None:
        with self._cond:
            self._stopping = True
            pending = [op for op in self._handed
                       if op.status is OperationStatus.PENDING and self.engine.withdraw(op.seq)]
            for op in pending:
                op.status = OperationStatus.CANCELLED
            pending += self._queue  # after those handed over: in submission order
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
        resumed = self.engine.summary.resumed_from
        if resumed:
            try:
                self._audit.submit(durable=True, operation="resume", training_client_id=self.client_id,
                                   tenant_id=self.tenant_id, success=True, consumed=[resumed],
                                   request_hash=request_hash(self._hash_key(), resumed.encode()))
            except AuditIntegrityError as exc:
                self.engine.close()
                self._enter_error(exc, f"client {self.client_id} could not audit its resume")
                return
        with self._cond:
            if self.status is ClientStatus.INITIALIZING:
                self.status = ClientStatus.READY
        try:
            self._serve()
        except Exception as exc:  # noqa: BLE001 - a bug here must fail this client loudly, never hang it
            context = f"client {self.client_id}'s worker failed"
            for op in self._take_back_handed():
                self._record(op, None, TrainingClientError(f"{context}: {exc}").to_wire())
            self._enter_error(exc, context)
            self.engine.close()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not (self._queue or self._handed or self._stopping) and self.engine.alive:
                    self._cond.wait(ENGINE_WATCH_S)
                died_idle = not (self._queue or self._handed or self._stopping)
                if self._stopping and not self._handed:
                    self.status = ClientStatus.TERMINATED
                    self.engine.close()
                    return
                handing = [] if died_idle else self._take_for_engine()
            if died_idle:  # say so now, not at the client's next call
                code = self.engine.exit_code
                self._enter_error(TrainingClientError(
                    f"the engine process died while idle (exit code {code}); this client must be restarted from "
                    "its last checkpoint", {"exit_code": code}), f"client {self.client_id} lost its engine")
                return
            for op, request in handing:
                self.engine.hand_over(op.seq, request)
            if not self._finish_oldest():
                return

    def _take_for_engine(self) -> list[tuple[Operation, Any]]:
        """Under the lock: move queued operations to the engine's hand, up to PIPELINE_DEPTH outstanding."""
        handing = []
        while self._queue and len(self._handed) < PIPELINE_DEPTH:
            op = self._queue.popleft()
            op.seq, self._next_seq = self._next_seq, self._next_seq + 1
            if not self._handed:
                self._mark_running(op)  # an idle engine starts it at once
            self._handed.append(op)
            handing.append((op, op.request))  # taken now: a cancel may drop op.request before it is sent
        return handing

    def _mark_running(self, op: Operation, since: Optional[float] = None) -> None:
        op.status, op.started_at = OperationStatus.RUNNING, since or time.time()
        if self.status is not ClientStatus.ERROR and not self._private:
            self.status = ClientStatus.BUSY  # a DP client stays READY: when its steps start and end is private
        self._count_queued(-1)

    def _count_queued(self, change: int) -> None:
        """The trainer-wide queue-depth gauge, which a DP client's operations stay out of: its rises and falls would
        time each of the client's steps, and a step's duration depends on its private batch."""
        if not self._private:
            metrics.QUEUE_DEPTH.inc(change)

    def _finish_oldest(self) -> bool:
        """Take the engine's reply to the oldest outstanding operation and finish that operation; False when
        the engine process is gone and the client is in ERROR."""
        op = self._handed[0]
        try:
            reply = self.engine.reply(op.type)
        except TGTinkerError as exc:
            with self._cond:
                self._handed.popleft()
            self._take_back_handed()
            self._record(op, None, exc.to_wire())
            self._enter_error(exc, f"client {self.client_id} lost its engine")
            return False
        if reply.seq != op.seq:
            raise RuntimeError(f"engine answered operation {reply.seq}, expected {op.seq}")  # a bug, never input
        with self._cond:
            self._handed.popleft()
            if self._handed and self._handed[0].status is OperationStatus.PENDING:
                self._mark_running(self._handed[0], reply.finished_at)  # the engine went on to it at once
            if not self._handed and self.status is ClientStatus.BUSY:
                self.status = ClientStatus.READY
        if not reply.withdrawn:  # a withdrawn operation was finished by whoever withdrew it
            self._record(op, reply, reply.error)
        return True

    def _take_back_handed(self) -> list[Operation]:
        """The engine will not answer: put what it was handed and has not started back in the queue (for
        _enter_error to fail); returns those it had started."""
        with self._cond:
            running = [op for op in self._handed if op.status is OperationStatus.RUNNING]
            self._queue.extendleft(reversed([op for op in self._handed if op.status is OperationStatus.PENDING]))
            self._handed.clear()
        return running

    def _record(self, op: Operation, reply: Optional[Any], error: Optional[dict]) -> None:
        """Audit, count and finish an operation the engine ran (``reply`` None: the engine died running it).
        Its outcome is published once its audit entry is on disk, and is a failure if that write fails."""
        status = OperationStatus.FAILED if error else OperationStatus.SUCCEEDED
        finished_at = reply.finished_at if reply else time.time()
        if self._private:  # outcome, duration and token count depend on the private batch
            metrics.observe_private(op.type)
        else:
            tokens = (reply.result or {}).get("tokens_processed", 0) if reply else 0
            metrics.observe(op.type, status.value, finished_at - op.started_at, tokens,
                            shared=reply.shared_pass if reply else False)

        def written(entry, audit_error) -> None:
            if audit_error is not None:  # fail closed: this operation, and the client, which ran unaudited
                op.finish(OperationStatus.FAILED, error=ErrorInfo(**audit_error.to_wire()), finished_at=finished_at)
                self._enter_error(audit_error, f"client {self.client_id} stopped: its audit log could not be written")
                return
            self.audit_head = {"tenant_id": self.tenant_id, "sequence": entry.sequence,
                               "record_hash": entry.record_hash}
            if error:
                op.finish(status, error=ErrorInfo(**error), finished_at=finished_at)
                return
            result = reply.result
            if reply.receipt_claims is not None and self._sign is not None:
                try:
                    receipt = self._sign({**reply.receipt_claims, "audit_head": self.audit_head,
                                          "issued_at": time.time()})
                except Exception as exc:  # noqa: BLE001 - never a result without its receipt, never a hang
                    log.error("could not sign the receipt of %s: %s", op.id, exc)
                    failed = TrainingClientError(f"the {op.type} completed but its receipt could not be signed "
                                                 f"({type(exc).__name__})")
                    op.finish(OperationStatus.FAILED, error=ErrorInfo(**failed.to_wire()), finished_at=finished_at)
                    return
                result = {**result, "audit_head": self.audit_head, "receipt": receipt}
            op.finish(status, result=result, finished_at=finished_at)

        self._audit.submit(
            on_written=written, operation=op.type, training_client_id=self.client_id,
            tenant_id=self.tenant_id, request_hash=op.fingerprint, success=error is None,
            produced=reply.produced if reply else [], consumed=reply.consumed if reply else [],
            dp_metrics=public_dp_metrics(reply.dp_metrics) if reply else None, error=self._loggable(error),
        )

    def _loggable(self, error: Optional[dict]) -> Optional[str]:
        """What the audit log may say of a failure: a DP client's messages can quote its batch (a length, a token
        id), so only their type is logged; the client gets the whole error on its future."""
        if error is None:
            return None
        return error["type"] if self._private else error["message"]

    def _enter_error(self, exc: Exception, context: str) -> None:
        """Move to ERROR and fail everything still queued with the reason."""
        if isinstance(exc, TGTinkerError):
            self.error, self.error_type = exc.message, type(exc).__name__
        elif self._private:  # its message could quote the private batch: the log and the status get the type
            log.error("%s: %s (a DP client's: message withheld)", context, type(exc).__name__)
            self.error, self.error_type = f"{type(exc).__name__} (message withheld: a DP client)", "TrainingClientError"
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
