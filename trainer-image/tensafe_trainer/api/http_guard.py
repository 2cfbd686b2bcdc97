"""Connection-level limits uvicorn lacks: a deadline for a request's headers.

uvicorn's h11 protocol limits a request head to ``h11_max_incomplete_event_size`` bytes and closes an
idle keep-alive connection after ``timeout_keep_alive``, but a connection that opens and sends nothing,
or trickles its headers a byte at a time, is held for ever. This protocol gives every request head
``HEADER_TIMEOUT_S`` from its first byte (or from the connection's start) to be complete, counts the
whole head against ``MAX_HEADER_BYTES``, and closes a connection whose chunked body comes in chunks so
small that h11's per-chunk parsing would hold the event loop (measured by the attacker review: 1-byte
chunks stalled /healthz for 1.4-2.3 s at a time).
"""

from __future__ import annotations

import asyncio
from typing import Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0
MAX_HEADER_BYTES = 64 << 10  # the whole request head: request line and headers
MAX_SMALL_CHUNKS, MIN_CHUNK_BYTES = 4096, 256  # past 4,096 chunk lines, chunks must average 256 bytes


class GuardedH11Protocol(H11Protocol):
    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: Optional[asyncio.TimerHandle] = None
        self._head = bytearray()
        self._body_bytes = self._body_lines = 0
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            # h11 bounds only what one incomplete read buffers: the whole head is checked here.
            self._head += data
            if len(self._head) > MAX_HEADER_BYTES + 4 and b"\r\n\r\n" not in self._head[:MAX_HEADER_BYTES + 4]:
                self.transport.close()
                return
        elif self.conn.their_state is h11.SEND_BODY:
            # A chunked body in tiny chunks costs h11 a parse per chunk on the event loop: refuse that.
            self._body_bytes += len(data)
            self._body_lines += data.count(b"\r\n")
            if self._body_lines > MAX_SMALL_CHUNKS and self._body_lines * MIN_CHUNK_BYTES > self._body_bytes:
                self.transport.close()
                return
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # still no complete head (or the next one has begun)
            self._arm()
        else:
            self._head.clear()
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._head.clear()
        self._body_bytes = self._body_lines = 0
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0] and not self.transport.is_closing():
            self._arm()  # the next head began before this response ended: it gets the same deadline

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._head_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _head_too_slow(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete) \
                and not self.transport.is_closing():
            self.transport.close()
