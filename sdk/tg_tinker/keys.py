"""Key-encryption keys (KEKs), one set per tenant, behind a small provider interface.

A tenant's key set is ``{"active": kid, "keys": {kid: base64 32-byte KEK}, "audit": base64 32 bytes,
"receipt": base64 32-byte Ed25519 seed}``.

- ``keys``: rotation adds a KEK and makes it active. Plain rotation keeps the old ones (artifacts are
  re-wrapped, and a copy taken before still opens); ``retire`` deletes every KEK but the active one,
  after ``ArtifactStore.rotate(reencrypt=True)`` has moved every artifact to a fresh data key.
- ``audit``: keys the audit log's request hashes (HMAC-SHA256, so a guessed training record cannot be
  confirmed from the log) and, through a derived key, the MAC of every audit record (audit.py).
- ``receipt``: the tenant's Ed25519 key that signs privacy receipts (tg_tinker.receipts).

Rotation keeps ``audit`` and ``receipt``. Deleting a tenant's key set (crypto-shredding) makes every
artifact of that tenant unreadable and its request hashes unlinkable.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from abc import ABC, abstractmethod
from pathlib import Path

from .errors import ArtifactIntegrityError, ValidationError

TENANT_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SECRET_FIELDS = ("audit", "receipt")  # 32 random bytes each, besides the KEKs


TINKER_KEY_PREFIX = "tml-"  # the official tinker SDK refuses keys without it


def new_tinker_key() -> str:
    """A Tinker API key (``tml-`` + 256 random bits): ``tensafe tinker-key create`` and the operator both use it."""
    return TINKER_KEY_PREFIX + secrets.token_urlsafe(32)


def check_tenant(tenant_id: str) -> str:
    if not isinstance(tenant_id, str) or not TENANT_PATTERN.fullmatch(tenant_id) or tenant_id in (".", ".."):
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

    def complete(self, tenant_id: str) -> dict:
        """The tenant's key set, created or completed (an older one lacking a field) on first use. A read-only
        key set that lacks a field (an old mounted Secret) fails loudly rather than hash or sign without a key."""
        with self._lock:
            keyset = self._load(check_tenant(tenant_id))
            if keyset is None or any(name not in keyset for name in SECRET_FIELDS):
                keyset = self._new_keyset(tenant_id, None) if keyset is None else _with_secrets(keyset)
                self._store(tenant_id, keyset)
        return keyset

    def audit_key(self, tenant_id: str) -> bytes:
        """The tenant's request-hash key."""
        return base64.b64decode(self.complete(tenant_id)["audit"])

    def chain_key(self, tenant_id: str) -> bytes:
        """The key of the audit chain's record MACs: derived from the audit key, so the request hashes and
        the chain never share a key."""
        return chain_key_of(self.complete(tenant_id))

    def sealing_key(self, tenant_id: str) -> bytes:
        """The key of a TrainingOperation's sealed parameters (tg_tinker.sealing)."""
        from tg_tinker.sealing import sealing_key

        return sealing_key(self.complete(tenant_id))

    def receipt_key(self, tenant_id: str):
        """The tenant's receipt-signing key (an ``Ed25519PrivateKey``)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(base64.b64decode(self.complete(tenant_id)["receipt"]))

    def rotate(self, tenant_id: str) -> str:
        """Add a new active key; returns its id."""
        with self._lock:
            keyset = self._new_keyset(tenant_id, self._load(check_tenant(tenant_id)))
            self._store(tenant_id, keyset)
        return keyset["active"]

    def retire(self, tenant_id: str) -> list[str]:
        """Delete every KEK but the active one; returns the ids deleted. Only after every artifact was
        re-encrypted under the active key: what the retired keys wrapped can never be opened again."""
        with self._lock:
            keyset = self._load(check_tenant(tenant_id))
            if keyset is None:
                return []
            retired = [kid for kid in keyset["keys"] if kid != keyset["active"]]
            if retired:
                self._store(tenant_id, {**keyset, "keys": {keyset["active"]: keyset["keys"][keyset["active"]]}})
        return retired

    @staticmethod
    def _new_keyset(tenant_id: str, old: dict | None) -> dict:
        keys = dict(old["keys"]) if old else {}
        kid = f"{tenant_id}/kek-{len(keys) + 1}-{secrets.token_hex(4)}"
        keys[kid] = base64.b64encode(secrets.token_bytes(32)).decode()
        return _with_secrets({**(old or {}), "active": kid, "keys": keys})


def _with_secrets(keyset: dict) -> dict:
    """``keyset`` with any missing secret field added (never replacing one)."""
    return {**{name: base64.b64encode(secrets.token_bytes(32)).decode() for name in SECRET_FIELDS}, **keyset}


def chain_key_of(keyset: dict) -> bytes:
    return hmac.new(base64.b64decode(keyset["audit"]), b"tensafe/audit-chain/v1", hashlib.sha256).digest()


def load_keyset_file(path: Path, tenant_id: str | None = None) -> tuple[str, dict]:
    """A key set given on the command line: a key-set file (``<tenant>.json`` as in a keys folder), or a
    Kubernetes Secret exported as JSON or YAML (``kubectl get secret NAME -o yaml``), whose
    ``data["<tenant>.json"]`` is the key set. Returns (tenant, key set)."""
    text = Path(path).read_text()
    try:
        doc = json.loads(text)
    except ValueError:
        import yaml

        doc = yaml.safe_load(text)
    if isinstance(doc, dict) and doc.get("kind") == "Secret":
        entries = {k[:-5]: v for k, v in (doc.get("data") or {}).items() if k.endswith(".json")}
        if tenant_id is None and len(entries) == 1:
            tenant_id = next(iter(entries))
        if tenant_id not in entries:
            raise ValidationError(f"Secret {path} holds no key set for tenant {tenant_id!r} (it has "
                                  f"{sorted(entries)}); name one with --tenant", {"field": "tenant"})
        doc = json.loads(base64.b64decode(entries[tenant_id]))
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), dict):
        raise ValidationError(f"{path} is not a TenSafe key set or a Secret holding one", {"field": "keys"})
    return tenant_id or Path(path).stem, doc


class StaticKeyProvider(KeyProvider):
    """One tenant's key set given as a document (a key-set file or Secret export), read-only."""

    def __init__(self, tenant_id: str, keyset: dict):
        self.tenant_id, self.keyset = check_tenant(tenant_id), keyset

    def _load(self, tenant_id: str) -> dict | None:
        return self.keyset if tenant_id == self.tenant_id else None

    def _store(self, tenant_id: str, keyset: dict) -> None:
        raise ValidationError("this key set was given on the command line and is read-only")

    def shred(self, tenant_id: str) -> None:
        raise ValidationError("this key set was given on the command line and is read-only")


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
