"""Submission in the background: calls return at once, operations reach the trainer in call order, several
per request, and a refused submission fails what was queued behind it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from tg_tinker import AuthenticationError, OperationCancelledError, ValidationError
from tg_tinker import submission as submission_module
from tg_tinker.submission import OperationQueue
from tg_tinker.transport import Transport
from tg_tinker.types import ForwardBackwardRequest, OptimStepRequest

from conftest import random_batch, tiny_config

BATCH_PATH = "/operations/batch"


class HeldSender:
    """Holds the sender's first batch request until ``release()``, and records every batch request's size."""

    def __init__(self, transport: Transport, monkeypatch):
        self.gate, self.entered = threading.Event(), threading.Event()
        self.sizes: list[int] = []
        real = transport.request

        def request(method, path, **kwargs):
            if path.endswith(BATCH_PATH):
                self.entered.set()
                self.gate.wait(30)
                self.sizes.append(kwargs["content"].count(b'"idempotency_key"'))
            return real(method, path, **kwargs)

        monkeypatch.setattr(transport, "request", request)

    def wait_in_flight(self) -> None:
        """Until the sender has taken what was submitted so far and is held with it."""
        assert self.entered.wait(30)

    def release(self) -> None:
        self.gate.set()


def audit_count(service, client_id: str, operation: str) -> int:
    return len(service.get_audit_logs(training_client_id=client_id, operation=operation, limit=1000))


@pytest.fixture
def client(service):
    c = service.create_training_client(tiny_config())
    yield c
    c.close()


def test_calls_return_at_once_and_what_queued_meanwhile_goes_in_one_request(client, monkeypatch):
    held = HeldSender(client.transport, monkeypatch)
    futures = [client.forward_backward(random_batch(seed=i)) for i in range(5)] + [client.optim_step()]
    assert not any(f.done() for f in futures)  # nothing has reached the trainer: the first request is held
    held.release()
    assert futures[-1].result(timeout=60).step == 1
    assert [f.result().tokens_processed for f in futures[:-1]] == [60] * 5
    assert sum(held.sizes) == 6 and len(held.sizes) <= 2  # what queued behind the held request went in one


def test_a_refused_submission_fails_what_queued_behind_it_and_the_next_call_raises(service, client, monkeypatch):
    wrong_token = Transport(service.base_url, "not-the-token")
    queue = OperationQueue(wrong_token, client.id)
    held = HeldSender(wrong_token, monkeypatch)
    first = queue.submit(ForwardBackwardRequest(batch=random_batch()))
    behind = [queue.submit(OptimStepRequest()), queue.submit(OptimStepRequest())]
    seen_by_callback = []  # runs on the sender thread as it settles the future: must not wait on itself
    behind[0].add_done_callback(lambda f: seen_by_callback.append(f.operation_id))
    held.release()
    with pytest.raises(AuthenticationError, match="missing or wrong bearer token"):
        first.result(timeout=30)
    for future in behind:
        with pytest.raises(AuthenticationError, match="not sent: the forward_backward operation queued before it"):
            future.result(timeout=30)
        assert future.operation_id is None
    assert seen_by_callback == [None]
    # Those futures reported it, so the next call does not raise it again; this one is refused on its own...
    unseen = queue.submit(OptimStepRequest())
    queue.flush()
    # ...and as nobody looked at its future, the call after it raises the refusal, once.
    with pytest.raises(AuthenticationError, match="missing or wrong bearer token"):
        queue.submit(OptimStepRequest())
    assert isinstance(queue.submit(OptimStepRequest()).exception(timeout=30), AuthenticationError)
    assert isinstance(unseen.exception(), AuthenticationError)
    assert audit_count(service, client.id, "optim_step") == 0


def test_an_unsent_operation_cancels_without_reaching_the_trainer(service, client, monkeypatch):
    held = HeldSender(client.transport, monkeypatch)
    sent = client.forward_backward(random_batch())
    held.wait_in_flight()
    unsent = client.optim_step()
    assert unsent.cancel() is True and unsent.cancelled()
    with pytest.raises(OperationCancelledError, match="cancelled before it was sent"):
        unsent.result()
    held.release()
    assert sent.result(timeout=60).tokens_processed == 60
    assert client.optim_step().result(timeout=60).step == 1  # the cancelled step never ran
    assert held.sizes == [1, 1]


def test_calls_block_while_too_many_operations_wait_to_be_sent(client, monkeypatch):
    monkeypatch.setattr(submission_module, "MAX_UNSENT", 2)
    held = HeldSender(client.transport, monkeypatch)
    futures = [client.optim_step()]
    held.wait_in_flight()
    futures += [client.optim_step(), client.optim_step()]  # one in flight, two waiting
    blocked = threading.Thread(target=lambda: futures.append(client.optim_step()))
    blocked.start()
    time.sleep(0.3)
    assert blocked.is_alive() and len(futures) == 3
    held.release()
    blocked.join(30)
    assert not blocked.is_alive()
    assert [f.result(timeout=60).step for f in futures] == [1, 2, 3, 4]


def test_operations_not_sent_when_the_client_closes_are_cancelled(service, monkeypatch):
    client = service.create_training_client(tiny_config())
    held = HeldSender(client.transport, monkeypatch)
    in_flight = client.forward_backward(random_batch())
    held.wait_in_flight()
    unsent = client.optim_step()
    closing = threading.Thread(target=client.close)
    closing.start()
    time.sleep(0.2)
    held.release()
    closing.join(30)
    with pytest.raises(OperationCancelledError, match="cancelled before it was sent"):
        unsent.result(timeout=30)
    assert in_flight.exception(timeout=30) is None or isinstance(in_flight.exception(), OperationCancelledError)


def test_the_batch_endpoint_stops_at_the_first_refused_submission(service, client):
    transport, path = client.transport, f"/v1/clients/{client.id}{BATCH_PATH}"
    done = client.optim_step()
    done.result(timeout=60)
    reused_key = done.idempotency_key  # reused for a different request: refused
    keys = [uuid.uuid4().hex for _ in range(2)]
    answer = transport.request("POST", path, json={"submissions": [
        {"request": {"type": "optim_step"}, "idempotency_key": keys[0]},
        {"request": {"type": "forward_backward", "batch": random_batch()}, "idempotency_key": reused_key},
        {"request": {"type": "optim_step"}, "idempotency_key": keys[1]},
    ]})
    assert len(answer["records"]) == 1 and answer["records"][0]["type"] == "optim_step"
    assert answer["error"]["type"] == "ValidationError" and "idempotency key reused" in answer["error"]["message"]
    # a retry of the same request returns the same operation (never a second one)
    again = transport.request("POST", path, json={"submissions": [
        {"request": {"type": "optim_step"}, "idempotency_key": keys[0]}]})
    assert again["records"][0]["operation_id"] == answer["records"][0]["operation_id"]
    # a malformed batch is refused whole: nothing of it is queued
    with pytest.raises(ValidationError, match="input_ids is ragged"):
        transport.request("POST", path, json={"submissions": [
            {"request": {"type": "optim_step"}, "idempotency_key": uuid.uuid4().hex},
            {"request": {"type": "forward_backward", "batch": {"input_ids": [[1, 2], [3]]}}}]})
    assert client.optim_step().result(timeout=60).step == 3  # done, keys[0], this one


def test_a_script_that_exits_right_after_its_last_call_still_sends_it(service):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from conftest import random_batch, tiny_config
        from tg_tinker import ServiceClient
        tc = ServiceClient(base_url={service.base_url!r}, api_key={service.transport.token!r}).create_training_client(
            tiny_config(), client_id="exits-early")
        tc.forward_backward(random_batch())
        tc.optim_step()  # neither waited on nor closed: the interpreter exits next
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    deadline = time.monotonic() + 60
    while service.transport.request("GET", "/v1/clients/exits-early")["step"] < 1:
        assert time.monotonic() < deadline, "the script's last operation never ran"
        time.sleep(0.1)
    assert audit_count(service, "exits-early", "forward_backward") == 1


def test_waiting_without_a_timeout_outlasts_a_slow_submission(client, monkeypatch):
    """result() with no timeout waits for the submission however long it takes (here longer than one poll)."""
    from tg_tinker import futures as futures_module

    monkeypatch.setattr(futures_module, "POLL_S", 0.2)
    held = HeldSender(client.transport, monkeypatch)
    step = client.optim_step()
    threading.Timer(0.8, held.release).start()
    assert step.result().step == 1
