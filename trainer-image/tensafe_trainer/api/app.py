"""The trainer's HTTP app: the Gate, the two front doors (``/v1``: api/v1/routes.py; the Tinker wire:
api/tinker/routes.py) and one error mapping, over one service (service/trainer.py).

The same app runs in a trainer pod (one training client, created at start-up from the pod's config) and
in the SDK's embedded local backend (clients created on demand).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import traceback

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tg_tinker.errors import MalformedRequestError, TGTinkerError, ValidationError
from tg_tinker.types import TENANT_PATTERN
from tg_tinker.wire import MAX_REPORTED_ERRORS, malformed_json, validation_error

from tensafe_trainer.api.gate import Gate
from tensafe_trainer.api.tinker.routes import body_budget as tinker_body_budget
from tensafe_trainer.api.tinker.routes import router as tinker_router
from tensafe_trainer.api.v1.routes import BODY_MODELS
from tensafe_trainer.api.v1.routes import router as v1_router
from tensafe_trainer.service import admission, door, errors
from tensafe_trainer.service.principals import Scope
from tensafe_trainer.service.tinker.keys import NOT_VERIFIED, TinkerKeys
from tensafe_trainer.service.tinker.policy import PrivacyPolicy
from tensafe_trainer.service.tinker.registry import TinkerRegistry
from tensafe_trainer.service.tinker.service import TinkerService
from tensafe_trainer.service.trainer import Settings, TrainerService
from tensafe_trainer.storage.artifacts import ArtifactStore
from tensafe_trainer.storage.audit import AuditTrail, request_hash
from tensafe_trainer.storage.audit_writer import AuditWriter
from tensafe_trainer.storage.paths import key_provider

SUBMISSION_PATH = re.compile(r"/v1/clients/[^/]+/operations(/batch)?")  # where a client's token sends batches


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
        state = TrainerService(settings, store, trail, AuditWriter(trail), asyncio.get_running_loop())
        app.state.tensafe = state
        app.state.tinker = TinkerService(state, tinker_keys, policy, settings.tinker_model_roots, tinker_registry)
        if settings.initial_client is not None:
            state.start_training(settings.initial_client)
        sweeper = asyncio.create_task(app.state.tinker.sweep_lapsed_sessions())
        yield
        sweeper.cancel()
        for session in state.sessions.values():
            session.terminate()
        for session in state.sessions.values():
            session.join(10)  # each leaves its host once its running operation is done
        state.hosts.close()
        state.audit.close()

    app = FastAPI(title="TenSafe trainer", version="v1", lifespan=lifespan,  # /docs etc.: see gate.DOC_PATHS
                  default_response_class=errors.AsciiJSONResponse)

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
        state: TrainerService = app.state.tensafe
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
    app.include_router(v1_router)
    app.include_router(tinker_router)
    with_body_schemas(app, BODY_MODELS)

    @app.exception_handler(TGTinkerError)
    async def on_tensafe_error(request: Request, exc: TGTinkerError):
        return errors.answer(exc, request.url.path)

    async def on_malformed_tinker_body(request: Request, exc: Exception):
        """A Tinker body of a shape the door's readers did not foresee: the caller's error, 400, counted against
        its key's refusal budget; nothing of the body is echoed. (On /v1 the wire models read every body.)"""
        if not errors.on_tinker_wire(request.url.path):
            raise exc
        frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ is not None else None
        # Where it was raised, never its message (which can quote the body): an operator can tell a bug from a
        # caller's bad shape.
        logging.getLogger("tensafe.tinker").warning(
            "%s %s refused as malformed: %s raised at %s:%s", request.method, request.url.path, type(exc).__name__,
            frame.filename if frame else "?", frame.lineno if frame else "?")
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

    return app
