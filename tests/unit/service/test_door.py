"""The door checks both doors share (service/door.py), the Tinker body's peek (api/tinker/convert.py) and the
per-request memory budget (admission.py), each against an independent computation."""

from __future__ import annotations

import math

import pytest

from tensafe_trainer.service import admission
from tensafe_trainer.engine.memory import TRAINING_BYTES_PER_CELL
from tensafe_trainer.service import door
from tensafe_trainer.api.tinker import convert
from tensafe_trainer.api.tinker import tinker_wire_pb2 as pb
from tensafe_trainer.api.tinker.listings import iso
from tg_tinker.errors import MalformedRequestError, RequestTooLargeError, ValidationError
from tg_tinker.types import WaitForOperations


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b"[" * 300 + b"]" * 300, b'{"a": 1'])
def test_a_body_that_is_not_a_document_is_malformed_on_both_doors(body):
    with pytest.raises(MalformedRequestError):
        door.json_object(body)
    with pytest.raises(MalformedRequestError):
        WaitForOperations.parse_json(body)  # what /v1 runs


def test_both_doors_parse_to_the_same_depth():
    """One parser: a document one door takes, the other takes too."""
    deepest_taken = next(n for n in range(400, 0, -1) if _parses(b'{"a":' + b"[" * n + b"]" * n + b"}"))
    assert door.json_object(b'{"a":' + b"[" * deepest_taken + b"]" * deepest_taken + b"}")
    with pytest.raises(MalformedRequestError):
        door.json_object(b'{"a":' + b"[" * (deepest_taken + 1) + b"]" * (deepest_taken + 1) + b"}")


def _parses(body: bytes) -> bool:
    try:
        WaitForOperations.parse_json(body)
    except MalformedRequestError:
        return False
    except ValidationError:
        return True
    return True


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 10 ** 400, 1 << 63, -1, "3", True, 2.5, [1]])
def test_an_integer_field_takes_only_an_int64_in_range(value):
    with pytest.raises(ValidationError, match="seq_id"):
        door.integer({"seq_id": value}, "seq_id")


def test_an_integer_field_takes_whole_numbers_and_its_default():
    assert door.integer({"seq_id": 7}, "seq_id") == 7
    assert door.integer({"seq_id": 7.0}, "seq_id") == 7
    assert door.integer({}, "seq_id", 3) == 3
    assert door.integer({"seq_id": None}, "seq_id", None) is None
    assert door.integer({"seq_id": (1 << 63) - 1}, "seq_id") == (1 << 63) - 1


@pytest.mark.parametrize("ttl", [1e20, door.MAX_TTL_S + 1, -1, math.inf, math.nan, 10 ** 400, "60"])
def test_a_ttl_past_a_century_or_not_a_number_is_refused(ttl):
    with pytest.raises(ValidationError, match="ttl_seconds"):
        door.ttl_seconds({"ttl_seconds": ttl})


def test_a_ttl_in_range_is_taken_and_zero_means_none():
    assert door.ttl_seconds({"ttl_seconds": 3600}) == 3600.0
    assert door.ttl_seconds({"ttl_seconds": 0}) is None
    assert door.ttl_seconds({}) is None


def test_a_listing_of_a_checkpoint_saved_with_an_overflowing_ttl_does_not_fail():
    """Saved before the door refused it (1e20 s): the listings answered 500 until the checkpoint was deleted."""
    assert iso(1e20) is None
    assert iso(math.inf) is None
    assert iso(0.0) == "1970-01-01T00:00:00+00:00"


def _datum(tokens: list[int]) -> pb.Datum:
    datum = pb.Datum()
    chunk = datum.model_input.add()
    chunk.encoded_text.tokens = b"".join(t.to_bytes(4, "little") for t in tokens)
    target = datum.loss_fn_inputs["target_tokens"]
    target.dtype = pb.DTYPE_INT64
    target.dense = b"".join(t.to_bytes(8, "little") for t in tokens)
    return datum


@pytest.mark.parametrize("seq_id", [0, 5, -3, (1 << 31) - 1])
def test_the_peek_reads_what_the_protobuf_decoder_reads(seq_id):
    msg = pb.ForwardBackwardRequest(model_id="s:train:0", seq_id=seq_id, loss_fn="ppo", forward_only=True)
    msg.loss_fn_config["clip"] = 0.2
    for n in (1, 7, 300):
        msg.data.append(_datum(list(range(n))))
    body = msg.SerializeToString()
    head = convert.peek_forward_backward(body, 8)
    decoded = pb.ForwardBackwardRequest.FromString(body)
    assert head.model_id == decoded.model_id and head.seq_id == decoded.seq_id
    assert head.datum_bytes == [d.ByteSize() for d in decoded.data]


def test_the_peek_refuses_too_many_datums_or_fields_and_a_torn_body():
    msg = pb.ForwardBackwardRequest(model_id="m")
    for _ in range(5):
        msg.data.append(_datum([1]))
    with pytest.raises(RequestTooLargeError, match="at most 4 datums"):
        convert.peek_forward_backward(msg.SerializeToString(), 4)
    with pytest.raises(MalformedRequestError):
        convert.peek_forward_backward(msg.SerializeToString()[:-3], 8)
    flood = pb.ForwardBackwardRequest(model_id="m").SerializeToString() + bytes([6 << 3, 1]) * 1000  # forward_only
    with pytest.raises(MalformedRequestError, match="fields"):
        convert.peek_forward_backward(flood, 8)
    with pytest.raises(ValidationError, match="model_id"):
        convert.peek_forward_backward(b"", 8)


def test_a_request_whose_logits_would_not_fit_the_memory_budget_is_refused():
    limits = admission.Limits("training", batch_size=1024, max_seq_len=2048, vocab_size=32_000,
                              memory_budget=1 << 30)
    rows = (1 << 30) // (1024 * 32_000 * TRAINING_BYTES_PER_CELL)
    admission.check_shape(rows, 1024, limits)  # just fits
    with pytest.raises(RequestTooLargeError, match="MiB for their logits"):
        admission.check_shape(rows + 1, 1024, limits)
    with pytest.raises(RequestTooLargeError, match="MiB for their logits"):
        admission.check_shape(16, 2048, limits)  # 1/64 of a Tinker model's rows: the review's 1,987 MiB engine
    before_load = admission.Limits("training", 1024, 2048, None, memory_budget=1 << 30)
    admission.check_shape(16, 2048, before_load)  # the engine checks until the vocabulary is known


def test_the_peek_refuses_repeated_ids_and_wrong_wire_types_after_a_bounded_walk():
    """The attacker review: 5.5 million repeated seq_id fields held the event loop for 11 s in the peek."""
    seq_ids = pb.ForwardBackwardRequest(model_id="m").SerializeToString() + b"\x10\x00" * 100_000
    with pytest.raises(MalformedRequestError):
        convert.peek_forward_backward(seq_ids, 128)
    model_ids = b"\x0a\x01m" * 3
    with pytest.raises(MalformedRequestError):
        convert.peek_forward_backward(model_ids, 128)
    datum_as_varint = b"\x0a\x01m" + b"\x18\x00" * 10
    with pytest.raises(MalformedRequestError):
        convert.peek_forward_backward(datum_as_varint, 128)
    config = pb.ForwardBackwardRequest(model_id="m")
    for i in range(20):
        config.loss_fn_config[f"k{i}"] = 1.0  # a map: one field per entry, repeated as protobuf allows
    assert convert.peek_forward_backward(config.SerializeToString(), 128).model_id == "m"


def test_scoring_and_a_samples_prefill_are_budgeted_too():
    """The attacker review: prompt logprobs over a 16,000-token vocabulary took a sampler from 458 to 964 MiB
    against a 32 MiB budget. Scoring holds about 20 B per cell (float32 logits, a float64 copy, its log-softmax)."""
    from tg_tinker.types import ComputeLogprobsRequest, SampleRequest

    limits = admission.Limits("sampling", 1, 4096, 16_000, memory_budget=32 << 20)
    with pytest.raises(RequestTooLargeError, match="for their logits"):
        admission.admit(ComputeLogprobsRequest(tokens=[1] * 2000), limits)
    admission.admit(ComputeLogprobsRequest(tokens=[1] * 100), limits)
    with pytest.raises(RequestTooLargeError, match="for their logits"):
        admission.admit(SampleRequest(prompt=[1] * 4000, max_tokens=8), limits)
    admission.admit(SampleRequest(prompt=[1] * 100, max_tokens=8), limits)


def test_an_answer_echoing_a_lone_surrogate_still_encodes():
    from tensafe_trainer.service.errors import answer

    response = answer(ValidationError("unknown id 'op-\ud800'"), "/v1/operations/wait")
    assert response.status_code == 422 and b"\\ud800" in response.body
