"""What one request's logits cost, and the most one request may take: asked at the door (service/admission.py),
where the vocabulary is known once the engine has loaded, and again in the engine, which always knows it.

A request's logits are [rows, positions, vocabulary] for the positions that exist at once: a chunk of each row
where the loss runs in chunks (logits.py), else the row's whole width; a sample's prefill keeps the last
position's only. That product is what a request costs."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Optional

from tg_tinker.errors import RequestTooLargeError

TRAINING_BYTES_PER_CELL = 3 * 4  # forward_backward: float32 logits, their log-softmax and its gradient
SCORING_BYTES_PER_CELL = 4 + 8 + 8  # compute_logprobs: float32 logits, a float64 copy and its log-softmax
PREFILL_BYTES_PER_CELL = 4  # a sample's prefill: the prompt's float32 logits (samples run one at a time)
REQUEST_MEMORY_ENV = "TENSAFE_REQUEST_MEMORY"  # bytes one request may need at most; default half the memory


@lru_cache(maxsize=1)
def request_memory_budget() -> int:
    """The most memory one request may need: $TENSAFE_REQUEST_MEMORY, else half of what this process may use
    (its cgroup's limit in a pod, the machine's memory elsewhere)."""
    if os.environ.get(REQUEST_MEMORY_ENV):
        return int(os.environ[REQUEST_MEMORY_ENV])
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total // 2


def check_logits(rows: int, width: int, vocab_size: int, bytes_per_cell: int, budget: Optional[int] = None,
                 field: str = "input_ids") -> None:
    """RequestTooLargeError (413) if ``rows`` x ``width`` logits over ``vocab_size`` would pass ``budget``."""
    budget = request_memory_budget() if budget is None else budget
    need = rows * width * vocab_size * bytes_per_cell
    if need > budget:
        raise RequestTooLargeError(
            f"{rows} x {width} tokens over a vocabulary of {vocab_size} need about {need >> 20} MiB for their logits, "
            f"more than the {budget >> 20} MiB one request may take here ({REQUEST_MEMORY_ENV}): send fewer or shorter "
            "rows per request", {"field": field, "rows": rows, "width": width, "memory_budget": budget})
