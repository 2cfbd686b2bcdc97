"""The model host (engine/host.py): several LoRA slots on one base model, and what a slot may not borrow."""

from __future__ import annotations

import pytest
import torch

from conftest import dp_config, tiny_config
from tg_tinker import LoRAConfig
from tg_tinker.errors import ValidationError

from engine_helpers import SGD1, fresh_ledger, make_engine, padded_batch, sequences
from tensafe_trainer.engine.adapter import AdapterSlot
from tensafe_trainer.engine.host import ModelHost


NEIGHBOUR = dict(batch_size=4, lora_config=LoRAConfig(rank=8, alpha=4, target_modules=["q_proj", "o_proj"]))


def _slot(config, host=None, ledger=None) -> AdapterSlot:
    return make_engine(host=host, ledger=ledger, **{k: getattr(config, k) for k in type(config).model_fields})


def _train(slot: AdapterSlot, seed: int, steps: int = 2) -> None:
    for step in range(steps):
        slot.activate()
        slot.forward_backward(padded_batch(sequences(4, seed=seed + step)))
        slot.activate()
        slot.optim_step()


def _weights(slot: AdapterSlot) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in slot.trainable.items()}


def test_a_slot_on_a_given_host_is_the_slot_it_would_have_been_alone():
    config = tiny_config()
    alone = AdapterSlot(config)
    hosted = AdapterSlot(config, host=ModelHost.for_config(config))
    assert hosted.vocab_size == alone.vocab_size and hosted.public_model_name == alone.public_model_name
    assert hosted.trainable.keys() == alone.trainable.keys()
    for (name, mine), (_, theirs) in zip(hosted.trainable.items(), alone.trainable.items()):
        assert torch.equal(mine, theirs), name  # same seed, same base and adapter weights


def test_lora_slots_share_a_host_and_a_slot_that_trains_the_base_gets_none():
    config = tiny_config()
    host = ModelHost.for_config(config)
    with pytest.raises(ValidationError, match="seed differ"):  # a tiny model's weights follow the seed
        AdapterSlot(config.model_copy(update={"seed": config.seed + 1}), host=host)
    first = AdapterSlot(config, host=host)
    other = AdapterSlot(config.model_copy(update={"lora_config": LoRAConfig(rank=2, target_modules=["o_proj"])}),
                        host=host)
    assert host.slots == 2 and first.model is other.model
    assert not set(map(id, first.trainable.values())) & set(map(id, other.trainable.values()))
    assert all(".lora_" in n and ".default." in n for n in other.trainable)  # named as a slot alone names them
    for trains_the_base in (tiny_config(lora_config=None),
                            tiny_config(lora_config=LoRAConfig(rank=2, target_modules=["q_proj"], bias="all"))):
        with pytest.raises(ValidationError, match="host of its own"):
            AdapterSlot(trains_the_base, host=host)
    full = ModelHost.for_config(config)
    AdapterSlot(tiny_config(lora_config=None), host=full)
    with pytest.raises(ValidationError, match="host of its own"):
        AdapterSlot(config, host=full)


def test_a_slots_training_is_the_same_with_or_without_a_neighbour_on_its_host():
    config = tiny_config(dtype="float64", optimizer=SGD1, batch_size=4)
    alone = _slot(config)
    _train(alone, seed=10)
    host = ModelHost.for_config(config)
    mine = _slot(config, host=host)
    neighbour = make_engine(host=host, **NEIGHBOUR)
    for step in range(2):  # the neighbour's operations between each of mine
        neighbour.activate()
        neighbour.forward_backward(padded_batch(sequences(3, seed=50 + step)))
        mine.activate()
        mine.forward_backward(padded_batch(sequences(4, seed=10 + step)))
        neighbour.activate()
        neighbour.optim_step()
        mine.activate()
        mine.optim_step()
    for name, value in _weights(alone).items():
        assert torch.equal(mine.trainable[name].detach(), value), name


def test_a_dp_slots_clipped_sum_is_the_same_with_or_without_a_neighbour_on_its_host():
    # The noise is a fresh CSPRNG draw each step: what must not move is the clipped sum it is added to.
    config = tiny_config(dtype="float64", optimizer=SGD1, batch_size=4, dp_config=dp_config(max_grad_norm=0.05))
    alone = _slot(config, ledger=fresh_ledger())
    alone.forward_backward(padded_batch(sequences(4, seed=7)))
    host = ModelHost.for_config(config)
    mine = _slot(config, host=host, ledger=fresh_ledger())
    neighbour = make_engine(host=host, dp_config=dp_config(), **NEIGHBOUR)
    neighbour.activate()
    neighbour.forward_backward(padded_batch(sequences(4, seed=8)))
    mine.activate()
    mine.forward_backward(padded_batch(sequences(4, seed=7)))
    assert mine.dp.num_clipped == alone.dp.num_clipped == 4
    names = {id(p): n for n, p in mine.trainable.items()}
    theirs = {n: alone.dp.summed[p] for n, p in alone.trainable.items()}
    assert {names[id(p)] for p in mine.dp.summed} == set(mine.trainable)  # its own adapter's, every one
    for p, value in mine.dp.summed.items():
        assert torch.equal(value, theirs[names[id(p)]]), names[id(p)]


def test_a_slot_that_leaves_frees_its_adapter_and_its_checkpoint_loads_in_a_slot_alone():
    config = tiny_config(dtype="float64", optimizer=SGD1, batch_size=4)
    host = ModelHost.for_config(config)
    first, second = _slot(config, host=host), _slot(config, host=host)
    _train(second, seed=3)
    state = second.state_dict(include_optimizer=True)
    first.close()
    assert host.slots == 1
    assert not any(first.adapter in n for n, _ in host.peft.named_parameters())
    second.activate()
    second.forward(padded_batch(sequences(2, seed=9)))  # the slot left behind still runs
    restored = AdapterSlot(config)
    restored.load_state_dict(state)
    for name, value in _weights(second).items():
        assert torch.equal(restored.trainable[name].detach(), value), name
    second.close()
    assert host.slots == 0
    again = _slot(config, host=host)  # a host all of whose slots left takes new ones
    again.activate()
    assert again.forward(padded_batch(sequences(2, seed=9))).tokens_processed > 0


def test_a_slots_dropout_draws_from_its_own_stream_whatever_its_neighbours_draw():
    # One stream for every slot would let a client read a neighbour's batch shape off its own dropout masks.
    config = tiny_config(dtype="float64", batch_size=4, lora_config=LoRAConfig(rank=4, dropout=0.3,
                                                                               target_modules=["q_proj"]))

    def losses(neighbour_batches) -> list[float]:
        host = ModelHost.for_config(config)
        mine = _slot(config, host=host)
        neighbour = _slot(config, host=host)
        assert not mine.shares_passes  # its masks would come from the pass's one stream
        out = []
        for step, rows in enumerate(neighbour_batches):
            if rows:
                neighbour.activate()
                with neighbour.own_randomness():
                    neighbour.forward_backward(padded_batch(sequences(rows, seed=40 + step)))
            mine.activate()
            with mine.own_randomness():
                out.append(mine.forward_backward(padded_batch(sequences(4, seed=30 + step))).loss)
        return out

    quiet = losses([0, 0, 0])
    assert losses([1, 4, 2]) == quiet == losses([3, 0, 4])


def test_lora_on_embeddings_trains_on_a_shared_host_and_a_neighbours_export_holds_only_its_own_adapter():
    config = tiny_config(dtype="float64", batch_size=4)
    host = ModelHost.for_config(config)
    embedded = _slot(tiny_config(dtype="float64", batch_size=4, optimizer=SGD1,
                                 lora_config=LoRAConfig(rank=4, target_modules=["embed_tokens"])), host=host)
    headed = _slot(tiny_config(dtype="float64", batch_size=4,
                               lora_config=LoRAConfig(rank=4, target_modules=["lm_head"])), host=host)
    names = set(embedded.trainable)
    assert names and all("lora_embedding" in n and n.endswith(".default") for n in names)
    assert not embedded.shares_passes and headed.shares_passes  # the shared pass routes linear layers only
    before = _weights(embedded)
    _train(embedded, seed=5, steps=1)
    assert any(not torch.equal(before[n], p.detach()) for n, p in embedded.trainable.items())
    assert set(embedded.state_dict(include_optimizer=False)["trainable"]) == names
    from safetensors.torch import load as load_safetensors

    exported = load_safetensors(headed.adapter_files()["adapter_model.safetensors"])
    assert exported and all("lm_head.lora_" in k for k in exported)


def test_a_host_whose_base_a_slot_trained_takes_no_other_slot_even_after_it_left():
    # What full fine-tuning or a LoRA bias changed stays in the base: no later slot may train on top of it.
    config = tiny_config()
    for holder_config in (tiny_config(lora_config=None),
                          tiny_config(lora_config=LoRAConfig(rank=2, target_modules=["q_proj"], bias="all"))):
        host = ModelHost.for_config(config)
        holder = AdapterSlot(holder_config, host=host)
        with pytest.raises(ValidationError, match="takes no other slot"):
            AdapterSlot(config, host=host)
        holder.close()
        assert host.slots == 0
        with pytest.raises(ValidationError, match="takes no other slot"):
            AdapterSlot(config, host=host)
