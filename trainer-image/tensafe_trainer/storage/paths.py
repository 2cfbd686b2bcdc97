"""Where the trainer keeps its state on disk."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def tensafe_home() -> Path:
    """``$TENSAFE_HOME``, else ``~/.cache/tensafe``: artifacts, audit log, privacy ledgers (not keys: keys_dir)."""
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


KEYS_DIR_ENV = "TENSAFE_KEYS_DIR"
ARTIFACT_KEYS_DIR_ENV = "TENSAFE_ARTIFACT_KEYS_DIR"


def keys_dir(home: Path) -> Path:
    """Tenant key sets: ``$TENSAFE_KEYS_DIR`` (a mounted Secret in a trainer pod), else
    ``$XDG_CONFIG_HOME/tensafe/keys/<home id>`` (``~/.config/...``), the home id being a hash of the home's
    resolved path: each home has its own key store, never inside it (a copy of the home decrypts nothing),
    and nothing in the home chooses it (an insider who could point the home at a fresh key store would give
    every ledger a new name, and spent budget back). A home moved to another path needs its key store moved
    along, or ``$TENSAFE_KEYS_DIR``: a server refuses a used home whose key store is new."""
    override = os.environ.get(KEYS_DIR_ENV)
    if override:
        return Path(override)
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "tensafe" / "keys" / home_id(home)


def home_id(home: Path) -> str:
    return hashlib.sha256(str(Path(home).resolve()).encode()).hexdigest()[:32]


def artifact_keys_dir(home: Path) -> Path:
    """Each artifact's wrapped data key: ``$TENSAFE_ARTIFACT_KEYS_DIR`` (a trainer pod's keys volume, since its
    key sets are a read-only Secret), else ``<keys_dir>/artifacts``."""
    override = os.environ.get(ARTIFACT_KEYS_DIR_ENV)
    return Path(override) if override else keys_dir(home) / "artifacts"


def key_provider(home: Path):
    """The trainer's key store for ``home``: key sets in ``keys_dir``, data keys in ``artifact_keys_dir``."""
    from tensafe_keys.store import LocalKeyProvider

    return LocalKeyProvider(keys_dir(home), artifact_keys_dir(home))


def keys_inside_home(home: Path) -> list[Path]:
    """The key folders that lie inside ``home`` (so a copy of the home would carry them), plus ``<home>/keys``
    where earlier versions kept key sets, if it still holds any."""
    root = Path(home).resolve()
    inside = [folder for folder in (keys_dir(home), artifact_keys_dir(home))
              if folder.resolve() == root or root in folder.resolve().parents]
    legacy = Path(home) / "keys"
    if legacy.is_dir() and any(legacy.glob("*.json")) and legacy.resolve() not in {f.resolve() for f in inside}:
        inside.append(legacy)
    return inside


def refuse_keys_inside_home(home: Path) -> None:
    """Stop a server whose keys a copy of its home would carry (``--allow-keys-in-home`` skips this)."""
    inside = keys_inside_home(home)
    if inside:
        target = "wherever $TENSAFE_KEYS_DIR names" if os.environ.get(KEYS_DIR_ENV) else str(keys_dir(home))
        raise SystemExit(
            f"key sets at {', '.join(map(str, inside))} lie inside the data folder {home}: whoever copies it (a "
            f"backup, a snapshot) could decrypt every artifact and dataset in it. Move them out of the home (to "
            f"{target}; or set {KEYS_DIR_ENV}), treat backups of the home taken so far as holding the keys "
            "(`tensafe artifact rotate --reencrypt` gives every artifact a new key), or pass --allow-keys-in-home "
            "to accept that risk")


def refuse_a_new_key_store_for_a_used_home(home: Path) -> None:
    """Stop a server whose home holds data but whose key store is new: the home was moved or copied, or the key
    store moved. Starting would create fresh keys: nothing saved would open, and every privacy ledger
    would seem empty (a new names key names them anew), giving spent budget back."""
    store = keys_dir(home)
    known = store.is_dir() and (any(store.glob("*.json")) or (store / "names.key").exists())
    used = any(Path(home).glob("artifacts/*/art-*.tsa")) or any(
        p.stat().st_size for p in (*Path(home).glob("audit/*.jsonl"), *Path(home).glob("privacy/*/*.jsonl")))
    if used and not known:
        raise SystemExit(
            f"{home} holds artifacts, audit logs or privacy ledgers, but its key store {store} is new: the home "
            f"was moved or copied here, or its key store moved. Move the key store of its old path to {store} (or "
            f"set {KEYS_DIR_ENV} to where the keys are); starting with new keys would open nothing saved and lose "
            "track of spent privacy budget")


def ledger_dir(home: Path) -> Path:
    """The privacy ledgers, one file per (tenant, dataset): ``<home>/privacy``."""
    return home / "privacy"
