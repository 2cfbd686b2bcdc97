"""The Kubernetes backend: a ``TrainingClient`` custom resource per training client.

The SDK creates the resource, waits (watching) until the operator reports it READY, reads the
trainer's bearer token from the client's key Secret, and from then on talks HTTP to the trainer pod as
the local backend does. Saves and loads are also recorded as ``TrainingOperation`` resources; their
results come from those resources' status. Needs the ``kubernetes`` package (``pip install
tensafe[operator]``).
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from typing import Any, Optional

from .config import TrainingConfig
from .errors import TGTinkerError, TrainingClientError, TrainingClientNotFoundError, ValidationError, error_from_wire
from .resources import (GROUP, TERMINAL_PHASES, TRAINING_CLIENTS, TRAINING_OPERATIONS, VERSION, DurableRequest,
                        TrainerAccess, child_name, key_secret_name, keyset_key, operation_spec,
                        trainer_access)
from .sealing import sealing_key
from .operations import RESULT_TYPES
from .types import ClientInfo, ClientStatus

# How long a finished trainer operation may wait for the operator to record it before the SDK says so.
OPERATOR_GRACE_S = 60.0


def _kubernetes():
    try:
        import kubernetes
    except ImportError:
        raise TGTinkerError("backend='kubernetes' needs the kubernetes package: pip install 'tensafe[operator]'") \
            from None
    return kubernetes


class KubernetesBackend:
    def __init__(self, namespace: Optional[str] = None, kubeconfig: Optional[str] = None,
                 context: Optional[str] = None, endpoint: Optional[str] = None):
        k8s = _kubernetes()
        self._errors = k8s.client.exceptions.ApiException
        self.in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and not kubeconfig
        if self.in_cluster:
            k8s.config.load_incluster_config()
            api = k8s.client.ApiClient()
            default_namespace = _incluster_namespace()
        else:
            try:
                api = k8s.config.new_client_from_config(config_file=kubeconfig, context=context)
                _, active = k8s.config.list_kube_config_contexts(config_file=kubeconfig)
            except k8s.config.ConfigException as error:
                raise TGTinkerError(f"backend='kubernetes' found no usable Kubernetes configuration ({error}): "
                                    "pass kubeconfig=, set $KUBECONFIG, or run in a pod") from None
            default_namespace = (active.get("context") or {}).get("namespace") or "default"
        self.namespace = namespace or default_namespace
        self.endpoint_override = endpoint
        self.custom = k8s.client.CustomObjectsApi(api)
        self.core = k8s.client.CoreV1Api(api)
        self._watch = k8s.watch.Watch

    # ----- training clients ---------------------------------------------------------------------------
    def create(self, name: str, config: TrainingConfig, tenant_id: str) -> dict:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingClient",
                "metadata": {"name": name, "namespace": self.namespace},
                "spec": {"training": config.model_dump(mode="json", exclude_none=True), "tenantId": tenant_id}}
        try:
            return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, TRAINING_CLIENTS, body)
        except self._errors as error:
            if error.status == 409:  # closing keeps a client (suspended, with its checkpoints)
                raise ValidationError(f"TrainingClient {name!r} already exists: get_training_client({name!r}) "
                                      f"resumes it, delete_training_client({name!r}) deletes it and its checkpoints",
                                      {"field": "client_id"}) from None
            raise _api_error(error, f"TrainingClient {name!r}") from None

    def get(self, name: str) -> dict:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, TRAINING_CLIENTS, name)
        except self._errors as error:
            raise _api_error(error, f"TrainingClient {name!r}") from None

    def delete(self, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, TRAINING_CLIENTS, name)
        except self._errors as error:
            if error.status != 404:
                raise _api_error(error, f"TrainingClient {name!r}") from None

    def suspend(self, name: str, suspend: bool = True) -> None:
        """``spec.suspend``: true, the operator saves a checkpoint and stops the pod (the resource, its volume and
        its operations stay); false, a new pod resumes from the latest checkpoint."""
        try:
            self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, TRAINING_CLIENTS, name,
                                                       {"spec": {"suspend": suspend}})
        except self._errors as error:
            if error.status != 404 or not suspend:
                raise _api_error(error, f"TrainingClient {name!r}") from None

    def wait_ready(self, name: str, timeout: float) -> dict:
        """Watch the resource until the operator reports READY (or BUSY); ERROR raises with its reason."""
        deadline = time.monotonic() + timeout
        tc = self.get(name)
        while not _ready(tc):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TrainingClientError(f"TrainingClient {name!r} not ready after {timeout:.0f}s: "
                                          f"{_condition_message(tc) or 'no status yet (is the operator running?)'}")
            watch = self._watch()
            for event in watch.stream(self.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace,
                                      TRAINING_CLIENTS, field_selector=f"metadata.name={name}",
                                      resource_version=tc["metadata"]["resourceVersion"],
                                      timeout_seconds=max(1, int(min(left, 60)))):
                if event["type"] == "DELETED":
                    raise TrainingClientNotFoundError(f"TrainingClient {name!r} was deleted while starting")
                tc = event["object"]
                if _ready(tc):
                    watch.stop()
                    break
            else:
                tc = self.get(name)  # the watch timed out or broke: re-read, then watch again
        return tc

    def info(self, tc: dict) -> ClientInfo:
        """The resource's status as the SDK's ``ClientInfo``."""
        status = tc.get("status") or {}
        error = _condition_message(tc, "Failed")
        return ClientInfo(client_id=tc["metadata"]["name"], kind="training",
                          status=ClientStatus(status.get("phase", "INITIALIZING")), step=status.get("step", 0),
                          tenant_id=tc["spec"].get("tenantId", "default"),
                          config=TrainingConfig.parse(tc["spec"]["training"]),
                          total_epsilon=(status.get("privacy") or {}).get("totalEpsilon"),
                          last_checkpoint=status.get("lastCheckpoint"),
                          error=error if status.get("phase") == "ERROR" else None)

    def access(self, tc: dict) -> TrainerAccess:
        """How to reach the trainer. In a pod: the Service's DNS name. Outside: the pod's address (a flat
        network, or the test cluster) unless ``base_url`` says otherwise (e.g. a port-forward)."""
        pod_ip = None
        if not (self.endpoint_override or self.in_cluster):
            pod = self.core.read_namespaced_pod(tc["status"].get("podName") or child_name(tc["metadata"]["name"]),
                                                self.namespace)
            pod_ip = pod.status.pod_ip
        return trainer_access(tc, self._secret_data, pod_ip, self.endpoint_override)

    def _secret_data(self, name: str) -> dict[str, bytes]:
        try:
            secret = self.core.read_namespaced_secret(name, self.namespace)
        except self._errors as error:
            raise _api_error(error, f"Secret {name!r}") from None
        return {key: base64.b64decode(value) for key, value in (secret.data or {}).items()}

    # ----- durable operations -------------------------------------------------------------------------
    def create_operation(self, tc: dict, request: DurableRequest) -> dict:
        name = tc["metadata"]["name"]
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingOperation",
                "metadata": {"name": f"{name}-{request.type.replace('_', '-')}-{uuid.uuid4().hex[:8]}",
                             "namespace": self.namespace, "labels": {"tensafe.io/training-client": name},
                             "ownerReferences": [{"apiVersion": tc["apiVersion"], "kind": tc["kind"], "name": name,
                                                  "uid": tc["metadata"]["uid"]}]},
                "spec": operation_spec(name, request, self._sealing_key(tc))}
        try:
            return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, TRAINING_OPERATIONS,
                                                               body)
        except self._errors as error:
            raise _api_error(error, "TrainingOperation") from None

    def _sealing_key(self, tc: dict) -> bytes:
        """From the tenant's key set in the client's key Secret (read for the trainer's token too)."""
        import json

        tenant = tc["spec"].get("tenantId", "default")
        raw = self._secret_data(key_secret_name(tc)).get(keyset_key(tenant))
        if not raw:
            raise TrainingClientError(f"the key Secret {key_secret_name(tc)!r} holds no key set for tenant {tenant!r} "
                                      "yet: is the operator running?")
        return sealing_key(json.loads(raw))

    def operation_result(self, top: dict, request: DurableRequest, trainer_future) -> Any:
        """Wait for the operation's status to finish; its result or error is the outcome. If the trainer
        finished it but no operator records it, say so instead of waiting forever."""
        name = top["metadata"]["name"]
        recorded_deadline: Optional[float] = None
        while True:
            status = self._operation(name).get("status") or {}
            if status.get("phase") in TERMINAL_PHASES:
                break
            if recorded_deadline is None and trainer_future.done():
                recorded_deadline = time.monotonic() + OPERATOR_GRACE_S
            if recorded_deadline is not None and time.monotonic() > recorded_deadline:
                trainer_future.result()  # the trainer's own outcome, if it is an error
                raise TrainingClientError(f"TrainingOperation {name} finished on the trainer but its status was "
                                          f"not updated within {OPERATOR_GRACE_S:.0f}s: is the operator running?")
            time.sleep(0.2)
        if status["phase"] == "Failed":
            kind, _, message = (status.get("message") or "TrainingClientError: failed").partition(": ")
            raise error_from_wire({"type": kind, "message": message or kind})
        return RESULT_TYPES[request.type].parse(status.get("result") or {})

    def _operation(self, name: str) -> dict:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, TRAINING_OPERATIONS, name)
        except self._errors as error:
            raise _api_error(error, f"TrainingOperation {name!r}") from None


def _ready(tc: dict) -> bool:
    phase = (tc.get("status") or {}).get("phase")
    if phase == "ERROR":
        raise TrainingClientError(f"TrainingClient {tc['metadata']['name']!r} failed: "
                                  f"{_condition_message(tc, 'Failed')}")
    return phase in ("READY", "BUSY")


def _condition_message(tc: dict, kind: str = "Ready") -> str:
    for condition in (tc.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return f"{condition.get('reason', '')}: {condition.get('message', '')}".strip(": ")
    return ""


def _api_error(error: Any, what: str) -> TGTinkerError:
    import json

    try:
        message = json.loads(error.body).get("message", error.reason)
    except (TypeError, ValueError):
        message = str(error.reason)
    if error.status == 404:
        return TrainingClientNotFoundError(f"{what} not found: {message}")
    if error.status in (400, 422):
        return ValidationError(f"{what} was refused by the Kubernetes API: {message}")
    if error.status == 409:
        return ValidationError(f"{what} already exists: {message}")
    return TrainingClientError(f"Kubernetes API error {error.status} for {what}: {message}")


def _incluster_namespace() -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip()
    except OSError:
        return "default"
