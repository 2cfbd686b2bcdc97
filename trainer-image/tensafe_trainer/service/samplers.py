"""One sampler policy for both doors: how many sampling clients one owner keeps live at once.

An owner is a client whose token makes sampling clients (``/v1``) or a Tinker session. Each sampling client
is an engine process holding a model, so an owner keeps at most ``MAX_LIVE_SAMPLERS``; a new one closes the
owner's oldest instead of being refused, since a training loop makes a sampler every few steps and never
closes the last (the Tinker cookbook's recipes do, unchanged). The closed one's callers are told why.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

MAX_LIVE_SAMPLERS = 4
T = TypeVar("T")


def make_room(live: Sequence[T]) -> list[T]:
    """Of an owner's live samplers, oldest first: those to close so that one more fits."""
    return list(live[:max(0, len(live) - MAX_LIVE_SAMPLERS + 1)])


def closed_for_newer(sampler_id: str) -> str:
    return (f"sampling client {sampler_id!r} was closed: its owner opened a newer one, and keeps at most "
            f"{MAX_LIVE_SAMPLERS} live")
