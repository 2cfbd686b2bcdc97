"""The trainer's service layer: one object both front doors call (``/v1``: api/v1/routes.py; the Tinker wire:
api/tinker/routes.py). It holds the clients and their tokens, the one future store, the artifact store and
the audit writer; the doors authenticate, parse their wire format and encode the answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tg_tinker.errors import (
    AuthenticationError,
    OperationLostError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TrainingClientNotFoundError,
    ValidationError,
)
from tg_tinker.operations import SubmitOperation
from tg_tinker.receipts import sign_receipt
from tg_tinker.types import (
    ArtifactInfo,
    ClientInfo,
    ClientStatus,
    CreateTrainingClient,
    DatasetInfo,
    GrantArtifact,
    LoadStateRequest,
)

from tensafe_trainer.service.tokens import RevokedTokens, replaced, terminated, token_digest
from tensafe_trainer.engine.process import EngineSlot, busy_counter
from tensafe_trainer.engine.protocol import SlotSpec
from tensafe_trainer.service import admission, metrics, samplers
from tensafe_trainer.service.futures import FutureStore
from tensafe_trainer.service.hosts import HostPool
from tensafe_trainer.service.principals import Principal
from tensafe_trainer.service.sessions import Operation, Session
from tensafe_trainer.storage.artifacts import ArtifactStore
from tensafe_trainer.storage.audit import AuditTrail, request_hash
from tensafe_trainer.storage.audit_writer import AuditWriter


@dataclass
class Settings:
    home: Path
    token: Optional[str]
    max_pending: int = 10_000
    max_request_bytes: int = 64 << 20  # the trainer's own token (dataset uploads); clients get less (admission.py)
    max_clients: int = 16  # live clients at once (each an adapter slot on a model host)
    host_adapters: int = 8  # LoRA clients one host process carries at most (service/hosts.py)
    host_idle_s: float = 60.0  # how long a shared host with no client stays warm
    share_hosts_across_tenants: bool = False  # clients of different tenants may share a host process
    max_clients_per_tenant: Optional[int] = None  # of those, one tenant's at most (a shared trainer: None is no cap)
    min_free_memory: int = 1 << 30  # a new client is refused while the machine has less available than this
    open_docs: bool = False  # /docs, /redoc and /openapi.json without a token (tensafe serve --open-docs)
    initial_client: Optional[CreateTrainingClient] = None
    privacy_policy: Optional[Path] = None  # the Tinker wire's DP policy per tenant (service/tinker/policy.py)
    tinker_key: Optional[str] = None  # a trainer pod's Tinker key, for its initial client's tenant
    tinker_model_roots: Optional[tuple] = None  # folders a Tinker key may name as base_model (None: any)


@dataclass
class TrainerService:
    """The service both doors call: the clients (sessions) and their tokens, the one future store, the artifact
    store and the audit writer, and what acts on them. A door authenticates and parses; this decides."""

    settings: Settings
    store: ArtifactStore
    audit_trail: AuditTrail
    audit: AuditWriter
    loop: asyncio.AbstractEventLoop
    sessions: dict[str, Session] = field(default_factory=dict)
    futures: FutureStore = field(default_factory=FutureStore)  # both doors' (service/futures.py)
    busy_engines: Any = field(default_factory=busy_counter)
    hosts: Optional[HostPool] = None  # made from the settings
    client_tokens: dict[bytes, Principal] = field(default_factory=dict)  # sha256(token) -> its client
    revoked: RevokedTokens = field(default_factory=RevokedTokens)  # so a revoked token hears why

    def __post_init__(self):
        if self.hosts is None:
            s = self.settings
            self.hosts = HostPool(s.home, self.busy_engines, s.host_adapters, s.host_idle_s,
                                  s.share_hosts_across_tenants)

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

    def granted(self, principal: Principal) -> set[str]:
        session = self.sessions.get(principal.client_id) if principal.client_id else None
        return session.granted if session is not None else set()

    def session(self, client_id: str) -> Session:
        try:
            return self.sessions[client_id]
        except KeyError:
            raise TrainingClientNotFoundError(f"no client {client_id!r} on this trainer",
                                              {"client_id": client_id}) from None

    # --- what a request acts on ---------------------------------------------------------------

    def client_session(self, principal: Principal, client_id: str) -> Session:
        """The client a request acts on: for a client's token, the very instance it was issued for (never a
        newer client that took over its id)."""
        principal.check(client_id)
        if principal.session is not None:
            return self.current(principal.session)
        return self.session(client_id)

    def current(self, session: Session) -> Session:
        """Refuse to go on with a client replaced or terminated while this request was arriving."""
        if self.sessions.get(session.client_id) is not session:
            raise AuthenticationError(f"client {session.client_id!r} was replaced while this request was on its "
                                      "way: it acts on nothing")
        return session

    def with_token(self, session: Session) -> ClientInfo:
        return session.info().model_copy(update={"access_token": self.issue_token(session)})

    def make_room_for_sampler(self, parent: Session) -> None:
        """The one sampler policy (service/samplers.py): the oldest of a client's live samplers closes for a new
        one."""
        parent.children = [c for c in self.current(parent).children if not c.terminated]
        for old in samplers.make_room(parent.children):
            self.stop(old, samplers.closed_for_newer(old.client_id))

    # --- operations -----------------------------------------------------------------------------

    def admit(self, session: Session, submissions: list[SubmitOperation], principal: Principal) -> None:
        """Every submission of a request checked before any is queued: a refusal leaves nothing behind."""
        session.check_open()
        limits = session.limits
        for submission in submissions:
            admission.admit(submission.request, limits)
            if isinstance(submission.request, LoadStateRequest):  # the engine loads what it is given
                principal.check_artifact(self.store.info(session.tenant_id, submission.request.artifact_id),
                                         session.granted)

    def queue_operation(self, session: Session, submission: SubmitOperation) -> tuple[Operation, bool]:
        """(operation, created): a retry under an idempotency key gets the operation it made (service/futures.py)."""
        fp, digest = session.digests(submission.request)
        earlier = self.futures.claim(session, submission.idempotency_key, digest)
        if earlier is not None:
            return earlier, False
        op = session.submit(submission.request, fp)
        self.futures.add(op, session, submission.idempotency_key, digest)
        return op, True

    def find_operation(self, operation_id: str, principal: Principal) -> tuple[Operation, Session]:
        """An operation this caller may see; any other (unknown, forgotten, a Tinker request's, another client's)
        is as unknown as a wrong id, so an id tells nothing of other clients or tenants."""
        try:
            op, session = self.futures.get(operation_id)
        except KeyError:
            op = session = None
        if not isinstance(op, Operation) or not (principal.is_trainer or principal.client_id == session.client_id):
            raise OperationLostError(
                f"operation {operation_id!r} is unknown to this trainer (it restarted, or the id is wrong); "
                "its outcome is unknown", {"operation_id": operation_id})
        if principal.session is not None and session is not principal.session:
            raise PermissionDeniedError(f"operation {operation_id!r} belongs to an earlier client "
                                        f"{session.client_id!r}, not to this token's", {"operation_id": operation_id})
        return op, session

    # --- artifacts and datasets -------------------------------------------------------------------

    def own_artifact(self, principal: Principal, tenant_id: str, artifact_id: str) -> ArtifactInfo:
        principal.check_tenant(tenant_id)
        info = self.store.info(tenant_id, artifact_id)
        principal.check_artifact(info, self.granted(principal))
        return info

    def grant(self, artifact_id: str, body: GrantArtifact) -> dict:
        info = self.store.info(body.tenant_id, artifact_id)
        session = self.session(body.training_client_id)
        session.check_open()
        if session.tenant_id != info.tenant_id:
            raise PermissionDeniedError(f"client {session.client_id!r} belongs to another tenant than artifact "
                                        f"{artifact_id}", {"artifact_id": artifact_id})
        self.audit_artifact_use("grant_artifact", info.tenant_id, session.client_id, artifact_id)
        session.granted.add(artifact_id)
        return {"artifact_id": artifact_id, "training_client_id": session.client_id}

    def audit_dataset(self, operation: str, info: DatasetInfo) -> None:
        self.audit_artifact_use(operation, info.tenant_id, None, info.artifact_id,
                                produced=operation == "register_dataset")

    # --- clients ----------------------------------------------------------------------------------

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
                f"this trainer already runs {live} clients, its limit: close one first, or start the trainer with a "
                "higher TENSAFE_MAX_CLIENTS",
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

    def start_engine(self, spec: SlotSpec) -> EngineSlot:
        if spec.kind == "sampling" and spec.artifact_id:
            spec = dataclasses.replace(spec, saved_by=self._config_that_saved(spec.tenant_id, spec.artifact_id))
        return self.hosts.attach(spec)

    def _config_that_saved(self, tenant_id: str, artifact_id: str):
        """The config of the live client that saved an artifact (its sampler may share that client's host); None
        if that client is gone. The host checks the artifact's own config against it."""
        session = self.sessions.get(self.store.info(tenant_id, artifact_id).training_client_id)
        return session.config if session is not None and session.tenant_id == tenant_id else None

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
