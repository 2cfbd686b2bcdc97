"""A trainer's REST API, typed: the one place that spells out the paths the SDK's clients and the
operator both use to talk to a trainer (a client's state, submitting an operation, waiting on one)."""

from __future__ import annotations

from typing import Any, Optional

from .transport import Transport
from .operations import SubmitOperation
from .types import ClientInfo, OperationRecord


class TrainerAPI:
    def __init__(self, transport: Transport):
        self.transport = transport

    def client(self, client_id: str) -> ClientInfo:
        return ClientInfo.parse(self.transport.request("GET", f"/v1/clients/{client_id}"))

    def terminate(self, client_id: str) -> ClientInfo:
        return ClientInfo.parse(self.transport.request("DELETE", f"/v1/clients/{client_id}"))

    def submit(self, client_id: str, request: Any, idempotency_key: Optional[str] = None) -> OperationRecord:
        """Queue one operation (a retry with the same ``idempotency_key`` gets the first one's record)."""
        body = SubmitOperation(request=request, idempotency_key=idempotency_key)
        return OperationRecord.parse(self.transport.request(
            "POST", f"/v1/clients/{client_id}/operations", json=body.model_dump(mode="json", exclude_none=True)))

    def operation(self, operation_id: str, wait: float = 0.0) -> OperationRecord:
        """The operation's record, long-polling up to ``wait`` seconds for it to finish."""
        return OperationRecord.parse(self.transport.request(
            "GET", f"/v1/operations/{operation_id}", params={"wait": wait}, timeout=wait + 10.0))
