"""``/api/v1``: the Tinker wire's door. Each route parses its body (after the Gate has bounded and authorised it),
calls the Tinker service (service/tinker/service.py) and encodes the answer. A submit answers ``{"request_id"}``: a
future of the one future store, long-polled by ``retrieve_future``. A request's idempotency key is its
``(model_id, seq_id)`` (the SDK retries for minutes with the same seq_id, and under DP an example counted twice
would void the guarantee): a retry gets the first request's future, and a seq_id runs once.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any, Callable, Coroutine, Optional

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from tg_tinker.config import MAX_LORA_RANK
from tg_tinker.errors import RequestTooLargeError, TGTinkerError, ValidationError
from tg_tinker.types import (
    MAX_NUM_SAMPLES,
    AdamStep,
    ComputeLogprobsRequest,
    LoadStateRequest,
    OptimStepRequest,
    SampleRequest,
    SampleResult,
)

from tensafe_trainer.api.tinker import PREFIX, convert, listings
from tensafe_trainer.engine.models import SMOLLM2_REF, TINY_REF
from tensafe_trainer.service import admission, door, errors
from tensafe_trainer.service.futures import long_poll
from tensafe_trainer.service.principals import Principal
from tensafe_trainer.service.tinker.registry import PATH_SCHEME, TinkerRegistry, parse_path, session_id_of
from tensafe_trainer.service.tinker.service import TRAIN_FLAGS, TinkerService, outcome, ready, tokenizer_id

LONG_POLL_S = 25.0  # the SDK gives up on a poll after 45 s
# Datums in one forward_backward request (the SDK splits a call into requests of this many, as client/config says):
# a request's conversion holds the GIL for its rows x width padded tokens, so its rows are bounded, whatever the
# model's batch.
MAX_DATUMS_PER_REQUEST = 128
# A datum's bytes per token at most: its int32 token, target_tokens (int64) and three float32 loss inputs, with room
# for chunk and tensor headers; and per datum, room for its map keys and provenance spans.
TINKER_BYTES_PER_TOKEN, DATUM_SLACK = 40, 4 << 10
JSON_BYTES_PER_TOKEN = 21  # a prompt token in JSON: up to 20 digits and a comma
PROTOBUF = "application/x-protobuf"
DEFAULT_MAX_TOKENS = 256  # Tinker's max_tokens=None: generation stops at EOS, a stop sequence or this (hosted
# Tinker's own cap is the model's context; a tiny test model's is 512, and a CPU sampler's answer should come soon)
CLIENT_CONFIG = {  # the SDK's simplest path: plain httpx, JSON and uncompressed protobuf, no JWT
    "pjwt_auth_enabled": False, "credential_default_source": "api_key", "use_pyqwest_transport": False,
    "proto_compress_fwdbwd": False, "parallel_fwdbwd_chunks": True, "fwdbwd_max_chunk_len": MAX_DATUMS_PER_REQUEST,
    "sample_use_retrieve_futures": False, "custom_loss_server_side": False, "sample_join_sampling_session": False,
}
CUSTOM_LOSS_UNDER_DP = (
    "forward_backward_custom is refused under DP: its per-token weights are computed on the client from other "
    "examples' logprobs (a DPO pair, a group), so one example would move more than one clipped datum's gradient. "
    "Use a server-side loss (cross_entropy, importance_sampling, ppo, cispo, dro)")

router = APIRouter(prefix=PREFIX, tags=["tinker"])


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


# --- what every route reads ------------------------------------------------------------------------
# Dependencies are async: a sync one would run on a worker thread.


async def tinker_of(request: Request) -> TinkerService:
    return request.app.state.tinker


async def key_of(request: Request) -> Principal:
    """Asked again now that the body has arrived (the Gate asked first, from the headers)."""
    return request.app.state.tinker.keys.resolve(request.headers.get("x-api-key", ""))


async def json_of(request: Request) -> dict:
    return await door.json_body(await request.body())


async def fingerprint(request: Request) -> bytes:
    """The body's SHA-256, computed once per request."""
    digest = getattr(request.state, "body_digest", None)
    if digest is None:
        digest = request.state.body_digest = hashlib.sha256(await request.body()).digest()
    return digest


async def answered(work: Coroutine, encode: Callable[[Any], Any]) -> Any:
    """A future's answer: what ``work`` returns, encoded for the wire."""
    return encode(await work)


def seq_key(kind: str, owned_id: str, seq_id: Optional[int]) -> Optional[tuple]:
    """A request's idempotency key; none for a JSON request without a seq_id (the SDK always sends one: a request
    without is run as given, never mistaken for a retry of another)."""
    return (kind, owned_id, seq_id) if seq_id is not None else None


# --- client, sessions, telemetry ---------------------------------------------------------------------


@router.post("/client/config")
async def client_config(key: Principal = Depends(key_of)):
    return CLIENT_CONFIG


@router.post("/create_session")
async def create_session(key: Principal = Depends(key_of), tinker: TinkerService = Depends(tinker_of)):
    return {"session_id": tinker.new_session(key).session_id, "type": "create_session"}


@router.post("/session_heartbeat")
async def heartbeat(request: Request, key: Principal = Depends(key_of), tinker: TinkerService = Depends(tinker_of)):
    session = tinker.registry.session(str((await json_of(request)).get("session_id")), key.tenant_id)
    if session.finished:
        return JSONResponse({"detail": "session finished"}, status_code=410)
    return {"type": "session_heartbeat"}


@router.post("/telemetry")
async def telemetry(key: Principal = Depends(key_of)):
    # Telemetry bodies can carry the API key and tracebacks: accepted unread, never logged or audited.
    return {"status": "accepted"}


@router.post("/sessions/{session_id}/finish")
async def finish_session(session_id: str, key: Principal = Depends(key_of), tinker: TinkerService = Depends(tinker_of)):
    tinker.end_session(tinker.registry.session(session_id, key.tenant_id))
    return {}


@router.get("/get_server_capabilities")
async def capabilities(key: Principal = Depends(key_of)):
    return {"supported_models": [{"model_name": name, "trainable": True, "sampleable": True}
                                 for name in (SMOLLM2_REF, TINY_REF)]}


@router.get("/healthz")
async def healthz(key: Principal = Depends(key_of)):
    return {"status": "ok"}


# --- models ----------------------------------------------------------------------------------------


@router.post("/create_model")
async def create_model(request: Request, key: Principal = Depends(key_of), tinker: TinkerService = Depends(tinker_of)):
    body = await json_of(request)
    owner = tinker.registry.open_session(str(body.get("session_id")), key.tenant_id)
    model_id = f"{owner.session_id}:train:{door.integer(body, 'model_seq_id')}"
    dedup, digest = ("model", model_id), await fingerprint(request)
    earlier = tinker.claimed(owner, dedup, digest)
    if earlier is not None:
        return {"request_id": earlier, "model_id": model_id}
    lora = door.mapping(body, "lora_config")
    optimizer = door.mapping(body, "optimizer_config").get("type", "adamw")
    if optimizer != "adamw":
        raise ValidationError(f"optimizer {optimizer!r} is not supported: this trainer runs adamw",
                              {"field": "optimizer_config"})
    description = {"base_model": body.get("base_model"), "lora_rank": door.integer(lora, "rank", 32, 1, MAX_LORA_RANK),
                   **{flag: lora.get(flag, True) for flag in TRAIN_FLAGS},
                   "user_metadata": door.mapping(body, "user_metadata")}
    model = tinker.start_model(owner, model_id, description, door.integer(lora, "seed", None))
    created = {"model_id": model_id, "type": "create_model"}
    request_id = tinker.submit(owner, dedup, digest, lambda: answered(ready(model.session), lambda _: created))
    return {"request_id": request_id, "model_id": model_id}


@router.post("/get_info")
async def get_info(request: Request, key: Principal = Depends(key_of), tinker: TinkerService = Depends(tinker_of)):
    model = tinker.registry.model(str((await json_of(request)).get("model_id")), key.tenant_id)
    name = model.base_model
    return {"type": "get_info", "model_id": model.model_id, "is_lora": True, "lora_rank": model.lora_rank,
            "model_name": name, "optimizer_config": {"type": "adamw"},
            "model_data": {"arch": "llama", "model_name": name,
                           "tokenizer_id": await asyncio.to_thread(tokenizer_id, name)}}


# --- training --------------------------------------------------------------------------------------


async def training_call(request: Request, key: Principal, tinker: TinkerService):
    """A JSON call on a model: its body, the model (of this key's tenant), its idempotency key and digest, and the
    future of the same call made earlier, if this is a retry."""
    body = await json_of(request)
    model = tinker.registry.model(str(body.get("model_id")), key.tenant_id)
    dedup = seq_key("train", model.model_id, door.integer(body, "seq_id", None))
    digest = await fingerprint(request)
    return body, model, dedup, digest, tinker.claimed(model, dedup, digest)


@router.post("/forward_backward")
async def forward_backward(request: Request, key: Principal = Depends(key_of),
                           tinker: TinkerService = Depends(tinker_of)):
    if "protobuf" not in request.headers.get("content-type", ""):
        raise ValidationError("forward_backward takes a protobuf ForwardBackwardRequest "
                              "(Content-Type: application/x-protobuf)")
    if request.headers.get("content-encoding", "identity") not in ("", "identity"):
        raise ValidationError("compressed forward_backward bodies are not accepted (this trainer's client/config "
                              "says proto_compress_fwdbwd=false)")
    body = await request.body()
    # The model found and the datums counted and sized from the protobuf's lengths, before anything is decoded.
    head = await door.decode(len(body), convert.peek_forward_backward, body, MAX_DATUMS_PER_REQUEST)
    model = tinker.registry.model(head.model_id, key.tenant_id)
    limits = model.session.limits
    largest = max(head.datum_bytes, default=0)
    if largest > datum_budget(limits):
        raise RequestTooLargeError(f"a datum of {largest} bytes cannot fit this model's max_seq_len="
                                   f"{limits.max_seq_len} tokens", {"field": "data"})
    admission.check_rows(len(head.datum_bytes), limits)
    call = await door.decode(len(body), convert.decode_forward_backward, body)
    dedup, digest = seq_key("train", call.model_id, call.seq_id), await fingerprint(request)
    earlier = tinker.claimed(model, dedup, digest)
    if earlier is not None:
        return {"request_id": earlier}
    if model.session.config.dp_enabled and "forward_backward_custom" in request.headers.get("x-sdk-method", ""):
        raise ValidationError(CUSTOM_LOSS_UNDER_DP, {"field": "loss_fn"})
    lengths = [len(r) for r in call.rows]
    width = max(lengths)
    admission.check_shape(len(call.rows), width, limits)  # before padding: refused at no cost
    # Padding makes the conversion's cost rows x width, whatever the body's size (one long datum beside hundreds
    # of one-token ones), so that product decides where it runs.
    converted = await door.decode(len(call.rows) * width, convert.to_request, call)

    def encode(done: dict) -> Response:
        return Response(convert.encode_forward_output(done["logprobs"], lengths, {"loss:sum": done["loss_sum"]}),
                        media_type=PROTOBUF)

    return {"request_id": tinker.submit(model, dedup, digest,
                                        lambda: answered(outcome(tinker.queue(model.session, converted)), encode))}


def optim_metrics(done: dict) -> dict:
    metrics = {"learning_rate": done["learning_rate"], "step": float(done["step"])}
    if done.get("dp_metrics"):
        metrics.update(convert.dp_metrics(done["dp_metrics"]))
    return {"metrics": metrics, "type": "optim_step"}


@router.post("/optim_step")
async def optim_step(request: Request, key: Principal = Depends(key_of), tinker: TinkerService = Depends(tinker_of)):
    body, model, dedup, digest, earlier = await training_call(request, key, tinker)
    if earlier is not None:
        return {"request_id": earlier}
    if "optimizer_params" in body:
        raise ValidationError("only adam_params are supported: this trainer runs adamw", {"field": "optimizer"})
    try:
        step = OptimStepRequest(adam=AdamStep.parse(body.get("adam_params") or {"learning_rate": 1e-4}))
    except ValueError as exc:
        raise ValidationError(f"bad adam_params: {exc}"[:1000], {"field": "adam_params"}) from None
    return {"request_id": tinker.submit(model, dedup, digest,
                                        lambda: answered(outcome(tinker.queue(model.session, step)), optim_metrics))}


# --- checkpoints -----------------------------------------------------------------------------------


def saved_as(kind: str) -> Callable[[str], dict]:
    return lambda path: {"path": path, "type": "save_weights" if kind == "weights" else "save_weights_for_sampler"}


def save(tinker: TinkerService, model, kind: str, body: dict, dedup, digest: bytes) -> str:
    name, ttl, metadata = str(body.get("path") or ""), door.ttl_seconds(body), door.mapping(body, "user_metadata")
    return tinker.submit(model, dedup, digest,
                         lambda: answered(tinker.save(model, kind, name, ttl, metadata), saved_as(kind)))


@router.post("/save_weights")
async def save_weights(request: Request, key: Principal = Depends(key_of), tinker: TinkerService = Depends(tinker_of)):
    body, model, dedup, digest, earlier = await training_call(request, key, tinker)
    return {"request_id": earlier or save(tinker, model, "weights", body, dedup, digest)}


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(request: Request, key: Principal = Depends(key_of),
                                   tinker: TinkerService = Depends(tinker_of)):
    body, model, dedup, digest, earlier = await training_call(request, key, tinker)
    if earlier is not None:
        return {"request_id": earlier}
    if body.get("path"):
        return {"request_id": save(tinker, model, "sampler_weights", body, dedup, digest)}
    # Ephemeral: a sampler of the weights as they are now.
    owner = tinker.registry.open_session(session_id_of(model.model_id), key.tenant_id)
    sampler_id = f"{owner.session_id}:sample:{door.integer(body, 'sampling_session_seq_id')}"
    tinker.registry.check_unused_sampler(sampler_id)
    made = {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}
    return {"request_id": tinker.submit(model, dedup, digest, lambda: answered(
        tinker.sampler_of_weights(model, owner, sampler_id), lambda _: made))}


@router.post("/load_weights")
async def load_weights(request: Request, key: Principal = Depends(key_of), tinker: TinkerService = Depends(tinker_of)):
    body = await json_of(request)
    path = str(body.get("path"))
    info = await tinker.find_checkpoint(key.tenant_id, path)
    digest = await fingerprint(request)
    if info.kind != "checkpoint":
        raise ValidationError("load_weights takes a training checkpoint (tinker://.../weights/...), not sampler "
                              "weights", {"field": "path"})
    load = LoadStateRequest(artifact_id=info.artifact_id, include_optimizer=bool(body.get("optimizer", False)))
    if body.get("model_id"):  # the deprecated in-place load of an existing model
        model = tinker.registry.model(str(body["model_id"]), key.tenant_id)
        dedup = seq_key("train", model.model_id, door.integer(body, "seq_id", None))
        loaded = {"path": path, "model_id": model.model_id, "type": "load_weights"}
        return {"request_id": tinker.submit(model, dedup, digest, lambda: answered(
            outcome(tinker.queue(model.session, load)), lambda _: loaded))}
    owner = tinker.registry.open_session(str(body.get("session_id")), key.tenant_id)
    model_id = f"{owner.session_id}:train:{door.integer(body, 'model_seq_id')}"
    dedup = ("model", model_id)
    earlier = tinker.claimed(owner, dedup, digest)
    if earlier is not None:
        return {"request_id": earlier, "model_id": model_id}
    description = dict(info.metadata.get("tinker") or {})
    if not description.get("base_model"):
        raise ValidationError("this checkpoint was not saved through the Tinker API", {"field": "path"})
    if body.get("user_metadata"):
        description["user_metadata"] = door.mapping(body, "user_metadata")
    model = tinker.start_model(owner, model_id, description)
    loaded = {"path": path, "model_id": model_id, "type": "load_weights"}
    return {"request_id": tinker.submit(owner, dedup, digest, lambda: answered(
        outcome(tinker.queue(model.session, load)), lambda _: loaded)), "model_id": model_id}


# --- sampling --------------------------------------------------------------------------------------


@router.post("/create_sampling_session")
async def create_sampling_session(request: Request, key: Principal = Depends(key_of),
                                  tinker: TinkerService = Depends(tinker_of)):
    body = await json_of(request)
    owner = tinker.registry.open_session(str(body.get("session_id")), key.tenant_id)
    sampler_id = f"{owner.session_id}:sample:{door.integer(body, 'sampling_session_seq_id')}"
    answer = {"sampling_session_id": sampler_id, "type": "create_sampling_session"}
    if sampler_id in tinker.registry.samplers:
        return answer
    model_path, base_model, artifact_id = body.get("model_path"), body.get("base_model"), None
    if model_path:
        info = await tinker.find_checkpoint(key.tenant_id, str(model_path))
        base_model = (info.metadata.get("tinker") or {}).get("base_model") or base_model
        artifact_id = info.artifact_id
    if not base_model:
        raise ValidationError("create_sampling_session needs a base_model or a model_path", {"field": "base_model"})
    if artifact_id is None:
        tinker.check_base_model(str(base_model))
    tinker.start_sampler(owner, sampler_id, str(base_model), model_path, artifact_id)
    return answer


@router.get("/samplers/{sampler_id}")
async def get_sampler(sampler_id: str, key: Principal = Depends(key_of), tinker: TinkerService = Depends(tinker_of)):
    sampler = tinker.registry.sampler(sampler_id, key.tenant_id)
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
    chunks = door.mapping(body, "prompt").get("chunks") or []
    if not isinstance(chunks, list):
        raise ValidationError("prompt.chunks is a list of encoded_text chunks", {"field": "prompt"})
    for chunk in chunks:
        if not isinstance(chunk, dict) or chunk.get("type", "encoded_text") != "encoded_text":
            raise ValidationError("only encoded_text prompt chunks are supported", {"field": "prompt"})
        tokens.extend(chunk.get("tokens") or [])
    if not tokens or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ValidationError("the prompt must hold token ids", {"field": "prompt"})
    return tokens


@router.post("/asample")
async def asample(request: Request, key: Principal = Depends(key_of), tinker: TinkerService = Depends(tinker_of)):
    body = await json_of(request)
    sampler = tinker.registry.sampler(str(body.get("sampling_session_id")), key.tenant_id)
    dedup = seq_key("sample", sampler.sampler_id, door.integer(body, "seq_id", None))
    num = door.integer(body, "num_samples", 1, 1, MAX_NUM_SAMPLES)
    digest = await fingerprint(request)
    request_id = tinker.claimed(sampler, dedup, digest)
    if request_id is None:
        prompt = prompt_tokens(body)
        sample = sample_request(body, prompt, num)
        session = sampler.session
        session.check_open()
        scoring = ComputeLogprobsRequest(tokens=prompt) if body.get("prompt_logprobs") else None
        for checked in (scoring, sample):  # both admitted before either is queued
            if checked is not None:
                admission.admit(checked, session.limits)

        def start() -> Coroutine:
            scored = session.submit(scoring) if scoring is not None else None
            sampled = session.submit(sample)

            async def result() -> Response:
                logprobs = (await outcome(scored))["logprobs"] if scored is not None else None
                answer = SampleResult.parse(await outcome(sampled))
                return Response(convert.encode_sample_response(answer, logprobs, len(prompt)), media_type=PROTOBUF)
            return result()

        request_id = tinker.submit(sampler, dedup, digest, start)
    return {"request_id": request_id, "sample_sequence_ids": [f"{request_id}:{i}" for i in range(num)]}


# --- futures ---------------------------------------------------------------------------------------


@router.post("/retrieve_future")
async def retrieve_future(request: Request, key: Principal = Depends(key_of),
                          tinker: TinkerService = Depends(tinker_of)):
    future = tinker.future(str((await json_of(request)).get("request_id")), key.tenant_id)
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


# --- REST: training runs and checkpoints -------------------------------------------------------------


def page_of(items: list, limit: int, offset: int) -> list:
    start = max(offset, 0)
    return items[start:start + max(min(limit, 1000), 0)]


@router.get("/training_runs")
async def list_runs(limit: int = 20, offset: int = 0, key: Principal = Depends(key_of),
                    tinker: TinkerService = Depends(tinker_of)):
    found = await tinker.checkpoints(key.tenant_id)
    ids = sorted({parse_path(p)[0] for p in found} | {m.model_id for m in tinker.registry.models.values()
                                                      if m.tenant_id == key.tenant_id})
    return {"training_runs": [listings.run_json(r, key.tenant_id, found, tinker.live_model(r, key.tenant_id))
                              for r in page_of(ids, limit, offset)],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(ids)}}


@router.get("/training_runs/{run_id}")
async def get_run(run_id: str, key: Principal = Depends(key_of), tinker: TinkerService = Depends(tinker_of)):
    found = await tinker.checkpoints(key.tenant_id)
    return listings.run_json(run_id, key.tenant_id, found, tinker.live_model(run_id, key.tenant_id))


@router.get("/training_runs/{run_id}/checkpoints")
async def run_checkpoints(run_id: str, key: Principal = Depends(key_of), tinker: TinkerService = Depends(tinker_of)):
    found = await tinker.checkpoints(key.tenant_id)
    mine = sorted(((p, i) for p, i in found.items() if parse_path(p)[0] == run_id), key=lambda pi: pi[1].created_at)
    return {"checkpoints": [listings.checkpoint_json(p, i) for p, i in mine], "cursor": None}


@router.get("/checkpoints")
async def user_checkpoints(limit: int = 100, offset: int = 0, key: Principal = Depends(key_of),
                           tinker: TinkerService = Depends(tinker_of)):
    found = sorted((await tinker.checkpoints(key.tenant_id)).items(), key=lambda pi: pi[1].created_at)
    return {"checkpoints": [listings.checkpoint_json(p, i) for p, i in page_of(found, limit, offset)],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(found)}}


@router.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}")
async def delete_checkpoint(run_id: str, kind: str, name: str, key: Principal = Depends(key_of),
                            tinker: TinkerService = Depends(tinker_of)):
    await tinker.delete_checkpoint(key.tenant_id, f"{PATH_SCHEME}{run_id}/{kind}/{name}")
    return {}


@router.put("/training_runs/{run_id}/checkpoints/{kind}/{name}/ttl")
async def set_ttl(run_id: str, kind: str, name: str, key: Principal = Depends(key_of)):
    raise ValidationError("changing a checkpoint's TTL after the save is not supported by this trainer: give "
                          "ttl_seconds to the save", {"field": "ttl_seconds"})
