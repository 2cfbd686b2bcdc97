"""The API emulator's Kubernetes semantics, through the official ``kubernetes`` client: what kopf, the
SDK and kubectl rely on. These run against the test cluster only (a real API server needs no test)."""

from __future__ import annotations

import threading
import time

import pytest
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from kube_helpers import REAL_CLUSTER

pytestmark = pytest.mark.skipif(bool(REAL_CLUSTER), reason="checks the emulator itself")


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from tensafe_devcluster import DevCluster

    with DevCluster(tmp_path_factory.mktemp("apiserver")) as dev:
        api_client = config.new_client_from_config(config_file=str(dev.kubeconfig_path))
        yield client.CoreV1Api(api_client), client.CustomObjectsApi(api_client), dev


def config_map(name, labels=None, owner=None):
    meta = {"name": name, "labels": labels or {}}
    if owner is not None:
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap", "name": owner.metadata.name,
                                    "uid": owner.metadata.uid, "controller": True}]
    return {"metadata": meta, "data": {"k": "v"}}


def test_requests_without_the_token_are_refused(api):
    _, _, dev = api
    import ssl

    import httpx

    response = httpx.get(f"{dev.server_url}/api/v1/namespaces", verify=ssl.create_default_context(cafile=dev.ca_file))
    assert response.status_code == 401 and response.json()["reason"] == "Unauthorized"


def test_create_sets_identity_and_versions_and_conflicts_are_detected(api):
    core, _, _ = api
    made = core.create_namespaced_config_map("default", config_map("ident"))
    assert made.metadata.uid and made.metadata.resource_version and made.metadata.creation_timestamp
    with pytest.raises(ApiException) as exists:
        core.create_namespaced_config_map("default", config_map("ident"))
    assert exists.value.status == 409
    made.data = {"k": "new"}
    updated = core.replace_namespaced_config_map("ident", "default", made)
    assert int(updated.metadata.resource_version) > int(made.metadata.resource_version)
    made.data = {"k": "stale"}  # still carries the old resourceVersion
    with pytest.raises(ApiException) as stale:
        core.replace_namespaced_config_map("ident", "default", made)
    assert stale.value.status == 409 and "has been modified" in stale.value.body
    with pytest.raises(ApiException) as missing:
        core.create_namespaced_config_map("no-such-namespace", config_map("x"))
    assert missing.value.status == 404


def test_watch_resumes_from_a_resource_version_and_honours_timeouts(api):
    core, _, _ = api
    listed = core.list_namespaced_config_map("default")
    start = listed.metadata.resource_version
    for name in ("w1", "w2"):
        core.create_namespaced_config_map("default", config_map(name, {"watch": "yes"}))
    core.delete_namespaced_config_map("w1", "default")
    events = [(e["type"], e["object"].metadata.name) for e in watch.Watch().stream(
        core.list_namespaced_config_map, "default", resource_version=start, label_selector="watch=yes",
        timeout_seconds=1)]
    assert events == [("ADDED", "w1"), ("ADDED", "w2"), ("DELETED", "w1")]  # and the stream ended by itself


def test_a_live_watch_sees_changes_and_an_expired_version_is_410(api):
    core, _, dev = api
    seen = []
    stream = watch.Watch()

    def consume():
        for event in stream.stream(core.list_namespaced_config_map, "default", field_selector="metadata.name=live",
                                   timeout_seconds=5):
            seen.append(event["type"])
            if len(seen) == 2:
                stream.stop()

    thread = threading.Thread(target=consume)
    thread.start()
    time.sleep(0.5)
    core.create_namespaced_config_map("default", config_map("live"))
    core.patch_namespaced_config_map("live", "default", {"data": {"k": "patched"}})
    thread.join(10)
    assert seen == ["ADDED", "MODIFIED"]

    dev.call(dev.store.compact)
    with pytest.raises(ApiException) as gone:
        list(watch.Watch().stream(core.list_namespaced_config_map, "default", resource_version="1",
                                  timeout_seconds=1))
    assert gone.value.status == 410


def test_owner_deletion_collects_dependents_unless_orphaned(api):
    core, _, _ = api
    owner = core.create_namespaced_config_map("default", config_map("owner"))
    core.create_namespaced_config_map("default", config_map("child", owner=owner))
    core.delete_namespaced_config_map("owner", "default")
    with pytest.raises(ApiException):
        core.read_namespaced_config_map("child", "default")

    owner = core.create_namespaced_config_map("default", config_map("owner2"))
    core.create_namespaced_config_map("default", config_map("orphan", owner=owner))
    core.delete_namespaced_config_map("owner2", "default", propagation_policy="Orphan")
    assert core.read_namespaced_config_map("orphan", "default").metadata.owner_references in (None, [])


def test_finalizers_hold_deletion_until_removed(api):
    core, _, _ = api
    body = config_map("held")
    body["metadata"]["finalizers"] = ["example.com/hold"]
    core.create_namespaced_config_map("default", body)
    core.delete_namespaced_config_map("held", "default")
    held = core.read_namespaced_config_map("held", "default")
    assert held.metadata.deletion_timestamp is not None
    core.patch_namespaced_config_map("held", "default", [{"op": "test", "path": "/metadata/resourceVersion",
                                                          "value": held.metadata.resource_version},
                                                         {"op": "remove", "path": "/metadata/finalizers"}])
    with pytest.raises(ApiException) as gone:
        core.read_namespaced_config_map("held", "default")
    assert gone.value.status == 404


def test_custom_resources_get_defaults_status_subresource_and_generation(api):
    _, custom, dev = api
    import yaml

    from kube_helpers import ROOT

    ext = client.ApiextensionsV1Api(custom.api_client)
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        try:
            ext.create_custom_resource_definition(yaml.safe_load(path.read_text()))
        except ApiException as error:
            assert error.status == 409
    body = {"apiVersion": "tensafe.io/v1alpha1", "kind": "TrainingClient", "metadata": {"name": "gen"},
            "spec": {"training": {"model_ref": "m"}, "unknown": 1}}
    made = custom.create_namespaced_custom_object("tensafe.io", "v1alpha1", "default", "trainingclients", body)
    assert "unknown" not in made["spec"]  # pruned
    assert made["spec"]["tenantId"] == "default" and made["spec"]["suspend"] is False  # defaulted
    assert made["metadata"]["generation"] == 1
    body = {"status": {"phase": "READY"}, "spec": {"suspend": True}}
    status = custom.patch_namespaced_custom_object_status("tensafe.io", "v1alpha1", "default", "trainingclients",
                                                          "gen", body)
    assert status["status"]["phase"] == "READY" and status["spec"]["suspend"] is False  # status only
    assert status["metadata"]["generation"] == 1
    spec = custom.patch_namespaced_custom_object("tensafe.io", "v1alpha1", "default", "trainingclients", "gen",
                                                 {"spec": {"suspend": True}, "status": {"phase": "ERROR"}})
    assert spec["metadata"]["generation"] == 2 and spec["status"]["phase"] == "READY"
    with pytest.raises(ApiException) as invalid:
        custom.patch_namespaced_custom_object_status("tensafe.io", "v1alpha1", "default", "trainingclients",
                                                     "gen", {"status": {"phase": "SLEEPING"}})
    assert invalid.value.status == 422 and "status.phase" in invalid.value.body
