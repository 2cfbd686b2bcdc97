"""The API server's state: resource types, objects, resourceVersions, watch fan-out, garbage collection.

Everything runs on one asyncio loop (the emulator's), so the methods are plain synchronous code and a
watch is an ``asyncio.Queue`` fed as objects change. ``resourceVersion`` is one global counter, as
etcd's revision is; the last ``HISTORY`` events are kept so that a watch can resume from a version.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import datetime
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from . import validation

HISTORY = 20_000
NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: Optional[dict] = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message,
                "reason": self.reason, "details": self.details, "code": self.code}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    short_names: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    has_status: bool = False
    schema: Optional[dict] = None  # openAPIV3Schema of a custom resource
    printer_columns: list[dict] = field(default_factory=list)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str]:
        return self.group, self.plural

    @property
    def singular(self) -> str:
        return self.kind.lower()


BUILTIN_TYPES = [
    ResourceType("", "v1", "namespaces", "Namespace", namespaced=False, short_names=["ns"], has_status=True),
    ResourceType("", "v1", "pods", "Pod", short_names=["po"], categories=["all"], has_status=True),
    ResourceType("", "v1", "services", "Service", short_names=["svc"], categories=["all"], has_status=True),
    ResourceType("", "v1", "secrets", "Secret"),
    ResourceType("", "v1", "configmaps", "ConfigMap", short_names=["cm"]),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", short_names=["sa"]),
    ResourceType("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", short_names=["pvc"],
                 has_status=True),
    ResourceType("", "v1", "events", "Event", short_names=["ev"]),
    ResourceType("events.k8s.io", "v1", "events", "Event", short_names=["ev"]),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease"),
    # Stored and served, never enforced: the emulator has no RBAC (any token it issued may do anything).
    ResourceType("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    ResourceType("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
                 namespaced=False, short_names=["crd", "crds"], has_status=True),
]
CRD_KEY = ("apiextensions.k8s.io", "customresourcedefinitions")
NAMESPACE_KEY = ("", "namespaces")


@dataclass
class Event:
    rv: int
    key: tuple[str, str]
    namespace: str
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict


@dataclass(eq=False)  # hashed by identity: one per open watch
class Watcher:
    key: tuple[str, str]
    namespace: Optional[str]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class Store:
    def __init__(self) -> None:
        self.revision = 0
        self.compacted = 0  # the history holds every event after this revision
        self.types: dict[tuple[str, str], ResourceType] = {t.key: t for t in BUILTIN_TYPES}
        self.objects: dict[tuple[str, str], dict[tuple[str, str], dict]] = collections.defaultdict(dict)
        self.history: collections.deque[Event] = collections.deque(maxlen=HISTORY)
        self.watchers: set[Watcher] = set()
        self.listeners: list[Callable[[Event], None]] = []  # in-process observers (the local kubelet)
        for name in ("default", "kube-system", "kube-public"):
            self.create(NAMESPACE_KEY, "", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    # ----- lookup -------------------------------------------------------------------------------------
    def type_of(self, group: str, version: str, plural: str) -> ResourceType:
        rtype = self.types.get((group, plural))
        if rtype is None or rtype.version != version:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({plural})")
        return rtype

    def get(self, key: tuple[str, str], namespace: str, name: str) -> dict:
        obj = self.objects[key].get((namespace, name))
        if obj is None:
            rtype = self.types[key]
            resource = f"{rtype.plural}.{rtype.group}" if rtype.group else rtype.plural
            raise ApiError(404, "NotFound", f'{resource} "{name}" not found',
                           {"name": name, "group": rtype.group, "kind": rtype.plural})
        return copy.deepcopy(obj)

    def list(self, key: tuple[str, str], namespace: Optional[str],
             match: Callable[[dict], bool] = lambda obj: True) -> list[dict]:
        return [copy.deepcopy(obj) for (ns, _), obj in sorted(self.objects[key].items())
                if (namespace is None or ns == namespace) and match(obj)]

    # ----- writes -------------------------------------------------------------------------------------
    def create(self, key: tuple[str, str], namespace: str, body: dict, *, strict: bool = False) -> dict:
        rtype = self.types[key]
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        name = meta.get("name") or ""
        if not NAME.match(name) or len(name) > 253:
            raise ApiError(422, "Invalid", f'{rtype.kind} "{name}" is invalid: metadata.name: Invalid value: '
                           f'"{name}": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric '
                           "characters, '-' or '.'")
        if rtype.namespaced:
            if meta.get("namespace") not in (None, "", namespace):
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the "
                               "namespace sent on the request")
            if (("", namespace)) not in self.objects[NAMESPACE_KEY]:
                raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found')
            meta["namespace"] = namespace
        else:
            namespace = ""
            meta.pop("namespace", None)
        if (namespace, name) in self.objects[key]:
            raise ApiError(409, "AlreadyExists", f'{self._resource(rtype)} "{name}" already exists',
                           {"name": name, "kind": rtype.plural})
        obj["apiVersion"], obj["kind"] = rtype.api_version, rtype.kind
        if rtype.has_status and rtype.schema is not None:
            obj.pop("status", None)  # the status subresource is written separately
        obj = self._admit(rtype, obj, None, strict)
        meta = obj["metadata"]
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
        meta.pop("deletionTimestamp", None)
        self._commit(key, namespace, name, obj, "ADDED")
        if key == CRD_KEY:
            self._register_crd(obj)
        return copy.deepcopy(self.objects[key][(namespace, name)])

    def update(self, key: tuple[str, str], namespace: str, name: str, body: dict, *,
               subresource: str = "", strict: bool = False) -> dict:
        rtype = self.types[key]
        old = self.get(key, namespace, name)
        sent_rv = (body.get("metadata") or {}).get("resourceVersion")
        if sent_rv and sent_rv != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {self._resource(rtype)} "{name}": '
                           "the object has been modified; please apply your changes to the latest version "
                           "and try again")
        new = copy.deepcopy(body)
        new["apiVersion"], new["kind"] = rtype.api_version, rtype.kind
        if subresource == "status":
            status = new.get("status")
            new = copy.deepcopy(old)
            if status is None:
                new.pop("status", None)
            else:
                new["status"] = status
        else:
            if rtype.has_status:
                if "status" in old:
                    new["status"] = old["status"]
                else:
                    new.pop("status", None)
            meta = new.setdefault("metadata", {})
            for frozen in ("uid", "creationTimestamp", "generation", "deletionTimestamp", "namespace", "name"):
                if frozen in old["metadata"]:
                    meta[frozen] = old["metadata"][frozen]
                else:
                    meta.pop(frozen, None)
        new = self._admit(rtype, new, old, strict)
        if _content(new) == _content(old) and new["metadata"] == old["metadata"]:
            return old  # a no-op write does not bump the resourceVersion
        if _content(new, "spec") != _content(old, "spec"):
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._remove(key, namespace, name, new)
            return new
        self._commit(key, namespace, name, new, "MODIFIED")
        if key == CRD_KEY:
            self._register_crd(new)
        return copy.deepcopy(self.objects[key][(namespace, name)])

    def delete(self, key: tuple[str, str], namespace: str, name: str, propagation: str = "Background") -> dict:
        obj = self.get(key, namespace, name)
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                obj["metadata"]["deletionTimestamp"] = now()
                obj["metadata"]["deletionGracePeriodSeconds"] = 0
                self._commit(key, namespace, name, obj, "MODIFIED")
            return copy.deepcopy(self.objects[key][(namespace, name)])
        self._remove(key, namespace, name, obj, propagation)
        return obj

    # ----- internals ----------------------------------------------------------------------------------
    @staticmethod
    def _resource(rtype: ResourceType) -> str:
        return f"{rtype.plural}.{rtype.group}" if rtype.group else rtype.plural

    def _admit(self, rtype: ResourceType, obj: dict, old: Optional[dict], strict: bool) -> dict:
        if rtype.schema is None:
            return obj
        body = {k: v for k, v in obj.items() if k != "metadata"}
        body, dropped = validation.prune(body, rtype.schema)
        name = obj["metadata"].get("name", "")
        if dropped and strict:
            raise ApiError(422, "Invalid", f'{rtype.kind}.{rtype.group} "{name}" is invalid: strict decoding '
                           f'error: {", ".join(f"unknown field {p!r}" for p in dropped)}')
        body = validation.apply_defaults(body, rtype.schema)
        errors = validation.schema_errors(dict(body, metadata={}), rtype.schema)
        errors += validation.rule_errors(body, old, rtype.schema)
        if errors:
            raise ApiError(422, "Invalid", f'{rtype.kind}.{rtype.group} "{name}" is invalid: ' + "; ".join(errors),
                           {"name": name, "group": rtype.group, "kind": rtype.kind,
                            "causes": [{"reason": "FieldValueInvalid", "message": e} for e in errors]})
        return dict(body, metadata=obj["metadata"])

    def _commit(self, key, namespace, name, obj, event_type) -> None:
        self.revision += 1
        obj["metadata"]["resourceVersion"] = str(self.revision)
        self.objects[key][(namespace, name)] = obj
        self._emit(Event(self.revision, key, namespace, event_type, copy.deepcopy(obj)))

    def _remove(self, key, namespace, name, obj, propagation: str = "Background") -> None:
        self.objects[key].pop((namespace, name), None)
        self.revision += 1
        obj["metadata"]["resourceVersion"] = str(self.revision)
        self._emit(Event(self.revision, key, namespace, "DELETED", copy.deepcopy(obj)))
        if key == CRD_KEY:
            self._unregister_crd(obj)
        elif key == NAMESPACE_KEY:
            for other in list(self.objects):
                for (ns, child) in [k for k in self.objects[other] if k[0] == name]:
                    self._force_remove(other, ns, child)
        self._collect_garbage(obj["metadata"]["uid"], propagation)

    def _force_remove(self, key, namespace, name) -> None:
        obj = self.objects[key].get((namespace, name))
        if obj is not None:
            obj = copy.deepcopy(obj)
            obj["metadata"].pop("finalizers", None)
            self._remove(key, namespace, name, obj)

    def _collect_garbage(self, owner_uid: str, propagation: str) -> None:
        """The garbage collector: dependents of a deleted owner go too (or lose the reference, if orphaned)."""
        for key, objects in list(self.objects.items()):
            for (namespace, name), obj in list(objects.items()):
                refs = obj["metadata"].get("ownerReferences") or []
                if not any(ref.get("uid") == owner_uid for ref in refs):
                    continue
                if propagation == "Orphan":
                    obj = copy.deepcopy(obj)
                    obj["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != owner_uid]
                    self._commit(key, namespace, name, obj, "MODIFIED")
                elif (namespace, name) in self.objects[key]:
                    self.delete(key, namespace, name)

    def _emit(self, event: Event) -> None:
        self.history.append(event)
        for watcher in list(self.watchers):
            if watcher.key == event.key and watcher.namespace in (None, event.namespace):
                watcher.queue.put_nowait(event)
        for listener in self.listeners:
            listener(event)

    def compact(self) -> None:
        """Forget the event history, as etcd's compaction does: older watches must relist (410)."""
        self.compacted = self.revision
        self.history.clear()

    def events_since(self, key: tuple[str, str], namespace: Optional[str], rv: int) -> Iterable[Event]:
        """Events after ``rv``; ``ApiError(410)`` if they are no longer kept."""
        oldest = self.history[0].rv - 1 if len(self.history) == self.history.maxlen else self.compacted
        if rv < oldest:
            raise ApiError(410, "Expired", f"too old resource version: {rv} ({oldest})")
        return [e for e in self.history if e.rv > rv and e.key == key and namespace in (None, e.namespace)]

    def _register_crd(self, crd: dict) -> None:
        spec = crd["spec"]
        served = [v for v in spec["versions"] if v.get("served", True)]
        version = next((v for v in served if v.get("storage")), served[0])
        names = spec["names"]
        self.types[(spec["group"], names["plural"])] = ResourceType(
            spec["group"], version["name"], names["plural"], names["kind"],
            namespaced=spec.get("scope", "Namespaced") == "Namespaced", short_names=names.get("shortNames", []),
            categories=names.get("categories", []), has_status="status" in (version.get("subresources") or {}),
            schema=(version.get("schema") or {}).get("openAPIV3Schema") or {"type": "object",
                                                                          "x-kubernetes-preserve-unknown-fields": True},
            printer_columns=version.get("additionalPrinterColumns") or [])
        if not crd.get("status", {}).get("conditions"):
            established = copy.deepcopy(self.objects[CRD_KEY][("", crd["metadata"]["name"])])
            established["status"] = {"acceptedNames": names, "storedVersions": [version["name"]], "conditions": [
                {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": now()}
                for t, r, m in (("NamesAccepted", "NoConflicts", "no conflicts found"),
                                ("Established", "InitialNamesAccepted", "the initial names have been accepted"))]}
            self._commit(CRD_KEY, "", crd["metadata"]["name"], established, "MODIFIED")

    def _unregister_crd(self, crd: dict) -> None:
        key = (crd["spec"]["group"], crd["spec"]["names"]["plural"])
        for namespace, name in list(self.objects.get(key, {})):
            self._force_remove(key, namespace, name)
        self.types.pop(key, None)


def _content(obj: dict, only: Optional[str] = None) -> Any:
    if only:
        return obj.get(only)
    return {k: v for k, v in obj.items() if k != "metadata"}
