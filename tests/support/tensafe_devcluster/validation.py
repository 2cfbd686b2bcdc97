"""What the API server does with a custom resource's structural schema: defaults, pruning, validation,
and the CEL rules this project's CRDs use (each evaluated by the Python it stands for, ``_RULES``).

CEL itself is not implemented: rules of any other shape are skipped (and listed by
``unsupported_rules``), which the README states as a gap of the test cluster.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable, Iterator

import jsonschema_rs

_HAS_RULE = re.compile(r"^has\(self\.(\w+)\) == has\(oldSelf\.(\w+)\)$")
_MISSING = object()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same_keys(item: dict, other: dict) -> bool:
    return item.get("noiseMultiplier") == other.get("noiseMultiplier") and \
        item.get("sampleRate") == other.get("sampleRate")


# The CEL rules this project's CRDs use, each as the Python it stands for: (new, old) -> ok. A rule naming
# oldSelf is a transition rule, run only when the value exists on both sides, as the API server does.
_RULES: dict[str, Callable[[Any, Any], bool]] = {
    "self == oldSelf": lambda new, old: new == old,
    "self >= oldSelf": lambda new, old: not (_number(new) and _number(old)) or new >= old,
    "!has(oldSelf.status) || has(self.status)": lambda new, old: "status" not in old or "status" in new,
    "!has(oldSelf.history) || has(self.history)": lambda new, old: "history" not in old or "history" in new,
    "!has(oldSelf.steps) || (has(self.steps) && self.steps >= oldSelf.steps)":
        lambda new, old: "steps" not in old or ("steps" in new and new["steps"] >= old["steps"]),
    "!has(self.history) || (has(self.steps) && self.history.map(e, e.steps).sum() == self.steps)":
        lambda new, old: "history" not in new or ("steps" in new and sum(e["steps"] for e in new["history"])
                                                  == new["steps"]),
    "oldSelf.all(o, self.exists(n, n.noiseMultiplier == o.noiseMultiplier && n.sampleRate == o.sampleRate))":
        lambda new, old: all(any(_same_keys(n, o) for n in new) for o in old),
}


def _rule(text: str) -> Callable[[Any, Any], bool] | None:
    if text in _RULES:
        return _RULES[text]
    match = _HAS_RULE.match(text)
    if match and match.group(1) == match.group(2):
        field = match.group(1)
        return lambda new, old: isinstance(new, dict) and isinstance(old, dict) and \
            ((field in new) == (field in old))
    return None


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
    if isinstance(schema.get("items"), dict):
        yield from _rules(schema["items"], f"{path}[]")


def rule_errors(new: Any, old: Any, schema: dict) -> list[str]:
    """Evaluate the CRD's validation rules on a create (``old`` None) or an update. Items of a list of type
    ``map`` are matched to their old selves by key, as the API server correlates them for transition rules."""
    messages: list[str] = []
    _check(schema, new, _MISSING if old is None else old, "", messages)
    return messages


def _check(schema: dict, new: Any, old: Any, path: str, messages: list[str]) -> None:
    for rule in schema.get("x-kubernetes-validations") or []:
        text = rule["rule"].strip()
        evaluate = _rule(text)
        if evaluate is None or ("oldSelf" in text and old is _MISSING):
            continue
        if not evaluate(new, None if old is _MISSING else old):
            messages.append(f"{path or '<root>'}: Invalid value: \"object\": {rule.get('message', text)}")
    if isinstance(new, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in new:
                before = old.get(name, _MISSING) if isinstance(old, dict) else _MISSING
                _check(sub, new[name], before, f"{path}.{name}".lstrip("."), messages)
    elif isinstance(new, list) and isinstance(schema.get("items"), dict):
        keys = schema.get("x-kubernetes-list-map-keys") if schema.get("x-kubernetes-list-type") == "map" else None
        olds = {tuple(o.get(k) for k in keys): o for o in old if isinstance(o, dict)} \
            if keys and isinstance(old, list) else {}
        for i, item in enumerate(new):
            before = olds.get(tuple(item.get(k) for k in keys), _MISSING) if keys and isinstance(item, dict) \
                else _MISSING
            _check(schema["items"], item, before, f"{path}[{i}]", messages)


def unsupported_rules(schema: dict) -> list[str]:
    return [rule["rule"] for _, _, rule in _rules(schema, "") if _rule(rule["rule"].strip()) is None]
