"""What the Tinker front door keeps: its sessions, models, samplers and checkpoint names (its futures are in
the service's one store: service/futures.py).

Everything that trains, samples or is stored is TenSafe's own: a Tinker model is a TenSafe training
client (``tk-`` + a hash of the model id), a sampler a TenSafe sampling client, a ``tinker://`` path an
encrypted artifact whose sealed name is the path. This module only maps one set of names onto the other,
with the tenant of the API key checked on every lookup (another tenant's ids answer "unknown").
"""

from __future__ import annotations

import collections
import hashlib
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from tg_tinker.errors import (
    ClientTerminatedError,
    ResourceExhaustedError,
    TrainingClientNotFoundError,
    ValidationError,
)
from tg_tinker.types import ArtifactInfo

from tensafe_trainer.service.samplers import make_room

PATH_SCHEME = "tinker://"
CHECKPOINT_KINDS = {"weights": "checkpoint", "sampler_weights": "sampler"}  # Tinker kind -> TenSafe artifact kind
# A session whose client sent no heartbeat (the SDK sends one every 10 s) for this long is finished: its models and
# samplers leave their hosts, its checkpoints stay. Without it, a client that exits without finishing its session
# (the cookbook's DPO recipe does) would hold its slots until the trainer restarts.
SESSION_LAPSE_S = float(os.environ.get("TENSAFE_TINKER_SESSION_LAPSE_S", "60"))
LAPSE_SWEEP_S = min(10.0, SESSION_LAPSE_S / 3)  # how often lapsed sessions are looked for, besides each start
MAX_OPEN_SESSIONS = 256  # per tenant: a session costs little, but every one is kept and scanned for its lapse
ENDED_KEPT_S = 3600.0  # an ended session (and its models) is remembered this long, to answer 410 / TERMINATED


@dataclass(eq=False)
class TinkerSession:
    session_id: str
    tenant_id: str
    key_id: str = ""  # the key that opened it
    created_at: float = field(default_factory=time.time)
    samplers: collections.OrderedDict = field(default_factory=collections.OrderedDict)  # sampler id -> TinkerSampler
    models: list[str] = field(default_factory=list)
    finished: bool = False
    last_heartbeat: float = field(default_factory=time.monotonic)
    ended_at: Optional[float] = None  # time.monotonic() when it was finished


@dataclass(eq=False)
class TinkerModel:
    model_id: str
    tenant_id: str
    session: Any  # the TenSafe Session that trains it
    base_model: str
    lora_rank: int
    train_flags: dict[str, bool]
    user_metadata: dict[str, str]
    created_at: float = field(default_factory=time.time)
    last_request_time: float = field(default_factory=time.time)

    @property
    def description(self) -> dict:
        """What a checkpoint records of its model, so that a load can rebuild the same client."""
        return {"base_model": self.base_model, "lora_rank": self.lora_rank, **self.train_flags,
                "user_metadata": self.user_metadata}


@dataclass(eq=False)
class TinkerSampler:
    sampler_id: str
    tenant_id: str
    session: Any  # the TenSafe sampling Session
    base_model: str
    model_path: Optional[str]


def client_id_for(model_id: str) -> str:
    return "tk-" + hashlib.sha256(model_id.encode()).hexdigest()[:24]


def session_id_of(owned_id: str) -> str:
    """The session of a model or sampler id (``{session_id}:train:N``, ``{session_id}:sample:N``)."""
    return owned_id.split(":", 1)[0]


def parse_path(path: str) -> tuple[str, str, str]:
    """``tinker://{run}/{kind}/{name}`` -> (run, kind, name)."""
    if not isinstance(path, str) or not path.startswith(PATH_SCHEME):
        raise ValidationError(f"not a tinker:// path: {str(path)[:200]!r}", {"field": "path"})
    parts = path[len(PATH_SCHEME):].split("/")
    if len(parts) != 3 or not all(parts) or parts[1] not in CHECKPOINT_KINDS:
        raise ValidationError(f"a checkpoint path is tinker://<run>/weights/<name> or tinker://<run>/sampler_weights/"
                              f"<name>, not {path[:200]!r}", {"field": "path"})
    return parts[0], parts[1], parts[2]


def check_name(name: str) -> str:
    if not isinstance(name, str) or not name or len(name) > 64 or "/" in name or name in (".", ".."):
        raise ValidationError("a checkpoint name is 1-64 characters without '/'", {"field": "path"})
    return name


def is_checkpoint(info: ArtifactInfo) -> bool:
    """Saved by the Tinker door: a well-formed path and its description (an artifact a /v1 client of the tenant
    named ``tinker://...`` itself is not one, and must not break the tenant's listings)."""
    try:
        parse_path(info.name)
    except ValidationError:
        return False
    return isinstance(info.metadata.get("tinker"), dict)


class TinkerRegistry:
    def __init__(self):
        self.sessions: dict[str, TinkerSession] = {}
        self.models: dict[str, TinkerModel] = {}
        self.samplers: dict[str, TinkerSampler] = {}
        self._paths: dict[tuple[str, str], str] = {}  # (tenant, path) -> artifact id, filled from listings

    # --- sessions, models, samplers ---------------------------------------------------------

    def new_session(self, tenant_id: str, key_id: str, per_key: int) -> TinkerSession:
        """A session of ``tenant_id`` opened by key ``key_id``: at most MAX_OPEN_SESSIONS open per tenant, of which
        ``per_key`` per key (one key, or one script leaking sessions, cannot lock its tenant's other keys out)."""
        self._forget_ended()
        open_ = [s for s in self.sessions.values() if not s.finished and s.tenant_id == tenant_id]
        if len(open_) >= MAX_OPEN_SESSIONS:
            raise ResourceExhaustedError(f"this tenant already has {MAX_OPEN_SESSIONS} open Tinker sessions: finish "
                                         "one (ServiceClient.close) first", {"max_sessions": MAX_OPEN_SESSIONS})
        if sum(s.key_id == key_id for s in open_) >= per_key:
            raise ResourceExhaustedError(f"this key already has {per_key} open Tinker sessions: finish one "
                                         "(ServiceClient.close) first, or let it lapse", {"max_sessions": per_key})
        session = TinkerSession(uuid.uuid4().hex, tenant_id, key_id)
        self.sessions[session.session_id] = session
        return session

    def _forget_ended(self) -> None:
        """Sessions ended over ENDED_KEPT_S ago, with their models: nothing of them runs any more."""
        cutoff = time.monotonic() - ENDED_KEPT_S
        for session in [s for s in self.sessions.values() if s.ended_at is not None and s.ended_at < cutoff]:
            del self.sessions[session.session_id]
            for model_id in session.models:
                self.models.pop(model_id, None)

    def session(self, session_id: str, tenant_id: str) -> TinkerSession:
        found = self.sessions.get(session_id)
        if found is None or found.tenant_id != tenant_id:
            raise TrainingClientNotFoundError(f"unknown session {str(session_id)[:100]!r}", {"session_id": session_id})
        found.last_heartbeat = time.monotonic()
        return found

    def open_session(self, session_id: str, tenant_id: str) -> TinkerSession:
        """A session that may still start models and samplers: a finished (or lapsed) one is refused (410), so
        nothing it starts outlives it, and none of its model ids (whose spent seq_ids went with it) comes back."""
        return self.check_open(self.session(session_id, tenant_id))

    @staticmethod
    def check_open(session: TinkerSession) -> TinkerSession:
        if session.finished:
            raise ClientTerminatedError(f"session {session.session_id[:100]!r} is finished: create a new session",
                                        {"session_id": session.session_id[:100]})
        return session

    def check_unused_sampler(self, sampler_id: str) -> None:
        """A sampler of new weights gets a new id, never an older sampler's (which would answer for them)."""
        if sampler_id in self.samplers:
            raise ValidationError(f"sampling session {sampler_id[:200]!r} already exists: use a new "
                                  "sampling_session_seq_id", {"field": "sampling_session_seq_id"})

    def _alive(self, owned_id: str) -> None:
        """A request on a model or sampler (``{session_id}:train:N``, ``...:sample:N``) is its session's heartbeat."""
        owner = self.sessions.get(session_id_of(owned_id))
        if owner is not None:
            owner.last_heartbeat = time.monotonic()

    def lapsed(self) -> list[TinkerSession]:
        """Open sessions whose client has been silent for SESSION_LAPSE_S."""
        cutoff = time.monotonic() - SESSION_LAPSE_S
        return [s for s in self.sessions.values() if not s.finished and s.last_heartbeat < cutoff]

    def engines_of_key(self, tenant_id: str, key_id: str) -> int:
        """Live models and samplers of the open sessions one key opened."""
        mine = [s for s in self.sessions.values() if not s.finished and s.tenant_id == tenant_id and s.key_id == key_id]
        models = [self.models.get(m) for s in mine for m in s.models]
        return sum(m is not None and not m.session.terminated for m in models) + sum(len(s.samplers) for s in mine)

    def open_models(self, tenant_id: str) -> list[TinkerModel]:
        return [m for m in self.models.values()
                if m.tenant_id == tenant_id and not m.session.terminated]

    def model(self, model_id: str, tenant_id: str) -> TinkerModel:
        found = self.models.get(model_id)
        if found is None or found.tenant_id != tenant_id:
            raise TrainingClientNotFoundError(f"unknown model {str(model_id)[:200]!r}", {"model_id": model_id})
        found.last_request_time = time.time()
        self._alive(model_id)
        return found

    def sampler(self, sampler_id: str, tenant_id: str) -> TinkerSampler:
        found = self.samplers.get(sampler_id)
        if found is None or found.tenant_id != tenant_id:
            raise TrainingClientNotFoundError(f"unknown sampling session {str(sampler_id)[:200]!r} (closed, or "
                                              "never created)", {"sampling_session_id": sampler_id})
        self._alive(sampler_id)
        return found

    def add_sampler(self, owner: TinkerSession, sampler: TinkerSampler) -> list[TinkerSampler]:
        """Register ``sampler``; returns the samplers it pushes out (the one sampler policy: service/samplers.py),
        to be closed."""
        evicted = make_room(list(owner.samplers.values()))
        for old in evicted:
            del owner.samplers[old.sampler_id]
            self.samplers.pop(old.sampler_id, None)
        self.samplers[sampler.sampler_id] = sampler
        owner.samplers[sampler.sampler_id] = sampler
        return evicted

    # --- checkpoint paths -------------------------------------------------------------------

    def remember_path(self, tenant_id: str, path: str, artifact_id: str) -> Optional[str]:
        """Returns the artifact the path named before (an overwritten save), if any."""
        previous = self._paths.get((tenant_id, path))
        self._paths[(tenant_id, path)] = artifact_id
        return previous if previous != artifact_id else None

    def forget_path(self, tenant_id: str, path: str) -> None:
        self._paths.pop((tenant_id, path), None)

    def known_path(self, tenant_id: str, path: str) -> Optional[str]:
        return self._paths.get((tenant_id, path))

    def index(self, tenant_id: str, artifacts: list[ArtifactInfo]) -> dict[str, ArtifactInfo]:
        """path -> artifact of the tenant's Tinker checkpoints (the sealed name is the path), the newest
        where two carry one path (an overwrite interrupted before the old one was removed)."""
        found = {}
        for info in artifacts:
            if info.name and info.name.startswith(PATH_SCHEME) and is_checkpoint(info):
                found[info.name] = info
        for path, info in found.items():
            self._paths[(tenant_id, path)] = info.artifact_id
        return found
