"""A local kubelet: runs each Pod of the emulated cluster as a local process on its own loopback address.

What a kubelet does, as far as the trainer pods need it: pull nothing (images map to local entrypoints),
mount volumes (PersistentVolumeClaims, emptyDirs and Secrets become host folders), resolve env from
values, Secrets and the downward API, start the container, run its readiness probe, and report phase,
pod IP, container state and conditions. Each pod gets 127.0.0.N (sticky per pod name) so every pod can
listen on the same port, as in a real cluster.

The emulated network and mount namespaces are the two translations it makes: a wildcard bind address
in the args becomes the pod IP, and any env value or arg under a volume's mount path is rewritten to
that volume's host folder. Processes are not isolated (no cgroups, no chroot, same user).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import logging
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx

from .store import ApiError, Event, Store, now

log = logging.getLogger("tensafe.devcluster.kubelet")
PODS = ("", "pods")
PVCS = ("", "persistentvolumeclaims")
SECRETS = ("", "secrets")
CONFIGMAPS = ("", "configmaps")
PROBE_PERIOD_S = 1.0
TERMINATION_GRACE_S = 5.0
SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass(frozen=True)
class ApiAccess:
    """What a pod's service account mount and KUBERNETES_SERVICE_* env carry: the emulator's address, its CA
    and a token it accepts."""

    host: str
    port: int
    ca_file: Path
    token: str


def default_images() -> dict[str, list[str]]:
    """Image name (without registry and tag) -> the local command that is that image's entrypoint."""
    return {"tensafe-trainer": [sys.executable, "-m", "tensafe_trainer", "serve"]}


def image_name(image: str) -> str:
    return image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]


class PodStartError(Exception):
    """The pod cannot start yet (missing Secret or claim): reported as a waiting reason, retried."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class LocalKubelet:
    def __init__(self, store: Store, root: Path, *, images: Optional[dict[str, list[str]]] = None,
                 extra_env: Optional[dict[str, str]] = None, gpus: int = 0, api: Optional[ApiAccess] = None):
        self.store = store
        self.api = api
        self.capacity = {"nvidia.com/gpu": gpus}  # extended resources this node has
        self.root = Path(root)
        self.images = images or default_images()
        self.extra_env = extra_env or {}
        self.tasks: dict[str, asyncio.Task] = {}  # pod uid -> its runner
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.addresses: dict[tuple[str, str], str] = {}  # (namespace, pod name) -> 127.0.0.N

    def start(self) -> None:
        self.store.listeners.append(self._on_event)
        for pod in self.store.list(PODS, None):
            self._start_pod(pod)
        for claim in self.store.list(PVCS, None):
            asyncio.get_running_loop().call_soon(self._bind_claim, claim)

    async def stop(self) -> None:
        self.store.listeners.remove(self._on_event)
        for uid in list(self.tasks):
            await self._kill(uid)

    def pid_of(self, namespace: str, name: str) -> Optional[int]:
        try:
            uid = self.store.get(PODS, namespace, name)["metadata"]["uid"]
        except ApiError:
            return None
        process = self.processes.get(uid)
        return process.pid if process and process.returncode is None else None

    # ----- events -------------------------------------------------------------------------------------
    def _on_event(self, event: Event) -> None:
        loop = asyncio.get_running_loop()
        if event.key == PODS and event.type == "ADDED":
            loop.call_soon(self._start_pod, event.obj)
        elif event.key == PODS and event.type == "DELETED":
            loop.create_task(self._kill(event.obj["metadata"]["uid"]))
        elif event.key == PVCS and event.type == "ADDED":
            loop.call_soon(self._bind_claim, event.obj)

    def _bind_claim(self, claim: dict) -> None:
        """The storage provisioner: every claim binds at once to a host folder."""
        meta = claim["metadata"]
        with_status = copy.deepcopy(claim)
        with_status["status"] = {"phase": "Bound", "accessModes": claim["spec"].get("accessModes", []),
                                 "capacity": (claim["spec"].get("resources") or {}).get("requests", {})}
        self._volume_root(meta["namespace"], meta["name"]).mkdir(parents=True, exist_ok=True)
        self._write_status(PVCS, meta["namespace"], meta["name"], with_status["status"])

    def _start_pod(self, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        if uid not in self.tasks:
            self.tasks[uid] = asyncio.get_running_loop().create_task(self._run(pod))

    # ----- running a pod ------------------------------------------------------------------------------
    async def _run(self, pod: dict) -> None:
        meta = pod["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        ip = self._address(namespace, name)
        container = pod["spec"]["containers"][0]
        for resource, wanted in ((container.get("resources") or {}).get("limits") or {}).items():
            if resource in self.capacity and int(wanted) > self.capacity[resource]:
                # What the scheduler would say: the pod stays Pending until a node has the resource.
                self._report(pod, "Pending", ip=None, unschedulable=f"0/1 nodes are available: 1 Insufficient "
                             f"{resource} (requested {wanted}, the local node has {self.capacity[resource]})")
                return
        while True:
            try:
                command, env, mounts = self._prepare(pod, container, ip)
                break
            except PodStartError as error:
                self._report(pod, "Pending", waiting=(error.reason, str(error)), ip=None)
                await asyncio.sleep(1.0)
                if not self._exists(namespace, name, uid):
                    return
        log_path = self.root / "logs" / f"{namespace}_{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_file:
            process = await asyncio.create_subprocess_exec(*command, env=env, stdout=log_file, stderr=log_file,
                                                           cwd=mounts.get("/tmp", str(self.root)),
                                                           start_new_session=True)
        self.processes[uid] = process
        started = now()
        self._report(pod, "Running", running=started, ip=ip, ready=False)
        probe = container.get("readinessProbe")
        ready = probe is None
        if ready:
            self._report(pod, "Running", running=started, ip=ip, ready=True)
        async with httpx.AsyncClient(timeout=2.0, verify=False) as client:  # as a kubelet's probes: no CA check
            while process.returncode is None:
                if probe is not None:
                    now_ready = await self._probe(client, probe, container, ip)
                    if now_ready != ready:
                        ready = now_ready
                        self._report(pod, "Running", running=started, ip=ip, ready=ready)
                try:
                    await asyncio.wait_for(process.wait(), PROBE_PERIOD_S)
                except asyncio.TimeoutError:
                    pass
        code = process.returncode
        self.processes.pop(uid, None)
        if self._exists(namespace, name, uid):
            log.info("pod %s/%s exited with code %s", namespace, name, code)
            self._report(pod, "Succeeded" if code == 0 else "Failed", terminated=(code, started), ip=ip)

    async def _probe(self, client: httpx.AsyncClient, probe: dict, container: dict, ip: str) -> bool:
        check = probe.get("httpGet")
        if not check:
            return True
        port = check["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in container.get("ports", []) if p.get("name") == port)
        scheme = check.get("scheme", "HTTP").lower()
        try:
            response = await client.get(f"{scheme}://{ip}:{port}{check.get('path', '/')}")
            return 200 <= response.status_code < 400
        except httpx.HTTPError:
            return False

    async def _kill(self, uid: str) -> None:
        task = self.tasks.pop(uid, None)
        process = self.processes.pop(uid, None)
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), TERMINATION_GRACE_S)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        if task is not None:
            task.cancel()
        shutil.rmtree(self.root / "pods" / uid, ignore_errors=True)

    # ----- pod spec to a local process ----------------------------------------------------------------
    def _prepare(self, pod: dict, container: dict, ip: str) -> tuple[list[str], dict[str, str], dict[str, str]]:
        meta = pod["metadata"]
        namespace = meta["namespace"]
        volumes = {v["name"]: self._volume(pod, v) for v in pod["spec"].get("volumes", [])}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self.extra_env}
        if pod["spec"].get("automountServiceAccountToken", True) and self.api is not None:
            mounts[SERVICEACCOUNT_DIR] = self._service_account_folder(pod)
            env.update(KUBERNETES_SERVICE_HOST=self.api.host, KUBERNETES_SERVICE_PORT=str(self.api.port))
        fields = {"metadata.name": meta["name"], "metadata.namespace": namespace, "metadata.uid": meta["uid"],
                  "status.podIP": ip, "status.hostIP": "127.0.0.1", "spec.nodeName": "local"}
        for item in container.get("env", []):
            if "value" in item:
                value = _expand(item["value"], env)
            else:
                source = item["valueFrom"]
                if "secretKeyRef" in source:
                    value = self._key_value(SECRETS, namespace, source["secretKeyRef"])
                elif "configMapKeyRef" in source:
                    value = self._key_value(CONFIGMAPS, namespace, source["configMapKeyRef"])
                else:
                    value = fields[source["fieldRef"]["fieldPath"]]
            env[item["name"]] = _rewrite(value, mounts)
        entry = container.get("command") or self.images.get(image_name(container["image"]))
        if entry is None:
            raise PodStartError("ErrImageNeverPull", f"image {container['image']!r} is not known to the local "
                                f"kubelet (it runs {sorted(self.images)})")
        args = [_rewrite(_expand(a, env), mounts) for a in container.get("args", [])]
        args = [ip if a == "0.0.0.0" else a for a in args]  # a wildcard bind inside the pod's network namespace
        return list(entry) + args, env, mounts

    def _service_account_folder(self, pod: dict) -> str:
        """The projected service account volume: token, ca.crt, namespace."""
        folder = self.root / "pods" / pod["metadata"]["uid"] / "serviceaccount"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "token").write_text(self.api.token)
        (folder / "ca.crt").write_bytes(Path(self.api.ca_file).read_bytes())
        (folder / "namespace").write_text(pod["metadata"]["namespace"])
        for path in folder.iterdir():
            os.chmod(path, 0o400)
        return str(folder)

    def _volume(self, pod: dict, volume: dict) -> str:
        namespace, uid = pod["metadata"]["namespace"], pod["metadata"]["uid"]
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            try:
                bound = self.store.get(PVCS, namespace, claim).get("status", {}).get("phase") == "Bound"
            except ApiError:
                bound = False
            if not bound:
                raise PodStartError("Unschedulable", f'persistentvolumeclaim "{claim}" not found or not bound')
            return str(self._volume_root(namespace, claim))
        folder = self.root / "pods" / uid / volume["name"]
        folder.mkdir(parents=True, exist_ok=True)
        if "secret" in volume:
            self._project(folder, self._object(SECRETS, namespace, volume["secret"]["secretName"]), volume["secret"],
                          decode=True)
        elif "configMap" in volume:
            self._project(folder, self._object(CONFIGMAPS, namespace, volume["configMap"]["name"]),
                          volume["configMap"], decode=False)
        elif "emptyDir" not in volume:
            raise PodStartError("VolumeNotSupported", f"volume {volume['name']!r}: only persistentVolumeClaim, "
                                "emptyDir, secret and configMap volumes run on the local kubelet")
        return str(folder)

    def _project(self, folder: Path, obj: dict, source: dict, decode: bool) -> None:
        data = obj.get("data") or {}
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        mode = source.get("defaultMode", 0o644)
        for item in items:
            if item["key"] not in data:
                raise PodStartError("CreateContainerConfigError", f"key {item['key']!r} not found")
            value = data[item["key"]]
            path = folder / item["path"]
            path.write_bytes(base64.b64decode(value) if decode else value.encode())
            os.chmod(path, item.get("mode", mode))

    def _object(self, key, namespace: str, name: str) -> dict:
        try:
            return self.store.get(key, namespace, name)
        except ApiError:
            kind = "secret" if key == SECRETS else "configmap"
            raise PodStartError("CreateContainerConfigError", f'{kind} "{name}" not found') from None

    def _key_value(self, key, namespace: str, ref: dict) -> str:
        """One key of a Secret (base64 in the object) or a ConfigMap (plain text)."""
        data = self._object(key, namespace, ref["name"]).get("data") or {}
        if ref["key"] not in data:
            kind = "Secret" if key == SECRETS else "ConfigMap"
            raise PodStartError("CreateContainerConfigError", f"couldn't find key {ref['key']} in {kind} "
                                f"{namespace}/{ref['name']}")
        value = data[ref["key"]]
        return base64.b64decode(value).decode() if key == SECRETS else value

    def _volume_root(self, namespace: str, claim: str) -> Path:
        return self.root / "volumes" / namespace / claim

    def _address(self, namespace: str, name: str) -> str:
        if (namespace, name) not in self.addresses:
            self.addresses[(namespace, name)] = f"127.0.0.{len(self.addresses) + 2}"
            if len(self.addresses) > 250:
                raise RuntimeError("the local kubelet ran out of loopback addresses")
        return self.addresses[(namespace, name)]

    # ----- status -------------------------------------------------------------------------------------
    def _exists(self, namespace: str, name: str, uid: str) -> bool:
        try:
            return self.store.get(PODS, namespace, name)["metadata"]["uid"] == uid
        except ApiError:
            return False

    def _report(self, pod: dict, phase: str, *, ip: Optional[str], running: Optional[str] = None,
                ready: bool = False, waiting: Optional[tuple[str, str]] = None,
                terminated: Optional[tuple[int, str]] = None, unschedulable: Optional[str] = None) -> None:
        container = pod["spec"]["containers"][0]
        if unschedulable:
            self._write_status(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"], {
                "phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                    "reason": "Unschedulable", "message": unschedulable,
                                                    "lastTransitionTime": now()}]},
                pod["metadata"]["uid"])
            return
        state: dict
        if waiting:
            state = {"waiting": {"reason": waiting[0], "message": waiting[1]}}
        elif terminated:
            code, started = terminated
            state = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                    "startedAt": started, "finishedAt": now()}}
        else:
            state = {"running": {"startedAt": running}}
        condition = "True" if ready else "False"
        status = {"phase": phase, "hostIP": "127.0.0.1", "startTime": pod["metadata"]["creationTimestamp"],
                  "conditions": [{"type": t, "status": s, "lastTransitionTime": now()} for t, s in (
                      ("PodScheduled", "True"), ("Initialized", "True"), ("ContainersReady", condition),
                      ("Ready", condition))],
                  "containerStatuses": [{"name": container["name"], "image": container["image"],
                                         "imageID": "", "ready": ready, "restartCount": 0,
                                         "started": bool(running), "state": state}]}
        if ip and not waiting:
            status["podIP"] = ip
            status["podIPs"] = [{"ip": ip}]
        self._write_status(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"], status,
                           pod["metadata"]["uid"])

    def _write_status(self, key, namespace: str, name: str, status: dict, uid: Optional[str] = None) -> None:
        try:
            current = self.store.get(key, namespace, name)
            if uid is not None and current["metadata"]["uid"] != uid:
                return
            current["status"] = status
            current["metadata"].pop("resourceVersion", None)
            self.store.update(key, namespace, name, current, subresource="status")
        except ApiError:
            pass  # deleted meanwhile


def _expand(value: str, env: dict[str, str]) -> str:
    for name, replacement in env.items():
        value = value.replace(f"$({name})", replacement)
    return value


def _rewrite(value: str, mounts: dict[str, str]) -> str:
    for mount_path, host_path in sorted(mounts.items(), key=lambda m: -len(m[0])):
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            return host_path + value[len(mount_path.rstrip("/")):]
    return value
