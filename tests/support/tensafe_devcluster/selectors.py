"""Label and field selectors, as the API server parses them from ``?labelSelector=`` and ``?fieldSelector=``."""

from __future__ import annotations

import re
from typing import Any, Callable

_SET = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split(selector: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, current = [], 0, ""
    for char in selector:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p.strip() for p in parts + [current] if p.strip()]


def label_matcher(selector: str) -> Callable[[dict], bool]:
    tests: list[Callable[[dict], bool]] = []
    for term in _split(selector or ""):
        if match := _SET.match(term):
            key, op, values = match.group(1), match.group(2), {v.strip() for v in match.group(3).split(",")}
            tests.append(lambda l, k=key, vs=values, neg=(op == "notin"): (l.get(k) in vs) != neg
                         if k in l else neg)
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            tests.append(lambda l, k=key, v=value: l.get(k) != v)
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            tests.append(lambda l, k=key, v=value: l.get(k) == v)
        elif term.startswith("!"):
            tests.append(lambda l, k=term[1:].strip(): k not in l)
        else:
            tests.append(lambda l, k=term: k in l)
    return lambda obj: all(test(obj.get("metadata", {}).get("labels") or {}) for test in tests)


def _field(obj: dict, path: str) -> Any:
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def field_matcher(selector: str) -> Callable[[dict], bool]:
    tests: list[Callable[[dict], bool]] = []
    for term in _split(selector or ""):
        negate = "!=" in term
        key, value = (s.strip() for s in term.replace("!=", "=").replace("==", "=").split("=", 1))
        tests.append(lambda o, k=key, v=value, n=negate: (str(_field(o, k) or "") == v) != n)
    return lambda obj: all(test(obj) for test in tests)
