"""The operator through kopf against the test cluster, driven by the SDK's Kubernetes backend."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tg_tinker import ServiceClient, TrainingClientError, ValidationError
from tg_tinker.resources import GROUP, VERSION

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
                                            "claims": ["alpha-artifacts"]}
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

    tc.close()  # deletes the custom resource; the garbage collector takes its children
    wait_for("children to go", lambda: children(cluster, namespace) == {"pods": [], "services": [], "claims": []})
    assert cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, TOPS)["items"] == []


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
        tc.optim_step()
    saved = tc.save_state()
    assert saved.step == 3
    wait_for("epsilon in status", lambda: training_client(cluster, namespace, "phoenix")["status"]
             .get("privacy", {}).get("totalEpsilon"))
    epsilon = training_client(cluster, namespace, "phoenix")["status"]["privacy"]["totalEpsilon"]
    assert epsilon > 0

    tc.forward_backward(random_batch(seed=9))  # in flight when the trainer dies: lost, and it says so
    old_uid = cluster.core.read_namespaced_pod("phoenix-trainer", namespace).metadata.uid
    os.kill(cluster.dev.pod_pid(namespace, "phoenix-trainer"), signal.SIGKILL)

    def replaced_and_ready():
        pod = cluster.core.read_namespaced_pod("phoenix-trainer", namespace)
        status = training_client(cluster, namespace, "phoenix")["status"]
        return pod.metadata.uid != old_uid and status["phase"] == "READY" and status.get("restarts") == 1 and status

    status = wait_for("a replacement trainer", replaced_and_ready)
    assert status["step"] == 3 and status["lastCheckpoint"] == saved.artifact_id
    assert status["privacy"]["totalEpsilon"] == pytest.approx(epsilon)
    # The SDK carries on against the new pod: training continues from step 3.
    tc.forward_backward(random_batch(seed=10))
    assert tc.optim_step().result().step == 4
    tc.close()


@needs_devcluster
def test_operator_restart_resumes_without_duplicating_children(cluster, namespace, service):
    tc = service.create_training_client(tiny_config(), client_id="steady")
    before = children(cluster, namespace)
    pod_uid = cluster.core.read_namespaced_pod("steady-trainer", namespace).metadata.uid
    cluster.dev.stop_operator()
    cluster.dev.start_operator()
    saved = tc.save_state()  # needs the new operator to record the TrainingOperation
    assert saved.step == 0
    assert children(cluster, namespace) == before
    assert cluster.core.read_namespaced_pod("steady-trainer", namespace).metadata.uid == pod_uid
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
