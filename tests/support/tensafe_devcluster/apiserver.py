"""The Kubernetes API over HTTP, as much of it as kopf, the ``kubernetes`` client and ``kubectl`` use:
discovery, OpenAPI v3, CRUD, the status subresource, four patch formats, list, watch (resume,
timeouts, bookmarks), selectors, Table output for ``kubectl get`` and garbage collection.
"""

from __future__ import annotations

import asyncio
import datetime
import hmac
import json
import time
from typing import Any, Optional
from urllib.parse import parse_qs

import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import protobuf
from .patch import PatchError, apply_patch
from .selectors import field_matcher, label_matcher
from .store import ApiError, ResourceType, Store, Watcher

KUBE_VERSION = {"major": "1", "minor": "37", "gitVersion": "v1.37.0-tensafe-devcluster", "platform": "linux/amd64"}
DEFAULT_WATCH_TIMEOUT_S = 1800
BOOKMARK_INTERVAL_S = 20.0
VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


def _json(data: Any, status: int = 200) -> Response:
    return JSONResponse(data, status_code=status)


class ApiServer:
    def __init__(self, store: Store, token: Optional[str] = None):
        self.store = store
        self.token = token
        self.app = Starlette(routes=[Route("/{path:path}", self.dispatch,
                                           methods=["GET", "POST", "PUT", "PATCH", "DELETE"])])

    # ----- entry point --------------------------------------------------------------------------------
    async def dispatch(self, request: Request) -> Response:
        try:
            if self.token is not None and request.url.path not in ("/healthz", "/readyz", "/livez"):
                scheme, _, sent = request.headers.get("authorization", "").partition(" ")
                # The scheme is case-insensitive (RFC 7235): the Python client's in-cluster loader sends "bearer".
                if scheme.lower() != "bearer" or not hmac.compare_digest(sent.encode(), self.token.encode()):
                    raise ApiError(401, "Unauthorized", "Unauthorized")
            return await self._route(request)
        except ApiError as error:
            return _json(error.status(), error.code)
        except UnsupportedMediaType as error:  # a body this server cannot read (kubectl does not retry as JSON)
            return _json(ApiError(415, "UnsupportedMediaType", str(error)).status(), 415)
        except (PatchError, ValueError, KeyError, TypeError) as error:
            return _json(ApiError(400, "BadRequest", f"bad request: {error}").status(), 400)

    async def _route(self, request: Request) -> Response:
        parts = [p for p in request.url.path.split("/") if p]
        if not parts or parts[0] in ("healthz", "readyz", "livez"):
            return Response("ok")
        if parts == ["version"]:
            return _json(KUBE_VERSION)
        if parts[0] == "openapi":
            return self._openapi(parts[1:])
        if parts == ["api"]:
            return _json({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": request.url.netloc}]})
        if parts == ["apis"]:
            return _json(self._group_list())
        if parts[0] == "api":
            group, version, rest = "", parts[1] if len(parts) > 1 else "", parts[2:]
        elif parts[0] == "apis" and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        elif parts[0] == "apis" and len(parts) == 2:
            return _json(self._group(parts[1]))
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if not rest:
            return _json(self._resource_list(group, version))
        return await self._resource(request, group, version, rest)

    async def _resource(self, request: Request, group: str, version: str, rest: list[str]) -> Response:
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, plural, name, sub = rest[1], rest[2], _at(rest, 3), _at(rest, 4)
        else:
            namespace, plural, name, sub = None, rest[0], _at(rest, 1), _at(rest, 2)
        rtype = self.store.type_of(group, version, plural)
        if not rtype.namespaced:
            if namespace is not None:
                raise ApiError(404, "NotFound", f"{plural} is not namespaced")
            namespace = ""
        if sub not in ("", "status"):
            raise ApiError(404, "NotFound", f"subresource {sub!r} is not served by this cluster")
        query = {k: v[-1] for k, v in parse_qs(request.url.query).items()}
        method = request.method
        key = rtype.key
        strict = query.get("fieldValidation") == "Strict"
        dry_run = bool(query.get("dryRun"))
        if name == "":
            if method == "GET":
                match = _matcher(query)
                if query.get("watch") in ("1", "true"):
                    return self._watch(rtype, namespace, query, match)
                return self._list(request, rtype, namespace, match)
            if method == "POST":
                body = await _body(request)
                if dry_run:
                    return _json(body, 201)
                return _json(self.store.create(key, namespace or "", body, strict=strict), 201)
            if method == "DELETE":
                match = _matcher(query)
                for obj in self.store.list(key, namespace or None, match):
                    self.store.delete(key, obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
                return _json({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}})
        else:
            ns = namespace or ""
            if method == "GET":
                obj = self.store.get(key, ns, name)
                return self._table(request, rtype, [obj]) if _wants_table(request) else _json(obj)
            if method == "PUT":
                return _json(self.store.update(key, ns, name, await _body(request), subresource=sub, strict=strict))
            if method == "PATCH":
                return _json(await self._patch(request, rtype, ns, name, sub, strict))
            if method == "DELETE":
                options = await _body(request, required=False) or {}
                propagation = options.get("propagationPolicy") or query.get("propagationPolicy") or "Background"
                return _json(self.store.delete(key, ns, name, propagation))
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")

    async def _patch(self, request: Request, rtype: ResourceType, ns: str, name: str, sub: str, strict: bool):
        content_type = request.headers.get("content-type", "application/merge-patch+json")
        raw = await request.body()
        patch = yaml.safe_load(raw) if "yaml" in content_type else json.loads(raw or b"null")
        try:
            current = self.store.get(rtype.key, ns, name)
        except ApiError:
            if content_type.startswith("application/apply-patch"):  # server-side apply may create
                return self.store.create(rtype.key, ns, patch, strict=strict)
            raise
        # The current resourceVersion rides along, so a patch conflicts only if it names an older one itself.
        patched = apply_patch(current, patch, content_type)
        return self.store.update(rtype.key, ns, name, patched, subresource=sub, strict=strict)

    # ----- list, watch, table -------------------------------------------------------------------------
    def _list(self, request: Request, rtype: ResourceType, namespace: Optional[str], match) -> Response:
        items = self.store.list(rtype.key, namespace or None, match)
        if _wants_table(request):
            return self._table(request, rtype, items)
        return _json({"kind": f"{rtype.kind}List", "apiVersion": rtype.api_version,
                      "metadata": {"resourceVersion": str(self.store.revision)}, "items": items})

    def _watch(self, rtype: ResourceType, namespace: Optional[str], query: dict, match) -> Response:
        store = self.store
        watcher = Watcher(rtype.key, namespace or None)
        store.watchers.add(watcher)  # registered before the snapshot: no event can fall in between
        rv = query.get("resourceVersion", "")
        initial_end = query.get("sendInitialEvents") == "true"
        bookmarks = query.get("allowWatchBookmarks") in ("1", "true")
        timeout = float(query.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT_S)
        lines: list[dict] = []
        try:
            if rv in ("", "0") or initial_end:
                lines = [{"type": "ADDED", "object": obj} for obj in store.list(rtype.key, namespace or None, match)]
                last = store.revision
            else:
                last = int(rv)
                lines = [{"type": e.type, "object": e.obj} for e in store.events_since(rtype.key, namespace, last)
                         if match(e.obj)]
                last = max([last] + [int(line["object"]["metadata"]["resourceVersion"]) for line in lines])
        except ApiError as error:
            store.watchers.discard(watcher)
            lines, last = [{"type": "ERROR", "object": error.status()}], -1
        if initial_end and last >= 0:
            lines.append(self._bookmark(rtype, last, {"k8s.io/initial-events-end": "true"}))

        async def stream():
            sent = last
            try:
                for line in lines:
                    yield json.dumps(line) + "\n"
                if sent < 0:
                    return
                deadline = time.monotonic() + timeout
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        event = await asyncio.wait_for(watcher.queue.get(), min(left, BOOKMARK_INTERVAL_S))
                    except asyncio.TimeoutError:
                        if bookmarks and time.monotonic() < deadline:
                            yield json.dumps(self._bookmark(rtype, store.revision)) + "\n"
                        continue
                    if event.rv <= sent or not match(event.obj):
                        continue
                    sent = event.rv
                    yield json.dumps({"type": event.type, "object": event.obj}) + "\n"
            finally:
                store.watchers.discard(watcher)

        return StreamingResponse(stream(), media_type="application/json")

    @staticmethod
    def _bookmark(rtype: ResourceType, rv: int, annotations: Optional[dict] = None) -> dict:
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if annotations:
            meta["annotations"] = annotations
        return {"type": "BOOKMARK", "object": {"kind": rtype.kind, "apiVersion": rtype.api_version, "metadata": meta}}

    def _table(self, request: Request, rtype: ResourceType, items: list[dict]) -> Response:
        columns = [{"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0}]
        paths: list[str] = []
        for column in rtype.printer_columns:
            if column["name"] == "Age":
                continue
            columns.append({"name": column["name"], "type": column["type"], "format": column.get("format", ""),
                            "description": column.get("description", ""), "priority": column.get("priority", 0)})
            paths.append(column["jsonPath"])
        if rtype.kind == "Pod":
            columns.append({"name": "Status", "type": "string", "format": "", "description": "", "priority": 0})
            paths.append(".status.phase")
        columns.append({"name": "Age", "type": "string", "format": "", "description": "", "priority": 0})
        rows = [{"cells": [obj["metadata"]["name"]] + [_jsonpath(obj, p) for p in paths]
                 + [_age(obj["metadata"].get("creationTimestamp"))],
                 "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                            "metadata": obj["metadata"]}} for obj in items]
        return _json({"kind": "Table", "apiVersion": "meta.k8s.io/v1",
                      "metadata": {"resourceVersion": str(self.store.revision)},
                      "columnDefinitions": columns, "rows": rows})

    # ----- discovery and OpenAPI ----------------------------------------------------------------------
    def _groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for rtype in self.store.types.values():
            if rtype.group and rtype.version not in groups.setdefault(rtype.group, []):
                groups[rtype.group].append(rtype.version)
        return groups

    def _group(self, name: str) -> dict:
        versions = self._groups().get(name)
        if not versions:
            raise ApiError(404, "NotFound", f"group {name} not found")
        entries = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
        return {"kind": "APIGroup", "apiVersion": "v1", "name": name, "versions": entries,
                "preferredVersion": entries[0]}

    def _group_list(self) -> dict:
        return {"kind": "APIGroupList", "apiVersion": "v1",
                "groups": [self._group(name) for name in sorted(self._groups())]}

    def _resource_list(self, group: str, version: str) -> dict:
        resources = []
        for rtype in self.store.types.values():
            if rtype.group != group or rtype.version != version:
                continue
            resources.append({"name": rtype.plural, "singularName": rtype.singular, "namespaced": rtype.namespaced,
                              "kind": rtype.kind, "verbs": VERBS, "shortNames": rtype.short_names,
                              "categories": rtype.categories})
            if rtype.has_status:
                resources.append({"name": f"{rtype.plural}/status", "singularName": "", "namespaced": rtype.namespaced,
                                  "kind": rtype.kind, "verbs": ["get", "patch", "update"]})
        if not resources:
            raise ApiError(404, "NotFound", f"{group}/{version} is not served")
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{group}/{version}".lstrip("/"),
                "resources": resources}

    def _openapi(self, parts: list[str]) -> Response:
        """Just enough OpenAPI v3 for kubectl: the custom resources' schemas, tagged with their kinds."""
        if parts == ["v3"]:
            paths = {"api/v1": {"serverRelativeURL": "/openapi/v3/api/v1"}}
            for group, versions in self._groups().items():
                for version in versions:
                    paths[f"apis/{group}/{version}"] = {"serverRelativeURL": f"/openapi/v3/apis/{group}/{version}"}
            return _json({"paths": paths})
        if parts[:1] != ["v3"]:
            raise ApiError(404, "NotFound", "only OpenAPI v3 is served")
        group, version = ("", parts[2]) if parts[1:2] == ["api"] else (parts[2], parts[3])
        schemas, paths = {}, {}
        for rtype in self.store.types.values():
            if (rtype.group, rtype.version) != (group, version):
                continue
            gvk = [{"group": group, "version": version, "kind": rtype.kind}]
            schema = dict(rtype.schema or {"type": "object", "x-kubernetes-preserve-unknown-fields": True})
            schemas[f"{group or 'core'}.{version}.{rtype.kind}"] = dict(schema, **{
                "x-kubernetes-group-version-kind": gvk})
            prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
            scope = "/namespaces/{namespace}" if rtype.namespaced else ""
            # kubectl checks a write operation of the kind for this parameter before it relies on
            # server-side field validation instead of validating against the schema itself.
            operation = {"parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                         "x-kubernetes-group-version-kind": gvk[0], "responses": {}}
            paths[f"{prefix}{scope}/{rtype.plural}/{{name}}"] = {"patch": operation, "put": operation}
            paths[f"{prefix}{scope}/{rtype.plural}"] = {"post": operation}
        return _json({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": KUBE_VERSION["gitVersion"]},
                      "paths": paths, "components": {"schemas": schemas}})


def _at(parts: list[str], index: int) -> str:
    return parts[index] if len(parts) > index else ""


class UnsupportedMediaType(Exception):
    pass


async def _body(request: Request, required: bool = True) -> Any:
    raw = await request.body()
    if "protobuf" in request.headers.get("content-type", ""):
        try:
            return protobuf.decode(raw)
        except (ValueError, IndexError) as error:
            raise UnsupportedMediaType(str(error)) from None
    if not raw:
        if required:
            raise ApiError(400, "BadRequest", "a request body is required")
        return None
    content_type = request.headers.get("content-type", "")
    try:
        return yaml.safe_load(raw) if "yaml" in content_type else json.loads(raw)
    except (ValueError, yaml.YAMLError) as error:
        raise ApiError(400, "BadRequest", f"the request body is not valid JSON: {error}") from None


def _matcher(query: dict):
    labels, fields = label_matcher(query.get("labelSelector", "")), field_matcher(query.get("fieldSelector", ""))
    return lambda obj: labels(obj) and fields(obj)


def _wants_table(request: Request) -> bool:
    return "as=Table" in request.headers.get("accept", "")


def _jsonpath(obj: dict, path: str) -> Any:
    value: Any = obj
    for part in [p for p in path.split(".") if p]:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _age(timestamp: Optional[str]) -> str:
    if not timestamp:
        return "<unknown>"
    created = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    seconds = int((datetime.datetime.now(datetime.timezone.utc) - created).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"
