"""Running a ``TrainingOperation`` against its client's trainer and recording the outcome in its status.

The operation's uid is the idempotency key: the SDK submits the operations it creates itself (to keep
their place in the client's order) and the operator submits every operation, so whichever comes
second gets the first one's record. Results too large for an object in etcd stay out of the status.
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import Any

import kopf

from tg_tinker.errors import OperationLostError, TGTinkerError, ValidationError
from tg_tinker.resources import TERMINAL_PHASES, operation_request
from tg_tinker.types import OperationRecord

from . import status as status_of
from .builders import child_name
from .kube import Kube
from .reconcile import trainer_transport

log = logging.getLogger("tensafe.operator")
WAIT_PER_PASS_S = 20.0
RETRY_DELAY_S = 1.0


def submit_body(spec: dict, uid: str) -> dict:
    return {"request": operation_request(spec).model_dump(mode="json"), "idempotency_key": uid}


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (result or {}).items() if not k.endswith("_b64")}


def waiting_behind(top: dict, others: list[dict]) -> str | None:
    """The name of an earlier operation of the same client not yet handed to the trainer, if any: those
    go first, so operations applied together (GitOps) run in the order they were created."""
    client = top["spec"]["trainingClientRef"]["name"]
    mine = (top["metadata"].get("creationTimestamp", ""), top["metadata"]["name"])
    for other in others:
        status = other.get("status") or {}
        if other["spec"]["trainingClientRef"]["name"] != client or status.get("operationId") \
                or status.get("phase") in TERMINAL_PHASES:
            continue
        if (other["metadata"].get("creationTimestamp", ""), other["metadata"]["name"]) < mine:
            return other["metadata"]["name"]
    return None


def run(kube: Kube, top: dict, patch: kopf.Patch) -> None:
    meta, spec, current = top["metadata"], top["spec"], top.get("status") or {}
    if current.get("phase") in TERMINAL_PHASES:
        return
    namespace, client = meta["namespace"], spec["trainingClientRef"]["name"]
    if not current.get("operationId") and (earlier := waiting_behind(top, kube.training_operations(namespace))):
        patch.status.update(phase="Pending", message=f"after {earlier}")
        raise kopf.TemporaryError(f"waiting for {earlier}, created before it", delay=1)
    tc = kube.training_client(namespace, client)
    if tc is None:
        raise kopf.TemporaryError(f"TrainingClient {client!r} does not exist (yet)", delay=5)
    pod = kube.pod(namespace, child_name(client))
    if not status_of.pod_ready(pod):
        patch.status.update(phase="Pending", message=f"waiting for the trainer of {client} to be ready")
        raise kopf.TemporaryError(f"trainer of {client} is not ready", delay=5)
    try:
        body = submit_body(spec, meta["uid"])
    except ValidationError as error:
        patch.status.update(phase="Failed", message=str(error), completionTime=status_of.now())
        return
    transport = trainer_transport(kube, tc, pod)
    try:
        record = OperationRecord.parse(transport.request("POST", f"/v1/clients/{client}/operations", json=body))
        if current.get("operationId") not in (None, record.operation_id):
            # The trainer that had it is gone: its outcome is unknown, never reported as success.
            raise OperationLostError(f"operation {current['operationId']} was lost when the trainer restarted")
        if not current.get("operationId"):
            patch.status.update(phase="Running", operationId=record.operation_id, startTime=status_of.now())
        deadline = time.monotonic() + WAIT_PER_PASS_S
        while not record.status.finished and time.monotonic() < deadline:
            record = OperationRecord.parse(transport.request(
                "GET", f"/v1/operations/{record.operation_id}", params={"wait": WAIT_PER_PASS_S},
                timeout=WAIT_PER_PASS_S + 10))
    except TGTinkerError as error:
        patch.status.update(phase="Failed", message=f"{type(error).__name__}: {error}",
                            completionTime=status_of.now())
        return
    if not record.status.finished:
        raise kopf.TemporaryError(f"operation {record.operation_id} is still {record.status.value}",
                                  delay=RETRY_DELAY_S)
    if record.error is not None:
        patch.status.update(phase="Failed", message=f"{record.error.type}: {record.error.message}",
                            completionTime=status_of.now())
    else:
        patch.status.update(phase="Succeeded", result=_summary(record.result), message="",
                            completionTime=status_of.now())
    log.info("TrainingOperation %s/%s: %s", namespace, meta["name"], patch.status.get("phase"))


def collect_finished(kube: Kube, namespace: str | None) -> None:
    """Delete finished operations older than their ``ttlSecondsAfterFinished``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    for top in kube.training_operations(namespace):
        status = top.get("status") or {}
        finished = status.get("completionTime")
        if status.get("phase") not in TERMINAL_PHASES or not finished:
            continue
        ttl = top["spec"].get("ttlSecondsAfterFinished", 86400)
        done = datetime.datetime.strptime(finished, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
        if (now - done).total_seconds() >= ttl:
            kube.delete_operation(top["metadata"]["namespace"], top["metadata"]["name"])


