"""Signed privacy receipts: what a saved or exported model claims about its privacy, checkable offline.

A receipt is a JSON object::

    {"format": "tensafe-receipt/v1", "alg": "Ed25519", "key_id": <16 hex: SHA-256 of the raw public key>,
     "payload": <the claims as a JSON string>, "signature": <base64 Ed25519 signature>}

The signature is over ``b"tensafe-receipt/v1\\n" + payload`` (UTF-8), so a verifier in any language checks
the exact bytes that were signed and needs no JSON canonicalisation; the claims are ``json.loads(payload)``
once the signature holds. Each tenant has its own signing key (in its key set; on Kubernetes in its key
Secret); ``ServiceClient.receipt_public_key()`` gives the public half as PEM. docs/privacy.md lists the claims.

Key rotation (``tensafe artifact rotate``) replaces the signing key; the old private key is destroyed and its
public half stays in the tenant's *receipt key list* (``KeyProvider.receipt_public_keys``, served at
``GET /v1/receipts/public_keys``)::

    {"format": "tensafe-receipt-keys/v1", "tenant_id": ..., "keys": [
        {"key_id", "public_key": PEM, "status": "active", "retired_at": null},
        {"key_id", "public_key": PEM, "status": "retired", "retired_at": <audit sequence>}, ...]}

``verify_receipt`` given that list picks the key by the receipt's ``key_id`` and accepts a retired key only
for a receipt whose ``audit_head`` (the tenant's chain head when it was signed) comes before the retirement:
a receipt made with a leaked key after the rotation names a later head and is refused. A receipt cannot
be dated better than the head it names: whoever holds a retired private key can still sign a receipt that
names an older head. Against that, check the receipt's head against the tenant's audit chain (the entry at
that sequence must be the save or export of that artifact). Given a single PEM key, ``verify_receipt``
checks the signature under that key only (it knows nothing of rotation).
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Union

from .errors import ReceiptVerificationError

FORMAT = "tensafe-receipt/v1"
ALG = "Ed25519"
_DOMAIN = FORMAT.encode() + b"\n"
KEYS_FORMAT = "tensafe-receipt-keys/v1"  # a tenant's receipt key list (tensafe_keys.store.receipt_public_keys_of)


def raw_public_key(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key) -> str:
    return hashlib.sha256(raw_public_key(public_key)).hexdigest()[:16]


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


def _key_list(public_key) -> Optional[dict]:
    """``public_key`` as a receipt key list (dict, its JSON text or bytes, or a path to a file of it), or None
    where it is a single key."""
    if isinstance(public_key, dict):
        doc = public_key
    else:
        text = public_key
        if isinstance(text, Path) or (isinstance(text, str) and "BEGIN" not in text and not text.lstrip().startswith("{")):
            try:
                text = Path(text).read_text()
            except OSError as error:
                raise ReceiptVerificationError(f"cannot read the public key: {error}") from None
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        if not isinstance(text, str) or not text.lstrip().startswith("{"):
            return None
        try:
            doc = json.loads(text)
        except ValueError:
            raise ReceiptVerificationError("the public key file is neither PEM nor a receipt key list") from None
    if not isinstance(doc, dict) or doc.get("format") != KEYS_FORMAT or not isinstance(doc.get("keys"), list):
        raise ReceiptVerificationError(f"not a {KEYS_FORMAT} key list")
    return doc


def _parse_receipt(receipt) -> dict:
    source = "the receipt"
    if isinstance(receipt, Path) or (isinstance(receipt, str) and not receipt.lstrip().startswith("{")):
        source = f"the receipt {receipt}"
        try:  # an error names the file, never its content
            receipt = Path(receipt).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise ReceiptVerificationError(f"{source} is not UTF-8 text (not a receipt)") from None
    if isinstance(receipt, (str, bytes)):
        try:
            receipt = json.loads(receipt)
        except ValueError:
            raise ReceiptVerificationError(f"{source} is not JSON") from None
    if not isinstance(receipt, dict) or receipt.get("format") != FORMAT or receipt.get("alg") != ALG \
            or not isinstance(receipt.get("payload"), str) or not isinstance(receipt.get("signature"), str):
        raise ReceiptVerificationError(f"not a {FORMAT} receipt (format, alg, payload and signature are required)")
    return receipt


def verify_receipt(receipt: Union[dict, str, bytes, Path], public_key) -> dict[str, Any]:
    """The receipt's claims, once its signature verifies. ``public_key``: PEM text or bytes, a path to a PEM
    file, an ``Ed25519PublicKey``, or the tenant's receipt key list (a dict, its JSON, or a path to it: see the
    module's docstring), which also refuses a retired key's receipt made after its retirement. ``receipt`` is
    the dict, its JSON text, or a path to a file of it. Raises ReceiptVerificationError on any change to the
    receipt, a different key, or a retired key used after its retirement."""
    receipt = _parse_receipt(receipt)
    listed = _key_list(public_key)
    if listed is None:
        return _verified(receipt, _load_public_key(public_key))
    entry = next((k for k in listed["keys"] if isinstance(k, dict) and k.get("key_id") == receipt.get("key_id")), None)
    if entry is None:
        raise ReceiptVerificationError(f"the receipt was signed by key {receipt.get('key_id')!r}, which is none of "
                                       f"tenant {listed.get('tenant_id')!r}'s receipt keys, current or retired")
    pem = entry.get("public_key")
    if not isinstance(pem, str) or "BEGIN" not in pem:
        raise ReceiptVerificationError(f"key {entry.get('key_id')!r} of the key list is not a PEM public key")
    claims = _verified(receipt, _load_public_key(pem))
    if listed.get("tenant_id") is not None and claims.get("tenant") not in (None, listed["tenant_id"]):
        raise ReceiptVerificationError(f"the receipt is tenant {claims.get('tenant')!r}'s, not "
                                       f"{listed['tenant_id']!r}'s")
    if entry.get("status") != "active":
        retired_at = entry.get("retired_at")
        head = claims.get("audit_head")
        sequence = head.get("sequence") if isinstance(head, dict) else None
        if not isinstance(retired_at, int) or not isinstance(sequence, int) or isinstance(sequence, bool):
            raise ReceiptVerificationError(f"the receipt was signed by key {entry.get('key_id')}, since retired, and "
                                           "names no audit head to place it before the retirement")
        if sequence >= retired_at:
            raise ReceiptVerificationError(
                f"the receipt was signed by key {entry.get('key_id')} after its retirement at audit sequence "
                f"{retired_at} (it names audit head {sequence}): a retired key signs nothing new")
    return claims


def _verified(receipt: dict, key) -> dict[str, Any]:
    from cryptography.exceptions import InvalidSignature

    if receipt.get("key_id") != key_id(key):
        raise ReceiptVerificationError(f"the receipt was signed by key {receipt.get('key_id')!r}, not by this public "
                                       f"key ({key_id(key)}): another tenant's or trainer's key, or a key since "
                                       "rotated (verify with the tenant's receipt key list)")
    try:
        signature = base64.b64decode(receipt["signature"], validate=True)
        if base64.b64encode(signature).decode() != receipt["signature"]:  # one encoding only: no malleable padding
            raise ValueError("non-canonical base64")
        key.verify(signature, _DOMAIN + receipt["payload"].encode())
    except (InvalidSignature, ValueError):
        raise ReceiptVerificationError("the receipt's signature does not verify: it was changed after signing") \
            from None
    return json.loads(receipt["payload"])
