"""The CRDs and the pure builders of the operator (no cluster needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tg_tinker import TrainingConfig, ValidationError

from conftest import TINY

ROOT = Path(__file__).resolve().parents[3]


def walk(node):
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def test_crd_files_are_the_generated_ones():
    from tensafe_operator.crd import all_crds, render

    for filename, crd in all_crds().items():
        assert (ROOT / "crds" / filename).read_text() == render(crd), f"regenerate crds/{filename}"


@pytest.mark.parametrize("filename", ["trainingclients.tensafe.io.yaml", "trainingoperations.tensafe.io.yaml",
                                      "privacybudgets.tensafe.io.yaml"])
def test_crd_schemas_are_structural(filename):
    crd = yaml.safe_load((ROOT / "crds" / filename).read_text())
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    root = version["schema"]["openAPIV3Schema"]
    assert root["properties"]["metadata"] == {"type": "object"}  # the API server owns metadata's schema
    for node in walk({k: v for k, v in root["properties"].items() if k != "metadata"}):
        if isinstance(node, dict) and node.get("type") == "object":
            assert "properties" in node or node.get("x-kubernetes-preserve-unknown-fields"), node
        if isinstance(node, dict):
            assert not {"$ref", "$defs", "anyOf", "allOf", "oneOf", "prefixItems", "title"} & set(node), node
            if "exclusiveMinimum" in node:
                assert node["exclusiveMinimum"] is True and "minimum" in node


def test_training_schema_mirrors_the_sdk_config_and_guards_model_fields():
    from tensafe_operator.crd import training_client_crd

    crd = training_client_crd()
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["training"]
    assert set(schema["properties"]) == set(TrainingConfig.model_fields)
    assert schema["properties"]["lora_config"]["nullable"] is True  # null = full fine-tuning
    assert schema["properties"]["optimizer"]["properties"]["name"]["enum"] == ["adamw", "adam", "sgd", "adafactor"]
    assert schema["properties"]["dp_config"]["properties"]["accountant_type"]["enum"] == ["rdp", "prv"]
    for field in ("model_ref", "lora_config", "dtype"):
        assert schema["properties"][field]["x-kubernetes-validations"][0]["rule"] == "self == oldSelf"
    columns = [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns == ["Phase", "Reason", "Model", "Step", "Epsilon", "Age"]
    assert crd["spec"]["names"]["shortNames"] == ["tc"]


def training_client(name="demo", **spec):
    body = {"training": {"model_ref": TINY, "batch_size": 4}, "keySecretRef": {"name": "tenant-keys"}}
    body.update(spec)
    return {"apiVersion": "tensafe.io/v1alpha1", "kind": "TrainingClient",
            "metadata": {"name": name, "namespace": "ml", "uid": "1234-uid"}, "spec": body}


def test_pod_carries_config_token_owner_and_volume():
    from tensafe_operator.builders import build_pod

    pod = build_pod(training_client(resources={"gpus": 2, "memory": "16Gi"}), default_image="tensafe/trainer:0.1.0")
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["name"] == "demo-trainer" and meta["namespace"] == "ml"
    assert meta["ownerReferences"] == [{"apiVersion": "tensafe.io/v1alpha1", "kind": "TrainingClient",
                                        "name": "demo", "uid": "1234-uid", "controller": True,
                                        "blockOwnerDeletion": True}]
    container = spec["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    config = json.loads(env["TENSAFE_CLIENT_CONFIG"]["value"])
    assert config["client_id"] == "demo" and config["config"]["model_ref"] == TINY
    assert config["config"]["batch_size"] == 4 and config["config"]["lora_config"]["rank"] == 16  # defaults filled
    # The token is a file from the Secret: never in the pod spec, nor in the process's environment (/proc keeps it).
    assert "TENSAFE_AUTH_TOKEN" not in env
    token_volume = {v["name"]: v for v in spec["volumes"]}["trainer-token"]
    assert token_volume["secret"] == {"secretName": "tenant-keys", "defaultMode": 0o400,
                                      "items": [{"key": "token.1234-uid", "path": "token"}]}
    token_mount = {m["name"]: m for m in container["volumeMounts"]}["trainer-token"]
    assert token_mount["readOnly"] is True
    assert env["TENSAFE_AUTH_TOKEN_FILE"]["value"] == token_mount["mountPath"] + "/token"
    assert config["resume_from"] == "latest"  # every pod, first or replacement, resumes the last checkpoint
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "2", "memory": "16Gi"},
                                      "requests": {"memory": "16Gi"}}
    assert container["image"] == "tensafe/trainer:0.1.0"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["artifacts"]["persistentVolumeClaim"] == {"claimName": "demo-artifacts"}
    # Only the tenant's key set and the names secret are mounted (read-only), never the token, and the trainer is
    # told where; the artifacts' data keys are on a volume of their own, apart from the artifacts.
    assert volumes["tenant-keys"]["secret"] == {"secretName": "tenant-keys", "defaultMode": 0o400, "items": [
        {"key": "default.json", "path": "default.json"}, {"key": "names.key", "path": "names.key"}]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["tenant-keys"]["readOnly"] is True
    assert env["TENSAFE_KEYS_DIR"]["value"] == mounts["tenant-keys"]["mountPath"]
    assert volumes["data-keys"]["persistentVolumeClaim"] == {"claimName": "demo-artifacts-keys"}
    assert env["TENSAFE_ARTIFACT_KEYS_DIR"]["value"] == mounts["data-keys"]["mountPath"] != mounts["artifacts"]["mountPath"]
    assert spec["automountServiceAccountToken"] is False and spec["securityContext"]["runAsNonRoot"] is True


def test_each_client_instance_has_its_own_token_even_in_a_shared_tenant_secret():
    """The same name created again (a new uid), or another client on the same tenant Secret: another token
    key, so the old or the other token opens nothing on this trainer."""
    from tensafe_operator.builders import build_pod
    from tg_tinker.resources import trainer_access

    first, again = training_client(), training_client()
    again["metadata"]["uid"] = "5678-uid"
    neighbour = training_client("neighbour")
    neighbour["metadata"]["uid"] = "9999-uid"

    def token_ref(tc):
        volumes = {v["name"]: v for v in build_pod(tc, default_image="x")["spec"]["volumes"]}
        return volumes["trainer-token"]["secret"]["items"][0]["key"]

    assert len({token_ref(first), token_ref(again), token_ref(neighbour)}) == 3
    secret = {"token.1234-uid": b"old", "token.5678-uid": b"new", "token.9999-uid": b"other"}
    assert trainer_access(again, lambda name: secret, pod_ip="10.0.0.1").token == "new"
    assert trainer_access(first, lambda name: secret, pod_ip="10.0.0.1").token == "old"


def test_the_tinker_api_key_reaches_the_pod_only_when_enabled_and_only_by_reference():
    from tensafe_operator.builders import build_pod

    def parts(tc):
        spec = build_pod(tc, default_image="x")["spec"]
        container = spec["containers"][0]
        return ({e["name"]: e for e in container["env"]}, {v["name"]: v for v in spec["volumes"]},
                {m["name"]: m for m in container["volumeMounts"]})

    env, volumes, _ = parts(training_client())
    assert "TENSAFE_TINKER_KEY_FILE" not in env and "tinker-key" not in volumes
    assert env["TENSAFE_TINKER_MODEL_ROOTS"]["value"] == ""  # set on every pod: no folder but the client's
    env, volumes, mounts = parts(training_client(tinker={"enabled": True}))
    # A file from the Secret, never a value in the pod spec or the process's environment.
    assert volumes["tinker-key"]["secret"] == {"secretName": "tenant-keys", "defaultMode": 0o400,
                                               "items": [{"key": "tinker.1234-uid", "path": "key"}]}
    assert mounts["tinker-key"]["readOnly"] is True
    assert env["TENSAFE_TINKER_KEY_FILE"]["value"] == mounts["tinker-key"]["mountPath"] + "/key"
    assert env["TENSAFE_TINKER_MODEL_ROOTS"]["value"] == ""  # a built-in model: no folder may be named
    env, _, _ = parts(training_client(tinker={"enabled": True}, training={"model_ref": "/models/llama"}))
    assert env["TENSAFE_TINKER_MODEL_ROOTS"]["value"] == "/models/llama"


def test_a_dp_trainer_may_read_its_privacy_budget_and_extend_it_and_nothing_else():
    from tensafe_operator.builders import (build_ledger_role, build_ledger_role_binding, build_pod,
                                           build_privacy_budget, build_service_account)
    from tg_tinker.resources import privacy_budget_name

    dp = {"noise_multiplier": 1.0, "sample_rate": 0.01, "dataset_id": "Support_Tickets", "target_epsilon": 4.0}
    tc = training_client(training={"model_ref": TINY, "batch_size": 4, "dp_config": dp})
    name = privacy_budget_name("default", "Support_Tickets")
    assert name.startswith("default-support-tickets-") and name != privacy_budget_name("default", "support-tickets")
    budget = build_privacy_budget(tc)
    assert budget["metadata"]["name"] == name and "ownerReferences" not in budget["metadata"]  # outlives clients
    assert budget["spec"] == {"tenantId": "default", "datasetId": "Support_Tickets", "delta": 1e-5,
                              "epsilonBudget": 4.0}
    role = build_ledger_role(tc)
    assert role["rules"] == [
        {"apiGroups": ["tensafe.io"], "resources": ["privacybudgets"], "resourceNames": [name], "verbs": ["get"]},
        {"apiGroups": ["tensafe.io"], "resources": ["privacybudgets/status"], "resourceNames": [name],
         "verbs": ["get", "patch"]}]
    binding = build_ledger_role_binding(tc)
    account = build_service_account(tc)
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "ml"}]
    pod = build_pod(tc, default_image="x")
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["TENSAFE_LEDGER"] == "kubernetes" and env["TENSAFE_LEDGER_NAME"] == name
    assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert pod["spec"]["automountServiceAccountToken"] is True
    assert "TENSAFE_LEDGER" not in {e["name"] for e in build_pod(training_client(), default_image="x")["spec"][
        "containers"][0]["env"]}


def test_builders_are_deterministic_and_names_fit_dns_labels():
    from tensafe_operator.builders import build_pod, build_service, child_name, service_endpoint

    tc = training_client(image="registry.example/trainer:dev")
    assert build_pod(tc, default_image="x") == build_pod(tc, default_image="x")
    assert build_pod(tc, default_image="x")["spec"]["containers"][0]["image"] == "registry.example/trainer:dev"
    service = build_service(tc)
    assert service["spec"]["selector"] == build_pod(tc, default_image="x")["metadata"]["labels"]
    assert service_endpoint(tc) == "http://demo-trainer.ml.svc:8000"
    long = "a" * 60
    assert len(child_name(long)) <= 63 and child_name(long) == child_name(long) != child_name("b" * 60)


def test_invalid_training_spec_is_refused_by_the_builder():
    from tensafe_operator.builders import build_pod

    with pytest.raises(ValidationError, match="rank"):
        build_pod(training_client(training={"lora_config": {"rank": 0}}), default_image="x")
    pod = build_pod(training_client(keySecretRef=None), default_image="x")  # the operator's own Secret
    token = {v["name"]: v for v in pod["spec"]["volumes"]}["trainer-token"]
    assert token["secret"]["secretName"] == "demo-keys"


class CrdValidator:
    """The test cluster's own admission (schema, and unknown fields as errors), without a cluster."""

    def __init__(self, filename):
        crd = yaml.safe_load((ROOT / "crds" / filename).read_text())
        self.schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

    def errors(self, document):
        from tensafe_devcluster.validation import prune, schema_errors

        body = {k: v for k, v in document.items() if k != "metadata"}
        _, unknown = prune(body, self.schema)
        return schema_errors(body, self.schema) + [f"unknown field {path}" for path in unknown]

    def is_valid(self, document):
        return not self.errors(document)


validator_for = CrdValidator


@pytest.mark.parametrize("example, crd", [("trainingclient.yaml", "trainingclients.tensafe.io.yaml"),
                                          ("trainingoperation.yaml", "trainingoperations.tensafe.io.yaml")])
def test_examples_validate_against_the_crds(example, crd):
    document = yaml.safe_load((ROOT / "examples" / example).read_text())
    assert validator_for(crd).errors(document) == []


def test_the_crd_schema_refuses_what_the_sdk_refuses():
    from tensafe_operator.builders import client_config

    validator = validator_for("trainingclients.tensafe.io.yaml")
    good = yaml.safe_load((ROOT / "examples" / "trainingclient.yaml").read_text())
    assert client_config({**good, "metadata": {"name": "support-bot"}}).config.dp_config.target_epsilon == 8.0
    for path, value in ((("lora_config", "rank"), 0), (("optimizer", "name"), "lion"),
                        (("dp_config", "accountant_type"), "zcdp"), (("batch_size",), 0),
                        (("optimizer", "betas"), [0.9])):
        bad = yaml.safe_load((ROOT / "examples" / "trainingclient.yaml").read_text())
        target = bad["spec"]["training"]
        for key in path[:-1]:
            target = target.setdefault(key, {})
        target[path[-1]] = value
        assert not validator.is_valid(bad), path


def test_unknown_fields_are_reported_by_path():
    validator = validator_for("trainingclients.tensafe.io.yaml")
    document = yaml.safe_load((ROOT / "examples" / "trainingclient.yaml").read_text())
    document["spec"]["training"]["lora_config"]["rnak"] = 8
    assert validator.errors(document) == ["unknown field spec.training.lora_config.rnak"]


# ----- status: pure functions from what the operator sees to what the status says ---------------------

def pod(phase="Running", ready=True, **status):
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    return {"metadata": {"name": "demo-trainer"}, "status": {"phase": phase, "conditions": conditions, **status}}


def trainer(status="READY", **fields):
    from tg_tinker.types import ClientInfo

    return ClientInfo(client_id="demo", kind="training", status=status, step=fields.pop("step", 7),
                      tenant_id="default", **fields)


def conditions(status):
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_status_follows_the_pod_then_the_trainer():
    from tensafe_operator.status import desired_status

    tc = training_client()
    tc["metadata"]["generation"] = 3
    assert desired_status(tc, None, None)["phase"] == "INITIALIZING"
    unschedulable = pod("Pending", False, conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "Insufficient gpu"}])
    assert conditions(desired_status(tc, unschedulable, None))["Ready"] == ("False", "Unschedulable")
    died = pod("Failed", False, containerStatuses=[{"state": {"terminated": {"exitCode": 137}}}])
    status = desired_status(tc, died, None)
    assert status["phase"] == "INITIALIZING" and "137" in status["conditions"][0]["message"]
    status = desired_status(tc, pod(), trainer(total_epsilon=1.5, last_checkpoint="art-1"))
    assert (status["phase"], status["step"], status["privacy"], status["lastCheckpoint"]) == \
        ("READY", 7, {"totalEpsilon": 1.5}, "art-1")
    assert status["observedGeneration"] == 3 and conditions(status)["Ready"] == ("True", "TrainerReady")
    # An infinite epsilon: JSON numbers cannot carry it, and no column may show it as a number or as nothing.
    assert desired_status(tc, pod(), trainer(total_epsilon=float("inf")))["privacy"] == {"unbounded": True}
    failed = desired_status(tc, pod(), trainer("ERROR", error="model not found"))
    assert conditions(failed)["Failed"] == ("True", "TrainerError") and failed["phase"] == "ERROR"
    suspended = desired_status(training_client(suspend=True), None, None)
    assert suspended["phase"] == "TERMINATED" and conditions(suspended)["Suspended"] == ("True", "Suspended")


def test_status_is_written_only_when_something_changed():
    from tensafe_operator.status import desired_status, status_patch

    tc = training_client()
    first = desired_status(tc, pod(), trainer())
    tc["status"] = first
    again = desired_status(tc, pod(), trainer())
    assert status_patch(first, again) is None  # same facts: no write, transition times kept
    moved = desired_status(tc, pod(), trainer(step=8))
    assert status_patch(first, moved) == {"step": 8}


def test_a_trainer_that_keeps_dying_at_start_is_not_replaced_forever():
    from tensafe_operator.status import MAX_QUICK_FAILURES, crash_looping, desired_status, failure_streak

    def died(after_s):
        started = "2026-01-01T00:00:00Z"
        finished = f"2026-01-01T00:{after_s // 60:02d}:{after_s % 60:02d}Z"
        return pod("Failed", False, containerStatuses=[{"state": {"terminated": {
            "exitCode": 1, "startedAt": started, "finishedAt": finished}}}])

    status: dict = {}
    for _ in range(MAX_QUICK_FAILURES):
        assert not crash_looping(status)
        status["failureStreak"] = failure_streak(status, died(5))
    assert crash_looping(status)
    tc = training_client()
    tc["status"] = status
    looping = desired_status(tc, died(5), None)
    assert looping["phase"] == "ERROR" and conditions(looping)["Failed"] == ("True", "CrashLoop")
    assert failure_streak(status, died(600)) == 1  # a pod that ran ten minutes starts the count anew
    assert desired_status(tc, pod(), trainer())["failureStreak"] == 0  # ready again: forgiven


def test_installation_defaults_apply_where_the_spec_is_silent():
    from tensafe_operator.builders import TrainerDefaults, build_pod

    defaults = TrainerDefaults.parse('{"resources": {"gpus": 1, "memory": "32Gi"}, "nodeSelector": {"gpu": "yes"}, '
                                     '"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}')
    spec = build_pod(training_client(), default_image="x", defaults=defaults)["spec"]
    assert spec["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1", "memory": "32Gi"}
    assert spec["nodeSelector"] == {"gpu": "yes"} and spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    cpu_only = build_pod(training_client(resources={"gpus": 0}), default_image="x", defaults=defaults)["spec"]
    assert "nvidia.com/gpu" not in cpu_only["containers"][0]["resources"]["limits"]  # the spec wins
    assert "nodeSelector" not in build_pod(training_client(), default_image="x")["spec"]


def test_training_operations_of_a_client_go_in_creation_order():
    from tensafe_operator.operations import waiting_behind

    def top(name, created, client="demo", **status):
        return {"metadata": {"name": name, "creationTimestamp": created},
                "spec": {"trainingClientRef": {"name": client}}, "status": status}

    first, second = top("a-save", "2026-01-01T00:00:01Z"), top("b-load", "2026-01-01T00:00:02Z")
    others = [first, second, top("other-client", "2026-01-01T00:00:00Z", client="x")]
    assert waiting_behind(second, others) == "a-save"
    assert waiting_behind(first, others) is None
    assert waiting_behind(second, [top("a-save", "2026-01-01T00:00:01Z", operationId="op-1"), second]) is None
    assert waiting_behind(second, [top("a-save", "2026-01-01T00:00:01Z", phase="Failed"), second]) is None
    same_second = top("c-export", "2026-01-01T00:00:02Z")
    assert waiting_behind(same_second, [second, same_second]) == "b-load"  # ties go by name


def test_trainer_connections_are_reused_per_access_and_the_least_recent_closed():
    from tensafe_operator.connections import TrainerConnections
    from tg_tinker.resources import TrainerAccess

    pool = TrainerConnections(max_open=2)
    first = pool.get(TrainerAccess("http://10.0.0.1:8000", "token-a"))
    assert pool.get(TrainerAccess("http://10.0.0.1:8000", "token-a")) is first  # the mirror's next round
    rotated = pool.get(TrainerAccess("http://10.0.0.1:8000", "token-b"))  # a rotated token: a new connection
    assert rotated is not first and len(pool) == 2
    pool.get(TrainerAccess("http://10.0.0.1:8000", "token-a"))  # first is now the most recent
    moved = pool.get(TrainerAccess("http://10.0.0.2:8000", "token-a"))  # a replaced pod's new IP
    assert len(pool) == 2 and rotated.closed and not first.closed
    pool.close()
    assert first.closed and moved.closed and len(pool) == 0


def test_a_client_may_name_only_its_tenants_secrets_and_volumes_and_only_allowed_images():
    """Issue #26, finding 3, the rule as pure functions (the attack itself: tests/kube/test_kube_insiders.py)."""
    from tensafe_operator.builders import build_claim, build_key_secret, foreign_to, image_allowed
    from tensafe_operator.status import desired_status, event_for

    tc = training_client(tenantId="mallory")  # names the Secret "tenant-keys"; its default would be demo-keys

    def obj(name, labels=None, owner_uid=None):
        owners = [{"uid": owner_uid, "controller": True}] if owner_uid else []
        return {"metadata": {"name": name, "labels": labels or {}, "ownerReferences": owners}}

    assert foreign_to(tc, None, "demo-keys") is None  # missing: the operator creates it, for mallory
    assert foreign_to(tc, obj("tenant-keys", {"tensafe.io/tenant": "mallory"}), "demo-keys") is None
    victims = foreign_to(tc, obj("tenant-keys", {"tensafe.io/tenant": "acme"}), "demo-keys")
    assert "another tenant" in victims and "acme" not in victims  # says no more than that
    assert "no tensafe.io/tenant label" in foreign_to(tc, obj("tenant-keys"), "demo-keys")
    # Its own default object from an operator before the label: taken; the same name controlled by another: not.
    assert foreign_to(tc, obj("demo-keys", owner_uid="1234-uid"), "demo-keys") is None
    assert foreign_to(tc, obj("demo-keys", owner_uid="other-uid"), "demo-keys")
    assert foreign_to(tc, obj("tenant-keys", owner_uid="1234-uid"), "demo-keys")  # a named one needs the label

    named, own = build_key_secret(tc), build_key_secret(training_client(keySecretRef=None))
    assert named["metadata"]["labels"]["tensafe.io/tenant"] == "mallory" and "ownerReferences" not in named["metadata"]
    assert own["metadata"]["name"] == "demo-keys" and own["metadata"]["ownerReferences"][0]["uid"] == "1234-uid"
    claim = build_claim(training_client(artifactStore={"claimName": "shared-data"}))["metadata"]
    assert claim["labels"]["tensafe.io/tenant"] == "default" and "ownerReferences" not in claim
    assert build_claim(tc)["metadata"]["ownerReferences"][0]["uid"] == "1234-uid"

    default = "ghcr.io/tensafe/tensafe-trainer:0.1.0"
    assert image_allowed(default, (), default) and not image_allowed("evil.example/tensafe-trainer:1", (), default)
    allowed = ("registry.example/tensafe/tensafe-trainer:*", "registry.example/other@sha256:abc")
    assert image_allowed("registry.example/tensafe/tensafe-trainer:2.0", allowed, default)
    assert image_allowed("registry.example/other@sha256:abc", allowed, default)
    assert not image_allowed("registry.example/tensafe/tensafe-trainer-evil:2.0", allowed, default)
    assert not image_allowed("registry.example/other@sha256:abd", allowed, default)

    # A refusal of this generation holds the status at ERROR, whatever the mirror sees, with a Warning event.
    tc["metadata"]["generation"] = 2
    tc["status"] = {"refusal": {"reason": "ForeignSecret", "message": "Secret 'tenant-keys' ...", "generation": 2}}
    status = desired_status(tc, None, None)
    assert status["phase"] == "ERROR" and conditions(status)["Failed"] == ("True", "ForeignSecret")
    assert event_for({}, status)[:2] == ("Warning", "ForeignSecret")
    tc["metadata"]["generation"] = 3  # a new spec: checked anew
    assert desired_status(tc, None, None)["phase"] == "INITIALIZING"
