"""Each client's engine runs in a process of its own, fed over a pipe by the session's worker.

Why a process and not a thread: the engine holds the GIL for most of every step (Python-level model
code), and on a small machine the HTTP server's request handling then stalls the engine and vice
versa (measured: -20% tokens/s with both in one interpreter). A separate process also means an
engine crash (a CUDA fault, an OOM kill) fails that client's operations cleanly while the server
keeps serving everyone else.

Children are spawned, not forked: a fresh interpreter has no inherited threads or allocator state
(measured: forkserver children with torch preloaded trained ~15% slower here), at the price of a
few seconds of imports per client.

The session hands over the next operation while the current one runs (``PIPELINE_DEPTH``), so the
engine goes from one operation to the next without waiting on the server (measured: about 1.2 ms
per operation otherwise). An operation handed over but not started can still be withdrawn: the
``StartGate`` decides, atomically for both processes, whether it starts or is skipped.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from tg_tinker.errors import TGTinkerError, TrainingClientError, error_from_wire
from tg_tinker.operations import ACCUMULATING

from tensafe_trainer.engine.protocol import Reply, SlotSpec, SlotSummary

log = logging.getLogger("tensafe.engine")

PIPELINE_DEPTH = 2  # operations handed to an engine at once: the running one and the next
SPIN_COUNT_ENV = "GOMP_SPINCOUNT"  # rounds an idle OpenMP thread spins before it sleeps (see _mp_context)

_context = None


def _mp_context():
    global _context
    if _context is None:
        # Engines' OpenMP threads spin only briefly before they sleep (unless the operator says otherwise): engines
        # share the cores with each other and the server, and a team spinning libgomp's default 300,000 rounds burns
        # the core another needs. Measured (benchmarks/load.py, overhead.py, 2026-12-07): default spin, /v1 under
        # attack 0.80 of quiet; this, 0.98 with overhead.py at 0.980; OMP_WAIT_POLICY=PASSIVE, 0.95 and 60% more
        # multi-client throughput but overhead.py 0.943. Spawned engines inherit this process's environment.
        os.environ.setdefault(SPIN_COUNT_ENV, "10000")
        _context = multiprocessing.get_context("spawn")
    return _context


def _summary(runtime) -> SlotSummary:
    engine = runtime.engine
    return SlotSummary(step=engine.step, total_epsilon=engine.total_epsilon, last_checkpoint=runtime.last_checkpoint,
                       resumed_from=runtime.resumed_from, vocab_size=engine.vocab_size,
                       batch_size=engine.config.batch_size, max_seq_len=engine.config.max_seq_len,
                       logits_chunk=engine.logits_chunk,
                       activation_bytes_per_token=engine.activation_bytes_per_token)


def _build(spec: SlotSpec, home: Path):
    from tensafe_trainer.storage.artifacts import ArtifactStore
    from tensafe_trainer.storage.paths import key_provider, ledger_dir
    from tensafe_trainer.engine.operations import Runtime

    store = ArtifactStore(home / "artifacts", key_provider(home))
    if spec.kind == "training":
        runtime = Runtime.for_training(spec.client_id, spec.tenant_id, spec.config, store, ledger_dir(home))
        if spec.resume_from:
            runtime.resume(spec.resume_from)
        return runtime
    return Runtime.for_sampling(spec.client_id, spec.tenant_id, store, artifact_id=spec.artifact_id,
                                base_model=spec.base_model)


class _ThreadShare:
    """Sizes this engine's torch threads to the cores divided among the engines busy right now.

    Engines share the machine's cores; with each one running a full OpenMP team, the teams' threads
    spin and wait on each other (measured on 2 cores: 3 busy clients fell from ~145 to 6 ops/s). One
    busy engine still gets every core."""

    def __init__(self, busy_engines):
        import torch

        self._torch, self._busy = torch, busy_engines
        self.cores = torch.get_num_threads()
        self._current = self.cores

    @contextlib.contextmanager
    def working(self):
        """Counts this engine busy while it executes one operation, with its share of the cores."""
        with self._busy.get_lock():
            self._busy.value += 1
            busy = self._busy.value
        wanted = max(1, self.cores // busy)
        if wanted != self._current:
            self._torch.set_num_threads(wanted)
            self._current = wanted
        try:
            yield
        finally:
            with self._busy.get_lock():
                self._busy.value -= 1


class StartGate:
    """Whether a handed-over operation starts or is withdrawn: decided once, under a lock both processes share.

    Sequence numbers count the operations handed to one engine. At most ``PIPELINE_DEPTH`` are outstanding,
    so a ring of that many slots holds every withdrawal that can still matter."""

    def __init__(self, ctx):
        self._lock = ctx.Lock()
        self._started = ctx.RawValue("q", -1)
        self._withdrawn = ctx.RawArray("q", [-1] * PIPELINE_DEPTH)

    def start(self, seq: int) -> bool:
        """Called by the engine before it runs ``seq``: False if it was withdrawn."""
        with self._lock:
            if self._withdrawn[seq % PIPELINE_DEPTH] == seq:
                return False
            self._started.value = seq
            return True

    def withdraw(self, seq: int) -> bool:
        """Called by the session: True if ``seq`` will not run, False if the engine has already started it."""
        with self._lock:
            if self._started.value >= seq:
                return False
            self._withdrawn[seq % PIPELINE_DEPTH] = seq
            return True


class _Inbox:
    """Reads the request pipe on a thread of its own, so the server's next hand-over never waits on this
    engine finishing its current operation (and a large request cannot deadlock against a large reply)."""

    def __init__(self, conn):
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._read, args=(conn,), name="engine-inbox", daemon=True).start()

    def _read(self, conn) -> None:
        while True:
            try:
                item = conn.recv()
            except (EOFError, OSError):  # the server went away
                item = None
            self._items.put(item)
            if item is None:
                return

    def get(self):
        return self._items.get()


def _child(requests, replies, spec: SlotSpec, home: str, busy_engines, gate: StartGate) -> None:
    # Before any key is read: no core dump of this process (it holds the tenant's KEKs), and it dies with
    # the server, even one killed with SIGKILL (hardening.py).
    from tensafe_trainer.cli.hardening import die_with_parent, disable_core_dumps

    disable_core_dumps()
    die_with_parent(multiprocessing.parent_process().pid)
    private = spec.private
    try:
        threads = _ThreadShare(busy_engines)
        runtime = _build(spec, Path(home))
    except Exception as exc:  # noqa: BLE001 - reported to the session, which fails every caller
        replies.send(("failed", wire_error(exc, private=private)))
        return
    replies.send(("ready", _summary(runtime)))

    def answer(seq: int, **outcome) -> None:
        replies.send(Reply(seq, _summary(runtime), time.time(), **outcome))

    inbox = _Inbox(requests)
    while (item := inbox.get()) is not None:
        seq, request = item
        if not gate.start(seq):
            answer(seq, withdrawn=True)
            continue
        try:
            with threads.working():
                outcome = runtime.execute(request)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the operation's error
            if not isinstance(exc, TGTinkerError) and request.type in ACCUMULATING:
                runtime.engine.discard_gradients()  # a half-accumulated batch must not reach optim_step
            answer(seq, error=wire_error(exc, request.type, private))
            continue
        dp = getattr(outcome.result, "dp_metrics", None)
        answer(seq, result=outcome.result.model_dump(mode="json"), produced=outcome.produced,
               consumed=outcome.consumed, dp_metrics=dp.model_dump(mode="json") if dp is not None else None,
               receipt_claims=outcome.receipt_claims)


def wire_error(exc: BaseException, operation: str = "start-up", private: bool = False) -> dict:
    """The error the caller gets. The log gets the traceback, but of a DP client's failure only the type: a
    message or a traceback's locals can quote the private batch (a length, a token id, a shape)."""
    if isinstance(exc, TGTinkerError):
        return exc.to_wire()
    if private:
        log.error("%s of a DP client failed: %s (message withheld from the log)", operation, type(exc).__name__)
    else:
        log.error("%s failed:\n%s", operation, traceback.format_exc())
    return TrainingClientError(
        f"{operation} failed inside the trainer ({type(exc).__name__}: {exc})"
        + ("; the current logical batch's gradients were discarded" if operation in ACCUMULATING else ""),
        {"operation": operation}).to_wire()


def busy_counter():
    """A counter shared by every engine of this server: how many are executing an operation."""
    return _mp_context().Value("i", 0)


class EngineProcess:
    """One slot's engine in a child process. One thread (the session's worker) hands over operations and
    takes their replies, in order; ``withdraw`` may be called from any thread."""

    def __init__(self, spec: SlotSpec, home: Path, busy_engines=None):
        ctx = _mp_context()
        busy = busy_engines if busy_engines is not None else busy_counter()
        self._gate = StartGate(ctx)
        requests_out, self._requests = ctx.Pipe(duplex=False)
        self._replies, replies_in = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_child, args=(requests_out, replies_in, spec, str(home), busy, self._gate),
                                   daemon=True, name=f"engine-{spec.client_id}")
        self.process.start()
        requests_out.close()
        replies_in.close()
        self.summary = SlotSummary()
        message = self._receive("start-up")
        if message[0] == "failed":
            self.close()
            raise error_from_wire(message[1])
        self.summary = message[1]

    def _receive(self, what: str):
        try:
            return self._replies.recv()
        except (EOFError, OSError):
            code = self.process.exitcode
            if code is None:
                self.process.join(timeout=5)
                code = self.process.exitcode
            raise TrainingClientError(
                f"the engine process died during {what} (exit code {code}); this client must be restarted "
                "from its last checkpoint", {"exit_code": code}) from None

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    @property
    def exit_code(self) -> Optional[int]:
        return self.process.exitcode

    def hand_over(self, seq: int, request: Any) -> None:
        """Queue ``request`` as operation ``seq`` (numbered from 0, in order) behind those handed over before."""
        try:
            self._requests.send((seq, request))
        except (BrokenPipeError, OSError):
            pass  # the engine is gone: the next reply() says how

    def withdraw(self, seq: int) -> bool:
        """Stop a handed-over operation from starting; False if it already has. Its reply still comes."""
        return self._gate.withdraw(seq)

    def reply(self, what: str) -> Reply:
        """The reply to the oldest operation handed over and not yet answered (``what``: its type)."""
        reply: Reply = self._receive(what)
        self.summary = reply.summary
        return reply

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self._requests.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self._requests.close()
        self._replies.close()
