"""The custom resources as data: names, and how a ``TrainingOperation`` maps to a trainer operation.

Shared by the SDK's Kubernetes backend (which creates TrainingOperations and submits them itself, to
keep their place in the client's order) and the operator (which submits the ones GitOps or ``kubectl``
created): both derive the same request from the same spec, and the operation's uid is the idempotency
key, so an operation submitted by both runs once.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from .errors import ValidationError
from .operations import OPERATIONS
from .sealing import seal
from .types import LoadStateRequest, SaveStateRequest, check_tenant

GROUP, VERSION = "tensafe.io", "v1alpha1"
TRAINING_CLIENTS, TRAINING_OPERATIONS = "trainingclients", "trainingoperations"
PRIVACY_BUDGETS = "privacybudgets"
# A TrainingOperation's type: a durable operation, or ``export`` (a sampler save: weights to pull and decrypt)
OPERATION_TYPES = (*(name for name, kind in OPERATIONS.items() if kind.durable), "export")
TERMINAL_PHASES = ("Succeeded", "Failed")

TRAINER_PORT = 8000
TOKEN_KEY = "token"  # the bearer token's key in the key Secret (beside the tenant's "<tenant>.json")
TINKER_KEY = "tinker"  # the Tinker API key's (spec.tinker.enabled), beside the token
# The label that binds a Secret or PersistentVolumeClaim to a tenant: a TrainingClient may use a Secret or volume
# only of its own tenant (the operator sets it on those it creates; docs/privacy.md, "What a TrainingClient may name").
TENANT_LABEL = "tensafe.io/tenant"


def keyset_key(tenant_id: str) -> str:
    """The key Secret's data key that holds a tenant's key set (also the file name in the mounted volume)."""
    return f"{check_tenant(tenant_id)}.json"


def token_key(tc: dict[str, Any]) -> str:
    """The key of this TrainingClient's own bearer token in its key Secret: ``token.<uid>``. Bound to the
    object's uid, so a client deleted and created again under the same name (perhaps by another team,
    with the same tenant Secret) gets a new token, and the old one opens nothing; and clients sharing one
    tenant Secret never share a token."""
    uid = (tc.get("metadata") or {}).get("uid")
    return f"{TOKEN_KEY}.{uid}" if uid else TOKEN_KEY
MAX_NAME = 63

DurableRequest = Union[SaveStateRequest, LoadStateRequest]


def child_name(client_name: str, suffix: str = "trainer") -> str:
    """``<client>-<suffix>``, shortened with a stable hash where a DNS label would overflow: the names of
    a TrainingClient's pod, Service, claim and key Secret."""
    name = f"{client_name}-{suffix}"
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(client_name.encode()).hexdigest()[:8]
    return f"{client_name[:MAX_NAME - len(suffix) - 10]}-{digest}-{suffix}"


def privacy_budget_name(tenant_id: str, dataset_id: Optional[str]) -> str:
    """The ``PrivacyBudget`` holding the privacy ledger of (tenant, dataset) in a namespace: readable, and
    distinct for distinct pairs (dataset ids may hold capitals and underscores, which names may not)."""
    readable = re.sub(r"[^a-z0-9]+", "-", f"{tenant_id}-{dataset_id or 'tenant'}".lower()).strip("-")[:40]
    digest = hashlib.sha256(f"{tenant_id}/{dataset_id or ''}".encode()).hexdigest()[:10]
    return f"{readable or 'budget'}-{digest}"


def service_host(tc: dict[str, Any]) -> str:
    """The trainer Service's in-cluster DNS name (and the name its TLS certificate must carry)."""
    meta = tc["metadata"]
    return f"{child_name(meta['name'])}.{meta['namespace']}.svc"


def tls_secret_name(tc: dict[str, Any]) -> str | None:
    """A ``kubernetes.io/tls`` Secret (``tls.crt``, ``tls.key``, ``ca.crt``; e.g. from cert-manager) for
    ``spec.tls.secretName``: the trainer then serves HTTPS and clients verify it against ``ca.crt``."""
    return (tc["spec"].get("tls") or {}).get("secretName")


def tinker_key_key(tc: dict[str, Any]) -> str:
    """The key of this TrainingClient's Tinker API key (``tml-...``) in its key Secret: ``tinker.<uid>``, bound to
    the object's uid like its token (token_key)."""
    uid = (tc.get("metadata") or {}).get("uid")
    return f"{TINKER_KEY}.{uid}" if uid else TINKER_KEY


def tinker_enabled(tc: dict[str, Any]) -> bool:
    return bool((tc["spec"].get("tinker") or {}).get("enabled"))


def trainer_url(tc: dict[str, Any], host: str | None = None) -> str:
    scheme = "https" if tls_secret_name(tc) else "http"
    return f"{scheme}://{host or service_host(tc)}:{TRAINER_PORT}"


def key_secret_name(tc: dict[str, Any]) -> str:
    """The Secret with the trainer's bearer token and the tenant's key set (``spec.keySecretRef``, else
    ``<client>-keys``, which the operator creates)."""
    return (tc["spec"].get("keySecretRef") or {}).get("name") or child_name(tc["metadata"]["name"], "keys")


def operation_spec(client_name: str, request: DurableRequest, sealing_key: Optional[bytes] = None) -> dict[str, Any]:
    """``TrainingOperation.spec`` for a save or load request. A save's name and metadata are sealed for the
    trainer under ``sealing_key`` (tg_tinker.sealing): the object in etcd holds neither in clear."""
    if isinstance(request, LoadStateRequest):
        parameters: dict[str, Any] = {"artifactId": request.artifact_id}
    else:
        parameters = {"includeOptimizer": request.include_optimizer}
        if request.name is not None or request.metadata:
            if sealing_key is None:
                raise ValidationError("a save's name and metadata go sealed into a TrainingOperation: no key given")
            parameters["sealed"] = seal(sealing_key, client_name, {"name": request.name, "metadata": request.metadata})
        if request.kind == "sampler":
            parameters["kind"] = "sampler"
    kind = "load_state" if isinstance(request, LoadStateRequest) else "save_state"
    return {"trainingClientRef": {"name": client_name}, "type": kind, "parameters": parameters}


def operation_request(spec: dict[str, Any]) -> DurableRequest:
    """The trainer request a ``TrainingOperation.spec`` stands for (``export`` is a sampler save:
    weights only, ready to pull and decrypt with ``tensafe artifact export``)."""
    kind, parameters = spec.get("type"), spec.get("parameters") or {}
    if kind == "load_state":
        if not parameters.get("artifactId"):
            raise ValidationError("a load_state TrainingOperation needs parameters.artifactId",
                                  {"field": "parameters.artifactId"})
        return LoadStateRequest(artifact_id=parameters["artifactId"])
    if kind == "save_state":
        return SaveStateRequest(include_optimizer=parameters.get("includeOptimizer", True),
                                name=parameters.get("name"), sealed=parameters.get("sealed"),
                                kind=parameters.get("kind", "checkpoint"))
    if kind == "export":
        return SaveStateRequest(kind="sampler", include_optimizer=False, name=parameters.get("name"),
                                sealed=parameters.get("sealed"))
    raise ValidationError(f"unknown TrainingOperation type {kind!r}; expected one of {OPERATION_TYPES}",
                          {"field": "type"})


@dataclass
class TrainerAccess:
    """How to reach a training client's trainer: URL, bearer token, and for HTTPS the CA to trust and
    the certificate name to expect (when the URL is a pod address rather than the Service name)."""

    base_url: str
    token: str
    verify: Union[bool, str] = True
    server_name: Optional[str] = None


def trainer_access(tc: dict[str, Any], read_secret: Callable[[str], dict[str, bytes]],
                   pod_ip: Optional[str] = None, base_url: Optional[str] = None) -> TrainerAccess:
    """``read_secret(name)`` returns a Secret's decoded data. Without ``pod_ip`` or ``base_url``: the
    Service DNS name (from inside the cluster)."""
    token = read_secret(key_secret_name(tc)).get(token_key(tc), b"").decode()
    if not token:
        raise ValidationError(f"the key Secret {key_secret_name(tc)!r} has no {token_key(tc)!r} yet")
    tls = tls_secret_name(tc)
    verify: Union[bool, str] = read_secret(tls).get("ca.crt", b"").decode() or True if tls else True
    if base_url:
        return TrainerAccess(base_url, token, verify)
    if pod_ip:
        return TrainerAccess(trainer_url(tc, pod_ip), token, verify, service_host(tc) if tls else None)
    return TrainerAccess(trainer_url(tc), token, verify)
