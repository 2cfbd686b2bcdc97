"""``/v1``: TenSafe's own door (the tg_tinker SDK), and the probes. Each route authenticates (the Gate decided
from the headers; ``authenticate`` asks again now that the body is here), parses its body with the door's
parser, calls the service (service/trainer.py) and answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Optional

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tg_tinker.errors import AuthenticationError, OperationLostError, PermissionDeniedError, TGTinkerError
from tg_tinker.operations import SubmitOperation, SubmitOperations
from tg_tinker.receipts import key_id, public_key_pem
from tg_tinker.types import (
    MAX_WAIT_S,
    ArtifactInfo,
    AuditEntry,
    AuditHead,
    ClientInfo,
    ClientStatus,
    CreateSamplingClient,
    CreateTrainingClient,
    DatasetInfo,
    GrantArtifact,
    OperationRecord,
    RegisterDataset,
    SubmittedOperations,
    WaitForOperations,
)

from tensafe_trainer.service.tokens import resolve
from tensafe_trainer.engine.protocol import SlotSpec
from tensafe_trainer.privacy import datasets
from tensafe_trainer.service import door, metrics
from tensafe_trainer.service.futures import long_poll
from tensafe_trainer.service.principals import Principal
from tensafe_trainer.service.trainer import TrainerService

router = APIRouter()
# Bodies each route parses itself (``parsed``), whose schemas the OpenAPI document gets from ``with_body_schemas``.
BODY_MODELS = (SubmitOperation, SubmitOperations, RegisterDataset, CreateTrainingClient, CreateSamplingClient,
               WaitForOperations, GrantArtifact)


# Dependencies are async (they never block): FastAPI runs a sync one on a worker thread, and that handoff was half
# the event loop's time per request (measured with py-spy under benchmarks/tinker_wire.py). On the event loop they
# also read the token and session maps where those are written.


async def get_state(request: Request) -> TrainerService:
    return request.app.state.tensafe


async def authenticate(request: Request) -> Principal:
    """The Gate decided before the body was read; asked again now that it has arrived, so a token revoked
    meanwhile (its client terminated or replaced) acts on nothing."""
    state = request.app.state.tensafe
    return resolve(state, state.settings.token, request.headers.get("authorization", ""))


def require_admin(principal: Principal) -> Principal:
    if not principal.is_trainer:
        raise AuthenticationError("creating clients needs the trainer's own token, not a client's")
    return principal


async def admin(principal: Principal = Depends(authenticate)) -> Principal:
    return require_admin(principal)


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


@router.get("/healthz", tags=["health"])
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", tags=["health"])
async def readyz(state: TrainerService = Depends(get_state)):
    """Ready once no client is still loading. A client in ERROR does not hold readiness back: the
    trainer still serves, and it is how the operator (and the SDK) learn the error."""
    waiting = sum(s.status is ClientStatus.INITIALIZING for s in state.sessions.values())
    failed = sum(s.status is ClientStatus.ERROR for s in state.sessions.values())
    # Counts only: the probe needs no token, and client ids are the tenants' (GET /v1/clients names them).
    if waiting:
        return JSONResponse({"ready": False, "initializing": waiting, "failed": failed}, status_code=503)
    return {"ready": True, "failed": failed}


@router.get("/metrics", tags=["health"])
async def prometheus_metrics():
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.post("/v1/training_clients", response_model=ClientInfo, status_code=201, dependencies=[Depends(admin)],
             response_model_exclude_none=True, openapi_extra=json_body(CreateTrainingClient))
async def create_training_client(request: Request, state: TrainerService = Depends(get_state)):
    return state.with_token(state.start_training(await parsed(request, CreateTrainingClient)))


@router.post("/v1/sampling_clients", response_model=ClientInfo, status_code=201, response_model_exclude_none=True,
             openapi_extra=json_body(CreateSamplingClient))
async def create_sampling_client(request: Request, state: TrainerService = Depends(get_state),
                                 principal: Principal = Depends(authenticate)):
    body = await parsed(request, CreateSamplingClient)
    if body.training_client_id:
        session = state.client_session(principal, body.training_client_id)
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
    if parent is not None:
        state.make_room_for_sampler(parent)
    session = state.start(client_id, body.tenant_id, "sampling", lambda: state.start_engine(spec))
    if parent is not None:
        parent.children.append(session)  # it ends with the client whose token made it
    return state.with_token(session)


@router.get("/v1/clients", response_model=list[ClientInfo])
async def list_clients(state: TrainerService = Depends(get_state), principal: Principal = Depends(authenticate)):
    return [s.info() for s in state.sessions.values() if principal.client_id in (None, s.client_id)]


@router.get("/v1/clients/{client_id}", response_model=ClientInfo)
async def get_client(client_id: str, state: TrainerService = Depends(get_state),
                     principal: Principal = Depends(authenticate)):
    return state.client_session(principal, client_id).info()


@router.delete("/v1/clients/{client_id}", response_model=ClientInfo)
async def terminate_client(client_id: str, state: TrainerService = Depends(get_state),
                           principal: Principal = Depends(authenticate)):
    session = state.client_session(principal, client_id)
    state.stop(session)
    info = session.info()
    return info.model_copy(update={"status": ClientStatus.TERMINATED})


@router.post("/v1/clients/{client_id}/operations", response_model=OperationRecord,
             openapi_extra=json_body(SubmitOperation))
async def submit_operation(client_id: str, request: Request, state: TrainerService = Depends(get_state),
                           principal: Principal = Depends(authenticate)):
    session = state.client_session(principal, client_id)
    body = await parsed(request, SubmitOperation)
    state.admit(state.current(session), [body], principal)
    op, created = state.queue_operation(session, body)
    return JSONResponse(op.record().model_dump(mode="json"), status_code=201 if created else 200)


@router.post("/v1/clients/{client_id}/operations/batch", response_model=SubmittedOperations,
             openapi_extra=json_body(SubmitOperations))
async def submit_operations(client_id: str, request: Request, state: TrainerService = Depends(get_state),
                            principal: Principal = Depends(authenticate)):
    """All submissions are checked first (a refusal: 413/422, nothing queued); then queued in order,
    stopping at the first the queue refuses (full: 429 inside, see SubmittedOperations)."""
    session = state.client_session(principal, client_id)
    body = await parsed(request, SubmitOperations)
    state.admit(state.current(session), body.submissions, principal)
    records, error = [], None
    for submission in body.submissions:
        try:
            op, _ = state.queue_operation(session, submission)
        except TGTinkerError as exc:
            error = exc.to_wire()
            break
        records.append(op.record().model_dump(mode="json"))
    return JSONResponse({"records": records, "error": error})


@router.get("/v1/operations/{operation_id}", response_model=OperationRecord)
async def get_operation(operation_id: str, wait: float = Query(0.0, ge=0.0, le=MAX_WAIT_S),
                        state: TrainerService = Depends(get_state), principal: Principal = Depends(authenticate)):
    op, _ = state.find_operation(operation_id, principal)
    await long_poll(op, wait)
    return op.record()


@router.post("/v1/operations/wait", response_model=list[OperationRecord], openapi_extra=json_body(WaitForOperations))
async def wait_for_operations(request: Request, state: TrainerService = Depends(get_state),
                              principal: Principal = Depends(authenticate)):
    """Waits for the first operation like GET does, then answers with its record and those of the other
    listed ones that have finished (unfinished and unknown ones are left out: an unknown one's own poll
    reports it lost)."""
    body = await parsed(request, WaitForOperations)
    first, _ = state.find_operation(body.operation_ids[0], principal)
    await long_poll(first, body.wait)
    records = [first.record()]
    for operation_id in body.operation_ids[1:]:
        with contextlib.suppress(OperationLostError):
            op = state.find_operation(operation_id, principal)[0]
            if op.status.finished:
                records.append(op.record())
    return JSONResponse([record.model_dump(mode="json") for record in records])


@router.post("/v1/operations/{operation_id}/cancel")
async def cancel_operation(operation_id: str, state: TrainerService = Depends(get_state),
                           principal: Principal = Depends(authenticate)):
    op, session = state.find_operation(operation_id, principal)
    cancelled = session.cancel(op)
    return {"cancelled": cancelled, "record": op.record().model_dump(mode="json")}


@router.post("/v1/artifacts/{artifact_id}/grants", dependencies=[Depends(admin)],
             openapi_extra=json_body(GrantArtifact))
async def grant_artifact(artifact_id: str, request: Request, state: TrainerService = Depends(get_state)):
    """Let one client's token use another client's artifact: an explicit, audited administrator's grant."""
    body = await parsed(request, GrantArtifact)
    return await asyncio.to_thread(state.grant, artifact_id, body)


@router.get("/v1/artifacts", response_model=list[ArtifactInfo])
def list_artifacts(tenant_id: str = "default", training_client_id: Optional[str] = None,
                   state: TrainerService = Depends(get_state), principal: Principal = Depends(authenticate)):
    principal.check_tenant(tenant_id)
    return state.store.list(tenant_id, principal.visible(training_client_id))


@router.get("/v1/artifacts/{artifact_id}", response_model=ArtifactInfo)
def artifact_info(artifact_id: str, tenant_id: str = "default", state: TrainerService = Depends(get_state),
                  principal: Principal = Depends(authenticate)):
    return state.own_artifact(principal, tenant_id, artifact_id)


@router.get("/v1/artifacts/{artifact_id}/content", responses={200: {"content": {"application/octet-stream": {}}}})
def artifact_content(artifact_id: str, tenant_id: str = "default", state: TrainerService = Depends(get_state),
                     principal: Principal = Depends(authenticate)):
    state.own_artifact(principal, tenant_id, artifact_id)
    data = state.store.read_raw(tenant_id, artifact_id)
    return Response(data, media_type="application/octet-stream")


@router.post("/v1/datasets", response_model=DatasetInfo, status_code=201, dependencies=[Depends(admin)],
             openapi_extra=json_body(RegisterDataset))
async def register_dataset(request: Request, state: TrainerService = Depends(get_state)):
    """Store a dataset encrypted, for server-side Poisson sampling (see datasets.py)."""
    body = await parsed(request, RegisterDataset)

    def register() -> DatasetInfo:
        info = datasets.register(state.store, body)
        state.audit_dataset("register_dataset", info)
        return info

    return await asyncio.to_thread(register)


@router.get("/v1/datasets", response_model=list[DatasetInfo], dependencies=[Depends(admin)])
def list_datasets(tenant_id: str = "default", state: TrainerService = Depends(get_state)):
    return datasets.list_datasets(state.store, tenant_id)


@router.get("/v1/datasets/{dataset_id}", response_model=DatasetInfo, dependencies=[Depends(admin)])
def dataset_info(dataset_id: str, tenant_id: str = "default", state: TrainerService = Depends(get_state)):
    return datasets.describe(state.store, tenant_id, dataset_id)


@router.delete("/v1/datasets/{dataset_id}", response_model=DatasetInfo, dependencies=[Depends(admin)])
def delete_dataset(dataset_id: str, tenant_id: str = "default", state: TrainerService = Depends(get_state)):
    """The examples go; the dataset's privacy ledger stays."""
    info = datasets.delete(state.store, tenant_id, dataset_id)
    state.audit_dataset("delete_dataset", info)
    return info


def tenant_of(principal: Principal, tenant_id: Optional[str]) -> str:
    """The tenant a read is about: the one named, else the caller's own."""
    tenant = tenant_id or principal.tenant_id or "default"
    principal.check_tenant(tenant)
    return tenant


@router.get("/v1/audit", response_model=list[AuditEntry])
def audit_entries(training_client_id: Optional[str] = None, operation: Optional[str] = None,
                  tenant_id: Optional[str] = None, limit: int = Query(100, ge=1, le=10_000),
                  state: TrainerService = Depends(get_state), principal: Principal = Depends(authenticate)):
    """Served only once the whole chain verifies under the tenant's key set and does not end before what this
    trainer wrote or served: an edited or truncated log is an AuditIntegrityError (500), never an answer."""
    tenant, visible = tenant_of(principal, tenant_id), principal.visible(training_client_id)
    state.audit.flush()
    return state.audit_trail.query(tenant, training_client_id=visible, operation=operation, limit=limit)


@router.get("/v1/audit/head", response_model=AuditHead)
def audit_head(tenant_id: Optional[str] = None, state: TrainerService = Depends(get_state),
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


@router.get("/v1/receipts/public_key")
def receipt_public_key(tenant_id: Optional[str] = None, state: TrainerService = Depends(get_state),
                       principal: Principal = Depends(authenticate)):
    """The PEM public key that signs this tenant's privacy receipts now (``/v1/receipts/public_keys``: with
    the keys that signed them before a rotation)."""
    tenant = tenant_of(principal, tenant_id)
    key = state.store.keys.receipt_key(tenant)
    return {"tenant_id": tenant, "public_key": public_key_pem(key), "key_id": key_id(key.public_key())}


@router.get("/v1/receipts/public_keys")
def receipt_public_keys(tenant_id: Optional[str] = None, state: TrainerService = Depends(get_state),
                        principal: Principal = Depends(authenticate)):
    """The tenant's receipt key list (tg_tinker.receipts): the active key and every retired one with the audit
    sequence it was retired at; ``verify_receipt`` takes it and refuses a retired key's later receipts."""
    return state.store.keys.receipt_public_keys(tenant_of(principal, tenant_id))
