"""The model host (engine/host.py): what a slot shares, and what it may not borrow."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from tg_tinker.errors import ValidationError

from tensafe_trainer.engine.adapter import AdapterSlot
from tensafe_trainer.engine.host import ModelHost


def test_a_slot_on_a_given_host_is_the_slot_it_would_have_been_alone():
    config = tiny_config()
    alone = AdapterSlot(config)
    hosted = AdapterSlot(config, host=ModelHost.for_config(config))
    assert hosted.vocab_size == alone.vocab_size and hosted.public_model_name == alone.public_model_name
    for (name, mine), (_, theirs) in zip(hosted.trainable.items(), alone.trainable.items()):
        assert torch.equal(mine, theirs), name  # same seed, same base and adapter weights


def test_a_host_takes_one_slot_and_only_of_its_own_model():
    config = tiny_config()
    host = ModelHost.for_config(config)
    with pytest.raises(ValidationError, match="seed differ"):
        AdapterSlot(config.model_copy(update={"seed": config.seed + 1}), host=host)
    AdapterSlot(config, host=host)
    with pytest.raises(ValidationError, match="already carries a slot"):
        AdapterSlot(config, host=host)
