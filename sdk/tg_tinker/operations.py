"""Every operation a client can queue, declared once.

Each entry names the operation's request and result types and what the rest of the system needs to know
of it: whether only a training client runs it, whether it adds to or applies the logical batch's
gradients (so a failure discards them), and whether it may be a durable ``TrainingOperation`` resource on
Kubernetes. The wire's request union, the SDK's result parsing, the Kubernetes resources, the trainer's
door checks, its engine dispatcher and its audit trail all read this table (and the trainer checks at import that
it handles every entry; the audit trail writes no event named elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from pydantic import Field

from .types import (
    MAX_SUBMISSIONS,
    ComputeLogprobsRequest,
    ComputeLogprobsResult,
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
    SampleRequest,
    SampleResult,
    SaveStateRequest,
    SaveStateResult,
    WireModel,
)


@dataclass(frozen=True)
class OperationKind:
    name: str
    request: type[WireModel]
    result: type[WireModel]
    training_only: bool = False  # refused on a sampling client
    accumulates: bool = False  # adds to or applies the logical batch's gradients: a failure discards them
    durable: bool = False  # may be a TrainingOperation resource on Kubernetes (resources.py)


OPERATIONS: dict[str, OperationKind] = {kind.name: kind for kind in (
    OperationKind("forward_backward", ForwardBackwardRequest, ForwardBackwardResult, training_only=True,
                  accumulates=True),
    OperationKind("forward_backward_sampled", ForwardBackwardSampledRequest, ForwardBackwardResult,
                  training_only=True, accumulates=True),
    OperationKind("forward", ForwardRequest, ForwardResult),
    OperationKind("optim_step", OptimStepRequest, OptimStepResult, training_only=True, accumulates=True),
    OperationKind("save_state", SaveStateRequest, SaveStateResult, training_only=True, durable=True),
    OperationKind("load_state", LoadStateRequest, LoadStateResult, training_only=True, durable=True),
    OperationKind("sample", SampleRequest, SampleResult),
    OperationKind("compute_logprobs", ComputeLogprobsRequest, ComputeLogprobsResult),
    OperationKind("export_adapter", ExportAdapterRequest, ExportAdapterResult),
)}
for _name, _kind in OPERATIONS.items():  # the request's ``type`` literal is the table's name
    assert _kind.request.model_fields["type"].default == _name, _name

# What the audit trail records beside the operations above: the service's own events, each with what it records.
SERVICE_EVENTS: dict[str, str] = {
    "resume": "a training client started from a checkpoint (the artifact consumed)",
    "create_sampling_client": "a sampling client started from saved weights (the artifact consumed)",
    "grant_artifact": "the trainer let a client load an artifact it did not make",
    "delete_artifact": "a Tinker checkpoint deleted (by the client, an overwrite or its TTL)",
    "register_dataset": "an encrypted dataset registered (the artifact produced)",
    "delete_dataset": "a dataset deleted",
    "tinker_key_refused": "an entry of the Tinker key file that does not verify (or was revoked)",
    "rotate_keys": "the last record of a secrets generation's segment (a key rotation)",
}
AUDITED = frozenset(OPERATIONS) | frozenset(SERVICE_EVENTS)  # every name an audit entry's ``operation`` may hold

RESULT_TYPES: dict[str, type[WireModel]] = {name: kind.result for name, kind in OPERATIONS.items()}
TRAINING_ONLY = frozenset(name for name, kind in OPERATIONS.items() if kind.training_only)
ACCUMULATING = frozenset(name for name, kind in OPERATIONS.items() if kind.accumulates)
OperationRequest = Union[tuple(kind.request for kind in OPERATIONS.values())]  # type: ignore[valid-type]


class SubmitOperation(WireModel):
    request: OperationRequest = Field(discriminator="type")
    idempotency_key: Optional[str] = Field(None, min_length=1, max_length=128)


class SubmitOperations(WireModel):
    """Several operations of one client in one request, queued in list order. The trainer stops at the first
    one it refuses: those after it were meant to run after it, so they are not queued either."""

    submissions: list[SubmitOperation] = Field(min_length=1, max_length=MAX_SUBMISSIONS)
