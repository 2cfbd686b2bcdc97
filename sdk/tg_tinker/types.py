"""Wire types shared by the SDK and the trainer: batches, operation records and results."""

from __future__ import annotations

import json
import math
import re
from enum import Enum
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, Field, PlainSerializer, field_validator, model_validator

from .config import TrainingConfig
from .errors import ValidationError
from .wire import WireModel

TENANT_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # a tenant id: also a folder and a Secret key's name


def check_tenant(tenant_id: str) -> str:
    if not isinstance(tenant_id, str) or not TENANT_PATTERN.fullmatch(tenant_id) or tenant_id in (".", ".."):
        raise ValidationError(f"invalid tenant id {tenant_id!r}", {"field": "tenant_id"})
    return tenant_id


TenantId = Annotated[str, Field(pattern=f"^{TENANT_PATTERN.pattern}$")]

IGNORE_INDEX = -100
MAX_NUM_SAMPLES = 64  # sequences one sample request may ask for


class ClientStatus(str, Enum):
    INITIALIZING = "INITIALIZING"
    READY = "READY"
    BUSY = "BUSY"
    ERROR = "ERROR"
    TERMINATED = "TERMINATED"


class OperationStatus(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (OperationStatus.SUCCEEDED, OperationStatus.FAILED, OperationStatus.CANCELLED)


def _rows(value: Any, name: str, what: str, check_row) -> list[list]:
    """A non-empty list of non-empty rows from lists, numpy arrays or torch tensors; ``check_row(i, row)``
    returns the row as kept, or raises ValueError."""
    if hasattr(value, "tolist") and not isinstance(value, list):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or len(value) == 0:
        raise ValueError(f"{name} must be a non-empty list of rows")
    rows = []
    for i, row in enumerate(value):
        if not isinstance(row, (list, tuple)) or len(row) == 0:
            raise ValueError(f"{name}[{i}] must be a non-empty list of {what}")
        rows.append(check_row(i, row))
    return rows


def _as_int_rows(value: Any, name: str) -> list[list[int]]:
    """Accept lists, numpy arrays and torch tensors; refuse floats, bools and ragged rows."""
    dtype = str(getattr(value, "dtype", "")) if not isinstance(value, list) else ""
    if "float" in dtype or "complex" in dtype or "bool" in dtype:
        raise ValueError(f"{name} must hold integers, got dtype {dtype}")

    def integers(i: int, row) -> list[int]:
        if not set(map(type, row)) <= {int}:  # the common case checked in C: this runs for every batch
            for tok in row:
                if isinstance(tok, bool) or not isinstance(tok, int):
                    raise ValueError(f"{name}[{i}] must hold integers, found {type(tok).__name__} {tok!r}")
        return row if type(row) is list else list(row)

    return _rows(value, name, "integers", integers)


# The per-token float inputs of the losses (the trainer's registry, tensafe_trainer/losses.py).
LOSS_INPUT_NAMES = ("weights", "logprobs", "advantages")


def _as_float_rows(value: Any, name: str) -> list[list[float]]:
    def finite_numbers(i: int, row) -> list[float]:
        if not set(map(type, row)) <= {float, int}:
            raise ValueError(f"{name}[{i}] must hold numbers")
        if not all(math.isfinite(v) for v in row):
            raise ValueError(f"{name}[{i}] must hold finite numbers")
        return [float(v) for v in row]

    return _rows(value, name, "numbers", finite_numbers)


INT64_MAX = (1 << 63) - 1  # token ids and seeds become int64 tensors: larger ones are refused at the door
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]
MAX_METADATA_BYTES = 64 << 10  # a checkpoint's metadata, as JSON
MAX_METADATA_DEPTH = 16
MAX_PACKED_BYTES = 4 << 20  # the SDK packs small operations into one request up to this size


def _check_metadata(value: dict) -> dict:
    def depth(node: Any, level: int) -> None:
        if level > MAX_METADATA_DEPTH:
            raise ValueError(f"metadata nests deeper than {MAX_METADATA_DEPTH} levels")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            depth(child, level + 1)

    depth(value, 1)
    size = len(json.dumps(value, separators=(",", ":"), allow_nan=False))
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {size} bytes as JSON, more than {MAX_METADATA_BYTES}")
    return value


class BatchData(WireModel):
    """One micro-batch. ``labels[b][t]`` is the target for position t (already shifted); -100 ignores it."""

    input_ids: list[list[int]]
    attention_mask: Optional[list[list[int]]] = None
    labels: Optional[list[list[int]]] = None
    # Per-token inputs of the loss (``ForwardBackwardRequest.loss_fn``), each shaped like input_ids.
    loss_inputs: Optional[dict[str, list[list[float]]]] = None

    @field_validator("input_ids", "attention_mask", "labels", mode="before")
    @classmethod
    def _rows(cls, value, info):
        return None if value is None else _as_int_rows(value, info.field_name)

    @field_validator("loss_inputs", mode="before")
    @classmethod
    def _loss_inputs(cls, value):
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError("loss_inputs must map input names to rows of numbers")
        unknown = sorted(set(value) - set(LOSS_INPUT_NAMES))
        if unknown:
            raise ValueError(f"loss_inputs has unknown inputs {unknown}; the losses take {list(LOSS_INPUT_NAMES)}")
        return {k: _as_float_rows(v, f"loss_inputs.{k}") for k, v in value.items()}

    @model_validator(mode="after")
    def _shapes(self):
        widths = {len(r) for r in self.input_ids}
        if len(widths) != 1:
            raise ValueError(f"input_ids is ragged: row lengths {sorted(widths)}; pad to one length")
        shape = (len(self.input_ids), widths.pop())
        named = [(n, getattr(self, n)) for n in ("attention_mask", "labels")]
        named += [(f"loss_inputs.{n}", r) for n, r in (self.loss_inputs or {}).items()]
        for name, rows in named:
            if rows is None:
                continue
            other = (len(rows), len({len(r) for r in rows}) == 1 and len(rows[0]))
            if other != shape:
                raise ValueError(f"{name} shape does not match input_ids {list(shape)}")
        # Over distinct values, gathered in C: these run for every submitted batch.
        if self.attention_mask is not None and not set().union(*self.attention_mask) <= {0, 1}:
            raise ValueError("attention_mask values must be 0 or 1")
        if min(map(min, self.input_ids)) < 0 or max(map(max, self.input_ids)) > INT64_MAX:
            raise ValueError(f"input_ids must be token ids, 0 to {INT64_MAX}")
        if self.labels is not None:
            targets = set().union(*self.labels)
            targets.discard(IGNORE_INDEX)
            if targets and (min(targets) < 0 or max(targets) > INT64_MAX):
                raise ValueError(f"labels must be token ids (0 to {INT64_MAX}) or {IGNORE_INDEX} (ignored)")
        return self

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.input_ids), len(self.input_ids[0])


# --- operation requests -------------------------------------------------------------------------


class LossSpec(WireModel):
    """Which registered loss, its config, and how per-token losses reduce. ``mean``: the mean over the label
    tokens of the logical batch (under DP, each example's mean over its own tokens). ``sum``: the plain sum
    (Tinker's convention; under DP each example's sum, and the noisy sum is not divided)."""

    loss_fn: str = Field("cross_entropy", min_length=1, max_length=64)
    loss_fn_config: Optional[dict[str, float]] = Field(None, max_length=16)
    reduction: Literal["mean", "sum"] = "mean"
    return_logprobs: bool = False


class ForwardBackwardRequest(LossSpec):
    type: Literal["forward_backward"] = "forward_backward"
    batch: BatchData


class ForwardBackwardSampledRequest(WireModel):
    """Draw one logical batch of the client's registered dataset on the server (Poisson, rate
    ``dp_config.sample_rate``) and accumulate its clipped gradients; then ``optim_step``."""

    type: Literal["forward_backward_sampled"] = "forward_backward_sampled"


class ForwardRequest(LossSpec):
    type: Literal["forward"] = "forward"
    batch: BatchData


class AdamStep(WireModel):
    """One step's Adam hyperparameters, overriding the client's optimizer config (the Tinker wire's AdamParams).
    ``grad_clip_norm`` 0: no clipping."""

    learning_rate: float = Field(gt=0, allow_inf_nan=False)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-12, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    grad_clip_norm: float = Field(0.0, ge=0, allow_inf_nan=False)


class OptimStepRequest(WireModel):
    type: Literal["optim_step"] = "optim_step"
    apply_dp_noise: Optional[bool] = None
    adam: Optional[AdamStep] = None


class SaveStateRequest(WireModel):
    type: Literal["save_state"] = "save_state"
    include_optimizer: bool = True
    metadata: Annotated[dict[str, Any], AfterValidator(_check_metadata)] = Field(default_factory=dict)
    kind: Literal["checkpoint", "sampler"] = "checkpoint"
    name: Optional[str] = Field(None, max_length=128)
    # ``name`` and ``metadata`` sealed for the trainer (tg_tinker.sealing), as a TrainingOperation carries them.
    sealed: Optional[str] = Field(None, max_length=1 << 20)

    @model_validator(mode="after")
    def _sealed_alone(self):
        if self.sealed is not None and (self.metadata or self.name is not None):
            raise ValueError("give name and metadata either sealed or in clear, not both")
        return self


class LoadStateRequest(WireModel):
    type: Literal["load_state"] = "load_state"
    artifact_id: str = Field(min_length=1, max_length=128)
    include_optimizer: bool = True  # False: the weights (and step, accounting) only; the optimizer starts afresh


class SampleRequest(WireModel):
    type: Literal["sample"] = "sample"
    prompt: Union[Annotated[str, Field(max_length=1 << 20)], Annotated[list[TokenId], Field(max_length=1 << 20)]]
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=1)
    stop: Optional[list[Union[Annotated[str, Field(max_length=1024)], TokenId]]] = Field(None, max_length=64)
    stop_at_eos: bool = Field(True, description="False: generate past EOS up to max_tokens (Tinker's stop=[])")
    seed: Optional[int] = Field(None, ge=0, le=INT64_MAX)
    num_samples: int = Field(1, ge=1, le=MAX_NUM_SAMPLES)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, list) and (not value or any(isinstance(t, bool) or t < 0 for t in value)):
            raise ValueError("a token prompt must be a non-empty list of non-negative token ids")
        if isinstance(value, str) and not value:
            raise ValueError("prompt must not be empty")
        return value


class ComputeLogprobsRequest(WireModel):
    type: Literal["compute_logprobs"] = "compute_logprobs"
    tokens: list[TokenId] = Field(min_length=1)


class ExportAdapterRequest(WireModel):
    type: Literal["export_adapter"] = "export_adapter"


# --- results ------------------------------------------------------------------------------------


def json_epsilon(value: float):
    """An epsilon as JSON carries it: a number, or "Infinity" (which pydantic reads back as inf), never null: null
    would read as no claim at all."""
    return value if math.isfinite(value) else "Infinity"


Epsilon = Annotated[float, PlainSerializer(json_epsilon, when_used="json")]


class DPMetrics(WireModel):
    """A DP step's privacy figures. ``total_epsilon`` is the one the trainer certifies: an upper bound for the privacy
    unit (``group_size`` consecutive examples, one by default) over every step on the data, at the sampling rate the
    server can vouch for. ``epsilon_asserted`` is only a client's claim of uniform sampling (sampling "asserted")."""

    total_epsilon: Epsilon
    epsilon_q1: Optional[Epsilon] = None  # the same steps without amplification by subsampling (q = 1)
    epsilon_spent: Epsilon
    delta: float
    noise_applied: bool
    noise_multiplier: float
    grad_norm_before_clip: float
    grad_norm_after_clip: float
    num_clipped: int
    num_examples: int
    sample_rate: float
    sampling_assumption: str
    accountant_type: str
    sampling: Literal["poisson", "asserted", "none"]
    expected_batch_size: float  # the fixed public denominator of the noisy sum
    group_size: int = 1  # examples per privacy unit, clipped together
    epsilon_asserted: Optional[Epsilon] = None  # "asserted" only: the client's claim, not a bound
    asserted_sample_rate: Optional[float] = None


class ForwardBackwardResult(WireModel):
    loss: float  # per label token
    grad_norm: float
    tokens_processed: int
    num_examples: int
    loss_sum: Optional[float] = None  # the sum of the per-token losses
    logprobs: Optional[list[list[Optional[float]]]] = None  # with return_logprobs; None where the label is ignored


class ForwardResult(WireModel):
    loss: float
    tokens_processed: int
    logprobs: list[list[Optional[float]]]  # None where the label is ignored
    loss_sum: Optional[float] = None


class OptimStepResult(WireModel):
    step: int
    learning_rate: float
    dp_metrics: Optional[DPMetrics] = None


class AuditHead(WireModel):
    """The last entry of a tenant's audit chain, published outside the log so a truncated tail is caught:
    ``tensafe audit verify --expect-head <text>``. ``sequence`` -1: the chain is empty."""

    tenant_id: str
    sequence: int
    record_hash: str

    @property
    def text(self) -> str:
        return f"{self.sequence}:{self.record_hash}"


class EncryptionInfo(WireModel):
    algorithm: str
    key_id: str
    tenant_id: str


class SaveStateResult(WireModel):
    """The trainer never echoes ``metadata`` and ``name`` (they are sealed in the artifact); the SDK fills
    them in from the call."""

    artifact_id: str
    size_bytes: int
    content_hash: str
    encryption: EncryptionInfo
    step: int
    metadata: dict[str, Any] = Field(default_factory=dict)
    kind: str = "checkpoint"
    name: Optional[str] = None
    receipt: Optional[dict[str, str]] = None  # signed privacy receipt (tg_tinker.receipts)
    audit_head: Optional[AuditHead] = None


class LoadStateResult(WireModel):
    artifact_id: str
    step: int
    status: str
    total_epsilon: Optional[Epsilon] = None


class SampleSequence(WireModel):
    tokens: list[int]
    text: Optional[str] = None
    logprobs: list[float]
    stop_reason: Literal["length", "stop", "eos"]


class SampleResult(WireModel):
    sequences: list[SampleSequence]
    prompt_tokens: list[int]

    @property
    def text(self) -> Optional[str]:
        return self.sequences[0].text

    @property
    def tokens(self) -> list[int]:
        return self.sequences[0].tokens


class ComputeLogprobsResult(WireModel):
    logprobs: list[Optional[float]]


class ExportAdapterResult(WireModel):
    archive_b64: str  # tar of the PEFT adapter folder (adapter_config.json, adapter_model.safetensors)
    files: list[str]
    step: int
    receipt: Optional[dict[str, str]] = None  # content_hash: SHA-256 of adapter_model.safetensors
    audit_head: Optional[AuditHead] = None


class ErrorInfo(WireModel):
    type: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class OperationRecord(WireModel):
    operation_id: str
    client_id: str
    type: str
    status: OperationStatus
    created_at: float
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    result: Optional[dict[str, Any]] = None
    error: Optional[ErrorInfo] = None


MAX_WAIT_S = 60.0  # the longest a long-poll is held open
MAX_WAITED_OPERATIONS = 256
MAX_SUBMISSIONS = 256  # operations in one batched submission


class SubmittedOperations(WireModel):
    """``records[i]`` answers ``submissions[i]``. ``error``, when set, is why ``submissions[len(records)]``
    was refused; the submissions after it were not looked at."""

    records: list[OperationRecord]
    error: Optional[ErrorInfo] = None


class WaitForOperations(WireModel):
    """Long-poll the first operation; the answer carries its record and those of the other listed ones that
    have finished, so one round trip settles every future that finished meanwhile."""

    operation_ids: list[str] = Field(min_length=1, max_length=MAX_WAITED_OPERATIONS)
    wait: float = Field(0.0, ge=0.0, le=MAX_WAIT_S)


class CreateTrainingClient(WireModel):
    config: TrainingConfig
    client_id: Optional[str] = Field(None, pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    tenant_id: TenantId = "default"
    resume_from: Optional[str] = Field(
        None, pattern=r"^(latest|art-[0-9a-f]{32})$",
        description="a checkpoint to load at start, or 'latest': this client id's newest checkpoint, if any")


class CreateSamplingClient(WireModel):
    training_client_id: Optional[str] = None
    artifact_id: Optional[str] = None
    model_path: Optional[str] = None
    base_model: Optional[str] = None
    tenant_id: TenantId = "default"

    @model_validator(mode="after")
    def _one_source(self):
        given = [n for n in ("training_client_id", "artifact_id", "model_path") if getattr(self, n)]
        if len(given) > 1:
            raise ValueError(f"give one weight source, not {given}")
        if not given and not self.base_model:
            raise ValueError("give a training client, an artifact_id, a model_path or a base_model")
        return self


class ClientInfo(WireModel):
    client_id: str
    kind: Literal["training", "sampling"]
    status: ClientStatus
    step: int
    tenant_id: str
    config: Optional[TrainingConfig] = None
    total_epsilon: Optional[Epsilon] = None
    last_checkpoint: Optional[str] = None
    error: Optional[str] = None
    error_type: Optional[str] = None
    queue_depth: int = 0
    audit_head: Optional[AuditHead] = None  # the tenant's audit chain head after this client's last entry
    # Only in the response that creates a client: a bearer token for this client alone.
    access_token: Optional[str] = Field(None, repr=False)


class ArtifactInfo(WireModel):
    artifact_id: str
    tenant_id: str
    training_client_id: str
    kind: str
    size_bytes: int
    content_hash: str
    created_at: float
    step: int
    key_id: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    name: Optional[str] = None


class GrantArtifact(WireModel):
    """Let one training client's token load, sample and pull an artifact of another client of its tenant
    (given with the trainer's own token; audited; it ends with the grantee client)."""

    training_client_id: str = Field(min_length=1, max_length=128)
    tenant_id: TenantId = "default"


class DatasetExample(WireModel):
    """One example of a registered dataset: a row as in ``BatchData`` (validated the same way)."""

    input_ids: list[int] = Field(min_length=1)
    attention_mask: Optional[list[int]] = None
    labels: Optional[list[int]] = None

    @model_validator(mode="after")
    def _as_batch(self):
        BatchData(input_ids=[self.input_ids], attention_mask=None if self.attention_mask is None else
                  [self.attention_mask], labels=None if self.labels is None else [self.labels])
        return self


DATASET_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class RegisterDataset(WireModel):
    examples: list[DatasetExample] = Field(min_length=1)
    dataset_id: Optional[str] = Field(None, pattern=DATASET_ID_PATTERN)
    tenant_id: TenantId = "default"


class DatasetInfo(WireModel):
    dataset_id: str
    num_examples: int
    content_hash: str  # SHA-256 of the stored (encrypted) artifact
    artifact_id: str
    tenant_id: str
    size_bytes: int
    created_at: float


class AuditEntry(WireModel):
    entry_id: str
    sequence: int
    timestamp: float
    operation: str
    training_client_id: Optional[str]
    tenant_id: Optional[str]
    request_hash: str
    success: bool
    artifact_ids_produced: list[str] = Field(default_factory=list)
    artifact_ids_consumed: list[str] = Field(default_factory=list)
    dp_metrics: Optional[dict[str, Any]] = None
    error: Optional[str] = None
    prev_hash: str
    record_hash: str
    # The tenant's secrets generation whose chain key MACs this record (absent: the first, in logs written
    # before generations), and, on a ``rotate_keys`` record (the last of its generation's segment), the next.
    key_id: Optional[str] = None
    next_key_id: Optional[str] = None
