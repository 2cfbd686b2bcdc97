"""Per-token log-probabilities computed a chunk of positions at a time, so that a request's logits never all
exist at once.

A causal LM's logits are ``rows x width x vocabulary``: at 32k-150k tokens of vocabulary, the one tensor that
decides what a request costs. Here the model's body runs once (its hidden states are ``rows x width x hidden``),
and the output head, the log-softmax and the gather run over ``CHUNK`` positions at a time; under autograd each
chunk is checkpointed (its logits are computed again in the backward pass rather than kept), so a training
request holds one chunk's logits at a time, forward and backward.

Chunking applies where the head is a plain projection of the last hidden state (the architectures in
``PLAIN_HEADS``: no logit scaling or soft-capping); elsewhere the whole width is one chunk, and memory.py budgets
it as such. Under DP a trainable head is chunked too: the per-example hooks pair each chunk's output gradient
with that chunk's own input, reduce it to per-example gradients at once, and ignore the recomputed call
(privacy/per_example.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tg_tinker.types import IGNORE_INDEX

CHUNK = 256  # positions per row whose logits exist at once
PLAIN_HEADS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside ``model`` (a PEFT model wraps it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def chunk_for(model: torch.nn.Module) -> Optional[int]:
    """The positions per chunk this model's loss may be computed in; None: the whole width at once."""
    return CHUNK if type(causal_lm(model)).__name__ in PLAIN_HEADS else None


def row_logprobs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                 chunk: Optional[int]) -> torch.Tensor:
    """``token_logprobs`` with each row's positions counted from its first unmasked token, so a left-padded row
    gets the positions it would have alone."""
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return token_logprobs(model, ids, mask, positions, labels, chunk)


def token_logprobs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                   labels: torch.Tensor, chunk: Optional[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """log p(labels[b, t] | ids[b, :t+1]), [rows, width], 0 at ignored positions; computed in ``dtype`` (float32
    at least, as the model's own dtype may be narrower), ``chunk`` positions at a time."""
    if chunk is None or ids.shape[1] <= chunk:  # one chunk: nothing to recompute
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        return _logprobs(logits, labels, dtype)
    lm = causal_lm(model)
    hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    head = lm.get_output_embeddings()
    parts = []
    for start in range(0, hidden.shape[1], chunk):
        piece, targets = hidden[:, start:start + chunk], labels[:, start:start + chunk]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_head_logprobs, head, piece, targets, dtype, use_reentrant=False))
        else:
            parts.append(_head_logprobs(head, piece, targets, dtype))
    return torch.cat(parts, dim=1)


def _head_logprobs(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    return _logprobs(head(hidden), labels, dtype)


def _logprobs(logits: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if logits.dtype != torch.float64 and logits.dtype != dtype:
        logits = logits.to(dtype)
    return -F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
