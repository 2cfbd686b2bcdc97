"""Key-encryption keys (KEKs), one set per tenant, behind a small provider interface.

A tenant's key set is ``{"active": kid, "keys": {kid: base64 32-byte KEK}, "audit": base64 32 bytes,
"receipt": base64 32-byte Ed25519 seed}``.

- ``keys``: rotation adds a KEK and makes it active. Plain rotation keeps the old ones (artifacts are
  re-wrapped, and a copy taken before still opens); ``retire`` deletes every KEK but the active one,
  after ``ArtifactStore.rotate(reencrypt=True)`` has moved every artifact to a fresh data key.
- ``audit``: keys the audit log's request hashes (HMAC-SHA256, so a guessed training record cannot be
  confirmed from the log) and, through a derived key, the MAC of every audit record (audit.py).
- ``receipt``: the tenant's Ed25519 key that signs privacy receipts (tg_tinker.receipts).

``audit`` and ``receipt`` form one *secrets generation*, named by ``secrets_id`` (absent in key sets made before
generations: ``s1``). ``rotate_secrets`` (``tensafe artifact rotate``, beside the KEK rotation) replaces both
and with them the chain key, the request-hash key and the sealing key (all derived from ``audit``). The
retired generation goes to ``retired_secrets[<id>]``: its ``audit`` secret kept (the chain's old segment is
verified with it), its receipt key's public half only (``receipt_public``, ``receipt_key_id``: the private
seed is destroyed), ``retired_at`` (the audit sequence of the ``rotate_keys`` record that closes its
segment), ``head`` (that record's hash) and ``successor``. The rule (audit.verify, receipts.verify_receipt):
a sequence number belongs to exactly one generation, so an audit record made with a retired key after its
retirement, or with a key the key set does not know, is refused, and so is a receipt signed with a retired
key that names an audit head at or after its retirement. Receipt keys, current and retired, are published
by ``receipt_public_keys``. Deleting a tenant's key set (crypto-shredding) makes every artifact of that
tenant unreadable and its request hashes unlinkable.

Beside the key sets the store keeps each artifact's data key, wrapped under a KEK (``artifact_key``):
the artifact file does not hold it, so destroying that one entry makes every copy of that artifact (a
backup, a snapshot, a file put back) unreadable, while the tenant's other artifacts stay.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

from tg_tinker.errors import ArtifactIntegrityError, ValidationError
from tg_tinker.types import TENANT_PATTERN, check_tenant

from .private_files import atomic_write, fsync_dir, private_dir, write_durably

ARTIFACT_ID = re.compile(r"art-[0-9a-f]{32}")
SECRET_FIELDS = ("audit", "receipt")  # 32 random bytes each, besides the KEKs
FIRST_SECRETS_ID = "s1"  # the secrets generation of a key set that names none


TINKER_KEY_PREFIX = "tml-"  # the official tinker SDK refuses keys without it


def new_tinker_key() -> str:
    """A Tinker API key (``tml-`` + 256 random bits): ``tensafe tinker-key create`` and the operator both use it."""
    return TINKER_KEY_PREFIX + secrets.token_urlsafe(32)


class KeyProvider(ABC):
    @abstractmethod
    def _load(self, tenant_id: str) -> dict | None: ...

    @abstractmethod
    def _store(self, tenant_id: str, keyset: dict) -> None: ...

    @abstractmethod
    def shred(self, tenant_id: str) -> None:
        """Delete every key of the tenant, its artifacts' data keys included."""

    # Each artifact's wrapped data key ({"kid", "wrapped_dek", "wrap_nonce"}: crypto.py), one per encryption
    # of it (``tag``: its payload nonce, so re-encryption adds the new key before the file changes and drops
    # the old one after), in a folder of their own (``ArtifactKeyFolder``). A provider given none (a key set
    # on the command line, a Secret read through the API without the trainer's data-key volume) opens and
    # stores no artifact.
    _artifact_keys: "ArtifactKeyFolder | None" = None

    def _data_keys(self) -> "ArtifactKeyFolder":
        if self._artifact_keys is None:
            raise ValidationError(f"{type(self).__name__} was given no folder of artifact data keys")
        return self._artifact_keys

    def put_artifact_key(self, tenant_id: str, artifact_id: str, tag: str, entry: dict) -> None:
        self._data_keys().put(tenant_id, artifact_id, tag, entry)

    def artifact_key(self, tenant_id: str, artifact_id: str, tag: str) -> dict | None:
        return None if self._artifact_keys is None else self._artifact_keys.get(tenant_id, artifact_id, tag)

    def destroy_artifact_key(self, tenant_id: str, artifact_id: str, keep: str | None = None) -> int:
        """Destroy the artifact's data keys (all, or all but the one tagged ``keep``), durably; returns how many."""
        return self._data_keys().destroy(tenant_id, artifact_id, keep)

    def artifact_keys(self, tenant_id: str) -> list[tuple[str, str]]:
        """(artifact id, tag) of every data key the store keeps for the tenant."""
        return [] if self._artifact_keys is None else self._artifact_keys.ids(tenant_id)

    def artifact_lock(self, tenant_id: str):
        """Held around anything that reads a tenant's data key and writes it back (rotation) and around a delete,
        across processes, so a deleted artifact's key is never written back. Kept in the key store: whoever can
        swap folders in the home cannot split it."""
        return contextlib.nullcontext() if self._artifact_keys is None else self._artifact_keys.lock(tenant_id)

    # The head (lines, chained SHA-256) of each file ledger, kept apart from the ledger (ledger.py): a ledger in
    # the home that is shorter than its recorded head, or differs from it, was rolled back or replaced.
    def ledger_head(self, tenant_id: str, ledger: str) -> dict | None:
        return None

    def put_ledger_head(self, tenant_id: str, ledger: str, head: dict) -> None:
        raise ValidationError(f"{type(self).__name__} keeps no ledger heads: it cannot record a DP step")

    # Secrets of the key store itself, beside the tenants' key sets (``<name>.key``: a key-set name ends in
    # .json), created on first use; a crypto-shred of a tenant leaves them.
    def _store_secret(self, name: str) -> bytes:
        raise ValidationError(f"{type(self).__name__} keeps no {name} key")

    def credentials_key(self) -> bytes:
        """The key that authenticates credential files kept in the trainer's home (Tinker key digests): kept with
        the key sets, so whoever can write the home but not the keys cannot plant or edit an entry."""
        return self._store_secret("credentials")

    def revoked_credentials(self) -> set[str]:
        """The digests of revoked credentials (Tinker keys: ``tensafe tinker-key revoke``), kept with the key sets
        (not in the home): an entry put back in the home (an old copy of the key file) stays refused. A provider
        that keeps no list: none."""
        return set()

    def revoke_credentials(self, digests: Iterable[str]) -> None:
        """Add ``digests`` (SHA-256, hex) to the revocation list, durably; a digest once there is never dropped."""
        raise ValidationError(f"{type(self).__name__} keeps no revocation list: it cannot revoke a credential")

    def names_key(self, tenant_id: str) -> bytes:
        """The key of the tenant's pseudonyms on disk (ledger file names, client ids in the audit log): derived
        from the key store's names secret, so neither a rotation nor a crypto-shred of the tenant changes it (a
        ledger must be found again after either, or its spent budget would seem to vanish). Whoever holds the
        key store can read the names, as they can read everything else."""
        return hmac.new(self._store_secret("names"), b"tensafe/names/v1\n" + check_tenant(tenant_id).encode(),
                        hashlib.sha256).digest()

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
        """The tenant's request-hash key (of the active secrets generation)."""
        return base64.b64decode(self.complete(tenant_id)["audit"])

    def chain_key(self, tenant_id: str) -> bytes:
        """The key of the audit chain's record MACs (active generation): derived from the audit key, so the
        request hashes and the chain never share a key. Verifying a chain takes the whole key set
        (``secret_generations``): a rotated chain has a segment per generation."""
        return chain_key_of(self.complete(tenant_id))

    def sealing_key(self, tenant_id: str) -> bytes:
        """The key of a TrainingOperation's sealed parameters (tg_tinker.sealing), active generation only:
        parameters sealed before a rotation no longer open."""
        from tg_tinker.sealing import sealing_key

        return sealing_key(self.complete(tenant_id))

    def receipt_key(self, tenant_id: str):
        """The tenant's receipt-signing key (an ``Ed25519PrivateKey``), active generation only."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(base64.b64decode(self.complete(tenant_id)["receipt"]))

    def secrets_id(self, tenant_id: str) -> str:
        """The id of the tenant's active secrets generation (its audit records' ``key_id``)."""
        return secrets_id_of(self.complete(tenant_id))

    def rotate_secrets(self, tenant_id: str, *, retiring: str, successor: str, retired_at: int, head: str) -> dict:
        """Replace the audit and receipt secrets (and so the chain, request-hash and sealing keys) with a new
        generation ``successor``; the active one, ``retiring``, is retired at audit sequence ``retired_at``, whose
        record (hash ``head``) is the ``rotate_keys`` entry naming ``successor``. Call it through
        ``AuditLog.rotate_keys``, which writes that entry under the chain's lock first. Refuses if ``retiring`` is
        no longer the active generation (a concurrent rotation). Returns the new key set."""
        with self._lock:
            keyset = self._load(check_tenant(tenant_id))
            if keyset is None or any(name not in keyset for name in SECRET_FIELDS):
                raise ValidationError(f"tenant {tenant_id!r} has no complete key set to rotate")
            if secrets_id_of(keyset) != retiring:
                raise ValidationError(f"the active secrets of tenant {tenant_id!r} are {secrets_id_of(keyset)!r}, "
                                      f"not {retiring!r}: rotated meanwhile", {"tenant_id": tenant_id})
            if successor == retiring or successor in keyset.get("retired_secrets", {}):
                raise ValidationError(f"secrets id {successor!r} was used before", {"tenant_id": tenant_id})
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            from tg_tinker.receipts import key_id, raw_public_key

            public = Ed25519PrivateKey.from_private_bytes(base64.b64decode(keyset["receipt"])).public_key()
            retired = {**keyset.get("retired_secrets", {}), retiring: {
                "audit": keyset["audit"], "receipt_public": base64.b64encode(raw_public_key(public)).decode(),
                "receipt_key_id": key_id(public), "retired_at": int(retired_at), "head": head,
                "successor": successor}}
            fresh = {name: base64.b64encode(secrets.token_bytes(32)).decode() for name in SECRET_FIELDS}
            keyset = {**keyset, **fresh, "secrets_id": successor, "retired_secrets": retired}
            self._store(tenant_id, keyset)
        return keyset

    def check_writable(self, tenant_id: str) -> None:
        """Store the tenant's key set unchanged: raises where it cannot be written (a read-only Secret mount, a key
        set given on the command line), before a rotation changes anything."""
        with self._lock:
            keyset = self._load(check_tenant(tenant_id))
            if keyset is not None:
                self._store(tenant_id, keyset)

    def receipt_public_keys(self, tenant_id: str) -> dict:
        """The tenant's receipt public keys, the active one and every retired one with the audit sequence it was
        retired at (``receipt_public_keys_of``): what ``verify_receipt`` takes to check a receipt of any age."""
        return receipt_public_keys_of(tenant_id, self.complete(tenant_id))

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


def chain_key_of(keyset: dict, generation: str | None = None) -> bytes:
    """The audit chain's MAC key of the active secrets generation, or of ``generation`` (active or retired)."""
    audit = keyset["audit"]
    if generation is not None and generation != secrets_id_of(keyset):
        retired = keyset.get("retired_secrets", {}).get(generation)
        if retired is None:
            raise ValidationError(f"the key set has no secrets generation {generation!r}", {"key_id": generation})
        audit = retired["audit"]
    return hmac.new(base64.b64decode(audit), b"tensafe/audit-chain/v1", hashlib.sha256).digest()


def secrets_id_of(keyset: dict) -> str:
    return keyset.get("secrets_id") or FIRST_SECRETS_ID


def new_secrets_id(keyset: dict) -> str:
    """A fresh generation id: ``s<n>-<8 hex>``."""
    return f"s{len(keyset.get('retired_secrets', {})) + 2}-{secrets.token_hex(4)}"


def secret_generations(keyset: dict) -> list[dict]:
    """The key set's secrets generations in the order they were active: each ``{"id", "chain_key", "retired_at",
    "head", "successor"}`` (the active one last, with ``retired_at`` None). A sequence number n belongs to the
    first generation with ``n <= retired_at``, else to the active one."""
    retired = sorted(keyset.get("retired_secrets", {}).items(), key=lambda item: int(item[1]["retired_at"]))
    generations = [{"id": gid, "chain_key": chain_key_of(keyset, gid), "retired_at": int(r["retired_at"]),
                    "head": r["head"], "successor": r["successor"]} for gid, r in retired]
    return generations + [{"id": secrets_id_of(keyset), "chain_key": chain_key_of(keyset), "retired_at": None,
                           "head": None, "successor": None}]


def receipt_public_keys_of(tenant_id: str, keyset: dict) -> dict:
    """``{"format", "tenant_id", "keys": [{"key_id", "public_key" (PEM), "status": "active"|"retired",
    "retired_at"}]}``: a retired key verifies only receipts whose audit head precedes ``retired_at``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    from tg_tinker.receipts import KEYS_FORMAT, key_id

    def pem(public) -> str:
        return public.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    active = Ed25519PrivateKey.from_private_bytes(base64.b64decode(keyset["receipt"])).public_key()
    keys = [{"key_id": key_id(active), "public_key": pem(active), "status": "active", "retired_at": None}]
    for _, retired in sorted(keyset.get("retired_secrets", {}).items(), key=lambda item: -int(item[1]["retired_at"])):
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(retired["receipt_public"]))
        keys.append({"key_id": key_id(public), "public_key": pem(public), "status": "retired",
                     "retired_at": int(retired["retired_at"])})
    return {"format": KEYS_FORMAT, "tenant_id": tenant_id, "keys": keys}


def load_keyset_file(path: Path, tenant_id: str | None = None) -> tuple[str, dict]:
    """A key set given on the command line: a key-set file (``<tenant>.json`` as in a keys folder), or a
    Kubernetes Secret exported as JSON or YAML (``kubectl get secret NAME -o yaml``), whose
    ``data["<tenant>.json"]`` is the key set. Returns (tenant, key set).

    An error names the file and the kind of problem, never any of its content: a parser's error quotes the
    input (a YAML error prints the lines around the fault, KEKs and all), so none is chained or shown."""

    def refuse(problem: str, field: str = "keys") -> ValidationError:
        return ValidationError(f"{path}: {problem}: not a TenSafe key set or a Secret holding one", {"field": field})

    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise ValidationError(f"cannot read the key set {path}: {exc.strerror or type(exc).__name__}",
                              {"field": "keys"}) from None
    except UnicodeDecodeError:
        raise refuse("not UTF-8 text") from None
    try:
        doc = json.loads(text)
    except ValueError:
        import yaml

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError:
            raise refuse("neither valid JSON nor valid YAML (damaged or truncated?)") from None
    if isinstance(doc, dict) and doc.get("kind") == "Secret":
        data = doc.get("data") or {}
        if not isinstance(data, dict):
            raise refuse("a Secret whose data is not a mapping")
        entries = {k[:-5]: v for k, v in data.items() if isinstance(k, str) and k.endswith(".json")}
        if tenant_id is None and len(entries) == 1:
            tenant_id = next(iter(entries))
        if tenant_id not in entries:
            named = sorted(t for t in entries if TENANT_PATTERN.fullmatch(t))
            raise ValidationError(f"Secret {path} holds no key set for tenant {tenant_id!r} (it has "
                                  f"{named}); name one with --tenant", {"field": "tenant"})
        try:
            doc = json.loads(base64.b64decode(entries[tenant_id], validate=True))
        except (ValueError, TypeError):
            raise refuse("the Secret's entry for the tenant is not a base64-encoded JSON key set") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), dict) or not doc["keys"]:
        raise refuse("no \"keys\" mapping")
    for value in doc["keys"].values():
        try:
            ok = isinstance(value, str) and len(base64.b64decode(value, validate=True)) == 32
        except ValueError:
            ok = False
        if not ok:
            raise refuse("one of its keys is not a base64-encoded 32-byte key") from None
    if doc.get("active") not in doc["keys"]:
        raise refuse("its \"active\" key is not among its keys", "active")
    return tenant_id or Path(path).stem, doc


class StaticKeyProvider(KeyProvider):
    """One tenant's key set given as a document (a key-set file or Secret export), read-only."""

    def __init__(self, tenant_id: str, keyset: dict, artifact_keys: Path | None = None):
        """``artifact_keys``: the folder of the artifacts' data keys (``paths.artifact_keys_dir``), read-only."""
        self.tenant_id, self.keyset = check_tenant(tenant_id), keyset
        self._artifact_keys = ArtifactKeyFolder(artifact_keys) if artifact_keys is not None else None

    def _load(self, tenant_id: str) -> dict | None:
        return self.keyset if tenant_id == self.tenant_id else None

    def artifact_key(self, tenant_id: str, artifact_id: str, tag: str) -> dict | None:
        return super().artifact_key(tenant_id, artifact_id, tag) if tenant_id == self.tenant_id else None

    def put_artifact_key(self, tenant_id: str, artifact_id: str, tag: str, entry: dict) -> None:
        self._store(tenant_id, {})  # read-only: refused

    def destroy_artifact_key(self, tenant_id: str, artifact_id: str, keep: str | None = None) -> int:
        self.shred(tenant_id)  # read-only: refused
        return 0

    def _store(self, tenant_id: str, keyset: dict) -> None:
        raise ValidationError("this key set was given on the command line and is read-only")

    def shred(self, tenant_id: str) -> None:
        raise ValidationError("this key set was given on the command line and is read-only")


class ArtifactKeyFolder:
    """Artifacts' wrapped data keys, one file per encryption: ``<folder>/<tenant>/<artifact_id>.<tag>.key``
    (0600, folders 0700). Destroying unlinks and fsyncs the folder, so a power cut cannot undo a deletion."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _tenant_folder(self, tenant_id: str) -> Path:
        return self.folder / check_tenant(tenant_id)

    def _path(self, tenant_id: str, artifact_id: str, tag: str) -> Path:
        if not ARTIFACT_ID.fullmatch(str(artifact_id)) or not re.fullmatch(r"[0-9a-f]{24}", str(tag)):
            raise ValidationError(f"invalid artifact id {str(artifact_id)[:80]!r}", {"field": "artifact_id"})
        return self._tenant_folder(tenant_id) / f"{artifact_id}.{tag}.key"

    def put(self, tenant_id: str, artifact_id: str, tag: str, entry: dict) -> None:
        path = self._path(tenant_id, artifact_id, tag)
        private_dir(self.folder)
        private_dir(path.parent)
        write_durably(path, json.dumps(entry).encode())

    def get(self, tenant_id: str, artifact_id: str, tag: str) -> dict | None:
        try:
            entry = json.loads(self._path(tenant_id, artifact_id, tag).read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            raise ArtifactIntegrityError(f"the data key of artifact {artifact_id!r} is damaged",
                                         {"artifact_id": artifact_id})
        return entry

    def destroy(self, tenant_id: str, artifact_id: str, keep: str | None = None) -> int:
        self._path(tenant_id, artifact_id, keep or "0" * 24)  # checks the ids
        folder = self._tenant_folder(tenant_id)
        doomed = [p for p in folder.glob(f"{artifact_id}.*.key") if p.name != f"{artifact_id}.{keep}.key"] \
            if folder.is_dir() else []
        for path in doomed:
            path.unlink(missing_ok=True)
        if doomed:
            fsync_dir(folder)
        return len(doomed)

    @contextlib.contextmanager
    def lock(self, tenant_id: str):
        folder = self._tenant_folder(tenant_id)
        private_dir(self.folder)
        private_dir(folder)
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def ids(self, tenant_id: str) -> list[tuple[str, str]]:
        folder = self._tenant_folder(tenant_id)
        return sorted(tuple(p.name.split(".")[:2]) for p in folder.glob("art-*.*.key")) if folder.is_dir() else []

    def shred(self, tenant_id: str) -> None:
        folder = self._tenant_folder(tenant_id)
        if folder.is_dir():
            for path in folder.iterdir():
                path.unlink(missing_ok=True)
            fsync_dir(folder)
            folder.rmdir()
            fsync_dir(self.folder)


class LocalKeyProvider(KeyProvider):
    """Key sets as JSON files (mode 0600) in a folder (mode 0700); artifacts' data keys in
    ``artifact_keys`` (default ``<folder>/artifacts``: a trainer pod, whose key sets are a read-only Secret
    mount, keeps them on a volume of their own)."""

    def __init__(self, folder: Path, artifact_keys: Path | None = None):
        self.folder = Path(folder)  # created with the first key set: reading creates nothing
        self._artifact_keys = ArtifactKeyFolder(artifact_keys if artifact_keys is not None
                                                else self.folder / "artifacts")

    def _path(self, tenant_id: str) -> Path:
        return self.folder / f"{tenant_id}.json"

    def _load(self, tenant_id: str) -> dict | None:
        try:
            return json.loads(self._path(tenant_id).read_text())
        except FileNotFoundError:
            return None

    def _store(self, tenant_id: str, keyset: dict) -> None:
        private_dir(self.folder)
        write_durably(self._path(tenant_id), json.dumps(keyset).encode())

    def shred(self, tenant_id: str) -> None:
        path = self._path(check_tenant(tenant_id))
        if path.exists():
            path.unlink()
            fsync_dir(self.folder)
        self._artifact_keys.shred(tenant_id)

    def _ledger_head_path(self, tenant_id: str, ledger: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{32}", ledger):
            raise ValidationError(f"invalid ledger name {ledger[:80]!r}")
        return self.folder / "ledgers" / check_tenant(tenant_id) / f"{ledger}.head"

    def ledger_head(self, tenant_id: str, ledger: str) -> dict | None:
        path = self._ledger_head_path(tenant_id, ledger)
        try:
            head = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            head = None
        if not isinstance(head, dict) or not isinstance(head.get("lines"), int) \
                or not isinstance(head.get("sha256"), str):
            raise ValidationError(f"{path} is damaged: the ledger's recorded head cannot be read")
        return head

    def put_ledger_head(self, tenant_id: str, ledger: str, head: dict) -> None:
        path = self._ledger_head_path(tenant_id, ledger)
        private_dir(self.folder / "ledgers")
        private_dir(path.parent)
        # The file is synced before its rename, the folder not: a power cut may keep the previous head, which the
        # ledger still covers (a head is written only after its lines are durable), never a torn one.
        atomic_write(path, lambda f: f.write(json.dumps(head).encode()))

    def _store_secret(self, name: str) -> bytes:
        path = self.folder / f"{name}.key"
        with self._lock:
            try:
                return base64.b64decode(path.read_bytes(), validate=True)
            except FileNotFoundError:
                key = secrets.token_bytes(32)
                private_dir(self.folder)
                write_durably(path, base64.b64encode(key))
                return key
            except ValueError:
                raise ValidationError(f"{path} is damaged: it should hold 32 bytes in base64") from None

    def revocation_file(self) -> Path:
        """The revocation list (``revoked_credentials``): a JSON list of digests. A reader may watch its stamp."""
        return self.folder / "revoked.list"  # not a key-set name (<tenant>.json): a tenant cannot shadow or shred it

    def revoked_credentials(self) -> set[str]:
        path = self.revocation_file()
        try:
            revoked = json.loads(path.read_bytes())
        except FileNotFoundError:
            return set()
        except ValueError:
            revoked = None
        if not isinstance(revoked, list) or not all(isinstance(d, str) for d in revoked):
            raise ValidationError(f"{path} is damaged: it should be a JSON list of revoked credential digests")
        return set(revoked)

    def revoke_credentials(self, digests: Iterable[str]) -> None:
        import fcntl
        import os

        digests = set(digests)
        if not all(isinstance(d, str) and re.fullmatch(r"[0-9a-f]{64}", d) for d in digests):
            raise ValidationError("a revoked credential is named by its SHA-256 digest (64 hex digits)")
        with self._lock:
            private_dir(self.folder)
            folder = os.open(self.folder, os.O_RDONLY)
            try:
                fcntl.flock(folder, fcntl.LOCK_EX)  # another process revoking at once: neither loses a digest
                revoked = self.revoked_credentials()
                if not digests <= revoked:
                    write_durably(self.revocation_file(), json.dumps(sorted(revoked | digests), indent=0).encode())
            finally:
                os.close(folder)  # releases the lock
