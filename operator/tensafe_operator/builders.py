"""Pure functions from a ``TrainingClient`` object to the objects it owns. No I/O, no cluster.

Children get deterministic names and a controller ownerReference, so creating them is idempotent
and deleting the training client garbage-collects them.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

from tg_tinker.config import TrainingConfig
from tg_tinker.types import CreateTrainingClient

TRAINER_PORT = 8000
DATA_DIR = "/var/lib/tensafe"
TOKEN_KEY = "token"  # key of the bearer token inside spec.keySecretRef's Secret
MAX_NAME = 63


def child_name(tc_name: str, suffix: str = "trainer") -> str:
    """``<tc>-<suffix>``, shortened with a stable hash where a DNS label would overflow."""
    name = f"{tc_name}-{suffix}"
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(tc_name.encode()).hexdigest()[:8]
    return f"{tc_name[:MAX_NAME - len(suffix) - 10]}-{digest}-{suffix}"


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
    """What the trainer pod starts with; raises ``tg_tinker.ValidationError`` for a spec it cannot run."""
    spec = tc["spec"]
    return CreateTrainingClient(config=TrainingConfig.parse(spec["training"]), client_id=tc["metadata"]["name"],
                                tenant_id=spec.get("tenantId", "default"))


def artifact_claim_name(tc: dict[str, Any]) -> str:
    return (tc["spec"].get("artifactStore") or {}).get("claimName") or child_name(tc["metadata"]["name"], "artifacts")


def build_pod(tc: dict[str, Any], *, default_image: str, token_secret: Optional[str] = None) -> dict[str, Any]:
    spec = tc["spec"]
    name = tc["metadata"]["name"]
    secret = token_secret or (spec.get("keySecretRef") or {}).get("name")
    if not secret:
        raise ValueError("spec.keySecretRef.name is required: the trainer's bearer token lives in that Secret")
    resources = spec.get("resources") or {}
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    if resources.get("gpus"):
        limits["nvidia.com/gpu"] = resources["gpus"]
    for key in ("cpu", "memory"):
        if resources.get(key):
            limits[key] = requests[key] = resources[key]
    env = [
        {"name": "TENSAFE_HOME", "value": DATA_DIR},
        {"name": "TENSAFE_CLIENT_CONFIG", "value": client_config(tc).model_dump_json()},
        {"name": "TENSAFE_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": TOKEN_KEY}}},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "HOME", "value": "/tmp"},
    ]
    probe = {"httpGet": {"path": "/readyz", "port": TRAINER_PORT}, "periodSeconds": 5}
    container = {
        "name": "trainer",
        "image": spec.get("image") or default_image,
        "args": ["--host", "0.0.0.0", "--port", str(TRAINER_PORT)],
        "ports": [{"name": "http", "containerPort": TRAINER_PORT}],
        "env": env,
        "resources": {k: v for k, v in (("limits", limits), ("requests", requests)) if v},
        "readinessProbe": probe,
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": TRAINER_PORT}, "periodSeconds": 10,
                          "failureThreshold": 6},
        "volumeMounts": [{"name": "artifacts", "mountPath": DATA_DIR}, {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": _child_metadata(tc, child_name(name)),
        "spec": {
            "containers": [container],
            # The operator, not the kubelet, replaces a dead trainer: it resumes from the last checkpoint.
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,  # the trainer never talks to the API server
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "volumes": [{"name": "artifacts", "persistentVolumeClaim": {"claimName": artifact_claim_name(tc)}},
                        {"name": "tmp", "emptyDir": {}}],
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
    meta = tc["metadata"]
    return f"http://{child_name(meta['name'])}.{meta['namespace']}.svc:{TRAINER_PORT}"
