"""Tenant key sets in a Kubernetes Secret: the key provider of the operator and of admin tools.

The Secret named by a ``TrainingClient``'s ``spec.keySecretRef`` holds, under ``<tenant>.json``, the
same key-set document :class:`~tensafe_keys.store.LocalKeyProvider` keeps in a file. The trainer pod
mounts that one key read-only as a file, so inside the pod the local provider reads it unchanged and the
pod needs no API access. Rotation and crypto-shredding go through the API, with this provider; the artifacts'
data keys are on the trainer's data-key volume (``artifact_keys``: a copy of it, or where it is mounted).
"""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from typing import Any, Optional

from tg_tinker.resources import keyset_key

from .store import ArtifactKeyFolder, KeyProvider


class KubernetesSecretKeyProvider(KeyProvider):
    """``core_v1`` is a ``kubernetes.client.CoreV1Api``; the Secret is created on first use."""

    def __init__(self, core_v1: Any, namespace: str, secret_name: str, artifact_keys: Optional[Path] = None):
        self.api, self.namespace, self.secret_name = core_v1, namespace, secret_name
        self._artifact_keys = ArtifactKeyFolder(artifact_keys) if artifact_keys is not None else None
        self._read_version: dict[str, str] = {}  # tenant -> the Secret's resourceVersion its key set was read at

    def _secret(self):
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.read_namespaced_secret(self.secret_name, self.namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def _load(self, tenant_id: str) -> dict | None:
        secret = self._secret()
        if secret is not None:
            self._read_version[tenant_id] = secret.metadata.resource_version
        else:
            self._read_version.pop(tenant_id, None)
        raw = ((secret.data or {}) if secret is not None else {}).get(keyset_key(tenant_id))
        return json.loads(base64.b64decode(raw)) if raw else None

    def _store(self, tenant_id: str, keyset: dict) -> None:
        """Write a key set computed from what ``_load`` read, only if the Secret has not changed since: two
        rotations at once must not silently drop a key (the API answers 409 to the second)."""
        encoded = base64.b64encode(json.dumps(keyset).encode()).decode()
        self._patch_or_create({keyset_key(tenant_id): encoded}, self._read_version.pop(tenant_id, None))

    def shred(self, tenant_id: str) -> None:
        if self._secret() is not None:
            self.api.patch_namespaced_secret(self.secret_name, self.namespace, {"data": {keyset_key(tenant_id): None}})
        if self._artifact_keys is not None:
            self._artifact_keys.shred(tenant_id)

    def _store_secret(self, name: str) -> bytes:
        """A key-store secret (``names.key``: keys.py) in the Secret, beside the key sets; a trainer pod reads it
        from the mounted file of the same name."""
        value = self.get_value(f"{name}.key")
        if value is None:
            value = base64.b64encode(secrets.token_bytes(32))
            self.put_value(f"{name}.key", value)
        return base64.b64decode(value)

    def put_value(self, key: str, value: bytes) -> None:
        """Store another value (the trainer's bearer token) beside the key sets."""
        self._patch_or_create({key: base64.b64encode(value).decode()})

    def get_value(self, key: str) -> bytes | None:
        secret = self._secret()
        raw = ((secret.data or {}) if secret is not None else {}).get(key)
        return base64.b64decode(raw) if raw else None

    def _patch_or_create(self, data: dict[str, str], expected_version: str | None = None) -> None:
        from kubernetes.client.exceptions import ApiException

        from tg_tinker.errors import TGTinkerError

        if expected_version is not None:
            try:
                self.api.patch_namespaced_secret(self.secret_name, self.namespace, {
                    "metadata": {"resourceVersion": expected_version}, "data": data})
                return
            except ApiException as error:
                if error.status == 409:
                    raise TGTinkerError(f"Secret {self.namespace}/{self.secret_name} changed while its keys were "
                                        "being updated; nothing was written, try again") from None
                raise
        if self._secret() is None:
            body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "data": data,
                    "metadata": {"name": self.secret_name, "namespace": self.namespace,
                                 "labels": {"app.kubernetes.io/managed-by": "tensafe-operator"}}}
            try:
                self.api.create_namespaced_secret(self.namespace, body)
                return
            except ApiException as error:
                if error.status != 409:  # someone else created it meanwhile: patch theirs
                    raise
        self.api.patch_namespaced_secret(self.secret_name, self.namespace, {"data": data})
