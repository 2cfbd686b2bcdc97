"""Token-by-token generation with a KV cache: temperature, top-k, top-p, stop sequences, seeds.

Reported logprobs are the model's own log-probabilities (temperature 1, unfiltered) of each
chosen token, which is what RL-style training on samples needs.
"""

from __future__ import annotations

import secrets
from typing import Any, Optional

import torch
import torch.nn.functional as F

from tg_tinker.errors import ValidationError
from tg_tinker.types import IGNORE_INDEX, ComputeLogprobsResult, SampleRequest, SampleResult, SampleSequence

from tensafe_trainer.engine.logits import token_logprobs
from tensafe_trainer.engine.memory import PREFILL_BYTES_PER_CELL, SCORING_BYTES_PER_CELL, check_request_memory


def _encode_prompt(prompt, tokenizer, vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValidationError("this model has no tokenizer: give the prompt as a list of token ids",
                                  {"field": "prompt"})
        return tokenizer.encode(prompt, add_special_tokens=False)
    top = max(prompt)
    if top >= vocab_size:
        raise ValidationError(f"prompt holds token id {top}, outside the vocabulary of {vocab_size}",
                              {"field": "prompt"})
    return list(prompt)


def _filter_logits(logits: torch.Tensor, top_k: Optional[int], top_p: float) -> torch.Tensor:
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def _split_stops(stop) -> tuple[set[int], list[str]]:
    items = stop or []
    return {s for s in items if isinstance(s, int)}, [s for s in items if isinstance(s, str)]


class Sampler:
    def __init__(self, model: torch.nn.Module, tokenizer: Any, vocab_size: int, eos_token_id: Optional[int],
                 device: torch.device, max_seq_len: int, logits_chunk: Optional[int] = None):
        self.model, self.tokenizer, self.vocab_size = model, tokenizer, vocab_size
        self.eos_token_id, self.device, self.max_seq_len = eos_token_id, device, max_seq_len
        self.logits_chunk = logits_chunk  # see logits.py: then a prefill computes the last position's logits only

    def _check_length(self, length: int, what: str) -> None:
        if length > self.max_seq_len:
            raise ValidationError(f"{what} is {length} tokens, more than this client's max_seq_len={self.max_seq_len}",
                                  {"field": "max_tokens", "max_seq_len": self.max_seq_len})

    @torch.no_grad()
    def sample(self, req: SampleRequest) -> SampleResult:
        prompt = _encode_prompt(req.prompt, self.tokenizer, self.vocab_size)
        self._check_length(len(prompt) + req.max_tokens, "prompt + max_tokens")
        check_request_memory(1, 1 if self.logits_chunk else len(prompt), self.vocab_size, PREFILL_BYTES_PER_CELL,
                             field="prompt")
        stop_ids, stop_texts = _split_stops(req.stop)
        if stop_texts and self.tokenizer is None:
            raise ValidationError("text stop sequences need a tokenizer; give token ids", {"field": "stop"})
        was_training = self.model.training
        self.model.eval()
        try:
            sequences = [self._one(prompt, req, stop_ids, stop_texts, i) for i in range(req.num_samples)]
        finally:
            self.model.train(was_training)
        return SampleResult(sequences=sequences, prompt_tokens=prompt)

    def _one(self, prompt: list[int], req: SampleRequest, stop_ids: set[int], stop_texts: list[str],
             index: int) -> SampleSequence:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(req.seed + index if req.seed is not None else secrets.randbits(63))
        last_only = {"logits_to_keep": 1} if self.logits_chunk else {}
        out = self.model(input_ids=torch.tensor([prompt], device=self.device), use_cache=True, **last_only)
        past, logits = out.past_key_values, out.logits[0, -1]
        tokens: list[int] = []
        logprobs: list[float] = []
        reason = "length"
        for _ in range(req.max_tokens):
            logits = logits.double()
            model_logprobs = F.log_softmax(logits, dim=-1)
            if req.temperature == 0:
                token = int(torch.argmax(logits))
            else:
                filtered = _filter_logits(logits / req.temperature, req.top_k, req.top_p)
                probs = filtered.softmax(dim=-1).cpu()
                token = int(torch.multinomial(probs, 1, generator=generator))
            tokens.append(token)
            logprobs.append(float(model_logprobs[token]))
            if token == self.eos_token_id and req.stop_at_eos:
                reason = "eos"
                break
            if token in stop_ids:
                reason = "stop"
                break
            if stop_texts and self._hit_text_stop(tokens, stop_texts):
                reason = "stop"
                break
            out = self.model(input_ids=torch.tensor([[token]], device=self.device), past_key_values=past,
                             use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else None
        if reason == "stop" and text is not None:
            for s in stop_texts:
                if s in text:
                    text = text[: text.index(s)]
        return SampleSequence(tokens=tokens, text=text, logprobs=logprobs, stop_reason=reason)

    def _hit_text_stop(self, tokens: list[int], stop_texts: list[str]) -> bool:
        tail = self.tokenizer.decode(tokens[-16:], skip_special_tokens=True)
        return any(s in tail for s in stop_texts)

    @torch.no_grad()
    def compute_logprobs(self, tokens: list[int]) -> ComputeLogprobsResult:
        _encode_prompt(tokens, None, self.vocab_size)
        self._check_length(len(tokens), "the token sequence")
        check_request_memory(1, min(len(tokens), self.logits_chunk or len(tokens)), self.vocab_size,
                             SCORING_BYTES_PER_CELL, field="tokens")
        ids = torch.tensor([tokens], device=self.device)
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
        was_training = self.model.training
        self.model.eval()
        try:
            logp = token_logprobs(self.model, ids, torch.ones_like(ids), torch.arange(len(tokens))[None].to(ids),
                                  targets, self.logits_chunk, torch.float64)
        finally:
            self.model.train(was_training)
        return ComputeLogprobsResult(logprobs=[None] + [float(v) for v in logp[0, :-1]])
