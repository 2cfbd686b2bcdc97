"""The training engine in-process: accumulation, LoRA vs full fine-tuning, optimizers, checkpoints."""

from __future__ import annotations

import pytest
import torch

from tg_tinker import OptimizerConfig, ValidationError

from engine_helpers import assert_close, make_engine, padded_batch, snapshot, update
from engine_helpers import sequences


def test_accumulation_equals_one_large_batch_token_weighted():
    # Micro-batches with very different label-token counts: a mean of micro-batch means would be wrong.
    short, long = sequences(3, seed=1, lengths=(3,)), sequences(3, seed=2, lengths=(14,))
    split = make_engine(gradient_accumulation_steps=2, batch_size=3)
    union = make_engine(batch_size=6)
    before = snapshot(split)
    split.forward_backward(padded_batch(short, side="right"))
    split.forward_backward(padded_batch(long))
    split.optim_step()
    union.forward_backward(padded_batch(short + long))
    union.optim_step()
    assert_close(update(split, before), update(union, before), rtol=1e-9)


def test_reported_loss_and_tokens():
    engine = make_engine(batch_size=4)
    rows = sequences(4, seed=4)
    result = engine.forward_backward(padded_batch(rows))
    assert result.tokens_processed == sum(len(r) - 1 for r in rows)
    forward = engine.forward(padded_batch(rows))
    assert forward.loss == pytest.approx(result.loss, rel=1e-9)
    flat = [lp for row in forward.logprobs for lp in row if lp is not None]
    assert len(flat) == result.tokens_processed
    assert -sum(flat) / len(flat) == pytest.approx(result.loss, rel=1e-9)


def test_lora_leaves_base_weights_untouched_and_full_finetuning_changes_them():
    rows = sequences(4, seed=3)
    lora = make_engine(batch_size=4)
    base_before = {n: p.detach().clone() for n, p in lora.model.named_parameters() if not p.requires_grad}
    lora.forward_backward(padded_batch(rows))
    lora.optim_step()
    assert base_before and all(torch.equal(p, base_before[n]) for n, p in lora.model.named_parameters()
                               if not p.requires_grad)
    full = make_engine(batch_size=4, lora_config=None)
    before = snapshot(full)
    assert any("embed_tokens" in n for n in before) and any("q_proj" in n for n in before)
    full.forward_backward(padded_batch(rows))
    full.optim_step()
    changed = [n for n, d in update(full, before).items() if d.abs().max() > 0]
    assert any("q_proj.weight" in n for n in changed) and any("embed_tokens" in n for n in changed)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "adafactor"])
def test_each_optimizer_steps(name):
    engine = make_engine(batch_size=4, optimizer=OptimizerConfig(name=name, learning_rate=1e-2, momentum=0.9
                                                                 if name == "sgd" else 0.0))
    rows = sequences(4, seed=6)
    losses = []
    for _ in range(4):
        losses.append(engine.forward_backward(padded_batch(rows)).loss)
        before = snapshot(engine)
        engine.optim_step()
        assert all(torch.isfinite(p).all() for p in engine.trainable.values())
        assert any(d.abs().max() > 0 for d in update(engine, before).values())
    assert losses[-1] < losses[0]


def test_warmup_and_cosine_schedule():
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=2, lr_schedule="cosine", total_steps=6)
    engine = make_engine(batch_size=4, optimizer=cfg)
    lrs = [engine.optim_step().learning_rate for _ in range(6)]
    assert lrs[:2] == [0.5, 1.0]
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] < lrs[3] < lrs[2]


def test_checkpoint_restores_weights_and_optimizer_state_bit_for_bit():
    from tensafe_trainer.engine.adapter import AdapterSlot, deserialize_state, serialize_state

    rows = sequences(4, seed=8)
    engine = make_engine(batch_size=4, optimizer=OptimizerConfig(name="adamw", learning_rate=1e-2))
    for _ in range(3):
        engine.forward_backward(padded_batch(rows))
        engine.optim_step()
    restored = AdapterSlot(engine.config)
    restored.load_state_dict(deserialize_state(serialize_state(engine.state_dict(include_optimizer=True))))
    assert restored.step == 3
    for name, p in engine.trainable.items():
        assert torch.equal(p, restored.trainable[name])
    ours, theirs = engine.optimizer.state_dict()["state"], restored.optimizer.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for key in ours:
        for field in ours[key]:
            assert torch.equal(torch.as_tensor(ours[key][field]), torch.as_tensor(theirs[key][field]))
    for e in (engine, restored):  # and training goes on identically
        e.forward_backward(padded_batch(rows))
        e.optim_step()
    for name, p in engine.trainable.items():
        assert torch.equal(p, restored.trainable[name])


def test_checkpoint_of_another_model_is_refused():
    from tensafe_trainer.engine.adapter import deserialize_state, serialize_state

    lora = make_engine(batch_size=4)
    full = make_engine(batch_size=4, lora_config=None)
    with pytest.raises(ValidationError, match="lora_config differs"):
        full.load_state_dict(deserialize_state(serialize_state(lora.state_dict(include_optimizer=False))))


def test_seed_makes_training_reproducible():
    rows = sequences(4, seed=10)
    results = []
    for _ in range(2):
        engine = make_engine(batch_size=4, seed=123)
        engine.forward_backward(padded_batch(rows))
        engine.optim_step()
        results.append(snapshot(engine))
    assert_close(results[0], results[1], rtol=0, atol=0)


@pytest.mark.parametrize("bad, match", [
    ({"input_ids": [[1, 600]]}, "outside the model's vocabulary of 512"),
    ({"input_ids": [[1, 2]], "labels": [[2, 513]]}, "labels holds token id 513"),
    ({"input_ids": [[1, 2]] * 9}, "more than batch_size=8"),
    ({"input_ids": [[1] * 65]}, "exceeds max_seq_len=64"),
])
def test_engine_refuses_batches_that_do_not_fit_the_model(bad, match):
    from tg_tinker import BatchData

    engine = make_engine()
    with pytest.raises(ValidationError, match=match):
        engine.forward_backward(BatchData(**bad))
    assert engine.gradient_sum is None  # nothing was accumulated


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_bfloat16_tracks_float32_and_checkpoints_bit_for_bit(lora):
    """The dtype GPUs get by default ("auto" on CUDA with bf16), exercised on the CPU: the model is bf16 (LoRA
    adapters float32, peft's mixed precision), and its losses follow a float32 run of the same steps."""
    from tensafe_trainer.engine.adapter import AdapterSlot, deserialize_state, serialize_state

    rows = sequences(4, seed=3)
    overrides = {"optimizer": OptimizerConfig(name="adamw", learning_rate=3e-2), "batch_size": 4}
    if not lora:
        overrides["lora_config"] = None
    engines = {dtype: make_engine(dtype=dtype, **overrides) for dtype in ("bfloat16", "float32")}
    bf16 = engines["bfloat16"]
    frozen = {p.dtype for p in bf16.model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in bf16.trainable.values()}
    assert (frozen, trained) == (({torch.bfloat16}, {torch.float32}) if lora else (set(), {torch.bfloat16}))
    losses = {dtype: [] for dtype in engines}
    for _ in range(8):
        for dtype, engine in engines.items():
            losses[dtype].append(engine.forward_backward(padded_batch(rows)).loss)
            engine.optim_step()
    assert losses["bfloat16"][-1] < losses["bfloat16"][0]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.03)
    restored = AdapterSlot(bf16.config)
    restored.load_state_dict(deserialize_state(serialize_state(bf16.state_dict(include_optimizer=True))))
    for name, p in bf16.trainable.items():
        assert p.dtype == restored.trainable[name].dtype and torch.equal(p, restored.trainable[name])
    assert bf16.forward(padded_batch(rows)).loss == restored.forward(padded_batch(rows)).loss
