"""Sealed operation parameters: a save's name and metadata, encrypted for the trainer, for Kubernetes objects.

On Kubernetes a save is a ``TrainingOperation`` object, kept in etcd, copied into backups and shown to
anyone who may read it. Its user-chosen parameters (``name``, ``metadata``) travel there as
``spec.parameters.sealed``: AES-256-GCM under a key derived from the tenant's audit key (its key set, in
the tenant's key Secret, which the SDK reads for the trainer's token anyway), bound to the training client's
name. The trainer opens it; shredding the tenant's key set leaves it unreadable. The key follows the tenant's
active secrets generation (tensafe_keys.store): a rotation replaces it, so a leaked key set's sealing key opens
nothing sealed after the rotation, and parameters sealed before it no longer open (submit the operation again).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from typing import Any

from .errors import ValidationError

_LABEL = b"tensafe/sealed-parameters/v1"


def sealing_key(keyset: dict) -> bytes:
    """The key of sealed parameters, from a tenant's key set (``{"audit": base64, ...}``): its active generation's."""
    if "audit" not in keyset:
        raise ValidationError("the tenant's key set has no audit key to seal parameters with")
    return hmac.new(base64.b64decode(keyset["audit"]), _LABEL, hashlib.sha256).digest()


def _aad(client_name: str) -> bytes:
    return _LABEL + b"\n" + client_name.encode()


def seal(key: bytes, client_name: str, parameters: dict[str, Any]) -> str:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, json.dumps(parameters, sort_keys=True).encode(), _aad(client_name))
    return base64.b64encode(nonce + sealed).decode()


def unseal(key: bytes, client_name: str, blob: str) -> dict[str, Any]:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        raw = base64.b64decode(blob, validate=True)
        parameters = json.loads(AESGCM(key).decrypt(raw[:12], raw[12:], _aad(client_name)))
    except (InvalidTag, ValueError, TypeError):
        raise ValidationError(f"the sealed parameters do not open for training client {client_name!r}: sealed for "
                              "another client or tenant, under a key since rotated, or changed",
                              {"field": "parameters.sealed"}) from None
    if not isinstance(parameters, dict):
        raise ValidationError("the sealed parameters are not an object", {"field": "parameters.sealed"})
    return parameters
