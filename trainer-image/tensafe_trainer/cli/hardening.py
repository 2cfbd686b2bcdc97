"""Process hardening where tenant keys (KEKs) are held: no core dumps, and engines that die with their server.

``tensafe serve``, every engine process it spawns and the CLI commands that load a key set call
``disable_core_dumps`` before they read a key. On Linux that is ``prctl(PR_SET_DUMPABLE, 0)``: no core file
(whatever the core pattern or limit), and no other process of the same user may ptrace it or read its
``/proc/<pid>/mem``, ``environ`` or file descriptors (only one with ``CAP_SYS_PTRACE`` still can). The soft
``RLIMIT_CORE`` is set to 0 too, where the platform has one. Elsewhere the prctl calls are no-ops.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Optional

PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4


def _prctl(option: int, arg: int = 0) -> Optional[int]:
    """``prctl(option, arg)``; None where there is no prctl (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    result = prctl(option, arg, 0, 0, 0)
    if result == -1:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}) failed: {os.strerror(errno)}")
    return result


def disable_core_dumps() -> None:
    """No core dump of this process, nor ptrace or /proc/<pid>/mem by another process of its user (Linux).
    Reset by ``execve``: a spawned child calls it again itself."""
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    except (ImportError, ValueError, OSError):
        pass  # no such limit here; the prctl below is what counts on Linux
    _prctl(PR_SET_DUMPABLE, 0)


def dumpable() -> Optional[bool]:
    """Whether this process may dump core (``PR_GET_DUMPABLE``); None where that cannot be asked."""
    value = _prctl(PR_GET_DUMPABLE)
    return None if value is None else value != 0


def die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process as soon as its parent is gone (``PR_SET_PDEATHSIG``), however the parent
    ends (kill -9 included). The signal comes when the parent *thread* that started this process ends: host
    processes are started by one thread of the host pool's, which lives as long as the server. A parent that
    died before the signal was armed is caught by ``getppid``. Elsewhere a no-op (engines still stop at the
    end of their current operation, when their request pipe closes)."""
    if _prctl(PR_SET_PDEATHSIG, signal.SIGKILL) is None:
        return
    if os.getppid() != parent_pid:
        os._exit(1)
