"""The door every request passes: who it is from, decided from the headers before a byte of the body is
read, then the body read and counted against what that caller may send.

Why an ASGI middleware and not a FastAPI dependency: FastAPI reads and parses a request's body before it
resolves the endpoint's dependencies, so an unauthenticated 64 MiB body used to be read, parsed and held
in memory on the event loop before its 401. Here an unknown caller is refused at once, a declared
``Content-Length`` over the caller's limit is refused unread, and a chunked body is counted as it
arrives and refused the moment it passes the limit.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import Any, Callable, Optional

from tg_tinker.errors import (AuthenticationError, RequestTimeoutError, RequestTooLargeError, ResourceExhaustedError,
                              TGTinkerError)

from tensafe_trainer.service.errors import answer, on_tinker_wire
from tensafe_trainer.service.tokens import resolve

BODY_IDLE_S = 10.0  # the most a request body may pause between pieces
BODY_DEADLINE_S = 120.0  # and the most it may take in all (64 MiB at ~0.5 MB/s)
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and counters: no token, nothing private
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
REFUSAL_DELAY_S = 1.0  # a refusal that leaves a body unread is answered this late (see Gate.refuse)
MAX_DELAYED = 64  # refusals held back at once; past that they are answered at once
# What a malformed or hostile request earns: a 404 or 410 too (an id probe, a body naming nothing the caller has, or
# what it no longer has), 405 (a body to a route that takes none), 409 (work for a client in ERROR). A 5xx is the
# server's fault, never charged to the caller.
REFUSED_STATUSES = frozenset({400, 401, 403, 404, 405, 408, 409, 410, 413, 422})
STILL_PENDING = (b"x-tensafe-pending", b"1")  # a long-poll's 408 "try again" (the Tinker wire's): not a refusal
REFUSALS_BURST, REFUSALS_PER_S = 16, 2.0  # a client token may earn 16 refusals at once, then two a second
REFUSAL_BYTES = 1 << 20  # a refusal costs one more for every MiB read before it was decided


class RefusalBudget:
    """How often each client's token may be refused before its bodies are refused unread.

    Refusing costs the server what it read and parsed to decide (measured: 13-34 ms of CPU for a client's
    oversized chunked body or a 400 KB batch of too many rows), so a token that keeps sending what is
    refused would keep the trainer busy for free. Each client instance has a bucket of ``burst``
    refusals, refilled at ``per_s``, a refusal costing one and one more per REFUSAL_BYTES the server read to
    decide it (a 10 MB body naming no model, read and then refused, costs 10); once it is empty, that
    token's requests with a body are answered 429
    at the door, before a byte is read, until the bucket refills. Requests without a body (polls,
    listings) still pass, so the client can collect what it already queued. The trainer's own token is
    not metered; unauthenticated requests are refused from their headers alone and cost nothing to refuse.
    """

    def __init__(self, burst: int = REFUSALS_BURST, per_s: float = REFUSALS_PER_S,
                 clock: Callable[[], float] = time.monotonic):
        self.burst, self.per_s, self.clock = burst, per_s, clock
        self._level: "weakref.WeakKeyDictionary[Any, tuple[float, float]]" = weakref.WeakKeyDictionary()

    def _now_level(self, session) -> float:
        level, at = self._level.get(session, (float(self.burst), self.clock()))
        return min(float(self.burst), level + (self.clock() - at) * self.per_s)

    def wait_s(self, session) -> float:
        """0 if this client may send a body now; else how long until it may."""
        level = self._now_level(session)
        return 0.0 if level >= 1 else (1 - level) / self.per_s

    def charge(self, session, read_bytes: int = 0) -> None:
        self._level[session] = (self._now_level(session) - 1 - read_bytes // REFUSAL_BYTES, self.clock())


class Gate:
    """``limit_for(principal, path)``: the most body bytes that caller may send in one request to that path."""

    def __init__(self, app, admin_token: Optional[str], limit_for: Callable[[Any, str], int],
                 open_docs: bool = False, refusals: Optional[RefusalBudget] = None, tinker_keys=None):
        self.app, self.admin_token, self.limit_for = app, admin_token, limit_for
        self.tinker_keys = tinker_keys  # the Tinker wire (/api/v1) authenticates by X-API-Key: service/tinker/keys.py
        self.open_paths = OPEN_PATHS | (DOC_PATHS if open_docs else frozenset())
        self.refusals = refusals or RefusalBudget()
        self.delayed = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        has_body = declared not in (None, b"0") or b"transfer-encoding" in headers
        if scope["path"] in self.open_paths:
            if has_body:
                # Open to anyone, so no body: one held open would tie up a connection for free.
                return await self.refuse(RequestTooLargeError(f"{scope['path']} takes no request body",
                                                              {"max_request_bytes": 0}), has_body, scope, receive, send)
            return await self.app(scope, receive, send)
        try:
            state = getattr(scope["app"].state, "tensafe", None)
            if on_tinker_wire(scope["path"]):  # a tenant's Tinker key, metered like a client's token
                if self.tinker_keys is None:
                    raise AuthenticationError("this trainer does not serve the Tinker API")
                principal = self.tinker_keys.resolve(headers.get(b"x-api-key", b"").decode("latin-1"))
            else:
                principal = resolve(state, self.admin_token, headers.get(b"authorization", b"").decode("latin-1"))
            metered, read = principal.meter, [0]
            if metered is not None:
                send = self._metering(metered, send, read)
                wait = self.refusals.wait_s(metered)
                if wait and has_body:
                    raise ResourceExhaustedError(
                        f"this client's requests were refused too often (more than {self.refusals.burst}, then "
                        f"{self.refusals.per_s:g} a second): requests with a body are refused unread for "
                        f"{wait:.1f}s more", {"retry_after_s": round(wait, 1)})
            limit = self.limit_for(principal, scope["path"])
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                raise _too_large(limit)
            body = await _read_body(receive, limit, read)
        except TGTinkerError as error:
            return await self.refuse(error, has_body, scope, receive, send)
        return await self.app(scope, _replay(body, receive), send)  # the app asks again (see authenticate)

    async def refuse(self, error: TGTinkerError, has_body: bool, scope, receive, send) -> None:
        """Answer ``error`` and close. A refusal that leaves a body unread waits REFUSAL_DELAY_S first: while
        it waits nothing reads the socket, so TCP flow control stops the sender at no cost to us. Answered
        at once, a sender of oversized bodies would reconnect and push megabytes into the server's socket
        buffers dozens of times a second (measured: 80 such requests a second cost the legitimate clients
        20% of their throughput on 2 cores, though each took the server 0.5 ms to refuse)."""
        if has_body and self.delayed < MAX_DELAYED:
            self.delayed += 1
            try:
                await asyncio.sleep(REFUSAL_DELAY_S)
            finally:
                self.delayed -= 1
        await _refuse(error, scope, receive, send)

    def _metering(self, session, send, read: list[int]):
        """``send``, charging the client's refusal budget when its answer is a refusal (``read[0]``: the body
        bytes read for it)."""
        async def metered(message):
            if message["type"] == "http.response.start" and message["status"] in REFUSED_STATUSES \
                    and STILL_PENDING not in message.get("headers", ()):
                self.refusals.charge(session, read[0])
            await send(message)

        return metered


def _too_large(limit: int) -> RequestTooLargeError:
    return RequestTooLargeError(f"request body larger than {limit} bytes, the most this caller may send",
                                {"max_request_bytes": limit})


async def _read_body(receive, limit: int, read: list[int]) -> bytes:
    """The whole body, counted as it arrives: refused past ``limit``, when a piece takes longer than
    BODY_IDLE_S or the whole longer than BODY_DEADLINE_S (a trickled body would hold its connection and
    its bytes for ever). Chunks too small to be worth parsing are refused earlier, by http_guard."""
    chunks, size = [], 0
    deadline = asyncio.get_running_loop().time() + BODY_DEADLINE_S
    while True:
        left = min(BODY_IDLE_S, deadline - asyncio.get_running_loop().time())
        try:
            message = await asyncio.wait_for(receive(), timeout=max(left, 0.001))
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"the request body did not arrive in time (at most {BODY_IDLE_S:.0f}s between "
                                      f"pieces, {BODY_DEADLINE_S:.0f}s in all)") from None
        if message["type"] == "http.disconnect":
            raise TGTinkerError("the client went away while sending its request")
        chunk = message.get("body", b"")
        size += len(chunk)
        read[0] = size
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: only http.disconnect is left to hear

    return replayed


async def _refuse(error: TGTinkerError, scope, receive, send) -> None:
    headers = {"connection": "close"}  # an unread body stays unread: this connection is done
    if isinstance(error, AuthenticationError):
        headers["www-authenticate"] = "Bearer"
    if "retry_after_s" in error.details:
        headers["retry-after"] = str(max(1, round(error.details["retry_after_s"] + 0.5)))
    await answer(error, scope["path"], headers)(scope, receive, send)
