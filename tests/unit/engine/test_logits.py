"""The loss in chunks of positions (engine/logits.py): the same numbers as the whole width at once, with at most
one chunk's logits in existence, forward and backward."""

from __future__ import annotations

import pytest
from tg_tinker import LoRAConfig

from conftest import dp_config
from engine_helpers import assert_close, make_engine, norm, padded_batch, per_example_gradients, sequences, snapshot, update

from tensafe_trainer.engine import logits

WIDE = sequences(3, seed=5, lengths=(30, 23, 17))  # wider than the chunk below: several chunks per row
HEAD_TOO = LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "lm_head"])


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(logits, "CHUNK", 8)
    return 8


def one_step(**overrides) -> tuple[dict, dict, list]:
    """An engine's forward logprobs on WIDE, then its update after one forward_backward + optim_step (SGD, lr 1)."""
    engine = make_engine(**overrides)
    batch = padded_batch(WIDE)
    forward = engine.forward(batch).logprobs
    before = snapshot(engine)
    engine.forward_backward(batch)
    engine.optim_step()
    return engine, update(engine, before), forward


@pytest.mark.parametrize("overrides", [
    {},  # LoRA on attention
    {"lora_config": HEAD_TOO},  # LoRA on the output head too: recomputed in backward
    {"lora_config": None},  # full fine-tuning (the head's weight tied to the embedding's)
    {"dp_config": dp_config(max_grad_norm=1e-3)},  # DP (noise off here), clipping active, the head frozen
    # DP with the head trained: each chunk's per-example gradient paired with its own input, the recomputation
    # recorded never (twice would double the head's share of every example's norm, and so its clipping).
    {"lora_config": HEAD_TOO, "dp_config": dp_config(max_grad_norm=1e-3)},
    {"lora_config": None, "dp_config": dp_config(max_grad_norm=1e-3)},  # DP, full fine-tuning, tied head
], ids=["lora", "lora-head", "full", "dp", "dp-head", "dp-full"])
def test_chunks_give_the_numbers_of_the_whole_width(small_chunks, monkeypatch, no_noise, overrides):
    chunked, chunked_update, chunked_forward = one_step(**overrides)
    assert chunked.logits_chunk == small_chunks
    monkeypatch.setattr(logits, "CHUNK", None)
    whole, whole_update, whole_forward = one_step(**overrides)
    assert whole.logits_chunk is None
    for mine, theirs in zip(chunked_forward, whole_forward):
        assert [v is None for v in mine] == [v is None for v in theirs]  # ignored positions alike
        assert [v for v in mine if v is not None] == pytest.approx([v for v in theirs if v is not None], rel=1e-9,
                                                                    abs=1e-12)
    assert_close(chunked_update, whole_update, rtol=1e-7, atol=1e-12)


def test_at_most_one_chunk_of_logits_exists_at_once(small_chunks):
    engine = make_engine(lora_config=HEAD_TOO)
    head = logits.causal_lm(engine.model).get_output_embeddings()
    widths = []
    handle = head.register_forward_hook(lambda module, args, out: widths.append(out.shape[1]))
    try:
        engine.forward_backward(padded_batch(WIDE))
        engine.forward(padded_batch(WIDE))
    finally:
        handle.remove()
    assert widths and max(widths) <= small_chunks  # the backward's recomputations included
    assert len(widths) > 2 * (30 // small_chunks)


def test_under_dp_the_head_is_chunked_and_each_example_is_clipped_once(small_chunks, no_noise):
    """A DP client training its head holds one chunk of logits too, and its clipped sum is that of each example's
    own gradient (computed one example at a time, without hooks), each clipped to the bound once."""
    import torch

    bound = 1e-3
    engine = make_engine(lora_config=HEAD_TOO, dp_config=dp_config(max_grad_norm=bound))
    assert engine.logits_chunk == small_chunks
    expected = per_example_gradients(engine, WIDE)
    assert all(norm(g) > bound for g in expected)  # every example clipped: a norm counted twice would show
    engine.forward_backward(padded_batch(WIDE))
    for name, p in engine.trainable.items():
        want = sum(g[name] * (bound / (norm(g) + 1e-6)) for g in expected)
        assert torch.allclose(engine.dp.summed[p], want, rtol=1e-7, atol=1e-15), name


def test_the_door_budgets_one_chunk_of_logits_per_row():
    import dataclasses

    from tg_tinker.errors import RequestTooLargeError

    from tensafe_trainer.service import admission

    whole = admission.Limits("training", 8, 4096, 32_000, memory_budget=1 << 30)
    with pytest.raises(RequestTooLargeError, match="for their logits"):
        admission.check_shape(8, 4096, whole)  # 8 x 4,096 x 32,000 x 12 B: 12 GiB at once
    admission.check_shape(8, 4096, dataclasses.replace(whole, logits_chunk=256))  # 8 x 256 x 32,000 x 12 B


def test_scoring_in_chunks_matches_the_whole_sequence(small_chunks):
    from tensafe_trainer.engine.operations import Runtime

    engine = make_engine()
    runtime = Runtime("c", "t", "training", engine, store=None)
    tokens = WIDE[0]
    chunked = runtime.sampler.compute_logprobs(tokens).logprobs
    runtime.sampler.logits_chunk = None
    whole = runtime.sampler.compute_logprobs(tokens).logprobs
    assert chunked[0] is None and whole[0] is None
    assert chunked[1:] == pytest.approx(whole[1:], rel=1e-12, abs=1e-12)
