"""Tinker API keys: ``tml-`` keys, each mapping to one tenant.

The SDK sends its key in ``X-API-Key``. Only SHA-256 digests are stored (``<home>/tinker/keys.json``,
0600): whoever reads the file learns which tenants have keys, not a key. Each entry carries an HMAC-SHA256
under the credentials key kept with the key sets (not in the home), so whoever can write the home but not
the keys cannot plant a digest or move one to another tenant: such an entry is refused, logged and audited
in the tenant it names. ``tensafe tinker-key create`` adds one and prints it once; the server re-reads the
file when it changes, so no restart is needed.
A trainer pod on Kubernetes gets its key from its TrainingClient's Secret instead (a file the Secret mounts,
``$TENSAFE_TINKER_KEY_FILE``, read once at startup and kept in memory as its digest only); it then reads no key
file: whoever can write the data volume must not be able to plant a key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from tg_tinker.errors import AuthenticationError
from tg_tinker.keys import TINKER_KEY_PREFIX as KEY_PREFIX
from tg_tinker.errors import ValidationError
from tg_tinker.keys import KeyProvider, check_tenant, new_tinker_key
from tg_tinker.private_files import private_dir

from ..artifacts import write_private
from ..crypto import canonical_json

log = logging.getLogger("tensafe.trainer")


def keys_file(home: Path) -> Path:
    return home / "tinker" / "keys.json"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(eq=False)  # identity, not value: the refusal budget is kept per key object (gate.RefusalBudget)
class TinkerKey:
    key_id: str  # the digest's first 16 hex digits: names a key in logs and listings, opens nothing
    tenant_id: str
    name: str


def entry_mac(credentials_key: bytes, entry: dict) -> str:
    return hmac.new(credentials_key, b"tensafe/tinker-key/v1\n" + canonical_json(
        {k: v for k, v in entry.items() if k != "mac"}), hashlib.sha256).hexdigest()


def create_key(home: Path, tenant_id: str, name: str = "", keys: Optional[KeyProvider] = None) -> str:
    """A new key for ``tenant_id``, its digest added to the key file (authenticated under ``keys``' credentials
    key: default, the home's key store); the key itself is returned, never stored."""
    from ..paths import key_provider

    check_tenant(tenant_id)
    mac_key = (keys or key_provider(home)).credentials_key()
    key = new_tinker_key()
    path = keys_file(home)
    private_dir(path.parent)
    entries = _read(path)
    entry = {"digest": _digest(key), "tenant_id": tenant_id, "name": name[:128], "created_at": time.time()}
    entries.append({**entry, "mac": entry_mac(mac_key, entry)})
    write_private(path, (json.dumps({"keys": entries}, indent=1) + "\n").encode())
    return key


def _read(path: Path) -> list:
    try:
        entries = json.loads(path.read_text())["keys"]
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError):
        raise ValidationError(f"{path} is not a Tinker key file") from None
    return entries if isinstance(entries, list) else []


def _authentic(mac_key: bytes, entry) -> bool:
    try:
        return hmac.compare_digest(entry_mac(mac_key, entry), str(entry["mac"])) \
            and isinstance(entry["digest"], str) and check_tenant(entry["tenant_id"]) is not None
    except (KeyError, TypeError, AttributeError, ValidationError):
        return False


class TinkerKeys:
    """The key file, re-read when its modification time changes."""

    def __init__(self, home: Path, given: Optional[dict[str, str]] = None, keys: Optional[KeyProvider] = None,
                 on_refused: Optional[Callable[[dict], None]] = None):
        """``given``: key -> tenant, the keys handed to this process (a trainer pod's, perhaps none); when given,
        no key file is read. None: the key file's entries that verify under ``keys``' credentials key (default:
        the home's key store); ``on_refused`` is told of each entry that does not, once."""
        from ..paths import key_provider

        self.path = None if given is not None else keys_file(home)
        self._keys = keys if keys is not None or given is not None else key_provider(home)
        self._on_refused = on_refused
        self._refused: set[str] = set()
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
            entries = self._authentic(_read(self.path)) if stamp is not None else []
            known = self._by_digest  # keep each key's object (and its refusal budget) across re-reads
            self._by_digest = {e["digest"]: known.get(e["digest"]) or TinkerKey(e["digest"][:16],
                                                                                check_tenant(e["tenant_id"]),
                                                                                e.get("name", ""))
                               for e in entries}
            self._stamp = stamp

    def _authentic(self, entries: list) -> list[dict]:
        mac_key = self._keys.credentials_key()
        kept = []
        for entry in entries:
            if _authentic(mac_key, entry):
                kept.append(entry)
                continue
            fingerprint = hashlib.sha256(canonical_json(entry)).hexdigest()
            if fingerprint not in self._refused:
                self._refused.add(fingerprint)
                tenant = entry.get("tenant_id") if isinstance(entry, dict) else None
                log.warning("refused a Tinker key entry of %s that does not verify (planted or edited)",
                            f"tenant {tenant!r}" if isinstance(tenant, str) and len(tenant) <= 64 else "no tenant")
                if self._on_refused is not None:
                    self._on_refused(entry if isinstance(entry, dict) else {})
        return kept

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
