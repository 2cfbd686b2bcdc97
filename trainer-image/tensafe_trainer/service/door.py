"""The checks both doors (``/v1`` and the Tinker wire) run on a body, in one place.

The Gate (api/gate.py) bounds a body before it is read, by a budget per route (``body_budget`` there and in
api/tinker/routes.py); here: decoding it off the event loop when it is large, refusing what is not a document (400,
``MalformedRequestError``) and reading its fields with their types and ranges (422, ``ValidationError``),
so that no value a caller sends (``Infinity``, ``1e400``, a string where a number goes, a TTL of 1e20)
reaches ``int()``, ``datetime`` or the engine unchecked. ``/v1`` bodies are validated by the wire models
(tg_tinker.wire), which refuse the same inputs with the same statuses.
"""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, TypeVar

import pydantic_core

from tg_tinker.errors import ValidationError
from tg_tinker.wire import malformed_json

CONTROL_BYTES = 64 << 10  # a control call (create, save, poll, list): ids, names, a little metadata
INLINE_BYTES = 32 << 10  # bodies up to this are decoded on the event loop (a thread handoff costs more)
INT64_MAX = (1 << 63) - 1
MAX_TTL_S = 100 * 365 * 86400.0  # a TTL past a century is a mistake (and 1e20 s overflows a date)

T = TypeVar("T")
# One thread for every large decode: decoding holds the GIL, and with many at once the event loop would wait its
# turn behind each of them (measured: 16 padded batches on 16 threads held /healthz for 5.5 s).
_decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensafe-decode")


async def decode(size: int, fn: Callable[..., T], *args) -> T:
    """``fn(*args)`` on the decoding thread when its input (``size`` bytes, or cells) is large, inline when small."""
    if size > INLINE_BYTES:
        return await asyncio.get_running_loop().run_in_executor(_decoder, fn, *args)
    return fn(*args)


def json_object(body: bytes) -> dict:
    """A JSON body that must be an object (an empty body: ``{}``). Parsed by the parser ``/v1``'s wire models use
    (pydantic-core's), so both doors take and refuse the same documents: the same depth limit, NaN and Infinity
    read as floats (and refused by the fields that take numbers)."""
    if not body:
        return {}
    try:
        value = pydantic_core.from_json(body)
    except ValueError:  # not JSON, not UTF-8, or nested past the parser's depth
        raise malformed_json() from None
    if not isinstance(value, dict):
        raise ValidationError("the request body must be a JSON object")
    return value


async def json_body(body: bytes) -> dict:
    return await decode(len(body), json_object, body)


def integer(body: dict, field: str, default: Optional[int] = 0, lo: int = 0, hi: int = INT64_MAX) -> Optional[int]:
    """``body[field]`` as an int in [lo, hi]; ``default`` if absent or null. A float is taken only when whole."""
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{field} must be an integer", {"field": field})
    if not lo <= value <= hi:
        raise ValidationError(f"{field} must be between {lo} and {hi}", {"field": field})
    return value


def number(body: dict, field: str, default: Optional[float] = None, lo: float = 0.0,
           hi: float = math.inf) -> Optional[float]:
    """``body[field]`` as a finite number in [lo, hi]; ``default`` if absent or null."""
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"{field} must be a number", {"field": field})
    value = float(value) if abs(value) < 1e308 else math.inf
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ValidationError(f"{field} must be a finite number between {lo:g} and {hi:g}", {"field": field})
    return value


def ttl_seconds(body: dict, field: str = "ttl_seconds") -> Optional[float]:
    """A time to live: positive, at most MAX_TTL_S; None or 0: kept until deleted."""
    return number(body, field, None, 0.0, MAX_TTL_S) or None


def mapping(body: dict, field: str) -> dict:
    value = body.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError(f"{field} must be an object", {"field": field})
    return value
