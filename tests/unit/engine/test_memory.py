"""What a request costs in memory (engine/memory.py): the activations a training pass keeps for its backward are
within the estimate the door budgets, and a request past the budget is refused before it runs."""

from __future__ import annotations

import pytest
import torch
from tg_tinker import LoRAConfig

from engine_helpers import make_engine, padded_batch, sequences

EVERY_PROJECTION = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def kept_for_backward(engine, batch) -> int:
    """Bytes of the tensors autograd saves for the backward pass of one forward_backward (each storage once; the
    model's own weights, which a pass does not add, left out)."""
    weights = {p.untyped_storage().data_ptr() for p in engine.model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        engine.forward_backward(batch)
    return sum(seen.values())


@pytest.mark.parametrize("model, lora", [
    ("tiny-random-llama:hidden=64,layers=2,heads=4,vocab=512,intermediate=128", LoRAConfig(rank=4)),
    ("tiny-random-llama:hidden=128,layers=3,heads=4,vocab=512,intermediate=512",
     LoRAConfig(rank=8, target_modules=EVERY_PROJECTION)),
    ("tiny-random-llama:hidden=64,layers=2,heads=8,vocab=512,intermediate=256", None),  # full fine-tuning
], ids=["lora", "lora-everywhere", "full"])
def test_the_estimate_covers_what_a_training_pass_keeps_for_backward(model, lora):
    engine = make_engine(model_ref=model, lora_config=lora, dtype="float32", max_seq_len=256)
    rows = sequences(4, seed=3, lengths=(200, 180, 150, 120))
    batch = padded_batch(rows)
    tokens = len(rows) * 200
    logits = len(rows) * 200 * engine.vocab_size * 4  # one float32 copy of the logits (no chunk: 200 < 256)
    kept = kept_for_backward(engine, batch)
    assert 0 < kept - logits <= tokens * engine.activation_bytes_per_token, (kept, engine.activation_bytes_per_token)


def test_the_door_refuses_a_batch_whose_activations_pass_the_budget():
    from tg_tinker.errors import RequestTooLargeError

    from tensafe_trainer.service import admission

    limits = admission.Limits("training", 128, 2048, 512, logits_chunk=256, activation_bytes_per_token=300_000,
                              memory_budget=1 << 30)
    admission.check_shape(128, 16, limits)  # 2,048 tokens: 586 MiB of activations, 16 MiB of logits
    with pytest.raises(RequestTooLargeError, match="activations kept for the backward pass"):
        admission.check_shape(8, 2048, limits)  # 16,384 tokens: 4.6 GiB, though their logits take 24 MiB


def test_a_tiny_model_with_heads_too_narrow_for_the_attention_kernel_is_refused():
    from tg_tinker.errors import ValidationError

    from tensafe_trainer.engine.models import parse_tiny

    with pytest.raises(ValidationError, match="per head"):
        parse_tiny("tiny-random-llama:hidden=64,layers=1,heads=64,vocab=512")  # 1 per head: every score held
    with pytest.raises(ValidationError, match="multiple of heads"):
        parse_tiny("tiny-random-llama:hidden=64,heads=6")
    assert parse_tiny("tiny-random-llama:hidden=64,heads=8")["heads"] == 8
