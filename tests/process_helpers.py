"""Helpers that look at a running trainer's processes."""

from __future__ import annotations

import subprocess


def engine_pids(server_pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(server_pid), "--sort=start_time"],
                         capture_output=True, text=True).stdout
    pids = [int(p) for p in out.split()]
    return [p for p in pids if "multiprocessing" in open(f"/proc/{p}/cmdline").read().replace("\0", " ")
            and "resource_tracker" not in open(f"/proc/{p}/cmdline").read()]
