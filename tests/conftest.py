"""Shared fixtures. Every test is offline and uses a throwaway TENSAFE_HOME."""

from __future__ import annotations

import os
import random

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tg_tinker import DPConfig, LoRAConfig, OptimizerConfig, ServiceClient, TrainingConfig  # noqa: E402

pytest_plugins = ["kube_helpers"]  # the test cluster's fixtures, shared by the test_kube_* modules

# Small enough that a training client starts and steps in well under a second of compute.
TINY = "tiny-random-llama:hidden=64,layers=2,heads=4,vocab=512,intermediate=128"
VOCAB = 512


def tiny_config(**overrides) -> TrainingConfig:
    values = dict(model_ref=TINY, batch_size=8, max_seq_len=64, seed=0,
                  lora_config=LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]),
                  optimizer=OptimizerConfig(learning_rate=1e-2))
    values.update(overrides)
    return TrainingConfig(**values)


def dp_config(**overrides) -> DPConfig:
    values = dict(noise_multiplier=1.0, max_grad_norm=1.0, dataset_size=1000)
    values.update(overrides)
    return DPConfig(**values)


def random_batch(rows: int = 4, width: int = 16, seed: int = 0, vocab: int = VOCAB) -> dict:
    rng = random.Random(seed)
    ids = [[rng.randrange(vocab) for _ in range(width)] for _ in range(rows)]
    return {"input_ids": ids, "attention_mask": [[1] * width for _ in ids],
            "labels": [row[1:] + [-100] for row in ids]}


@pytest.fixture(scope="session", autouse=True)
def tensafe_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("tensafe-home")
    os.environ["TENSAFE_HOME"] = str(home)
    # Key sets apart from the homes (the default is the user's ~/.config/tensafe/keys/<home's keys id>)
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("config"))
    os.environ.pop("TENSAFE_KEYS_DIR", None)
    return home


@pytest.fixture
def no_noise(monkeypatch):
    """The DP mechanism without its noise, to check the clipped sum and the denominator exactly."""
    monkeypatch.setattr("tensafe_trainer.privacy.dp.add_secure_normal_", lambda target, std, stream=None: None)


@pytest.fixture(scope="session")
def service(tensafe_home):
    with ServiceClient() as svc:
        yield svc


@pytest.fixture(scope="module")
def tc(service):
    client = service.create_training_client(tiny_config())
    yield client
    client.close()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, as a model folder: the Tinker suites' model."""
    from tinker_helpers import build_tokenized_tiny_model

    return build_tokenized_tiny_model(tmp_path_factory.mktemp("tinker-model") / "tiny-smollm2-tokenizer")
