"""A model host: one base model on one device in one dtype, and what every adapter slot on it shares.

A slot (adapter.py) is one client's trainable part: its LoRA adapter (or, for full fine-tuning, the
weights themselves), optimizer, gradient accumulator, privacy accountant and step. The host holds what is
not the client's: the base model's weights, tokenizer and vocabulary. LoRA slots share it: each is a named
PEFT adapter on the one base model, and the host switches the adapter a pass runs with (``activate``). A slot
that trains weights of the base itself (full fine-tuning, or LoRA with a trainable ``bias``) holds a host of its
own: nothing it changes may reach another slot.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from typing import Optional

import torch

from tg_tinker.config import TrainingConfig
from tg_tinker.errors import ValidationError

from tensafe_trainer.engine.models import LoadedModel, is_tiny, load_model, pick_device, pick_dtype, public_model_name

# Fields of a client's config that pick its host: a slot fits a host only if they agree.
HOST_DEFINING = ("model_ref", "device", "dtype", "seed")
HOST_MISMATCH = "host_mismatch"  # an error's detail: a slot was sent to a host its model does not fit
CANONICAL_ADAPTER = "default"  # how checkpoints and exports name a slot's adapter, whatever the host calls it
BASE = ""  # ModelHost.exclusive: full fine-tuning holds the host (no adapter name)


def shares_host(config: TrainingConfig) -> bool:
    """Whether a client trains only weights of its own (a LoRA adapter without a trainable bias), so that its
    slot may sit on a host beside others."""
    return config.lora_config is not None and config.lora_config.bias == "none"


def host_key(config: TrainingConfig) -> tuple:
    """What a host is for. The seed picks a tiny random model's weights; a real model's it does not (there it
    only starts each adapter, which the slot does itself)."""
    return _key(config.model_ref, config.device, config.dtype, config.seed)


def _key(model_ref: str, device: str, dtype: str, seed: int) -> tuple:
    return (model_ref, device, dtype, seed if is_tiny(model_ref) else None)


class ModelHost:
    def __init__(self, model_ref: str, *, device: str = "auto", dtype: str = "auto", seed: int = 0):
        self.model_ref = model_ref
        self.defining = {"model_ref": model_ref, "device": device, "dtype": dtype, "seed": seed}
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        torch.manual_seed(seed)  # a tiny random model's weights follow the seed
        loaded: LoadedModel = load_model(model_ref, seed=seed, dtype=self.dtype, device=self.device)
        self.base = loaded.model
        self.tokenizer = loaded.tokenizer
        self.vocab_size = loaded.vocab_size
        self.eos_token_id = loaded.eos_token_id
        self.peft = None  # the PEFT model the adapters live on, from the first LoRA slot
        self.adapters: set[str] = set()
        self.active: Optional[str] = None
        # A slot that trains the base's own weights holds the host alone, for good: what it changed stays in the
        # base after it leaves. Its adapter's name, or BASE (full fine-tuning); None if none ever came.
        self.exclusive: Optional[str] = None
        self._base_attached = False  # a full fine-tuning slot is on it now
        self._names = (f"slot{i}" for i in itertools.count())

    @classmethod
    def for_config(cls, config: TrainingConfig) -> "ModelHost":
        return cls(config.model_ref, device=config.device, dtype=config.dtype, seed=config.seed)

    @property
    def slots(self) -> int:
        return len(self.adapters) + int(self._base_attached)

    def fits(self, config: TrainingConfig) -> bool:
        return host_key(config) == _key(**self.defining)

    def attach(self, config: TrainingConfig) -> tuple[torch.nn.Module, Optional[str]]:
        """The model a new slot trains and its adapter's name on this host: the base with a new LoRA adapter
        (started from the config's seed), or the base itself (None: full fine-tuning, on a host of its own)."""
        if not self.fits(config):
            differing = [f for f in HOST_DEFINING if getattr(config, f) != self.defining[f]]
            raise ValidationError(f"this client's {', '.join(differing)} differ from its model host's",
                                  {"field": differing[0]})
        if self.exclusive is not None:
            raise ValidationError("this model host's base was handed to a slot that trains it (full fine-tuning, or a "
                                  "LoRA bias), which needs a model host of its own: it takes no other slot",
                                  {"field": "lora_config"})
        if not shares_host(config) and self.slots:
            raise ValidationError("a slot that trains the base model's own weights (full fine-tuning, or a LoRA bias) "
                                  "needs a model host of its own", {"field": "lora_config"})
        if config.lora_config is None:
            self.exclusive, self._base_attached = BASE, True
            return self.base.requires_grad_(True).train(), None
        name = next(self._names)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(config.seed)  # the adapter starts from its own seed, and leaves the host's stream be
            self._add_adapter(name, config)
        self.adapters.add(name)
        if not shares_host(config):
            self.exclusive = name
        self.activate(name)
        return self.peft.train(), name

    def _add_adapter(self, name: str, config: TrainingConfig) -> None:
        from peft import LoraConfig, get_peft_model

        lora = config.lora_config
        peft_config = LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules), bias=lora.bias, task_type="CAUSAL_LM",
        )
        try:
            if self.peft is None:
                self.peft = get_peft_model(self.base, peft_config, adapter_name=name)
            else:
                self.peft.add_adapter(name, peft_config)
        except ValueError as exc:
            raise ValidationError(f"invalid lora_config for this model: {exc}", {"field": "lora_config"}) from None

    def activate(self, name: Optional[str]) -> None:
        """Make ``name``'s adapter the one the next pass runs with (and the only one with gradients)."""
        if name is not None and name != self.active:
            self.peft.set_adapter(name)  # the PEFT model's own record too (get_base_model reads it)
            self.active = name

    @contextlib.contextmanager
    def routed(self, spans: list[tuple[Optional[str], int, int]]):
        """Inside: a pass over the base model sends each span of rows ``(adapter, start, end)`` (contiguous, in
        order, covering the batch) through its own adapter, and every one of these adapters has gradients.

        PEFT's own forward then computes the base layer alone, and a hook on each LoRA layer adds each span's
        ``B(A(dropout(x))) * scaling`` for its rows: slices, not PEFT's per-row gather and scatter (measured: the
        gathers cost a pass of eight slots more than it saved)."""
        names = {n for n, _, _ in spans if n is not None}
        layers = self.lora_layers()
        self.peft.base_model.disable_adapter_layers()
        self.active = None  # the next single pass activates its own adapter again
        for layer in layers:
            for name in names & set(layer.lora_A):
                layer.lora_A[name].requires_grad_(True)
                layer.lora_B[name].requires_grad_(True)

        def add_deltas(layer, args, output):
            x = args[0]
            if not names & set(layer.lora_A):
                return output
            deltas = []
            for name, start, end in spans:
                if name is None or name not in layer.lora_A:
                    deltas.append(output.new_zeros((end - start, *output.shape[1:])))
                    continue
                a, b = layer.lora_A[name], layer.lora_B[name]
                rows = layer.lora_dropout[name](x[start:end].to(a.weight.dtype))
                deltas.append((b(a(rows)) * layer.scaling[name]).to(output.dtype))
            return output + torch.cat(deltas)

        handles = [layer.register_forward_hook(add_deltas) for layer in layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.peft.base_model.enable_adapter_layers()

    def lora_layers(self) -> list:
        from peft.tuners.lora import LoraLayer

        return [m for m in self.peft.modules() if isinstance(m, LoraLayer)] if self.peft is not None else []

    def routes(self, name: Optional[str]) -> bool:
        """Whether ``routed`` can carry this adapter: LoRA on linear layers only (not on embeddings)."""
        return name is not None and not any(name in layer.lora_embedding_A for layer in self.lora_layers())

    def detach(self, name: Optional[str]) -> None:
        """Remove a slot's adapter (its weights and optimizer go with the slot object)."""
        if name is None:
            self._base_attached = False
            return
        self.adapters.discard(name)
        self.peft.delete_adapter(name)
        if self.active == name:
            self.active = None

    @functools.cached_property
    def public_model_name(self) -> str:
        return public_model_name(self.model_ref)


def owns(parameter: str, adapter: str) -> bool:
    """Whether a parameter of the PEFT model is ``adapter``'s: ``...lora_A.<adapter>.weight`` (a linear layer's), or
    ``...lora_embedding_A.<adapter>`` (an embedding's, a parameter of its own)."""
    return f".{adapter}." in parameter or parameter.endswith(f".{adapter}")


def canonical_name(parameter: str, adapter: Optional[str]) -> str:
    """A slot's parameter as a checkpoint names it: the adapter called ``default`` whatever its name on the host."""
    if adapter is None:
        return parameter
    if parameter.endswith(f".{adapter}"):
        parameter = parameter[:-len(adapter)] + CANONICAL_ADAPTER
    return parameter.replace(f".{adapter}.", f".{CANONICAL_ADAPTER}.")
