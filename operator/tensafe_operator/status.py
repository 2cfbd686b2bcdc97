"""Pure functions from what the operator observes (the trainer pod, the trainer's own report) to the
``TrainingClient`` status, and from the current status to the smallest patch that brings it there."""

from __future__ import annotations

import datetime
import math
from typing import Any, Optional

from tg_tinker.types import ClientInfo, ClientStatus

from .builders import child_name, service_endpoint


# A trainer that dies this soon after starting, this many times in a row, is not replaced again.
QUICK_FAILURE_S = 120
MAX_QUICK_FAILURES = 5


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _time(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)


def failure_streak(current: dict, pod: dict) -> int:
    """Quick failures in a row, counting this finished pod: one that ran a while starts the count anew."""
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        ended = (container.get("state") or {}).get("terminated") or {}
        if ended.get("startedAt") and ended.get("finishedAt"):
            ran = (_time(ended["finishedAt"]) - _time(ended["startedAt"])).total_seconds()
            if ran >= QUICK_FAILURE_S:
                return 1
    return current.get("failureStreak", 0) + 1


def crash_looping(current: dict) -> bool:
    return current.get("failureStreak", 0) >= MAX_QUICK_FAILURES


def pod_ready(pod: Optional[dict]) -> bool:
    conditions = ((pod or {}).get("status") or {}).get("conditions") or []
    return (pod or {}).get("status", {}).get("phase") == "Running" and \
        any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def pod_finished(pod: Optional[dict]) -> bool:
    return ((pod or {}).get("status") or {}).get("phase") in ("Failed", "Succeeded")


def pod_problem(pod: dict) -> tuple[str, str]:
    """(reason, message) of a pod that is not running, from its scheduling or its container state."""
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return condition.get("reason", "Unschedulable"), condition.get("message", "")
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        state = container.get("state") or {}
        if "waiting" in state:
            return state["waiting"].get("reason", "Waiting"), state["waiting"].get("message", "")
        if "terminated" in state:
            code = state["terminated"].get("exitCode")
            return "TrainerExited", f"trainer container exited with code {code}"
    return "PodPending", "waiting for the trainer pod to be scheduled"


def refused(tc: dict) -> bool:
    """The operator refused this generation of the spec (``status.refusal``, written by reconcile.record_refusal)."""
    refusal = (tc.get("status") or {}).get("refusal")
    return bool(refusal) and refusal.get("generation") == tc["metadata"].get("generation", 1)


def desired_status(tc: dict, pod: Optional[dict], trainer: Optional[ClientInfo]) -> dict[str, Any]:
    """What the status should say now; fields the operator cannot observe keep their current values."""
    current = tc.get("status") or {}
    spec = tc["spec"]
    status: dict[str, Any] = {"observedGeneration": tc["metadata"].get("generation", 1),
                              "podName": child_name(tc["metadata"]["name"]), "endpoint": service_endpoint(tc)}
    if refused(tc):  # the spec names what is not its tenant's, or an image not allowed (reconcile.refusal)
        phase, reason, message = ClientStatus.ERROR, current["refusal"]["reason"], current["refusal"]["message"]
    elif spec.get("suspend"):
        phase, reason, message = ClientStatus.TERMINATED, "Suspended", "spec.suspend is true; the trainer is stopped"
    elif pod is None:
        phase, reason, message = ClientStatus.INITIALIZING, "PodCreating", "creating the trainer pod"
    elif pod_finished(pod) and crash_looping(current):
        phase, reason = ClientStatus.ERROR, "CrashLoop"
        message = (f"the trainer died within {QUICK_FAILURE_S}s of starting {current['failureStreak']} times in a "
                   f"row ({pod_problem(pod)[1]}); the pod is kept for `kubectl logs`; fix the spec, or delete "
                   "the pod to try again")
    elif pod_finished(pod):
        phase = ClientStatus.INITIALIZING
        reason, message = pod_problem(pod)
        message += "; the pod is replaced and resumes from the last checkpoint"
    elif not pod_ready(pod):
        phase = ClientStatus.INITIALIZING
        reason, message = pod_problem(pod) if pod.get("status", {}).get("phase") == "Pending" else \
            ("TrainerStarting", "the trainer is loading the model")
    elif trainer is None:
        phase, reason, message = ClientStatus.INITIALIZING, "TrainerStarting", "waiting for the trainer's report"
    else:
        phase = trainer.status
        reason, message = ("TrainerError", trainer.error or "the trainer failed") if phase is ClientStatus.ERROR \
            else ("TrainerReady", f"serving at {status['endpoint']}")
    if trainer is not None:
        if trainer.status in (ClientStatus.READY, ClientStatus.BUSY):
            status["failureStreak"] = 0
        status["step"] = trainer.step
        if trainer.total_epsilon is not None:
            status["privacy"] = ({"totalEpsilon": trainer.total_epsilon} if math.isfinite(trainer.total_epsilon)
                                 else {"unbounded": True})
        if trainer.last_checkpoint:
            status["lastCheckpoint"] = trainer.last_checkpoint
        if trainer.audit_head is not None:
            status["auditHead"] = {"sequence": trainer.audit_head.sequence,
                                   "recordHash": trainer.audit_head.record_hash}
    status["phase"] = phase.value
    status["reason"], status["message"] = reason, message  # `kubectl get tc` shows the reason beside the phase
    failed, suspended = phase is ClientStatus.ERROR, bool(spec.get("suspend"))
    status["conditions"] = _conditions(current.get("conditions") or [], status["observedGeneration"], {
        "Ready": (phase in (ClientStatus.READY, ClientStatus.BUSY), reason, message),
        "Failed": (failed, reason, message) if failed else (False, "NoFailure", ""),
        "Suspended": (suspended, reason, message) if suspended else (False, "NotSuspended", "")})
    return status


# Reasons that say all is going as it should; any other (Unschedulable, CrashLoop, TrainerError, an image
# that does not pull, ...) is reported as a Warning event.
NORMAL_REASONS = frozenset({"PodCreating", "PodPending", "TrainerStarting", "TrainerReady", "Suspended"})


def event_for(current: dict, desired: dict) -> Optional[tuple[str, str, str]]:
    """(type, reason, message) of the Event to record when the status's reason changes; else None."""
    reason = desired.get("reason")
    if reason is None or reason == current.get("reason"):
        return None
    return ("Normal" if reason in NORMAL_REASONS else "Warning"), reason, desired.get("message", "")


def _conditions(current: list[dict], generation: int, wanted: dict[str, tuple[bool, str, str]]) -> list[dict]:
    """Conditions keep ``lastTransitionTime`` unless their status flips."""
    by_type = {c["type"]: c for c in current}
    result = []
    for kind, (true, reason, message) in wanted.items():
        value = "True" if true else "False"
        old = by_type.get(kind) or {}
        since = old.get("lastTransitionTime") if old.get("status") == value else now()
        result.append({"type": kind, "status": value, "reason": reason, "message": message,
                       "lastTransitionTime": since, "observedGeneration": generation})
    return result


def status_patch(current: dict, desired: dict) -> Optional[dict]:
    """The fields of ``desired`` that differ from ``current``; None when nothing changed (no write)."""
    changed = {key: value for key, value in desired.items() if current.get(key) != value}
    return changed or None
