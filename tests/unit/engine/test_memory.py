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


def test_a_tiny_spec_is_bounded_in_each_size_not_only_in_parameters():
    """The second attacker review: 446,428 one-wide layers (few parameters, ~51 GiB of modules) and an MLP 8,000,000
    wide on a hidden size of 8 (few parameters, LoRA of rank 1,024 on it 24.6 G) both passed the parameter cap."""
    from tg_tinker.errors import ValidationError

    from tensafe_trainer.engine.models import parse_tiny

    for spec, named in (("hidden=8,heads=1,layers=446428,vocab=16,intermediate=8", "layers=446428"),
                        ("hidden=8,heads=1,layers=1,vocab=16,intermediate=8000000", "intermediate=8000000"),
                        ("hidden=64,heads=8,vocab=12000000", "vocab=12000000")):
        with pytest.raises(ValidationError, match=named):
            parse_tiny(f"tiny-random-llama:{spec}")


def test_a_client_whose_trainable_state_passes_the_budget_is_refused_before_it_trains():
    from tg_tinker.errors import ValidationError

    from tensafe_trainer.engine.memory import check_trainable_state

    check_trainable_state(1_000_000, 0, budget=16 << 20)  # 1 M values with gradient and AdamW: 15 MiB
    with pytest.raises(ValidationError, match="trainable parameters need about"):
        check_trainable_state(1_000_000, 8, budget=16 << 20)  # under DP, 8 rows of per-example gradients too

    # A whole engine: LoRA of rank 512 on every projection of the 64-wide tiny model, with 4 MiB to spare.
    from tensafe_trainer.engine import memory

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(memory, "machine_memory_budget", lambda: 4 << 20)
        with pytest.raises(ValidationError, match="lower LoRA rank"):
            make_engine(lora_config=LoRAConfig(rank=512, target_modules=EVERY_PROJECTION))
