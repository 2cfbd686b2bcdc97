"""Pure conversions between the Tinker wire and TenSafe's wire types (no I/O, no state).

A Tinker ``Datum`` is one sequence: ``model_input`` tokens and, per position ``t``, ``loss_fn_inputs``
(``target_tokens[t]``: the token position ``t`` predicts; ``weights``, ``logprobs``, ``advantages``).
That is TenSafe's ``BatchData`` with ``labels`` already shifted: rows padded to one width (ids 0,
attention 0, labels -100, inputs 0). Tinker's losses are sums over tokens, so every Tinker
forward_backward reduces by ``sum``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from tg_tinker.errors import MalformedRequestError, RequestTooLargeError, ValidationError
from tg_tinker.types import (
    IGNORE_INDEX,
    LOSS_INPUT_NAMES,
    BatchData,
    ForwardBackwardRequest,
    ForwardRequest,
    SampleResult,
)

from tensafe_trainer.api.tinker import tinker_wire_pb2 as pb

_DTYPES = {pb.DTYPE_FLOAT32: np.dtype("<f4"), pb.DTYPE_INT64: np.dtype("<i8"), pb.DTYPE_INT32: np.dtype("<i4")}
OUTPUT_TYPE = "ArrayRecord"
MAX_INPUT_MAGNITUDE = 1e6  # weights, advantages and logprobs past this overflow a float32 loss: the caller's error


@dataclass
class FwdBwdCall:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float]
    forward_only: bool
    rows: list[list[int]]  # model_input tokens of each datum
    inputs: list[dict[str, np.ndarray]]  # its loss_fn_inputs, each of its length


def _user_error(message: str, **details) -> ValidationError:
    return ValidationError(message, details)


def _tensor(msg, where: str) -> np.ndarray:
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None:
        raise _user_error(f"{where}: unsupported tensor dtype {msg.dtype}")
    if msg.WhichOneof("encoding") != "dense":
        raise _user_error(f"{where}: sparse tensors are not supported by this trainer; send dense ones")
    if len(msg.dense) % dtype.itemsize:
        raise _user_error(f"{where}: {len(msg.dense)} bytes is not a whole number of {dtype.name} values")
    array = np.frombuffer(msg.dense, dtype)
    shape = list(msg.shape) or [array.size]
    if math.prod(shape) != array.size or len(shape) != 1:
        raise _user_error(f"{where}: shape {shape} does not fit {array.size} values (one value per token)")
    return array


@dataclass
class FwdBwdHead:
    """What a forward_backward body names and how large its datums are, read from the protobuf's field tags and
    lengths alone: enough to find the model and refuse an oversized request before anything is decoded."""

    model_id: str
    seq_id: int
    datum_bytes: list[int]


_FIELD_MODEL_ID, _FIELD_SEQ_ID, _FIELD_DATA = 1, 2, 3
MAX_OTHER_FIELDS = 256  # loss name, forward_only and loss config entries: a request has a handful


def _varint(body: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(body) or shift > 63:
            raise _not_the_message()
        byte = body[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return value, at


_WIRE_TYPES = {_FIELD_MODEL_ID: 2, _FIELD_SEQ_ID: 0, _FIELD_DATA: 2}


def _not_the_message() -> MalformedRequestError:
    return MalformedRequestError("the forward_backward body is not a ForwardBackwardRequest message")


def peek_forward_backward(body: bytes, max_datums: int) -> FwdBwdHead:
    """The top-level fields of a ForwardBackwardRequest, each skipped by its length (a datum is never looked
    into). Every field counts: a body of more than ``max_datums`` datums, or of more than MAX_OTHER_FIELDS other
    fields, is refused as soon as that shows, so the loop runs a few hundred times at most, whatever the body's
    size; model_id and seq_id may appear once."""
    model_id, seq_id, datums, others, at, seen = b"", 0, [], 0, 0, set()
    while at < len(body):
        tag, at = _varint(body, at)
        field, wire = tag >> 3, tag & 7
        if _WIRE_TYPES.get(field, wire) != wire or field in seen:
            raise _not_the_message()
        if field in (_FIELD_MODEL_ID, _FIELD_SEQ_ID):
            seen.add(field)
        if wire == 0:
            value, at = _varint(body, at)
            if field == _FIELD_SEQ_ID:
                seq_id = value - (1 << 64) if value >= 1 << 63 else value
        elif wire == 2:
            size, at = _varint(body, at)
            if at + size > len(body):
                raise _not_the_message()
            if field == _FIELD_MODEL_ID:
                model_id = body[at:at + size]
            elif field == _FIELD_DATA:
                datums.append(size)
                if len(datums) > max_datums:
                    raise RequestTooLargeError(f"a forward_backward request holds at most {max_datums} datums here "
                                               "(client/config's fwdbwd_max_chunk_len, which the SDK follows)",
                                               {"field": "data", "max_datums": max_datums})
            at += size
        elif wire in (1, 5):
            at += 8 if wire == 1 else 4
        else:
            raise _not_the_message()
        if field not in _WIRE_TYPES:
            others += 1
            if others > MAX_OTHER_FIELDS:
                raise MalformedRequestError(f"a forward_backward request has more than {MAX_OTHER_FIELDS} fields "
                                            "besides its datums")
    if at > len(body):
        raise _not_the_message()
    try:
        name = model_id.decode()
    except UnicodeDecodeError:
        raise MalformedRequestError("the forward_backward body's model_id is not UTF-8") from None
    if not name:
        raise _user_error("forward_backward needs a model_id", field="model_id")
    return FwdBwdHead(name, seq_id, datums)


def decode_forward_backward(body: bytes) -> FwdBwdCall:
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError and others
        raise MalformedRequestError(
            f"the forward_backward body is not a ForwardBackwardRequest message ({type(exc).__name__})") from None
    if not msg.model_id:
        raise _user_error("forward_backward needs a model_id", field="model_id")
    if not msg.data:
        raise _user_error("forward_backward needs at least one datum", field="data")
    config: dict[str, float] = {k: v for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        if value.WhichOneof("value") != "number":
            raise _user_error(f"loss_fn_config[{key!r}] must be a number", field="loss_fn_config")
        config[key] = value.number
    rows, inputs = [], []
    for i, datum in enumerate(msg.data):
        tokens: list[int] = []
        for chunk in datum.model_input:
            if chunk.WhichOneof("chunk") != "encoded_text":
                raise _user_error(f"data[{i}]: only encoded_text chunks are supported (this trainer serves text "
                                  "models)", field="model_input")
            if len(chunk.encoded_text.tokens) % 4:
                raise _user_error(f"data[{i}]: token bytes are not whole int32 values", field="model_input")
            tokens.extend(np.frombuffer(chunk.encoded_text.tokens, "<i4").tolist())
        if not tokens:
            raise _user_error(f"data[{i}] has no tokens", field="model_input")
        _check_provenance(i, "model_input_spans", datum.model_input_spans, len(tokens))
        _check_provenance(i, "loss_fn_input_spans", datum.loss_fn_input_spans, len(tokens))
        named = {k: _tensor(v, f"data[{i}].loss_fn_inputs[{k!r}]") for k, v in datum.loss_fn_inputs.items()}
        for name, array in named.items():
            if array.size != len(tokens):
                raise _user_error(f"data[{i}].loss_fn_inputs[{name!r}] has {array.size} values for "
                                  f"{len(tokens)} input tokens", field="loss_fn_inputs")
        rows.append(tokens)
        inputs.append(named)
    return FwdBwdCall(msg.model_id, msg.seq_id, msg.loss_fn or "cross_entropy", config, msg.forward_only,
                      rows, inputs)


def _check_provenance(i: int, field: str, spans, length: int) -> None:
    """Provenance spans (which sampled sequence or prompt each run of tokens came from) are annotations the
    cookbook's RL attaches; no loss in this trainer reads them, so they are only checked to tile the datum."""
    covered = sum(getattr(span, span.WhichOneof("span")).length for span in spans if span.WhichOneof("span"))
    if spans and covered != length:
        raise _user_error(f"data[{i}].{field} do not tile the datum's {length} positions", field=field)


def to_request(call: FwdBwdCall, *, sum_reduction: bool = True):
    """TenSafe's ForwardBackwardRequest (or ForwardRequest for ``forward_only``) for one Tinker call."""
    if any("target_tokens" not in d for d in call.inputs):
        raise _user_error("every datum needs loss_fn_inputs['target_tokens']", field="loss_fn_inputs")
    names = set(call.inputs[0]) - {"target_tokens"}
    if any(set(d) - {"target_tokens"} != names for d in call.inputs):
        raise _user_error("every datum of one call must carry the same loss_fn_inputs", field="loss_fn_inputs")
    unknown = sorted(names - set(LOSS_INPUT_NAMES))
    if unknown:
        raise _user_error(f"loss_fn_inputs {unknown} are not supported by this trainer; it takes target_tokens, "
                          f"{', '.join(LOSS_INPUT_NAMES)}", field="loss_fn_inputs")
    width = max(map(len, call.rows))

    def pad(values, fill):
        return list(values) + [fill] * (width - len(values))

    for i, d in enumerate(call.inputs):
        for name in names:
            if not np.isfinite(d[name]).all() or np.abs(d[name]).max(initial=0.0) > MAX_INPUT_MAGNITUDE:
                raise _user_error(f"data[{i}].loss_fn_inputs[{name!r}] holds a value that is not finite or is "
                                  f"beyond +-{MAX_INPUT_MAGNITUDE:g}", field="loss_fn_inputs")
    try:
        batch = BatchData(
            input_ids=[pad(r, 0) for r in call.rows],
            attention_mask=[pad([1] * len(r), 0) for r in call.rows],
            labels=[pad(d["target_tokens"].tolist(), IGNORE_INDEX) for d in call.inputs],
            loss_inputs={n: [pad(d[n].astype(np.float64).tolist(), 0.0) for d in call.inputs]
                         for n in sorted(names)} or None)
    except ValueError as exc:  # pydantic's: negative ids and the like
        raise _user_error(f"malformed data: {exc}"[:2000], field="data") from None
    spec = dict(loss_fn=call.loss_fn, loss_fn_config=call.loss_fn_config or None)
    if call.forward_only:
        return ForwardRequest(batch=batch, **spec)
    return ForwardBackwardRequest(batch=batch, reduction="sum" if sum_reduction else "mean", return_logprobs=True,
                                  **spec)


def _batched(arrays: list[np.ndarray], dtype: str, out) -> None:
    out.dtype = pb.DTYPE_FLOAT32 if dtype == "float32" else pb.DTYPE_INT64
    arrays = [np.ascontiguousarray(a, dtype="<f4" if dtype == "float32" else "<i8").ravel() for a in arrays]
    out.data = b"".join(a.tobytes() for a in arrays)
    out.offsets = np.cumsum([0] + [a.nbytes for a in arrays]).astype("<i8").tobytes()


def encode_forward_output(logprobs: list[list[Optional[float]]], lengths: list[int],
                          metrics: dict[str, float]) -> bytes:
    """A ForwardBackwardOutput: per datum its target tokens' logprobs (its own length), and the metrics
    (``name:reduction`` keys)."""
    out = pb.ForwardBackwardOutput(loss_fn_output_type=OUTPUT_TYPE)
    record = out.loss_fn_outputs.add()
    record.type_tag = OUTPUT_TYPE
    record.num_datums = len(lengths)
    per_datum = [np.array([v if v is not None else np.nan for v in row[:n]], dtype=np.float32)
                 for row, n in zip(logprobs, lengths)]
    _batched(per_datum, "float32", record.fields["logprobs"])
    for key, value in metrics.items():
        out.metrics[key] = float(value)
    return out.SerializeToString()


def encode_sample_response(result: Optional[SampleResult], prompt_logprobs: Optional[list[Optional[float]]],
                           prompt_length: int) -> bytes:
    response = pb.SampleResponse()
    for seq in (result.sequences if result is not None else []):
        out = response.sequences.add()
        out.stop_reason = pb.STOP_REASON_LENGTH if seq.stop_reason == "length" else pb.STOP_REASON_STOP
        out.tokens = np.asarray(seq.tokens, dtype="<i4").tobytes()
        out.logprobs = np.asarray(seq.logprobs, dtype="<f4").tobytes()
    if prompt_logprobs is not None:
        values = [np.nan if v is None else v for v in prompt_logprobs][:prompt_length]
        response.prompt_logprobs = np.asarray(values, dtype="<f4").tobytes()
    response.prompt_cache_hit_tokens = 0
    return response.SerializeToString()


# Tinker's metrics are floats: the sampling mode travels as a number (docs/privacy.md, "The Tinker wire").
SAMPLING_CODES = {"none": 0.0, "asserted": 1.0, "poisson": 2.0}


def dp_metrics(dp: dict) -> dict[str, float]:
    """A step's public DP figures as Tinker ``optim_step`` metrics. ``dp/epsilon`` is the certified bound; an
    asserted sampling rate's figure (a client's claim) is never sent under that name. An infinite epsilon stays
    "Infinity" (JSON has no inf; the SDK reads the string back as a float)."""
    out = {"dp/epsilon": dp["total_epsilon"], "dp/epsilon_q1": dp["epsilon_q1"], "dp/delta": dp["delta"],
           "dp/sampling": SAMPLING_CODES[dp["sampling"]], "dp/sample_rate": dp["sample_rate"],
           "dp/group_size": float(dp["group_size"]), "dp/noise_multiplier": dp["noise_multiplier"],
           "dp/num_clipped": float(dp["num_clipped"]), "dp/num_examples": float(dp["num_examples"])}
    return {k: v if v == "Infinity" else float(v) for k, v in out.items()}
