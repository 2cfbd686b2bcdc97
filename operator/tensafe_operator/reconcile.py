"""Level-triggered reconciliation of one ``TrainingClient``: children exist, a dead trainer is replaced,
the status says what is true. Every step is idempotent, so handlers may call it at any time."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from typing import Optional

from kubernetes.client.exceptions import ApiException
from tg_tinker.keys import new_tinker_key
from tg_tinker.keys_kubernetes import KubernetesSecretKeyProvider
from tg_tinker.errors import TGTinkerError
from tg_tinker.resources import TRAINING_CLIENTS, tinker_enabled, tinker_key_key, token_key, trainer_access
from tg_tinker.trainer_api import TrainerAPI
from tg_tinker.types import SaveStateRequest

from . import status as status_of
from .builders import (TrainerDefaults, build_claim, build_event, build_ledger_role, build_ledger_role_binding,
                       build_pod, build_privacy_budget, build_service, build_service_account, child_name, dp_config_of,
                       key_secret_name, owner_reference, tenant_of)
from .connections import TrainerConnections
from .kube import Kube

log = logging.getLogger("tensafe.operator")
DEFAULT_IMAGE = os.environ.get("TENSAFE_TRAINER_IMAGE", "ghcr.io/tensafe/tensafe-trainer:0.1.0")
DEFAULTS = TrainerDefaults.parse(os.environ.get("TENSAFE_TRAINER_DEFAULTS", ""))
SPEC_HASH = "tensafe.io/spec-hash"


def desired_pod(tc: dict) -> dict:
    pod = build_pod(tc, default_image=DEFAULT_IMAGE, defaults=DEFAULTS)
    digest = hashlib.sha256(json.dumps(pod["spec"], sort_keys=True).encode()).hexdigest()[:16]
    pod["metadata"].setdefault("annotations", {})[SPEC_HASH] = digest
    return pod


def ensure_credentials(kube: Kube, tc: dict) -> None:
    """The key Secret holds a bearer token and the tenant's key set; whatever is missing is generated."""
    namespace = tc["metadata"]["namespace"]
    provider = KubernetesSecretKeyProvider(kube.core, namespace, key_secret_name(tc))
    if provider.get_value(token_key(tc)) is None:  # this client instance's own token (see token_key)
        provider.put_value(token_key(tc), secrets.token_urlsafe(32).encode())
        if not (tc["spec"].get("keySecretRef") or {}).get("name"):
            # Our own default Secret goes with the training client; a named one is the tenant's to keep.
            kube.core.patch_namespaced_secret(key_secret_name(tc), namespace,
                                              {"metadata": {"ownerReferences": [owner_reference(tc)]}})
    if tinker_enabled(tc) and provider.get_value(tinker_key_key(tc)) is None:  # the Tinker API's key (tml-...)
        provider.put_value(tinker_key_key(tc), new_tinker_key().encode())
    provider.complete(tenant_of(tc))  # KEK, audit and receipt keys: the pod mounts them read-only


def ensure(kube: Kube, tc: dict) -> None:
    """Create whatever is missing; replace a pod whose spec is outdated (after a checkpoint)."""
    namespace, name = tc["metadata"]["namespace"], tc["metadata"]["name"]
    ensure_credentials(kube, tc)
    if not (tc["spec"].get("artifactStore") or {}).get("claimName"):
        kube.create(build_claim(tc))
    kube.create(build_service(tc))
    if dp_config_of(tc) is not None:  # the ledger of the data and the trainer's right to extend it
        for obj in (build_privacy_budget(tc), build_service_account(tc), build_ledger_role(tc),
                    build_ledger_role_binding(tc)):
            kube.create(obj)
    pod = kube.pod(namespace, child_name(name))
    wanted = desired_pod(tc)
    if tc["spec"].get("suspend"):
        if pod is not None:
            checkpoint_then_stop(kube, tc, pod, reason="suspend")
    elif pod is None:
        if kube.create(wanted):
            log.info("created trainer pod %s/%s", namespace, wanted["metadata"]["name"])
    elif pod["metadata"].get("annotations", {}).get(SPEC_HASH) != wanted["metadata"]["annotations"][SPEC_HASH]:
        kube.patch_status(TRAINING_CLIENTS, namespace, name, {"failureStreak": 0})  # a new spec, a new chance
        checkpoint_then_stop(kube, tc, pod, reason="spec-change")  # its DELETED event brings the new pod
    refresh_status(kube, tc, pod)


def checkpoint_then_stop(kube: Kube, tc: dict, pod: dict, reason: str) -> None:
    """Save a checkpoint (so nothing since the last one is lost), then delete the pod."""
    if status_of.pod_ready(pod):
        try:
            trainer = trainer_api(kube, tc, pod)
            record = trainer.submit(tc["metadata"]["name"], SaveStateRequest(metadata={"reason": reason}))
            trainer.operation(record.operation_id, wait=60)
        except TGTinkerError as error:
            log.warning("checkpoint before %s failed: %s", reason, error)
    kube.delete_pod(pod["metadata"]["namespace"], pod["metadata"]["name"])


def on_pod_event(kube: Kube, event_type: str, pod: dict) -> None:
    """A trainer pod changed: replace it if it died, and update its client's status."""
    namespace = pod["metadata"]["namespace"]
    owner = (pod["metadata"].get("labels") or {}).get("tensafe.io/training-client")
    tc = kube.training_client(namespace, owner) if owner else None
    if tc is None or tc["metadata"].get("deletionTimestamp"):
        return
    if event_type == "DELETED":
        if not tc["spec"].get("suspend") and kube.create(desired_pod(tc)):
            log.info("replaced trainer pod %s/%s", namespace, pod["metadata"]["name"])
        refresh_status(kube, tc, None)
        return
    if status_of.pod_finished(pod) and not status_of.crash_looping(tc.get("status") or {}):
        current = tc.get("status") or {}
        streak = status_of.failure_streak(current, pod)
        tc["status"] = dict(current, failureStreak=streak)
        if status_of.crash_looping(tc["status"]):
            kube.patch_status(TRAINING_CLIENTS, namespace, owner, {"failureStreak": streak})
            log.error("trainer pod %s/%s keeps dying at start; not replacing it", namespace, pod["metadata"]["name"])
        else:
            tc["status"]["restarts"] = current.get("restarts", 0) + 1
            kube.patch_status(TRAINING_CLIENTS, namespace, owner,
                              {"restarts": tc["status"]["restarts"], "failureStreak": streak})
            log.warning("trainer pod %s/%s died (%s); replacing it", namespace, pod["metadata"]["name"],
                        status_of.pod_problem(pod)[1])
            kube.delete_pod(namespace, pod["metadata"]["name"])
    refresh_status(kube, tc, pod)


def refresh_status(kube: Kube, tc: dict, pod: Optional[dict] = None, *, fetch_pod: bool = False) -> None:
    namespace, name = tc["metadata"]["namespace"], tc["metadata"]["name"]
    if fetch_pod:
        pod = kube.pod(namespace, child_name(name))
    trainer = None
    if status_of.pod_ready(pod):
        try:
            trainer = trainer_api(kube, tc, pod).client(name)
        except TGTinkerError as error:
            log.debug("trainer of %s/%s did not answer: %s", namespace, name, error)
    current, desired = tc.get("status") or {}, status_of.desired_status(tc, pod, trainer)
    patch = status_of.status_patch(current, desired)
    if patch:
        kube.patch_status(TRAINING_CLIENTS, namespace, name, patch)
        event = status_of.event_for(current, desired)
        if event is not None:
            try:
                kube.create(build_event(tc, *event, when=status_of.now()))
            except ApiException as error:  # an Event is for people: never worth failing a reconcile over
                log.warning("could not record the %s event of %s/%s: %s", event[1], namespace, name, error.reason)


_connections = TrainerConnections()


def trainer_api(kube: Kube, tc: dict, pod: dict) -> TrainerAPI:
    """To the trainer at its pod IP (no DNS needed); over HTTPS when the client has a TLS Secret. Its
    connection is shared and kept open."""
    namespace = tc["metadata"]["namespace"]
    access = trainer_access(tc, lambda name: kube.secret_data(namespace, name), pod_ip=pod["status"]["podIP"])
    return TrainerAPI(_connections.get(access))

