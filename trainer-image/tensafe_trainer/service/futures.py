"""The one future store of both doors: every future a caller can poll, found by id, bounded, with one
idempotency rule and one long-poll.

A future is a queued operation (``/v1``: ``sessions.Operation``) or a door's answer computed from
operations (the Tinker wire: a ``TaskFuture``). Each has an owner (the client, Tinker model, session or
sampler it was asked of) and may carry an idempotency key: ``/v1``'s ``idempotency_key``, the Tinker wire's
``(model_id, seq_id)``. The rule is the same for both doors:

- a key names one request: its retry (same digest) gets the first future, another request under it is
  refused (422);
- a key runs once for its owner's life: once its future is forgotten, a late retry is refused (422), never
  run again (under DP, an example counted twice would void the guarantee). What is remembered of a spent
  key is a 16-byte tag, dropped with its owner (``release``).

Kept: at most ``per_owner`` futures of any one owner, ``per_tenant`` of one tenant, ``capacity`` in all, none
finished longer ago than ``ttl_s``; only finished futures are forgotten, oldest first (a pending one does not
hold back those behind it), so one owner's flood pushes out only its own, and one tenant's another tenant's
only once more than capacity / per_tenant tenants are at their bound together.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import time
import uuid
from dataclasses import dataclass
from typing import Any, Coroutine, Hashable, Optional, Protocol

from tg_tinker.errors import ValidationError


class Pollable(Protocol):
    id: str
    finished_at: Optional[float]

    @property
    def finished(self) -> bool: ...

    def waiter(self) -> Optional[asyncio.Future]: ...


class TaskFuture:
    """A door's answer computed by a coroutine (which awaits the operations it queued)."""

    def __init__(self, work: Coroutine):
        self.id = f"req-{uuid.uuid4().hex}"
        self.created_at = time.time()
        self._finished_at: Optional[float] = None
        self.task = asyncio.ensure_future(work)
        self.task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._finished_at = self._finished_at or time.time()
        if not task.cancelled():
            task.exception()  # retrieved here: a failure is its poller's answer, not an "unretrieved" warning

    @property
    def finished_at(self) -> Optional[float]:
        """When it finished; read as soon as its task is done (its done callback may not have run yet: the store
        met such a future, and a request answered 500)."""
        if self._finished_at is None and self.task.done():
            self._finished_at = time.time()
        return self._finished_at

    @property
    def finished(self) -> bool:
        return self.task.done()

    def waiter(self) -> Optional[asyncio.Future]:
        return None if self.task.done() else self.task


async def long_poll(future: Pollable, wait: float) -> bool:
    """Wait up to ``wait`` seconds for ``future`` to finish (never cancelling it); whether it has."""
    waiter = future.waiter() if wait > 0 else None
    if waiter is not None:
        await asyncio.wait({waiter}, timeout=wait)
    return future.finished


@dataclass(eq=False)
class _Entry:
    future: Any
    owner: Hashable
    key: Optional[Hashable]
    tenant: Optional[str]
    gone: bool = False  # forgotten: dropped from the queues below when it reaches their head


class _Queue:
    """One owner's (or tenant's) entries in arrival order; ``live`` counts those not yet forgotten."""

    def __init__(self):
        self.entries: collections.deque[_Entry] = collections.deque()
        self.live = 0

    def oldest_finished(self) -> Optional[_Entry]:
        """The oldest finished entry among the first SCAN live ones: a pending one does not shield those behind
        it."""
        while self.entries and self.entries[0].gone:
            self.entries.popleft()
        live = (e for e in self.entries if not e.gone)
        return next((e for e in itertools.islice(live, SCAN) if e.future.finished), None)


SCAN = 64  # entries looked at past pending ones, per bound and per add


def _tag(key: Hashable) -> bytes:
    return hashlib.blake2b(repr(key).encode(), digest_size=16).digest()


class FutureStore:
    def __init__(self, capacity: int = 100_000, per_tenant: int = 20_000, per_owner: int = 2_000,
                 ttl_s: float = 3600.0):
        self.capacity, self.per_tenant, self.per_owner, self.ttl_s = capacity, per_tenant, per_owner, ttl_s
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._owners: dict[Hashable, _Queue] = {}
        self._tenants: dict[Optional[str], _Queue] = {}
        self._keys: dict[Hashable, dict[Hashable, tuple[str, bytes]]] = {}  # owner -> key -> (future id, digest)
        self._spent: dict[Hashable, set[bytes]] = {}  # owner -> tags of keys whose future was forgotten

    def claim(self, owner: Hashable, key: Optional[Hashable], digest: bytes) -> Optional[Pollable]:
        """The future ``owner`` already has under ``key`` for this same request (a retry), or None for a new
        request; refuses a key used for another request, or already spent."""
        if key is None:
            return None
        earlier = self._keys.get(owner, {}).get(key)
        if earlier is not None:
            future_id, first = earlier
            if first != digest:
                raise ValidationError("idempotency key reused for a different request: a key (a Tinker seq_id) "
                                      "names one request", {"idempotency_key": str(key)[:200],
                                                            "operation_id": future_id})
            return self._entries[future_id].future
        if _tag(key) in self._spent.get(owner, ()):
            raise ValidationError("this request already ran, and its result is no longer kept: a key (a Tinker "
                                  "seq_id) runs once", {"idempotency_key": str(key)[:200]})
        return None

    def add(self, future: Pollable, owner: Hashable, key: Optional[Hashable] = None,
            digest: bytes = b"") -> Pollable:
        """Keep ``future`` for polling (``claim`` first, with no await in between, where it has a key)."""
        entry = _Entry(future, owner, key, getattr(owner, "tenant_id", None))
        self._entries[future.id] = entry
        if key is not None:
            self._keys.setdefault(owner, {})[key] = (future.id, digest)
        for queues, name, bound in ((self._owners, owner, self.per_owner),
                                    (self._tenants, entry.tenant, self.per_tenant)):
            queue = queues.setdefault(name, _Queue())
            queue.entries.append(entry)
            queue.live += 1
            while queue.live > bound:
                oldest = queue.oldest_finished()
                if oldest is None:
                    break
                self._forget(oldest)
        now = time.time()
        for oldest in list(itertools.islice(self._entries.values(), SCAN)):
            if oldest.future.finished and (now - oldest.future.finished_at > self.ttl_s
                                           or len(self._entries) > self.capacity):
                self._forget(oldest)
        return future

    def get(self, future_id: str) -> tuple[Any, Hashable]:
        """(future, owner); KeyError for an id never given or already forgotten."""
        entry = self._entries[future_id]
        return entry.future, entry.owner

    def release(self, owner: Hashable) -> None:
        """``owner`` takes no more requests (its futures expire as usual): what is kept of its keys goes. Only for
        an owner that can never come back under the same name (its requests would find their keys unspent)."""
        self._keys.pop(owner, None)
        self._spent.pop(owner, None)

    def _forget(self, entry: _Entry) -> None:
        if entry.gone:
            return
        entry.gone = True
        del self._entries[entry.future.id]
        for queues, name in ((self._owners, entry.owner), (self._tenants, entry.tenant)):
            queue = queues[name]
            queue.live -= 1
            if not queue.live:
                del queues[name]
        keys = self._keys.get(entry.owner)
        if entry.key is not None and keys is not None and keys.get(entry.key, ("",))[0] == entry.future.id:
            del keys[entry.key]
            self._spent.setdefault(entry.owner, set()).add(_tag(entry.key))

    def __len__(self) -> int:
        return len(self._entries)
