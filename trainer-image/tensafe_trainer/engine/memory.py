"""What one request costs in memory, and the most one request may take: asked at the door (service/admission.py),
where the model's sizes are known once the engine has loaded, and again in the engine, which always knows them.

A request's logits are [rows, positions, vocabulary] for the positions that exist at once: a chunk of each row
where the loss runs in chunks (logits.py), else the row's whole width; a sample's prefill keeps the last
position's only. A training request also keeps each layer's activations for its backward pass: per token, a
multiple of the model's hidden and intermediate sizes (``activation_bytes_per_token``). Attention scores are not
counted: the engine's attention kernel never holds them whole (models.py refuses a tiny model whose heads would
fall back to one that does)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from tg_tinker.errors import RequestTooLargeError, ValidationError

TRAINING_BYTES_PER_CELL = 3 * 4  # forward_backward: float32 logits, their log-softmax and its gradient
SCORING_BYTES_PER_CELL = 4 + 8 + 8  # compute_logprobs: float32 logits, a float64 copy and its log-softmax
PREFILL_BYTES_PER_CELL = 4  # a sample's prefill: the prompt's float32 logits (samples run one at a time)
ACTIVATION_BYTES_PER_HIDDEN, ACTIVATION_BYTES_PER_INTERMEDIATE = 112, 44  # per token and layer: measured, +5%
REQUEST_MEMORY_ENV = "TENSAFE_REQUEST_MEMORY"  # bytes one request may need at most; default half the memory


@lru_cache(maxsize=1)
def machine_memory_budget() -> int:
    """Half of what this process may use: its cgroup's limit in a pod, the machine's memory elsewhere."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total // 2


@lru_cache(maxsize=1)
def request_memory_budget() -> int:
    """The most memory one request may need: $TENSAFE_REQUEST_MEMORY, else ``machine_memory_budget``."""
    if os.environ.get(REQUEST_MEMORY_ENV):
        return int(os.environ[REQUEST_MEMORY_ENV])
    return machine_memory_budget()


def activation_bytes_per_token(config: Any) -> int:
    """What a training pass keeps per token for its backward, over all layers of a model with this (transformers)
    config: the peak memory of a training pass on tiny Llamas and SmolLM2-135M in float32 with LoRA on every
    projection was at most 106 B x hidden + 40 B x intermediate per layer and token (tests/unit/engine/test_memory.py
    checks the estimate against the tensors autograd saves)."""
    hidden = int(config.hidden_size)
    intermediate = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    return int(config.num_hidden_layers) * (ACTIVATION_BYTES_PER_HIDDEN * hidden
                                            + ACTIVATION_BYTES_PER_INTERMEDIATE * intermediate)


def check_trainable_state(parameters: int, per_example_rows: int, budget: Optional[int] = None) -> None:
    """ValidationError (422) if a client's trainable state would pass half the memory this process may use: each
    trainable value with its gradient and two AdamW moments (16 B), and under DP a per-example gradient for each of
    a micro-batch's ``per_example_rows`` (4 B each). LoRA's rank and targets are the caller's to choose."""
    budget = machine_memory_budget() if budget is None else budget
    need = parameters * (16 + 4 * per_example_rows)
    if need > budget:
        raise ValidationError(
            f"{parameters:,} trainable parameters need about {need >> 20} MiB (weights, gradients, optimizer state"
            f"{', a per-example gradient per row under DP' if per_example_rows else ''}), more than the "
            f"{budget >> 20} MiB one client may take here (half this trainer's memory): a lower LoRA rank, fewer "
            "target modules or a smaller batch_size", {"field": "lora_config", "trainable_parameters": parameters})


def request_memory_parts(rows: int, width: int, vocab_size: int, bytes_per_cell: int,
                         full_width: Optional[int] = None, activations_per_token: int = 0) -> tuple[int, int]:
    """What ``check_request_memory`` counts: the logits of ``rows`` x ``width`` positions, and the activations of
    ``rows`` x ``full_width`` tokens (``full_width`` defaults to ``width``)."""
    return rows * width * vocab_size * bytes_per_cell, rows * (full_width or width) * activations_per_token


def request_memory_need(rows: int, width: int, vocab_size: int, bytes_per_cell: int,
                        full_width: Optional[int] = None, activations_per_token: int = 0) -> int:
    """``request_memory_parts`` in all."""
    return sum(request_memory_parts(rows, width, vocab_size, bytes_per_cell, full_width, activations_per_token))


def check_request_memory(rows: int, width: int, vocab_size: int, bytes_per_cell: int, budget: Optional[int] = None,
                         field: str = "input_ids", full_width: Optional[int] = None,
                         activations_per_token: int = 0) -> None:
    """RequestTooLargeError (413) if ``rows`` x ``width`` logits over ``vocab_size``, with ``rows`` x ``full_width``
    tokens' activations (a training pass's; ``full_width`` defaults to ``width``), would pass ``budget``."""
    budget = request_memory_budget() if budget is None else budget
    logits, activations = request_memory_parts(rows, width, vocab_size, bytes_per_cell, full_width,
                                               activations_per_token)
    if logits + activations > budget:
        raise RequestTooLargeError(
            f"{rows} x {full_width or width} tokens need about {(logits + activations) >> 20} MiB ({logits >> 20} MiB "
            f"for their logits over a vocabulary of {vocab_size}, {activations >> 20} MiB for the activations kept "
            f"for the backward pass), more than the {budget >> 20} MiB one request may take here "
            f"({REQUEST_MEMORY_ENV}): send fewer or shorter rows per request",
            {"field": field, "rows": rows, "width": full_width or width, "memory_budget": budget})
