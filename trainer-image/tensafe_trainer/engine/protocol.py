"""What the service and an engine process say to each other, typed.

The service starts an engine for one adapter slot (``SlotSpec``: a training client's adapter and optimizer,
or a sampler's weights), hands it operation requests (tg_tinker's wire models, numbered in order) and gets
back one ``Reply`` each, carrying the slot's ``SlotSummary`` after it: what the door checks submissions
against, and what a client's status reports. Everything here crosses a process boundary (pickled).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from tg_tinker.config import TrainingConfig


@dataclass(frozen=True)
class SlotSpec:
    """One slot an engine process builds and serves."""

    client_id: str  # the slot's client (a Tinker model or sampler is a client too)
    tenant_id: str
    kind: Literal["training", "sampling"]
    config: Optional[TrainingConfig] = None  # training: the client's config
    resume_from: Optional[str] = None  # training: a checkpoint id, or "latest"
    artifact_id: Optional[str] = None  # sampling: the weights of this artifact
    base_model: Optional[str] = None  # sampling: else this base model (a built-in name or a folder)
    # sampling an artifact: the config of the client that saved it, if the service knows it (picks the host)
    saved_by: Optional[TrainingConfig] = None

    @classmethod
    def training(cls, client_id: str, tenant_id: str, config: TrainingConfig,
                 resume_from: Optional[str] = None) -> "SlotSpec":
        return cls(client_id, tenant_id, "training", config=config, resume_from=resume_from)

    @classmethod
    def sampling(cls, client_id: str, tenant_id: str, artifact_id: Optional[str] = None,
                 base_model: Optional[str] = None) -> "SlotSpec":
        return cls(client_id, tenant_id, "sampling", artifact_id=artifact_id,
                   base_model=None if artifact_id else base_model)

    @property
    def host_config(self) -> Optional[TrainingConfig]:
        """The config whose model host this slot may share: a training client's own, or for a sampler of an
        artifact, that of the client that saved it; None: a host of its own."""
        return self.config if self.kind == "training" else self.saved_by

    @property
    def private(self) -> bool:
        """Whether the slot trains under DP (its errors and metrics then say nothing unnoised of its data)."""
        return self.kind == "training" and self.config is not None and self.config.dp_enabled


@dataclass(frozen=True)
class SlotSummary:
    step: int = 0
    total_epsilon: Optional[float] = None
    last_checkpoint: Optional[str] = None
    resumed_from: Optional[str] = None
    # What the door checks submissions against (admission.Limits); None until the engine has loaded its model.
    vocab_size: Optional[int] = None
    batch_size: Optional[int] = None
    max_seq_len: Optional[int] = None
    logits_chunk: Optional[int] = None  # positions whose logits exist at once (engine/logits.py); None: all
    activation_bytes_per_token: Optional[int] = None  # what a training pass keeps per token (engine/memory.py)


@dataclass
class Reply:
    seq: int
    summary: SlotSummary
    finished_at: float  # time.time() when the engine was done with it, and free for the next one
    result: Optional[dict] = None
    error: Optional[dict] = None
    produced: list[str] = field(default_factory=list)
    consumed: list[str] = field(default_factory=list)
    dp_metrics: Optional[dict] = None
    receipt_claims: Optional[dict] = None
    withdrawn: bool = False
    shared_pass: bool = False  # it ran in one pass with other slots' operations (engine/passes.py)

    @property
    def ok(self) -> bool:
        return not self.withdrawn and self.error is None
