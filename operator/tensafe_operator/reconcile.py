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
from tensafe_keys.store import new_tinker_key
from tensafe_keys.kubernetes import KubernetesSecretKeyProvider
from tg_tinker.errors import TGTinkerError
from tg_tinker.resources import (TRAINING_CLIENTS, tinker_enabled, tinker_key_key, tls_secret_name, token_key,
                                 trainer_access)
from tg_tinker.trainer_api import TrainerAPI
from tg_tinker.types import SaveStateRequest

from . import status as status_of
from .builders import (TrainerDefaults, artifact_claim_name, build_claim, build_data_keys_claim, build_event,
                       build_key_secret, build_ledger_role, build_ledger_role_binding, build_pod, build_privacy_budget,
                       build_service, build_service_account, child_name, data_keys_claim_name, dp_config_of, foreign_to,
                       image_allowed, key_secret_name, parse_allowed_images, tenant_of)
from .connections import TrainerConnections
from .kube import Kube

log = logging.getLogger("tensafe.operator")
DEFAULT_IMAGE = os.environ.get("TENSAFE_TRAINER_IMAGE", "ghcr.io/tensafe/tensafe-trainer:0.1.0")
DEFAULTS = TrainerDefaults.parse(os.environ.get("TENSAFE_TRAINER_DEFAULTS", ""))
# The images a TrainingClient's spec.image may name (Helm value trainer.allowedImages); the default image always.
ALLOWED_IMAGES = parse_allowed_images(os.environ.get("TENSAFE_ALLOWED_IMAGES", ""))
SPEC_HASH = "tensafe.io/spec-hash"


def desired_pod(tc: dict) -> dict:
    pod = build_pod(tc, default_image=DEFAULT_IMAGE, defaults=DEFAULTS)
    digest = hashlib.sha256(json.dumps(pod["spec"], sort_keys=True).encode()).hexdigest()[:16]
    pod["metadata"].setdefault("annotations", {})[SPEC_HASH] = digest
    return pod


def refusal(kube: Kube, tc: dict) -> Optional[tuple[str, str]]:
    """(reason, message) when the spec names what is not its tenant's, or an image the operator may not run; such
    a client gets no pod, and nothing is written into what it names. Reads only."""
    namespace, name = tc["metadata"]["namespace"], tc["metadata"]["name"]
    image = tc["spec"].get("image") or DEFAULT_IMAGE
    if not image_allowed(image, ALLOWED_IMAGES, DEFAULT_IMAGE):
        return "ImageNotAllowed", (f"image {image!r} is not one the operator may run (Helm value "
                                   "trainer.allowedImages, $TENSAFE_ALLOWED_IMAGES); no trainer pod is created")
    hint = (f"; a TrainingClient of tenant {tenant_of(tc)!r} may name only objects labelled "
            f"tensafe.io/tenant={tenant_of(tc)} (or none: the operator makes its own); no trainer pod is created and "
            "nothing is written into it")
    secrets_named = [(key_secret_name(tc), child_name(name, "keys"))]
    if tls_secret_name(tc):
        secrets_named.append((tls_secret_name(tc), None))
    for secret, default_name in secrets_named:
        problem = foreign_to(tc, kube.secret(namespace, secret), default_name)
        if problem:
            return "ForeignSecret", f"Secret {secret!r} {problem}{hint}"
    for claim, default_name in ((artifact_claim_name(tc), child_name(name, "artifacts")),
                                (data_keys_claim_name(tc), f"{child_name(name, 'artifacts')}-keys")):
        problem = foreign_to(tc, kube.claim(namespace, claim), default_name)
        if problem:
            return "ForeignVolume", f"PersistentVolumeClaim {claim!r} {problem}{hint}"
    return None


def record_refusal(kube: Kube, tc: dict, refused: Optional[tuple[str, str]]) -> None:
    """Keep the refusal (or its end) in the status, where every later status write finds it (status.desired_status):
    phase ERROR with the reason, and a Warning event."""
    current = tc.get("status") or {}
    wanted = None if refused is None else {"reason": refused[0], "message": refused[1],
                                           "generation": tc["metadata"].get("generation", 1)}
    if current.get("refusal") != wanted:
        namespace, name = tc["metadata"]["namespace"], tc["metadata"]["name"]
        kube.patch_status(TRAINING_CLIENTS, namespace, name, {"refusal": wanted})
        tc["status"] = {**current, "refusal": wanted}
        if refused is not None:
            log.warning("TrainingClient %s/%s refused: %s", namespace, name, refused[0])
    if refused is not None:
        refresh_status(kube, tc, None)


def refused_now(kube: Kube, tc: dict) -> bool:
    """Check the spec; a refused one's pod is deleted (a refused spec runs nothing) and the status says why."""
    refused = refusal(kube, tc)
    if refused is not None:
        kube.delete_pod(tc["metadata"]["namespace"], child_name(tc["metadata"]["name"]))
    record_refusal(kube, tc, refused)
    return refused is not None


def ensure_credentials(kube: Kube, tc: dict) -> None:
    """The key Secret holds a bearer token and the tenant's key set; whatever is missing is generated. Called only
    once ``refusal`` found the Secret the tenant's (or missing: it is created here, labelled with the tenant)."""
    namespace = tc["metadata"]["namespace"]
    kube.create(build_key_secret(tc))  # our own default one is owned by the client; a named one is the tenant's
    provider = KubernetesSecretKeyProvider(kube.core, namespace, key_secret_name(tc))
    if provider.get_value(token_key(tc)) is None:  # this client instance's own token (see token_key)
        provider.put_value(token_key(tc), secrets.token_urlsafe(32).encode())
    if tinker_enabled(tc) and provider.get_value(tinker_key_key(tc)) is None:  # the Tinker API's key (tml-...)
        provider.put_value(tinker_key_key(tc), new_tinker_key().encode())
    provider.complete(tenant_of(tc))  # KEK, audit and receipt keys: the pod mounts them read-only
    provider.names_key(tenant_of(tc))  # the key store's names secret (pseudonyms on disk), mounted beside them


def ensure(kube: Kube, tc: dict) -> None:
    """Create whatever is missing; replace a pod whose spec is outdated (after a checkpoint)."""
    namespace, name = tc["metadata"]["namespace"], tc["metadata"]["name"]
    if refused_now(kube, tc):
        return
    ensure_credentials(kube, tc)
    kube.create(build_claim(tc))  # when missing: a named one too, for the client's tenant
    kube.create(build_data_keys_claim(tc))  # its twin, the artifacts' data keys
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
            saved = (trainer.operation(record.operation_id, wait=60).result or {}).get("artifact_id")
            if saved:  # the status keeps it: no mirror reads a stopped trainer
                kube.patch_status(TRAINING_CLIENTS, tc["metadata"]["namespace"], tc["metadata"]["name"],
                                  {"lastCheckpoint": saved})
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
        if not tc["spec"].get("suspend"):
            if refused_now(kube, tc):  # what it names may have changed hands since
                return
            if kube.create(desired_pod(tc)):
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

