"""The SDK against the local trainer server: futures, ordering, cancellation, retries, bad input."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from tg_tinker import (
    AuthenticationError,
    PermissionDeniedError,
    BatchData,
    ClientStatus,
    FutureTimeoutError,
    OperationCancelledError,
    OperationLostError,
    OptimizerConfig,
    ServiceClient,
    TGTinkerError,
    TrainingClientNotFoundError,
    ValidationError,
)
from tg_tinker.types import ForwardBackwardRequest, OptimStepRequest

from conftest import TINY, random_batch, tiny_config


def test_status_and_step_follow_the_trainer(tc):
    assert tc.refresh().status in (ClientStatus.READY, ClientStatus.BUSY)
    start = tc.step
    tc.forward_backward(random_batch()).result()
    result = tc.optim_step().result()
    assert result.step == start + 1 == tc.step == tc.refresh().step


def test_operations_run_in_submission_order_whatever_order_they_are_awaited(service, tc):
    start = tc.refresh().step
    futures = []
    for i in range(6):
        futures.append(tc.forward_backward(random_batch(seed=i)))
        futures.append(tc.optim_step())
    steps = [f.result().step for f in reversed(futures) if f.type == "optim_step"]
    assert steps == list(range(start + 6, start, -1))
    records = [service.transport.request("GET", f"/v1/operations/{f.operation_id}") for f in futures]
    starts = [r["started_at"] for r in records]
    assert starts == sorted(starts)
    assert all(records[i]["finished_at"] <= records[i + 1]["started_at"] for i in range(len(records) - 1))


def test_waiting_on_the_last_future_settles_the_earlier_ones_in_the_same_round_trip(tc, monkeypatch):
    transport = tc.transport
    futures = []
    for i in range(4):
        futures.append(tc.forward_backward(random_batch(seed=i)))
        futures.append(tc.optim_step())
    tc.flush()  # all sent: what follows counts only the waiting
    sent = []
    real_request = transport.request
    monkeypatch.setattr(transport, "request", lambda method, path, **kw: (sent.append(path), real_request(
        method, path, **kw))[1])
    last = futures[-1].result()
    assert all(f.done() for f in futures) and futures[-2].result().tokens_processed > 0
    assert sent == ["/v1/operations/wait"] * len(sent) and len(sent) <= 2  # one, or two if the wait timed out
    assert [f.result().step for f in futures[1::2]][-1] == last.step


def test_a_dropped_future_is_not_kept_alive_by_the_sdk(tc):
    import gc
    import weakref

    kept = tc.forward_backward(random_batch(rows=4, width=64))
    dropped = weakref.ref(tc.optim_step())  # never waited on, and dropped at once
    tc.flush()
    gc.collect()
    assert dropped() is None
    kept.result()


def test_the_wait_endpoint_reports_known_operations_and_refuses_an_unknown_first(service, tc):
    op = tc.optim_step()
    op.result()
    records = service.transport.request("POST", "/v1/operations/wait",
                                        json={"operation_ids": [op.operation_id, "op-" + "0" * 32], "wait": 0})
    assert [r["operation_id"] for r in records] == [op.operation_id] and records[0]["status"] == "succeeded"
    with pytest.raises(OperationLostError, match="unknown to this trainer"):
        service.transport.request("POST", "/v1/operations/wait",
                                  json={"operation_ids": ["op-" + "0" * 32, op.operation_id], "wait": 0})
    with pytest.raises(ValidationError):
        service.transport.request("POST", "/v1/operations/wait", json={"operation_ids": [], "wait": 0})


def test_timeout_then_later_result_and_cancel_before_start(service):
    slow = service.create_training_client(tiny_config(model_ref="tiny-random-llama:hidden=256,layers=4,vocab=512",
                                                      max_seq_len=512))
    try:
        big = random_batch(rows=8, width=512)
        first = slow.forward_backward(big)
        queued = [slow.forward_backward(big) for _ in range(3)]
        submitted = first.operation_id  # waits until it is sent: the timeout below is then the trainer's
        assert all(q.operation_id for q in queued)  # all sent: the cancel below is the trainer's (and audited)
        with pytest.raises(FutureTimeoutError) as err:
            first.result(timeout=0.01)
        assert err.value.details["operation_id"] == submitted
        assert queued[-1].cancel() is True
        assert queued[-1].cancelled()
        with pytest.raises(OperationCancelledError):
            queued[-1].result()
        assert first.result(timeout=120).tokens_processed == 8 * 511  # the timed-out operation went on
        assert queued[0].result().tokens_processed == 8 * 511
        assert first.cancel() is False  # finished: too late
        assert queued[1].exception() is None
        cancelled = service.get_audit_logs(training_client_id=slow.id, operation="forward_backward")
        assert [e.success for e in cancelled].count(False) == 1  # the cancelled one is audited too
    finally:
        slow.close()


def two_steps_behind_two_batches_once_the_first_is_done(service, client) -> tuple[str, str, str]:
    """Submits forward_backward x2 then optim_step x2 in one request and waits for the first. The engine is
    then running the second and holds the third, handed over; the fourth is queued. Returns their ids."""
    batch = ForwardBackwardRequest(batch=BatchData(**random_batch(rows=8, width=512))).model_dump(mode="json")
    step = OptimStepRequest().model_dump(mode="json")
    answer = service.transport.request("POST", f"/v1/clients/{client.id}/operations/batch", json={
        "submissions": [{"request": r, "idempotency_key": uuid.uuid4().hex} for r in (batch, batch, step, step)]})
    first, *rest = (r["operation_id"] for r in answer["records"])
    service.transport.request("GET", f"/v1/operations/{first}", params={"wait": 60})
    return tuple(rest)


def test_cancelling_the_operation_right_behind_the_running_one(service):
    """When an operation finishes, the engine is handed the next two: the one it runs and the one after it.
    Cancelling that one still works, and it never runs, while the ones around it do."""
    slow = service.create_training_client(tiny_config(max_seq_len=512))
    try:
        running, handed, last = two_steps_behind_two_batches_once_the_first_is_done(service, slow)
        cancel = service.transport.request("POST", f"/v1/operations/{handed}/cancel")
        assert cancel["cancelled"] is True and cancel["record"]["status"] == "cancelled"
        assert service.transport.request("POST", f"/v1/operations/{running}/cancel")["cancelled"] is False
        done = service.transport.request("GET", f"/v1/operations/{last}", params={"wait": 60})
        assert done["status"] == "succeeded" and done["result"]["step"] == 1  # the cancelled step never ran
        second = service.transport.request("GET", f"/v1/operations/{running}")
        assert second["status"] == "succeeded" and second["finished_at"] <= done["started_at"]
        assert slow.refresh().step == 1
    finally:
        slow.close()


def test_terminating_a_client_withdraws_the_operation_handed_over_and_lets_the_running_one_finish(service):
    slow = service.create_training_client(tiny_config(max_seq_len=512))
    running, handed, queued = two_steps_behind_two_batches_once_the_first_is_done(service, slow)
    slow.close()
    records = {op: service.transport.request("GET", f"/v1/operations/{op}", params={"wait": 60})
               for op in (running, handed, queued)}
    assert records[running]["status"] == "succeeded"  # it had started: it finishes
    for op in (handed, queued):
        assert records[op]["status"] == "cancelled" and "terminated" in records[op]["error"]["message"]
    steps = service.get_audit_logs(training_client_id=slow.id, operation="optim_step")
    assert [e.success for e in steps] == [False, False]  # neither step ran; both are audited


def test_retried_submission_with_the_same_key_runs_once(service, tc):
    path = f"/v1/clients/{tc.id}/operations"
    key = uuid.uuid4().hex
    body = {"request": OptimStepRequest().model_dump(mode="json"), "idempotency_key": key}
    start = tc.refresh().step
    first = service.transport.request("POST", path, json=body)
    again = service.transport.request("POST", path, json=body)
    assert first["operation_id"] == again["operation_id"]
    tc.forward_backward(random_batch()).result()  # queued behind: waits for the optim_step
    assert tc.refresh().step == start + 1
    other = {"request": ForwardBackwardRequest(batch=BatchData(**random_batch())).model_dump(mode="json"),
             "idempotency_key": key}
    with pytest.raises(ValidationError, match="idempotency key reused"):
        service.transport.request("POST", path, json=other)


def test_done_callback_and_asyncio(tc):
    seen = []
    future = tc.forward_backward(random_batch())
    future.add_done_callback(lambda f: seen.append(f.result().tokens_processed))

    async def pipeline():
        fb = await tc.forward_backward_async(random_batch(seed=1))
        opt = await tc.optim_step_async()
        return await fb, await opt

    fb, opt = asyncio.run(pipeline())
    assert fb.tokens_processed == 4 * 15 and opt.step == tc.step
    future.result()
    for _ in range(50):
        if seen:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert seen == [60]


@pytest.mark.parametrize("bad, match", [
    ({"input_ids": [[1, 2, 3], [4, 5]]}, "ragged"),
    ({"input_ids": [[1, 2]], "labels": [[1, 2, 3]]}, "labels shape does not match"),
    ({"input_ids": []}, "non-empty"),
    ({"input_ids": [[1.0, 2.0]]}, "must hold integers"),
    ({"input_ids": [[1, -5]]}, "must be token ids, 0 to"),
    ({"input_ids": [[1, 1 << 63]]}, "must be token ids, 0 to 9223372036854775807"),
    ({"input_ids": [[1, 2]], "labels": [[2, -7]]}, "-100"),
    ({"input_ids": [[1, 2]], "attention_mask": [[1, 2]]}, "0 or 1"),
    ({"input_ids": [[1, 2]], "extra": 1}, "extra"),
])
def test_malformed_batches_are_refused_by_type(tc, bad, match):
    with pytest.raises(ValidationError, match=match):
        tc.forward_backward(bad)


def test_tensors_are_accepted_and_float_tensors_refused(tc):
    torch = pytest.importorskip("torch")
    ids = torch.randint(0, 512, (2, 8))
    assert tc.forward_backward({"input_ids": ids}).result().tokens_processed == 2 * 7
    with pytest.raises(ValidationError, match="dtype"):
        tc.forward_backward({"input_ids": ids.float()})
    tc.optim_step().result()


def test_trainer_side_errors_fail_the_future_and_the_server_keeps_serving(service, tc):
    with pytest.raises(ValidationError, match="vocabulary of 512"):
        tc.forward_backward({"input_ids": [[1, 600]]}).result()
    with pytest.raises(ValidationError, match="max_seq_len=64"):
        tc.forward_backward({"input_ids": [[1] * 65]}).result()
    assert tc.forward_backward(random_batch()).result().tokens_processed == 60
    tc.optim_step().result()
    assert service.transport.request("GET", "/healthz") == {"status": "ok"}


def test_bad_configs_fail_when_built_and_when_started(service):
    with pytest.raises(ValidationError, match="name"):
        OptimizerConfig(name="lion")
    with pytest.raises(ValidationError, match="rank"):
        tiny_config(lora_config={"rank": 0})
    with pytest.raises(ValidationError, match="model_ref"):
        service.create_training_client(tiny_config(model_ref="/no/such/model-folder"))
    with pytest.raises(ValidationError, match="target modules|lora_config"):
        service.create_training_client(tiny_config(lora_config={"target_modules": ["no_such_proj"]}))
    assert service.transport.request("GET", "/healthz") == {"status": "ok"}


def test_unknown_operation_and_client(service):
    with pytest.raises(OperationLostError, match="unknown to this trainer"):
        service.transport.request("GET", "/v1/operations/op-doesnotexist")
    with pytest.raises(TrainingClientNotFoundError, match="no client 'tc-nope'"):
        service.transport.request("GET", "/v1/clients/tc-nope")


def test_wrong_or_missing_token_is_refused(service):
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic abc"}):
        response = httpx.get(f"{service.base_url}/v1/clients", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "AuthenticationError"
    with ServiceClient(base_url=service.base_url, api_key="wrong") as intruder:
        with pytest.raises(AuthenticationError):
            intruder.list_training_clients()
    assert httpx.get(f"{service.base_url}/healthz").status_code == 200  # health needs no token


def test_metrics_and_openapi_are_served(service, tc):
    tc.forward_backward(random_batch()).result()
    text = httpx.get(f"{service.base_url}/metrics").text
    assert 'tensafe_operations_total{status="succeeded",type="forward_backward"}' in text
    for path in ("/openapi.json", "/docs", "/redoc"):  # behind the token (tensafe serve --open-docs opens them)
        assert httpx.get(f"{service.base_url}{path}").status_code == 401
    schema = service.transport.request("GET", "/openapi.json")
    assert "/v1/clients/{client_id}/operations" in schema["paths"]
    body = schema["paths"]["/v1/clients/{client_id}/operations/batch"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/SubmitOperations"
    assert {"SubmitOperations", "SubmitOperation", "BatchData"} <= set(schema["components"]["schemas"])
    tc.optim_step().result()


def test_terminated_client_refuses_work(service):
    client = service.create_training_client(tiny_config())
    client.close()
    assert client.status is ClientStatus.TERMINATED
    with pytest.raises(TGTinkerError, match="TERMINATED"):
        client.forward_backward(random_batch())


def test_list_training_clients(service, tc):
    assert tc.id in {c.client_id for c in service.list_training_clients()}
    assert TINY in {c.config.model_ref for c in service.list_training_clients()}


def test_oversized_request_body_is_refused_before_it_is_read(service):
    headers = {"authorization": f"Bearer {service.transport.token}", "content-type": "application/json"}
    response = httpx.post(f"{service.base_url}/v1/training_clients", content=b"x" * (65 << 20), headers=headers)
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "RequestTooLargeError"
    assert "larger than" in response.json()["error"]["message"]
    assert httpx.get(f"{service.base_url}/healthz").status_code == 200


def test_readiness_waits_for_loading_clients_but_not_for_failed_ones(tmp_path):
    with ServiceClient(home=tmp_path) as svc:
        with pytest.raises(TGTinkerError, match="no-such-model"):
            svc.create_training_client(tiny_config(model_ref="no-such-model"))
        ready = httpx.get(f"{svc.base_url}/readyz")
        assert ready.status_code == 200 and ready.json()["failed"] == 1  # a count: ids need a token


def test_a_client_token_opens_its_own_client_and_nothing_else(tmp_path):
    from tg_tinker.transport import Transport

    with ServiceClient(home=tmp_path) as svc:
        alice = svc.create_training_client(tiny_config(), client_id="alice")
        bob = svc.create_training_client(tiny_config(), client_id="bob")
        bobs = bob.save_state()
        alices = alice.save_state()
        token = alice.info.access_token
        assert token and token != bob.info.access_token and "access_token" not in repr(alice.info)
        fb = {"request": {"type": "forward_backward", "batch": random_batch()}}
        with Transport(svc.base_url, token) as as_alice:
            assert as_alice.request("GET", "/v1/clients/alice")["client_id"] == "alice"
            assert [c["client_id"] for c in as_alice.request("GET", "/v1/clients")] == ["alice"]
            assert [a["artifact_id"] for a in as_alice.request("GET", "/v1/artifacts")] == [alices.artifact_id]
            assert as_alice.request("GET", f"/v1/artifacts/{alices.artifact_id}/content", raw=True)
            for method, path, body in (("GET", "/v1/clients/bob", None), ("POST", "/v1/clients/bob/operations", fb),
                                       ("DELETE", "/v1/clients/bob", None),
                                       ("GET", f"/v1/artifacts/{bobs.artifact_id}/content", None),
                                       ("GET", "/v1/artifacts?training_client_id=bob", None),
                                       ("GET", "/v1/audit?training_client_id=bob", None)):
                with pytest.raises(PermissionDeniedError, match="belongs to (training client 'alice'|another "
                                                                "training client: the token of client 'alice')"):
                    as_alice.request(method, path, json=body)
            with pytest.raises(AuthenticationError, match="trainer's own token"):
                as_alice.request("POST", "/v1/training_clients", json={"config": tiny_config().model_dump(mode="json")})
            bob_op = bob.forward_backward(random_batch())
            with pytest.raises(OperationLostError):  # another client's operation: as unknown as a wrong id
                as_alice.request("GET", f"/v1/operations/{bob_op.operation_id}")
            alice_op = alice.optim_step()
            bob_op.result()
            waited = as_alice.request("POST", "/v1/operations/wait",  # not even behind one of her own
                                      json={"operation_ids": [alice_op.operation_id, bob_op.operation_id],
                                            "wait": 30})
            assert [r["operation_id"] for r in waited] == [alice_op.operation_id]
            assert {e["training_client_id"] for e in as_alice.request("GET", "/v1/audit")} == {"alice"}
        with Transport(svc.base_url, "not-a-token") as stranger, pytest.raises(AuthenticationError):
            stranger.request("GET", "/v1/clients/alice")
        bob_op.result()  # bob carried on
