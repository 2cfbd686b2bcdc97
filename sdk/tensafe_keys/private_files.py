"""Files only their owner may read (0600, folders 0700), written whole or not at all: the artifact store,
the audit log and the key store all write through these."""

from __future__ import annotations

import os
from pathlib import Path

FILE_MODE, DIR_MODE = 0o600, 0o700


def private_dir(path: Path) -> Path:
    """``path`` created if needed, mode 0700."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != DIR_MODE:
        os.chmod(path, DIR_MODE)
    return path


def open_private(path: Path):
    """A new binary file at ``path``, mode 0600; refuses one that exists or a symlink planted there."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE), "wb")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write, durable: bool = True) -> None:
    """Temporary name, then rename; ``durable`` fsyncs the file before the rename. The folder's fsync is
    the caller's: one, after all of its renames, makes them all durable."""
    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")  # unique, not secret (O_EXCL, O_NOFOLLOW)
    try:
        with open_private(tmp) as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_durably(path: Path, data: bytes) -> None:
    """``data`` at ``path`` (0600), whole or not at all, file and rename synced (a key file: a power cut must
    neither lose a new one nor bring back one a rotation replaced)."""
    atomic_write(path, lambda f: f.write(data))
    fsync_dir(path.parent)
