"""The trainer's HTTP API: a FastAPI operation queue in front of the training engine.

The same app runs in a trainer pod (one training client, created at start-up from the pod's
config) and in the SDK's embedded local backend (clients created on demand).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tg_tinker.errors import (
    AuthenticationError,
    MalformedRequestError,
    OperationLostError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TGTinkerError,
    TrainingClientNotFoundError,
    ValidationError,
)
from tg_tinker.types import (
    ArtifactInfo,
    AuditEntry,
    AuditHead,
    ClientInfo,
    ClientStatus,
    CreateSamplingClient,
    CreateTrainingClient,
    DatasetInfo,
    GrantArtifact,
    LoadStateRequest,
    MAX_WAIT_S,
    OperationRecord,
    RegisterDataset,
    SubmittedOperations,
    WaitForOperations,
)

from tg_tinker.types import TENANT_PATTERN
from tg_tinker.operations import SubmitOperation, SubmitOperations
from tg_tinker.receipts import public_key_pem, sign_receipt
from tg_tinker.wire import MAX_REPORTED_ERRORS, malformed_json, validation_error

from tensafe_trainer.privacy import datasets
from tensafe_trainer.service import metrics
from tensafe_trainer.storage.artifacts import ArtifactStore
from tensafe_trainer.storage.audit import AuditTrail, request_hash
from tensafe_trainer.storage.audit_writer import AuditWriter
from tensafe_trainer.storage.paths import key_provider
from tensafe_trainer.engine.process import EngineProcess, busy_counter
from tensafe_trainer.engine.protocol import SlotSpec
from tensafe_trainer.api.gate import Gate, RevokedTokens, replaced, resolve, terminated, token_digest
from tensafe_trainer.service import admission
from tensafe_trainer.service import door, errors, samplers
from tensafe_trainer.service.principals import Principal, Scope
from tensafe_trainer.service.futures import FutureStore, long_poll
from tensafe_trainer.service.sessions import Operation, Session
from tensafe_trainer.api.tinker.keys import NOT_VERIFIED, TinkerKeys
from tensafe_trainer.api.tinker.policy import PrivacyPolicy
from tensafe_trainer.api.tinker.registry import TinkerRegistry
from tensafe_trainer.api.tinker.routes import TinkerSettings, tinker_router
from tensafe_trainer.api.tinker.routes import body_budget as tinker_body_budget

log = logging.getLogger("tensafe.trainer")
SUBMISSION_PATH = re.compile(r"/v1/clients/[^/]+/operations(/batch)?")  # where a client's token sends batches


@dataclass
class Settings:
    home: Path
    token: Optional[str]
    max_pending: int = 10_000
    max_request_bytes: int = 64 << 20  # the trainer's own token (dataset uploads); clients get less (admission.py)
    max_clients: int = 16  # live clients at once: each is an engine process holding a model
    max_clients_per_tenant: Optional[int] = None  # of those, one tenant's at most (a shared trainer: None is no cap)
    min_free_memory: int = 1 << 30  # a new client is refused while the machine has less available than this
    open_docs: bool = False  # /docs, /redoc and /openapi.json without a token (tensafe serve --open-docs)
    initial_client: Optional[CreateTrainingClient] = None
    privacy_policy: Optional[Path] = None  # the Tinker wire's DP policy per tenant (api/tinker/policy.py)
    tinker_key: Optional[str] = None  # a trainer pod's Tinker key, for its initial client's tenant
    tinker_model_roots: Optional[tuple] = None  # folders a Tinker key may name as base_model (None: any)


@dataclass
class State:
    settings: Settings
    store: ArtifactStore
    audit_trail: AuditTrail
    audit: AuditWriter
    loop: asyncio.AbstractEventLoop
    sessions: dict[str, Session] = field(default_factory=dict)
    futures: FutureStore = field(default_factory=FutureStore)  # both doors' (service/futures.py)
    busy_engines: Any = field(default_factory=busy_counter)
    client_tokens: dict[bytes, "Principal"] = field(default_factory=dict)  # sha256(token) -> its client
    revoked: RevokedTokens = field(default_factory=RevokedTokens)  # so a revoked token hears why

    def issue_token(self, session: Session) -> str:
        """A bearer token for this one client: its operations, its artifacts, its audit entries."""
        token = secrets.token_urlsafe(32)
        self.client_tokens[token_digest(token)] = Principal.client(session)
        return token

    def stop(self, session: Session, why: Optional[str] = None) -> None:
        """Terminate a client, the sampling clients its token made, and revoke all their tokens."""
        for child in [session, *session.children]:
            if not child.terminated:
                metrics.CLIENTS.labels(child.kind).dec()
            child.terminate()
            self.futures.release(child)
            self.revoke(child, why)

    def revoke(self, session: Session, why: Optional[str] = None) -> None:
        """The tokens issued for this client instance open nothing any more."""
        why = why or terminated(session.client_id)
        for digest in [d for d, p in self.client_tokens.items() if p.session is session]:
            self.client_tokens.pop(digest)
            self.revoked.remember(digest, why)

    def audit_artifact_use(self, operation: str, tenant_id: str, client_id: Optional[str], artifact_id: str,
                           produced: bool = False) -> None:
        """A durable audit entry for one artifact's use (a sampler made from it, a grant, a delete, a dataset
        registered): the artifact id in clear, the request fingerprinted under the tenant's audit key."""
        self.audit.submit(durable=True, operation=operation, training_client_id=client_id, tenant_id=tenant_id,
                          success=True, request_hash=request_hash(self.store.keys.audit_key(tenant_id),
                                                                  artifact_id.encode()),
                          **({"produced": [artifact_id]} if produced else {"consumed": [artifact_id]}))

    def granted(self, principal: "Principal") -> set[str]:
        session = self.sessions.get(principal.client_id) if principal.client_id else None
        return session.granted if session is not None else set()

    def session(self, client_id: str) -> Session:
        try:
            return self.sessions[client_id]
        except KeyError:
            raise TrainingClientNotFoundError(f"no client {client_id!r} on this trainer",
                                              {"client_id": client_id}) from None

    def start(self, client_id: str, tenant_id: str, kind: str, build, config=None) -> Session:
        existing = self.sessions.get(client_id)
        if existing is not None and not existing.stopping and existing.status not in (ClientStatus.TERMINATED,
                                                                                       ClientStatus.ERROR):
            raise ValidationError(f"client {client_id!r} already exists", {"client_id": client_id})
        if existing is not None:  # replaced: what its token made goes with it
            self.stop(existing, replaced(client_id))
        # A slot is held until the engine has exited (a terminated client's engine may still be finishing).
        live = sum(s.holds_engine for s in self.sessions.values())
        if live >= self.settings.max_clients:
            raise ResourceExhaustedError(
                f"this trainer already runs {live} clients, its limit (each holds a model in an engine process of "
                "its own): close one first, or start the trainer with a higher TENSAFE_MAX_CLIENTS",
                {"max_clients": self.settings.max_clients})
        cap = self.settings.max_clients_per_tenant
        if cap is not None:
            own = sum(s.holds_engine and s.tenant_id == tenant_id for s in self.sessions.values())
            if own >= cap:
                raise ResourceExhaustedError(
                    f"tenant {tenant_id!r} already runs {own} clients on this trainer, its limit per tenant "
                    "(TENSAFE_MAX_CLIENTS_PER_TENANT): close one first", {"max_clients_per_tenant": cap})
        free = available_memory()
        if free is not None and free < self.settings.min_free_memory:
            raise ResourceExhaustedError(
                f"this machine has {free >> 20} MiB of memory available, less than the "
                f"{self.settings.min_free_memory >> 20} MiB a new client needs to start: close a client first",
                {"available_bytes": free})
        keys = self.store.keys
        session = Session(client_id, tenant_id, kind, build, self.audit, self.loop,
                          max_pending=self.settings.max_pending, hash_key=lambda: keys.audit_key(tenant_id),
                          sign=lambda claims: sign_receipt(claims, keys.receipt_key(tenant_id)), config=config)
        self.sessions[client_id] = session
        metrics.CLIENTS.labels(kind).inc()
        return session

    def start_engine(self, spec: SlotSpec) -> EngineProcess:
        return EngineProcess(spec, self.settings.home, self.busy_engines)

    def start_training(self, req: CreateTrainingClient) -> Session:
        client_id = req.client_id or f"tc-{uuid.uuid4().hex[:12]}"
        spec = SlotSpec.training(client_id, req.tenant_id, req.config, req.resume_from)
        return self.start(client_id, req.tenant_id, "training", lambda: self.start_engine(spec), config=req.config)


def available_memory() -> Optional[int]:
    """MemAvailable from /proc/meminfo (None where there is none: not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


async def parsed(request: Request, model):
    """The body validated by the door's rule (service/door.py): a large one (a client's full batch, a dataset) on
    the decoding thread, so it delays other requests by a GIL switch interval, not by its whole parse (measured:
    1.1 s for 26 MB, during which the event loop waited at most 49 ms); a small one inline."""
    body = await request.body()
    return await door.decode(len(body), model.parse_json, body)


def json_body(model) -> dict:
    """The OpenAPI requestBody of an endpoint that parses its own body (see ``parsed``)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def with_body_schemas(app: FastAPI, models) -> None:
    """Add the schemas ``json_body`` refers to, which FastAPI does not see, to the OpenAPI document."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = original()
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                generated = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(generated.pop("$defs", {}))
                schemas[model.__name__] = generated
        return app.openapi_schema

    app.openapi = openapi


def create_app(settings: Settings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        home = settings.home
        keys = key_provider(home)
        trail = AuditTrail(home / "audit", keys)
        store = ArtifactStore(home / "artifacts", keys)
        for path in store.remove_partial_writes():
            logging.getLogger("tensafe.trainer").warning("removed %s, left by an interrupted write", path.name)
        state = State(settings, store, trail, AuditWriter(trail), asyncio.get_running_loop())
        app.state.tensafe = state
        if settings.initial_client is not None:
            state.start_training(settings.initial_client)
        yield
        for session in state.sessions.values():
            session.terminate()
        state.audit.close()

    app = FastAPI(title="TenSafe trainer", version="v1", lifespan=lifespan, default_response_class=errors.AsciiJSONResponse)  # /docs etc.: see gate.DOC_PATHS

    # Dependencies are async (they never block): FastAPI runs a sync one on a worker thread, and that handoff
    # was half the event loop's time per request (measured with py-spy under benchmarks/tinker.py). On the
    # event loop they also read the token and session maps where those are written.
    async def get_state(request: Request) -> State:
        return request.app.state.tensafe

    async def authenticate(request: Request) -> Principal:
        """The Gate decided before the body was read; asked again now that it has arrived, so a token
        revoked meanwhile (its client terminated or replaced) acts on nothing."""
        return resolve(request.app.state.tensafe, settings.token, request.headers.get("authorization", ""))

    def client_session(state: State, principal: Principal, client_id: str) -> Session:
        """The client a request acts on: for a client's token, the very instance it was issued for (never a
        newer client that took over its id)."""
        principal.check(client_id)
        if principal.session is not None:
            current(state, principal.session)
            return principal.session
        return state.session(client_id)

    def current(state: State, session: Session) -> Session:
        """Refuse to go on with a client replaced or terminated while this request was arriving."""
        if state.sessions.get(session.client_id) is not session:
            raise AuthenticationError(f"client {session.client_id!r} was replaced while this request was on its "
                                      "way: it acts on nothing")
        return session

    def require_admin(principal: Principal) -> Principal:
        if not principal.is_trainer:
            raise AuthenticationError("creating clients needs the trainer's own token, not a client's")
        return principal

    async def admin(principal: Principal = Depends(authenticate)) -> Principal:
        return require_admin(principal)

    def body_limit(principal, path: str) -> int:
        """The most bytes a request to ``path`` may carry, decided from its headers: the trainer's own token up to
        max_request_bytes (datasets); a client's token what its config can run on its submission routes (see
        admission.body_limit), a control call's few KiB elsewhere; a Tinker key what its route and the tenant's
        open models need (api/tinker/routes.py, body_budget)."""
        if principal.scope is Scope.TINKER_KEY:
            return min(settings.max_request_bytes, tinker_body_budget(tinker_registry, principal.tenant_id, path))
        if principal.is_trainer:
            return settings.max_request_bytes
        if not SUBMISSION_PATH.fullmatch(path):
            return door.CONTROL_BYTES
        return min(settings.max_request_bytes, admission.body_limit(principal.session.limits))

    initial = settings.initial_client
    # A trainer started for one client (a TrainingClient's pod) takes Tinker keys from its Secret only, never from a
    # key file on its data volume, which an insider could write: without a key there, /api/v1 opens for no one.
    given = {settings.tinker_key: initial.tenant_id} if settings.tinker_key else {} if initial is not None else None

    def tinker_key_refused(entry: dict, reason: str = NOT_VERIFIED) -> None:
        """An entry of the Tinker key file that does not verify: on the record of the tenant it names."""
        tenant = entry.get("tenant_id")
        if not isinstance(tenant, str) or not TENANT_PATTERN.fullmatch(tenant):
            return
        state: State = app.state.tensafe
        state.audit.submit(operation="tinker_key_refused", training_client_id=None, tenant_id=tenant, success=False,
                           request_hash=request_hash(state.store.keys.audit_key(tenant), entry),
                           error=reason)

    tinker_keys = TinkerKeys(settings.home, given, on_refused=tinker_key_refused)
    tinker_registry = TinkerRegistry()
    app.add_middleware(Gate, admin_token=settings.token, limit_for=body_limit, open_docs=settings.open_docs,
                       tinker_keys=tinker_keys)
    policy = PrivacyPolicy.load(settings.privacy_policy)
    if initial is not None:  # a trainer for one client: its tenant's Tinker models train under the client's DP
        policy = policy.with_client(initial.tenant_id, initial.config)
    app.include_router(tinker_router(TinkerSettings(tinker_keys, policy, settings.tinker_model_roots,
                                                    tinker_registry)))

    @app.exception_handler(TGTinkerError)
    async def on_tensafe_error(request: Request, exc: TGTinkerError):
        return errors.answer(exc, request.url.path)

    async def on_malformed_tinker_body(request: Request, exc: Exception):
        """A Tinker body of a shape the door's readers did not foresee: the caller's error, 400, counted against
        its key's refusal budget; nothing of the body is echoed. (On /v1 the wire models read every body.)"""
        if not errors.on_tinker_wire(request.url.path):
            raise exc
        err = MalformedRequestError(f"malformed request body ({type(exc).__name__}): see the Tinker API's request "
                                    "shapes")
        return errors.answer(err, request.url.path)

    for malformed in (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError):
        app.add_exception_handler(malformed, on_malformed_tinker_body)

    @app.exception_handler(RequestValidationError)
    async def on_bad_request(request: Request, exc: RequestValidationError):
        found = exc.errors()
        if any(e.get("type") == "json_invalid" for e in found):
            return errors.answer(malformed_json(), request.url.path)
        problems = [{"field": ".".join(str(p) for p in e.get("loc", ())), "problem": str(e.get("msg", "invalid"))[:500]}
                    for e in found[:MAX_REPORTED_ERRORS]]
        return errors.answer(validation_error("invalid request", problems, len(found)), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        """Starlette's own refusals (a body that is not JSON, an unknown path) in TenSafe's error shape."""
        kind = {400: MalformedRequestError, 422: ValidationError}.get(exc.status_code, TGTinkerError)
        return errors.answer(kind(str(exc.detail)[:500]), request.url.path, status=exc.status_code)


    @app.get("/healthz", tags=["health"])
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz(state: State = Depends(get_state)):
        """Ready once no client is still loading. A client in ERROR does not hold readiness back: the
        trainer still serves, and it is how the operator (and the SDK) learn the error."""
        waiting = sum(s.status is ClientStatus.INITIALIZING for s in state.sessions.values())
        failed = sum(s.status is ClientStatus.ERROR for s in state.sessions.values())
        # Counts only: the probe needs no token, and client ids are the tenants' (GET /v1/clients names them).
        if waiting:
            return JSONResponse({"ready": False, "initializing": waiting, "failed": failed}, status_code=503)
        return {"ready": True, "failed": failed}

    @app.get("/metrics", tags=["health"])
    async def prometheus_metrics():
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    def with_token(state: State, session: Session) -> ClientInfo:
        return session.info().model_copy(update={"access_token": state.issue_token(session)})

    @app.post("/v1/training_clients", response_model=ClientInfo, status_code=201, dependencies=[Depends(admin)],
              response_model_exclude_none=True, openapi_extra=json_body(CreateTrainingClient))
    async def create_training_client(request: Request, state: State = Depends(get_state)):
        return with_token(state, state.start_training(await parsed(request, CreateTrainingClient)))

    @app.post("/v1/sampling_clients", response_model=ClientInfo, status_code=201, response_model_exclude_none=True,
              openapi_extra=json_body(CreateSamplingClient))
    async def create_sampling_client(request: Request, state: State = Depends(get_state),
                                     principal: Principal = Depends(authenticate)):
        body = await parsed(request, CreateSamplingClient)
        if body.training_client_id:
            session = client_session(state, principal, body.training_client_id)
            session.check_open()
            return session.info()
        principal.check_tenant(body.tenant_id)
        if body.artifact_id:  # a client's token may sample its own client's artifacts
            principal.check_artifact(await asyncio.to_thread(state.store.info, body.tenant_id, body.artifact_id),
                                     state.granted(principal))
        else:
            require_admin(principal)
        client_id = f"sc-{uuid.uuid4().hex[:12]}"
        spec = SlotSpec.sampling(client_id, body.tenant_id, body.artifact_id, body.model_path or body.base_model)
        if body.artifact_id:  # the artifact's use is on record, like a load
            await asyncio.to_thread(state.audit_artifact_use, "create_sampling_client", body.tenant_id, client_id,
                                    body.artifact_id)
        parent = principal.session
        if parent is not None:  # the one sampler policy (service/samplers.py): its oldest makes room
            parent.children = [c for c in current(state, parent).children if not c.terminated]
            for old in samplers.make_room(parent.children):
                state.stop(old, samplers.closed_for_newer(old.client_id))
        session = state.start(client_id, body.tenant_id, "sampling", lambda: state.start_engine(spec))
        if parent is not None:
            parent.children.append(session)  # it ends with the client whose token made it
        return with_token(state, session)

    @app.get("/v1/clients", response_model=list[ClientInfo])
    async def list_clients(state: State = Depends(get_state), principal: Principal = Depends(authenticate)):
        return [s.info() for s in state.sessions.values() if principal.client_id in (None, s.client_id)]

    @app.get("/v1/clients/{client_id}", response_model=ClientInfo)
    async def get_client(client_id: str, state: State = Depends(get_state),
                         principal: Principal = Depends(authenticate)):
        return client_session(state, principal, client_id).info()

    @app.delete("/v1/clients/{client_id}", response_model=ClientInfo)
    async def terminate_client(client_id: str, state: State = Depends(get_state),
                               principal: Principal = Depends(authenticate)):
        session = client_session(state, principal, client_id)
        state.stop(session)
        info = session.info()
        return info.model_copy(update={"status": ClientStatus.TERMINATED})

    def admit(state: State, session: Session, submissions: list[SubmitOperation], principal: Principal) -> None:
        """Every submission of a request checked before any is queued: a refusal leaves nothing behind."""
        session.check_open()
        limits = session.limits
        for submission in submissions:
            admission.admit(submission.request, limits)
            if isinstance(submission.request, LoadStateRequest):  # the engine loads what it is given
                principal.check_artifact(state.store.info(session.tenant_id, submission.request.artifact_id),
                                         session.granted)

    def queue_operation(state: State, session: Session, submission: SubmitOperation) -> tuple[Operation, bool]:
        """(operation, created): a retry under an idempotency key gets the operation it made."""
        fp = session.fingerprint(submission.request)
        earlier = state.futures.claim(session, submission.idempotency_key, fp.encode())
        if earlier is not None:
            return earlier, False
        op = session.submit(submission.request, fp)
        state.futures.add(op, session, submission.idempotency_key, fp.encode())
        return op, True

    @app.post("/v1/clients/{client_id}/operations", response_model=OperationRecord,
              openapi_extra=json_body(SubmitOperation))
    async def submit_operation(client_id: str, request: Request, state: State = Depends(get_state),
                               principal: Principal = Depends(authenticate)):
        session = client_session(state, principal, client_id)
        body = await parsed(request, SubmitOperation)
        admit(state, current(state, session), [body], principal)
        op, created = queue_operation(state, session, body)
        return JSONResponse(op.record().model_dump(mode="json"), status_code=201 if created else 200)

    @app.post("/v1/clients/{client_id}/operations/batch", response_model=SubmittedOperations,
              openapi_extra=json_body(SubmitOperations))
    async def submit_operations(client_id: str, request: Request, state: State = Depends(get_state),
                                principal: Principal = Depends(authenticate)):
        """All submissions are checked first (a refusal: 413/422, nothing queued); then queued in order,
        stopping at the first the queue refuses (full: 429 inside, see SubmittedOperations)."""
        session = client_session(state, principal, client_id)
        body = await parsed(request, SubmitOperations)
        admit(state, current(state, session), body.submissions, principal)
        records, error = [], None
        for submission in body.submissions:
            try:
                op, _ = queue_operation(state, session, submission)
            except TGTinkerError as exc:
                error = exc.to_wire()
                break
            records.append(op.record().model_dump(mode="json"))
        return JSONResponse({"records": records, "error": error})

    def find(state: State, operation_id: str, principal: Principal) -> tuple[Operation, Session]:
        try:
            op, session = state.futures.get(operation_id)
            if not isinstance(op, Operation):  # a Tinker request's future: not polled here
                raise KeyError(operation_id)
        except KeyError:
            raise OperationLostError(
                f"operation {operation_id!r} is unknown to this trainer (it restarted, or the id is wrong); "
                "its outcome is unknown", {"operation_id": operation_id}) from None
        principal.check(session.client_id)
        if principal.session is not None and session is not principal.session:
            raise PermissionDeniedError(f"operation {operation_id!r} belongs to an earlier client {session.client_id!r}"
                                        ", not to this token's", {"operation_id": operation_id})
        return op, session

    @app.get("/v1/operations/{operation_id}", response_model=OperationRecord)
    async def get_operation(operation_id: str, wait: float = Query(0.0, ge=0.0, le=MAX_WAIT_S),
                            state: State = Depends(get_state), principal: Principal = Depends(authenticate)):
        op, _ = find(state, operation_id, principal)
        await long_poll(op, wait)
        return op.record()

    @app.post("/v1/operations/wait", response_model=list[OperationRecord], openapi_extra=json_body(WaitForOperations))
    async def wait_for_operations(request: Request, state: State = Depends(get_state),
                                  principal: Principal = Depends(authenticate)):
        """Waits for the first operation like GET does, then answers with its record and those of the other
        listed ones that have finished (unfinished and unknown ones are left out: an unknown one's own poll
        reports it lost)."""
        body = await parsed(request, WaitForOperations)
        first, _ = find(state, body.operation_ids[0], principal)
        await long_poll(first, body.wait)
        records = [first.record()]
        for operation_id in body.operation_ids[1:]:
            with contextlib.suppress(OperationLostError):
                op = find(state, operation_id, principal)[0]
                if op.status.finished:
                    records.append(op.record())
        return JSONResponse([record.model_dump(mode="json") for record in records])

    @app.post("/v1/operations/{operation_id}/cancel")
    async def cancel_operation(operation_id: str, state: State = Depends(get_state),
                               principal: Principal = Depends(authenticate)):
        op, session = find(state, operation_id, principal)
        cancelled = session.cancel(op)
        return {"cancelled": cancelled, "record": op.record().model_dump(mode="json")}

    def own_artifact(state: State, principal: Principal, tenant_id: str, artifact_id: str) -> ArtifactInfo:
        principal.check_tenant(tenant_id)
        info = state.store.info(tenant_id, artifact_id)
        principal.check_artifact(info, state.granted(principal))
        return info

    @app.post("/v1/artifacts/{artifact_id}/grants", dependencies=[Depends(admin)],
              openapi_extra=json_body(GrantArtifact))
    async def grant_artifact(artifact_id: str, request: Request, state: State = Depends(get_state)):
        """Let one client's token use another client's artifact: an explicit, audited administrator's grant."""
        body = await parsed(request, GrantArtifact)
        return await asyncio.to_thread(grant, state, artifact_id, body)

    def grant(state: State, artifact_id: str, body: GrantArtifact) -> dict:
        info = state.store.info(body.tenant_id, artifact_id)
        session = state.session(body.training_client_id)
        session.check_open()
        if session.tenant_id != info.tenant_id:
            raise PermissionDeniedError(f"client {session.client_id!r} belongs to another tenant than artifact "
                                        f"{artifact_id}", {"artifact_id": artifact_id})
        state.audit_artifact_use("grant_artifact", info.tenant_id, session.client_id, artifact_id)
        session.granted.add(artifact_id)
        return {"artifact_id": artifact_id, "training_client_id": session.client_id}

    @app.get("/v1/artifacts", response_model=list[ArtifactInfo])
    def list_artifacts(tenant_id: str = "default", training_client_id: Optional[str] = None,
                       state: State = Depends(get_state), principal: Principal = Depends(authenticate)):
        principal.check_tenant(tenant_id)
        return state.store.list(tenant_id, principal.visible(training_client_id))

    @app.get("/v1/artifacts/{artifact_id}", response_model=ArtifactInfo)
    def artifact_info(artifact_id: str, tenant_id: str = "default", state: State = Depends(get_state),
                      principal: Principal = Depends(authenticate)):
        return own_artifact(state, principal, tenant_id, artifact_id)

    @app.get("/v1/artifacts/{artifact_id}/content", responses={200: {"content": {"application/octet-stream": {}}}})
    def artifact_content(artifact_id: str, tenant_id: str = "default", state: State = Depends(get_state),
                         principal: Principal = Depends(authenticate)):
        own_artifact(state, principal, tenant_id, artifact_id)
        data = state.store.read_raw(tenant_id, artifact_id)
        return Response(data, media_type="application/octet-stream")

    def audit_dataset(state: State, operation: str, info: DatasetInfo) -> None:
        state.audit_artifact_use(operation, info.tenant_id, None, info.artifact_id,
                                 produced=operation == "register_dataset")

    @app.post("/v1/datasets", response_model=DatasetInfo, status_code=201, dependencies=[Depends(admin)],
              openapi_extra=json_body(RegisterDataset))
    async def register_dataset(request: Request, state: State = Depends(get_state)):
        """Store a dataset encrypted, for server-side Poisson sampling (see datasets.py)."""
        body = await parsed(request, RegisterDataset)

        def register() -> DatasetInfo:
            info = datasets.register(state.store, body)
            audit_dataset(state, "register_dataset", info)
            return info

        return await asyncio.to_thread(register)

    @app.get("/v1/datasets", response_model=list[DatasetInfo], dependencies=[Depends(admin)])
    def list_datasets(tenant_id: str = "default", state: State = Depends(get_state)):
        return datasets.list_datasets(state.store, tenant_id)

    @app.get("/v1/datasets/{dataset_id}", response_model=DatasetInfo, dependencies=[Depends(admin)])
    def dataset_info(dataset_id: str, tenant_id: str = "default", state: State = Depends(get_state)):
        return datasets.describe(state.store, tenant_id, dataset_id)

    @app.delete("/v1/datasets/{dataset_id}", response_model=DatasetInfo, dependencies=[Depends(admin)])
    def delete_dataset(dataset_id: str, tenant_id: str = "default", state: State = Depends(get_state)):
        """The examples go; the dataset's privacy ledger stays."""
        info = datasets.delete(state.store, tenant_id, dataset_id)
        audit_dataset(state, "delete_dataset", info)
        return info

    def tenant_of(principal: Principal, tenant_id: Optional[str]) -> str:
        tenant = tenant_id or principal.tenant_id or "default"
        principal.check_tenant(tenant)
        return tenant

    @app.get("/v1/audit", response_model=list[AuditEntry])
    def audit_entries(training_client_id: Optional[str] = None, operation: Optional[str] = None,
                      tenant_id: Optional[str] = None, limit: int = Query(100, ge=1, le=10_000),
                      state: State = Depends(get_state), principal: Principal = Depends(authenticate)):
        """Served only once the whole chain verifies under the tenant's key set and does not end before what this
        trainer wrote or served: an edited or truncated log is an AuditIntegrityError (500), never an answer."""
        tenant, visible = tenant_of(principal, tenant_id), principal.visible(training_client_id)
        state.audit.flush()
        return state.audit_trail.query(tenant, training_client_id=visible, operation=operation, limit=limit)

    @app.get("/v1/audit/head", response_model=AuditHead)
    def audit_head(tenant_id: Optional[str] = None, state: State = Depends(get_state),
                   principal: Principal = Depends(authenticate)):
        """The tenant's chain head now: keep it, and ``tensafe audit verify --expect-head`` catches a truncation.
        Checked like ``/v1/audit``: never a head behind one this trainer wrote or served. The trainer's token only:
        the head's sequence number counts every client's entries (a client learns the head after its own
        entries from its results)."""
        if not principal.is_trainer:
            raise PermissionDeniedError("the tenant's audit head needs the trainer's own token (a client's results "
                                        "carry the head after its own entries)")
        tenant = tenant_of(principal, tenant_id)
        state.audit.flush()
        return state.audit_trail.head(tenant)

    @app.get("/v1/receipts/public_key")
    def receipt_public_key(tenant_id: Optional[str] = None, state: State = Depends(get_state),
                           principal: Principal = Depends(authenticate)):
        """The PEM public key that signs this tenant's privacy receipts now (``/v1/receipts/public_keys``: with
        the keys that signed them before a rotation)."""
        from tg_tinker.receipts import key_id

        tenant = tenant_of(principal, tenant_id)
        key = state.store.keys.receipt_key(tenant)
        return {"tenant_id": tenant, "public_key": public_key_pem(key), "key_id": key_id(key.public_key())}

    @app.get("/v1/receipts/public_keys")
    def receipt_public_keys(tenant_id: Optional[str] = None, state: State = Depends(get_state),
                            principal: Principal = Depends(authenticate)):
        """The tenant's receipt key list (tg_tinker.receipts): the active key and every retired one with the audit
        sequence it was retired at; ``verify_receipt`` takes it and refuses a retired key's later receipts."""
        return state.store.keys.receipt_public_keys(tenant_of(principal, tenant_id))

    with_body_schemas(app, (SubmitOperation, SubmitOperations, RegisterDataset, CreateTrainingClient,
                            CreateSamplingClient, WaitForOperations, GrantArtifact))
    return app

