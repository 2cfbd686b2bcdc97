"""The Tinker REST listings' JSON: training runs and checkpoints, as the SDK's ``RestClient`` and the
``tinker`` CLI read them, built from TenSafe artifacts (``path -> ArtifactInfo``) and the live model."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from tg_tinker.errors import TrainingClientNotFoundError

from tensafe_trainer.service.tinker.registry import CHECKPOINT_KINDS, TinkerModel, parse_path


def iso(ts: Optional[float]) -> Optional[str]:
    """A timestamp as ISO 8601; None for none, or for one past what a date holds (a TTL of 1e20 s, saved before
    the door refused such TTLs, must not fail every listing of its tenant)."""
    try:
        return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat()
    except (OverflowError, OSError, ValueError):
        return None


def checkpoint_json(path: str, info) -> dict:
    _, kind, name = parse_path(path)
    tinker = info.metadata.get("tinker") or {}
    return {"checkpoint_id": f"{kind}/{name}", "checkpoint_type": "training" if kind == "weights" else "sampler",
            "time": iso(info.created_at), "tinker_path": path, "size_bytes": info.size_bytes, "public": False,
            "user_metadata": {str(k): str(v) for k, v in (tinker.get("checkpoint_metadata") or {}).items()},
            "expires_at": iso(tinker.get("expires_at"))}


def run_json(run_id: str, tenant_id: str, found: dict[str, Any], live: Optional[TinkerModel]) -> dict:
    """A training run: the tenant's checkpoints under ``run_id`` and, while it runs, its model (of this tenant)."""
    mine = {p: i for p, i in found.items() if parse_path(p)[0] == run_id}
    if live is None and not mine:
        raise TrainingClientNotFoundError(f"unknown training run {run_id[:200]!r}", {"training_run_id": run_id})
    described = live.description if live is not None else (next(iter(mine.values())).metadata.get("tinker") or {})
    last = {kind: max((i for p, i in mine.items() if parse_path(p)[1] == kind), key=lambda i: i.created_at,
                      default=None) for kind in CHECKPOINT_KINDS}
    path_of = {i.artifact_id: p for p, i in mine.items()}
    latest = max([i.created_at for i in mine.values()] + [live.last_request_time if live else 0.0])
    return {"training_run_id": run_id, "base_model": described.get("base_model", ""), "model_owner": tenant_id,
            "is_lora": True, "corrupted": False, "lora_rank": described.get("lora_rank"),
            "last_request_time": iso(latest),
            "last_checkpoint": checkpoint_json(path_of[last["weights"].artifact_id], last["weights"])
            if last["weights"] else None,
            "last_sampler_checkpoint": checkpoint_json(
                path_of[last["sampler_weights"].artifact_id], last["sampler_weights"])
            if last["sampler_weights"] else None,
            "user_metadata": {str(k): str(v) for k, v in (described.get("user_metadata") or {}).items()}}
