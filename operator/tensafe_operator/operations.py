"""Running a ``TrainingOperation`` against its client's trainer and recording the outcome in its status.

The operation's uid is the idempotency key: the SDK submits the operations it creates itself (to keep
their place in the client's order) and the operator submits every operation, so whichever comes
second gets the first one's record. Results too large for an object in etcd stay out of the status.

The operator knows the other operations (which go first, which are past their TTL) from kopf's
in-memory index of them (``handlers.training_operations``), fed by its watch: no listing per pass.
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import Any, Iterable

import kopf

from tg_tinker.errors import OperationLostError, TGTinkerError, ValidationError
from tg_tinker.resources import TERMINAL_PHASES, operation_request

from . import status as status_of
from .builders import child_name
from .kube import Kube
from .reconcile import trainer_api

log = logging.getLogger("tensafe.operator")
WAIT_PER_PASS_S = 20.0
RETRY_DELAY_S = 1.0


def index_entry(top: dict) -> dict:
    """What the index keeps of an operation: what ordering and garbage collection need, nothing else."""
    meta, spec, status = top["metadata"], top["spec"], top.get("status") or {}
    return {"metadata": {k: meta.get(k) for k in ("name", "namespace", "creationTimestamp")},
            "spec": {"trainingClientRef": dict(spec["trainingClientRef"]),
                     "ttlSecondsAfterFinished": spec.get("ttlSecondsAfterFinished", 86400)},
            "status": {k: status.get(k) for k in ("operationId", "phase", "completionTime") if status.get(k)}}


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


def run(kube: Kube, top: dict, patch: kopf.Patch, others: Iterable[dict]) -> None:
    """``others``: the index entries of the same client's operations."""
    meta, spec, current = top["metadata"], top["spec"], top.get("status") or {}
    if current.get("phase") in TERMINAL_PHASES:
        return
    namespace, client = meta["namespace"], spec["trainingClientRef"]["name"]
    if not current.get("operationId") and (earlier := waiting_behind(top, list(others))):
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
        request = operation_request(spec)
    except ValidationError as error:
        patch.status.update(phase="Failed", message=str(error), completionTime=status_of.now())
        return
    trainer = trainer_api(kube, tc, pod)
    try:
        record = trainer.submit(client, request, idempotency_key=meta["uid"])
        if current.get("operationId") not in (None, record.operation_id):
            # The trainer that had it is gone: its outcome is unknown, never reported as success.
            raise OperationLostError(f"operation {current['operationId']} was lost when the trainer restarted")
        if not current.get("operationId"):
            patch.status.update(phase="Running", operationId=record.operation_id, startTime=status_of.now())
        deadline = time.monotonic() + WAIT_PER_PASS_S
        while not record.status.finished and time.monotonic() < deadline:
            record = trainer.operation(record.operation_id, wait=WAIT_PER_PASS_S)
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


def collect_finished(kube: Kube, tops: Iterable[dict]) -> None:
    """Delete finished operations (index entries) older than their ``ttlSecondsAfterFinished``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    for top in list(tops):
        status = top.get("status") or {}
        finished = status.get("completionTime")
        if status.get("phase") not in TERMINAL_PHASES or not finished:
            continue
        ttl = top["spec"].get("ttlSecondsAfterFinished", 86400)
        done = datetime.datetime.strptime(finished, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
        if (now - done).total_seconds() >= ttl:
            kube.delete_operation(top["metadata"]["namespace"], top["metadata"]["name"])
