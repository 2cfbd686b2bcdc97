"""Each client's engine runs in a process of its own, fed over a pipe by the session's worker.

Why a process and not a thread: the engine holds the GIL for most of every step (Python-level model
code), and on a small machine the HTTP server's request handling then stalls the engine and vice
versa (measured: -20% tokens/s with both in one interpreter). A separate process also means an
engine crash (a CUDA fault, an OOM kill) fails that client's operations cleanly while the server
keeps serving everyone else.

Children are spawned, not forked: a fresh interpreter has no inherited threads or allocator state
(measured: forkserver children with torch preloaded trained ~15% slower here), at the price of a
few seconds of imports per client.
"""

from __future__ import annotations

import logging
import multiprocessing
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tg_tinker.errors import TGTinkerError, TrainingClientError, error_from_wire

log = logging.getLogger("tensafe.engine")

_context = None


def _mp_context():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("spawn")
    return _context


@dataclass
class Reply:
    ok: bool
    result: Optional[dict]
    error: Optional[dict]
    produced: list[str]
    consumed: list[str]
    dp_metrics: Optional[dict]
    summary: dict


def _summary(runtime) -> dict:
    return {"step": runtime.engine.step, "total_epsilon": runtime.engine.total_epsilon,
            "last_checkpoint": runtime.last_checkpoint, "resumed_from": runtime.resumed_from}


def _build(spec: dict, home: Path):
    from .artifacts import ArtifactStore
    from .keys import LocalKeyProvider
    from .paths import keys_dir
    from .operations import Runtime

    from tg_tinker.config import TrainingConfig

    store = ArtifactStore(home / "artifacts", LocalKeyProvider(keys_dir(home)))
    if spec["kind"] == "training":
        runtime = Runtime.for_training(spec["client_id"], spec["tenant_id"], TrainingConfig.parse(spec["config"]),
                                       store)
        if spec.get("resume_from"):
            runtime.resume(spec["resume_from"])
        return runtime
    return Runtime.for_sampling(spec["client_id"], spec["tenant_id"], store, artifact_id=spec.get("artifact_id"),
                                base_model=spec.get("base_model"))


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

    def adjust(self) -> None:
        wanted = max(1, self.cores // max(1, self._busy.value))
        if wanted != self._current:
            self._torch.set_num_threads(wanted)
            self._current = wanted


def _child(conn, spec: dict, home: str, busy_engines) -> None:
    try:
        threads = _ThreadShare(busy_engines)
        runtime = _build(spec, Path(home))
    except Exception as exc:  # noqa: BLE001 - reported to the session, which fails every caller
        conn.send(("failed", _wire(exc)))
        return
    conn.send(("ready", _summary(runtime)))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):  # the server went away
            return
        if request is None:
            return
        threads.adjust()
        try:
            outcome = runtime.execute(request)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the operation's error
            if not isinstance(exc, TGTinkerError):
                runtime.engine.discard_gradients()
            conn.send(Reply(False, None, _wire(exc, request.type), [], [], None, _summary(runtime)))
            continue
        dp = getattr(outcome.result, "dp_metrics", None)
        conn.send(Reply(True, outcome.result.model_dump(mode="json"), None, outcome.produced, outcome.consumed,
                        dp.model_dump(mode="json") if dp is not None else None, _summary(runtime)))


def _wire(exc: BaseException, operation: str = "start-up") -> dict:
    if isinstance(exc, TGTinkerError):
        return exc.to_wire()
    log.error("%s failed:\n%s", operation, traceback.format_exc())
    return TrainingClientError(
        f"{operation} failed inside the trainer ({type(exc).__name__}: {exc}); the current logical batch's "
        "gradients were discarded", {"operation": operation}).to_wire()


def busy_counter():
    """A counter shared by every engine of this server: how many are executing an operation."""
    return _mp_context().Value("i", 0)


class EngineProcess:
    """A client's engine in a child process. ``execute`` is called from one thread at a time."""

    def __init__(self, spec: dict[str, Any], home: Path, busy_engines=None):
        ctx = _mp_context()
        self._busy = busy_engines if busy_engines is not None else busy_counter()
        self._conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_child, args=(child_conn, spec, str(home), self._busy), daemon=True,
                                   name=f"engine-{spec['client_id']}")
        self.process.start()
        child_conn.close()
        self.summary: dict = {"step": 0, "total_epsilon": None, "last_checkpoint": None}
        message = self._receive("start-up")
        if message[0] == "failed":
            self.close()
            raise error_from_wire(message[1])
        self.summary = message[1]

    def _receive(self, what: str):
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            code = self.process.exitcode
            if code is None:
                self.process.join(timeout=5)
                code = self.process.exitcode
            raise TrainingClientError(
                f"the engine process died during {what} (exit code {code}); this client must be restarted "
                "from its last checkpoint", {"exit_code": code}) from None

    def execute(self, request: Any) -> Reply:
        with self._busy.get_lock():
            self._busy.value += 1
        try:
            try:
                self._conn.send(request)
            except (BrokenPipeError, OSError):
                self._receive(request.type)  # raises with the exit code
            reply: Reply = self._receive(request.type)
        finally:
            with self._busy.get_lock():
                self._busy.value -= 1
        self.summary = reply.summary
        return reply

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self._conn.close()
