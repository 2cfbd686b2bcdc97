"""``TrainingClient``: queue training operations on one trainer session and get futures back."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from .config import TrainingConfig
from .errors import TrainingClientError
from .futures import Future
from .transport import Transport
from .types import (
    AdamStep,
    BatchData,
    ClientInfo,
    ClientStatus,
    ExportAdapterRequest,
    ExportAdapterResult,
    ForwardBackwardRequest,
    ForwardBackwardResult,
    ForwardBackwardSampledRequest,
    ForwardRequest,
    ForwardResult,
    LoadStateRequest,
    LoadStateResult,
    OptimStepRequest,
    OptimStepResult,
    SaveStateRequest,
    SaveStateResult,
)

if TYPE_CHECKING:
    from .sampling_client import SamplingClient
    from .service_client import ServiceClient

Batch = Union[BatchData, dict]
RECEIPT_FILE = "tensafe-receipt.json"  # written beside an exported adapter


def _write_private(path: Path, data: bytes) -> None:
    """Mode 0600, not through a link planted at ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o600)
        f.write(data)


class SamplerArtifact(str):
    """What ``save_weights_for_sampler`` returns: the artifact id, with the save's result and receipt."""

    result: SaveStateResult

    def __new__(cls, result: SaveStateResult) -> "SamplerArtifact":
        artifact = super().__new__(cls, result.artifact_id)
        artifact.result = result
        return artifact

    @property
    def receipt(self) -> Optional[dict]:
        return self.result.receipt


class TrainingClient:
    def __init__(self, service: "ServiceClient", info: ClientInfo, config: TrainingConfig):
        self._service = service
        self.id = info.client_id
        self.config = config
        self._info = info
        self._queue = service._queue_for(self.id)
        self.last_export: Optional[ExportAdapterResult] = None  # the last export_adapter's result (and receipt)

    def __repr__(self) -> str:
        return f"<TrainingClient {self.id} {self.status.value} step={self.step}>"

    # --- state ------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        return self._info.step

    @property
    def status(self) -> ClientStatus:
        return self._info.status

    @property
    def total_epsilon(self) -> Optional[float]:
        return self._info.total_epsilon

    @property
    def info(self) -> ClientInfo:
        return self._info

    @property
    def transport(self) -> Transport:
        """The connection this client's operations go through: its own bearer token (on Kubernetes, its own trainer)."""
        return self._queue.transport

    def refresh(self) -> "TrainingClient":
        self._info = self._service._client_info(self.id)
        return self

    def _advance(self, result: Union[OptimStepResult, LoadStateResult]) -> None:
        self._info = self._info.model_copy(update={"step": result.step})

    # --- operations -------------------------------------------------------------------------

    def forward_backward(self, batch: Batch, loss_fn: str = "cross_entropy", loss_fn_config: Optional[dict] = None,
                         reduction: str = "mean", return_logprobs: bool = False) -> Future[ForwardBackwardResult]:
        """Accumulate the gradient of ``loss_fn`` (the trainer's loss registry: cross_entropy, importance_sampling,
        ppo, cispo, dro) over ``batch``; per-token inputs other than the labels go in ``batch["loss_inputs"]``."""
        return self._queue.submit(ForwardBackwardRequest(
            batch=BatchData.parse(batch), loss_fn=loss_fn, loss_fn_config=loss_fn_config, reduction=reduction,
            return_logprobs=return_logprobs))

    def forward_backward_sampled(self) -> Future[ForwardBackwardResult]:
        """Draw one logical batch of the registered dataset ``dp_config.dataset_id`` on the server (each example
        independently with probability ``dp_config.sample_rate``) and accumulate it; then ``optim_step()``."""
        return self._queue.submit(ForwardBackwardSampledRequest())

    def forward(self, batch: Batch, loss_fn: str = "cross_entropy",
                loss_fn_config: Optional[dict] = None) -> Future[ForwardResult]:
        return self._queue.submit(ForwardRequest(batch=BatchData.parse(batch), loss_fn=loss_fn,
                                                 loss_fn_config=loss_fn_config))

    def optim_step(self, apply_dp_noise: Optional[bool] = None,
                   adam: Optional[AdamStep] = None) -> Future[OptimStepResult]:
        """One optimizer step; ``adam`` overrides this step's Adam hyperparameters (and clips the gradient)."""
        return self._queue.submit(OptimStepRequest(apply_dp_noise=apply_dp_noise, adam=adam), on_result=self._advance)

    def save_state(self, include_optimizer: bool = True, metadata: Optional[dict] = None) -> SaveStateResult:
        """Save an encrypted checkpoint. The result carries a signed privacy ``receipt`` and the audit chain's
        head after this save (``audit_head``)."""
        request = SaveStateRequest(include_optimizer=include_optimizer, metadata=metadata or {})
        result = self._service._run_durable(self.id, self._queue, request)
        return result.model_copy(update={"metadata": request.metadata})  # the trainer never echoes it

    def load_state(self, artifact_id: str) -> LoadStateResult:
        result = self._service._run_durable(self.id, self._queue, LoadStateRequest(artifact_id=artifact_id))
        self._advance(result)
        return result

    def save_weights_for_sampler(self, name: Optional[str] = None) -> "SamplerArtifact":
        """Save the current weights (no optimizer state) as a sampler artifact; returns its id (a ``str``
        that also carries the save's ``result`` and signed ``receipt``)."""
        request = SaveStateRequest(kind="sampler", include_optimizer=False, name=name)
        result = self._queue.submit(request).result().model_copy(update={"name": name})
        return SamplerArtifact(result)

    def create_sampling_client(self) -> "SamplingClient":
        """A sampler over this client's live weights; its operations queue behind training ones."""
        from .sampling_client import SamplingClient

        return SamplingClient(self._service, self.id, owned=False)

    def export_adapter(self, path) -> Path:
        """Write the current LoRA adapter, decrypted, as a PEFT folder at ``path``
        (``adapter_config.json`` + ``adapter_model.safetensors``, and ``RECEIPT_FILE``: the signed privacy
        receipt, whose ``content_hash`` is the SHA-256 of ``adapter_model.safetensors``); returns the folder."""
        result = self._queue.submit(ExportAdapterRequest()).result()
        folder = Path(path)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)  # decrypted weights: the caller's alone
        with tarfile.open(fileobj=io.BytesIO(base64.b64decode(result.archive_b64))) as tar:
            for member in tar.getmembers():
                if not member.isfile() or Path(member.name).name != member.name or member.name == RECEIPT_FILE:
                    raise TrainingClientError(f"unexpected entry {member.name!r} in the adapter archive")
                _write_private(folder / member.name, tar.extractfile(member).read())
        if result.receipt is not None:
            _write_private(folder / RECEIPT_FILE, (json.dumps(result.receipt, indent=2) + "\n").encode())
        self.last_export = result
        return folder

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every operation called so far has reached the trainer (queued or refused); False if ``timeout``
        ran out first."""
        return self._queue.flush(timeout)

    def close(self) -> None:
        """Terminate the trainer session; queued operations are cancelled. On Kubernetes the TrainingClient is
        suspended (a checkpoint, then its pod stops; the resource, its volumes and records stay):
        ``ServiceClient.delete_training_client`` deletes."""
        if self.status is not ClientStatus.TERMINATED:
            self._info = self._service._terminate(self.id)

    terminate = close

    # --- asyncio twins ----------------------------------------------------------------------

    async def forward_backward_async(self, batch: Batch, **loss) -> Future[ForwardBackwardResult]:
        return await asyncio.to_thread(self.forward_backward, batch, **loss)

    async def forward_backward_sampled_async(self) -> Future[ForwardBackwardResult]:
        return await asyncio.to_thread(self.forward_backward_sampled)

    async def forward_async(self, batch: Batch, **loss) -> Future[ForwardResult]:
        return await asyncio.to_thread(self.forward, batch, **loss)

    async def optim_step_async(self, apply_dp_noise: Optional[bool] = None,
                               adam: Optional[AdamStep] = None) -> Future[OptimStepResult]:
        return await asyncio.to_thread(self.optim_step, apply_dp_noise, adam)

    async def save_state_async(self, include_optimizer: bool = True,
                               metadata: Optional[dict] = None) -> SaveStateResult:
        return await asyncio.to_thread(self.save_state, include_optimizer, metadata)

    async def load_state_async(self, artifact_id: str) -> LoadStateResult:
        return await asyncio.to_thread(self.load_state, artifact_id)
