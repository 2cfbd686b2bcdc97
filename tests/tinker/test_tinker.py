"""The official ``tinker`` SDK, unmodified, against ``tensafe serve``: each call's values checked against an
independent computation, the wire's dedup, seeds, the sampler/trainer logprob gap, tenancy, and DP from the
server's policy (epsilon reported, the budget enforced, client-side custom losses refused)."""

from __future__ import annotations

import json
import random
import time

import httpx
import numpy as np
import pytest
import torch

from tg_tinker.errors import ValidationError, error_from_wire
from tensafe_trainer.api.tinker.convert import SAMPLING_CODES
from accounting_helpers import pld_epsilon
from tinker_helpers import POLICY, InProcessTinker, artifact_state, start_tinker_trainer

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    trainer = start_tinker_trainer(tmp_path_factory.mktemp("tinker-home"), POLICY,
                                   tenants=("plain", "private", "tight", "other", "rl-private", "declared"))
    yield trainer
    trainer.trainer.close()


@pytest.fixture(scope="module")
def plain(server):
    return server.service("plain")


def datum(tokens: list[int], weights=None, **inputs) -> types.Datum:
    n = len(tokens) - 1
    loss_inputs = {"target_tokens": tokens[1:], "weights": weights if weights is not None else [1.0] * n}
    loss_inputs.update(inputs)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=loss_inputs)


def sequences(count: int, seed: int, vocab: int = 49152, lengths=(6, 14)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(*lengths))] for _ in range(count)]


def reference_logprobs(model_dir, rows: list[list[int]]) -> list[np.ndarray]:
    """The base model's logprob of each next token, each row alone and unpadded (a fresh LoRA is the identity)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for r in rows:
            logits = model(input_ids=torch.tensor([r[:-1]])).logits[0].double()
            out.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(r[1:])[:, None])[:, 0].numpy())
    return out


def test_forward_backward_and_forward_match_an_independent_computation(plain, model_dir):
    tc = plain.create_lora_training_client(base_model=str(model_dir), rank=4).result()
    rows = sequences(3, seed=1)
    weights = [[random.Random(i).choice([0.0, 0.5, 1.0]) for _ in r[1:]] for i, r in enumerate(rows)]
    data = [datum(r, w) for r, w in zip(rows, weights)]
    reference = reference_logprobs(model_dir, rows)
    expected_loss = sum(float(-(lp * np.array(w)).sum()) for lp, w in zip(reference, weights))

    forward = tc.forward(data, "cross_entropy").result()
    fb = tc.forward_backward(data, "cross_entropy").result()
    for out in (forward, fb):
        assert out.metrics["loss:sum"] == pytest.approx(expected_loss, rel=1e-4)
        assert len(out.loss_fn_outputs) == len(rows)
        for got, want in zip(out.loss_fn_outputs, reference):
            np.testing.assert_allclose(got["logprobs"].to_numpy(), want, rtol=1e-4, atol=1e-5)
    info = tc.get_info()
    assert info.model_data.model_name == str(model_dir) and info.lora_rank == 4
    assert tc.get_tokenizer().encode("hello") == tc.get_tokenizer().encode("hello")


def test_adam_params_are_honoured(server, plain, model_dir):
    """Adam's first step moves each weight with a gradient by exactly lr (bias-corrected m/sqrt(v) = sign(g));
    LoRA's A has no gradient while B is zero, so decoupled weight decay alone scales it by 1 - lr * wd."""
    tc = plain.create_lora_training_client(base_model=str(model_dir), rank=4, train_mlp=False,
                                           train_unembed=False).result()
    before = tc.save_state("before").result().path
    tc.forward_backward([datum(r) for r in sequences(2, seed=2)], "cross_entropy").result()
    lr, wd = 0.003, 0.25
    tc.optim_step(types.AdamParams(learning_rate=lr, beta1=0.5, beta2=0.7, eps=1e-12, weight_decay=wd)).result()
    after = tc.save_state("after").result().path
    old, new = artifact_state(server, "plain", before)["trainable"], artifact_state(server, "plain", after)["trainable"]
    assert {n.split(".")[-2] for n in new} == {"lora_A", "lora_B"} or all("lora" in n for n in new)
    assert any("q_proj" in n for n in new) and not any("mlp" in n or "lm_head" in n for n in new)
    for name in new:
        if "lora_A" in name:
            torch.testing.assert_close(new[name], old[name] * (1 - lr * wd), rtol=1e-6, atol=1e-9)
        else:
            moved = new[name][new[name] != 0].abs()
            assert moved.numel() > 0
            torch.testing.assert_close(moved, torch.full_like(moved, lr), rtol=1e-4, atol=1e-9)


def test_a_repeated_seq_id_runs_once(server, plain, model_dir):
    from tinker.proto.request_conv import forward_backward_request_to_proto

    tc = plain.create_lora_training_client(base_model=str(model_dir), rank=4).result()
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[datum(r) for r in sequences(2, seed=3)],
                                                          loss_fn="cross_entropy"),
        model_id=tc.model_id, seq_id=900)
    body = forward_backward_request_to_proto(request).SerializeToString()
    headers = {"X-API-Key": server.keys["plain"], "Content-Type": "application/x-protobuf"}
    ids = [httpx.post(f"{server.base_url}/api/v1/forward_backward", content=body, headers=headers).json()["request_id"]
           for _ in range(3)]
    assert ids[0] == ids[1] == ids[2]
    other = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[datum(r) for r in sequences(2, seed=30)],
                                                          loss_fn="cross_entropy"),
        model_id=tc.model_id, seq_id=900)
    refused = httpx.post(f"{server.base_url}/api/v1/forward_backward", headers=headers,
                         content=forward_backward_request_to_proto(other).SerializeToString())
    assert refused.status_code == 422 and "reused for a different request" in refused.text
    done = httpx.post(f"{server.base_url}/api/v1/retrieve_future", json={"request_id": ids[0]}, timeout=60,
                      headers={"X-API-Key": server.keys["plain"]})
    assert done.headers["content-type"].startswith("application/x-protobuf")
    audit = httpx.get(f"{server.base_url}/v1/audit", params={"tenant_id": "plain", "operation": "forward_backward",
                                                             "limit": 10_000},
                      headers={"Authorization": f"Bearer {server.trainer.token}"}).json()
    from tensafe_trainer.service.tinker.registry import client_id_for

    assert sum(e["training_client_id"] == client_id_for(tc.model_id) for e in audit) == 1


def test_sampling_seeds_logprob_gap_and_prompt_logprobs(plain, model_dir):
    tc = plain.create_lora_training_client(base_model=str(model_dir), rank=4).result()
    tc.forward_backward([datum(r) for r in sequences(2, seed=4)], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=0.01)).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(sequences(1, seed=5)[0])
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=11)
    first = sampler.sample(prompt, 2, params).result()
    again = sampler.sample(prompt, 2, params).result()
    other = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=8, temperature=1.0, seed=12)).result()
    assert [s.tokens for s in first.sequences] == [s.tokens for s in again.sequences]
    assert [s.tokens for s in first.sequences] != [s.tokens for s in other.sequences]
    assert all(len(s.logprobs) == len(s.tokens) for s in first.sequences)

    # The trainer's logprobs of the sampled tokens: the gap the cookbook's KL metric measures is ~0 here.
    seq = first.sequences[0]
    full = prompt.to_ints() + seq.tokens
    weights = [0.0] * (len(prompt.to_ints()) - 1) + [1.0] * len(seq.tokens)
    trained = tc.forward([datum(full, weights)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    gap = np.array(trained[-len(seq.tokens):]) - np.array(seq.logprobs)
    assert np.abs(gap).max() < 1e-4 and abs(gap.mean()) < 1e-5

    scored = sampler.compute_logprobs(types.ModelInput.from_ints(full)).result()
    assert scored[0] is None and len(scored) == len(full)
    np.testing.assert_allclose(scored[1:], trained, rtol=1e-4, atol=1e-4)


def test_checkpoints_load_list_and_delete(server, plain, model_dir):
    tc = plain.create_lora_training_client(base_model=str(model_dir), rank=4).result()
    data = [datum(r) for r in sequences(2, seed=6)]
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=0.01)).result()
    path = tc.save_state("ckpt", ttl_seconds=7200).result().path
    assert path == f"tinker://{tc.model_id}/weights/ckpt"
    expected = tc.forward(data, "cross_entropy").result().metrics["loss:sum"]
    for resumed in (plain.create_training_client_from_state(path).result(),
                    plain.create_training_client_from_state_with_optimizer(path).result()):
        assert resumed.forward(data, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(expected, rel=1e-6)
    rest = tinker.RestClient(base_url=server.base_url, api_key=server.keys["plain"])
    listed = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert [c.tinker_path for c in listed] == [path] and listed[0].expires_at is not None
    assert rest.get_training_run(tc.model_id).result().last_checkpoint.tinker_path == path
    tenant_folder = server.home / "artifacts" / "plain"
    backup = {p.name: p.read_bytes() for p in tenant_folder.glob("art-*.tsa")}  # an insider's copy, before delete
    rest.delete_checkpoint_from_tinker_path(path).result()
    assert rest.list_checkpoints(tc.model_id).result().checkpoints == []
    for name, data in backup.items():  # put back: its data key died with the delete, so it stays deleted
        if not (tenant_folder / name).exists():
            (tenant_folder / name).write_bytes(data)
    assert rest.list_checkpoints(tc.model_id).result().checkpoints == []
    with pytest.raises(tinker.NotFoundError, match="no checkpoint"):
        plain.create_training_client_from_state(path).result()


def test_keys_and_tenants(server, plain, model_dir):
    with pytest.raises(tinker.AuthenticationError):
        tinker.ServiceClient(base_url=server.base_url, api_key="tml-not-a-key").create_lora_training_client(
            base_model=str(model_dir), rank=4).result()
    tc = plain.create_lora_training_client(base_model=str(model_dir), rank=4).result()
    path = tc.save_weights_for_sampler("mine").result().path
    other = server.service("other")
    with pytest.raises(tinker.NotFoundError, match="no checkpoint"):
        other.create_sampling_client(model_path=path).result()
    headers = {"X-API-Key": server.keys["other"]}
    for endpoint, body in (("get_info", {"model_id": tc.model_id}),
                           ("optim_step", {"model_id": tc.model_id, "seq_id": 1,
                                           "adam_params": {"learning_rate": 0.1}})):
        answer = httpx.post(f"{server.base_url}/api/v1/{endpoint}", json=body, headers=headers)
        assert answer.status_code == 404 and "unknown model" in answer.text
    runs = httpx.get(f"{server.base_url}/api/v1/training_runs", headers=headers).json()["training_runs"]
    assert tc.model_id not in {r["training_run_id"] for r in runs}
    # A Tinker key opens nothing on TenSafe's own API, and a TenSafe token nothing on the Tinker wire.
    assert httpx.get(f"{server.base_url}/v1/clients", headers={"Authorization": f"Bearer {server.keys['plain']}"}
                     ).status_code == 401
    assert httpx.post(f"{server.base_url}/api/v1/create_session", json={},
                      headers={"X-API-Key": server.trainer.token}).status_code == 401


def test_dp_from_the_policy_reports_epsilon_keeps_no_unnoised_sum_and_refuses_custom_losses(server, model_dir):
    private = server.service("private")
    tc = private.create_lora_training_client(base_model=str(model_dir), rank=4, train_unembed=False).result()
    before = tc.save_state("before").result().path
    data = [datum(r) for r in sequences(4, seed=7)]
    fb = tc.forward_backward(data, "cross_entropy").result()
    assert len(fb.loss_fn_outputs) == 4  # the data's owner still gets its own losses and logprobs
    mid = tc.save_state("mid-accumulation").result().path  # the accumulated (unnoised) sum is never saved
    saved = artifact_state(server, "private", mid)
    assert set(saved) == {"format", "step", "config", "trainable", "optimizer", "accountant", "metadata"}
    for name, value in artifact_state(server, "private", before)["trainable"].items():
        torch.testing.assert_close(saved["trainable"][name], value)
    step = tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    assert 0 < step.metrics["dp/epsilon"] < 50 and step.metrics["dp/noise_multiplier"] == 1.0
    # The client sent its batch: charged at q = 1 (the policy's dataset_size is only a claim, never dp/epsilon).
    assert step.metrics["dp/sample_rate"] == 1.0 and step.metrics["dp/epsilon_q1"] == step.metrics["dp/epsilon"]
    assert step.metrics["dp/sampling"] == SAMPLING_CODES["asserted"] and step.metrics["dp/group_size"] == 1.0
    assert step.metrics["dp/epsilon"] >= pld_epsilon(((1.0, 1.0, 1),))
    with pytest.raises(tinker.APIStatusError, match="more than batch_size=8"):  # the policy's logical batch
        tc.forward_backward([datum(r) for r in sequences(9, seed=8)], "cross_entropy").result()
    with pytest.raises(tinker.UnprocessableEntityError, match="forward_backward_custom is refused under DP"):
        tc.forward_backward_custom(data, lambda d, logprobs: (sum(-lp.sum() for lp in logprobs), {})).result()
    with pytest.raises(Exception, match="tighten DP, never loosen"):
        private.create_lora_training_client(base_model=str(model_dir), rank=4,
                                            user_metadata={"tensafe.dp.noise_multiplier": "0.5"}).result().result()


def test_a_step_past_the_budget_fails_with_a_user_error(server, model_dir):
    tc = server.service("tight").create_lora_training_client(base_model=str(model_dir), rank=4,
                                                             train_unembed=False).result()
    data = [datum(r) for r in sequences(2, seed=9)]
    spent = []
    with pytest.raises(tinker.RequestFailedError, match="budget") as refused:
        for _ in range(50):
            tc.forward_backward(data, "cross_entropy").result()
            spent.append(tc.optim_step(types.AdamParams(learning_rate=1e-3)).result().metrics["dp/epsilon"])
    assert refused.value.category == types.RequestErrorCategory.User
    # Independently: opacus' RDP accountant, sigma 2, q = 1 (the client's batches), delta 1e-5: 2.17 then 3.19;
    # a third step is 4.01.
    assert spent == pytest.approx([2.17, 3.19], abs=0.01)


def test_malformed_bodies_are_the_callers_error_and_the_server_keeps_serving(server, plain, model_dir):
    """What the attacker review of #16 sent: each a 4xx with TenSafe's error shape, never a 500."""
    tc = plain.create_lora_training_client(base_model=str(model_dir), rank=4).result()
    headers = {"X-API-Key": server.keys["plain"]}
    session_id = tc.model_id.split(":train:")[0]
    for endpoint, body in (("create_model", b"{not json"),
                           ("create_model", {"session_id": session_id, "model_seq_id": "x", "base_model": "m"}),
                           ("create_model", {"session_id": session_id, "model_seq_id": 7, "base_model": "m",
                                             "lora_config": [1, 2]}),
                           ("create_model", {"session_id": session_id, "model_seq_id": 8, "base_model": "m",
                                             "user_metadata": "x"}),
                           ("optim_step", {"model_id": tc.model_id, "seq_id": "x"}),
                           ("save_weights", {"model_id": tc.model_id, "seq_id": 77, "path": "a/b"})):
        answer = httpx.post(f"{server.base_url}/api/v1/{endpoint}", headers=headers,
                            **({"content": body} if isinstance(body, bytes) else {"json": body}))
        assert 400 <= answer.status_code < 500, (endpoint, body, answer.status_code, answer.text)
        assert isinstance(error_from_wire(answer.json()["error"]), ValidationError)
    row = sequences(1, seed=40)[0]
    huge = datum(row, [1e38] + [1.0] * (len(row) - 2))
    with pytest.raises(tinker.UnprocessableEntityError, match="beyond"):
        tc.forward_backward([huge], "cross_entropy").result()
    assert httpx.get(f"{server.base_url}/healthz").status_code == 200
    assert tc.forward([datum(sequences(1, seed=41)[0])], "cross_entropy").result().metrics["loss:sum"] > 0


def test_a_group_declared_in_metadata_is_clipped_whole_and_a_batch_must_hold_whole_groups(server, model_dir):
    declared = server.service("declared")
    tc = declared.create_lora_training_client(base_model=str(model_dir), rank=4, train_unembed=False,
                                              user_metadata={"tensafe.dp.group_size": "4"}).result()
    tc.forward_backward([datum(r) for r in sequences(4, seed=11)], "cross_entropy").result()
    step = tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    assert step.metrics["dp/group_size"] == 4.0 and step.metrics["dp/num_clipped"] <= 1.0  # one unit of four
    tc.forward_backward([datum(r) for r in sequences(6, seed=12)], "cross_entropy").result()
    with pytest.raises(tinker.RequestFailedError, match="inside a group: 2 of its 4 rows") as refused:
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    assert refused.value.category == types.RequestErrorCategory.User
    with pytest.raises(Exception, match="this policy's unit is 4 rows"):  # the policy's unit is kept
        server.service("rl-private").create_lora_training_client(
            base_model=str(model_dir), rank=4, user_metadata={"tensafe.dp.group_size": "2"}).result().result()


def test_a_policy_may_not_claim_a_sample_rate_and_puts_groups_beside_dp(tmp_path):
    from tensafe_trainer.service.tinker.policy import PrivacyPolicy
    from tg_tinker import ValidationError

    cases = {"sample_rate": {"t": {"dp": {"noise_multiplier": 1.0, "sample_rate": 0.001}}},
             "beside 'dp'": {"t": {"dp": {"noise_multiplier": 1.0, "group_size": 4}}},
             "has no 'dp'": {"t": {"group_size": 4}}}
    for message, policy in cases.items():
        (tmp_path / "p.json").write_text(json.dumps(policy))
        with pytest.raises(ValueError, match=message):
            PrivacyPolicy.load(tmp_path / "p.json")
    (tmp_path / "p.json").write_text(json.dumps({"t": {"dp": {"noise_multiplier": 1.0}, "group_size": 4}}))
    policy = PrivacyPolicy.load(tmp_path / "p.json")
    assert policy.dp_for("t", {}).group_size == 4 == policy.dp_for("t", {"tensafe.dp.group_size": "4"}).group_size
    # A policy's unit is kept: split (6), shared by two (8: one group could move the update by 2 C) or shrunk (2).
    for other in ("6", "8", "2", "4.5"):
        with pytest.raises(ValidationError, match="this policy's unit is 4 rows"):
            policy.dp_for("t", {"tensafe.dp.group_size": other})


def test_metadata_cannot_lower_a_noise_the_policy_computes():
    from tensafe_trainer.service.tinker.policy import PrivacyPolicy, TenantPolicy
    from tg_tinker import DPConfig, ValidationError

    policy = PrivacyPolicy({"t": TenantPolicy(DPConfig(target_epsilon=8.0, planned_steps=100, dataset_size=1000))})
    with pytest.raises(ValidationError, match="tighten target_epsilon instead"):
        policy.dp_for("t", {"tensafe.dp.noise_multiplier": "0.01"})
    assert policy.dp_for("t", {"tensafe.dp.target_epsilon": "4"}).target_epsilon == 4.0
    for looser in ({"tensafe.dp.target_epsilon": "9"}, {"tensafe.dp.target_epsilon": "inf"}):
        with pytest.raises(ValidationError, match="never loosen"):
            policy.dp_for("t", looser)


def test_a_trainer_for_one_client_gives_that_clients_dp_to_its_tenants_tinker_models(tmp_path):
    """A TrainingClient's pod: the client's DP config and logical batch are its tenant's Tinker policy (a policy
    file may not say otherwise for that tenant), and its key is kept as a digest only."""
    from tensafe_trainer.service.tinker.keys import TinkerKeys
    from tensafe_trainer.service.tinker.policy import PrivacyPolicy, TenantPolicy
    from tg_tinker import DPConfig, TrainingConfig, ValidationError

    config = TrainingConfig(model_ref="tiny-random-llama", batch_size=8, gradient_accumulation_steps=2,
                            dp_config=DPConfig(noise_multiplier=1.3, max_grad_norm=0.5, dataset_size=500,
                                               sample_rate=0.001))
    policy = PrivacyPolicy({"other": TenantPolicy(None)}).with_client("acme", config)
    # The client's own sampling rate says nothing of a Tinker client's batches: 16 / 500 is charged instead.
    assert policy.for_tenant("acme") == TenantPolicy(config.dp_config.model_copy(update={"sample_rate": None}), 16)
    assert policy.for_tenant("other").dp is None
    with pytest.raises(ValidationError, match="never loosen"):
        policy.dp_for("acme", {"tensafe.dp.noise_multiplier": "1.0"})
    with pytest.raises(ValidationError, match="max_grad_norm: Input should be greater than or equal to 0.000001"):
        policy.dp_for("acme", {"tensafe.dp.max_grad_norm": "1e-45"})  # "tighter", but float32 noise degenerates
    with pytest.raises(ValueError, match="its DP comes from the client's config"):
        PrivacyPolicy({"acme": TenantPolicy(None)}).with_client("acme", config)

    from tensafe_trainer.service.tinker.keys import create_key
    from tg_tinker import AuthenticationError

    planted = create_key(tmp_path, "acme")  # an insider with write access to the data volume adds a digest
    key = "tml-" + "k" * 43
    keys = TinkerKeys(tmp_path, {key: "acme"})
    assert keys.resolve(key).tenant_id == "acme"
    with pytest.raises(AuthenticationError, match="unknown Tinker API key"):  # a pod reads no key file
        keys.resolve(planted)
    with pytest.raises(ValueError, match="starts with 'tml-'"):
        TinkerKeys(tmp_path, {"tml-short": "acme"})


def test_a_shared_trainer_frees_silent_sessions_caps_tenants_and_loads_models_from_its_roots_only(
        tmp_path, model_dir, monkeypatch):
    """A client that stops sending heartbeats (it exited without finishing its session) loses its engines when the
    next one starts; with a per-tenant cap, one tenant's models cannot hold the slots other tenants need; with model
    roots, a key holder cannot make the server load any other folder as a model."""
    monkeypatch.setenv("TENSAFE_TINKER_SESSION_LAPSE_S", "8")  # longer than a model's cold start here
    monkeypatch.setenv("TENSAFE_MAX_CLIENTS_PER_TENANT", "1")
    monkeypatch.setenv("TENSAFE_TINKER_MODEL_ROOTS", str(model_dir.parent))
    (model_dir.parent / "escape").symlink_to(tmp_path, target_is_directory=True)
    server = start_tinker_trainer(tmp_path / "home", {}, tenants=("plain", "other"))
    try:
        def post(endpoint: str, body: dict, tenant: str = "plain"):
            answer = httpx.post(f"{server.base_url}/api/v1/{endpoint}", json=body,
                                headers={"X-API-Key": server.keys[tenant]}, timeout=60)
            return answer.status_code, answer.json()

        def created(tenant: str):
            """A session and a model made by hand, as a client would, without the SDK's heartbeat thread."""
            session_id = post("create_session", {}, tenant)[1]["session_id"]
            code, answer = post("create_model", {"session_id": session_id, "model_seq_id": 0,
                                                 "base_model": str(model_dir), "lora_config": {"rank": 4}}, tenant)
            assert code == 200, answer
            assert post("retrieve_future", {"request_id": answer["request_id"]}, tenant)[1]["type"] == "create_model"
            return answer["model_id"]

        for huge, named in (("tiny-random-llama:hidden=100000", "hidden=100000 (at most 8,192)"),  # each size
                            ("tiny-random-llama:hidden=8192,layers=8", "a tiny random model has at most 200,000,000")):
            code, answer = post("create_model", {"session_id": post("create_session", {})[1]["session_id"],
                                                 "base_model": huge, "lora_config": {"rank": 4}})
            assert code == 422 and named in answer["detail"], answer
        for outside in (str(tmp_path), str(model_dir.parent / "escape"), f"{model_dir}/../../{tmp_path.name}"):
            code, answer = post("create_model", {"session_id": post("create_session", {})[1]["session_id"],
                                                 "base_model": outside, "lora_config": {"rank": 4}})
            assert code == 403 and "model roots" in answer["detail"], (outside, answer)
        silent = created("plain")
        code, answer = post("create_model", {"session_id": post("create_session", {})[1]["session_id"],
                                             "base_model": str(model_dir), "lora_config": {"rank": 4}})
        assert code == 429 and "its limit per tenant" in answer["detail"]  # plain holds its one slot
        created("other")  # another tenant is not held back by plain's model
        time.sleep(11)  # both sessions are silent now, and the server's sweep (every 2.7 s here) has ended them
        code, answer = post("optim_step", {"model_id": silent, "seq_id": 1, "adam_params": {"learning_rate": 0.1}})
        outcome = post("retrieve_future", {"request_id": answer["request_id"]})[1] if code == 200 else answer
        assert "is TERMINATED" in json.dumps(outcome)  # without a start meanwhile; its checkpoints would stay
        created("plain")  # plain's slot is free again
    finally:
        server.trainer.close()
        (model_dir.parent / "escape").unlink()


def test_a_seq_id_whose_result_was_forgotten_is_refused_not_run_again(tmp_path, model_dir):
    """The future store is bounded (1 h; 2,000 futures per model); a retry that comes after its future was
    forgotten must not run its request a second time (under DP: an example counted twice). Here futures are
    forgotten at once (TTL 0), in process, on a real trainer app."""
    from tensafe_trainer.service.futures import FutureStore

    with InProcessTinker(tmp_path) as trainer:
        trainer.service.futures = FutureStore(ttl_s=0.0)
        call, result = trainer.call, trainer.result
        session_id = call("create_session", {}).json()["session_id"]
        created = call("create_model", {"session_id": session_id, "base_model": str(model_dir),
                                        "lora_config": {"rank": 4}})
        model_id = result(created)["model_id"]
        step = {"model_id": model_id, "seq_id": 5, "adam_params": {"learning_rate": 0.01}}
        assert "metrics" in result(call("optim_step", step))
        time.sleep(0.01)
        assert "metrics" in result(call("optim_step", {**step, "seq_id": 6}))  # its arrival forgets seq 5's
        again = call("optim_step", step)  # the SDK's late retry of seq 5
        assert again.status_code == 422 and "already ran, and its result is no longer kept" in again.text
        assert call("get_info", {"model_id": model_id}).status_code == 200  # and the model serves on


def test_a_finished_session_starts_nothing_and_seq_ids_are_what_the_client_sent(tmp_path, model_dir):
    """What the attacker review of #27's future store found, each refused now: a finished session that still
    created models (under the same model id, whose spent seq_ids had gone with the session, so a seq_id trained
    twice) and samplers (engines nothing stopped); a sampler id reused by save_weights_for_sampler (the older
    sampler's weights answered for the new ones); a JSON request without a seq_id taken as seq_id 0 (the second
    step skipped as a retry of the first)."""
    with InProcessTinker(tmp_path) as trainer:
        call, result = trainer.call, trainer.result
        session_id = call("create_session", {}).json()["session_id"]
        model = {"session_id": session_id, "base_model": str(model_dir), "lora_config": {"rank": 4}}
        model_id = result(call("create_model", model))["model_id"]
        step = {"model_id": model_id, "adam_params": {"learning_rate": 0.01}}
        assert [result(call("optim_step", step))["metrics"]["step"] for _ in range(2)] == [1.0, 2.0]
        sampler = {"model_id": model_id, "seq_id": 7, "sampling_session_seq_id": 0}
        assert "sampling_session_id" in result(call("save_weights_for_sampler", sampler))
        reused = call("save_weights_for_sampler", {**sampler, "seq_id": 8})
        assert reused.status_code == 422 and "already exists" in reused.text
        assert result(call("save_weights", {"model_id": model_id, "seq_id": 9, "path": "ck"}))["path"]
        finished = trainer.client.post(f"/api/v1/sessions/{session_id}/finish", json={}, headers=trainer.headers)
        assert finished.status_code == 200
        for endpoint, body in (("create_model", model), ("create_sampling_session",
                                                         {"session_id": session_id, "base_model": str(model_dir),
                                                          "sampling_session_seq_id": 1}),
                               ("load_weights", {"session_id": session_id, "model_seq_id": 0,
                                                 "path": f"tinker://{model_id}/weights/ck"})):
            refused = call(endpoint, body)
            assert refused.status_code == 410 and "finished" in refused.text, endpoint
        live = [s for s in trainer.service.sessions.values() if not s.terminated]
        assert live == []  # every engine of the session stopped, none started after


def test_a_failed_forward_backward_leaves_no_partial_gradients(server, plain, model_dir):
    """One model sees a good batch, then a batch whose loss is not finite (refused), then a step; a twin with the
    same seed sees the good batch and the step: their weights are the same, bit for bit."""
    good = [datum(r) for r in sequences(2, seed=21)]
    rows = sequences(2, seed=22)
    bad = [types.Datum(model_input=types.ModelInput.from_ints(r[:-1]),  # sampled logprob -1e6: the ratio is inf
                       loss_fn_inputs={"target_tokens": r[1:], "logprobs": [-1e6] * (len(r) - 1),
                                       "advantages": [1.0] * (len(r) - 1)}) for r in rows]
    saved = []
    for fails in (True, False):
        tc = plain.create_lora_training_client(base_model=str(model_dir), rank=4, seed=3).result()
        tc.forward_backward(good, "cross_entropy").result()
        if fails:
            with pytest.raises(tinker.RequestFailedError, match="not finite"):
                tc.forward_backward(bad, "importance_sampling").result()
        tc.optim_step(types.AdamParams(learning_rate=0.01)).result()
        saved.append(artifact_state(server, "plain", tc.save_state(f"twin-{fails}").result().path)["trainable"])
    assert saved[0].keys() == saved[1].keys()
    for name in saved[0]:
        assert torch.equal(saved[0][name], saved[1][name]), name


def test_a_call_of_many_datums_is_split_by_the_sdk_and_an_oversized_request_refused(server, model_dir):
    """client/config tells the SDK to send at most 128 datums a request (a request's conversion holds the GIL for
    its rows x width padded tokens); the SDK splits a larger call, and a request past it is refused unconverted.
    Another tenant's key: the module's plain key already holds most of what one key may."""
    from tinker.proto.request_conv import forward_backward_request_to_proto

    own = server.service("other")
    tc = own.create_lora_training_client(base_model=str(model_dir), rank=4).result()
    data = [datum(r) for r in sequences(130, seed=40, lengths=(3, 5))]
    out = tc.forward_backward(data, "cross_entropy").result()
    assert len(out.loss_fn_outputs) == 130
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data[:129], loss_fn="cross_entropy"),
        model_id=tc.model_id, seq_id=7000)
    refused = httpx.post(f"{server.base_url}/api/v1/forward_backward",
                         content=forward_backward_request_to_proto(request).SerializeToString(),
                         headers={"X-API-Key": server.keys["other"], "Content-Type": "application/x-protobuf"})
    assert refused.status_code == 413 and "at most 128 datums" in refused.text


def test_a_key_planted_or_moved_in_the_key_file_opens_nothing_and_is_audited(tmp_path):
    """The insider who can write the home (not the keys, kept apart): one digest of their own for acme added
    to tinker/keys.json, and a key of another tenant moved to acme, no restart. Neither opens anything; both
    are on acme's audit record."""
    import hashlib
    import json

    from fastapi.testclient import TestClient

    from tensafe_trainer.api.app import create_app
    from tensafe_trainer.service.trainer import Settings
    from tensafe_trainer.service.tinker.keys import create_key, keys_file

    home = tmp_path / "home"
    home.mkdir()
    legit = create_key(home, "acme")
    other = create_key(home, "other")
    with TestClient(create_app(Settings(home=home, token="admin-token"))) as client:
        def status(key):
            return client.get("/api/v1/training_runs", headers={"X-API-Key": key}).status_code

        assert status(legit) == 200 and status(other) == 200
        planted = "tml-" + "p" * 43
        entries = json.loads(keys_file(home).read_text())["keys"]
        entries.append({"digest": hashlib.sha256(planted.encode()).hexdigest(), "tenant_id": "acme", "name": "",
                        "created_at": 0.0, "mac": "0" * 64})  # a MAC the insider cannot compute
        moved = next(e for e in entries if e["tenant_id"] == "other")
        moved["tenant_id"] = "acme"  # a real key of tenant other, now claiming acme
        keys_file(home).write_text(json.dumps({"keys": entries}))
        assert status(planted) == 401 and status(other) == 401 and status(legit) == 200
        client.app.state.tensafe.audit.flush()
        refused = client.get("/v1/audit", params={"tenant_id": "acme", "operation": "tinker_key_refused"},
                             headers={"Authorization": "Bearer admin-token"}).json()
        assert len(refused) == 2 and not any(e["success"] for e in refused)


def test_a_revoked_key_stays_refused_when_an_old_key_file_is_put_back(tmp_path, caplog):
    """The insider who can write the home keeps a copy of tinker/keys.json and puts it back (old times and all)
    after `tensafe tinker-key revoke`, run in another process while the server runs: the revocation, kept in the
    key store, takes effect with no restart (even before the key file changes) and the restored entries stay
    refused, logged and on the tenant's audit record. A revocation list that cannot be read opens nothing."""
    import hashlib
    import os
    import subprocess
    import sys

    from fastapi.testclient import TestClient

    from tensafe_trainer.storage.paths import key_provider
    from tensafe_trainer.api.app import create_app
    from tensafe_trainer.service.trainer import Settings
    from tensafe_trainer.service.tinker.keys import RESTORED, create_key, keys_file

    home = tmp_path / "home"
    home.mkdir()
    revoked, pending, kept = (create_key(home, "acme", name) for name in ("revoked", "pending", "kept"))
    old_copy, old_stat = keys_file(home).read_bytes(), keys_file(home).stat()
    with TestClient(create_app(Settings(home=home, token="admin-token"))) as client:
        def status(key):
            return client.get("/api/v1/training_runs", headers={"X-API-Key": key}).status_code

        def refusals():
            client.app.state.tensafe.audit.flush()
            return client.get("/v1/audit", params={"tenant_id": "acme", "operation": "tinker_key_refused"},
                              headers={"Authorization": "Bearer admin-token"}).json()

        assert status(revoked) == 200 and status(pending) == 200 and status(kept) == 200
        # Revoked in the key store, its entry not yet removed (the revoking command's next step): refused at
        # once, the key file unchanged, and not reported as restored.
        key_provider(home).revoke_credentials({hashlib.sha256(pending.encode()).hexdigest()})
        assert status(pending) == 401 and status(kept) == 200 and refusals() == []
        done = subprocess.run([sys.executable, "-m", "tensafe_trainer", "tinker-key", "revoke",
                               hashlib.sha256(revoked.encode()).hexdigest()[:16], "--home", str(home)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "revoked Tinker key" in done.stdout, done.stderr
        assert status(revoked) == 401 and status(kept) == 200
        assert revoked.encode() not in keys_file(home).read_bytes() and len(json.loads(
            keys_file(home).read_text())["keys"]) == 1  # both revoked entries gone from the key file
        time.sleep(0.05)  # the copy is put back later than the revocation (as `cp -p`: its old times kept)
        keys_file(home).write_bytes(old_copy)
        os.utime(keys_file(home), ns=(old_stat.st_atime_ns, old_stat.st_mtime_ns))
        with caplog.at_level("WARNING", logger="tensafe.trainer"):
            assert status(revoked) == 401 and status(pending) == 401 and status(kept) == 200
            assert status(revoked) == 401  # logged and audited once
        assert sum("revoked Tinker key" in r.getMessage() for r in caplog.records) == 2
        refused = refusals()
        assert len(refused) == 2 and not any(e["success"] for e in refused)
        assert {e["error"] for e in refused} == {RESTORED}
        key_provider(home).revocation_file().write_text("{damaged")
        answer = client.get("/api/v1/training_runs", headers={"X-API-Key": kept})
        assert answer.status_code == 401 and "revocation list" in answer.text


def test_a_trainer_for_one_client_reads_no_key_file(tmp_path):
    """A TrainingClient's pod without spec.tinker: a key planted in the key file on its data volume (an insider
    who can write the volume) opens nothing; /api/v1 answers 401 to every key."""
    from fastapi.testclient import TestClient

    from tensafe_trainer.api.app import create_app
    from tensafe_trainer.service.trainer import Settings
    from tensafe_trainer.service.tinker.keys import create_key
    from tg_tinker.types import CreateTrainingClient

    from conftest import tiny_config

    planted = create_key(tmp_path, "acme")
    initial = CreateTrainingClient(config=tiny_config(), client_id="pod-client", tenant_id="acme")
    with TestClient(create_app(Settings(home=tmp_path, token="admin-token", initial_client=initial))) as client:
        answer = client.post("/api/v1/create_session", json={}, headers={"X-API-Key": planted})
        assert answer.status_code == 401 and "unknown Tinker API key" in answer.text


def test_open_sessions_are_capped_per_key_and_per_tenant(tmp_path):
    """One key cannot take all its tenant's sessions (the door review: it held them for 5 minutes); the tenant as a
    whole is capped too, and another tenant is not affected."""
    from fastapi.testclient import TestClient

    from tensafe_trainer.api.app import create_app
    from tensafe_trainer.service.trainer import Settings
    from tensafe_trainer.service.tinker.keys import create_key
    from tensafe_trainer.service.tinker.registry import MAX_OPEN_SESSIONS
    from tensafe_trainer.service.tinker.service import MAX_SESSIONS_PER_KEY

    per_tenant = MAX_OPEN_SESSIONS // MAX_SESSIONS_PER_KEY + 1
    plain = [{"X-API-Key": create_key(tmp_path, "plain", f"k{i}")} for i in range(per_tenant)]
    other = {"X-API-Key": create_key(tmp_path, "other")}
    with TestClient(create_app(Settings(home=tmp_path, token="admin-token"))) as client:
        def open_session(headers):
            return client.post("/api/v1/create_session", json={}, headers=headers)

        opened = [open_session(plain[0]).json()["session_id"] for _ in range(MAX_SESSIONS_PER_KEY)]
        refused = open_session(plain[0])
        assert refused.status_code == 429 and f"this key already has {MAX_SESSIONS_PER_KEY}" in refused.text
        for headers in plain[1:-1]:
            assert all(open_session(headers).status_code == 200 for _ in range(MAX_SESSIONS_PER_KEY))
        refused = open_session(plain[-1])
        assert refused.status_code == 429 and f"already has {MAX_OPEN_SESSIONS} open Tinker sessions" in refused.text
        assert open_session(other).status_code == 200
        assert client.post(f"/api/v1/sessions/{opened[0]}/finish", json={}, headers=plain[0]).status_code == 200
        assert open_session(plain[-1]).status_code == 200


def test_one_key_holds_at_most_its_share_of_the_engines(tmp_path):
    """The attacker review: one key's models filled every engine slot of the trainer, and another tenant got 429.
    A key's sessions hold at most max_clients less a quarter; another tenant still starts its own."""
    from fastapi.testclient import TestClient

    from tensafe_trainer.api.app import create_app
    from tensafe_trainer.service.trainer import Settings
    from tensafe_trainer.service.tinker.keys import create_key
    from tensafe_trainer.service.tinker.service import engines_per_key

    max_clients = 8
    per_key = engines_per_key(max_clients)
    assert per_key == 6
    greedy, other = {"X-API-Key": create_key(tmp_path, "plain")}, {"X-API-Key": create_key(tmp_path, "other")}
    model = "tiny-random-llama:hidden=64,layers=1,heads=4,vocab=128,intermediate=64"
    with TestClient(create_app(Settings(home=tmp_path, token="admin-token", max_clients=max_clients,
                                        min_free_memory=0))) as client:
        def create(headers, seq):
            session = client.post("/api/v1/create_session", json={}, headers=headers).json()["session_id"]
            return client.post("/api/v1/create_model", headers=headers, json={
                "session_id": session, "model_seq_id": seq, "base_model": model, "lora_config": {"rank": 2}})

        assert all(create(greedy, i).status_code == 200 for i in range(per_key))
        refused = create(greedy, per_key)
        assert refused.status_code == 429 and f"the most one key may ({per_key})" in refused.text
        assert create(other, 0).status_code == 200 and create(other, 1).status_code == 200  # the rest: another's


def test_a_prompt_whose_chunks_are_not_a_list_is_refused_like_a_bad_chunk(tmp_path):
    """Both shapes of a wrong prompt answer 422 (the attacker review saw 400 for one, 422 for the other)."""
    with InProcessTinker(tmp_path) as trainer:
        session_id = trainer.call("create_session", {}).json()["session_id"]
        sampler = trainer.call("create_sampling_session", {
            "session_id": session_id, "sampling_session_seq_id": 0,
            "base_model": "tiny-random-llama:hidden=64,layers=1,heads=4,vocab=128,intermediate=64"})
        sampler_id = sampler.json()["sampling_session_id"]
        for chunks in (5, [{"tokens": "ab"}], [{"tokens": {"a": 1}}]):
            answer = trainer.call("asample", {"sampling_session_id": sampler_id, "prompt": {"chunks": chunks},
                                              "sampling_params": {}})
            assert answer.status_code == 422 and "prompt" in answer.text, chunks
