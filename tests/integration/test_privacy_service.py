"""Privacy through the SDK and the local trainer: registered datasets and Poisson sampling, the ledger across
clients and reloads, and what the audit log and metrics may carry (issue #13)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import httpx
import pytest

from tg_tinker import ArtifactNotFoundError, DatasetInfo, DPConfig, ValidationError

from tg_tinker import ClientStatus, verify_receipt

from conftest import VOCAB, random_batch, tiny_config
from accounting_helpers import pld_epsilon

UNNOISED = ("grad_norm_before_clip", "grad_norm_after_clip", "num_clipped", "num_examples")


def examples(n: int, seed: int) -> list[dict]:
    batch = random_batch(rows=n, width=6, seed=seed)
    return [{"input_ids": ids, "labels": labels} for ids, labels in zip(batch["input_ids"], batch["labels"])]


@pytest.fixture(scope="module")
def registered(service):
    info = service.register_dataset(examples(24, seed=5), dataset_id="support-tickets")
    yield info
    service.delete_dataset(info.dataset_id)


def test_a_registered_dataset_is_stored_encrypted_listed_and_deletable(service, registered, tensafe_home):
    assert isinstance(registered, DatasetInfo) and registered.num_examples == 24
    assert registered.dataset_id in [d.dataset_id for d in service.list_datasets()]
    stored = Path(tensafe_home) / "artifacts" / "default" / f"{registered.artifact_id}.tsa"
    data = stored.read_bytes()
    assert hashlib.sha256(data).hexdigest() == registered.content_hash
    row = json.dumps(examples(24, seed=5)[0]["input_ids"]).encode()
    assert row[1:-1] not in data  # no plaintext token run
    padded = service.register_dataset(random_batch(rows=3, width=5, seed=1))  # a padded batch, generated id
    assert padded.num_examples == 3 and padded.dataset_id.startswith("ds-")
    assert service.delete_dataset(padded.dataset_id).dataset_id == padded.dataset_id
    with pytest.raises(ArtifactNotFoundError):
        service.delete_dataset(padded.dataset_id)
    with pytest.raises(ValidationError, match="already registered"):
        service.register_dataset(examples(2, seed=1), dataset_id="support-tickets")
    with pytest.raises(ValidationError, match="input_ids"):
        service.register_dataset([{"input_ids": [1, -2]}])


def test_poisson_training_through_the_sdk(service, registered):
    config = tiny_config(batch_size=4, dp_config=DPConfig(noise_multiplier=1.0, dataset_id=registered.dataset_id,
                                                          sample_rate=0.25))
    tc = service.create_training_client(config)
    try:
        sizes = []
        for _ in range(3):
            fb = tc.forward_backward_sampled()
            step = tc.optim_step().result()
            sizes.append(fb.result().num_examples)
        metrics = step.dp_metrics
        assert metrics.sampling == "poisson" and metrics.expected_batch_size == 4.0  # batch_size, not q x N
        assert metrics.epsilon_q1 > metrics.total_epsilon > 0  # amplification the server certifies
        # Each copy of the epsilon (the step's, the client's status, a signed receipt) bounds Google's PLD.
        bound = pld_epsilon(((1.0, 0.25, 3),))
        receipt = verify_receipt(tc.save_state().receipt, service.receipt_public_key())
        assert min(metrics.total_epsilon, tc.refresh().total_epsilon, receipt["total_epsilon"]) >= bound
        refused = tc.forward_backward(random_batch(rows=2, width=6))
        with pytest.raises(ValidationError, match="samples registered dataset"):
            refused.result()
        # Another client whose token is not the service's cannot see the dataset.
        client_token = tc.transport
        with pytest.raises(Exception, match="trainer's own token"):
            client_token.request("GET", "/v1/datasets", params={"tenant_id": "default"})
    finally:
        tc.close()


def test_the_ledger_outlives_a_client_a_reload_and_counts_a_second_client(service):
    config = tiny_config(batch_size=2, dp_config=DPConfig(noise_multiplier=1.0, sample_rate=0.01,
                                                          dataset_id="ledger-demo"))
    first = service.create_training_client(config)
    first.forward_backward(random_batch(rows=2, width=6))
    first.optim_step().result()
    checkpoint = first.save_state()
    # Its batches are its own: the receipt's headline is the q = 1 bound, the asserted rate's figure a labelled claim.
    claims = verify_receipt(checkpoint.receipt, service.receipt_public_key())
    assert claims["sampling"] == "asserted" and claims["total_epsilon"] == claims["epsilon_q1"]
    assert claims["total_epsilon"] >= pld_epsilon(((1.0, 1.0, 1),)) > claims["epsilon_asserted"]
    assert claims["asserted_sample_rate"] == 0.01 and "claim" in claims["epsilon_asserted_is"]
    first.forward_backward(random_batch(rows=2, width=6))
    spent = first.optim_step().result().dp_metrics.total_epsilon
    first.load_state(checkpoint.artifact_id)  # back to the earlier weights: the budget stays spent
    assert first.refresh().total_epsilon == pytest.approx(spent)
    first.close()
    second = service.create_training_client(config)  # a new client on the same data
    try:
        assert second.total_epsilon == pytest.approx(spent)
        second.forward_backward(random_batch(rows=2, width=6))
        assert second.optim_step().result().dp_metrics.total_epsilon > spent
    finally:
        second.close()


def test_the_audit_log_and_metrics_carry_no_unnoised_statistic_and_hashes_are_keyed(service, tensafe_home):
    config = tiny_config(batch_size=2, dp_config=DPConfig(noise_multiplier=1.0, dataset_size=100,
                                                          dataset_id="audit-demo"))
    tc = service.create_training_client(config)
    batch = random_batch(rows=2, width=6, seed=77)
    tokens_before = _metric(service, "tensafe_tokens_processed_total")
    try:
        tc.forward_backward(batch).result()
        result = tc.optim_step().result()
    finally:
        tc.close()
    assert result.dp_metrics.num_examples == 2  # the data owner gets its own statistics
    entries = [e for e in service.get_audit_logs(training_client_id=tc.id, limit=100)]
    steps = [e for e in entries if e.operation == "optim_step"]
    assert steps and all(steps[0].dp_metrics.get(field) is None for field in UNNOISED)
    assert steps[0].dp_metrics["total_epsilon"] == pytest.approx(result.dp_metrics.total_epsilon)
    log_text = (Path(tensafe_home) / "audit" / "default.jsonl").read_text()
    for field in UNNOISED[:3]:
        assert field not in log_text
    # An insider with the log guesses the exact training record: the plain SHA-256 of it is nowhere.
    from tg_tinker.types import BatchData, ForwardBackwardRequest

    guess = ForwardBackwardRequest(batch=BatchData(**batch)).model_dump_json().encode()
    assert hashlib.sha256(guess).hexdigest() not in log_text
    fb_hashes = {e.request_hash for e in entries if e.operation == "forward_backward"}
    assert len(fb_hashes) == 1 and all(len(h) == 64 for h in fb_hashes)
    # A DP client's token counts stay out of /metrics.
    assert _metric(service, "tensafe_tokens_processed_total") == tokens_before


def test_a_dp_clients_failures_are_logged_by_type_only_and_kept_out_of_metrics(service, tensafe_home):
    # A seed of its own: a tiny model no other client has loaded, so no host is warm for it.
    config = tiny_config(batch_size=2, max_seq_len=8, seed=4242,
                         dp_config=DPConfig(noise_multiplier=1.0, dataset_id="err-demo"))
    # Submitted while the model still loads, the door cannot check the vocabulary yet: the engine does, and
    # its message quotes the batch.
    tc = service.create_training_client(config, wait=False)
    try:
        failed = tc.forward_backward({"input_ids": [[1, VOCAB + 88]]})
        with pytest.raises(ValidationError, match=f"token id {VOCAB + 88}"):
            failed.result(timeout=120)  # the data owner gets the whole message
    finally:
        tc.close()
    entry = [e for e in service.get_audit_logs(training_client_id=tc.id) if e.operation == "forward_backward"][0]
    assert entry.error == "ValidationError" and not entry.success
    text = httpx.get(f"{service.base_url}/metrics").text
    assert 'tensafe_dp_operations_total{type="forward_backward"}' in text
    assert f"token id {VOCAB + 88}" not in (Path(tensafe_home) / "audit" / "default.jsonl").read_text()


def test_a_datasets_size_is_in_no_plaintext(service, registered, tensafe_home):
    folder = Path(tensafe_home) / "artifacts" / "default"
    index = json.loads((folder / f"{registered.artifact_id}.json").read_text())
    assert "num_examples" not in index and "24" not in json.dumps(index.get("metadata", {}))
    from tensafe_trainer.storage import crypto
    with open(folder / f"{registered.artifact_id}.tsa", "rb") as f:
        header, _ = crypto.read_header(f)
    assert "description" not in header and "num_examples" not in json.dumps(header)  # the description is sealed


def test_a_dp_clients_steps_are_not_timed_by_its_status_or_the_queue_gauge(service):
    config = tiny_config(dp_config=DPConfig(noise_multiplier=1.0, dataset_id="timing"))
    tc = service.create_training_client(config)
    try:
        futures = []
        for seed in range(10):
            futures += [tc.forward_backward(random_batch(rows=8, width=64, seed=seed)), tc.optim_step()]
        statuses, depths = set(), set()
        while not futures[-1].done():
            statuses.add(tc.refresh().status)
            depths.add(_metric(service, "tensafe_queue_depth"))
        assert futures[-1].result().step == 10
        assert statuses == {ClientStatus.READY} and depths == {0.0}  # never BUSY; never in the gauge
    finally:
        tc.close()


def _metric(service, name: str) -> float:
    lines = [line for line in httpx.get(f"{service.base_url}/metrics").text.splitlines() if line.startswith(name + " ")]
    return float(lines[0].split()[1]) if lines else 0.0


def test_request_hashes_are_hmacs_under_the_tenant_audit_key_which_shredding_destroys(tmp_path):
    from tensafe_trainer.storage.audit import request_hash
    from tensafe_keys.store import LocalKeyProvider

    keys = LocalKeyProvider(tmp_path / "keys")
    key = keys.audit_key("acme")
    assert len(key) == 32 and keys.audit_key("acme") == key
    keys.rotate("acme")
    assert keys.audit_key("acme") == key  # a KEK rotation alone keeps it (`tensafe artifact rotate` replaces it too)
    import hmac

    assert request_hash(key, b"row") == hmac.new(key, b"row", hashlib.sha256).hexdigest()
    assert request_hash(key, b"row") != hashlib.sha256(b"row").hexdigest()
    keys.shred("acme")
    assert keys.audit_key("acme") != key
    assert os.stat(tmp_path / "keys" / "acme.json").st_mode & 0o077 == 0
