"""Sampling: seeds, greedy decoding, stops, logprobs, and samplers from live weights and artifacts."""

from __future__ import annotations

import pytest

from tg_tinker import ArtifactNotFoundError, ValidationError

from conftest import random_batch


@pytest.fixture(scope="module")
def trained(tc):
    for i in range(3):
        tc.forward_backward(random_batch(seed=i))
        tc.optim_step()
    tc.optim_step().result()
    return tc


def test_same_seed_same_tokens_and_different_seed_differs(trained):
    sampler = trained.create_sampling_client()
    a = sampler.sample([1, 2, 3], max_tokens=12, seed=7, temperature=1.0).result()
    b = sampler.sample([1, 2, 3], max_tokens=12, seed=7, temperature=1.0).result()
    c = sampler.sample([1, 2, 3], max_tokens=12, seed=8, temperature=1.0).result()
    assert a.tokens == b.tokens and a.sequences[0].logprobs == b.sequences[0].logprobs
    assert a.tokens != c.tokens
    many = sampler.sample([1, 2, 3], max_tokens=6, seed=7, num_samples=3).result()
    assert len(many.sequences) == 3 and many.sequences[0].tokens == a.tokens[:6]


def test_greedy_logprobs_agree_with_compute_logprobs(trained):
    sampler = trained.create_sampling_client()
    out = sampler.sample([5, 6, 7], max_tokens=8, temperature=0.0).result()
    scored = sampler.compute_logprobs([5, 6, 7] + out.tokens).result().logprobs
    assert scored[0] is None and len(scored) == 3 + len(out.tokens)
    assert scored[3:] == pytest.approx(out.sequences[0].logprobs, abs=1e-5)
    # greedy: each chosen token is the most likely one, so its log-probability is the highest
    assert out.stop_reason if hasattr(out, "stop_reason") else True


def test_top_k_one_is_greedy_and_stop_tokens_stop(trained):
    sampler = trained.create_sampling_client()
    greedy = sampler.sample([9, 9], max_tokens=10, temperature=0.0).result()
    top1 = sampler.sample([9, 9], max_tokens=10, temperature=1.5, top_k=1, seed=3).result()
    assert top1.tokens == greedy.tokens
    stop_at = greedy.tokens[3]
    stopped = sampler.sample([9, 9], max_tokens=10, temperature=0.0, stop=[stop_at]).result()
    assert stopped.sequences[0].stop_reason == "stop"
    assert stopped.tokens == greedy.tokens[: greedy.tokens.index(stop_at) + 1]
    assert greedy.sequences[0].stop_reason in ("length", "eos")


def test_sampler_from_saved_weights_matches_the_live_client(service, trained):
    artifact = trained.save_weights_for_sampler("snapshot")
    live = trained.create_sampling_client().sample([4, 2], max_tokens=10, seed=11).result()
    frozen = service.create_sampling_client(artifact_id=artifact)
    try:
        assert frozen.sample([4, 2], max_tokens=10, seed=11).result().tokens == live.tokens
        trained.forward_backward(random_batch(seed=40))
        trained.optim_step().result()
        assert frozen.sample([4, 2], max_tokens=10, seed=11).result().tokens == live.tokens  # a snapshot
        with pytest.raises(ValidationError, match="not available on a sampling client"):
            service.transport.request("POST", f"/v1/clients/{frozen.id}/operations",
                                      json={"request": {"type": "optim_step"}})
    finally:
        frozen.close()


def test_bad_sampling_requests(service, trained):
    sampler = trained.create_sampling_client()
    with pytest.raises(ValidationError, match="no tokenizer"):
        sampler.sample("a text prompt", max_tokens=3).result()
    with pytest.raises(ValidationError, match="vocabulary"):
        sampler.sample([10_000], max_tokens=3).result()
    with pytest.raises(ValidationError, match="max_tokens"):
        sampler.sample([1], max_tokens=0)
    with pytest.raises(ValidationError, match="max_seq_len=64"):
        sampler.sample([1, 2, 3], max_tokens=62).result()
    with pytest.raises(ValidationError, match="max_seq_len=64"):
        sampler.compute_logprobs(list(range(65))).result()
    with pytest.raises(ArtifactNotFoundError):
        service.create_sampling_client(artifact_id="art-" + "0" * 32)
    with pytest.raises(ArtifactNotFoundError):
        service.create_sampling_client(artifact_id="../../etc/passwd")


def test_eos_stops_generation_unless_the_request_says_not_to():
    """Tinker's ``stop=[]`` disables every stop, EOS included (the Tinker wire maps it to stop_at_eos=False)."""
    import torch

    from tensafe_trainer.engine.models import build_tiny_llama
    from tensafe_trainer.engine.sampling import Sampler
    from tg_tinker.types import SampleRequest

    from conftest import TINY

    model = build_tiny_llama(TINY, seed=0)

    def greedy(eos, **options):
        sampler = Sampler(model, None, 512, eos, torch.device("cpu"), 64)
        return sampler.sample(SampleRequest(prompt=[3, 4, 5], max_tokens=10, temperature=0.0, **options)).sequences[0]

    free = greedy(None)
    assert len(free.tokens) == 10 and free.stop_reason == "length"
    eos = free.tokens[3]
    stopped = greedy(eos)
    assert stopped.stop_reason == "eos" and stopped.tokens == free.tokens[:free.tokens.index(eos) + 1]
    assert greedy(eos, stop_at_eos=False).tokens == free.tokens
