"""Signed privacy receipts: what a saved or exported model claims about its privacy, checkable offline.

A receipt is a JSON object::

    {"format": "tensafe-receipt/v1", "alg": "Ed25519", "key_id": <16 hex: SHA-256 of the raw public key>,
     "payload": <the claims as a JSON string>, "signature": <base64 Ed25519 signature>}

The signature is over ``b"tensafe-receipt/v1\\n" + payload`` (UTF-8), so a verifier in any language checks
the exact bytes that were signed and needs no JSON canonicalisation; the claims are ``json.loads(payload)``
once the signature holds. Each tenant has its own signing key (in its key set; on Kubernetes in its key
Secret); ``ServiceClient.receipt_public_key()`` gives the public half as PEM. docs/privacy.md lists the claims.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any, Union

from .errors import ReceiptVerificationError

FORMAT = "tensafe-receipt/v1"
ALG = "Ed25519"
_DOMAIN = FORMAT.encode() + b"\n"


def _raw_public(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key) -> str:
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]


def public_key_pem(private_key) -> str:
    from cryptography.hazmat.primitives import serialization

    return private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def sign_receipt(claims: dict[str, Any], private_key) -> dict[str, str]:
    """``private_key``: an ``Ed25519PrivateKey``. The claims must be JSON (finite floats)."""
    payload = json.dumps(claims, sort_keys=True, separators=(",", ":"), allow_nan=False)
    signature = private_key.sign(_DOMAIN + payload.encode())
    return {"format": FORMAT, "alg": ALG, "key_id": key_id(private_key.public_key()), "payload": payload,
            "signature": base64.b64encode(signature).decode()}


def _load_public_key(public_key):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if isinstance(public_key, Ed25519PublicKey):
        return public_key
    if isinstance(public_key, Path) or (isinstance(public_key, str) and "BEGIN" not in public_key):
        public_key = Path(public_key).read_text()
    try:
        key = serialization.load_pem_public_key(public_key.encode() if isinstance(public_key, str) else public_key)
    except (ValueError, TypeError) as error:
        raise ReceiptVerificationError(f"not a PEM public key: {error}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ReceiptVerificationError("the public key is not an Ed25519 key")
    return key


def verify_receipt(receipt: Union[dict, str, bytes, Path], public_key) -> dict[str, Any]:
    """The receipt's claims, once its signature verifies under ``public_key`` (PEM text or bytes, a path to a
    PEM file, or an ``Ed25519PublicKey``); ``receipt`` is the dict, its JSON text, or a path to a file of it.
    Raises ReceiptVerificationError on any change to the receipt or a different key."""
    from cryptography.exceptions import InvalidSignature

    if isinstance(receipt, Path) or (isinstance(receipt, str) and not receipt.lstrip().startswith("{")):
        receipt = Path(receipt).read_text()
    if isinstance(receipt, (str, bytes)):
        try:
            receipt = json.loads(receipt)
        except ValueError:
            raise ReceiptVerificationError("the receipt is not JSON") from None
    if not isinstance(receipt, dict) or receipt.get("format") != FORMAT or receipt.get("alg") != ALG \
            or not isinstance(receipt.get("payload"), str) or not isinstance(receipt.get("signature"), str):
        raise ReceiptVerificationError(f"not a {FORMAT} receipt (format, alg, payload and signature are required)")
    key = _load_public_key(public_key)
    if receipt.get("key_id") != key_id(key):
        raise ReceiptVerificationError(f"the receipt was signed by key {receipt.get('key_id')!r}, not by this public "
                                       f"key ({key_id(key)}): another tenant's or trainer's key")
    try:
        signature = base64.b64decode(receipt["signature"], validate=True)
        if base64.b64encode(signature).decode() != receipt["signature"]:  # one encoding only: no malleable padding
            raise ValueError("non-canonical base64")
        key.verify(signature, _DOMAIN + receipt["payload"].encode())
    except (InvalidSignature, ValueError):
        raise ReceiptVerificationError("the receipt's signature does not verify: it was changed after signing") \
            from None
    return json.loads(receipt["payload"])
