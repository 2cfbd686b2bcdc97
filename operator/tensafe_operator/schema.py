"""pydantic JSON Schema -> Kubernetes structural OpenAPI v3 schema.

The custom resource's ``spec.training`` is the SDK's ``TrainingConfig``, so its schema is generated
from that one model rather than written twice. Kubernetes wants structural schemas: no ``$ref``, no
``anyOf`` for optional values (``nullable: true`` instead), OpenAPI 3.0 boolean ``exclusiveMinimum``.
"""

from __future__ import annotations

from typing import Any

KEEP = ("type", "description", "enum", "minimum", "maximum", "minLength", "maxLength", "pattern", "minItems",
        "maxItems", "format")


def structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        return structural({**defs[schema["$ref"].split("/")[-1]], **{k: v for k, v in schema.items()
                                                                    if k not in ("$ref",)}}, defs)
    if "anyOf" in schema:
        options = [s for s in schema["anyOf"] if s.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express a union of {len(options)} types structurally: {schema}")
        inner = structural(options[0], defs)
        if len(options) < len(schema["anyOf"]):
            inner["nullable"] = True
        if "description" in schema:
            inner.setdefault("description", schema["description"])
        if schema.get("default") is not None:
            inner["default"] = schema["default"]
        return inner
    out = {k: schema[k] for k in KEEP if k in schema}
    for bound, flag in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in schema:
            out[flag] = schema[bound]
            out[bound] = True
    if schema.get("default") is not None and not isinstance(schema["default"], (dict, list)):
        out["default"] = schema["default"]
    kind = schema.get("type")
    if kind == "object":
        if "properties" in schema:
            out["properties"] = {name: structural(sub, defs) for name, sub in schema["properties"].items()}
            if schema.get("required"):
                out["required"] = list(schema["required"])
        else:  # a free-form mapping
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        if "prefixItems" in schema:  # a fixed-length tuple of one item type
            item_types = {structural(s, defs)["type"] for s in schema["prefixItems"]}
            if len(item_types) != 1:
                raise ValueError(f"tuple of mixed types {item_types}")
            out["items"] = {"type": item_types.pop()}
            out["minItems"] = out["maxItems"] = len(schema["prefixItems"])
        else:
            out["items"] = structural(schema["items"], defs)
    return out


def model_schema(model) -> dict[str, Any]:
    schema = model.model_json_schema()
    return structural(schema, schema.get("$defs", {}))
