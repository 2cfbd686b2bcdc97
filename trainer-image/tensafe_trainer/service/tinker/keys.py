"""Tinker API keys: ``tml-`` keys, each mapping to one tenant.

The SDK sends its key in ``X-API-Key``. Only SHA-256 digests are stored (``<home>/tinker/keys.json``,
0600): whoever reads the file learns which tenants have keys, not a key. Each entry carries an HMAC-SHA256
under the credentials key kept with the key sets (not in the home), so whoever can write the home but not
the keys cannot plant a digest or move one to another tenant: such an entry is refused, logged and audited
in the tenant it names. ``tensafe tinker-key create`` adds one and prints it once; the server re-reads the
file when it changes, so no restart is needed. ``tensafe tinker-key revoke`` adds the key's digest to the key
store's revocation list (``KeyProvider.revoke_credentials``, beside the credentials key), then removes its entry:
an old copy of the key file put back brings the key back to no one (refused, logged, audited). The server
re-reads both files when either changes. ``tensafe artifact shred`` revokes the tenant's keys the same way.
A trainer pod on Kubernetes gets its key from its TrainingClient's Secret instead (a file the Secret mounts,
``$TENSAFE_TINKER_KEY_FILE``, read once at startup and kept in memory as its digest only); it then reads no key
file: whoever can write the data volume must not be able to plant a key.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from tg_tinker.errors import AuthenticationError, ValidationError
from tensafe_keys.store import TINKER_KEY_PREFIX as KEY_PREFIX
from tensafe_keys.store import KeyProvider, new_tinker_key
from tg_tinker.types import check_tenant
from tensafe_keys.private_files import private_dir

from tensafe_trainer.storage.artifacts import write_private
from tensafe_trainer.storage.crypto import canonical_json
from tensafe_trainer.service.principals import Principal

log = logging.getLogger("tensafe.trainer")


def keys_file(home: Path) -> Path:
    return home / "tinker" / "keys.json"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def entry_mac(credentials_key: bytes, entry: dict) -> str:
    return hmac.new(credentials_key, b"tensafe/tinker-key/v1\n" + canonical_json(
        {k: v for k, v in entry.items() if k != "mac"}), hashlib.sha256).hexdigest()


def create_key(home: Path, tenant_id: str, name: str = "", keys: Optional[KeyProvider] = None) -> str:
    """A new key for ``tenant_id``, its digest added to the key file (authenticated under ``keys``' credentials
    key: default, the home's key store); the key itself is returned, never stored."""
    from tensafe_trainer.storage.paths import key_provider

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


def _keys_of(home: Path, keys: Optional[KeyProvider]) -> KeyProvider:
    from tensafe_trainer.storage.paths import key_provider

    return keys if keys is not None else key_provider(home)


def list_keys(home: Path, tenant_id: Optional[str] = None, keys: Optional[KeyProvider] = None) -> list[dict]:
    """The key file's entries (of ``tenant_id``, or all): ``{"key_id", "tenant_id", "name", "created_at",
    "status"}``, status ``valid``, ``revoked`` (an entry put back after its key was revoked) or ``does not
    verify`` (planted or edited). Never a digest whole: the key id is its first 16 hex digits."""
    entries = [e for e in _read(keys_file(home)) if isinstance(e, dict)
               and (tenant_id is None or e.get("tenant_id") == tenant_id)]
    if not entries:
        return []
    provider = _keys_of(home, keys)
    mac_key, revoked = provider.credentials_key(), provider.revoked_credentials()
    return [{"key_id": str(e.get("digest"))[:16], "tenant_id": e.get("tenant_id"), "name": e.get("name", ""),
             "created_at": e.get("created_at"),
             "status": "does not verify" if not _authentic(mac_key, e) else
             "revoked" if e["digest"] in revoked else "valid"} for e in entries]


def _revoke(home: Path, chosen: Callable[[dict], bool], keys: Optional[KeyProvider]) -> list[dict]:
    """Revoke the digest of every entry ``chosen`` picks, then remove those entries (and any other entry whose
    key was revoked before) from the key file: the revocation is durable before the entry goes. Returns them."""
    path = keys_file(home)
    entries = _read(path)
    doomed = [e for e in entries if isinstance(e, dict) and isinstance(e.get("digest"), str)
              and re.fullmatch(r"[0-9a-f]{64}", e["digest"]) and chosen(e)]
    if not doomed:
        return []
    provider = _keys_of(home, keys)
    provider.revoke_credentials({e["digest"] for e in doomed})
    revoked = provider.revoked_credentials()
    kept = [e for e in entries if not (isinstance(e, dict) and e.get("digest") in revoked)]
    write_private(path, (json.dumps({"keys": kept}, indent=1) + "\n").encode())
    return doomed


def revoke_key(home: Path, key_id: str, keys: Optional[KeyProvider] = None) -> list[dict]:
    """Revoke the key named by ``key_id`` (its digest's first 16 hex digits, or more); returns its entries."""
    if not re.fullmatch(r"[0-9a-f]{16,64}", key_id or ""):
        raise ValidationError("not a Tinker key id: give the 16 hex digits `tensafe tinker-key list` shows (the "
                              "argument is not repeated here: it might be a key)", {"field": "key_id"})
    # Only entries that verify: an entry planted with another tenant's digest must not get that key revoked.
    mac_key = _keys_of(home, keys).credentials_key()
    named = [e for e in _read(keys_file(home)) if isinstance(e, dict) and str(e.get("digest", "")).startswith(key_id)]
    if len({str(e.get("tenant_id")) for e in named}) > 1:  # a planted entry can copy another tenant's digest
        raise ValidationError(f"key id {key_id} names entries of several tenants (`tensafe tinker-key list` shows "
                              "which do not verify: those were planted, open nothing, and may be removed by hand); "
                              "nothing revoked", {"field": "key_id"})
    matching = [e for e in named if _authentic(mac_key, e)]
    doomed = _revoke(home, lambda e: e["digest"].startswith(key_id) and _authentic(mac_key, e), keys) \
        if matching else []
    if not doomed:
        raise ValidationError(f"no Tinker key {key_id} that verifies in {keys_file(home)} (tensafe tinker-key list "
                              "shows them; an entry that does not verify opens nothing and needs no revoking)",
                              {"field": "key_id"})
    return doomed


def revoke_tenant_keys(home: Path, tenant_id: str, keys: Optional[KeyProvider] = None) -> int:
    """Revoke every key of the tenant (a crypto-shred); returns how many. Only entries that verify: one planted
    under the tenant with another tenant's digest must not revoke that tenant's key."""
    check_tenant(tenant_id)
    if not any(isinstance(e, dict) and e.get("tenant_id") == tenant_id for e in _read(keys_file(home))):
        return 0  # and no key store looked up
    mac_key = _keys_of(home, keys).credentials_key()
    return len(_revoke(home, lambda e: e.get("tenant_id") == tenant_id and _authentic(mac_key, e), keys))


def _authentic(mac_key: bytes, entry) -> bool:
    try:
        return hmac.compare_digest(entry_mac(mac_key, entry), str(entry["mac"])) \
            and isinstance(entry["digest"], str) and check_tenant(entry["tenant_id"]) is not None
    except (KeyError, TypeError, AttributeError, ValidationError):
        return False


NOT_VERIFIED = "a Tinker key entry that does not verify (planted or edited in the key file) was refused"
RESTORED = "a revoked Tinker key's entry was restored in the key file and refused"


def _stat(path: Path) -> Optional[os.stat_result]:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


class TinkerKeys:
    """The key file, re-read when it or the key store's revocation list changes."""

    def __init__(self, home: Path, given: Optional[dict[str, str]] = None, keys: Optional[KeyProvider] = None,
                 on_refused: Optional[Callable[[dict], None]] = None):
        """``given``: key -> tenant, the keys handed to this process (a trainer pod's, perhaps none); when given,
        no key file is read. None: the key file's entries that verify under ``keys``' credentials key (default:
        the home's key store), less those whose key was revoked (``tensafe tinker-key revoke``). ``on_refused``
        is told of each entry refused, once: ``on_refused(entry, reason=NOT_VERIFIED or RESTORED)`` where it takes
        a ``reason``, else ``on_refused(entry)``."""
        from tensafe_trainer.storage.paths import key_provider

        self.path = None if given is not None else keys_file(home)
        self._keys = keys if keys is not None or given is not None else key_provider(home)
        self._on_refused = on_refused
        self._hook_takes_reason = on_refused is not None and "reason" in inspect.signature(on_refused).parameters
        self._refused: set[str] = set()
        self._lock = threading.Lock()
        self._stamp: Optional[tuple] = None
        self._revoked: set[str] = set()
        self._unreadable: Optional[tuple] = None  # the stamp at which the revocation list could not be read
        self._by_digest: dict[str, Principal] = {}
        for key, tenant_id in (given or {}).items():
            if not key.startswith(KEY_PREFIX) or len(key) < len(KEY_PREFIX) + 32:
                raise ValueError(f"a Tinker API key starts with {KEY_PREFIX!r} and has at least 32 more characters")
            digest = _digest(key)
            self._by_digest[digest] = Principal.tinker_key(digest[:16], check_tenant(tenant_id), "given")

    def _refresh(self) -> None:
        if self.path is None:
            return
        st = _stat(self.path)
        # The revocation list is another process's to change (tensafe tinker-key revoke), the key file perhaps not
        # (an old copy put back with its old time): a change of either is a re-read. A provider keeping no file
        # is asked each time (the base provider's list is empty).
        revocations = getattr(self._keys, "revocation_file", None)
        rst = _stat(revocations()) if revocations is not None else None
        stamp = (st and (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size),
                 rst and (rst.st_ino, rst.st_mtime_ns, rst.st_ctime_ns, rst.st_size) if revocations else None)
        with self._lock:
            if stamp == self._stamp and revocations is not None:
                return
            try:
                revoked = self._keys.revoked_credentials()
            except (ValidationError, OSError) as error:  # fail closed: a key revoked there may be in the key file
                self._by_digest, self._stamp = {}, None
                if self._unreadable != stamp:
                    self._unreadable = stamp
                    log.error("no Tinker key is accepted: the key store's revocation list cannot be read (%s)",
                              error.message if isinstance(error, ValidationError) else type(error).__name__)
                raise AuthenticationError("this trainer cannot read its Tinker key revocation list: no key is "
                                          "accepted until its operator repairs it") from None
            if stamp == self._stamp and revoked == self._revoked:
                return
            entries = self._authentic(_read(self.path)) if st is not None else []
            # An entry still there when its key was revoked is removed by the revoking command right after (refused
            # meanwhile, silently); one in a key file written after the revocation list was put back there.
            restored = st is not None and (rst is None or st.st_ctime_ns > rst.st_ctime_ns)
            for entry in [e for e in entries if e["digest"] in revoked]:
                entries.remove(entry)
                self._refuse_revoked(entry, restored)
            known = self._by_digest  # keep each key's object (and its refusal budget) across re-reads
            self._by_digest = {
                e["digest"]: known.get(e["digest"])
                or Principal.tinker_key(e["digest"][:16], check_tenant(e["tenant_id"]), e.get("name", ""))
                for e in entries}
            self._stamp, self._revoked = stamp, revoked

    def _tell(self, entry: dict, reason: str) -> None:
        if self._on_refused is not None:
            if self._hook_takes_reason:
                self._on_refused(entry, reason=reason)
            else:
                self._on_refused(entry)

    def _refuse_revoked(self, entry: dict, restored: bool) -> None:
        """The entry of a revoked key, refused: logged and audited once where it was put back."""
        fingerprint = hashlib.sha256(canonical_json(entry)).hexdigest()
        if restored and fingerprint not in self._refused:
            self._refused.add(fingerprint)
            log.warning("refused the entry of revoked Tinker key %s of tenant %r: put back in the key file",
                        entry["digest"][:16], entry["tenant_id"])
            self._tell(entry, RESTORED)

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
                self._tell(entry if isinstance(entry, dict) else {}, NOT_VERIFIED)
        return kept

    def resolve(self, presented: str) -> Principal:
        if not presented.startswith(KEY_PREFIX):
            raise AuthenticationError("missing or wrong Tinker API key (X-API-Key: tml-...); create one with "
                                      "`tensafe tinker-key create --tenant T`")
        self._refresh()
        # A dictionary lookup by SHA-256: what its timing can leak is about the hash, not the key.
        key = self._by_digest.get(_digest(presented))
        if key is None:
            raise AuthenticationError("unknown Tinker API key for this trainer")
        return key
