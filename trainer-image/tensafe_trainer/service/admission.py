"""What a client may submit, checked at the door against what it can run.

The wire types (tg_tinker.types) check what holds for every client: shapes, signs, int64 range, the
size and depth of metadata. Here: what depends on this client: rows against its ``batch_size``, tokens
against its ``max_seq_len`` and its model's vocabulary, training operations on a sampling client, and
how many bytes one request of this client may carry at all. A submission refused here is refused with
422/413 before anything of its request is queued; the engine keeps its own checks behind these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from tg_tinker.errors import RequestTooLargeError, ValidationError
from tg_tinker.operations import OPERATIONS, TRAINING_ONLY
from tg_tinker.types import (
    MAX_PACKED_BYTES,
    ComputeLogprobsRequest,
    ForwardBackwardSampledRequest,
    OptimStepRequest,
    SampleRequest,
)

from tensafe_trainer.engine.losses import get_loss
from tensafe_trainer.engine.protocol import SlotSummary
from tensafe_trainer.engine.memory import (PREFILL_BYTES_PER_CELL, SCORING_BYTES_PER_CELL, TRAINING_BYTES_PER_CELL,
                                           check_request_memory, request_memory_budget)
from tensafe_trainer.privacy.dp import check_noise_request

# A JSON token id is at most 19 digits and a comma; input_ids, labels and attention_mask: three of them. A float
# (a loss input: weights, logprobs, advantages) at most 25 characters and a comma.
BYTES_PER_TOKEN = 3 * 20 + 3 * 26
BODY_SLACK = 256 << 10  # the envelope, metadata, a sealed blob
TEXT_BYTES_PER_TOKEN = 32  # a text prompt longer than this many characters per allowed token cannot fit


@dataclass(frozen=True)
class Limits:
    kind: str  # "training" or "sampling"
    batch_size: int
    max_seq_len: int
    vocab_size: Optional[int]  # None until the engine has loaded the model (the engine checks meanwhile)
    dp_enabled: bool = False
    dataset_id: Optional[str] = None  # DP with server-side sampling of this registered dataset
    logits_chunk: Optional[int] = None  # positions whose logits the engine holds at once (None: a whole row's)
    activation_bytes_per_token: int = 0  # what a training pass keeps per token (engine/memory.py); 0 until known
    memory_budget: int = field(default_factory=request_memory_budget)

    @classmethod
    def of(cls, kind: str, config: Any, summary: SlotSummary) -> "Limits":
        """From the engine's own report once it is up; before that, from the client's config."""
        batch_size = summary.batch_size or getattr(config, "batch_size", 1)
        max_seq_len = summary.max_seq_len or getattr(config, "max_seq_len", 2048)
        dp = config.dp_config if config is not None and config.dp_enabled else None
        return cls(kind, batch_size, max_seq_len, summary.vocab_size, dp is not None,
                   dp.dataset_id if dp is not None else None, summary.logits_chunk,
                   summary.activation_bytes_per_token or 0)


def body_limit(limits: Limits) -> int:
    """The most bytes one request of this client may carry: a full batch of its, or a pack of small
    operations (the SDK packs up to MAX_PACKED_BYTES), whichever is more."""
    one_batch = limits.batch_size * limits.max_seq_len * BYTES_PER_TOKEN
    return max(MAX_PACKED_BYTES, one_batch) + BODY_SLACK


def check_rows(rows: int, limits: Limits) -> None:
    if rows > limits.batch_size:
        raise RequestTooLargeError(f"batch has {rows} examples, more than batch_size={limits.batch_size}",
                                   {"field": "input_ids", "rows": rows, "batch_size": limits.batch_size})


def check_shape(rows: int, width: int, limits: Limits) -> None:
    """A batch of ``rows`` examples of at most ``width`` tokens: within this client's batch_size and max_seq_len,
    and its logits and activations within the memory one request may take (also asked before a batch is padded, so
    that an oversized one costs nothing to refuse)."""
    check_rows(rows, limits)
    _check_length(width, limits, "input_ids")
    if limits.vocab_size is not None:
        check_request_memory(rows, _held(width, limits), limits.vocab_size, TRAINING_BYTES_PER_CELL,
                             limits.memory_budget, full_width=width,
                             activations_per_token=limits.activation_bytes_per_token)


def admit(request: Any, limits: Limits) -> None:
    """Refuse ``request`` (ValidationError 422, RequestTooLargeError 413) unless this client can run it."""
    kind = request.type
    if limits.kind == "sampling" and kind in TRAINING_ONLY:
        raise ValidationError(f"{kind} is not available on a sampling client", {"operation": kind})
    check = DOOR_CHECKS[kind]
    if check is not None:
        check(request, limits)


def _check_batch(request: Any, limits: Limits) -> None:
    check_shape(*request.batch.shape, limits)
    loss = get_loss(request.loss_fn)
    loss.settings(request.loss_fn_config)
    loss.check_inputs(set(request.batch.loss_inputs or {}))
    _check_vocab(max(map(max, request.batch.input_ids)), limits, "input_ids")
    if request.batch.labels is not None:
        _check_vocab(max(map(max, request.batch.labels)), limits, "labels")


def _check_sampled(request: ForwardBackwardSampledRequest, limits: Limits) -> None:
    if limits.kind == "training" and not limits.dataset_id:
        raise ValidationError("forward_backward_sampled needs dp_config.dataset_id naming a registered dataset",
                              {"operation": request.type})


def _check_optim_step(request: OptimStepRequest, limits: Limits) -> None:
    check_noise_request(limits.dp_enabled, request.apply_dp_noise)


def _check_sample(request: SampleRequest, limits: Limits) -> None:
    if isinstance(request.prompt, list):
        _check_length(len(request.prompt) + request.max_tokens, limits, "prompt + max_tokens")
        _check_vocab(max(request.prompt), limits, "prompt")
        if limits.vocab_size is not None:
            check_request_memory(1, 1 if limits.logits_chunk else len(request.prompt), limits.vocab_size,
                                 PREFILL_BYTES_PER_CELL, limits.memory_budget, "prompt")
    elif len(request.prompt) > limits.max_seq_len * TEXT_BYTES_PER_TOKEN:
        raise RequestTooLargeError(f"prompt of {len(request.prompt)} characters cannot fit in max_seq_len="
                                   f"{limits.max_seq_len} tokens", {"field": "prompt"})
    stop_ids = [s for s in request.stop or () if isinstance(s, int)]
    if stop_ids:
        _check_vocab(max(stop_ids), limits, "stop")


def _check_logprobs(request: ComputeLogprobsRequest, limits: Limits) -> None:
    _check_length(len(request.tokens), limits, "tokens")
    _check_vocab(max(request.tokens), limits, "tokens")
    if limits.vocab_size is not None:
        check_request_memory(1, _held(len(request.tokens), limits), limits.vocab_size, SCORING_BYTES_PER_CELL,
                             limits.memory_budget, "tokens")


def _held(width: int, limits: Limits) -> int:
    """The positions of a row whose logits the engine holds at once."""
    return min(width, limits.logits_chunk or width)


def _check_length(length: int, limits: Limits, name: str) -> None:
    if length > limits.max_seq_len:
        raise RequestTooLargeError(f"{name} has {length} tokens, more than max_seq_len={limits.max_seq_len}",
                                   {"field": name, "length": length, "max_seq_len": limits.max_seq_len})


def _check_vocab(top: int, limits: Limits, name: str) -> None:
    if limits.vocab_size is not None and top >= limits.vocab_size:
        raise ValidationError(f"{name} holds token id {top}, outside the model's vocabulary of {limits.vocab_size}",
                              {"field": name, "token_id": top, "vocab_size": limits.vocab_size})


# Each operation's door checks beyond its wire type (tg_tinker.operations): None where the engine needs no more
# (a load's artifact is checked against the caller's grants by the door that takes it).
DOOR_CHECKS: dict[str, Optional[Callable[[Any, Limits], None]]] = {
    "forward_backward": _check_batch,
    "forward_backward_sampled": _check_sampled,
    "forward": _check_batch,
    "optim_step": _check_optim_step,
    "save_state": None,
    "load_state": None,
    "sample": _check_sample,
    "compute_logprobs": _check_logprobs,
    "export_adapter": None,
}
assert DOOR_CHECKS.keys() == OPERATIONS.keys(), set(DOOR_CHECKS) ^ set(OPERATIONS)
