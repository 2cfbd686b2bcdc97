"""Insiders on the test cluster (issue #14): what etcd, the artifact volume and the logs hold after a save
with a telling name and metadata, the audit head in the TrainingClient status against a truncated log on
the volume, and a shredded tenant's copy that no longer opens."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

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
        seen = {"TrainingOperations": json.dumps(top),
                "TrainingClient": json.dumps(cluster.custom.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, TRAINING_CLIENTS, "cohort")),
                "operator log": (cluster.dev.root / "operator.log").read_text(errors="replace")}
        seen.update({str(p): p.read_bytes().decode("latin-1") for p in volume.rglob("*") if p.is_file()})
        seen.update({str(p): p.read_text(errors="replace")
                     for p in (cluster.dev.root / "logs").glob(f"{namespace}_*.log")})
        for where, text in seen.items():
            assert SECRET_NAME not in text and SECRET_NOTE not in text, where
        assert any(str(volume / "artifacts") in where for where in seen)  # the volume was scanned
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
        from tg_tinker.keys_kubernetes import KubernetesSecretKeyProvider

        (tmp_path / "copy.bin").write_bytes(copy)
        opened = tensafe("artifact", "decrypt", str(tmp_path / "copy.bin"), "--out", str(tmp_path / "a.pt"),
                         "--keys", str(tmp_path / "keys.json"))
        assert opened.returncode == 0, opened.stderr
        KubernetesSecretKeyProvider(cluster.core, namespace, "cohort-keys").shred("default")
        assert "default.json" not in (cluster.core.read_namespaced_secret("cohort-keys", namespace).data or {})
        tc.close()
    for top in cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, TRAINING_OPERATIONS)["items"]:
        assert SECRET_NAME not in json.dumps(top)
    (tmp_path / "keys-now.json").write_text(json.dumps({"kind": "Secret", "data": {
        "default.json": base64.b64encode(json.dumps({"active": "x", "keys": {}}).encode()).decode()}}))
    dead = tensafe("artifact", "decrypt", str(tmp_path / "copy.bin"), "--out", str(tmp_path / "b.pt"),
                   "--keys", str(tmp_path / "keys-now.json"))
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
            access = service._kube.access(service._kube.get("reborn"))
        return access, service._kube.get("reborn")["metadata"]["uid"]

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
