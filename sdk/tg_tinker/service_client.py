"""``ServiceClient``: the entry point. Picks a backend and creates training and sampling clients.

Backends:
- ``local`` (the default with no settings): starts the trainer server on loopback in a child process.
- ``remote``: a trainer server already running at ``base_url`` (or ``$TENSAFE_URL``), with
  ``api_key`` (or ``$TENSAFE_API_KEY``) as its bearer token.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from .config import TrainingConfig
from .errors import TGTinkerError, TrainingClientError, ValidationError, error_from_wire
from .local import LocalTrainer
from .sampling_client import SamplingClient
from .training_client import TrainingClient
from .transport import Transport
from .types import ArtifactInfo, AuditEntry, ClientInfo, ClientStatus, CreateSamplingClient, CreateTrainingClient

READY_TIMEOUT_S = 900.0
BACKENDS = ("local", "remote", "kubernetes")


class ServiceClient:
    def __init__(self, base_url: Optional[str] = None, api_key: Optional[str] = None, *,
                 backend: Optional[str] = None, tenant_id: str = "default", home: Optional[os.PathLike] = None,
                 timeout: float = 30.0):
        base_url = base_url or os.environ.get("TENSAFE_URL")
        backend = backend or ("remote" if base_url else "local")
        if backend not in BACKENDS:
            raise ValidationError(f"backend must be one of {BACKENDS}, not {backend!r}", {"field": "backend"})
        if backend == "kubernetes":
            raise TGTinkerError("the kubernetes backend is not available in this build of tg_tinker")
        self.backend = backend
        self.tenant_id = tenant_id
        self._local: Optional[LocalTrainer] = None
        if backend == "local":
            self._local = LocalTrainer(home=Path(home) if home else None)
            base_url, api_key = self._local.base_url, self._local.token
        elif not base_url:
            raise ValidationError("backend='remote' needs base_url (or $TENSAFE_URL)", {"field": "base_url"})
        api_key = api_key or os.environ.get("TENSAFE_API_KEY")
        self.transport = Transport(base_url, api_key, timeout=timeout)
        self.base_url = base_url

    # --- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
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
        body = CreateTrainingClient(config=config, client_id=client_id, tenant_id=self.tenant_id,
                                    resume_from=resume_from)
        info = ClientInfo.parse(self.transport.request("POST", "/v1/training_clients",
                                                       json=body.model_dump(mode="json")))
        if wait:
            info = self._wait_ready(info)
        return TrainingClient(self, info, config)

    def create_sampling_client(self, model_path: Optional[str] = None, artifact_id: Optional[str] = None,
                               base_model: Optional[str] = None, *, wait: bool = True) -> SamplingClient:
        """A sampler over saved weights (``artifact_id``), a local model folder, or a base model."""
        body = CreateSamplingClient(model_path=model_path, artifact_id=artifact_id, base_model=base_model,
                                    tenant_id=self.tenant_id)
        info = ClientInfo.parse(self.transport.request("POST", "/v1/sampling_clients",
                                                       json=body.model_dump(mode="json")))
        if wait:
            info = self._wait_ready(info)
        return SamplingClient(self, info.client_id, owned=True)

    def list_training_clients(self) -> list[ClientInfo]:
        return [ClientInfo.parse(c) for c in self.transport.request("GET", "/v1/clients") if c["kind"] == "training"]

    def _client_info(self, client_id: str) -> ClientInfo:
        return ClientInfo.parse(self.transport.request("GET", f"/v1/clients/{client_id}"))

    def _terminate(self, client_id: str) -> ClientInfo:
        return ClientInfo.parse(self.transport.request("DELETE", f"/v1/clients/{client_id}"))

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

    # --- artifacts and audit ----------------------------------------------------------------

    def list_artifacts(self, training_client_id: Optional[str] = None) -> list[ArtifactInfo]:
        params = {"tenant_id": self.tenant_id}
        if training_client_id:
            params["training_client_id"] = training_client_id
        return [ArtifactInfo.parse(a) for a in self.transport.request("GET", "/v1/artifacts", params=params)]

    def pull_artifact(self, artifact_id: str) -> bytes:
        """The artifact's bytes exactly as stored: encrypted."""
        return self.transport.request("GET", f"/v1/artifacts/{artifact_id}/content",
                                      params={"tenant_id": self.tenant_id}, raw=True)

    def get_audit_logs(self, training_client_id: Optional[str] = None, operation: Optional[str] = None,
                       limit: int = 100) -> list[AuditEntry]:
        params = {"limit": limit}
        if training_client_id:
            params["training_client_id"] = training_client_id
        if operation:
            params["operation"] = operation
        return [AuditEntry.parse(e) for e in self.transport.request("GET", "/v1/audit", params=params)]
