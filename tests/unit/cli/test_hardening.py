"""Processes that hold tenant keys cannot dump core, and engines die with their server (#26, finding 11).

Whether another process is dumpable is not in /proc; what it changes is visible: the kernel refuses ptrace-read
access to a non-dumpable process to anyone without CAP_SYS_PTRACE. The probe drops that capability (tests may
run as root) and asks for such access with kcmp(2), checked first against a process that is dumpable.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time

import pytest
from conftest import random_batch, tiny_config
from tg_tinker import ServiceClient

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux only")

KCMP = {"x86_64": 312, "aarch64": 272}.get(platform.machine())
SLOW_MODEL = "tiny-random-llama:hidden=256,layers=4,vocab=512"

PROBE = r"""
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
header, data = Header(0x20080522, 0), (Data * 2)()
if libc.capget(ctypes.byref(header), data) == 0:
    data[0].effective &= ~(1 << 19)  # CAP_SYS_PTRACE, which overrides the kernel's dumpable check
    libc.capset(ctypes.byref(header), data)
answers = {}
for pid in map(int, sys.argv[2:]):
    # kcmp(KCMP_VM) needs ptrace read access to pid: refused (EPERM/EACCES) when pid is not dumpable
    result = libc.syscall(int(sys.argv[1]), os.getpid(), pid, 1, 0, 0)
    errno = ctypes.get_errno()
    answers[str(pid)] = True if result >= 0 else False if errno in (1, 13) else f"errno {errno}"
print(json.dumps(answers))
"""


def dumpable(*pids: int) -> dict[int, object] | None:
    """{pid: True/False} from a separate process without CAP_SYS_PTRACE; None where that cannot be told."""
    if KCMP is None:
        return None
    control = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        done = subprocess.run([sys.executable, "-c", PROBE, str(KCMP), str(control.pid), *map(str, pids)],
                              capture_output=True, text=True, timeout=60)
    finally:
        control.kill()
        control.wait()
    answers = json.loads(done.stdout or "{}")
    if answers.get(str(control.pid)) is not True:  # no kcmp, a stricter ptrace policy: the probe cannot tell
        return None
    return {pid: answers[str(pid)] for pid in pids}


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited; only its reaping is left
    except FileNotFoundError:
        return True


def test_disable_core_dumps_turns_dumpable_off():
    code = ("import ctypes; from tensafe_trainer.cli.hardening import disable_core_dumps; prctl = ctypes.CDLL(None).prctl;"
            "before = prctl(3, 0, 0, 0, 0); disable_core_dumps(); print(before, prctl(3, 0, 0, 0, 0))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["1", "0"], done.stderr


@pytest.mark.parametrize("command", [["audit", "verify"], ["artifact", "list", "--home", "{home}"]])
def test_cli_commands_that_load_a_key_set_cannot_dump_core(tmp_path, command):
    from tensafe_keys.store import LocalKeyProvider

    keyset = LocalKeyProvider(tmp_path / "keys").complete("default")
    (tmp_path / "default.json").write_text(json.dumps(keyset))
    (tmp_path / "home").mkdir()
    args = [a.replace("{home}", str(tmp_path / "home")) for a in command]
    if command[0] == "audit":
        args += ["--keys", str(tmp_path / "default.json"), str(tmp_path / "no-log.jsonl")]
    code = ("import ctypes, sys\nfrom tensafe_trainer.cli.main import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit as exit:\n    print('exit', exit.code)\nprint('dumpable', ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))")
    env = dict(os.environ, TENSAFE_KEYS_DIR=str(tmp_path / "keys"))
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=env)
    assert "dumpable 0" in done.stdout, done.stdout + done.stderr


def assert_gone(pids: list[int], within: float) -> None:
    deadline = time.monotonic() + within
    while not all(gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(pid) for pid in pids), f"engines {pids} outlived their server"


def busy_engine(service: ServiceClient) -> tuple[list[int], list]:
    """A client whose engine is running long steps, two more handed over: (engine pids, futures)."""
    from process_helpers import engine_pids

    tc = service.create_training_client(tiny_config(model_ref=SLOW_MODEL, max_seq_len=512))
    tc.forward_backward(random_batch()).result(timeout=120)
    engines = engine_pids(service.local_trainer.process.pid)
    assert len(engines) == 1
    futures = [tc.forward_backward(random_batch(rows=8, width=512)) for _ in range(3)]
    time.sleep(0.5)
    return engines, futures


def test_the_server_and_its_engines_cannot_dump_core_and_engines_die_with_a_killed_server(tmp_path):
    service = ServiceClient(home=tmp_path)
    try:
        server = service.local_trainer.process.pid
        engines, _ = busy_engine(service)
        seen = dumpable(server, *engines)
        if seen is not None:
            assert seen == {server: False, engines[0]: False}
        # A killed server's engine used to finish what it was handed (its pipe's EOF is read only between
        # operations), for seconds; now the kernel kills it with its server.
        os.kill(server, signal.SIGKILL)
        service.local_trainer.process.wait(timeout=30)
        assert_gone(engines, within=2.0)
    finally:
        service.close()
    if seen is None:
        pytest.skip("engines died with their server; whether a process may dump core cannot be told here")


def test_a_stopped_server_stops_its_engines(tmp_path):
    """SIGTERM: uvicorn shuts down gracefully, then re-raises the signal, so no exit handler runs: the server
    stops its engines itself before that (a busy one gets a few seconds to finish its operation)."""
    service = ServiceClient(home=tmp_path)
    try:
        engines, _ = busy_engine(service)
        os.kill(service.local_trainer.process.pid, signal.SIGTERM)
        service.local_trainer.process.wait(timeout=60)
        assert_gone(engines, within=1.0)
    finally:
        service.close()
