"""Just enough of the Kubernetes protobuf encoding to read what kubectl writes.

kubectl sends built-in objects (``kubectl create namespace``, ``create secret``, ``apply`` of a
ConfigMap) as ``application/vnd.kubernetes.protobuf`` and does not fall back to JSON. This decodes the
envelope and the few kinds people create by hand on a test cluster; anything else gets a clear 415.
"""

from __future__ import annotations

import base64
from typing import Any, Callable

MAGIC = b"k8s\x00"


def _fields(data: bytes) -> list[tuple[int, Any]]:
    """(field number, value) pairs: varints as int, length-delimited as bytes."""
    out, i = [], 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            size, i = _varint(data, i)
            value, i = data[i:i + size], i + size
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((number, value))
    return out


def _varint(data: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7


def _text(value: bytes) -> str:
    return value.decode()


def _map(pairs: list[bytes], value: Callable[[bytes], Any] = _text) -> dict[str, Any]:
    result = {}
    for entry in pairs:
        parts = dict(_fields(entry))
        result[_text(parts.get(1, b""))] = value(parts.get(2, b""))
    return result


def _metadata(data: bytes) -> dict[str, Any]:
    fields = _fields(data)
    meta: dict[str, Any] = {}
    for number, key in ((1, "name"), (2, "generateName"), (3, "namespace"), (6, "resourceVersion")):
        values = [v for n, v in fields if n == number]
        if values and values[-1]:  # proto2 writes unset strings as empty ones
            meta[key] = _text(values[-1])
    labels = _map([v for n, v in fields if n == 11])
    annotations = _map([v for n, v in fields if n == 12])
    finalizers = [_text(v) for n, v in fields if n == 14]
    meta.update({k: v for k, v in (("labels", labels), ("annotations", annotations), ("finalizers", finalizers)) if v})
    return meta


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _namespace(fields) -> dict:
    return {}


def _secret(fields) -> dict:
    body: dict[str, Any] = {"data": _map([v for n, v in fields if n == 2], _b64)}
    string_data = _map([v for n, v in fields if n == 4])
    body["data"].update({k: _b64(v.encode()) for k, v in string_data.items()})
    types = [_text(v) for n, v in fields if n == 3]
    body["type"] = (types[-1] if types else "") or "Opaque"
    return body


def _config_map(fields) -> dict:
    body: dict[str, Any] = {"data": _map([v for n, v in fields if n == 2])}
    binary = _map([v for n, v in fields if n == 3], _b64)
    if binary:
        body["binaryData"] = binary
    return body


KINDS: dict[str, Callable[[list], dict]] = {"Namespace": _namespace, "Secret": _secret, "ConfigMap": _config_map,
                                            "ServiceAccount": _namespace}


def decode(payload: bytes) -> dict:
    """A protobuf-encoded object as the JSON object it stands for; ValueError if this cannot read it."""
    if not payload.startswith(MAGIC):
        raise ValueError("not a Kubernetes protobuf payload")
    envelope = dict(_fields(payload[len(MAGIC):]))
    type_meta = dict(_fields(envelope.get(1, b"")))
    api_version, kind = _text(type_meta.get(1, b"")), _text(type_meta.get(2, b""))
    if kind not in KINDS:
        raise ValueError(f"this API server reads protobuf only for {sorted(KINDS)}, not {kind!r}: send JSON")
    fields = _fields(envelope.get(2, b""))
    metadata = next((_metadata(v) for n, v in fields if n == 1), {})
    return {"apiVersion": api_version, "kind": kind, "metadata": metadata, **KINDS[kind](fields)}
