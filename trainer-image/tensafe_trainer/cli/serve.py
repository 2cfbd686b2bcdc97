"""``tensafe serve``: run the trainer server (pod entrypoint and embedded local backend alike)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional

import uvicorn

from tg_tinker.types import CreateTrainingClient

from tensafe_trainer.cli.hardening import disable_core_dumps
from tensafe_trainer.api.http_guard import MAX_HEADER_BYTES, GuardedH11Protocol
from tensafe_trainer.storage.paths import refuse_a_new_key_store_for_a_used_home, refuse_keys_inside_home, tensafe_home
from tensafe_trainer.api.app import create_app
from tensafe_trainer.service.trainer import Settings

TOKEN_ENV = "TENSAFE_AUTH_TOKEN"
TOKEN_FILE_ENV = "TENSAFE_AUTH_TOKEN_FILE"  # the token in a file instead (a Secret's, or the local backend's 0600 file)
CLIENT_CONFIG_ENV = "TENSAFE_CLIENT_CONFIG"
MAX_PENDING_ENV = "TENSAFE_MAX_PENDING"  # operations queued per client before submissions get 429
MAX_CLIENTS_ENV = "TENSAFE_MAX_CLIENTS"  # live clients (adapter slots) before creating one gets 429
HOST_ADAPTERS_ENV = "TENSAFE_HOST_ADAPTERS"  # LoRA clients one model host process carries (1: a process each)
HOST_IDLE_ENV = "TENSAFE_HOST_IDLE_S"  # seconds a shared host with no client stays warm
SHARE_HOSTS_ENV = "TENSAFE_SHARE_HOSTS_ACROSS_TENANTS"  # "1": clients of different tenants may share a host
MAX_CLIENTS_PER_TENANT_ENV = "TENSAFE_MAX_CLIENTS_PER_TENANT"  # of those, one tenant's (unset: no cap)
MIN_FREE_MEMORY_ENV = "TENSAFE_MIN_FREE_MEMORY"  # bytes the machine must have available to start a client
TINKER_KEY_FILE_ENV = "TENSAFE_TINKER_KEY_FILE"  # a trainer pod's Tinker API key, a file its Secret mounts
TINKER_MODEL_ROOTS_ENV = "TENSAFE_TINKER_MODEL_ROOTS"  # os.pathsep-separated folders Tinker keys may load models from


def _secret_from_file(env: str, what: str) -> Optional[str]:
    """The secret in the file ``$env`` names (a file, not an env value: /proc/<pid>/environ keeps a process's
    starting environment, whatever it pops later); None when ``$env`` is unset; an empty file stops the server."""
    path = os.environ.pop(env, None)
    if not path:
        return None
    secret = Path(path).read_text().strip()
    if not secret:
        raise SystemExit(f"{env} names {path}, which holds no {what}")
    return secret


def _model_roots(value: Optional[str]) -> Optional[tuple[Path, ...]]:
    """Unset: any folder; set: the folders it lists (set and empty: built-in models only)."""
    return None if value is None else tuple(Path(p) for p in value.split(os.pathsep) if p)


def _watch_parent(pid: int) -> None:
    """Exit when the process that started us is gone (the SDK's local backend)."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            _stop_engines(grace=0.0)  # os._exit runs no exit handler: nothing else would stop them
            os._exit(0)


ENGINE_STOP_GRACE_S = 5.0  # at shutdown, for engines to finish their operation and exit before they are killed


def _stop_engines(grace: float = ENGINE_STOP_GRACE_S) -> None:
    """Every engine process this server started ends with it: given ``grace`` seconds (their sessions were
    told to stop, and close them once their running operation is done), then killed. Engines also get
    SIGKILL from the kernel if the server dies first (hardening.die_with_parent)."""
    deadline = time.monotonic() + grace
    for child in multiprocessing.active_children():
        child.join(max(0.0, deadline - time.monotonic()))
    for child in multiprocessing.active_children():
        child.kill()
        child.join(5.0)


def run(host: str, port: int, home: Optional[Path], ready_file: Optional[Path], parent_pid: Optional[int],
        insecure_no_auth: bool, client_config: Optional[Path], log_level: str,
        tls_cert: Optional[Path] = None, tls_key: Optional[Path] = None, open_docs: bool = False,
        privacy_policy: Optional[Path] = None, allow_keys_in_home: bool = False) -> None:
    disable_core_dumps()  # before any secret is read: no core file of the server, nor of its keys (hardening.py)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Taken out of the environment either way: the engine processes this server spawns must not inherit it.
    env_token = os.environ.pop(TOKEN_ENV, None)
    token = _secret_from_file(TOKEN_FILE_ENV, "token") or env_token
    tinker_key = _secret_from_file(TINKER_KEY_FILE_ENV, "key")
    if not token and not insecure_no_auth:
        raise SystemExit(f"set {TOKEN_FILE_ENV} (or {TOKEN_ENV}) to the bearer token clients must present "
                         "(or pass --insecure-no-auth on a trusted network)")
    initial = None
    raw = client_config.read_text() if client_config else os.environ.get(CLIENT_CONFIG_ENV)
    if raw:
        initial = CreateTrainingClient.parse(json.loads(raw))
    if tinker_key and initial is None:
        raise SystemExit(f"{TINKER_KEY_FILE_ENV} opens the Tinker API for the tenant of the trainer's own client: "
                         f"set {CLIENT_CONFIG_ENV} too (or create keys with `tensafe tinker-key create`)")
    home = home or tensafe_home()
    if not allow_keys_in_home:
        refuse_keys_inside_home(home)
    refuse_a_new_key_store_for_a_used_home(home)
    settings = Settings(home=home, token=token or None, initial_client=initial,
                        max_pending=int(os.environ.get(MAX_PENDING_ENV, Settings.max_pending)),
                        max_clients=int(os.environ.get(MAX_CLIENTS_ENV, Settings.max_clients)),
                        max_clients_per_tenant=int(os.environ[MAX_CLIENTS_PER_TENANT_ENV])
                        if os.environ.get(MAX_CLIENTS_PER_TENANT_ENV) else None,
                        min_free_memory=int(os.environ.get(MIN_FREE_MEMORY_ENV, Settings.min_free_memory)),
                        host_adapters=int(os.environ.get(HOST_ADAPTERS_ENV, Settings.host_adapters)),
                        host_idle_s=float(os.environ.get(HOST_IDLE_ENV, Settings.host_idle_s)),
                        share_hosts_across_tenants=os.environ.get(SHARE_HOSTS_ENV, "") == "1",
                        open_docs=open_docs, privacy_policy=privacy_policy, tinker_key=tinker_key,
                        tinker_model_roots=_model_roots(os.environ.get(TINKER_MODEL_ROOTS_ENV)))
    app = create_app(settings)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only then, and without it
    # every keep-alive response waits out the client's 40 ms delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    if parent_pid:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    if bool(tls_cert) != bool(tls_key):
        raise SystemExit("--tls-cert and --tls-key go together")
    config = uvicorn.Config(app, log_level=log_level.lower(), access_log=False, timeout_keep_alive=30,
                            http=GuardedH11Protocol, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                            ssl_certfile=str(tls_cert) if tls_cert else None,
                            ssl_keyfile=str(tls_key) if tls_key else None)
    server = uvicorn.Server(config)
    if ready_file:
        original_startup = server.startup

        async def startup(sockets=None):
            await original_startup(sockets=sockets)
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"host": host, "port": bound_port, "pid": os.getpid()}))
            os.replace(tmp, ready_file)

        server.startup = startup
    original_shutdown = server.shutdown

    async def shutdown(sockets=None):  # uvicorn re-raises SIGTERM after this: no exit handler runs after it
        await original_shutdown(sockets=sockets)
        _stop_engines()

    server.shutdown = shutdown
    logging.getLogger("tensafe.trainer").info("serving %s on %s:%d (data in %s)", "https" if tls_cert else "http",
                                              host, bound_port, settings.home)
    server.run(sockets=[sock])
