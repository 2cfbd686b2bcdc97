"""The embedded local backend: the trainer server as a child process on loopback.

It is the same server a trainer pod runs (``tensafe serve``), bound to 127.0.0.1 with a fresh
bearer token, and it exits when this process does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from .errors import TGTinkerError

START_TIMEOUT_S = 180.0


class LocalTrainer:
    def __init__(self, home: Optional[Path] = None, log_level: str = "warning",
                 privacy_policy: Optional[Path] = None):
        if importlib.util.find_spec("tensafe_trainer") is None:
            raise TGTinkerError(
                "the embedded local backend needs the trainer: pip install 'tensafe[trainer]' "
                "(or pass base_url= / backend='kubernetes' to use a remote trainer)")
        self.token = secrets.token_urlsafe(32)
        self._dir = Path(tempfile.mkdtemp(prefix="tensafe-local-"))
        ready = self._dir / "ready.json"
        self.log_path = self._dir / "trainer.log"
        token_file = self._dir / "token"  # a file (0600, in a 0700 folder), not an env value /proc would keep
        token_file.touch(mode=0o600)
        token_file.write_text(self.token)
        env = {k: v for k, v in os.environ.items() if k != "TENSAFE_AUTH_TOKEN"}
        env["TENSAFE_AUTH_TOKEN_FILE"] = str(token_file)
        if home is not None:
            env["TENSAFE_HOME"] = str(home)
        command = [sys.executable, "-m", "tensafe_trainer", "serve", "--host", "127.0.0.1", "--port", "0",
                   "--ready-file", str(ready), "--parent-pid", str(os.getpid()), "--log-level", log_level]
        if privacy_policy is not None:  # the Tinker API's DP policy (tensafe serve --privacy-policy)
            command += ["--privacy-policy", str(privacy_policy)]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.exists():
            if self.process.poll() is not None:
                raise TGTinkerError(f"the local trainer exited with code {self.process.returncode}:\n"
                                    f"{self.log_tail()}")
            if time.monotonic() > deadline:
                self.close()
                raise TGTinkerError(f"the local trainer did not start in {START_TIMEOUT_S:.0f}s:\n{self.log_tail()}")
            time.sleep(0.05)
        token_file.unlink()  # read at start: the server keeps it in memory only
        info = json.loads(ready.read_text())
        self.base_url = f"http://127.0.0.1:{info['port']}"

    @property
    def directory(self) -> Path:
        """The private folder of this trainer's files: its log, and its token file until the server has read it."""
        return self._dir

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
