"""What the Tinker wire's requests do, over the one service (service/trainer.py): its sessions start and end, a
model is a TenSafe training client under the tenant's privacy policy, a sampler a sampling client, a checkpoint
an encrypted artifact whose sealed name is its ``tinker://`` path. Each request becomes a future of the one
future store, keyed by its ``(model_id, seq_id)``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Coroutine, Hashable, Optional

from tg_tinker.config import MAX_LORA_RANK, LoRAConfig, OptimizerConfig, TrainingConfig
from tg_tinker.errors import (
    ArtifactNotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ValidationError,
    error_from_wire,
)
from tg_tinker.types import ArtifactInfo, ClientStatus, CreateTrainingClient, OperationStatus, SaveStateRequest

from tensafe_trainer.engine.models import SMOLLM2_REF, is_tiny, parse_tiny, smollm2_folder
from tensafe_trainer.engine.protocol import SlotSpec
from tensafe_trainer.service import admission, door, samplers
from tensafe_trainer.service.futures import TaskFuture
from tensafe_trainer.service.principals import Principal
from tensafe_trainer.service.sessions import Operation, Session
from tensafe_trainer.service.tinker.keys import TinkerKeys
from tensafe_trainer.service.tinker.policy import PrivacyPolicy
from tensafe_trainer.service.tinker.registry import (
    CHECKPOINT_KINDS,
    PATH_SCHEME,
    LAPSE_SWEEP_S,
    SESSION_LAPSE_S,
    TinkerModel,
    TinkerRegistry,
    TinkerSampler,
    TinkerSession,
    check_name,
    client_id_for,
    parse_path,
)
from tensafe_trainer.service.trainer import TrainerService

log = logging.getLogger("tensafe.tinker")
READY_POLL_S = 0.05
MAX_BASE_MODEL_CHARS = 1024  # a built-in name or a folder's path
MAX_SESSIONS_PER_KEY = 64  # of the tenant's MAX_OPEN_SESSIONS: one key cannot take them all
# Live models and samplers (each an engine holding a model) of one key's sessions: at most the trainer's max_clients
# less a quarter of them (16 by default: 12), so one key cannot take every slot. A shared trainer caps each tenant too
# (TENSAFE_MAX_CLIENTS_PER_TENANT).
RESERVED_FOR_OTHERS = 4  # one slot in this many is beyond any one key's reach


def engines_per_key(max_clients: int) -> int:
    return max(1, max_clients - max(1, max_clients // RESERVED_FOR_OTHERS))
TRAIN_FLAGS = ("train_mlp", "train_attn", "train_unembed")
TARGETS = {"train_attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "train_mlp": ["gate_proj", "up_proj", "down_proj"],
           "train_unembed": ["lm_head"]}


async def outcome(op: Operation) -> dict:
    """An operation's result once it has run; its error, as the SDK's exception, if it failed."""
    waiter = op.waiter()
    if waiter is not None:
        await asyncio.shield(waiter)
    if op.status is OperationStatus.SUCCEEDED:
        return op.result
    raise error_from_wire(op.error.model_dump() if op.error is not None else {"message": "operation failed"})


async def ready(session: Session) -> None:
    """Wait for a client's engine to start (an error if it did not)."""
    while session.status is ClientStatus.INITIALIZING:
        await asyncio.sleep(READY_POLL_S)
    session.check_open()


def tokenizer_id(base_model: str) -> str:
    """What the SDK loads the tokenizer from: the model's folder, or its name."""
    try:
        if Path(base_model).is_dir():
            return str(Path(base_model).resolve())
    except (OSError, ValueError):
        pass
    return str(smollm2_folder()) if base_model == SMOLLM2_REF else base_model


@dataclass
class TinkerService:
    trainer: TrainerService
    keys: TinkerKeys
    policy: PrivacyPolicy
    # Folders a key holder may name as base_model ($TENSAFE_TINKER_MODEL_ROOTS); None: any folder (a machine of one
    # user); (): none. Built-in models are always allowed.
    model_roots: Optional[tuple[Path, ...]] = None
    registry: TinkerRegistry = field(default_factory=TinkerRegistry)

    # --- futures ------------------------------------------------------------------------------

    def claimed(self, owner: Hashable, key: Optional[tuple], digest: bytes) -> Optional[str]:
        """The future of this same request made earlier (a retry), None for a new one (see ``submit``)."""
        earlier = self.trainer.futures.claim(owner, key, digest)
        return earlier.id if earlier is not None else None

    def submit(self, owner: Hashable, key: Optional[tuple], digest: bytes,
               start: Callable[[], Coroutine]) -> str:
        """The one place a Tinker request becomes a future: its key claimed, its operations queued (``start``,
        which returns the coroutine computing the answer) and its future kept, with no await in between, so two
        copies of one request arriving together run once."""
        earlier = self.claimed(owner, key, digest)
        if earlier is not None:
            return earlier
        return self.trainer.futures.add(TaskFuture(start()), owner, key, digest).id

    def future(self, request_id: str, tenant_id: str) -> TaskFuture:
        """A Tinker future of this tenant (another tenant's, or a /v1 operation's id, is as unknown as a wrong one)."""
        try:
            found, owner = self.trainer.futures.get(request_id)
        except KeyError:
            found = owner = None
        if not isinstance(found, TaskFuture) or owner.tenant_id != tenant_id:
            raise ArtifactNotFoundError(f"unknown future {request_id[:100]!r} (expired, or never submitted)",
                                        {"request_id": request_id[:100]})
        return found

    # --- sessions -----------------------------------------------------------------------------

    def new_session(self, key: Principal) -> TinkerSession:
        self.end_lapsed_sessions()
        return self.registry.new_session(key.tenant_id, key.key_id, MAX_SESSIONS_PER_KEY)

    def end_session(self, session: TinkerSession) -> None:
        """Its engines go (an unnoised gradient sum with them); its checkpoints stay."""
        session.finished = True
        session.ended_at = time.monotonic()
        self.trainer.futures.release(session)
        for model_id in session.models:
            model = self.registry.models.get(model_id)
            if model is not None:
                self.trainer.stop(model.session)
                self.trainer.futures.release(model)
        for sampler in list(session.samplers.values()):
            self.registry.samplers.pop(sampler.sampler_id, None)
            self.trainer.stop(sampler.session)
            self.trainer.futures.release(sampler)
        session.samplers.clear()

    def end_lapsed_sessions(self) -> None:
        """Run before anything that starts an engine, so silent sessions free their slots first (and every
        ``LAPSE_SWEEP_S`` by ``sweep_lapsed_sessions``)."""
        for session in self.registry.lapsed():
            log.info("finishing Tinker session %s of tenant %s: no heartbeat for %.0f s", session.session_id,
                     session.tenant_id, SESSION_LAPSE_S)
            self.end_session(session)

    async def sweep_lapsed_sessions(self) -> None:
        """Runs with the server: a script that exited without ending its session frees its slots within
        SESSION_LAPSE_S + LAPSE_SWEEP_S, whether or not anyone starts a model meanwhile."""
        while True:
            await asyncio.sleep(LAPSE_SWEEP_S)
            try:
                self.end_lapsed_sessions()
            except Exception:  # noqa: BLE001 - the next round tries again; the server goes on
                log.exception("ending lapsed Tinker sessions failed")

    # --- models -------------------------------------------------------------------------------

    def check_base_model(self, base_model: str) -> str:
        if len(base_model) > MAX_BASE_MODEL_CHARS:
            raise ValidationError(f"base_model is longer than {MAX_BASE_MODEL_CHARS} characters",
                                  {"field": "base_model"})
        if is_tiny(base_model):
            parse_tiny(base_model)  # its sizes are the caller's: bounded at the door
        if is_tiny(base_model) or base_model == SMOLLM2_REF or self.model_roots is None:
            return base_model
        try:
            real = Path(base_model).resolve()  # symlinks and '..' resolved: a link out of a root does not pass
            inside = real.is_dir() and any(real.is_relative_to(root.resolve()) for root in self.model_roots)
        except (OSError, ValueError):  # a name too long for the file system, a NUL byte: not a folder of ours
            inside = False
        if inside:
            return base_model
        raise PermissionDeniedError(f"base_model {base_model[:200]!r} is not a built-in model or a folder under this "
                                    "trainer's model roots (TENSAFE_TINKER_MODEL_ROOTS)", {"field": "base_model"})

    def model_config(self, tenant_id: str, description: dict, seed: Optional[int]) -> TrainingConfig:
        """A model's TenSafe config: its LoRA from the description, its DP from the tenant's policy (tightened by
        the model's metadata where it asks)."""
        targets = [module for flag in ("train_attn", "train_mlp", "train_unembed") if description[flag]
                   for module in TARGETS[flag]]
        if not targets:
            raise ValidationError("train at least one of attn, mlp, unembed", {"field": "lora_config"})
        dp = self.policy.dp_for(tenant_id, description["user_metadata"])
        try:
            return TrainingConfig(
                model_ref=description["base_model"],
                lora_config=LoRAConfig(rank=description["lora_rank"], alpha=32, target_modules=targets),
                # Tinker's AdamParams defaults; each optim_step sets its own (AdamStep) anyway.
                optimizer=OptimizerConfig(name="adamw", learning_rate=1e-4, betas=(0.9, 0.95), eps=1e-12),
                batch_size=self.policy.for_tenant(tenant_id).batch_size if dp is not None else 1024, dp_config=dp,
                seed=seed or 0)
        except ValueError as exc:
            raise ValidationError(f"bad model settings: {exc}"[:1000]) from None

    def start_model(self, owner: TinkerSession, model_id: str, description: dict,
                    seed: Optional[int] = None) -> TinkerModel:
        """A new model of an open session, from a description (a create_model's, or a checkpoint's)."""
        base_model = str(description.get("base_model") or "")
        if not base_model:
            raise ValidationError("a model needs a base_model", {"field": "base_model"})
        self.check_base_model(base_model)
        described = {"base_model": base_model,
                     "lora_rank": door.integer(description, "lora_rank", 32, 1, MAX_LORA_RANK),
                     **{flag: bool(description.get(flag, True)) for flag in TRAIN_FLAGS},
                     "user_metadata": {str(k): str(v) for k, v in (description.get("user_metadata") or {}).items()}}
        config = self.model_config(owner.tenant_id, described, seed)
        self.end_lapsed_sessions()
        self.check_engine_room(owner)
        session = self.trainer.start_training(CreateTrainingClient(config=config, client_id=client_id_for(model_id),
                                                                   tenant_id=owner.tenant_id))
        model = TinkerModel(model_id, owner.tenant_id, session, base_model, described["lora_rank"],
                            {flag: described[flag] for flag in TRAIN_FLAGS}, described["user_metadata"])
        self.registry.models[model_id] = model
        owner.models.append(model_id)
        return model

    def check_engine_room(self, owner: TinkerSession, freed: int = 0) -> None:
        """Refuse a new engine for ``owner``'s key once its sessions hold ``engines_per_key`` (``freed``: those the
        new one will close)."""
        held = self.registry.engines_of_key(owner.tenant_id, owner.key_id) - freed
        cap = engines_per_key(self.trainer.settings.max_clients)
        if held >= cap:
            raise ResourceExhaustedError(
                f"this key's sessions already hold {held} models and samplers, the most one key may ({cap}): finish "
                "a session (ServiceClient.close) first", {"max_engines_per_key": cap})

    @staticmethod
    def queue(session: Session, request: Any) -> Operation:
        """One TenSafe operation on a model's or sampler's client, checked at TenSafe's door first."""
        session.check_open()
        admission.admit(request, session.limits)
        return session.submit(request)

    # --- samplers -----------------------------------------------------------------------------

    def start_sampler(self, owner: TinkerSession, sampler_id: str, base_model: str, model_path: Optional[str],
                      artifact_id: Optional[str], reuse: bool = True) -> TinkerSampler:
        """The sampler ``sampler_id`` of an open session: the one already there (``reuse``), or a new one."""
        self.registry.check_open(owner)  # it may have ended while this request waited (a sampler's save)
        existing = self.registry.samplers.get(sampler_id)
        if existing is not None and reuse:
            return existing
        self.registry.check_unused_sampler(sampler_id)
        self.end_lapsed_sessions()
        self.check_engine_room(owner, freed=len(samplers.make_room(list(owner.samplers.values()))))
        state = self.trainer
        client_id = client_id_for(sampler_id)
        spec = SlotSpec.sampling(client_id, owner.tenant_id, artifact_id, base_model)
        if artifact_id:  # the artifact's use is on record, like a load
            state.audit_artifact_use("create_sampling_client", owner.tenant_id, client_id, artifact_id)
        session = state.start(client_id, owner.tenant_id, "sampling", lambda: state.start_engine(spec))
        sampler = TinkerSampler(sampler_id, owner.tenant_id, session, base_model, model_path)
        for evicted in self.registry.add_sampler(owner, sampler):
            state.stop(evicted.session, samplers.closed_for_newer(evicted.sampler_id))
            state.futures.release(evicted)
        return sampler

    def sampler_of_weights(self, model: TinkerModel, owner: TinkerSession, sampler_id: str) -> Coroutine:
        """A sampler of a model's weights as they are now: their save queued now (in the model's request order),
        and the coroutine that starts the sampler from the unnamed artifact and deletes it once loaded."""
        op = self.queue(model.session, SaveStateRequest(kind="sampler", include_optimizer=False))

        async def loaded() -> TinkerSampler:
            artifact_id = (await outcome(op))["artifact_id"]
            sampler = self.start_sampler(owner, sampler_id, model.base_model, None, artifact_id, reuse=False)
            await ready(sampler.session)
            await asyncio.to_thread(self.delete_artifact, model.tenant_id, artifact_id, model.session.client_id)
            return sampler
        return loaded()

    # --- checkpoints --------------------------------------------------------------------------

    async def find_checkpoint(self, tenant_id: str, path: str) -> ArtifactInfo:
        parse_path(path)  # refuses what is not a tinker:// checkpoint path
        store, registry = self.trainer.store, self.registry
        known = registry.known_path(tenant_id, path)
        if known is not None:
            try:
                return await asyncio.to_thread(store.info, tenant_id, known)
            except ArtifactNotFoundError:
                registry.forget_path(tenant_id, path)
        found = registry.index(tenant_id, await asyncio.to_thread(store.list, tenant_id)).get(path)
        if found is None:
            raise ArtifactNotFoundError(f"no checkpoint {path[:300]!r}", {"path": path})
        return found

    async def checkpoints(self, tenant_id: str) -> dict[str, ArtifactInfo]:
        """path -> artifact, without those whose TTL has passed (deleted now)."""
        found = self.registry.index(tenant_id, await asyncio.to_thread(self.trainer.store.list, tenant_id))
        now = time.time()
        for path, info in list(found.items()):
            expires = (info.metadata.get("tinker") or {}).get("expires_at")
            if expires is not None and expires < now:
                await self.delete_checkpoint(tenant_id, path, info.artifact_id)
                del found[path]
        return found

    def save(self, model: TinkerModel, kind: str, name: str, ttl: Optional[float], user_metadata: dict) -> Coroutine:
        """A checkpoint's save queued now; the coroutine that finishes it (a save under an existing name replaces
        it) and returns its path."""
        path = f"{PATH_SCHEME}{model.model_id}/{kind}/{check_name(name)}"
        metadata = {"tinker": {**model.description, "checkpoint_metadata": user_metadata,
                               "expires_at": time.time() + ttl if ttl else None}}
        op = self.queue(model.session, SaveStateRequest(kind=CHECKPOINT_KINDS[kind], name=path, metadata=metadata,
                                                        include_optimizer=kind == "weights"))

        async def saved() -> str:
            previous = self.registry.remember_path(model.tenant_id, path, (await outcome(op))["artifact_id"])
            if previous is not None:
                await asyncio.to_thread(self.delete_artifact, model.tenant_id, previous, model.session.client_id)
            return path
        return saved()

    def delete_artifact(self, tenant_id: str, artifact_id: str, client_id: Optional[str]) -> None:
        self.trainer.store.delete(tenant_id, artifact_id)
        self.trainer.audit_artifact_use("delete_artifact", tenant_id, client_id, artifact_id)

    async def delete_checkpoint(self, tenant_id: str, path: str, artifact_id: Optional[str] = None) -> None:
        if artifact_id is None:
            artifact_id = (await self.find_checkpoint(tenant_id, path)).artifact_id
        await asyncio.to_thread(self.delete_artifact, tenant_id, artifact_id, None)
        self.registry.forget_path(tenant_id, path)

    def live_model(self, run_id: str, tenant_id: str) -> Optional[TinkerModel]:
        """The running model of a training run, if it is this tenant's."""
        live = self.registry.models.get(run_id)
        return live if live is not None and live.tenant_id == tenant_id else None
