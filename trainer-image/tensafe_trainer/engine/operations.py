"""What each operation does, given a client's runtime (engine, sampler, artifact store)."""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tg_tinker.config import TrainingConfig
from tg_tinker.errors import ValidationError
from tg_tinker.operations import OPERATIONS, TRAINING_ONLY
from tg_tinker.sealing import unseal
from tg_tinker.types import (
    ComputeLogprobsRequest,
    EncryptionInfo,
    ExportAdapterRequest,
    ExportAdapterResult,
    ForwardBackwardRequest,
    ForwardBackwardSampledRequest,
    ForwardRequest,
    LoadStateRequest,
    LoadStateResult,
    OptimStepRequest,
    SampleRequest,
    SaveStateRequest,
    SaveStateResult,
    WireModel,
)

from tensafe_trainer.storage.artifacts import ArtifactStore
from tensafe_trainer.storage.crypto import ALGORITHM
from tensafe_trainer.privacy.datasets import find_dataset, load_examples
from tensafe_trainer.engine.adapter import AdapterSlot, deserialize_state, write_state
from tensafe_trainer.engine.host import HOST_MISMATCH, ModelHost, shares_host
from tensafe_trainer.privacy.ledger import open_ledger
from tensafe_trainer.engine.sampling import Sampler


@dataclass
class Outcome:
    result: WireModel
    produced: list[str] = field(default_factory=list)
    consumed: list[str] = field(default_factory=list)
    receipt_claims: Optional[dict] = None  # signed by the session once the operation's audit entry is written


@dataclass
class Runtime:
    """Everything one client's operations act on. Used only from that client's worker thread."""

    client_id: str
    tenant_id: str
    kind: str  # "training" or "sampling"
    engine: AdapterSlot
    store: ArtifactStore
    last_checkpoint: Optional[str] = None
    resumed_from: Optional[str] = None

    def __post_init__(self):
        e = self.engine
        self.sampler = Sampler(e.model, e.tokenizer, e.vocab_size, e.eos_token_id, e.device, e.config.max_seq_len,
                               e.logits_chunk)

    @classmethod
    def for_training(cls, client_id: str, tenant_id: str, config: TrainingConfig, store: ArtifactStore,
                     ledger_root: Path, host: Optional[ModelHost] = None) -> "Runtime":
        """``host``: the model host the client's slot goes on (default: a host of its own)."""
        ledger = dataset = find = None
        if config.dp_enabled:
            dataset_id = config.dp_config.dataset_id
            ledger = open_ledger(ledger_root, tenant_id, config.dp_config, store.keys)
            if dataset_id:
                find = functools.partial(load_examples, store, tenant_id, dataset_id)
                dataset = find()
        engine = AdapterSlot(config, host=host, ledger=ledger, dataset=dataset, client_id=client_id,
                             find_dataset=find)
        return cls(client_id, tenant_id, "training", engine, store)

    @classmethod
    def for_sampling(cls, client_id: str, tenant_id: str, store: ArtifactStore, *, artifact_id: Optional[str] = None,
                     base_model: Optional[str] = None, host: Optional[ModelHost] = None) -> "Runtime":
        """``host``: the host of the client that saved the artifact, which its adapter joins if it fits there;
        other weights, and a base model alone, get a host of their own."""
        if artifact_id is None:
            config = TrainingConfig(model_ref=base_model, lora_config=None)
            return cls(client_id, tenant_id, "sampling", AdapterSlot(config), store)
        state = deserialize_state(store.get(tenant_id, artifact_id))
        config = TrainingConfig.parse(state["config"]).model_copy(update={"dp_config": None})
        if base_model and base_model != config.model_ref:
            raise ValidationError(f"artifact {artifact_id} was trained on {config.model_ref!r}, not {base_model!r}",
                                  {"field": "base_model"})
        if host is not None and not (host.fits(config) and shares_host(config)):
            # Its saver's config, by which the pool chose this host, was not the one these weights were saved under
            # (that client id has been taken by another since): another model must not load beside the host's.
            raise ValidationError("these weights do not fit this model host", {HOST_MISMATCH: True})
        engine = AdapterSlot(config, host=host)
        engine.load_weights(state)
        return cls(client_id, tenant_id, "sampling", engine, store)

    def execute(self, request: Any) -> Outcome:
        kind = request.type
        if self.kind == "sampling" and kind in TRAINING_ONLY:
            raise ValidationError(f"{kind} is not available on a sampling client", {"operation": kind})
        handler = HANDLERS.get(kind)
        if handler is None:
            raise ValidationError(f"unknown operation {kind!r}")
        self.engine.activate()  # its host may have run another slot's adapter last
        with self.engine.own_randomness():
            return handler(self, request)

    def close(self) -> None:
        self.engine.close()

    def _forward_backward(self, req: ForwardBackwardRequest) -> Outcome:
        return Outcome(self.engine.forward_backward(req.batch, req))

    def _forward_backward_sampled(self, req: ForwardBackwardSampledRequest) -> Outcome:
        return Outcome(self.engine.forward_backward_sampled())

    def _forward(self, req: ForwardRequest) -> Outcome:
        return Outcome(self.engine.forward(req.batch, req))

    def _optim_step(self, req: OptimStepRequest) -> Outcome:
        return Outcome(self.engine.optim_step(req.apply_dp_noise, req.adam))

    def _sample(self, req: SampleRequest) -> Outcome:
        return Outcome(self.sampler.sample(req))

    def _compute_logprobs(self, req: ComputeLogprobsRequest) -> Outcome:
        return Outcome(self.sampler.compute_logprobs(req.tokens))

    def _save(self, req: SaveStateRequest) -> Outcome:
        if req.sealed is not None:
            opened = unseal(self.store.keys.sealing_key(self.tenant_id), self.client_id, req.sealed)
            req = SaveStateRequest(include_optimizer=req.include_optimizer, kind=req.kind,
                                   metadata=opened.get("metadata") or {}, name=opened.get("name"))
        include_optimizer = req.include_optimizer and req.kind == "checkpoint"
        state = self.engine.state_dict(include_optimizer=include_optimizer)
        state["metadata"] = req.metadata
        info = self.store.put(lambda out: write_state(state, out), tenant_id=self.tenant_id,
                              training_client_id=self.client_id, kind=req.kind, step=self.engine.step, name=req.name,
                              metadata=req.metadata)
        if req.kind == "checkpoint":
            self.last_checkpoint = info.artifact_id
        # Name and metadata are the caller's own: not echoed, so no result, status or log holds them in clear.
        result = SaveStateResult(
            artifact_id=info.artifact_id, size_bytes=info.size_bytes, content_hash=info.content_hash,
            encryption=EncryptionInfo(algorithm=ALGORITHM, key_id=info.key_id, tenant_id=self.tenant_id),
            step=info.step, kind=req.kind,
        )
        claims = self._claims(req.kind, info.content_hash, artifact_id=info.artifact_id)
        return Outcome(result, produced=[info.artifact_id], receipt_claims=claims)

    def _claims(self, kind: str, content_hash: str, artifact_id: Optional[str] = None, **extra) -> dict:
        """What a receipt for these weights states (the session adds the audit head and signs)."""
        privacy = self.engine.privacy_claims()
        if privacy.get("dataset_id"):
            dataset = find_dataset(self.store, self.tenant_id, privacy["dataset_id"])
            privacy["dataset_hash"] = dataset.content_hash if dataset is not None else None
        return {"artifact_id": artifact_id, "artifact_kind": kind, "content_hash": content_hash,
                "base_model": self.engine.public_model_name, "tenant": self.tenant_id,
                "training_client": self.client_id, "step": self.engine.step, **privacy, **extra}

    def _export(self, req: ExportAdapterRequest) -> Outcome:
        """The adapter built in memory (never a plaintext file on the trainer's disk)."""
        files = self.engine.adapter_files()
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name, data in sorted(files.items()):
                member = tarfile.TarInfo(name)
                member.size, member.mode = len(data), 0o600
                tar.addfile(member, io.BytesIO(data))
        result = ExportAdapterResult(archive_b64=base64.b64encode(buffer.getvalue()).decode(), files=sorted(files),
                                     step=self.engine.step)
        weights_hash = hashlib.sha256(files["adapter_model.safetensors"]).hexdigest()
        config_hash = hashlib.sha256(files["adapter_config.json"]).hexdigest()
        return Outcome(result, receipt_claims=self._claims("adapter_export", weights_hash,
                                                           adapter_config_hash=config_hash))

    def resume(self, artifact_id: str) -> None:
        """Load a checkpoint at start: an id, or 'latest' (this client's newest checkpoint, if it has one: see
        ``latest_checkpoint``)."""
        if artifact_id == "latest":
            artifact_id = self.latest_checkpoint()
            if artifact_id is None:
                return  # a first start: nothing to resume
        self._load(LoadStateRequest(artifact_id=artifact_id))
        self.last_checkpoint = self.resumed_from = artifact_id

    def latest_checkpoint(self) -> Optional[str]:
        """This client's newest checkpoint, as the tenant's audit chain records it, not as the folder lists it.

        The chain (verified whole under the tenant's key set) names the artifacts each of this client's successful
        saves produced and the artifacts deleted since (``delete_artifact`` entries). Walking those saves from the
        newest: the first that is a checkpoint is the answer; a sampler save is passed over; one whose file is
        missing or unreadable is an ArtifactIntegrityError, never a silent step back to an older checkpoint (its
        kind cannot be told without it). Checkpoint files the chain does not record (a save whose entry was never
        written, so whose outcome was never published; or a planted file) are not resumed from. Without an audit
        log (a Runtime used outside a trainer, or a log never written) the listing decides, as before; a trainer
        whose log was deleted is caught against a published head, not here."""
        from tg_tinker.errors import ArtifactIntegrityError, ArtifactNotFoundError

        from tensafe_trainer.storage.audit import AuditTrail

        listed = {a.artifact_id: a for a in self.store.list(self.tenant_id, self.client_id)}
        records = AuditTrail(self.store.root.parent / "audit", self.store.keys).records(self.tenant_id)
        if not records:
            checkpoints = [a for a in listed.values() if a.kind == "checkpoint"]
            return checkpoints[-1].artifact_id if checkpoints else None
        deleted: set[str] = set()
        saves: list[tuple[int, str]] = []  # newest first
        for record in reversed(records):
            if not record.get("success"):
                continue
            if record.get("operation") == "delete_artifact":
                deleted.update(record.get("artifact_ids_consumed") or ())
            elif record.get("operation") == "save_state" and record.get("training_client_id") == self.client_id:
                saves.extend((record["sequence"], a) for a in record.get("artifact_ids_produced") or ()
                             if a not in deleted)
        for sequence, artifact_id in saves:
            info = listed.get(artifact_id)
            if info is None:
                try:
                    info = self.store.info(self.tenant_id, artifact_id)
                except (ArtifactNotFoundError, ArtifactIntegrityError) as exc:
                    raise ArtifactIntegrityError(
                        f"artifact {artifact_id}, the newest save of client {self.client_id!r} (audit sequence "
                        f"{sequence}), is {'missing' if isinstance(exc, ArtifactNotFoundError) else 'unreadable'}: "
                        "refusing to resume 'latest' from an older checkpoint, which would silently roll the client "
                        "back. Restore the file, or resume from an explicit artifact id if a rollback is meant",
                        {"artifact_id": artifact_id, "training_client_id": self.client_id,
                         "audit_sequence": sequence}) from None
            if info.kind == "checkpoint":
                return artifact_id
        return None

    def _load(self, req: LoadStateRequest) -> Outcome:
        state = deserialize_state(self.store.get(self.tenant_id, req.artifact_id))
        if not req.include_optimizer:
            state["optimizer"] = None
        self.engine.load_state_dict(state)
        result = LoadStateResult(artifact_id=req.artifact_id, step=self.engine.step, status="loaded",
                                 total_epsilon=self.engine.total_epsilon)
        return Outcome(result, consumed=[req.artifact_id])


# What runs each operation of the table (tg_tinker.operations): every one, and nothing else.
HANDLERS = {
    "forward_backward": Runtime._forward_backward,
    "forward_backward_sampled": Runtime._forward_backward_sampled,
    "forward": Runtime._forward,
    "optim_step": Runtime._optim_step,
    "save_state": Runtime._save,
    "load_state": Runtime._load,
    "sample": Runtime._sample,
    "compute_logprobs": Runtime._compute_logprobs,
    "export_adapter": Runtime._export,
}
assert HANDLERS.keys() == OPERATIONS.keys(), set(HANDLERS) ^ set(OPERATIONS)
