"""Tinker API keys: ``tml-`` keys, each mapping to one tenant.

The SDK sends its key in ``X-API-Key``. Only SHA-256 digests are stored (``<home>/tinker/keys.json``,
0600): whoever reads the file learns which tenants have keys, not a key. ``tensafe tinker-key create``
adds one and prints it once; the server re-reads the file when it changes, so no restart is needed.
A trainer pod on Kubernetes gets its key from its TrainingClient's Secret instead (a file the Secret mounts,
``$TENSAFE_TINKER_KEY_FILE``, read once at startup and kept in memory as its digest only); it then reads no key
file: whoever can write the data volume must not be able to plant a key.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tg_tinker.errors import AuthenticationError
from tg_tinker.keys import TINKER_KEY_PREFIX as KEY_PREFIX
from tg_tinker.keys import check_tenant, new_tinker_key

from ..artifacts import private_dir, write_private


def keys_file(home: Path) -> Path:
    return home / "tinker" / "keys.json"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(eq=False)  # identity, not value: the refusal budget is kept per key object (gate.RefusalBudget)
class TinkerKey:
    key_id: str  # the digest's first 16 hex digits: names a key in logs and listings, opens nothing
    tenant_id: str
    name: str


def create_key(home: Path, tenant_id: str, name: str = "") -> str:
    """A new key for ``tenant_id``, its digest added to the key file; the key itself is returned, never stored."""
    check_tenant(tenant_id)
    key = new_tinker_key()
    path = keys_file(home)
    private_dir(path.parent)
    entries = _read(path)
    entries.append({"digest": _digest(key), "tenant_id": tenant_id, "name": name[:128], "created_at": time.time()})
    write_private(path, (json.dumps({"keys": entries}, indent=1) + "\n").encode())
    return key


def _read(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())["keys"]
    except FileNotFoundError:
        return []


class TinkerKeys:
    """The key file, re-read when its modification time changes."""

    def __init__(self, home: Path, given: Optional[dict[str, str]] = None):
        """``given``: key -> tenant, the keys handed to this process (a trainer pod's, perhaps none); when given,
        no key file is read. None: the key file's keys."""
        self.path = None if given is not None else keys_file(home)
        self._lock = threading.Lock()
        self._stamp: Optional[tuple[int, int]] = None
        self._by_digest: dict[str, TinkerKey] = {}
        for key, tenant_id in (given or {}).items():
            if not key.startswith(KEY_PREFIX) or len(key) < len(KEY_PREFIX) + 32:
                raise ValueError(f"a Tinker API key starts with {KEY_PREFIX!r} and has at least 32 more characters")
            digest = _digest(key)
            self._by_digest[digest] = TinkerKey(digest[:16], check_tenant(tenant_id), "given")

    def _refresh(self) -> None:
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp == self._stamp:
                return
            entries = _read(self.path) if stamp is not None else []
            known = self._by_digest  # keep each key's object (and its refusal budget) across re-reads
            self._by_digest = {e["digest"]: known.get(e["digest"]) or TinkerKey(e["digest"][:16],
                                                                                check_tenant(e["tenant_id"]),
                                                                                e.get("name", ""))
                               for e in entries}
            self._stamp = stamp

    def resolve(self, presented: str) -> TinkerKey:
        if not presented.startswith(KEY_PREFIX):
            raise AuthenticationError("missing or wrong Tinker API key (X-API-Key: tml-...); create one with "
                                      "`tensafe tinker-key create --tenant T`")
        self._refresh()
        # A dictionary lookup by SHA-256: what its timing can leak is about the hash, not the key.
        key = self._by_digest.get(_digest(presented))
        if key is None:
            raise AuthenticationError("unknown Tinker API key for this trainer")
        return key
