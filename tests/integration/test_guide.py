"""Every code block of the user's training guide runs, unchanged but for the model name and data."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import tg_tinker
from tg_tinker import BatchData, LoRAConfig, TrainingConfig

from conftest import TINY, dp_config, random_batch, tiny_config

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "training-guide.md"
SHARED_GUIDE = Path(__file__).resolve().parents[3] / "shared" / "seed" / "training-guide.md"
BLOCKS = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)


def test_guide_copy_is_the_shared_one():
    if not SHARED_GUIDE.exists():
        pytest.skip("../shared is not beside this checkout")
    assert GUIDE.read_text() == SHARED_GUIDE.read_text()


def test_guide_has_blocks():
    assert len(BLOCKS) >= 15


@pytest.fixture(scope="module")
def guide_tc(service):
    # DP on, so the guide's `optim_step(apply_dp_noise=True)` block runs as written.
    config = tiny_config(dp_config=dp_config(), gradient_accumulation_steps=4)
    client = service.create_training_client(config)
    yield client
    client.close()


@pytest.fixture(scope="module")
def checkpoint(guide_tc):
    return guide_tc.save_state()


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_guide_block(index, service, guide_tc, checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the download block writes checkpoint.bin
    code = BLOCKS[index].replace("meta-llama/Llama-3-8B", TINY).replace("art-xxx-yyy", checkpoint.artifact_id)
    batch = random_batch(rows=2, width=4)
    namespace = {name: getattr(tg_tinker, name) for name in tg_tinker.__all__}
    namespace.update(
        service=service, tc=guide_tc, batch=BatchData(**batch), checkpoint=checkpoint,
        tokens=batch["input_ids"], mask=batch["attention_mask"], labels=batch["labels"],
        batches=[random_batch(rows=2, width=8, seed=s) for s in range(3)],
        micro_batches=[random_batch(rows=2, width=8, seed=s) for s in range(4)],
        dataloader=[random_batch(rows=2, width=8, seed=s) for s in range(3)],
    )
    step_before = guide_tc.refresh().step
    exec(compile(code, f"training-guide block {index}", "exec"), namespace)
    if "pull_artifact" in code:
        assert (tmp_path / "checkpoint.bin").read_bytes() == service.pull_artifact(checkpoint.artifact_id)
    if "optim_step" in code and "service.create_training_client" not in code:
        assert guide_tc.refresh().step > step_before
    created = namespace.get("tc")
    if created is not guide_tc and created is not None:
        created.close()


def test_guide_checkpoint_block_round_trips(guide_tc, service):
    """The guide's save/load/pull blocks, checked for what they promise."""
    checkpoint = guide_tc.save_state(include_optimizer=True, metadata={"epoch": 1})
    assert checkpoint.size_bytes == len(service.pull_artifact(checkpoint.artifact_id))
    assert checkpoint.metadata == {"epoch": 1}
    result = guide_tc.load_state(artifact_id=checkpoint.artifact_id)
    assert (result.step, result.status) == (checkpoint.step, "loaded")


def test_full_finetune_config_from_guide_builds():
    config = TrainingConfig(model_ref=TINY, lora_config=None)
    assert config.lora_config is None
    assert TrainingConfig(model_ref=TINY).lora_config == LoRAConfig()
