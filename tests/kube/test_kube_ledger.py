"""The privacy ledger on Kubernetes: a PrivacyBudget shared by every trainer on the data, reserved in chunks,
never lowered; through the ledger class itself and through the operator, pods and the SDK (issue #13)."""

from __future__ import annotations

import threading

import pytest
from kubernetes.client.exceptions import ApiException
from opacus.accountants import create_accountant

from tg_tinker import DPBudgetExceededError, DPConfig, ServiceClient, ValidationError
from tg_tinker.resources import GROUP, PRIVACY_BUDGETS, VERSION, privacy_budget_name

from conftest import random_batch, tiny_config
from kube_helpers import wait_for


def rdp_epsilon(sigma: float, q: float, steps: int, delta: float = 1e-5) -> float:
    reference = create_accountant(mechanism="rdp")
    reference.history = [(sigma, q, steps)]
    return reference.get_epsilon(delta=delta)


def make_budget(cluster, namespace, dataset_id, **spec):
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "PrivacyBudget",
            "metadata": {"name": privacy_budget_name("default", dataset_id)},
            "spec": {"tenantId": "default", "datasetId": dataset_id, "delta": 1e-5, **spec}}
    return cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PRIVACY_BUDGETS, body)


def budget(cluster, namespace, dataset_id):
    return cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PRIVACY_BUDGETS,
                                                       privacy_budget_name("default", dataset_id))


def ledger(cluster, namespace, dataset_id, chunk=8):
    from tensafe_trainer.privacy.ledger_kubernetes import KubernetesLedger
    from tensafe_trainer.privacy.dp import epsilon_of

    return KubernetesLedger(cluster.custom, namespace, privacy_budget_name("default", dataset_id), "default",
                            dataset_id, lambda history, delta: epsilon_of("rdp", delta, history), "rdp", chunk=chunk)


def accountant(book, target=None, group_size=1):
    from tensafe_trainer.privacy.dp import PrivacyAccountant, plan_sampling

    config = DPConfig(noise_multiplier=1.0, sample_rate=0.01, target_epsilon=target, dataset_id=book.dataset_id,
                      group_size=group_size)
    server_samples = group_size == 1  # q = 0.01 from a draw; groups are for client batches (q = 1)
    return PrivacyAccountant(config, plan_sampling(config, 4, server_samples), book, "tc-test")


def test_steps_are_reserved_in_chunks_and_the_epsilon_is_the_accountants(cluster, namespace):
    make_budget(cluster, namespace, "chunks")
    spender = accountant(ledger(cluster, namespace, "chunks", chunk=8))
    versions = set()
    for step in range(1, 11):
        before, after = spender.spend_step()
        assert after == pytest.approx(rdp_epsilon(1.0, 0.01, step), rel=1e-9)  # this client's own steps
        versions.add(budget(cluster, namespace, "chunks")["metadata"]["resourceVersion"])
    status = budget(cluster, namespace, "chunks")["status"]
    assert len(versions) == 2 and status["steps"] == 16  # two writes for ten steps: 8 reserved, then 8 more
    assert status["history"] == [{"noiseMultiplier": 1.0, "sampleRate": 0.01, "steps": 16}]
    assert status["epsilon"] == pytest.approx(rdp_epsilon(1.0, 0.01, 16))  # reserved steps count as spent
    # Another trainer (or this one restarted) sees every reserved step as spent.
    assert accountant(ledger(cluster, namespace, "chunks")).total_epsilon() == pytest.approx(status["epsilon"])


def test_a_reservation_near_the_budget_takes_only_what_fits_and_then_refuses(cluster, namespace):
    make_budget(cluster, namespace, "tight")
    target = (rdp_epsilon(1.0, 0.01, 5) + rdp_epsilon(1.0, 0.01, 6)) / 2  # room for exactly five steps
    spender = accountant(ledger(cluster, namespace, "tight", chunk=8), target)
    for _ in range(5):
        spender.spend_step()
    with pytest.raises(DPBudgetExceededError, match="target_epsilon"):
        spender.spend_step()
    assert budget(cluster, namespace, "tight")["status"]["steps"] == 5


def test_the_resources_own_budget_binds_every_trainer(cluster, namespace):
    cap = (rdp_epsilon(1.0, 0.01, 3) + rdp_epsilon(1.0, 0.01, 4)) / 2
    make_budget(cluster, namespace, "capped", epsilonBudget=cap)
    spender = accountant(ledger(cluster, namespace, "capped"))  # no target_epsilon of its own
    for _ in range(3):
        spender.spend_step()
    with pytest.raises(DPBudgetExceededError, match="set by the first client"):
        spender.spend_step()


def test_two_trainers_reserving_at_once_never_both_pass_the_budget(cluster, namespace):
    make_budget(cluster, namespace, "race")
    target = (rdp_epsilon(1.0, 0.01, 12) + rdp_epsilon(1.0, 0.01, 13)) / 2  # room for twelve steps
    passed, refused = [], []

    def trainer():
        spender = accountant(ledger(cluster, namespace, "race", chunk=4), target)
        for _ in range(10):
            try:
                spender.spend_step()
                passed.append(1)
            except DPBudgetExceededError:
                refused.append(1)

    threads = [threading.Thread(target=trainer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(passed) <= 12 and len(passed) + len(refused) == 20
    assert budget(cluster, namespace, "race")["status"]["steps"] == 12


def test_the_record_cannot_be_lowered(cluster, namespace):
    make_budget(cluster, namespace, "kept")
    accountant(ledger(cluster, namespace, "kept", chunk=4)).spend_step()
    name = privacy_budget_name("default", "kept")
    for status in ({"steps": 1}, {"history": []}):
        with pytest.raises(ApiException) as refused:
            cluster.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PRIVACY_BUDGETS, name,
                                                                 {"status": status})
        assert refused.value.status == 422 and "cannot be" in refused.value.body
    with pytest.raises(ApiException) as refused:
        cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PRIVACY_BUDGETS, name,
                                                      {"spec": {"epsilonBudget": 100.0}})
    assert refused.value.status == 422 and "immutable" in refused.value.body


def test_an_insider_with_the_trainers_rights_cannot_rewrite_or_wipe_the_record(cluster, namespace):
    """What the first version's rules let through: an entry rewritten with the size and total kept, another
    (sigma, q) swapped in, and the history, the total or the whole status removed by a JSON patch."""
    make_budget(cluster, namespace, "wiped")
    book = ledger(cluster, namespace, "wiped", chunk=4)
    accountant(book).spend_step()
    name = privacy_budget_name("default", "wiped")
    rewrites = [
        {"status": {"history": [{"noiseMultiplier": 1.0, "sampleRate": 0.01, "steps": 1},
                                {"noiseMultiplier": 50.0, "sampleRate": 0.01, "steps": 3}], "steps": 4}},
        {"status": {"history": [{"noiseMultiplier": 9.0, "sampleRate": 0.01, "steps": 4}], "steps": 4}},
        {"status": {"history": [{"noiseMultiplier": 1.0, "sampleRate": 0.01, "steps": -4}], "steps": 4}},
    ]
    for body in rewrites:
        with pytest.raises(ApiException) as refused:
            cluster.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PRIVACY_BUDGETS, name,
                                                                 body)
        assert refused.value.status == 422, body
    for path in ("/status/history", "/status/steps", "/status"):
        cluster.custom.api_client.set_default_header("Content-Type", "application/json-patch+json")
        try:
            with pytest.raises(ApiException) as refused:
                cluster.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PRIVACY_BUDGETS,
                                                                     name, [{"op": "remove", "path": path}])
        finally:
            cluster.custom.api_client.default_headers.pop("Content-Type", None)
        assert refused.value.status == 422, path
    assert budget(cluster, namespace, "wiped")["status"]["steps"] == 4
    assert ledger(cluster, namespace, "wiped").history() == ((1.0, 0.01, 4),)


def test_a_reservation_step_reports_its_own_epsilon_spent(cluster, namespace):
    make_budget(cluster, namespace, "spent")
    spender = accountant(ledger(cluster, namespace, "spent", chunk=4))
    for step in range(1, 10):
        before, after = spender.spend_step()
        assert before == pytest.approx(rdp_epsilon(1.0, 0.01, step - 1) if step > 1 else 0.0, rel=1e-9)
        assert after == pytest.approx(rdp_epsilon(1.0, 0.01, step), rel=1e-9)


def test_two_training_clients_on_one_dataset_share_its_ledger_through_the_operator(cluster, namespace):
    config = tiny_config(dp_config=DPConfig(noise_multiplier=1.0, sample_rate=0.01, dataset_id="tickets"))
    with ServiceClient(backend="kubernetes", namespace=namespace, kubeconfig=cluster.kubeconfig) as service:
        first = service.create_training_client(config, client_id="first")
        pod = cluster.core.read_namespaced_pod("first-trainer", namespace)
        assert pod.spec.service_account_name == "first-trainer" and pod.spec.automount_service_account_token
        for seed in range(2):
            first.forward_backward(random_batch(seed=seed))
            mine = first.optim_step().result().dp_metrics.total_epsilon
        assert mine == pytest.approx(rdp_epsilon(1.0, 1.0, 2))  # its own batches: q = 1, sample_rate is a claim
        first.close()  # deleting the client keeps the ledger
        reserved = wait_for("the ledger", lambda: budget(cluster, namespace, "tickets").get("status"))
        assert reserved["steps"] == 16 and reserved["lastWriter"] == "first"
        second = service.create_training_client(config, client_id="second")
        second.forward_backward(random_batch(seed=5))
        theirs = second.optim_step().result().dp_metrics.total_epsilon
        assert theirs == pytest.approx(rdp_epsilon(1.0, 1.0, 17))  # the first's 16 reserved, then its own one
        table = cluster.kubectl("get", "pb", "-n", namespace).stdout
        assert "tickets" in table and "EPSILON" in table and "32" in table  # two chunks reserved


def test_poisson_sampling_on_kubernetes_with_a_dataset_registered_through_the_clients_trainer(cluster, namespace):
    config = tiny_config(batch_size=4, dp_config=DPConfig(noise_multiplier=1.0, sample_rate=0.25,
                                                          dataset_id="kube-facts"))
    batch = random_batch(rows=16, width=6, seed=3)
    with ServiceClient(backend="kubernetes", namespace=namespace, kubeconfig=cluster.kubeconfig) as service:
        tc = service.create_training_client(config, client_id="sampler")
        info = service.register_dataset(batch, dataset_id="kube-facts", training_client_id="sampler")
        assert info.num_examples == 16
        assert [d.dataset_id for d in service.list_datasets()] == ["kube-facts"]  # the one client's trainer
        for _ in range(2):
            tc.forward_backward_sampled()
            metrics = tc.optim_step().result().dp_metrics
        assert metrics.sampling == "poisson" and metrics.total_epsilon == pytest.approx(rdp_epsilon(1.0, 0.25, 2))
        with pytest.raises(ValidationError, match="samples registered dataset"):
            tc.forward_backward(random_batch(rows=2, width=6)).result()
        assert budget(cluster, namespace, "kube-facts")["status"]["steps"] == 16


def test_a_privacy_budget_counts_in_one_unit_and_the_api_keeps_it(cluster, namespace):
    make_budget(cluster, namespace, "units")
    accountant(ledger(cluster, namespace, "units", chunk=2)).spend_step()
    assert budget(cluster, namespace, "units")["status"]["groupSize"] == 1
    with pytest.raises(ValidationError, match="units of 1 row"):  # a group-clipping trainer on row-clipped steps
        accountant(ledger(cluster, namespace, "units", chunk=2), group_size=4).spend_step()
    with pytest.raises(ApiException) as changed:  # and no trainer's write may change the unit
        status = {**budget(cluster, namespace, "units")["status"], "groupSize": 4}
        cluster.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PRIVACY_BUDGETS,
                                                             privacy_budget_name("default", "units"),
                                                             {"status": status})
    assert changed.value.status == 422 and "privacy unit" in changed.value.body


def test_abandoned_draws_on_fresh_trainers_are_each_charged_to_the_privacy_budget(cluster, namespace):
    """A draw is spent when drawn: each fresh trainer (a new client, a replaced pod) that draws and walks away
    without an optim_step leaves its step in the PrivacyBudget."""
    from engine_helpers import sampled_engine

    make_budget(cluster, namespace, "facts")
    for _ in range(3):
        client = sampled_engine(ledger=ledger(cluster, namespace, "facts", chunk=1))
        client.forward_backward_sampled()  # sees the draw's size, loss and grad norm, never steps
    status = budget(cluster, namespace, "facts")["status"]
    assert status["steps"] == 3 and status["history"] == [{"noiseMultiplier": 1.0, "sampleRate": 0.25, "steps": 3}]


def test_a_trainer_without_api_access_refuses_dp_steps_loudly(cluster, namespace, monkeypatch):
    from tensafe_trainer.privacy.ledger_kubernetes import KubernetesLedger

    book = ledger(cluster, namespace, "missing")  # no PrivacyBudget was created
    assert isinstance(book, KubernetesLedger)
    from tg_tinker import TrainingClientError

    with pytest.raises(TrainingClientError, match="cannot read PrivacyBudget"):
        accountant(book).spend_step()
