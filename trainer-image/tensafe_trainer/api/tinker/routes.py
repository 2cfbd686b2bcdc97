"""``/api/v1``: the Tinker wire over TenSafe's sessions, engines, artifacts, audit and privacy rules.

Each submit endpoint checks what it can at once (the key's tenant, the model, the request's shape
through TenSafe's door checks), queues TenSafe operations on the model's session, and answers
``{"request_id"}``: a future of the service's one future store (service/futures.py), long-polled by
``retrieve_future``. A request's idempotency key is its ``(model_id, seq_id)`` (the SDK retries for
minutes with the same seq_id, and under DP an example counted twice would void the guarantee): a retry
gets the first request's future, and a seq_id runs once, under the store's one rule.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from tg_tinker.config import MAX_LORA_RANK, LoRAConfig, OptimizerConfig, TrainingConfig
from tg_tinker.errors import (
    ArtifactNotFoundError,
    PermissionDeniedError,
    RequestTooLargeError,
    TGTinkerError,
    ValidationError,
    error_from_wire,
)
from tg_tinker.types import (
    AdamStep,
    ClientStatus,
    ComputeLogprobsRequest,
    CreateTrainingClient,
    MAX_NUM_SAMPLES,
    LoadStateRequest,
    OperationStatus,
    OptimStepRequest,
    SampleRequest,
    SampleResult,
    SaveStateRequest,
)

from tensafe_trainer.service import admission
from tensafe_trainer.service import door, errors, samplers
from tensafe_trainer.service.futures import TaskFuture, long_poll
from tensafe_trainer.engine.protocol import SlotSpec
from tensafe_trainer.engine.models import SMOLLM2_REF, TINY_REF, is_tiny, parse_tiny, smollm2_folder
from tensafe_trainer.api.tinker import PREFIX, convert, listings
from tensafe_trainer.service.principals import Principal
from tensafe_trainer.api.tinker.keys import TinkerKeys
from tensafe_trainer.api.tinker.policy import PrivacyPolicy
from tensafe_trainer.api.tinker.registry import (
    CHECKPOINT_KINDS,
    PATH_SCHEME,
    SESSION_LAPSE_S,
    TinkerModel,
    TinkerRegistry,
    TinkerSampler,
    check_name,
    client_id_for,
    parse_path,
    session_id_of,
)

log = logging.getLogger("tensafe.tinker")
LONG_POLL_S = 25.0  # the SDK gives up on a poll after 45 s
READY_POLL_S = 0.05
# Batches of up to door.INLINE_BYTES padded tokens are converted on the event loop (well under a millisecond).
# Datums in one forward_backward request (the SDK splits a call into requests of this many, as client/config says):
# a request's conversion holds the GIL for its rows x width padded tokens, so its rows are bounded, whatever the
# model's batch.
MAX_DATUMS_PER_REQUEST = 128
# A datum's bytes per token at most: its int32 token, target_tokens (int64) and three float32 loss inputs, with room
# for chunk and tensor headers; and per datum, room for its map keys and provenance spans.
TINKER_BYTES_PER_TOKEN, DATUM_SLACK = 40, 4 << 10
JSON_BYTES_PER_TOKEN = 21  # a prompt token in JSON: up to 20 digits and a comma
MAX_BASE_MODEL_CHARS = 1024  # a built-in name or a folder's path
MAX_SESSIONS_PER_KEY = 64  # of the tenant's MAX_OPEN_SESSIONS: one key cannot take them all
PROTOBUF = "application/x-protobuf"
DEFAULT_MAX_TOKENS = 256  # Tinker's max_tokens=None: generation stops at EOS, a stop sequence or this (hosted
# Tinker's own cap is the model's context; a tiny test model's is 512, and a CPU sampler's answer should come soon)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
UNEMBED = ["lm_head"]
CLIENT_CONFIG = {  # the SDK's simplest path: plain httpx, JSON and uncompressed protobuf, no JWT
    "pjwt_auth_enabled": False, "credential_default_source": "api_key", "use_pyqwest_transport": False,
    "proto_compress_fwdbwd": False, "parallel_fwdbwd_chunks": True, "fwdbwd_max_chunk_len": MAX_DATUMS_PER_REQUEST,
    "sample_use_retrieve_futures": False, "custom_loss_server_side": False, "sample_join_sampling_session": False,
}


def datum_budget(limits: admission.Limits) -> int:
    """The most bytes one datum of a model with these limits can need."""
    return limits.max_seq_len * TINKER_BYTES_PER_TOKEN + DATUM_SLACK


def body_budget(registry: TinkerRegistry, tenant_id: str, path: str) -> int:
    """The most bytes a request to ``path`` may carry, decided from its headers: a forward_backward what the
    tenant's largest open model can run, a sample a prompt as long as its samplers take, anything else a control
    call's few KiB. A tenant with no model open has nothing a large body could be for."""
    name = path[len(PREFIX):]
    if name == "/forward_backward":
        return max((min(MAX_DATUMS_PER_REQUEST, m.session.limits.batch_size) * datum_budget(m.session.limits)
                    + door.CONTROL_BYTES for m in registry.open_models(tenant_id)), default=door.CONTROL_BYTES)
    if name == "/asample":
        return max((s.session.limits.max_seq_len * JSON_BYTES_PER_TOKEN + door.CONTROL_BYTES
                    for s in registry.samplers.values() if s.tenant_id == tenant_id), default=door.CONTROL_BYTES)
    return door.CONTROL_BYTES


@dataclass
class TinkerSettings:
    keys: TinkerKeys
    policy: PrivacyPolicy
    # Folders a key holder may name as base_model ($TENSAFE_TINKER_MODEL_ROOTS); None: any folder (a machine of one
    # user); (): none. Built-in models are always allowed.
    model_roots: Optional[tuple[Path, ...]] = None
    registry: TinkerRegistry = field(default_factory=TinkerRegistry)

    def check_base_model(self, base_model: str) -> str:
        if len(base_model) > MAX_BASE_MODEL_CHARS:
            raise ValidationError(f"base_model is longer than {MAX_BASE_MODEL_CHARS} characters", {"field": "base_model"})
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


def tinker_router(settings: TinkerSettings) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["tinker"])
    registry = settings.registry

    async def key_of(request: Request) -> Principal:  # async: a sync dependency would run on a worker thread
        """Asked again now that the body has arrived (the Gate asked first, from the headers)."""
        return settings.keys.resolve(request.headers.get("x-api-key", ""))

    def trainer(request: Request):
        return request.app.state.tensafe

    async def fingerprint(request: Request) -> bytes:
        """The body's SHA-256, computed once per request (a submission asks for it twice: retried, submit)."""
        digest = getattr(request.state, "body_digest", None)
        if digest is None:
            digest = request.state.body_digest = hashlib.sha256(await request.body()).digest()
        return digest

    async def json_of(request: Request) -> dict:
        return await door.json_body(await request.body())

    def claimed(request: Request, owner, dedup: tuple, digest: bytes) -> Optional[str]:
        """The future of this same request made earlier (a retry), None for a new one (see ``submit``)."""
        earlier = trainer(request).futures.claim(owner, dedup, digest)
        return earlier.id if earlier is not None else None

    def submit(request: Request, owner, dedup: tuple, digest: bytes, start) -> str:
        """The one place a Tinker request becomes a future: its key claimed, its operations queued (``start``,
        which returns the coroutine computing the answer) and its future kept, with no await in between, so two
        copies of one request arriving together run once."""
        earlier = claimed(request, owner, dedup, digest)
        if earlier is not None:
            return earlier
        return trainer(request).futures.add(TaskFuture(start()), owner, dedup, digest).id

    # --- client, sessions, telemetry --------------------------------------------------------

    @router.post("/client/config")
    async def client_config(key: Principal = Depends(key_of)):
        return CLIENT_CONFIG

    def end_session(state, session) -> None:
        """Its engines go (an unnoised gradient sum with them); its checkpoints stay."""
        session.finished = True
        session.ended_at = time.monotonic()
        state.futures.release(session)
        for model_id in session.models:
            model = registry.models.get(model_id)
            if model is not None:
                state.stop(model.session)
                state.futures.release(model)
        for sampler in list(session.samplers.values()):
            registry.samplers.pop(sampler.sampler_id, None)
            state.stop(sampler.session)
            state.futures.release(sampler)
        session.samplers.clear()

    def end_lapsed_sessions(state) -> None:
        """Run before anything that starts an engine, so silent sessions free their slots first."""
        for session in registry.lapsed():
            log.info("finishing Tinker session %s of tenant %s: no heartbeat for %.0f s", session.session_id,
                     session.tenant_id, SESSION_LAPSE_S)
            end_session(state, session)

    @router.post("/create_session")
    async def create_session(request: Request, key: Principal = Depends(key_of)):
        end_lapsed_sessions(trainer(request))
        session = registry.new_session(key.tenant_id, key.key_id, MAX_SESSIONS_PER_KEY)
        return {"session_id": session.session_id, "type": "create_session"}

    @router.post("/session_heartbeat")
    async def heartbeat(request: Request, key: Principal = Depends(key_of)):
        body = await json_of(request)
        session = registry.session(str(body.get("session_id")), key.tenant_id)
        if session.finished:
            return JSONResponse({"detail": "session finished"}, status_code=410)
        return {"type": "session_heartbeat"}

    @router.post("/telemetry")
    async def telemetry(key: Principal = Depends(key_of)):
        # Telemetry bodies can carry the API key and tracebacks: accepted unread, never logged or audited.
        return {"status": "accepted"}

    @router.post("/sessions/{session_id}/finish")
    async def finish_session(session_id: str, request: Request, key: Principal = Depends(key_of)):
        end_session(trainer(request), registry.session(session_id, key.tenant_id))
        return {}

    @router.get("/get_server_capabilities")
    async def capabilities(key: Principal = Depends(key_of)):
        return {"supported_models": [
            {"model_name": SMOLLM2_REF, "trainable": True, "sampleable": True},
            {"model_name": TINY_REF, "trainable": True, "sampleable": True},
        ]}

    @router.get("/healthz")
    async def healthz(key: Principal = Depends(key_of)):
        return {"status": "ok"}

    # --- models -----------------------------------------------------------------------------

    def model_config(tenant_id: str, base_model: str, rank: int, flags: dict, seed: Optional[int],
                     user_metadata: Optional[dict]) -> TrainingConfig:
        targets = (ATTENTION if flags.get("train_attn", True) else []) + (MLP if flags.get("train_mlp", True) else []) \
            + (UNEMBED if flags.get("train_unembed", True) else [])
        if not targets:
            raise ValidationError("train at least one of attn, mlp, unembed", {"field": "lora_config"})
        tenant = settings.policy.for_tenant(tenant_id)
        dp = settings.policy.dp_for(tenant_id, user_metadata)
        try:
            return TrainingConfig(
                model_ref=base_model, lora_config=LoRAConfig(rank=rank, alpha=32, target_modules=targets),
                # Tinker's AdamParams defaults; each optim_step sets its own (AdamStep) anyway.
                optimizer=OptimizerConfig(name="adamw", learning_rate=1e-4, betas=(0.9, 0.95), eps=1e-12),
                batch_size=tenant.batch_size if dp is not None else 1024, dp_config=dp, seed=seed or 0)
        except ValueError as exc:
            raise ValidationError(f"bad model settings: {exc}"[:1000]) from None

    def start_model(state, tenant_id: str, model_id: str, description: dict, seed: Optional[int]) -> TinkerModel:
        settings.check_base_model(description["base_model"])
        flags = {k: bool(description.get(k, True)) for k in ("train_mlp", "train_attn", "train_unembed")}
        metadata = {str(k): str(v) for k, v in (description.get("user_metadata") or {}).items()}
        rank = door.integer(description, "lora_rank", 32, 1, MAX_LORA_RANK)
        config = model_config(tenant_id, description["base_model"], rank, flags, seed, metadata)
        end_lapsed_sessions(state)
        session = state.start_training(CreateTrainingClient(config=config, client_id=client_id_for(model_id),
                                                            tenant_id=tenant_id))
        model = TinkerModel(model_id, tenant_id, session, description["base_model"], rank, flags, metadata)
        registry.models[model_id] = model
        return model

    async def ready(session) -> None:
        while session.status is ClientStatus.INITIALIZING:
            await asyncio.sleep(READY_POLL_S)
        session.check_open()

    @router.post("/create_model")
    async def create_model(request: Request, key: Principal = Depends(key_of)):
        body = await json_of(request)
        owner = registry.open_session(str(body.get("session_id")), key.tenant_id)
        model_id = f"{owner.session_id}:train:{door.integer(body, 'model_seq_id')}"
        dedup, digest = ("model", model_id), await fingerprint(request)
        earlier = claimed(request, owner, dedup, digest)
        if earlier is not None:
            return {"request_id": earlier, "model_id": model_id}
        lora = door.mapping(body, "lora_config")
        optimizer = door.mapping(body, "optimizer_config").get("type", "adamw")
        if optimizer != "adamw":
            raise ValidationError(f"optimizer {optimizer!r} is not supported: this trainer runs adamw",
                                  {"field": "optimizer_config"})
        description = {"base_model": str(body.get("base_model") or ""),
                       "lora_rank": door.integer(lora, "rank", 32, 1, MAX_LORA_RANK),
                       **{k: lora.get(k, True) for k in ("train_mlp", "train_attn", "train_unembed")},
                       "user_metadata": door.mapping(body, "user_metadata")}
        if not description["base_model"]:
            raise ValidationError("create_model needs a base_model", {"field": "base_model"})
        model = start_model(trainer(request), key.tenant_id, model_id, description, door.integer(lora, "seed", None))
        owner.models.append(model_id)

        async def created():
            await ready(model.session)
            return {"model_id": model_id, "type": "create_model"}

        return {"request_id": submit(request, owner, dedup, digest, created), "model_id": model_id}

    def tokenizer_id(base_model: str) -> str:
        try:
            if Path(base_model).is_dir():
                return str(Path(base_model).resolve())
        except (OSError, ValueError):
            pass
        if base_model == SMOLLM2_REF:
            return str(smollm2_folder())
        return base_model

    @router.post("/get_info")
    async def get_info(request: Request, key: Principal = Depends(key_of)):
        body = await json_of(request)
        model = registry.model(str(body.get("model_id")), key.tenant_id)
        name = model.base_model
        return {"type": "get_info", "model_id": model.model_id, "is_lora": True, "lora_rank": model.lora_rank,
                "model_name": name, "optimizer_config": {"type": "adamw"},
                "model_data": {"arch": "llama", "model_name": name,
                               "tokenizer_id": await asyncio.to_thread(tokenizer_id, name)}}

    # --- training ---------------------------------------------------------------------------

    def queue(session, request_obj):
        """One TenSafe operation on a model's or sampler's session, checked at TenSafe's door first."""
        session.check_open()
        admission.admit(request_obj, session.limits)
        return session.submit(request_obj)

    async def outcome(op) -> dict:
        waiter = op.waiter()
        if waiter is not None:
            await asyncio.shield(waiter)
        if op.status is OperationStatus.SUCCEEDED:
            return op.result
        raise error_from_wire(op.error.model_dump() if op.error is not None else {"message": "operation failed"})

    def training_dedup(model_id: str, seq_id: Optional[int]) -> Optional[tuple]:
        """A training request's idempotency key; none for a JSON request without a seq_id (the SDK always sends
        one: a request without is run as given, never mistaken for a retry of another)."""
        return ("train", model_id, seq_id) if seq_id is not None else None

    async def training_request(request: Request, key: Principal) -> tuple[dict, TinkerModel, tuple, bytes,
                                                                          Optional[str]]:
        """A JSON training call: its body, its model (of this key's tenant), its idempotency key and digest, and
        the future of the same submission made earlier, if this is a retry."""
        body = await json_of(request)
        model = registry.model(str(body.get("model_id")), key.tenant_id)
        dedup = training_dedup(model.model_id, door.integer(body, "seq_id", None))
        digest = await fingerprint(request)
        return body, model, dedup, digest, claimed(request, model, dedup, digest)

    @router.post("/forward_backward")
    async def forward_backward(request: Request, key: Principal = Depends(key_of)):
        if "protobuf" not in request.headers.get("content-type", ""):
            raise ValidationError("forward_backward takes a protobuf ForwardBackwardRequest "
                                  "(Content-Type: application/x-protobuf)")
        if request.headers.get("content-encoding", "identity") not in ("", "identity"):
            raise ValidationError("compressed forward_backward bodies are not accepted (this trainer's client/config "
                                  "says proto_compress_fwdbwd=false)")
        body = await request.body()
        # The model found and the datums counted and sized from the protobuf's lengths, before anything is decoded.
        head = await door.decode(len(body), convert.peek_forward_backward, body, MAX_DATUMS_PER_REQUEST)
        model = registry.model(head.model_id, key.tenant_id)
        largest = max(head.datum_bytes, default=0)
        if largest > datum_budget(model.session.limits):
            raise RequestTooLargeError(f"a datum of {largest} bytes cannot fit this model's max_seq_len="
                                       f"{model.session.limits.max_seq_len} tokens", {"field": "data"})
        admission.check_rows(len(head.datum_bytes), model.session.limits)
        call = await door.decode(len(body), convert.decode_forward_backward, body)
        dedup, digest = training_dedup(call.model_id, call.seq_id), await fingerprint(request)
        earlier = claimed(request, model, dedup, digest)
        if earlier is not None:
            return {"request_id": earlier}
        if model.session.config.dp_enabled and "forward_backward_custom" in request.headers.get("x-sdk-method", ""):
            raise ValidationError(
                "forward_backward_custom is refused under DP: its per-token weights are computed on the client from "
                "other examples' logprobs (a DPO pair, a group), so one example would move more than one clipped "
                "datum's gradient. Use a server-side loss (cross_entropy, importance_sampling, ppo, cispo, dro)",
                {"field": "loss_fn"})
        lengths = [len(r) for r in call.rows]
        width = max(lengths)
        admission.check_shape(len(call.rows), width, model.session.limits)  # before padding: refused at no cost
        # Padding makes the conversion's cost rows x width, whatever the body's size (one long datum beside
        # hundreds of one-token ones), so that product decides where it runs.
        tensafe_request = await door.decode(len(call.rows) * width, convert.to_request, call)

        def start():
            op = queue(model.session, tensafe_request)

            async def result():
                done = await outcome(op)
                body = convert.encode_forward_output(done["logprobs"], lengths, {"loss:sum": done["loss_sum"]})
                return Response(body, media_type=PROTOBUF)
            return result()

        return {"request_id": submit(request, model, dedup, digest, start)}

    @router.post("/optim_step")
    async def optim_step(request: Request, key: Principal = Depends(key_of)):
        body, model, dedup, digest, earlier = await training_request(request, key)
        if earlier is not None:
            return {"request_id": earlier}
        if "optimizer_params" in body:
            raise ValidationError("only adam_params are supported: this trainer runs adamw", {"field": "optimizer"})
        try:
            adam = AdamStep.parse(body.get("adam_params") or {"learning_rate": 1e-4})
        except ValueError as exc:
            raise ValidationError(f"bad adam_params: {exc}"[:1000], {"field": "adam_params"}) from None

        def start():
            op = queue(model.session, OptimStepRequest(adam=adam))

            async def result():
                done = await outcome(op)
                metrics = {"learning_rate": done["learning_rate"], "step": float(done["step"])}
                dp = done.get("dp_metrics")
                if dp:
                    metrics.update(convert.dp_metrics(dp))
                return {"metrics": metrics, "type": "optim_step"}
            return result()

        return {"request_id": submit(request, model, dedup, digest, start)}

    # --- checkpoints ------------------------------------------------------------------------

    async def find_checkpoint(state, tenant_id: str, path: str):
        parse_path(path)  # refuses what is not a tinker:// checkpoint path
        known = registry.known_path(tenant_id, path)
        if known is not None:
            try:
                return await asyncio.to_thread(state.store.info, tenant_id, known)
            except ArtifactNotFoundError:
                registry.forget_path(tenant_id, path)
        found = registry.index(tenant_id, await asyncio.to_thread(state.store.list, tenant_id)).get(path)
        if found is None:
            raise ArtifactNotFoundError(f"no checkpoint {path[:300]!r}", {"path": path})
        return found

    def save(request: Request, model: TinkerModel, kind: str, body: dict, dedup: tuple, digest: bytes) -> str:
        state = trainer(request)
        path = f"{PATH_SCHEME}{model.model_id}/{kind}/{check_name(str(body.get('path') or ''))}"
        ttl = door.ttl_seconds(body)
        metadata = {"tinker": {**model.description, "checkpoint_metadata": door.mapping(body, "user_metadata"),
                               "expires_at": time.time() + ttl if ttl else None}}

        def start():
            op = queue(model.session, SaveStateRequest(kind=CHECKPOINT_KINDS[kind],
                                                       include_optimizer=kind == "weights", name=path,
                                                       metadata=metadata))

            async def result():
                done = await outcome(op)
                previous = registry.remember_path(model.tenant_id, path, done["artifact_id"])
                if previous is not None:  # a save under an existing name replaces it
                    await asyncio.to_thread(delete_artifact, state, model.tenant_id, previous,
                                            model.session.client_id)
                return {"path": path, "type": f"save_{kind}" if kind == "weights" else "save_weights_for_sampler"}
            return result()

        return submit(request, model, dedup, digest, start)

    def delete_artifact(state, tenant_id: str, artifact_id: str, client_id: Optional[str]) -> None:
        state.store.delete(tenant_id, artifact_id)
        state.audit_artifact_use("delete_artifact", tenant_id, client_id, artifact_id)

    @router.post("/save_weights")
    async def save_weights(request: Request, key: Principal = Depends(key_of)):
        body, model, dedup, digest, earlier = await training_request(request, key)
        if earlier is not None:
            return {"request_id": earlier}
        return {"request_id": save(request, model, "weights", body, dedup, digest)}

    @router.post("/save_weights_for_sampler")
    async def save_weights_for_sampler(request: Request, key: Principal = Depends(key_of)):
        state = trainer(request)
        body, model, dedup, digest, earlier = await training_request(request, key)
        if earlier is not None:
            return {"request_id": earlier}
        if body.get("path"):
            return {"request_id": save(request, model, "sampler_weights", body, dedup, digest)}
        # Ephemeral: a sampler of the weights as they are now, from an unnamed sampler artifact.
        owner = registry.open_session(session_id_of(model.model_id), key.tenant_id)
        sampler_id = f"{owner.session_id}:sample:{door.integer(body, 'sampling_session_seq_id')}"
        registry.check_unused_sampler(sampler_id)

        def start():
            op = queue(model.session, SaveStateRequest(kind="sampler", include_optimizer=False))

            async def result():
                done = await outcome(op)
                sampler = start_sampler(state, owner, sampler_id, model.base_model, None, done["artifact_id"],
                                        reuse=False)
                await ready(sampler.session)
                # Loaded: the unnamed artifact has served its purpose (the sampler holds the weights).
                await asyncio.to_thread(delete_artifact, state, key.tenant_id, done["artifact_id"],
                                        model.session.client_id)
                return {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}
            return result()

        return {"request_id": submit(request, model, dedup, digest, start)}

    @router.post("/load_weights")
    async def load_weights(request: Request, key: Principal = Depends(key_of)):
        body = await json_of(request)
        state = trainer(request)
        info = await find_checkpoint(state, key.tenant_id, str(body.get("path")))
        digest = await fingerprint(request)
        if info.kind != "checkpoint":
            raise ValidationError("load_weights takes a training checkpoint (tinker://.../weights/...), not sampler "
                                  "weights", {"field": "path"})
        with_optimizer = bool(body.get("optimizer", False))
        load = LoadStateRequest(artifact_id=info.artifact_id, include_optimizer=with_optimizer)
        if body.get("model_id"):  # the deprecated in-place load of an existing model
            model = registry.model(str(body["model_id"]), key.tenant_id)
            dedup = training_dedup(model.model_id, door.integer(body, "seq_id", None))

            def start_load():
                op = queue(model.session, load)

                async def loaded():
                    await outcome(op)
                    return {"path": body.get("path"), "model_id": model.model_id, "type": "load_weights"}
                return loaded()

            return {"request_id": submit(request, model, dedup, digest, start_load)}
        owner = registry.open_session(str(body.get("session_id")), key.tenant_id)
        model_id = f"{owner.session_id}:train:{door.integer(body, 'model_seq_id')}"
        dedup = ("model", model_id)
        earlier = claimed(request, owner, dedup, digest)
        if earlier is not None:
            return {"request_id": earlier, "model_id": model_id}
        description = dict(info.metadata.get("tinker") or {})
        if not description.get("base_model"):
            raise ValidationError("this checkpoint was not saved through the Tinker API", {"field": "path"})
        if body.get("user_metadata"):
            description["user_metadata"] = door.mapping(body, "user_metadata")
        model = start_model(state, key.tenant_id, model_id, description, None)
        owner.models.append(model_id)

        def start_created():
            op = queue(model.session, load)

            async def created():
                await outcome(op)
                return {"path": body.get("path"), "model_id": model_id, "type": "load_weights"}
            return created()

        return {"request_id": submit(request, owner, dedup, digest, start_created), "model_id": model_id}

    # --- sampling ---------------------------------------------------------------------------

    def start_sampler(state, owner, sampler_id: str, base_model: str, model_path: Optional[str],
                      artifact_id: Optional[str], reuse: bool = True) -> TinkerSampler:
        """The sampler ``sampler_id`` of an open session: the one already there (``reuse``), or a new one."""
        registry.check_open(owner)  # it may have ended while this request waited (a save_weights_for_sampler's save)
        existing = registry.samplers.get(sampler_id)
        if existing is not None and reuse:
            return existing
        registry.check_unused_sampler(sampler_id)
        end_lapsed_sessions(state)
        client_id = client_id_for(sampler_id)
        spec = SlotSpec.sampling(client_id, owner.tenant_id, artifact_id, base_model)
        if artifact_id:  # the artifact's use is on record, like a load
            state.audit_artifact_use("create_sampling_client", owner.tenant_id, client_id, artifact_id)
        session = state.start(client_id, owner.tenant_id, "sampling", lambda: state.start_engine(spec))
        sampler = TinkerSampler(sampler_id, owner.tenant_id, session, base_model, model_path)
        for evicted in registry.add_sampler(owner, sampler):
            state.stop(evicted.session, samplers.closed_for_newer(evicted.sampler_id))
            state.futures.release(evicted)
        return sampler

    @router.post("/create_sampling_session")
    async def create_sampling_session(request: Request, key: Principal = Depends(key_of)):
        body = await json_of(request)
        state = trainer(request)
        owner = registry.open_session(str(body.get("session_id")), key.tenant_id)
        sampler_id = f"{owner.session_id}:sample:{door.integer(body, 'sampling_session_seq_id')}"
        if sampler_id in registry.samplers:
            return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}
        model_path, base_model, artifact_id = body.get("model_path"), body.get("base_model"), None
        if model_path:
            info = await find_checkpoint(state, key.tenant_id, str(model_path))
            base_model = (info.metadata.get("tinker") or {}).get("base_model") or base_model
            artifact_id = info.artifact_id
        if not base_model:
            raise ValidationError("create_sampling_session needs a base_model or a model_path", {"field": "base_model"})
        if artifact_id is None:
            settings.check_base_model(str(base_model))
        start_sampler(state, owner, sampler_id, str(base_model), model_path, artifact_id)
        return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}

    @router.get("/samplers/{sampler_id}")
    async def get_sampler(sampler_id: str, key: Principal = Depends(key_of)):
        sampler = registry.sampler(sampler_id, key.tenant_id)
        return {"sampler_id": sampler.sampler_id, "base_model": sampler.base_model, "model_path": sampler.model_path}

    def sample_request(body: dict, prompt: list[int], num_samples: int) -> SampleRequest:
        params = door.mapping(body, "sampling_params")
        stop = params.get("stop")
        top_k = params.get("top_k", -1)
        try:
            return SampleRequest(
                prompt=prompt, max_tokens=params.get("max_tokens") or DEFAULT_MAX_TOKENS,
                temperature=params.get("temperature", 1.0), top_p=params.get("top_p", 1.0),
                top_k=None if top_k in (None, -1, 0) else top_k, seed=params.get("seed"),
                stop=[stop] if isinstance(stop, str) else stop or None, stop_at_eos=stop != [],
                num_samples=num_samples)
        except ValueError as exc:
            raise ValidationError(f"bad sampling request: {exc}"[:1000], {"field": "sampling_params"}) from None

    def prompt_tokens(body: dict) -> list[int]:
        tokens: list[int] = []
        for chunk in door.mapping(body, "prompt").get("chunks") or []:
            if not isinstance(chunk, dict) or chunk.get("type", "encoded_text") != "encoded_text":
                raise ValidationError("only encoded_text prompt chunks are supported", {"field": "prompt"})
            tokens.extend(chunk.get("tokens") or [])
        if not tokens or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ValidationError("the prompt must hold token ids", {"field": "prompt"})
        return tokens

    @router.post("/asample")
    async def asample(request: Request, key: Principal = Depends(key_of)):
        body = await json_of(request)
        sampler = registry.sampler(str(body.get("sampling_session_id")), key.tenant_id)
        seq_id = door.integer(body, "seq_id", None)
        dedup = ("sample", sampler.sampler_id, seq_id) if seq_id is not None else None
        num = door.integer(body, "num_samples", 1, 1, MAX_NUM_SAMPLES)
        digest = await fingerprint(request)
        earlier = claimed(request, sampler, dedup, digest)
        if earlier is not None:
            return {"request_id": earlier, "sample_sequence_ids": [f"{earlier}:{i}" for i in range(num)]}
        prompt = prompt_tokens(body)
        sample = sample_request(body, prompt, num)
        session = sampler.session
        session.check_open()
        scoring = ComputeLogprobsRequest(tokens=prompt) if body.get("prompt_logprobs") else None
        for checked in (scoring, sample):  # both admitted before either is queued
            if checked is not None:
                admission.admit(checked, session.limits)

        def start():
            logprobs_op = session.submit(scoring) if scoring is not None else None
            sample_op = session.submit(sample)

            async def result():
                scored = (await outcome(logprobs_op))["logprobs"] if logprobs_op is not None else None
                sampled = SampleResult.parse(await outcome(sample_op))
                return Response(convert.encode_sample_response(sampled, scored, len(prompt)), media_type=PROTOBUF)
            return result()

        request_id = submit(request, sampler, dedup, digest, start)
        return {"request_id": request_id, "sample_sequence_ids": [f"{request_id}:{i}" for i in range(num)]}

    # --- futures ----------------------------------------------------------------------------

    @router.post("/retrieve_future")
    async def retrieve_future(request: Request, key: Principal = Depends(key_of)):
        body = await json_of(request)
        future = pending(request, str(body.get("request_id")), key.tenant_id)
        if not await long_poll(future, LONG_POLL_S):
            return JSONResponse({"type": "try_again", "request_id": future.id, "queue_state": "active"},
                                status_code=408, headers={"x-tensafe-pending": "1"})
        failure = future.task.exception() if not future.task.cancelled() else asyncio.CancelledError()
        if isinstance(failure, TGTinkerError):
            return {"error": failure.message, "category": errors.category(failure)}
        if failure is not None:  # a bug: reported as the server's, never a hang
            return {"error": f"{type(failure).__name__}: {failure}"[:1000], "category": "server"}
        done = future.task.result()
        return done if isinstance(done, Response) else JSONResponse(done)

    def pending(request: Request, request_id: str, tenant_id: str) -> TaskFuture:
        """A Tinker future of this tenant (another tenant's, or a /v1 operation's id, is as unknown as a wrong one)."""
        try:
            future, owner = trainer(request).futures.get(request_id)
        except KeyError:
            future = owner = None
        if not isinstance(future, TaskFuture) or owner.tenant_id != tenant_id:
            raise ArtifactNotFoundError(f"unknown future {request_id[:100]!r} (expired, or never submitted)",
                                        {"request_id": request_id[:100]})
        return future

    # --- REST: training runs and checkpoints -----------------------------------------------

    async def checkpoints(state, tenant_id: str) -> dict[str, Any]:
        """path -> artifact, without those whose TTL has passed (deleted now)."""
        found = registry.index(tenant_id, await asyncio.to_thread(state.store.list, tenant_id))
        now = time.time()
        for path, info in list(found.items()):
            expires = (info.metadata.get("tinker") or {}).get("expires_at")
            if expires is not None and expires < now:
                await asyncio.to_thread(delete_artifact, state, tenant_id, info.artifact_id, None)
                registry.forget_path(tenant_id, path)
                del found[path]
        return found

    def run_json(run_id: str, tenant_id: str, found: dict[str, Any]) -> dict:
        live = registry.models.get(run_id)
        return listings.run_json(run_id, tenant_id, found, live if live is not None and live.tenant_id == tenant_id
                                 else None)

    @router.get("/training_runs")
    async def list_runs(request: Request, limit: int = 20, offset: int = 0, key: Principal = Depends(key_of)):
        found = await checkpoints(trainer(request), key.tenant_id)
        ids = sorted({parse_path(p)[0] for p in found} | {m.model_id for m in registry.models.values()
                                                          if m.tenant_id == key.tenant_id})
        page = ids[max(offset, 0):max(offset, 0) + max(min(limit, 1000), 0)]
        return {"training_runs": [run_json(r, key.tenant_id, found) for r in page],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(ids)}}

    @router.get("/training_runs/{run_id}")
    async def get_run(run_id: str, request: Request, key: Principal = Depends(key_of)):
        return run_json(run_id, key.tenant_id, await checkpoints(trainer(request), key.tenant_id))

    @router.get("/training_runs/{run_id}/checkpoints")
    async def run_checkpoints(run_id: str, request: Request, key: Principal = Depends(key_of)):
        found = await checkpoints(trainer(request), key.tenant_id)
        mine = sorted(((p, i) for p, i in found.items() if parse_path(p)[0] == run_id), key=lambda pi: pi[1].created_at)
        return {"checkpoints": [listings.checkpoint_json(p, i) for p, i in mine], "cursor": None}

    @router.get("/checkpoints")
    async def user_checkpoints(request: Request, limit: int = 100, offset: int = 0, key: Principal = Depends(key_of)):
        found = sorted((await checkpoints(trainer(request), key.tenant_id)).items(), key=lambda pi: pi[1].created_at)
        page = found[max(offset, 0):max(offset, 0) + max(min(limit, 1000), 0)]
        return {"checkpoints": [listings.checkpoint_json(p, i) for p, i in page],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(found)}}

    @router.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}")
    async def delete_checkpoint(run_id: str, kind: str, name: str, request: Request, key: Principal = Depends(key_of)):
        state = trainer(request)
        path = f"{PATH_SCHEME}{run_id}/{kind}/{name}"
        info = await find_checkpoint(state, key.tenant_id, path)
        await asyncio.to_thread(delete_artifact, state, key.tenant_id, info.artifact_id, None)
        registry.forget_path(key.tenant_id, path)
        return {}

    @router.put("/training_runs/{run_id}/checkpoints/{kind}/{name}/ttl")
    async def set_ttl(run_id: str, kind: str, name: str, request: Request, key: Principal = Depends(key_of)):
        raise ValidationError("changing a checkpoint's TTL after the save is not supported by this trainer: give "
                              "ttl_seconds to the save", {"field": "ttl_seconds"})

    return router
