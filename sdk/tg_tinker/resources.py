"""The custom resources as data: names, and how a ``TrainingOperation`` maps to a trainer operation.

Shared by the SDK's Kubernetes backend (which creates TrainingOperations and submits them itself, to
keep their place in the client's order) and the operator (which submits the ones GitOps or ``kubectl``
created): both derive the same request from the same spec, and the operation's uid is the idempotency
key, so an operation submitted by both runs once.
"""

from __future__ import annotations

import hashlib
from typing import Any, Union

from .errors import ValidationError
from .types import LoadStateRequest, SaveStateRequest

GROUP, VERSION = "tensafe.io", "v1alpha1"
TRAINING_CLIENTS, TRAINING_OPERATIONS = "trainingclients", "trainingoperations"
OPERATION_TYPES = ("save_state", "load_state", "export")
TERMINAL_PHASES = ("Succeeded", "Failed")

TRAINER_PORT = 8000
TOKEN_KEY = "token"  # the bearer token's key in the key Secret (beside the tenant's "<tenant>.json")
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


def key_secret_name(tc: dict[str, Any]) -> str:
    """The Secret with the trainer's bearer token and the tenant's key set (``spec.keySecretRef``, else
    ``<client>-keys``, which the operator creates)."""
    return (tc["spec"].get("keySecretRef") or {}).get("name") or child_name(tc["metadata"]["name"], "keys")


def operation_spec(client_name: str, request: DurableRequest) -> dict[str, Any]:
    """``TrainingOperation.spec`` for a save or load request."""
    if isinstance(request, LoadStateRequest):
        parameters: dict[str, Any] = {"artifactId": request.artifact_id}
    else:
        parameters = {"includeOptimizer": request.include_optimizer, "metadata": request.metadata}
        if request.name:
            parameters["name"] = request.name
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
                                metadata=parameters.get("metadata") or {}, name=parameters.get("name"),
                                kind=parameters.get("kind", "checkpoint"))
    if kind == "export":
        return SaveStateRequest(kind="sampler", include_optimizer=False, name=parameters.get("name"),
                                metadata=parameters.get("metadata") or {})
    raise ValidationError(f"unknown TrainingOperation type {kind!r}; expected one of {OPERATION_TYPES}",
                          {"field": "type"})
