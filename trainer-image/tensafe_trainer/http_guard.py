"""Connection-level limits uvicorn lacks: a deadline for a request's headers.

uvicorn's h11 protocol limits a request head to ``h11_max_incomplete_event_size`` bytes and closes an
idle keep-alive connection after ``timeout_keep_alive``, but a connection that opens and sends nothing,
or trickles its headers a byte at a time, is held for ever. This protocol gives every request head
``HEADER_TIMEOUT_S`` from its first byte (or from the connection's start) to be complete.
"""

from __future__ import annotations

import asyncio
from typing import Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0
MAX_HEADER_BYTES = 64 << 10  # the whole request head: request line and headers


class GuardedH11Protocol(H11Protocol):
    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: Optional[asyncio.TimerHandle] = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        waiting_for_head = self.conn.their_state is h11.IDLE
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # still no complete head (or the next one has begun)
            if waiting_for_head or data:
                self._arm()
        else:
            self._disarm()

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
