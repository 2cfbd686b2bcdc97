"""Exported adapters are plain PEFT folders that give the trainer's logits; the CLI tools work offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tg_tinker import ValidationError

from conftest import TINY, random_batch, tiny_config


def local_logprobs(folder: Path, batch: dict) -> list[float]:
    from peft import PeftModel

    from tensafe_trainer.engine.models import build_tiny_llama

    model = PeftModel.from_pretrained(build_tiny_llama(TINY, seed=0), folder).eval()
    ids, labels = torch.tensor(batch["input_ids"]), torch.tensor(batch["labels"])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
    keep = labels != -100
    return logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0][keep].tolist()


def test_export_adapter_loads_in_peft_with_the_trainers_logits(tc, tmp_path):
    for i in range(2):
        tc.forward_backward(random_batch(seed=i))
        tc.optim_step()
    folder = tc.export_adapter(tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                        "tensafe-receipt.json"]
    batch = random_batch(seed=99)
    theirs = [lp for row in tc.forward(batch).result().logprobs for lp in row if lp is not None]
    assert local_logprobs(folder, batch) == pytest.approx(theirs, abs=1e-4)


def test_full_finetuning_has_no_adapter(service, tmp_path):
    full = service.create_training_client(tiny_config(lora_config=None))
    try:
        with pytest.raises(ValidationError, match="no adapter"):
            full.export_adapter(tmp_path / "x")
    finally:
        full.close()


def test_cli_decrypts_and_exports_a_pulled_checkpoint(tc, tmp_path):
    checkpoint = tc.save_state()
    home = os.environ["TENSAFE_HOME"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    base = [sys.executable, "-m", "tensafe_trainer", "artifact"]
    listed = subprocess.run(base + ["list", "--home", home], capture_output=True, text=True, env=env)
    assert checkpoint.artifact_id in listed.stdout
    out = tmp_path / "adapter"
    exported = subprocess.run(base + ["export", checkpoint.artifact_id, "--home", home, "--out", str(out)],
                              capture_output=True, text=True, env=env)
    assert exported.returncode == 0, exported.stderr
    batch = random_batch(seed=5)
    theirs = [lp for row in tc.forward(batch).result().logprobs for lp in row if lp is not None]
    assert local_logprobs(out, batch) == pytest.approx(theirs, abs=1e-4)
    plain = tmp_path / "state.pt"
    decrypted = subprocess.run(base + ["decrypt", checkpoint.artifact_id, "--home", home, "--out", str(plain)],
                               capture_output=True, text=True, env=env)
    assert decrypted.returncode == 0, decrypted.stderr
    state = torch.load(plain, weights_only=True)
    assert state["step"] == checkpoint.step and state["optimizer"] is not None
    missing = subprocess.run(base + ["decrypt", "art-" + "0" * 32, "--home", home, "--out", str(plain)],
                             capture_output=True, text=True, env=env)
    assert missing.returncode == 1 and "ArtifactNotFoundError" in missing.stderr
