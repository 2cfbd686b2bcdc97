"""Pure functions from a ``TrainingClient`` object to the objects it owns. No I/O, no cluster.

Children get deterministic names and a controller ownerReference, so creating them is idempotent
and deleting the training client garbage-collects them.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

from tg_tinker.config import TrainingConfig
from tg_tinker.resources import (
    GROUP,
    PRIVACY_BUDGETS,
    TENANT_LABEL,
    TRAINER_PORT,
    VERSION,
    child_name,
    key_secret_name,
    privacy_budget_name,
    tinker_enabled,
    tinker_key_key,
    tls_secret_name,
    token_key,
    trainer_url,
)
from tg_tinker.types import CreateTrainingClient

DATA_DIR = "/var/lib/tensafe"
SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
KEYS_DIR = "/var/run/tensafe/keys"
DATA_KEYS_DIR = "/var/run/tensafe/data-keys"
NAMES_KEY = "names.key"  # the key store's names secret (tensafe_keys.store.KeyProvider.names_key), in the key Secret
TLS_DIR = "/var/run/tensafe/tls"
TINKER_KEY_DIR = "/var/run/tensafe/tinker"
TOKEN_DIR = "/var/run/tensafe/token"


@dataclass(frozen=True)
class TrainerDefaults:
    """Settings of the installation for every trainer pod (Helm values ``trainer.*``); a TrainingClient's
    own ``spec.resources`` and ``spec.image`` win over them."""

    resources: Mapping[str, Any] = field(default_factory=dict)  # cpu, memory, gpus
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple = ()
    priority_class_name: str = ""

    @classmethod
    def parse(cls, text: str) -> "TrainerDefaults":
        """From ``$TENSAFE_TRAINER_DEFAULTS``: ``{"resources": ..., "nodeSelector": ..., "tolerations": ...,
        "priorityClassName": ...}``."""
        raw = json.loads(text or "{}")
        return cls(resources=raw.get("resources") or {}, node_selector=raw.get("nodeSelector") or {},
                   tolerations=tuple(raw.get("tolerations") or ()),
                   priority_class_name=raw.get("priorityClassName") or "")


def labels(tc_name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "tensafe-trainer", "app.kubernetes.io/managed-by": "tensafe-operator",
            "tensafe.io/training-client": tc_name}


def owner_reference(owner: dict[str, Any]) -> dict[str, Any]:
    meta = owner["metadata"]
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def _child_metadata(tc: dict[str, Any], name: str) -> dict[str, Any]:
    return {"name": name, "namespace": tc["metadata"]["namespace"], "labels": labels(tc["metadata"]["name"]),
            "ownerReferences": [owner_reference(tc)]}


def client_config(tc: dict[str, Any]) -> CreateTrainingClient:
    """What the trainer pod starts with; raises ``tg_tinker.ValidationError`` for a spec it cannot run.

    Every pod resumes from the client's latest checkpoint (a first pod finds none and starts fresh), so a
    replaced pod carries on where the last checkpoint left off."""
    spec = tc["spec"]
    return CreateTrainingClient(config=TrainingConfig.parse(spec["training"]), client_id=tc["metadata"]["name"],
                                tenant_id=tenant_of(tc), resume_from="latest")


def tenant_of(tc: dict[str, Any]) -> str:
    return tc["spec"].get("tenantId") or "default"


def artifact_claim_name(tc: dict[str, Any]) -> str:
    return (tc["spec"].get("artifactStore") or {}).get("claimName") or child_name(tc["metadata"]["name"], "artifacts")


def data_keys_claim_name(tc: dict[str, Any]) -> str:
    """The volume of the artifacts' data keys (each wrapped under the tenant's KEK): the artifact volume's twin,
    ``<artifact volume>-keys``, kept apart from it so that a copy of the artifact volume opens nothing and
    deleting an artifact (its data key) kills every copy of it."""
    return f"{artifact_claim_name(tc)}-keys"


def dp_config_of(tc: dict[str, Any]):
    """The client's DPConfig when DP is on, else None."""
    config = TrainingConfig.parse(tc["spec"]["training"])
    return config.dp_config if config.dp_enabled else None


def budget_name(tc: dict[str, Any]) -> str:
    return privacy_budget_name(tenant_of(tc), dp_config_of(tc).dataset_id)


def build_privacy_budget(tc: dict[str, Any]) -> dict[str, Any]:
    """The ledger of the data a DP client trains on. No ownerReference: it outlives every client on the data.
    A first client with a ``target_epsilon`` sets the data's budget (later clients cannot change it)."""
    dp = dp_config_of(tc)
    spec: dict[str, Any] = {"tenantId": tenant_of(tc), "delta": dp.target_delta}
    if dp.dataset_id:
        spec["datasetId"] = dp.dataset_id
    if dp.target_epsilon is not None:
        spec["epsilonBudget"] = dp.target_epsilon
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "PrivacyBudget",
            "metadata": {"name": budget_name(tc), "namespace": tc["metadata"]["namespace"],
                         "labels": {"app.kubernetes.io/managed-by": "tensafe-operator"}},
            "spec": spec}


def build_service_account(tc: dict[str, Any]) -> dict[str, Any]:
    """A DP trainer's identity: it may read its PrivacyBudget and patch that one's status, nothing else."""
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _child_metadata(tc, child_name(
        tc["metadata"]["name"], "trainer")), "automountServiceAccountToken": False}


def build_ledger_role(tc: dict[str, Any]) -> dict[str, Any]:
    name = budget_name(tc)
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": _child_metadata(tc, child_name(tc["metadata"]["name"], "ledger")),
            "rules": [{"apiGroups": [GROUP], "resources": [PRIVACY_BUDGETS], "resourceNames": [name],
                       "verbs": ["get"]},
                      {"apiGroups": [GROUP], "resources": [f"{PRIVACY_BUDGETS}/status"], "resourceNames": [name],
                       "verbs": ["get", "patch"]}]}


def build_ledger_role_binding(tc: dict[str, Any]) -> dict[str, Any]:
    name = tc["metadata"]["name"]
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": _child_metadata(tc, child_name(name, "ledger")),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": child_name(name, "ledger")},
            "subjects": [{"kind": "ServiceAccount", "name": child_name(name, "trainer"),
                          "namespace": tc["metadata"]["namespace"]}]}


def _tenant_metadata(tc: dict[str, Any], name: str, default_name: str) -> dict[str, Any]:
    """A Secret's or volume's metadata: bound to the client's tenant by label; owned by the client (and deleted
    with it) only under the client's own default name. One the spec names is the tenant's and outlives it."""
    meta = {"name": name, "namespace": tc["metadata"]["namespace"],
            "labels": {"app.kubernetes.io/managed-by": "tensafe-operator", TENANT_LABEL: tenant_of(tc)}}
    if name == default_name:
        meta["labels"]["tensafe.io/training-client"] = tc["metadata"]["name"]
        meta["ownerReferences"] = [owner_reference(tc)]
    return meta


def build_claim(tc: dict[str, Any]) -> dict[str, Any]:
    """The artifact volume, created when missing (``spec.artifactStore.claimName`` or ``<client>-artifacts``)."""
    size = (tc["spec"].get("artifactStore") or {}).get("size") or "10Gi"
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": _tenant_metadata(tc, artifact_claim_name(tc), child_name(tc["metadata"]["name"], "artifacts")),
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}}


def build_data_keys_claim(tc: dict[str, Any]) -> dict[str, Any]:
    """The data-key volume (``data_keys_claim_name``), created when missing: small (a few hundred bytes an
    artifact); back it up apart from the artifact volume, or not at all."""
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": _tenant_metadata(tc, data_keys_claim_name(tc),
                                         f"{child_name(tc['metadata']['name'], 'artifacts')}-keys"),
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "64Mi"}}}}


def build_key_secret(tc: dict[str, Any]) -> dict[str, Any]:
    """The key Secret, created empty when missing (the operator then fills in the key set and token)."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _tenant_metadata(tc, key_secret_name(tc), child_name(tc["metadata"]["name"], "keys"))}


def foreign_to(tc: dict[str, Any], obj: dict[str, Any] | None, default_name: str) -> str | None:
    """Why a Secret or volume that ``tc`` names is not its tenant's (None: it may use it).

    It is the tenant's when its ``tensafe.io/tenant`` label names the client's tenant, or when it is the client's
    own default object, controlled by this very client (an operator before the label made those). One that does
    not exist yet is not refused: the operator creates it for the client's tenant (``_tenant_metadata``)."""
    if obj is None:
        return None
    meta = obj.get("metadata") or {}
    bound = (meta.get("labels") or {}).get(TENANT_LABEL)
    if bound == tenant_of(tc):
        return None
    owned = any(ref.get("uid") == tc["metadata"].get("uid") and ref.get("controller")
                for ref in meta.get("ownerReferences") or [])
    if meta.get("name") == default_name and owned and bound is None:
        return None
    if bound is not None:  # never say whose it is
        return f"belongs to another tenant (its {TENANT_LABEL} label is not {tenant_of(tc)!r})"
    return f"is not bound to tenant {tenant_of(tc)!r} (no {TENANT_LABEL} label)"


def parse_allowed_images(text: str) -> tuple[str, ...]:
    """``$TENSAFE_ALLOWED_IMAGES``: comma-separated image references, each exact or a ``prefix*`` pattern."""
    return tuple(entry.strip() for entry in (text or "").split(",") if entry.strip())


def image_allowed(image: str, allowed: tuple[str, ...], default_image: str) -> bool:
    """The operator's own trainer image, or one on the allow-list (none listed: the default image only)."""
    if image == default_image:
        return True
    return any(image == entry or (entry.endswith("*") and image.startswith(entry[:-1])) for entry in allowed)


def build_pod(tc: dict[str, Any], *, default_image: str,
              defaults: TrainerDefaults = TrainerDefaults()) -> dict[str, Any]:
    from tg_tinker.resources import keyset_key

    spec = tc["spec"]
    name = tc["metadata"]["name"]
    secret = key_secret_name(tc)
    resources = {**defaults.resources, **{k: v for k, v in (spec.get("resources") or {}).items() if v is not None}}
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    if resources.get("gpus"):
        limits["nvidia.com/gpu"] = str(resources["gpus"])  # a Quantity: always a string
    for key in ("cpu", "memory"):
        if resources.get(key):
            limits[key] = requests[key] = resources[key]
    env = [
        {"name": "TENSAFE_HOME", "value": DATA_DIR},
        {"name": "TENSAFE_KEYS_DIR", "value": KEYS_DIR},
        {"name": "TENSAFE_ARTIFACT_KEYS_DIR", "value": DATA_KEYS_DIR},
        {"name": "TENSAFE_CLIENT_CONFIG", "value": client_config(tc).model_dump_json()},
        # Files from the Secret, not env values: a process's starting environment stays readable in /proc.
        {"name": "TENSAFE_AUTH_TOKEN_FILE", "value": f"{TOKEN_DIR}/token"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "HOME", "value": "/tmp"},
    ]
    model_ref = client_config(tc).config.model_ref
    # Tinker base models: the built-in ones and the client's own folder, nothing else on the pod's disks.
    env.append({"name": "TENSAFE_TINKER_MODEL_ROOTS", "value": model_ref if model_ref.startswith("/") else ""})
    if tinker_enabled(tc):  # the Tinker API (/api/v1) for this client's tenant; the trainer keeps its digest only
        env.append({"name": "TENSAFE_TINKER_KEY_FILE", "value": f"{TINKER_KEY_DIR}/key"})
    dp = dp_config_of(tc)
    if dp is not None:  # the privacy ledger lives in the API: see ledger_kubernetes.py
        env += [{"name": "TENSAFE_LEDGER", "value": "kubernetes"},
                {"name": "TENSAFE_LEDGER_NAMESPACE", "value": tc["metadata"]["namespace"]},
                {"name": "TENSAFE_LEDGER_NAME", "value": budget_name(tc)},
                {"name": "TENSAFE_SERVICEACCOUNT_DIR", "value": SERVICEACCOUNT_DIR}]
    tls = tls_secret_name(tc)
    scheme = "HTTPS" if tls else "HTTP"
    args = ["--host", "0.0.0.0", "--port", str(TRAINER_PORT)]
    if tls:
        args += ["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key"]
    probe = {"httpGet": {"path": "/readyz", "port": TRAINER_PORT, "scheme": scheme}, "periodSeconds": 5}
    container = {
        "name": "trainer",
        "image": spec.get("image") or default_image,
        "args": args,
        "ports": [{"name": "http", "containerPort": TRAINER_PORT}],
        "env": env,
        "resources": {k: v for k, v in (("limits", limits), ("requests", requests)) if v},
        "readinessProbe": probe,
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": TRAINER_PORT, "scheme": scheme}, "periodSeconds": 10,
                          "failureThreshold": 6},
        "volumeMounts": [{"name": "artifacts", "mountPath": DATA_DIR}, {"name": "tmp", "mountPath": "/tmp"},
                         {"name": "data-keys", "mountPath": DATA_KEYS_DIR},
                         {"name": "tenant-keys", "mountPath": KEYS_DIR, "readOnly": True},
                         {"name": "trainer-token", "mountPath": TOKEN_DIR, "readOnly": True}],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    volumes = [{"name": "artifacts", "persistentVolumeClaim": {"claimName": artifact_claim_name(tc)}},
               {"name": "data-keys", "persistentVolumeClaim": {"claimName": data_keys_claim_name(tc)}},
               {"name": "tmp", "emptyDir": {}},
               # The tenant's key set (and the key store's names secret) and, in a folder of its own, this
               # client's token: each item named, so a shared tenant Secret's other tokens are not mounted.
               {"name": "tenant-keys", "secret": {"secretName": secret, "defaultMode": 0o400, "items": [
                   {"key": keyset_key(tenant_of(tc)), "path": keyset_key(tenant_of(tc))},
                   {"key": NAMES_KEY, "path": NAMES_KEY}]}},
               {"name": "trainer-token", "secret": {"secretName": secret, "defaultMode": 0o400, "items": [
                   {"key": token_key(tc), "path": "token"}]}}]
    if tinker_enabled(tc):  # a file, not an env var: a process's starting environment stays in /proc
        volumes.append({"name": "tinker-key", "secret": {"secretName": secret, "defaultMode": 0o400, "items": [
            {"key": tinker_key_key(tc), "path": "key"}]}})
        container["volumeMounts"].append({"name": "tinker-key", "mountPath": TINKER_KEY_DIR, "readOnly": True})
    if tls:
        volumes.append({"name": "tls", "secret": {"secretName": tls, "defaultMode": 0o400, "items": [
            {"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}]}})
        container["volumeMounts"].append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": _child_metadata(tc, child_name(name)),
        "spec": {
            "containers": [container],
            **({"nodeSelector": dict(defaults.node_selector)} if defaults.node_selector else {}),
            **({"tolerations": list(defaults.tolerations)} if defaults.tolerations else {}),
            **({"priorityClassName": defaults.priority_class_name} if defaults.priority_class_name else {}),
            # The operator, not the kubelet, replaces a dead trainer: it resumes from the last checkpoint.
            "restartPolicy": "Never",
            # A DP trainer reads and extends its PrivacyBudget (nothing else: build_ledger_role); others never
            # talk to the API server.
            **({"serviceAccountName": child_name(name, "trainer")} if dp is not None else {}),
            "automountServiceAccountToken": dp is not None,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "volumes": volumes,
        },
    }


def build_service(tc: dict[str, Any]) -> dict[str, Any]:
    name = tc["metadata"]["name"]
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _child_metadata(tc, child_name(name)),
        "spec": {"type": "ClusterIP", "selector": labels(name),
                 "ports": [{"name": "http", "port": TRAINER_PORT, "targetPort": "http"}]},
    }


def service_endpoint(tc: dict[str, Any]) -> str:
    """In-cluster address of the trainer."""
    return trainer_url(tc)


def build_event(tc: dict[str, Any], event_type: str, reason: str, message: str, when: str) -> dict[str, Any]:
    """A core/v1 Event about the TrainingClient (``kubectl describe tc`` lists it)."""
    meta = tc["metadata"]
    return {"apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": tc.get("apiVersion", f"{GROUP}/{VERSION}"), "kind": "TrainingClient",
                               "name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid")},
            "type": event_type, "reason": reason, "message": message[:1024], "count": 1,
            "firstTimestamp": when, "lastTimestamp": when,
            "source": {"component": "tensafe-operator"}, "reportingComponent": "tensafe-operator"}
