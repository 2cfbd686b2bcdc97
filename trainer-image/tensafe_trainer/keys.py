"""Key-encryption keys (KEKs), one set per tenant, behind a small provider interface.

A tenant's key set is ``{"active": kid, "keys": {kid: base64 32-byte key}, "audit": base64 32-byte key}``.
Rotation adds a new key and makes it active; old keys stay so existing artifacts can be re-wrapped.
``audit`` keys the audit log's request hashes (HMAC-SHA256), so a guessed training record cannot be
confirmed from the log; rotation keeps it. Deleting a tenant's keys (crypto-shredding) makes every
artifact of that tenant unreadable and its request hashes unlinkable.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import threading
from abc import ABC, abstractmethod
from pathlib import Path

from tg_tinker.errors import ArtifactIntegrityError, ValidationError

TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_tenant(tenant_id: str) -> str:
    if not TENANT_PATTERN.match(tenant_id) or tenant_id in (".", ".."):
        raise ValidationError(f"invalid tenant id {tenant_id!r}", {"field": "tenant_id"})
    return tenant_id


class KeyProvider(ABC):
    @abstractmethod
    def _load(self, tenant_id: str) -> dict | None: ...

    @abstractmethod
    def _store(self, tenant_id: str, keyset: dict) -> None: ...

    @abstractmethod
    def shred(self, tenant_id: str) -> None:
        """Delete every key of the tenant."""

    _lock = threading.Lock()

    def active_key(self, tenant_id: str) -> tuple[str, bytes]:
        """The tenant's active (kid, key); created on first use."""
        with self._lock:
            keyset = self._load(check_tenant(tenant_id))
            if keyset is None:
                keyset = self._new_keyset(tenant_id, None)
                self._store(tenant_id, keyset)
        kid = keyset["active"]
        return kid, base64.b64decode(keyset["keys"][kid])

    def key(self, tenant_id: str, kid: str) -> bytes:
        keyset = self._load(check_tenant(tenant_id))
        if keyset is None or kid not in keyset["keys"]:
            raise ArtifactIntegrityError(
                f"key {kid!r} of tenant {tenant_id!r} is not available (wrong tenant, or the key was "
                "deleted): the artifact cannot be decrypted", {"tenant_id": tenant_id, "key_id": kid})
        return base64.b64decode(keyset["keys"][kid])

    def audit_key(self, tenant_id: str) -> bytes:
        """The tenant's request-hash key; added to its key set on first use (a read-only key set that lacks
        one, an old mounted Secret, fails loudly rather than hash without a key)."""
        with self._lock:
            keyset = self._load(check_tenant(tenant_id))
            if keyset is None or "audit" not in keyset:
                keyset = self._new_keyset(tenant_id, None) if keyset is None else {
                    **keyset, "audit": base64.b64encode(secrets.token_bytes(32)).decode()}
                self._store(tenant_id, keyset)
        return base64.b64decode(keyset["audit"])

    def rotate(self, tenant_id: str) -> str:
        """Add a new active key; returns its id."""
        with self._lock:
            keyset = self._new_keyset(tenant_id, self._load(check_tenant(tenant_id)))
            self._store(tenant_id, keyset)
        return keyset["active"]

    @staticmethod
    def _new_keyset(tenant_id: str, old: dict | None) -> dict:
        keys = dict(old["keys"]) if old else {}
        kid = f"{tenant_id}/kek-{len(keys) + 1}-{secrets.token_hex(4)}"
        keys[kid] = base64.b64encode(secrets.token_bytes(32)).decode()
        audit = old["audit"] if old and "audit" in old else base64.b64encode(secrets.token_bytes(32)).decode()
        return {"active": kid, "keys": keys, "audit": audit}


class LocalKeyProvider(KeyProvider):
    """Key sets as JSON files (mode 0600) in a folder (mode 0700)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            os.chmod(self.folder, 0o700)
        except OSError:
            pass  # a read-only mount (a Kubernetes Secret volume): its permissions are the kubelet's

    def _path(self, tenant_id: str) -> Path:
        return self.folder / f"{tenant_id}.json"

    def _load(self, tenant_id: str) -> dict | None:
        try:
            return json.loads(self._path(tenant_id).read_text())
        except FileNotFoundError:
            return None

    def _store(self, tenant_id: str, keyset: dict) -> None:
        path = self._path(tenant_id)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(keyset, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def shred(self, tenant_id: str) -> None:
        self._path(check_tenant(tenant_id)).unlink(missing_ok=True)
