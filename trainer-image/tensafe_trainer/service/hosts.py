"""Which host process a client's slot goes on: one host per (base model, dtype, device) and tenant, shared by that
tenant's LoRA clients up to the host's adapter capacity.

A sampler of a LoRA client's artifact goes on that client's host (its adapter a slot there). A client that trains
the base model's own weights (full fine-tuning, a LoRA bias), and a sampler of such weights or of a base model alone,
get a host of their own, which ends with them. A shared host that has no slot left stays warm for ``idle_s`` seconds, so
the next client of that model attaches without loading it; then it ends. Clients of different tenants share a
host only when the trainer is started with ``share_across_tenants`` (off by default): they then share a process,
and so its fate (a crash fails all of them) and its memory, though never an adapter, a gradient or a key.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import threading
from pathlib import Path
from typing import Any, Optional

from tg_tinker.errors import ValidationError

from tensafe_trainer.engine.host import HOST_MISMATCH, host_key, shares_host
from tensafe_trainer.engine.process import EngineSlot, HostProcess
from tensafe_trainer.engine.protocol import SlotSpec
from tensafe_trainer.service import metrics


class HostPool:
    def __init__(self, home: Path, busy_engines: Any, capacity: int, idle_s: float,
                 share_across_tenants: bool = False):
        if capacity < 1:
            raise ValueError("a host carries at least one adapter")
        self.home, self.busy_engines, self.capacity, self.idle_s = home, busy_engines, capacity, idle_s
        self.share_across_tenants = share_across_tenants
        self._lock = threading.Lock()
        # Host processes are started from this one thread, which lives as long as the pool: a child's
        # PR_SET_PDEATHSIG (cli/hardening.py) fires when the *thread* that started it ends, and a shared host must
        # outlive the session worker of the client that happened to start it.
        self._starter = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="host-starter")
        self._hosts: dict[Optional[tuple], list[HostProcess]] = {}
        self._names = itertools.count()

    def key(self, spec: SlotSpec) -> Optional[tuple]:
        """The hosts a slot may join; None: a host of its own."""
        config = spec.host_config
        if config is None or not shares_host(config):
            return None
        return (None if self.share_across_tenants else spec.tenant_id, *host_key(config))

    def attach(self, spec: SlotSpec) -> EngineSlot:
        key = self.key(spec)
        with self._lock:
            hosts = self._hosts.setdefault(key, [])
            host = next((h for h in hosts if h.has_room), None) if key is not None else None
            if host is None:
                host = self._starter.submit(
                    HostProcess, self.home, self.capacity if key is not None else 1, self.busy_engines,
                    name=f"{next(self._names)}-{spec.client_id}", on_release=self._released, key=key).result()
                hosts.append(host)
                metrics.HOSTS.inc()
            index = host.reserve()
        try:
            return host.attach(spec, index)
        except ValidationError as exc:
            if not exc.details.get(HOST_MISMATCH) or spec.saved_by is None:
                raise
        return self.attach(dataclasses.replace(spec, saved_by=None))  # a sampler whose weights fit elsewhere

    def _released(self, host: HostProcess) -> None:
        if host.attached:
            return
        if host.key is None:
            self._end_if_empty(host)
        else:
            timer = threading.Timer(self.idle_s, self._end_if_empty, (host,))
            timer.daemon = True
            timer.start()

    def _end_if_empty(self, host: HostProcess) -> None:
        with self._lock:
            if host.attached or host.closing:
                return
            host.closing = True  # no slot joins it from now on
            hosts = self._hosts.get(host.key, [])
            if host in hosts:
                hosts.remove(host)
                metrics.HOSTS.dec()
        host.close()

    def close(self) -> None:
        """End every host (their sessions were told to stop)."""
        with self._lock:
            hosts = [h for hosts in self._hosts.values() for h in hosts]
            self._hosts.clear()
            metrics.HOSTS.dec(len(hosts))
        for host in hosts:
            host.closing = True
            host.close()
