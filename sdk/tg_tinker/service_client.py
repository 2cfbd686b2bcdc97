"""``ServiceClient``: the entry point. Picks a backend and creates training and sampling clients.

Backends:
- ``local`` (the default with no settings): starts the trainer server on loopback in a child process.
- ``remote``: a trainer server already running at ``base_url`` (or ``$TENSAFE_URL``), with
  ``api_key`` (or ``$TENSAFE_API_KEY``) as its bearer token.
- ``kubernetes``: a ``TrainingClient`` custom resource per training client in ``namespace``
  (in-cluster config, else ``kubeconfig`` / ``$KUBECONFIG``); each has its own trainer pod. Closing loses
  nothing: the clients this ServiceClient started are suspended (checkpointed, then their pod stopped), their
  resource, volume and TrainingOperations kept; ``get_training_client`` resumes one. Deleting is an explicit
  ``delete_training_client`` (or ``delete_on_close=True``).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Optional

from .config import TrainingConfig
from .errors import TrainingClientError, ValidationError, error_from_wire
from .kube_backend import KubernetesBackend
from .local import LocalTrainer
from .resources import DurableRequest, operation_request
from .sampling_client import SamplingClient
from .submission import OperationQueue
from .trainer_api import TrainerAPI
from .training_client import TrainingClient
from .transport import Transport, Verify
from .types import (
    ArtifactInfo,
    AuditEntry,
    AuditHead,
    BatchData,
    ClientInfo,
    ClientStatus,
    CreateSamplingClient,
    CreateTrainingClient,
    DatasetExample,
    DatasetInfo,
    GrantArtifact,
    RegisterDataset,
)

READY_TIMEOUT_S = 900.0
BACKENDS = ("local", "remote", "kubernetes")


class ServiceClient:
    def __init__(self, base_url: Optional[str] = None, api_key: Optional[str] = None, *,
                 backend: Optional[str] = None, tenant_id: str = "default", home: Optional[os.PathLike] = None,
                 timeout: float = 30.0, namespace: Optional[str] = None, kubeconfig: Optional[str] = None,
                 context: Optional[str] = None, delete_on_close: bool = False, verify: Verify = True):
        base_url = base_url or os.environ.get("TENSAFE_URL")
        backend = backend or ("remote" if base_url else "local")
        if backend not in BACKENDS:
            raise ValidationError(f"backend must be one of {BACKENDS}, not {backend!r}", {"field": "backend"})
        self.backend = backend
        self.tenant_id = tenant_id
        self._timeout = timeout
        self._verify = verify  # for https trainers: True, False, or a CA bundle (path or PEM)
        self._local: Optional[LocalTrainer] = None
        self._kube: Optional[KubernetesBackend] = None
        self._clients: dict[str, Transport] = {}  # each client's own token (and, on kubernetes, its own trainer)
        self._queues: dict[str, OperationQueue] = {}  # one per client: its operations reach it in call order
        self._created: set[str] = set()  # kubernetes: the clients this one started (suspended on close)
        self._delete_on_close = delete_on_close
        self.transport: Optional[Transport] = None
        self.base_url = base_url
        if backend == "kubernetes":
            # base_url, if given, overrides the trainer address (e.g. a kubectl port-forward).
            self._kube = KubernetesBackend(namespace, kubeconfig, context, endpoint=base_url)
            return
        if backend == "local":
            self._local = LocalTrainer(home=Path(home) if home else None)
            base_url, api_key = self._local.base_url, self._local.token
        elif not base_url:
            raise ValidationError("backend='remote' needs base_url (or $TENSAFE_URL)", {"field": "base_url"})
        api_key = api_key or os.environ.get("TENSAFE_API_KEY")
        self.transport = Transport(base_url, api_key, timeout=timeout, verify=verify)
        self.base_url = base_url

    @property
    def local_trainer(self) -> Optional[LocalTrainer]:
        """The embedded trainer this client started (``backend='local'``); None for the other backends."""
        return self._local

    # --- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop what this client started, losing nothing: the local trainer; on Kubernetes the training clients
        it created or resumed are suspended (``spec.suspend: true``: the operator saves a checkpoint, then stops
        the pod; the TrainingClient, its volume with every checkpoint and its TrainingOperations stay, and
        ``get_training_client`` resumes it). Only with ``delete_on_close=True`` are they deleted, with their
        volume and records, as ``delete_training_client`` does. Operations already submitted are sent first."""
        for queue in self._queues.values():
            queue.flush()
        self._queues.clear()
        for name, transport in list(self._clients.items()):
            transport.close()
            if self._kube is not None and name in self._created:
                if self._delete_on_close:
                    self._kube.delete(name)
                else:
                    self._kube.suspend(name)
        self._created.clear()
        self._clients.clear()
        if self.transport is not None:
            self.transport.close()
        if self._local is not None:
            self._local.close()
            self._local = None

    def __enter__(self) -> "ServiceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- clients ----------------------------------------------------------------------------

    def create_training_client(self, config: Optional[TrainingConfig] = None, *, client_id: Optional[str] = None,
                               resume_from: Optional[str] = None, wait: bool = True) -> TrainingClient:
        """Create a training client; by default waits until its model is loaded (errors surface here).

        ``resume_from`` loads a checkpoint first: an artifact id, or ``"latest"`` for the newest checkpoint
        saved under this ``client_id`` (none yet: a fresh start). A client in ERROR can be replaced this way.
        """
        config = config if config is not None else TrainingConfig()
        if self._kube is not None:
            return self._create_kube_training_client(config, client_id, resume_from)
        body = CreateTrainingClient(config=config, client_id=client_id, tenant_id=self.tenant_id,
                                    resume_from=resume_from)
        info = ClientInfo.parse(self.transport.request("POST", "/v1/training_clients",
                                                       json=body.model_dump(mode="json")))
        self._adopt(info)
        if wait:
            info = self._wait_ready(info).model_copy(update={"access_token": info.access_token})
        return TrainingClient(self, info, config)

    def create_sampling_client(self, model_path: Optional[str] = None, artifact_id: Optional[str] = None,
                               base_model: Optional[str] = None, *, wait: bool = True) -> SamplingClient:
        """A sampler over saved weights (``artifact_id``), a local model folder, or a base model."""
        body = CreateSamplingClient(model_path=model_path, artifact_id=artifact_id, base_model=base_model,
                                    tenant_id=self.tenant_id)
        info = ClientInfo.parse(self._transport_for(None).request("POST", "/v1/sampling_clients",
                                                                  json=body.model_dump(mode="json")))
        self._adopt(info)
        if wait:
            info = self._wait_ready(info)
        return SamplingClient(self, info.client_id, owned=True)

    def _create_kube_training_client(self, config: TrainingConfig, client_id: Optional[str],
                                     resume_from: Optional[str]) -> TrainingClient:
        """Create the custom resource, wait for its trainer, connect. Every trainer pod resumes from the
        client's latest checkpoint by itself; an explicit artifact id is loaded once it is ready."""
        name = client_id or f"tc-{uuid.uuid4().hex[:10]}"
        self._kube.create(name, config, self.tenant_id)
        self._created.add(name)
        try:
            client = self._connect_kube(name)
        except BaseException:
            self._kube.delete(name)
            raise
        if resume_from and resume_from != "latest":
            client.load_state(resume_from)
        return client

    def get_training_client(self, client_id: str) -> TrainingClient:
        """Attach to a training client that already exists (on Kubernetes: a TrainingClient resource, e.g.
        from GitOps; left running on close). A suspended one (``spec.suspend``, as closing a ServiceClient leaves
        the ones it started) is resumed from its latest checkpoint, and suspended again on close. Waits until
        it is ready."""
        if self._kube is not None:
            if self._kube.get(client_id)["spec"].get("suspend"):
                self._kube.suspend(client_id, False)
                self._created.add(client_id)
            return self._connect_kube(client_id)
        info = self._wait_ready(self._client_info(client_id))
        return TrainingClient(self, info, info.config)

    def _connect_kube(self, name: str) -> TrainingClient:
        tc = self._kube.wait_ready(name, READY_TIMEOUT_S)
        access = self._kube.access(tc)
        self._use(name, Transport(access.base_url, access.token, timeout=self._timeout, verify=access.verify,
                                  server_name=access.server_name))
        info = self._kube.info(tc)
        return TrainingClient(self, info, info.config)

    def delete_training_client(self, client_id: str) -> None:
        """Kubernetes: delete the TrainingClient resource, and with it what it owns: its pod, its own key Secret
        and volume (``<name>-keys``, ``<name>-artifacts``: every checkpoint on it) and its TrainingOperations. A
        Secret or volume its spec names is the tenant's and stays; so does its PrivacyBudget. This is the one
        call of the SDK that deletes a client's data; closing never does."""
        if self._kube is None:
            raise ValidationError("delete_training_client is for backend='kubernetes'; elsewhere a client's "
                                  "checkpoints are artifacts of the tenant", {"field": "backend"})
        queue = self._queues.pop(client_id, None)
        if queue is not None:
            queue.close(TrainingClientError(f"training client {client_id!r} was deleted"))
        transport = self._clients.pop(client_id, None)
        if transport is not None:
            transport.close()
        self._created.discard(client_id)
        self._kube.delete(client_id)

    def list_training_clients(self) -> list[ClientInfo]:
        if self._kube is not None:
            return [self._client_info(name) for name in self._clients]
        return [ClientInfo.parse(c) for c in self.transport.request("GET", "/v1/clients") if c["kind"] == "training"]

    def _adopt(self, info: ClientInfo) -> None:
        """Talk to a new client with the token the trainer issued for it alone."""
        if info.access_token:
            self._use(info.client_id, Transport(self.base_url, info.access_token, timeout=self._timeout,
                                                verify=self._verify))

    def _use(self, client_id: str, transport: Transport) -> None:
        """From now on talk to ``client_id`` through ``transport``. A client replaced under the same id (a
        resume after a crash) gets a new token: the old instance's queue, holding the revoked one, is closed
        (its futures keep their transport, so they still report what the trainer answers for them)."""
        old = self._clients.get(client_id)
        if old is not None and old.token == transport.token and old.base_url == transport.base_url:
            transport.close()
            return
        self._clients[client_id] = transport
        old_queue = self._queues.pop(client_id, None)
        if old_queue is not None:
            old_queue.close(TrainingClientError(f"training client {client_id!r} was replaced by a new instance; "
                                                "use the TrainingClient the replacement returned"))

    def _transport_for(self, client_id: Optional[str]) -> Transport:
        """The transport for ``client_id``: its own token (and trainer); None: the service's own."""
        if client_id in self._clients:
            return self._clients[client_id]
        if self._kube is None:
            return self.transport
        if client_id is None and len(self._clients) == 1:
            return next(iter(self._clients.values()))
        raise ValidationError("with backend='kubernetes' each training client has its own trainer: name one "
                              f"(training_client_id), one of {sorted(self._clients)}", {"field": "training_client_id"})

    def _queue_for(self, client_id: str) -> OperationQueue:
        """The one queue of ``client_id``, shared by its training and sampling clients."""
        if client_id not in self._queues:
            self._queues[client_id] = OperationQueue(self._transport_for(client_id), client_id)
        return self._queues[client_id]

    def _client_info(self, client_id: str) -> ClientInfo:
        if self._kube is not None:
            return self._kube.info(self._kube.get(client_id))
        return TrainerAPI(self._transport_for(client_id)).client(client_id)

    def _terminate(self, client_id: str) -> ClientInfo:
        queue = self._queues.pop(client_id, None)
        if queue is not None:
            queue.close(TrainingClientError(f"client {client_id} is TERMINATED: it was closed",
                                            {"status": ClientStatus.TERMINATED.value}))
        if self._kube is not None and client_id in self._clients:
            # Suspended, not deleted: the operator checkpoints and stops the pod; volume and records stay.
            info = self._client_info(client_id)
            self._clients.pop(client_id).close()
            self._created.discard(client_id)
            self._kube.suspend(client_id)
            return info.model_copy(update={"status": ClientStatus.TERMINATED})
        info = TrainerAPI(self._transport_for(client_id)).terminate(client_id)
        # Its token died with it: what is left to read of it (audit entries, artifacts, the outcome of its
        # last operations, whose futures hold its transport) takes the service's own token from now on.
        transport = self._clients.pop(client_id, None)
        if transport is not None:
            transport.use_token(self.transport.token)
        return info

    def _run_durable(self, client_id: str, queue: OperationQueue, request: DurableRequest):
        """A save or load. On Kubernetes it is also a TrainingOperation resource: created first, then
        submitted here under the resource's uid (keeping its place in the client's order; the operator's
        submission of the same uid finds it), its outcome read from the resource's status."""
        if self._kube is None:
            return queue.submit(request).result()
        top = self._kube.create_operation(self._kube.get(client_id), request)
        # The trainer gets what the operator submits too (name and metadata sealed): one fingerprint, one run.
        trainer_future = queue.submit(operation_request(top["spec"]), idempotency_key=top["metadata"]["uid"])
        return self._kube.operation_result(top, request, trainer_future)

    def _wait_ready(self, info: ClientInfo) -> ClientInfo:
        deadline = time.monotonic() + READY_TIMEOUT_S
        delay = 0.05
        while info.status is ClientStatus.INITIALIZING:
            if time.monotonic() > deadline:
                raise TrainingClientError(f"client {info.client_id} not ready after {READY_TIMEOUT_S:.0f}s")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
            info = self._client_info(info.client_id)
        if info.status is ClientStatus.ERROR:
            raise error_from_wire({"type": info.error_type or "TrainingClientError",
                                   "message": f"client {info.client_id} failed to start: {info.error}"})
        return info

    # --- datasets ---------------------------------------------------------------------------

    def register_dataset(self, rows, dataset_id: Optional[str] = None, *,
                         training_client_id: Optional[str] = None) -> DatasetInfo:
        """Store training examples encrypted on the trainer, for server-side Poisson sampling: a client with
        ``DPConfig(dataset_id=..., sample_rate=q)`` then trains with ``forward_backward_sampled()``.

        ``rows``: a batch as in ``BatchData`` (a dict of ``input_ids``, optional ``attention_mask`` and
        ``labels``; padding is kept as masked positions) or a list of such dicts, one per example. On
        Kubernetes each client has its own trainer: name the client (``training_client_id``, optional when
        there is one) whose trainer keeps the dataset, before its first ``forward_backward_sampled``."""
        request = RegisterDataset(examples=_examples(rows), dataset_id=dataset_id, tenant_id=self.tenant_id)
        return DatasetInfo.parse(self._dataset_transport(training_client_id).request(
            "POST", "/v1/datasets", json=request.model_dump(mode="json", exclude_none=True)))

    def list_datasets(self, *, training_client_id: Optional[str] = None) -> list[DatasetInfo]:
        return [DatasetInfo.parse(d) for d in self._dataset_transport(training_client_id).request(
            "GET", "/v1/datasets", params={"tenant_id": self.tenant_id})]

    def delete_dataset(self, dataset_id: str, *, training_client_id: Optional[str] = None) -> DatasetInfo:
        """Delete the examples (their privacy ledger stays: spent budget is never given back)."""
        return DatasetInfo.parse(self._dataset_transport(training_client_id).request(
            "DELETE", f"/v1/datasets/{dataset_id}", params={"tenant_id": self.tenant_id}))

    def _dataset_transport(self, training_client_id: Optional[str]) -> Transport:
        """The trainer's own token: locally the service's; on Kubernetes the named client's trainer (its key
        Secret's token, which is that trainer's own)."""
        if self._kube is None:
            return self.transport
        return self._transport_for(training_client_id)

    # --- artifacts and audit ----------------------------------------------------------------

    def list_artifacts(self, training_client_id: Optional[str] = None) -> list[ArtifactInfo]:
        params = {"tenant_id": self.tenant_id}
        if training_client_id:
            params["training_client_id"] = training_client_id
        transport = self._transport_for(training_client_id)
        return [ArtifactInfo.parse(a) for a in transport.request("GET", "/v1/artifacts", params=params)]

    def pull_artifact(self, artifact_id: str, training_client_id: Optional[str] = None) -> bytes:
        """The artifact's bytes exactly as stored: encrypted."""
        return self._transport_for(training_client_id).request(
            "GET", f"/v1/artifacts/{artifact_id}/content", params={"tenant_id": self.tenant_id}, raw=True)

    def grant_artifact(self, artifact_id: str, training_client_id: str) -> None:
        """Let ``training_client_id`` load, sample and pull another client's artifact (a client's own token
        reaches only its own client's artifacts). Needs the trainer's own token; recorded in the audit log;
        ends with the grantee client."""
        body = GrantArtifact(training_client_id=training_client_id, tenant_id=self.tenant_id)
        self._transport_for(None).request("POST", f"/v1/artifacts/{artifact_id}/grants",
                                          json=body.model_dump(mode="json"))

    def receipt_public_key(self, *, training_client_id: Optional[str] = None) -> str:
        """The PEM public key that verifies this tenant's privacy receipts (``tg_tinker.verify_receipt``)."""
        return self._transport_for(training_client_id).request(
            "GET", "/v1/receipts/public_key", params={"tenant_id": self.tenant_id})["public_key"]

    def receipt_public_keys(self, *, training_client_id: Optional[str] = None) -> dict:
        """This tenant's receipt key list: the active key and every key retired by a rotation, with the audit
        sequence it was retired at. ``tg_tinker.verify_receipt(receipt, keys)`` takes it and verifies receipts of
        any age, refusing one a retired key signed after its retirement."""
        return self._transport_for(training_client_id).request(
            "GET", "/v1/receipts/public_keys", params={"tenant_id": self.tenant_id})

    def audit_head(self, *, training_client_id: Optional[str] = None) -> AuditHead:
        """The head of this tenant's audit chain now: keep it, and ``tensafe audit verify --expect-head``
        finds a log truncated behind it."""
        return AuditHead.parse(self._transport_for(training_client_id).request(
            "GET", "/v1/audit/head", params={"tenant_id": self.tenant_id}))

    def get_audit_logs(self, training_client_id: Optional[str] = None, operation: Optional[str] = None,
                       limit: int = 100) -> list[AuditEntry]:
        params = {"limit": limit, "tenant_id": self.tenant_id}
        if training_client_id:
            params["training_client_id"] = training_client_id
        if operation:
            params["operation"] = operation
        transport = self._transport_for(training_client_id)
        return [AuditEntry.parse(e) for e in transport.request("GET", "/v1/audit", params=params)]


def _examples(rows) -> list[DatasetExample]:
    """A BatchData-like dict (or BatchData) or a list of one-example dicts, as DatasetExamples."""
    if isinstance(rows, (dict, BatchData)):
        batch = BatchData.parse(rows)
        columns = [batch.input_ids, batch.attention_mask, batch.labels]
        return [DatasetExample(input_ids=ids, attention_mask=None if batch.attention_mask is None else columns[1][i],
                               labels=None if batch.labels is None else columns[2][i])
                for i, ids in enumerate(batch.input_ids)]
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ValidationError("rows must be a batch (a dict like BatchData) or a non-empty list of examples",
                              {"field": "rows"})
    return [DatasetExample.parse(row) for row in rows]
