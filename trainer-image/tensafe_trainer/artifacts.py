"""The artifact store: encrypted files on a local filesystem (a PersistentVolume in Kubernetes).

Layout: ``<root>/<tenant>/<artifact_id>.tsa``, the encrypted artifact. It describes itself: its header
carries the ids, kind, step and name (never user metadata, which travels encrypted inside the payload).
Artifact files go to a temporary name, are fsynced and renamed, so a reader sees the old state or the
new one and never half of either.

Beside each sits ``<artifact_id>.json``, an index entry (the description plus size, content hash and
key id) so that listing does not hash every file. It is not fsynced: the artifact file is the truth,
and an entry that is missing, torn by a crash or out of date is rebuilt from it. That keeps a save at
one file fsync and one folder fsync, like a plain ``torch.save``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import BinaryIO, Callable, Optional

from tg_tinker.errors import ArtifactIntegrityError, ArtifactNotFoundError
from tg_tinker.types import ArtifactInfo

from . import crypto
from .keys import KeyProvider, check_tenant

log = logging.getLogger(__name__)

ARTIFACT_ID = re.compile(r"^art-[0-9a-f]{32}$")


def new_artifact_id() -> str:
    return f"art-{secrets.token_hex(16)}"


def check_artifact_id(artifact_id: str) -> str:
    if not isinstance(artifact_id, str) or not ARTIFACT_ID.match(artifact_id):
        raise ArtifactNotFoundError(f"no artifact {artifact_id!r}: artifact ids look like art-<32 hex digits>",
                                    {"artifact_id": str(artifact_id)[:80]})
    return artifact_id


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write, durable: bool = True) -> None:
    """Temporary name, then rename; ``durable`` fsyncs the file before the rename. The folder's fsync is
    the caller's: one, after all of its renames, makes them all durable."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ArtifactStore:
    def __init__(self, root: Path, keys: KeyProvider):
        self.root = Path(root)
        self.keys = keys
        self.root.mkdir(parents=True, exist_ok=True)

    def remove_partial_writes(self) -> list[Path]:
        """Delete temporary files a crash left behind (never valid artifacts). Only at trainer start:
        while it runs, engines write their own temporary files into the same folders."""
        leftovers = list(self.root.glob("*/.*.tmp"))
        for path in leftovers:
            path.unlink(missing_ok=True)
        return leftovers

    def _dir(self, tenant_id: str) -> Path:
        folder = self.root / check_tenant(tenant_id)
        folder.mkdir(exist_ok=True)
        return folder

    def _paths(self, tenant_id: str, artifact_id: str) -> tuple[Path, Path]:
        folder = self._dir(tenant_id)
        check_artifact_id(artifact_id)
        return folder / f"{artifact_id}.tsa", folder / f"{artifact_id}.json"

    def put(self, plaintext: bytes | Callable[[BinaryIO], None], *, tenant_id: str, training_client_id: str,
            kind: str, step: int, name: Optional[str] = None, artifact_id: Optional[str] = None) -> ArtifactInfo:
        """Encrypt and store. ``plaintext`` is the payload, or a function that writes it to a file object
        (so a checkpoint streams from ``torch.save`` into the cipher without a copy in memory)."""
        artifact_id = artifact_id or new_artifact_id()
        data_path, index_path = self._paths(tenant_id, artifact_id)
        binding = crypto.Binding(tenant_id, training_client_id, artifact_id)
        description = {"kind": kind, "step": step, "name": name, "created_at": time.time()}
        produce = plaintext if callable(plaintext) else (lambda w: w.write(plaintext))
        written: list[crypto.Encrypted] = []
        _atomic_write(data_path, lambda f: written.append(
            crypto.encrypt_stream(f, produce, binding, self.keys, description)))
        info = _describe(binding, description, written[0])
        _write_index(index_path, info)
        fsync_dir(data_path.parent)  # makes both renames durable
        return info

    def _not_found(self, tenant_id: str, artifact_id: str) -> ArtifactNotFoundError:
        return ArtifactNotFoundError(f"no artifact {artifact_id!r} for tenant {tenant_id!r}",
                                     {"artifact_id": artifact_id})

    def info(self, tenant_id: str, artifact_id: str) -> ArtifactInfo:
        data_path, index_path = self._paths(tenant_id, artifact_id)
        try:
            src = open(data_path, "rb")
        except FileNotFoundError:
            raise self._not_found(tenant_id, artifact_id) from None
        with src:
            header, _ = crypto.read_header(src)
            size = os.fstat(src.fileno()).st_size
            indexed = _read_index(index_path)
            if indexed and (indexed.artifact_id, indexed.size_bytes, indexed.key_id) == (artifact_id, size,
                                                                                          header["kid"]):
                return indexed
            return _reindex(src, header, tenant_id, artifact_id, index_path)

    def read_raw(self, tenant_id: str, artifact_id: str) -> bytes:
        """The ciphertext exactly as stored (the reader checks it against ``info().content_hash``)."""
        try:
            return self._paths(tenant_id, artifact_id)[0].read_bytes()
        except FileNotFoundError:
            raise self._not_found(tenant_id, artifact_id) from None

    def get(self, tenant_id: str, artifact_id: str, training_client_id: str = "") -> bytes:
        """Decrypted payload. ``training_client_id`` restricts it to that client's artifacts."""
        info = self.info(tenant_id, artifact_id)
        data_path = self._paths(tenant_id, artifact_id)[0]
        binding = crypto.Binding(tenant_id, training_client_id or info.training_client_id, artifact_id)
        with open(data_path, "rb") as f:
            return crypto.decrypt_from(f, os.fstat(f.fileno()).st_size, binding, self.keys)

    def list(self, tenant_id: str, training_client_id: Optional[str] = None) -> list[ArtifactInfo]:
        infos = []
        for data_path in self._dir(tenant_id).glob("art-*.tsa"):
            try:
                info = self.info(tenant_id, data_path.stem)
            except ArtifactNotFoundError:
                continue  # deleted while listing
            except ArtifactIntegrityError as exc:  # one damaged file must not hide the others
                log.warning("not listing artifact %s of tenant %s: %s", data_path.stem, tenant_id, exc)
                continue
            if training_client_id is None or info.training_client_id == training_client_id:
                infos.append(info)
        return sorted(infos, key=lambda i: i.created_at)

    def delete(self, tenant_id: str, artifact_id: str) -> None:
        """Removes the artifact (damaged or not) and then its index entry."""
        if not self._paths(tenant_id, artifact_id)[0].exists():
            raise self._not_found(tenant_id, artifact_id)
        for path in self._paths(tenant_id, artifact_id):
            path.unlink(missing_ok=True)
        fsync_dir(self._dir(tenant_id))

    def rotate(self, tenant_id: str) -> str:
        """Make a new KEK active and re-wrap every artifact's data key under it; payloads stay as they are."""
        kid = self.keys.rotate(tenant_id)
        for info in self.list(tenant_id):
            data_path, index_path = self._paths(tenant_id, info.artifact_id)
            with open(data_path, "rb") as src:
                header, offset = crypto.read_header(src)
                src.seek(offset)
                stored = crypto.rewrap_header(header, self.keys) + src.read()
            _atomic_write(data_path, lambda f, data=stored: f.write(data))
            _write_index(index_path, info.model_copy(update={
                "key_id": kid, "size_bytes": len(stored), "content_hash": hashlib.sha256(stored).hexdigest()}))
        fsync_dir(self._dir(tenant_id))
        return kid


def _describe(binding: crypto.Binding, description: dict, encrypted: crypto.Encrypted) -> ArtifactInfo:
    return ArtifactInfo(
        artifact_id=binding.artifact_id, tenant_id=binding.tenant_id,
        training_client_id=binding.training_client_id, kind=description["kind"], step=description["step"],
        name=description.get("name"), created_at=description["created_at"], size_bytes=encrypted.size,
        content_hash=encrypted.sha256, key_id=encrypted.key_id)


def _reindex(src: BinaryIO, header: dict, tenant_id: str, artifact_id: str, index_path: Path) -> ArtifactInfo:
    """The index entry rebuilt from the artifact file (after a crash, or an interrupted rotation)."""
    crypto.check_binding(header, crypto.Binding(tenant_id, "", artifact_id))  # not a renamed or moved file
    description = header.get("description")
    if not isinstance(description, dict) or not {"kind", "step", "created_at"} <= description.keys():
        raise ArtifactIntegrityError("artifact header is corrupt: description missing")
    src.seek(0)
    digest, size = hashlib.sha256(), 0
    while chunk := src.read(crypto.CHUNK):
        digest.update(chunk)
        size += len(chunk)
    binding = crypto.Binding(tenant_id, header["training_client"], artifact_id)
    info = _describe(binding, description, crypto.Encrypted(size, digest.hexdigest(), header["kid"]))
    _write_index(index_path, info)
    return info


def _write_index(path: Path, info: ArtifactInfo) -> None:
    """Not fsynced: see the module docstring."""
    _atomic_write(path, lambda f: f.write(info.model_dump_json().encode()), durable=False)


def _read_index(path: Path) -> Optional[ArtifactInfo]:
    try:
        return ArtifactInfo.model_validate_json(path.read_bytes())
    except (OSError, ValueError):
        return None
