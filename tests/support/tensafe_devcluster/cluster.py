"""The test cluster: the API emulator and the local kubelet on one event loop in a background thread,
a kubeconfig for clients, and (optionally) the operator as its own process, as in a real cluster.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Optional

import uvicorn
import yaml

from .apiserver import ApiServer
from .kubelet import ApiAccess, LocalKubelet
from .store import Store
from .tls import write_serving_certificate


def kubeconfig(server: str, token: str, ca_file: Path, namespace: str = "default") -> dict:
    ca_data = base64.b64encode(ca_file.read_bytes()).decode()
    return {"apiVersion": "v1", "kind": "Config", "current-context": "tensafe-dev",
            "clusters": [{"name": "tensafe-dev", "cluster": {"server": server,
                                                             "certificate-authority-data": ca_data}}],
            "users": [{"name": "tensafe-dev", "user": {"token": token}}],
            "contexts": [{"name": "tensafe-dev", "context": {"cluster": "tensafe-dev", "user": "tensafe-dev",
                                                            "namespace": namespace}}]}


class DevCluster:
    """``with DevCluster(root) as cluster:`` gives a running cluster and ``cluster.kubeconfig_path``."""

    def __init__(self, root: Path, *, port: int = 0, operator: bool = False, namespace: str = "default",
                 extra_env: Optional[dict[str, str]] = None, operator_env: Optional[dict[str, str]] = None,
                 gpus: int = 0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_urlsafe(24)
        self.port = port or _free_port()
        self.server_url = f"https://127.0.0.1:{self.port}"
        self.ca_file, self._cert_file, self._key_file = write_serving_certificate(self.root / "pki")
        self.kubeconfig_path = self.root / "kubeconfig"
        self.namespace = namespace
        self.extra_env = extra_env or {}
        self.operator_env = operator_env or {}
        self.want_operator = operator
        self.gpus = gpus
        self.operator: Optional[subprocess.Popen] = None
        self.loop = asyncio.new_event_loop()
        self.store: Optional[Store] = None
        self.kubelet: Optional[LocalKubelet] = None
        self._server: Optional[uvicorn.Server] = None
        self._serving: Optional[Future] = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="devcluster", daemon=True)

    # ----- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> "DevCluster":
        self._thread.start()
        self.call(self._start)
        self._serve()
        self.kubeconfig_path.write_text(yaml.safe_dump(
            kubeconfig(self.server_url, self.token, self.ca_file, self.namespace)))
        os.chmod(self.kubeconfig_path, 0o600)
        if self.want_operator:
            self.start_operator()
        return self

    async def _start(self) -> None:
        self.store = Store()
        access = ApiAccess("127.0.0.1", self.port, self.ca_file, self.token)
        self.kubelet = LocalKubelet(self.store, self.root, extra_env=self.extra_env, gpus=self.gpus, api=access)
        self.kubelet.start()

    def _serve(self) -> None:
        config = uvicorn.Config(ApiServer(self.store, self.token).app, host="127.0.0.1", port=self.port,
                                log_level="warning", timeout_graceful_shutdown=1, lifespan="off",
                                ssl_certfile=str(self._cert_file), ssl_keyfile=str(self._key_file))
        self._server = uvicorn.Server(config)
        self._serving = asyncio.run_coroutine_threadsafe(self._server.serve(), self.loop)
        deadline = time.monotonic() + 10
        while not self._server.started:
            if self._serving.done() or time.monotonic() > deadline:
                raise RuntimeError(f"the API emulator did not start on port {self.port}")
            time.sleep(0.02)

    def _stop_serving(self) -> None:
        self._server.should_exit = True
        self._serving.result(15)

    def restart_apiserver(self, downtime_s: float = 1.0) -> None:
        """Stop serving the API (watches break, requests fail) and serve again on the same port; the
        stored objects survive, as etcd's do."""
        self._stop_serving()
        time.sleep(downtime_s)
        self._serve()

    def start_operator(self) -> None:
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig_path), **self.operator_env)
        log = open(self.root / "operator.log", "ab")
        self.operator = subprocess.Popen([sys.executable, "-m", "tensafe_operator"],  # all namespaces
                                         env=env, stdout=log, stderr=subprocess.STDOUT)

    def stop_operator(self) -> None:
        if self.operator is not None:
            self.operator.terminate()
            try:
                self.operator.wait(15)
            except subprocess.TimeoutExpired:
                self.operator.kill()
                self.operator.wait()
            self.operator = None

    def stop(self) -> None:
        self.stop_operator()
        if self.kubelet is not None:
            self.call(self.kubelet.stop)
        self._stop_serving()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "DevCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----- helpers for tests --------------------------------------------------------------------------
    def call(self, fn: Callable[..., Any], *args) -> Any:
        """Run ``fn`` (a coroutine function or a plain one) on the cluster's loop and return its result."""
        async def runner():
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result
        future: Future = asyncio.run_coroutine_threadsafe(runner(), self.loop)
        return future.result(60)

    def pod_pid(self, namespace: str, name: str) -> Optional[int]:
        return self.call(self.kubelet.pid_of, namespace, name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
