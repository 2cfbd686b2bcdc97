"""The operator through kopf against the test cluster, driven by the SDK's Kubernetes backend."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import httpx
import pytest

from tg_tinker import ServiceClient, TrainingClientError, ValidationError
from tg_tinker.resources import GROUP, VERSION, token_key

from conftest import dp_config, random_batch, tiny_config
from kube_helpers import needs_devcluster, wait_for

TC, TOPS = "trainingclients", "trainingoperations"


def training_client(cluster, namespace, name):
    return cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, TC, name)


def children(cluster, namespace):
    pods = cluster.core.list_namespaced_pod(namespace).items
    services = cluster.core.list_namespaced_service(namespace).items
    claims = cluster.core.list_namespaced_persistent_volume_claim(namespace).items
    return {"pods": [p.metadata.name for p in pods], "services": [s.metadata.name for s in services],
            "claims": [c.metadata.name for c in claims]}


@pytest.fixture
def service(cluster, namespace):
    with ServiceClient(backend="kubernetes", namespace=namespace, kubeconfig=cluster.kubeconfig) as svc:
        yield svc


def test_create_train_save_load_and_delete(cluster, namespace, service):
    tc = service.create_training_client(tiny_config(), client_id="alpha")
    assert tc.status.value == "READY"
    assert children(cluster, namespace) == {"pods": ["alpha-trainer"], "services": ["alpha-trainer"],
                                            "claims": ["alpha-artifacts", "alpha-artifacts-keys"]}
    pod = cluster.core.read_namespaced_pod("alpha-trainer", namespace)
    assert pod.metadata.owner_references[0].name == "alpha" and pod.metadata.owner_references[0].controller

    for seed in range(2):
        tc.forward_backward(random_batch(seed=seed))
        step = tc.optim_step()
    assert step.result().step == 2

    saved = tc.save_state(metadata={"note": "k8s"})
    operations = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, TOPS)["items"]
    assert len(operations) == 1
    recorded = operations[0]
    assert recorded["spec"]["type"] == "save_state" and recorded["status"]["phase"] == "Succeeded"
    assert recorded["status"]["result"]["artifact_id"] == saved.artifact_id
    assert recorded["metadata"]["ownerReferences"][0]["name"] == "alpha"

    # The status mirror catches up with the trainer: step and last checkpoint, then no more writes.
    status = wait_for("status mirror", lambda: (s := training_client(cluster, namespace, "alpha")["status"])
                      .get("lastCheckpoint") == saved.artifact_id and s)
    assert status["step"] == 2 and status["podName"] == "alpha-trainer"
    assert status["endpoint"] == f"http://alpha-trainer.{namespace}.svc:8000"
    ready = {c["type"]: c for c in status["conditions"]}["Ready"]
    assert ready["status"] == "True" and ready["reason"] == "TrainerReady"
    version = training_client(cluster, namespace, "alpha")["metadata"]["resourceVersion"]
    time.sleep(3)  # three mirror rounds with nothing new
    assert training_client(cluster, namespace, "alpha")["metadata"]["resourceVersion"] == version
    assert tc.refresh().step == 2 and tc.info.last_checkpoint == saved.artifact_id

    tc.forward_backward(random_batch(seed=5))
    tc.optim_step().result()
    assert tc.load_state(saved.artifact_id).step == 2

    service.delete_training_client("alpha")  # the explicit call; the garbage collector takes its children
    wait_for("children to go", lambda: children(cluster, namespace) == {"pods": [], "services": [], "claims": []})
    assert cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, TOPS)["items"] == []


def test_leaving_a_service_client_keeps_its_clients_checkpoints_and_deleting_is_an_explicit_call(cluster, namespace):
    """Issue #26, finding 12: leaving the block suspends the client it created (a checkpoint, then no pod); the
    resource, its volume with every checkpoint and its TrainingOperations stay, and it resumes where it was."""
    with ServiceClient(backend="kubernetes", namespace=namespace, kubeconfig=cluster.kubeconfig) as service:
        tc = service.create_training_client(tiny_config(), client_id="keeper")
        tc.forward_backward(random_batch())
        tc.optim_step().result()
        saved = tc.save_state()
        tc.forward_backward(random_batch(seed=1))
        tc.optim_step()  # after the last save: the suspension's own checkpoint keeps it
    wait_for("the pod to stop", lambda: not children(cluster, namespace)["pods"])
    status = wait_for("the suspended status", lambda: (s := training_client(cluster, namespace, "keeper")[
        "status"]).get("phase") == "TERMINATED" and s)
    assert training_client(cluster, namespace, "keeper")["spec"]["suspend"] is True
    assert status["lastCheckpoint"] != saved.artifact_id  # the one taken on suspension
    assert children(cluster, namespace)["claims"] == ["keeper-artifacts", "keeper-artifacts-keys"]
    [top] = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, TOPS)["items"]
    assert top["status"]["result"]["artifact_id"] == saved.artifact_id

    with ServiceClient(backend="kubernetes", namespace=namespace, kubeconfig=cluster.kubeconfig) as service:
        with pytest.raises(ValidationError, match="get_training_client"):
            service.create_training_client(tiny_config(), client_id="keeper")
        tc = service.get_training_client("keeper")  # resumed from the latest checkpoint
        assert tc.info.step == 2 and tc.info.last_checkpoint == status["lastCheckpoint"]
        assert tc.forward_backward(random_batch(seed=2)).result().loss > 0
        # (Issue #26, finding 3: a running client whose spec turns to an image not allowed is stopped.)
        cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, TC, "keeper",
                                                      {"spec": {"image": "evil.example/tensafe-trainer:1"}})
        wait_for("the refusal", lambda: training_client(cluster, namespace, "keeper")["status"].get(
            "reason") == "ImageNotAllowed" and not children(cluster, namespace)["pods"])
        service.delete_training_client("keeper")
    wait_for("everything to go", lambda: children(cluster, namespace) == {"pods": [], "services": [], "claims": []}
             and not cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, TOPS)["items"])


def test_invalid_spec_is_refused_by_the_api_with_its_reason(cluster, namespace, service):
    with pytest.raises(ValidationError, match="rank"):  # the SDK's own check comes first
        service.create_training_client(tiny_config(lora_config={"rank": 0}), client_id="bad")
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingClient", "metadata": {"name": "bad"},
            "spec": {"training": {"model_ref": "x", "lora_config": {"rank": 0}}}}
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as refused:
        cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, TC, body)
    assert refused.value.status == 422 and "spec.training.lora_config.rank" in refused.value.body


def test_model_defining_fields_are_immutable(cluster, namespace, service):
    tc = service.create_training_client(tiny_config(), client_id="frozen")
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as refused:
        cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, TC, "frozen",
                                                      {"spec": {"training": {"model_ref": "other"}}})
    assert refused.value.status == 422 and "model_ref is immutable" in refused.value.body
    tc.close()


def test_trainer_that_cannot_load_its_model_reports_error_with_the_reason(cluster, namespace, service):
    with pytest.raises(TrainingClientError, match="no-such-model"):
        service.create_training_client(tiny_config(model_ref="no-such-model"), client_id="broken")


@needs_devcluster
def test_killed_trainer_pod_is_replaced_and_resumes_with_step_and_epsilon(cluster, namespace, service):
    config = tiny_config(dp_config=dp_config())
    tc = service.create_training_client(config, client_id="phoenix")
    for seed in range(3):
        tc.forward_backward(random_batch(seed=seed))
        step = tc.optim_step()
    epsilon = step.result().dp_metrics.total_epsilon
    saved = tc.save_state()
    assert saved.step == 3 and epsilon > 0
    wait_for("the mirror to show step 3", lambda: training_client(cluster, namespace, "phoenix")["status"]
             .get("privacy", {}).get("totalEpsilon") == epsilon)

    tc.forward_backward(random_batch(seed=9))  # in flight when the trainer dies: lost, and it says so
    old_uid = cluster.core.read_namespaced_pod("phoenix-trainer", namespace).metadata.uid
    os.kill(cluster.dev.pod_pid(namespace, "phoenix-trainer"), signal.SIGKILL)

    def replaced_and_ready():
        pod = cluster.core.read_namespaced_pod("phoenix-trainer", namespace)
        status = training_client(cluster, namespace, "phoenix")["status"]
        return pod.metadata.uid != old_uid and status["phase"] == "READY" and status.get("restarts") == 1 and status

    status = wait_for("a replacement trainer", replaced_and_ready)
    assert status["step"] == 3 and status["lastCheckpoint"] == saved.artifact_id
    # The ledger is not reset: the dead pod's unused reservation stays counted, so epsilon can only grow.
    ledger = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "privacybudgets")["items"]
    assert len(ledger) == 1 and ledger[0]["status"]["steps"] >= 3
    assert status["privacy"]["totalEpsilon"] == pytest.approx(ledger[0]["status"]["epsilon"])
    assert status["privacy"]["totalEpsilon"] >= epsilon
    # The SDK carries on against the new pod: training continues from step 3.
    tc.forward_backward(random_batch(seed=10))
    assert tc.optim_step().result().step == 4
    tc.close()


@needs_devcluster
def test_operator_killed_mid_reconcile_resumes_without_duplicating_children(cluster, namespace, service):
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingClient", "metadata": {"name": "steady"},
            "spec": {"training": tiny_config().model_dump(mode="json", exclude_none=True)}}
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, TC, body)
    wait_for("the operator to start on it", lambda: cluster.core.list_namespaced_secret(namespace).items, every=0.01)
    cluster.dev.operator.kill()  # SIGKILL while it creates the Secret, claim, Service and pod
    cluster.dev.operator.wait()
    cluster.dev.start_operator()
    tc = service.get_training_client("steady")
    assert children(cluster, namespace) == {"pods": ["steady-trainer"], "services": ["steady-trainer"],
                                            "claims": ["steady-artifacts", "steady-artifacts-keys"]}
    pod_uid = cluster.core.read_namespaced_pod("steady-trainer", namespace).metadata.uid

    cluster.dev.stop_operator()  # and a clean restart with a TrainingOperation created while it was down
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        saving = pool.submit(tc.save_state)
        wait_for("the TrainingOperation", lambda: cluster.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, TOPS)["items"])
        cluster.dev.start_operator()
        assert saving.result(timeout=120).step == 0
    assert cluster.core.read_namespaced_pod("steady-trainer", namespace).metadata.uid == pod_uid
    assert len(cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, TOPS)["items"]) == 1
    tc.close()


@needs_devcluster
def test_api_server_restart_is_survived_by_the_operator_and_the_sdk(cluster, namespace, service):
    tc = service.create_training_client(tiny_config(), client_id="survivor")
    cluster.dev.restart_apiserver(downtime_s=2.0)  # every watch breaks; the objects survive, as in etcd
    tc.forward_backward(random_batch())  # training traffic never touches the API server
    assert tc.optim_step().result().step == 1
    saved = tc.save_state()  # a TrainingOperation: needs the operator watching again
    assert saved.step == 1
    wait_for("the status mirror", lambda: training_client(cluster, namespace, "survivor")["status"].get("step") == 1)
    tc.close()


@needs_devcluster
def test_tokens_and_keys_never_appear_in_logs_status_or_pod_specs(cluster, namespace, service):
    import base64
    import json

    tc = service.create_training_client(tiny_config(), client_id="quiet")
    tc.forward_backward(random_batch())
    tc.optim_step().result()
    tc.save_state()
    secret = cluster.core.read_namespaced_secret("quiet-keys", namespace).data
    token = base64.b64decode(secret[token_key(training_client(cluster, namespace, "quiet"))]).decode()
    keyset = json.loads(base64.b64decode(secret["default.json"]))
    secrets = [token] + list(keyset["keys"].values())
    assert len(token) >= 32 and secrets[1:]

    # Another client's token is refused by this trainer (each training client has its own).
    other = service.create_training_client(tiny_config(), client_id="other")
    other_token = base64.b64decode(cluster.core.read_namespaced_secret("other-keys", namespace).data[
        token_key(training_client(cluster, namespace, "other"))])
    pod_ip = cluster.core.read_namespaced_pod("quiet-trainer", namespace).status.pod_ip
    refused = httpx.get(f"http://{pod_ip}:8000/v1/artifacts",
                        headers={"authorization": f"Bearer {other_token.decode()}"})
    assert refused.status_code == 401

    seen = [json.dumps(training_client(cluster, namespace, "quiet")),
            json.dumps(cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, TOPS)),
            json.dumps(cluster.core.api_client.sanitize_for_serialization(
                cluster.core.read_namespaced_pod("quiet-trainer", namespace)))]
    logs = [cluster.dev.root / "operator.log", *(cluster.dev.root / "logs").glob(f"{namespace}_*.log")]
    seen += [path.read_text(errors="replace") for path in logs]
    for text in seen:
        for value in secrets:
            assert value not in text
    tc.close()
    other.close()


def test_trainer_serves_https_with_the_clients_tls_secret(cluster, namespace, tmp_path):
    """spec.tls names a kubernetes.io/tls Secret (as cert-manager makes one): the trainer serves HTTPS,
    the kubelet probes it, the operator and the SDK verify it by the Service's name."""
    import base64

    from tensafe_devcluster.tls import write_serving_certificate

    ca, cert, key = write_serving_certificate(tmp_path, dns_names=(f"secure-trainer.{namespace}.svc",))
    data = {"ca.crt": ca, "tls.crt": cert, "tls.key": key}
    cluster.core.create_namespaced_secret(namespace, {  # labelled for its tenant, as cert-manager's secretTemplate can
        "metadata": {"name": "secure-tls", "labels": {"tensafe.io/tenant": "default"}}, "type": "kubernetes.io/tls",
        "data": {k: base64.b64encode(p.read_bytes()).decode() for k, p in data.items()}})
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingClient", "metadata": {"name": "secure"},
            "spec": {"training": tiny_config().model_dump(mode="json", exclude_none=True),
                     "tls": {"secretName": "secure-tls"}}}
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, TC, body)
    with ServiceClient(backend="kubernetes", namespace=namespace, kubeconfig=cluster.kubeconfig) as service:
        tc = service.get_training_client("secure")  # made with kubectl/GitOps: attach, do not own
        assert tc.forward_backward(random_batch()).result().loss > 0
        assert tc.save_state().step == 0  # the operator reached the trainer over HTTPS too
    assert training_client(cluster, namespace, "secure")  # left in place on close
    pod_ip = cluster.core.read_namespaced_pod("secure-trainer", namespace).status.pod_ip
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{pod_ip}:8000/healthz")  # no plain HTTP
    status = wait_for("the mirror over HTTPS", lambda: training_client(cluster, namespace, "secure")["status"]
                      .get("step") == 0 and training_client(cluster, namespace, "secure")["status"])
    assert status["endpoint"] == f"https://secure-trainer.{namespace}.svc:8000"


def test_a_finished_operation_past_its_ttl_is_collected(cluster, namespace, service):
    """The operator finds finished operations through its in-memory index of them (no listing) and deletes
    those past ``ttlSecondsAfterFinished``."""
    tc = service.create_training_client(tiny_config(), client_id="tidy")
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingOperation",
            "metadata": {"name": "tidy-save", "namespace": namespace},
            "spec": {"trainingClientRef": {"name": "tidy"}, "type": "save_state", "ttlSecondsAfterFinished": 2,
                     "parameters": {"includeOptimizer": False}}}
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, TOPS, body)
    wait_for("the save to succeed", lambda: (cluster.custom.get_namespaced_custom_object(
        GROUP, VERSION, namespace, TOPS, "tidy-save").get("status") or {}).get("phase") == "Succeeded")
    wait_for("the operation to be collected", lambda: not cluster.custom.list_namespaced_custom_object(
        GROUP, VERSION, namespace, TOPS)["items"], timeout=30)
    tc.close()
