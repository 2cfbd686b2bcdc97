"""The kopf handlers: thin. Each hands its object to ``reconcile`` or ``operations``.

No handler needs a finalizer (nothing outside the owner tree is ever left to clean), so the status
mirror is a background loop started with the operator rather than a kopf timer, which would put a
finalizer on every TrainingClient.
"""

from __future__ import annotations

import asyncio
import logging
import os

import kopf

from tg_tinker.resources import GROUP, TRAINING_CLIENTS, TRAINING_OPERATIONS, VERSION

from . import operations, reconcile
from . import status as status_of
from .kube import Kube

MIRROR_INTERVAL_S = float(os.environ.get("TENSAFE_STATUS_INTERVAL_S", "2"))
TRAINER_PODS = {"app.kubernetes.io/name": "tensafe-trainer", "app.kubernetes.io/managed-by": "tensafe-operator"}
log = logging.getLogger("tensafe.operator")


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, training_operations: kopf.Index,
                    **_) -> None:
    # Progress and diff-base in annotations of our own prefix: status stays ours alone.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="operator.tensafe.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="operator.tensafe.io", key="last-handled-configuration")
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per status poll otherwise
    memo.kube = Kube.connect()
    memo.mirror = asyncio.create_task(_mirror(memo, training_operations))


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_) -> None:
    memo.mirror.cancel()


@kopf.on.create(GROUP, VERSION, TRAINING_CLIENTS)
@kopf.on.resume(GROUP, VERSION, TRAINING_CLIENTS)
@kopf.on.update(GROUP, VERSION, TRAINING_CLIENTS, field="spec")
def training_client_changed(body: kopf.Body, memo: kopf.Memo, **_) -> None:
    reconcile.ensure(memo.kube, _plain(body))


@kopf.on.event("", "v1", "pods", labels=TRAINER_PODS)
def trainer_pod_event(event: kopf.RawEvent, memo: kopf.Memo, **_) -> None:
    if event["type"] is not None:  # None: the initial listing, already covered by on.resume
        reconcile.on_pod_event(memo.kube, event["type"], event["object"])


@kopf.index(GROUP, VERSION, TRAINING_OPERATIONS)
def training_operations(body: kopf.Body, **_) -> dict:
    """Every TrainingOperation by (namespace, client): kept by kopf from its watch, read without listing."""
    top = _plain(body)
    return {(top["metadata"]["namespace"], top["spec"]["trainingClientRef"]["name"]): operations.index_entry(top)}


@kopf.on.create(GROUP, VERSION, TRAINING_OPERATIONS)
@kopf.on.resume(GROUP, VERSION, TRAINING_OPERATIONS)
def training_operation_created(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo,
                               training_operations: kopf.Index, **_) -> None:
    top = _plain(body)
    key = (top["metadata"]["namespace"], top["spec"]["trainingClientRef"]["name"])
    operations.run(memo.kube, top, patch, list(training_operations.get(key, [])))


async def _mirror(memo: kopf.Memo, tops: kopf.Index) -> None:
    """Every few seconds: mirror each client's trainer (step, epsilon, checkpoint) into its status, written
    only on change, and collect finished operations past their TTL (from the index: no listing)."""
    # The watched namespaces (None: all), so that namespaced RBAC suffices.
    namespaces = [n for n in os.environ.get("TENSAFE_WATCH_NAMESPACE", "").split(",") if n] or [None]
    while True:
        await asyncio.sleep(MIRROR_INTERVAL_S)
        try:
            for namespace in namespaces:
                await asyncio.to_thread(_mirror_once, memo.kube, namespace)
            finished = [top for key in list(tops) for top in list(tops.get(key, []))]
            await asyncio.to_thread(operations.collect_finished, memo.kube, finished)
        except Exception as error:  # the API server may be restarting: try again next round
            log.warning("status mirror: %s: %s", type(error).__name__, error)


def _mirror_once(kube: Kube, namespace: str | None) -> None:
    for tc in kube.training_clients(namespace):
        if tc["metadata"].get("deletionTimestamp"):
            continue
        if status_of.refused(tc):  # checked again: what it names may have been labelled for its tenant since
            reconcile.ensure(kube, tc)
        else:
            reconcile.refresh_status(kube, tc, fetch_pod=True)


def _plain(body: kopf.Body) -> dict:
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": dict(body.metadata),
            "spec": dict(body.spec), "status": dict(body.status)}
