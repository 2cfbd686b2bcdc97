"""Where the trainer keeps its state on disk."""

from __future__ import annotations

import os
from pathlib import Path


def tensafe_home() -> Path:
    """``$TENSAFE_HOME``, else ``~/.cache/tensafe``: models cache, artifacts, keys, audit log."""
    home = os.environ.get("TENSAFE_HOME")
    path = Path(home) if home else Path.home() / ".cache" / "tensafe"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def model_cache() -> Path:
    """Converted model weights; shared across homes so tests and demos convert SmolLM2 only once."""
    override = os.environ.get("TENSAFE_MODEL_CACHE")
    path = Path(override) if override else Path.home() / ".cache" / "tensafe" / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def keys_dir(home: Path) -> Path:
    """Tenant key sets: ``$TENSAFE_KEYS_DIR`` (a mounted Secret in a trainer pod), else ``<home>/keys``."""
    override = os.environ.get("TENSAFE_KEYS_DIR")
    return Path(override) if override else home / "keys"


def ledger_dir(home: Path) -> Path:
    """The privacy ledgers, one file per (tenant, dataset): ``<home>/privacy``."""
    return home / "privacy"
