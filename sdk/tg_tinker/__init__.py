"""tg_tinker: the TenSafe SDK. Queue training operations, get futures, train privately."""

from .config import DPConfig, LoRAConfig, OptimizerConfig, TrainingConfig
from .errors import (
    ArtifactIntegrityError,
    ArtifactNotFoundError,
    AuditIntegrityError,
    AuthenticationError,
    ClientFailedError,
    ClientTerminatedError,
    ConnectionError,
    DPBudgetExceededError,
    FutureTimeoutError,
    MalformedRequestError,
    OperationCancelledError,
    OperationLostError,
    PermissionDeniedError,
    ReceiptVerificationError,
    RequestTimeoutError,
    RequestTooLargeError,
    ResourceExhaustedError,
    TGTinkerError,
    TrainingClientError,
    TrainingClientNotFoundError,
    ValidationError,
)
from .futures import Future
from .receipts import verify_receipt
from .sampling_client import SamplingClient
from .service_client import ServiceClient
from .training_client import TrainingClient
from .types import (
    AdamStep,
    ArtifactInfo,
    AuditEntry,
    AuditHead,
    BatchData,
    ClientStatus,
    ComputeLogprobsResult,
    DatasetInfo,
    DPMetrics,
    ForwardBackwardResult,
    ForwardResult,
    LoadStateResult,
    OptimStepResult,
    SampleResult,
    SampleSequence,
    SaveStateResult,
)

__version__ = "0.1.0"

__all__ = [
    "AdamStep", "ArtifactInfo", "ArtifactIntegrityError", "ArtifactNotFoundError", "AuditEntry", "AuditHead",
    "AuditIntegrityError", "AuthenticationError", "PermissionDeniedError", "ReceiptVerificationError",
    "BatchData", "ClientFailedError", "ClientStatus", "ClientTerminatedError", "RequestTimeoutError",
    "RequestTooLargeError",
    "ComputeLogprobsResult", "ConnectionError", "DPBudgetExceededError", "DPConfig",
    "DatasetInfo", "DPMetrics", "ForwardBackwardResult", "ForwardResult", "Future", "FutureTimeoutError",
    "LoRAConfig", "MalformedRequestError",
    "LoadStateResult", "OperationCancelledError", "OperationLostError", "OptimStepResult", "OptimizerConfig",
    "ResourceExhaustedError", "SampleResult", "SampleSequence", "SamplingClient", "SaveStateResult",
    "ServiceClient", "TGTinkerError", "TrainingClient", "TrainingClientError", "TrainingClientNotFoundError",
    "TrainingConfig",
    "ValidationError", "verify_receipt",
]
