"""A model host runs in a process of its own; each client on it is a slot there, fed over the host's pipe by the
client's session worker.

Why a process and not a thread: the engine holds the GIL for most of every step (Python-level model
code), and on a small machine the HTTP server's request handling then stalls the engine and vice
versa (measured: -20% tokens/s with both in one interpreter). A separate process also means an
engine crash (a CUDA fault, an OOM kill) fails its host's clients' operations cleanly while the server
keeps serving everyone else.

Several LoRA clients of one base model share a host process (engine/host.py, service/hosts.py): one copy of
the model, and the process runs their operations one at a time, taking the tenants, and each tenant's clients, with
work in turn, so neither a client with a deep queue nor a tenant with many clients starves the others. A host
process that crashes fails each of its clients.

Children are spawned, not forked: a fresh interpreter has no inherited threads or allocator state
(measured: forkserver children with torch preloaded trained ~15% slower here), at the price of a
few seconds of imports per host.

The session hands over the next operation while the current one runs (``PIPELINE_DEPTH``), so the
engine goes from one operation to the next without waiting on the server (measured: about 1.2 ms
per operation otherwise). An operation handed over but not started can still be withdrawn: the
``StartGates`` decide, atomically for both processes, whether it starts or is skipped.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import multiprocessing
import os
import queue
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from tg_tinker.errors import TGTinkerError, TrainingClientError, error_from_wire
from tg_tinker.operations import ACCUMULATING

from tensafe_trainer.engine.protocol import Reply, SlotSpec, SlotSummary

log = logging.getLogger("tensafe.engine")

PIPELINE_DEPTH = 2  # operations handed to an engine at once: the running one and the next
DETACH_WAIT_S = 120.0  # how long a client that ends waits for its host to let it go (the host's current operation)
TIMED_OUT = object()  # HostProcess.receive: no message within the timeout
SHARED_PASS_OPS = frozenset({"forward_backward"})  # what several slots' operations may run in one pass
MAX_SHARED_PASS = 8  # slots in one pass at most
# Tokens in one shared pass on a CPU: past about this many, a pass runs slower per token than smaller ones (its
# activations and logits leave the caches; measured with 4 x 64-token batches on the tiny Llama: 2 or 4 slots a pass
# 0.39 s per 8 batches, 8 slots 0.43-0.47 s). A GPU takes as many as the memory budget allows.
CPU_SHARED_PASS_TOKENS = 1024
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


def _build(spec: SlotSpec, home: Path, host):
    from tensafe_trainer.storage.artifacts import ArtifactStore
    from tensafe_trainer.storage.paths import key_provider, ledger_dir
    from tensafe_trainer.engine.operations import Runtime

    store = ArtifactStore(home / "artifacts", key_provider(home))
    if spec.kind == "training":
        runtime = Runtime.for_training(spec.client_id, spec.tenant_id, spec.config, store, ledger_dir(home),
                                       host=host)
        if spec.resume_from:
            runtime.resume(spec.resume_from)
        return runtime
    return Runtime.for_sampling(spec.client_id, spec.tenant_id, store, artifact_id=spec.artifact_id,
                                base_model=spec.base_model, host=host)


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


class StartGates:
    """Whether a handed-over operation starts or is withdrawn: decided once per operation, under a lock both
    processes share, for each of a host's slots (by its index).

    Sequence numbers count the operations handed to one slot. At most ``PIPELINE_DEPTH`` are outstanding,
    so a ring of that many entries per slot holds every withdrawal that can still matter."""

    def __init__(self, ctx, capacity: int):
        self._lock = ctx.Lock()
        self._started = ctx.RawArray("q", [-1] * capacity)
        self._withdrawn = ctx.RawArray("q", [-1] * (capacity * PIPELINE_DEPTH))

    def reset(self, index: int) -> None:
        """A slot index taken by a new client: its numbering starts again."""
        with self._lock:
            self._started[index] = -1
            for i in range(PIPELINE_DEPTH):
                self._withdrawn[index * PIPELINE_DEPTH + i] = -1

    def start(self, index: int, seq: int) -> bool:
        """Called by the host before it runs ``seq`` of slot ``index``: False if it was withdrawn."""
        with self._lock:
            if self._withdrawn[index * PIPELINE_DEPTH + seq % PIPELINE_DEPTH] == seq:
                return False
            self._started[index] = seq
            return True

    def withdraw(self, index: int, seq: int) -> bool:
        """Called by the session: True if ``seq`` will not run, False if the host has already started it."""
        with self._lock:
            if self._started[index] >= seq:
                return False
            self._withdrawn[index * PIPELINE_DEPTH + seq % PIPELINE_DEPTH] = seq
            return True


class _Inbox:
    """Reads the request pipe on a thread of its own, so the server's next hand-over never waits on this
    host finishing its current operation (and a large request cannot deadlock against a large reply)."""

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

    def get(self, block: bool = True):
        """The next item; with ``block`` False, ``_EMPTY`` if none has come."""
        try:
            return self._items.get(block=block)
        except queue.Empty:
            return _EMPTY


_EMPTY = object()


class _HostLoop:
    """The host process's side: its slots (one Runtime each, on one ModelHost), each with its queue of handed-over
    operations, run one at a time. Whose turn it is: the tenant served longest ago, and of its slots the one served
    longest ago (a tenant with many clients on a shared host gets a turn as often as one with one client)."""

    def __init__(self, replies, home: Path, busy_engines, gates: StartGates):
        self.replies, self.home, self.gates = replies, home, gates
        self.threads = _ThreadShare(busy_engines)
        self.host = None  # the ModelHost, from the first slot
        self.slots: dict[int, tuple[SlotSpec, object]] = {}
        self.queues: dict[int, collections.deque] = {}
        self._clock = itertools.count(1)
        self._answered: set[tuple[int, int]] = set()  # of the operations run_next took
        self._served: dict[int, int] = {}  # slot -> when it was last served
        self._tenant_served: dict[str, int] = {}

    @property
    def has_work(self) -> bool:
        return any(self.queues.values())

    def _in_turn(self) -> list[int]:
        """The slots with work, in the order they are owed a turn."""
        waiting = [i for i, operations in self.queues.items() if operations]
        return sorted(waiting, key=lambda i: (self._tenant_served.get(self.slots[i][0].tenant_id, 0),
                                              self._served.get(i, 0), i))

    def _mark_served(self, indices: list[int]) -> None:
        now = next(self._clock)
        for i in indices:
            self._served[i] = now
            self._tenant_served[self.slots[i][0].tenant_id] = now

    def send(self, index: int, payload) -> None:
        self.replies.send((index, payload))

    def take(self, item) -> None:
        """One message of the server: attach a slot, detach one, or an operation for one."""
        kind, index = item[0], item[1]
        if kind == "attach":
            self.attach(index, item[2])
        elif kind == "detach":
            self.detach(index)
        else:
            self.queues[index].append(item[2:])

    def attach(self, index: int, spec: SlotSpec) -> None:
        try:
            if self.host is None and spec.host_config is not None:
                from tensafe_trainer.engine.host import ModelHost

                self.host = ModelHost.for_config(spec.host_config)
            runtime = _build(spec, self.home, self.host)
            ready = ("ready", _summary(runtime))
        except Exception as exc:  # noqa: BLE001 - reported to the session, which fails every caller; the host goes on
            self.send(index, ("failed", wire_error(exc, private=spec.private)))
            return
        self.slots[index] = (spec, runtime)
        self.queues[index] = collections.deque()
        self.send(index, ready)

    def detach(self, index: int) -> None:
        _, runtime = self.slots.pop(index, (None, None))
        self.queues.pop(index, None)
        self._served.pop(index, None)
        if runtime is not None:
            try:
                runtime.close()
            except Exception:  # noqa: BLE001 - the slot is gone either way; the host goes on for the others
                log.exception("closing a slot failed")
        self.send(index, ("detached",))

    def run_next(self) -> None:
        """Run the oldest operation of the slot whose turn it is, with those of other slots that can share its pass,
        and answer them."""
        self._answered = set()
        index, *others = self._in_turn()
        chosen = [index, *self._companions(index, others)]
        self._mark_served(chosen)
        jobs = []
        for i in chosen:
            seq, request = self.queues[i].popleft()
            if self.gates.start(i, seq):
                jobs.append((i, seq, request))
            else:
                self._answer(i, seq, withdrawn=True)
        try:
            with self.threads.working():
                if len(jobs) > 1:
                    self._run_shared(jobs)
                elif jobs:
                    self._run_alone(*jobs[0])
        except Exception as exc:  # noqa: BLE001 - a bug here must fail these operations, not the host's other slots
            for index, seq, request in jobs:
                if (index, seq) not in self._answered:
                    self._answer(index, seq, error=wire_error(exc, request.type, self.slots[index][0].private))

    def _shareable(self, index: int) -> bool:
        _, request = self.queues[index][0]
        runtime = self.slots[index][1]
        return request.type in SHARED_PASS_OPS and runtime.kind == "training" and runtime.engine.shares_passes

    def _companions(self, index: int, others: list[int]) -> list[int]:
        """Of ``others`` (in the order they are owed a turn), those whose next operation can join ``index``'s in one
        pass, as many as fit in one request's memory budget (and on a CPU, ``CPU_SHARED_PASS_TOKENS``), at most
        ``MAX_SHARED_PASS`` in all."""
        if not self._shareable(index):
            return []
        from tensafe_trainer.engine.memory import request_memory_budget

        engine = self.slots[index][1].engine
        tokens = CPU_SHARED_PASS_TOKENS if engine.device.type == "cpu" else None
        # At most one DP part a pass: each holds per-example gradients, which the pass's budget does not count.
        private = self.slots[index][0].private
        rows, width = self.queues[index][0][1].batch.shape
        chosen = []
        for other in others:
            if len(chosen) + 1 >= MAX_SHARED_PASS:
                break
            if not self._shareable(other) or (private and self.slots[other][0].private):
                continue
            more, wider = self.queues[other][0][1].batch.shape
            if tokens is not None and (rows + more) * max(width, wider) > tokens:
                continue
            if engine.training_pass_bytes(rows + more, max(width, wider)) > request_memory_budget():
                continue
            rows, width = rows + more, max(width, wider)
            private = private or self.slots[other][0].private
            chosen.append(other)
        return chosen

    def _answer(self, index: int, seq: int, **outcome) -> None:
        self.send(index, Reply(seq, _summary(self.slots[index][1]), time.time(), **outcome))
        self._answered.add((index, seq))

    def _succeed(self, index: int, seq: int, outcome, shared_pass: bool = False) -> None:
        dp = getattr(outcome.result, "dp_metrics", None)
        self._answer(index, seq, result=outcome.result.model_dump(mode="json"), produced=outcome.produced,
                     consumed=outcome.consumed, dp_metrics=dp.model_dump(mode="json") if dp is not None else None,
                     receipt_claims=outcome.receipt_claims, shared_pass=shared_pass)

    def _fail(self, index: int, seq: int, request, exc: BaseException) -> None:
        spec, runtime = self.slots[index]
        if not isinstance(exc, TGTinkerError) and request.type in ACCUMULATING:
            runtime.engine.discard_gradients()  # a half-accumulated batch must not reach optim_step
        self._answer(index, seq, error=wire_error(exc, request.type, spec.private))

    def _run_alone(self, index: int, seq: int, request) -> None:
        try:
            outcome = self.slots[index][1].execute(request)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the operation's error
            self._fail(index, seq, request, exc)
            return
        self._succeed(index, seq, outcome)

    def _run_shared(self, jobs: list[tuple[int, int, Any]]) -> None:
        """Several slots' forward_backward operations in one pass (engine/passes.py)."""
        from tensafe_trainer.engine.operations import Outcome
        from tensafe_trainer.engine.passes import forward_backward_pass

        parts = []
        for index, seq, request in jobs:
            try:
                parts.append((index, seq, request, self.slots[index][1].engine.begin_client_batch(request.batch,
                                                                                                  request)))
            except Exception as exc:  # noqa: BLE001 - that operation's own error; the others go on
                self._fail(index, seq, request, exc)
        if len(parts) < 2:
            for index, seq, request, _ in parts:
                self._run_alone(index, seq, request)
            return
        try:
            outcomes = forward_backward_pass([part for *_, part in parts])
        except Exception as exc:  # noqa: BLE001 - not one part's own failure: each runs again, alone
            log.warning("a shared pass of %d slots failed (%s): each runs alone", len(parts), type(exc).__name__)
            for index, seq, request, part in parts:
                part.slot.forget_pass()
                self._run_alone(index, seq, request)
            return
        # Counted as shared (tensafe_shared_pass_operations_total) only where no DP client's part was in the pass:
        # the count would otherwise say when a DP client's forward_backward was ready.
        shared = not any(self.slots[index][0].private for index, *_ in parts)
        for (index, seq, request, _), outcome in zip(parts, outcomes):
            if isinstance(outcome, BaseException):
                self._fail(index, seq, request, outcome)
            else:
                self._succeed(index, seq, Outcome(outcome), shared_pass=shared)


def _child(requests, replies, home: str, busy_engines, gates: StartGates) -> None:
    # Before any key is read: no core dump of this process (it holds the tenants' KEKs), and it dies with
    # the server, even one killed with SIGKILL (hardening.py).
    from tensafe_trainer.cli.hardening import die_with_parent, disable_core_dumps

    disable_core_dumps()
    die_with_parent(multiprocessing.parent_process().pid)
    loop = _HostLoop(replies, Path(home), busy_engines, gates)
    inbox = _Inbox(requests)
    while True:
        item = inbox.get(block=not loop.has_work)
        if item is None:
            return
        if item is not _EMPTY:
            loop.take(item)
            continue  # everything that has come first, then the next turn
        loop.run_next()


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


class HostProcess:
    """A model host in a child process, carrying up to ``capacity`` slots. Its clients' session workers hand
    over operations and take replies through their ``EngineSlot``. The replies share one pipe, read by whichever
    waiting worker gets to it first, which leaves the others' replies in their mailboxes: no thread of its own,
    so a single client's reply reaches its worker as directly as before hosts were shared."""

    def __init__(self, home: Path, capacity: int, busy_engines=None, name: str = "host",
                 on_release: Optional[Callable[["HostProcess"], None]] = None, key: Optional[tuple] = None):
        ctx = _mp_context()
        self.key = key  # what the pool keeps it for (service/hosts.py)
        self.on_release = on_release  # called after a slot has left
        # kept: the child unpickles these by name, and the parent's copy must outlive its start-up
        self.busy = busy = busy_engines if busy_engines is not None else busy_counter()
        self.capacity = capacity
        self.gates = StartGates(ctx, capacity)
        requests_out, self._requests = ctx.Pipe(duplex=False)
        self._replies, replies_in = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_child, args=(requests_out, replies_in, str(home), busy, self.gates),
                                   daemon=True, name=f"engine-{name}")
        self.process.start()
        requests_out.close()
        replies_in.close()
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # a reply was left in a mailbox, or the reader stopped
        self._mailboxes: dict[int, collections.deque] = {}
        self._reading = False  # a worker is reading the pipe
        self._free = list(range(capacity))
        self.closing = False
        self._dead = False

    @property
    def alive(self) -> bool:
        return not self._dead and self.process.is_alive()

    @property
    def exit_code(self) -> Optional[int]:
        return self.process.exitcode

    @property
    def attached(self) -> int:
        with self._lock:
            return self.capacity - len(self._free)

    @property
    def has_room(self) -> bool:
        with self._lock:
            return bool(self._free) and self.alive and not self.closing

    def send(self, message) -> None:
        try:
            with self._send_lock:
                self._requests.send(message)
        except (BrokenPipeError, OSError):
            pass  # the host is gone: the slot's next reply says how

    def reserve(self) -> int:
        """Take a free slot index (the pool does, under its lock, before it starts the slot with ``attach``)."""
        with self._lock:
            if not self._free:
                raise RuntimeError("this host has no free slot")  # the pool checks first: a bug, never input
            index = self._free.pop(0)
            self._mailboxes[index] = collections.deque()
        self.gates.reset(index)
        return index

    def attach(self, spec: SlotSpec, index: int) -> "EngineSlot":
        """Start ``spec``'s slot at a reserved index; returns when it is ready (or raises its start-up error)."""
        slot = EngineSlot(self, index, spec.client_id)
        self.send(("attach", index, spec))
        message = slot.receive("start-up")
        if message[0] == "failed":
            self.release(index)
            raise error_from_wire(message[1])
        slot.summary = message[1]
        return slot

    def receive(self, index: int, timeout: Optional[float] = None):
        """Slot ``index``'s next message, None once the process is gone, or ``TIMED_OUT`` after ``timeout`` seconds.
        The caller reads the pipe itself unless another worker is reading it, which then leaves this slot's message
        in its mailbox."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._arrived:
            while True:
                mailbox = self._mailboxes[index]
                if mailbox:
                    return mailbox.popleft()
                if self._dead:
                    return None
                if not self._reading:
                    self._reading = True
                    break
                if deadline is not None and deadline <= time.monotonic():
                    return TIMED_OUT
                self._arrived.wait(None if deadline is None else deadline - time.monotonic())
        try:
            while True:
                if deadline is not None and not self._replies.poll(max(0.0, deadline - time.monotonic())):
                    return TIMED_OUT
                try:
                    target, payload = self._replies.recv()
                except (EOFError, OSError):
                    with self._arrived:
                        self._dead = True
                    return None
                if target == index:
                    return payload
                with self._arrived:
                    mailbox = self._mailboxes.get(target)
                    if mailbox is not None:  # else a slot that has left: its late reply goes
                        mailbox.append(payload)
                        self._arrived.notify_all()
        finally:
            with self._arrived:
                self._reading = False
                self._arrived.notify_all()  # a waiting worker reads next

    def release(self, index: int) -> None:
        with self._lock:
            self._mailboxes.pop(index, None)
            self._free.append(index)
        if self.on_release is not None:
            self.on_release(self)

    def close(self) -> None:
        """End the process once its current operation is done (killed after a grace)."""
        self.closing = True
        if self.process.is_alive():
            self.send(None)
            self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self._requests.close()


class EngineSlot:
    """One client's slot on a host process. One thread (the session's worker) hands over operations and
    takes their replies, in order; ``withdraw`` may be called from any thread."""

    def __init__(self, host: HostProcess, index: int, client_id: str):
        self.host, self.index, self.client_id = host, index, client_id
        self.summary = SlotSummary()
        self._closed = False

    def receive(self, what: str):
        message = self.host.receive(self.index) if not self._closed else None
        if message is None:
            code = self.host.exit_code
            if code is None:
                self.host.process.join(timeout=5)
                code = self.host.exit_code
            raise TrainingClientError(
                f"the engine process died during {what} (exit code {code}); this client must be restarted "
                "from its last checkpoint", {"exit_code": code}) from None
        return message

    @property
    def alive(self) -> bool:
        return not self._closed and self.host.alive

    @property
    def exit_code(self) -> Optional[int]:
        return self.host.exit_code

    def hand_over(self, seq: int, request: Any) -> None:
        """Queue ``request`` as operation ``seq`` (numbered from 0, in order) behind those handed over before."""
        self.host.send(("run", self.index, seq, request))

    def withdraw(self, seq: int) -> bool:
        """Stop a handed-over operation from starting; False if it already has. Its reply still comes."""
        return self.host.gates.withdraw(self.index, seq)

    def reply(self, what: str) -> Reply:
        """The reply to the oldest operation handed over and not yet answered (``what``: its type)."""
        reply: Reply = self.receive(what)
        self.summary = reply.summary
        return reply

    def close(self) -> None:
        """Leave the host (its other slots go on); the host's pool decides when the process ends."""
        if self._closed:
            return
        if self.host.alive:
            self.host.send(("detach", self.index))
            while (message := self.host.receive(self.index, timeout=DETACH_WAIT_S)) not in (("detached",), None):
                if message is TIMED_OUT:  # the host is stuck in an operation: this client ends; its index stays taken
                    log.error("%s could not leave its host within %.0f s", self.client_id, DETACH_WAIT_S)
                    self._closed = True
                    return
                log.warning("%s left its host with a reply unread (%s)", self.client_id, type(message).__name__)
        self._closed = True
        self.host.release(self.index)


def slot_on_own_host(spec: SlotSpec, home: Path, busy_engines=None) -> EngineSlot:
    """A slot on a host process of its own, which ends when the slot leaves."""
    host = HostProcess(home, 1, busy_engines, name=spec.client_id, on_release=lambda h: h.close())
    return host.attach(spec, host.reserve())
