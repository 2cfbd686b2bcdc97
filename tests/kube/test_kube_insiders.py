"""Insiders on the test cluster (issue #14): what etcd, the artifact volume and the logs hold after a save
with a telling name and metadata, the audit head in the TrainingClient status against a truncated log on
the volume, and a shredded tenant's copy that no longer opens."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import random_batch, tiny_config
from kube_helpers import wait_for
from tg_tinker import ServiceClient, verify_receipt
from tg_tinker.resources import GROUP, TRAINING_CLIENTS, TRAINING_OPERATIONS, VERSION

SECRET_NAME = "hiv-cohort-2024-patients"
SECRET_NOTE = "ward-7-discharges"


def tensafe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tensafe_trainer", *args], capture_output=True, text=True)


def test_a_save_on_kubernetes_leaves_no_name_or_metadata_and_publishes_the_audit_head(cluster, namespace, tmp_path):
    with ServiceClient(backend="kubernetes", namespace=namespace, kubeconfig=cluster.kubeconfig) as service:
        tc = service.create_training_client(tiny_config(), client_id="cohort")
        tc.forward_backward(random_batch())
        tc.optim_step().result()
        saved = tc.save_state(metadata={"note": SECRET_NOTE, "cohort": SECRET_NAME})
        sampler = tc.save_weights_for_sampler(SECRET_NAME)
        assert saved.metadata["cohort"] == SECRET_NAME  # the caller gets its own metadata back
        assert verify_receipt(saved.receipt, service.receipt_public_key())["artifact_id"] == saved.artifact_id
        [top] = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, TRAINING_OPERATIONS)["items"]
        parameters = top["spec"]["parameters"]
        assert "sealed" in parameters and not {"metadata", "name"} & set(parameters)
        status = wait_for("the audit head in the status", lambda: (s := cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, TRAINING_CLIENTS, "cohort")["status"]).get("auditHead", {}).get(
            "sequence", -1) >= saved.audit_head.sequence and s)
        copy = service.pull_artifact(saved.artifact_id)
        secret = cluster.core.read_namespaced_secret("cohort-keys", namespace)
        (tmp_path / "keys.json").write_text(json.dumps({"kind": "Secret", "data": secret.data}))

        volume = cluster.dev.root / "volumes" / namespace / "cohort-artifacts"
        data_keys = cluster.dev.root / "volumes" / namespace / "cohort-artifacts-keys"  # the artifacts' data keys
        seen = {"TrainingOperations": json.dumps(top),
                "TrainingClient": json.dumps(cluster.custom.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, TRAINING_CLIENTS, "cohort")),
                "operator log": (cluster.dev.root / "operator.log").read_text(errors="replace")}
        seen.update({str(p): p.read_bytes().decode("latin-1") for folder in (volume, data_keys)
                     for p in folder.rglob("*") if p.is_file()})
        seen.update({str(p): p.read_text(errors="replace")
                     for p in (cluster.dev.root / "logs").glob(f"{namespace}_*.log")})
        for where, text in seen.items():
            assert SECRET_NAME not in text and SECRET_NOTE not in text, where
        assert any(str(volume / "artifacts") in where for where in seen)  # the volumes were scanned
        assert any(str(data_keys) in where for where in seen) and not any(volume.rglob("*.key"))
        assert sampler in {a.artifact_id for a in service.list_artifacts()}

        # An administrator of the volume truncates the chain; the head the status published catches it, with
        # the tenant's key set exported from its Secret.
        log = volume / "audit" / "default.jsonl"
        head = f"{status['auditHead']['sequence']}:{status['auditHead']['recordHash']}"
        rows = log.read_text().splitlines()
        intact = tensafe("audit", "verify", str(log), "--keys", str(tmp_path / "keys.json"), "--expect-head", head)
        assert intact.returncode == 0, intact.stdout + intact.stderr
        log.write_text("\n".join(rows[:-2]) + "\n")
        cut = tensafe("audit", "verify", str(log), "--keys", str(tmp_path / "keys.json"), "--expect-head", head)
        assert cut.returncode == 1 and "truncated" in cut.stdout
        log.write_text("\n".join(rows) + "\n")

        # Shred the tenant's keys in the Secret: the pulled copy, with the Secret as it is now, is dead.
        from tensafe_keys.kubernetes import KubernetesSecretKeyProvider

        (tmp_path / "copy.bin").write_bytes(copy)
        opened = tensafe("artifact", "decrypt", str(tmp_path / "copy.bin"), "--out", str(tmp_path / "a.pt"),
                         "--keys", str(tmp_path / "keys.json"), "--artifact-keys", str(data_keys))
        assert opened.returncode == 0, opened.stderr
        KubernetesSecretKeyProvider(cluster.core, namespace, "cohort-keys").shred("default")
        assert "default.json" not in (cluster.core.read_namespaced_secret("cohort-keys", namespace).data or {})
        tc.close()
    for top in cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, TRAINING_OPERATIONS)["items"]:
        assert SECRET_NAME not in json.dumps(top)
    fresh = {"active": "x", "keys": {"x": base64.b64encode(os.urandom(32)).decode()}}  # a new key set, not the old
    (tmp_path / "keys-now.json").write_text(json.dumps({"kind": "Secret", "data": {
        "default.json": base64.b64encode(json.dumps(fresh).encode()).decode()}}))
    dead = tensafe("artifact", "decrypt", str(tmp_path / "copy.bin"), "--out", str(tmp_path / "b.pt"),
                   "--keys", str(tmp_path / "keys-now.json"), "--artifact-keys", str(data_keys))
    assert dead.returncode == 1 and "not available" in dead.stderr


def test_a_sealed_parameter_blob_opens_only_for_its_client():
    from tg_tinker import ValidationError
    from tg_tinker.sealing import seal, sealing_key, unseal

    key = sealing_key({"audit": base64.b64encode(bytes(32)).decode()})
    blob = seal(key, "cohort", {"name": SECRET_NAME})
    assert SECRET_NAME not in base64.b64decode(blob).decode("latin-1")
    assert unseal(key, "cohort", blob) == {"name": SECRET_NAME}
    with pytest.raises(ValidationError, match="sealed for another client or tenant"):
        unseal(key, "other", blob)
    other_key = sealing_key({"audit": base64.b64encode(b"\1" * 32).decode()})
    with pytest.raises(ValidationError, match="sealed for another client or tenant"):
        unseal(other_key, "cohort", blob)


def test_a_client_created_again_under_its_name_gets_a_new_token_and_the_old_one_opens_nothing(cluster, namespace):
    """Issue #17 on Kubernetes: two instances of "reborn" in turn, sharing the tenant's own key Secret (which
    outlives them). The first instance's token must not open the second's trainer."""
    import httpx

    from tg_tinker.resources import token_key

    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingClient",
            "metadata": {"name": "reborn", "namespace": namespace},
            "spec": {"training": tiny_config().model_dump(mode="json", exclude_none=True),
                     "keySecretRef": {"name": "team-keys"}}}

    def instance():
        cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, TRAINING_CLIENTS, body)
        with ServiceClient(backend="kubernetes", namespace=namespace, kubeconfig=cluster.kubeconfig,
                           delete_on_close=False) as service:
            tc = service.get_training_client("reborn")
            assert tc.optim_step().result().step == 1
        resource = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, TRAINING_CLIENTS, "reborn")
        return tc.transport, resource["metadata"]["uid"]  # the trainer's address and the instance's token

    first, first_uid = instance()
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, TRAINING_CLIENTS, "reborn")
    wait_for("the first trainer gone", lambda: not [p for p in cluster.core.list_namespaced_pod(namespace).items
                                                    if p.metadata.name == "reborn-trainer"], timeout=120)
    second, second_uid = instance()
    try:
        assert first_uid != second_uid and first.token != second.token
        data = cluster.core.read_namespaced_secret("team-keys", namespace).data
        assert {token_key({"metadata": {"uid": first_uid}}), token_key({"metadata": {"uid": second_uid}})} <= set(data)
        stale = httpx.get(f"{second.base_url}/v1/clients/reborn", headers={"authorization": f"Bearer {first.token}"})
        assert stale.status_code == 401
        fresh = httpx.get(f"{second.base_url}/v1/clients/reborn", headers={"authorization": f"Bearer {second.token}"})
        assert fresh.status_code == 200
    finally:
        cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, TRAINING_CLIENTS, "reborn")


def test_a_training_client_cannot_name_another_tenants_secret_or_volume_nor_run_an_unlisted_image(cluster, namespace):
    """Issue #26, finding 3, as the insider does it: whoever may create TrainingClients (and Secrets of his own), not
    read Secrets, names tenant acme's key Secret and volume from tenant mallory, and an image of his own."""
    from tg_tinker import TrainingClientError

    def apply(name, tenant, **spec):
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingClient", "metadata": {"name": name},
                "spec": {"training": tiny_config().model_dump(mode="json", exclude_none=True), "tenantId": tenant,
                         **spec}}
        cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, TRAINING_CLIENTS, body)

    def status(name):
        return cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, TRAINING_CLIENTS,
                                                           name).get("status") or {}

    # The victim's Secret and volume, made by the operator for acme (suspended: no trainer needed for this).
    apply("acme-bot", "acme", keySecretRef={"name": "acme-keys"}, artifactStore={"claimName": "acme-data"},
          suspend=True)
    wait_for("acme's client", lambda: status("acme-bot").get("phase") == "TERMINATED")
    before = cluster.core.read_namespaced_secret("acme-keys", namespace)
    assert "acme.json" in before.data

    cluster.core.create_namespaced_secret(namespace, {"metadata": {"name": "acme-tls", "labels": {
        "tensafe.io/tenant": "acme"}}, "type": "kubernetes.io/tls", "data": {"tls.crt": "", "tls.key": ""}})
    attacks = {"grab-keys": ("ForeignSecret", {"keySecretRef": {"name": "acme-keys"}}),
               "grab-tls": ("ForeignSecret", {"tls": {"secretName": "acme-tls"}}),
               "grab-volume": ("ForeignVolume", {"artifactStore": {"claimName": "acme-data"}}),
               "acme": ("ForeignSecret", {}),  # its own default Secret would be "acme-keys"
               # the local kubelet runs any image named tensafe-trainer: today's code would start it
               "run-mine": ("ImageNotAllowed", {"image": "evil.example/tensafe-trainer:pwn"})}
    for name, (_, spec) in attacks.items():
        apply(name, "mallory", **spec)
    for name, (reason, _) in attacks.items():
        refused = wait_for(f"{name} refused", lambda: (s := status(name)).get("reason") == reason and s)
        failed = {c["type"]: c for c in refused["conditions"]}["Failed"]
        assert refused["phase"] == "ERROR" and failed["status"] == "True"
        if reason != "ImageNotAllowed":
            assert "another tenant" in refused["message"]  # whose, it does not say
            assert "'acme'" not in refused["message"] and "=acme" not in refused["message"]
    events = wait_for("the Warning events", lambda: (found := {
        (e.involved_object.name, e.reason) for e in cluster.core.list_namespaced_event(namespace).items
        if e.type == "Warning"}) >= {(n, r) for n, (r, _) in attacks.items()} and found)
    assert events
    time.sleep(2)  # two status-mirror rounds: still no pod, still refused
    assert cluster.core.list_namespaced_pod(namespace).items == []
    after = cluster.core.read_namespaced_secret("acme-keys", namespace)
    assert after.metadata.resource_version == before.metadata.resource_version  # no token, no key set, no owner
    assert sorted(after.data) == sorted(before.data) and not after.metadata.owner_references
    assert all(status(name)["reason"] == reason for name, (reason, _) in attacks.items())
    # What the operator made for acme is bound to acme (and the volume, like the Secret, is named: not owned).
    claim = cluster.core.read_namespaced_persistent_volume_claim("acme-data", namespace).metadata
    assert before.metadata.labels["tensafe.io/tenant"] == claim.labels["tensafe.io/tenant"] == "acme"
    assert not claim.owner_references
    with ServiceClient(backend="kubernetes", namespace=namespace, kubeconfig=cluster.kubeconfig) as service:
        with pytest.raises(TrainingClientError, match="ForeignVolume"):
            service.get_training_client("grab-volume")

    # A Secret of his own, unlabelled, is refused too; labelled for his own tenant, the client goes ahead.
    cluster.core.create_namespaced_secret(namespace, {"metadata": {"name": "mine"}, "data": {}})
    apply("own-keys", "mallory", keySecretRef={"name": "mine"}, suspend=True)
    wait_for("own-keys refused", lambda: status("own-keys").get("reason") == "ForeignSecret")
    assert not cluster.core.read_namespaced_secret("mine", namespace).data
    cluster.core.patch_namespaced_secret("mine", namespace, {"metadata": {"labels": {"tensafe.io/tenant": "mallory"}}})
    wait_for("own-keys accepted", lambda: status("own-keys").get("phase") == "TERMINATED")
    assert "mallory.json" in cluster.core.read_namespaced_secret("mine", namespace).data
