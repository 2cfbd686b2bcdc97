"""What the API server does with a custom resource's structural schema: defaults, pruning, validation,
and the four CEL transition-rule shapes this project's CRDs use.

CEL itself is not implemented: rules of any other shape are skipped (and listed by
``unsupported_rules``), which the README states as a gap of the test cluster.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Iterator

import jsonschema_rs

_HAS_RULE = re.compile(r"^has\(self\.(\w+)\) == has\(oldSelf\.(\w+)\)$")
_EQUAL_RULE = "self == oldSelf"
_MONOTONIC_RULE = "self >= oldSelf"  # numbers
_GROWING_RULE = "size(self) >= size(oldSelf)"  # lists
_SIMPLE_RULES = (_EQUAL_RULE, _MONOTONIC_RULE, _GROWING_RULE)


def apply_defaults(value: Any, schema: dict) -> Any:
    """Fill in ``default`` of absent properties, recursively, as the API server does before storing."""
    if isinstance(value, dict) and schema.get("type") == "object":
        for name, sub in (schema.get("properties") or {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(value[name], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name in value:
                if name not in (schema.get("properties") or {}):
                    value[name] = apply_defaults(value[name], extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


def prune(value: Any, schema: dict, path: str = "") -> tuple[Any, list[str]]:
    """Drop fields the schema does not know; returns the pruned value and the dropped paths."""
    dropped: list[str] = []
    if schema.get("x-kubernetes-preserve-unknown-fields") and not schema.get("properties"):
        return value, dropped
    if isinstance(value, dict) and schema.get("type") == "object":
        known = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        result = {}
        for name, item in value.items():
            sub = known.get(name) if name in known else (extra if isinstance(extra, dict) else None)
            if sub is None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                dropped.append(f"{path}.{name}".lstrip("."))
                continue
            result[name], more = prune(item, sub or {}, f"{path}.{name}")
            dropped += more
        return result, dropped
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        pruned = []
        for index, item in enumerate(value):
            item, more = prune(item, schema["items"], f"{path}[{index}]")
            pruned.append(item)
            dropped += more
        return pruned, dropped
    return value, dropped


def to_json_schema(schema: Any) -> Any:
    """OpenAPI v3 (structural) to JSON Schema: ``nullable`` becomes a null type, extensions go."""
    if isinstance(schema, list):
        return [to_json_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: to_json_schema(value) for key, value in schema.items()
              if not key.startswith("x-kubernetes-") and key not in ("nullable", "format")}
    if schema.get("nullable") and "type" in result:
        result["type"] = [result["type"], "null"]
    if schema.get("x-kubernetes-int-or-string"):
        result["type"] = ["integer", "string"]
    return result


def schema_errors(value: Any, schema: dict) -> list[str]:
    """Messages in the API server's shape: ``spec.training.lora_config.rank: Invalid value: 0: ...``."""
    validator = jsonschema_rs.Draft4Validator(to_json_schema(schema))
    messages = []
    for error in validator.iter_errors(value):
        path = ".".join(str(part) for part in error.instance_path) or "<root>"
        messages.append(f"{path}: Invalid value: {_short(error.instance)}: {error.message}")
    return sorted(messages)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _rules(schema: dict, path: str) -> Iterator[tuple[str, dict, dict]]:
    for rule in schema.get("x-kubernetes-validations") or []:
        yield path, schema, rule
    for name, sub in (schema.get("properties") or {}).items():
        yield from _rules(sub, f"{path}.{name}".lstrip("."))


def _at(value: Any, path: str) -> tuple[bool, Any]:
    for part in [p for p in path.split(".") if p]:
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def transition_errors(new: Any, old: Any, schema: dict) -> list[str]:
    """Evaluate ``self == oldSelf``, ``self >= oldSelf``, ``size(self) >= size(oldSelf)`` and
    ``has(self.f) == has(oldSelf.f)`` rules on an update."""
    messages = []
    for path, _, rule in _rules(schema, ""):
        has_new, new_value = _at(new, path)
        has_old, old_value = _at(old, path)
        if not (has_new and has_old):
            continue  # like CEL transition rules: only when the field exists on both sides
        text = rule["rule"].strip()
        if text == _EQUAL_RULE:
            ok = new_value == old_value
        elif text == _MONOTONIC_RULE:
            ok = not (isinstance(new_value, (int, float)) and isinstance(old_value, (int, float))) or \
                new_value >= old_value
        elif text == _GROWING_RULE:
            ok = not (isinstance(new_value, list) and isinstance(old_value, list)) or len(new_value) >= len(old_value)
        elif (match := _HAS_RULE.match(text)) and match.group(1) == match.group(2):
            field = match.group(1)
            ok = isinstance(new_value, dict) and isinstance(old_value, dict) and \
                ((field in new_value) == (field in old_value))
        else:
            continue
        if not ok:
            messages.append(f"{path or '<root>'}: Invalid value: \"object\": {rule.get('message', text)}")
    return messages


def unsupported_rules(schema: dict) -> list[str]:
    return [rule["rule"] for _, _, rule in _rules(schema, "")
            if rule["rule"].strip() not in _SIMPLE_RULES and not _HAS_RULE.match(rule["rule"].strip())]
