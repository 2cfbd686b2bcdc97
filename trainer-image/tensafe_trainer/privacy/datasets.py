"""Registered datasets: a tenant's training examples, stored encrypted so the server can sample them.

A dataset is an artifact of kind ``dataset`` (same envelope, tenant key and audit as checkpoints), named
by its dataset id and owned by no training client (``DATASETS_OWNER`` can never be a client id, so no
client's token lists or downloads it). Its number of examples is inside the encrypted payload only: under
add/remove adjacency N itself is private, so no header, index entry or log carries it, and the mechanism
never uses it (its denominator is the client's declared batch size).
"""

from __future__ import annotations

import json
import secrets
from typing import Optional

from tg_tinker.errors import ArtifactNotFoundError, ValidationError
from tg_tinker.types import ArtifactInfo, DatasetInfo, RegisterDataset

from tensafe_trainer.storage.artifacts import ArtifactStore
from tensafe_trainer.privacy.ledger import check_dataset_id

KIND = "dataset"
DATASETS_OWNER = "_datasets"


def _info(artifact: ArtifactInfo, num_examples: int) -> DatasetInfo:
    return DatasetInfo(dataset_id=artifact.name, num_examples=num_examples,
                       content_hash=artifact.content_hash, artifact_id=artifact.artifact_id,
                       tenant_id=artifact.tenant_id, size_bytes=artifact.size_bytes, created_at=artifact.created_at)


def _count(store: ArtifactStore, artifact: ArtifactInfo) -> int:
    return len(json.loads(store.get(artifact.tenant_id, artifact.artifact_id, DATASETS_OWNER)))


def list_datasets(store: ArtifactStore, tenant_id: str) -> list[DatasetInfo]:
    """Decrypts each dataset to count it (the count is nowhere in plaintext)."""
    return [_info(a, _count(store, a)) for a in store.list(tenant_id, DATASETS_OWNER) if a.kind == KIND]


def find_dataset(store: ArtifactStore, tenant_id: str, dataset_id: str) -> Optional[ArtifactInfo]:
    hits = [a for a in store.list(tenant_id, DATASETS_OWNER) if a.kind == KIND and a.name == dataset_id]
    return hits[0] if hits else None


def register(store: ArtifactStore, request: RegisterDataset) -> DatasetInfo:
    dataset_id = check_dataset_id(request.dataset_id or f"ds-{secrets.token_hex(6)}")
    if find_dataset(store, request.tenant_id, dataset_id) is not None:
        raise ValidationError(f"dataset {dataset_id!r} is already registered for tenant {request.tenant_id!r}; "
                              "delete it first or choose another dataset_id", {"dataset_id": dataset_id})
    payload = json.dumps([e.model_dump(exclude_none=True) for e in request.examples]).encode()
    artifact = store.put(payload, tenant_id=request.tenant_id, training_client_id=DATASETS_OWNER, kind=KIND, step=0,
                         name=dataset_id)
    return _info(artifact, len(request.examples))


def describe(store: ArtifactStore, tenant_id: str, dataset_id: str) -> DatasetInfo:
    found = find_dataset(store, tenant_id, dataset_id)
    if found is None:
        raise ArtifactNotFoundError(f"no dataset {dataset_id!r} for tenant {tenant_id!r}", {"dataset_id": dataset_id})
    return _info(found, _count(store, found))


def delete(store: ArtifactStore, tenant_id: str, dataset_id: str) -> DatasetInfo:
    """Removes the examples; the dataset's privacy ledger stays (spent budget is never given back)."""
    info = describe(store, tenant_id, dataset_id)
    store.delete(tenant_id, info.artifact_id)
    return info


def load_examples(store: ArtifactStore, tenant_id: str, dataset_id: str) -> Optional[list[dict]]:
    """The decrypted examples of a registered dataset; None if ``dataset_id`` names none (client-supplied data)."""
    found = find_dataset(store, tenant_id, dataset_id)
    if found is None:
        return None
    return json.loads(store.get(tenant_id, found.artifact_id, DATASETS_OWNER))
