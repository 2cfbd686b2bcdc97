"""Connections to trainers, kept open between the status mirror's rounds and operations.

A new connection costs an SSL context and a TLS handshake (milliseconds of CPU), and the mirror asks
every trainer for its state every few seconds: so one ``Transport`` per (URL, token, CA, certificate
name) is kept and reused. A new pod IP, rotated token or renewed CA is simply a new key; beyond
``max_open`` the least recently used are closed.
"""

from __future__ import annotations

import collections
import threading

from tg_tinker.resources import TrainerAccess
from tg_tinker.transport import Transport


class TrainerConnections:
    def __init__(self, max_open: int = 256):
        self.max_open = max_open
        self._lock = threading.Lock()
        self._open: collections.OrderedDict[tuple, Transport] = collections.OrderedDict()

    def get(self, access: TrainerAccess) -> Transport:
        key = (access.base_url, access.token, access.verify, access.server_name)
        with self._lock:
            transport = self._open.get(key)
            if transport is None:
                transport = self._open[key] = Transport(access.base_url, access.token, timeout=10.0, retries=1,
                                                        verify=access.verify, server_name=access.server_name)
            self._open.move_to_end(key)
            evicted = [self._open.popitem(last=False)[1] for _ in range(len(self._open) - self.max_open)]
        for old in evicted:
            old.close()
        return transport

    def __len__(self) -> int:
        return len(self._open)

    def close(self) -> None:
        with self._lock:
            transports, self._open = list(self._open.values()), collections.OrderedDict()
        for transport in transports:
            transport.close()
