"""A model host: one base model on one device in one dtype, and what every adapter slot on it shares.

A slot (adapter.py) is one client's trainable part: its LoRA adapter (or, for full fine-tuning, the
weights themselves), optimizer, gradient accumulator, privacy accountant and step. The host holds what is
not the client's: the base model's weights, tokenizer and vocabulary, and the lock a pass over the model
holds. Today a host carries one slot (an engine process per client); several slots on one host, their rows
in shared passes, is where it is going (the multi-LoRA issue).
"""

from __future__ import annotations

import functools
import threading

import torch

from tg_tinker.config import TrainingConfig
from tg_tinker.errors import ValidationError

from tensafe_trainer.engine.models import LoadedModel, load_model, pick_device, pick_dtype, public_model_name

# Fields of a client's config that pick its host: a slot fits a host only if they agree.
HOST_DEFINING = ("model_ref", "device", "dtype", "seed")


class ModelHost:
    def __init__(self, model_ref: str, *, device: str = "auto", dtype: str = "auto", seed: int = 0):
        self.model_ref = model_ref
        self.defining = {"model_ref": model_ref, "device": device, "dtype": dtype, "seed": seed}
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        torch.manual_seed(seed)  # a tiny random model's weights, and then the first slot's adapter, follow the seed
        loaded: LoadedModel = load_model(model_ref, seed=seed, dtype=self.dtype, device=self.device)
        self.base = loaded.model
        self.tokenizer = loaded.tokenizer
        self.vocab_size = loaded.vocab_size
        self.eos_token_id = loaded.eos_token_id
        self.lock = threading.Lock()  # held by a pass over the model
        self.slots = 0

    @classmethod
    def for_config(cls, config: TrainingConfig) -> "ModelHost":
        return cls(config.model_ref, device=config.device, dtype=config.dtype, seed=config.seed)

    def attach(self, config: TrainingConfig) -> torch.nn.Module:
        """The model a new slot trains: the base with the slot's LoRA adapter, or the base itself (full
        fine-tuning). One slot per host for now: a second is refused rather than silently sharing weights."""
        differing = [f for f in HOST_DEFINING if getattr(config, f) != self.defining[f]]
        if differing:
            raise ValidationError(f"this client's {', '.join(differing)} differ from its model host's",
                                  {"field": differing[0]})
        if self.slots:
            raise ValidationError("this model host already carries a slot (one per host for now)")
        self.slots += 1
        if config.lora_config is None:
            return self.base.requires_grad_(True).train()
        return _with_lora(self.base, config).train()

    @functools.cached_property
    def public_model_name(self) -> str:
        return public_model_name(self.model_ref)


def _with_lora(model: torch.nn.Module, config: TrainingConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = config.lora_config
    peft_config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), bias=lora.bias, task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:
        raise ValidationError(f"invalid lora_config for this model: {exc}", {"field": "lora_config"}) from None
