"""The TenSafe error hierarchy, shared by the SDK and the trainer.

The trainer raises these; the wire carries ``{"type": <class name>, "message", "details"}``; the SDK
turns that back into the same class with :func:`error_from_wire`.
"""

from __future__ import annotations

import builtins
from typing import Any


class TGTinkerError(Exception):
    """Base of every TenSafe error. ``details`` holds machine-readable context."""

    #: HTTP status the trainer answers with when this error ends a request.
    http_status = 500

    def __init__(self, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.details = dict(details or {})

    def to_wire(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "message": self.message, "details": self.details}


class ValidationError(TGTinkerError, ValueError):
    """A bad config, batch or request: fix the input and retry."""

    http_status = 422


class MalformedRequestError(ValidationError):
    """A request body that is not a document at all (not JSON, nested too deep, not the protobuf message the
    endpoint takes): 400 on both of the trainer's doors."""

    http_status = 400


class FutureTimeoutError(TGTinkerError, TimeoutError):
    """``future.result(timeout)`` expired; the operation itself goes on."""

    http_status = 408


class OperationCancelledError(TGTinkerError):
    """The operation was cancelled before it started."""

    http_status = 409


class DPBudgetExceededError(TGTinkerError):
    """The step would take total epsilon past ``target_epsilon``; no weight was changed."""

    http_status = 409


class ArtifactNotFoundError(TGTinkerError, KeyError):
    http_status = 404

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.message


class ArtifactIntegrityError(TGTinkerError):
    """Stored bytes failed authentication: tampered, truncated, swapped or under the wrong key."""

    http_status = 422


class AuthenticationError(TGTinkerError):
    http_status = 401


class PermissionDeniedError(AuthenticationError):
    """The token is valid but does not reach this resource (another client's artifact, another tenant)."""

    http_status = 403


class AuditIntegrityError(TGTinkerError):
    """The audit log could not be extended or failed verification: the operation did not complete."""

    http_status = 500


class ReceiptVerificationError(TGTinkerError, ValueError):
    """A privacy receipt does not verify under the given public key: it was changed, or signed by another."""

    http_status = 422


class ConnectionError(TGTinkerError, builtins.ConnectionError):  # noqa: A001 - part of the API
    """The trainer could not be reached after retries."""

    http_status = 503


class TrainingClientError(TGTinkerError):
    """The training client is in ``ERROR`` or an operation failed inside the trainer."""

    http_status = 500


class TrainingClientNotFoundError(TrainingClientError):
    """No client with that id on this trainer."""

    http_status = 404


class ClientFailedError(TrainingClientError):
    """The client is in ``ERROR``: it runs nothing more. Re-create it (``resume_from="latest"``)."""

    http_status = 409


class ClientTerminatedError(TrainingClientError):
    """The client was terminated: it runs nothing more."""

    http_status = 410


class RequestTimeoutError(ValidationError):
    """The request's body did not arrive in time (the trainer does not hold a connection for a trickle)."""

    http_status = 408


class RequestTooLargeError(ValidationError):
    """The request is larger than the trainer accepts from this caller (bytes, rows, tokens, nesting)."""

    http_status = 413


class OperationLostError(TGTinkerError):
    """The trainer no longer knows the operation (it restarted): its outcome is unknown."""

    http_status = 410


class ResourceExhaustedError(TGTinkerError):
    """The trainer's queue is full: back off and resubmit."""

    http_status = 429


_BY_NAME: dict[str, type[TGTinkerError]] = {
    cls.__name__: cls
    for cls in (
        TGTinkerError,
        ValidationError,
        MalformedRequestError,
        FutureTimeoutError,
        OperationCancelledError,
        DPBudgetExceededError,
        ArtifactNotFoundError,
        ArtifactIntegrityError,
        AuthenticationError,
        PermissionDeniedError,
        AuditIntegrityError,
        ReceiptVerificationError,
        ConnectionError,
        TrainingClientError,
        TrainingClientNotFoundError,
        ClientFailedError,
        ClientTerminatedError,
        RequestTooLargeError,
        RequestTimeoutError,
        OperationLostError,
        ResourceExhaustedError,
    )
}


def error_from_wire(payload: dict[str, Any]) -> TGTinkerError:
    """Rebuild the error the trainer reported; unknown types become ``TGTinkerError``."""
    cls = _BY_NAME.get(str(payload.get("type")), TGTinkerError)
    return cls(str(payload.get("message", "unknown error")), payload.get("details") or {})
