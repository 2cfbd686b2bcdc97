"""Hostile clients and other tenants (issue #17), scripted against a real `tensafe serve` on loopback:
tokens that outlive their client, bodies sent before a token is checked, chunked bodies past the cap,
batches a client cannot run, values past int64, a failed operation that used to drop pending gradients,
an engine that dies while idle, open docs. Each test fails on the code before #17."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest

from conftest import VOCAB, random_batch, tiny_config
from tg_tinker import (AuthenticationError, ClientFailedError, ClientTerminatedError, PermissionDeniedError,
                       ServiceClient)
from tg_tinker.errors import ValidationError
from tg_tinker.transport import Transport


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile-home")


@pytest.fixture(scope="module")
def svc(home):
    with ServiceClient(home=home) as service:
        yield service


@pytest.fixture(scope="module")
def victim(svc):
    client = svc.create_training_client(tiny_config(batch_size=2), client_id="victim")
    yield client
    client.close()


def create(svc, client_id, tenant, **config):
    body = {"config": tiny_config(**config).model_dump(mode="json"), "client_id": client_id, "tenant_id": tenant}
    return svc.transport.request("POST", "/v1/training_clients", json=body)


def wait_ready(svc, client_id):
    for _ in range(600):
        if svc.transport.request("GET", f"/v1/clients/{client_id}")["status"] in ("READY", "ERROR"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{client_id} never became ready")


def run(transport, client_id, request, wait=60):
    record = transport.request("POST", f"/v1/clients/{client_id}/operations", json={"request": request})
    return transport.request("GET", f"/v1/operations/{record['operation_id']}", params={"wait": wait})


def raw_http(url: str, head: bytes, body_chunks=(), read_timeout=10.0) -> bytes:
    """Speak HTTP/1.1 by hand (what a hostile client sends is not what httpx would): the head, then the
    body on a thread of its own while the answer is read, as a server may answer before the body ends."""
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=read_timeout) as sock:
        sock.sendall(head)

        def send_body():
            try:
                for chunk in body_chunks:
                    sock.sendall(chunk)
            except OSError:
                pass  # refused early: the server closed while we were still sending

        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        answer = b""
        try:
            while True:  # to the end: each refusal here closes the connection
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except (ConnectionResetError, socket.timeout):
            pass
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sender.join(timeout=10)
        return answer


def test_a_deleted_clients_token_opens_nothing_not_even_its_own_artifacts(svc):
    old = create(svc, "shared-bot", "t1")
    wait_ready(svc, "shared-bot")
    with Transport(svc.base_url, old["access_token"]) as token:
        saved = run(token, "shared-bot", {"type": "save_state"})["result"]["artifact_id"]
        assert token.request("GET", "/v1/artifacts", params={"tenant_id": "t1"})  # works while it lives
    svc.transport.request("DELETE", "/v1/clients/shared-bot")
    reads = [("GET", "/v1/clients/shared-bot", None), ("GET", "/v1/artifacts", {"tenant_id": "t1"}),
             ("GET", f"/v1/artifacts/{saved}", {"tenant_id": "t1"}),
             ("GET", f"/v1/artifacts/{saved}/content", {"tenant_id": "t1"}),
             ("GET", "/v1/audit", {"tenant_id": "t1"}), ("GET", "/v1/audit/head", {"tenant_id": "t1"})]
    with Transport(svc.base_url, old["access_token"]) as stale:
        for method, path, params in reads:
            with pytest.raises(AuthenticationError, match="was terminated: it opens nothing"):
                stale.request(method, path, params=params)
    # The id reused by another tenant: the old token reaches none of it either.
    new = create(svc, "shared-bot", "t2")
    wait_ready(svc, "shared-bot")
    try:
        with Transport(svc.base_url, old["access_token"]) as stale:
            for method, path, body in (("GET", "/v1/clients/shared-bot", None),
                                       ("POST", "/v1/clients/shared-bot/operations",
                                        {"request": {"type": "export_adapter"}}),
                                       ("POST", "/v1/sampling_clients",
                                        {"training_client_id": "shared-bot", "tenant_id": "t2"}),
                                       ("GET", "/v1/artifacts", None)):
                with pytest.raises(AuthenticationError, match="wrong bearer token|opens nothing"):
                    stale.request(method, path, json=body, params={"tenant_id": "t2"} if method == "GET" else None)
        with Transport(svc.base_url, new["access_token"]) as fresh:
            assert fresh.request("GET", "/v1/clients/shared-bot")["tenant_id"] == "t2"
    finally:
        svc.transport.request("DELETE", "/v1/clients/shared-bot")


def test_work_for_a_terminated_or_failed_client_is_409_or_410_never_500(svc):
    create(svc, "doomed", "default")
    wait_ready(svc, "doomed")
    svc.transport.request("DELETE", "/v1/clients/doomed")
    response = httpx.post(f"{svc.base_url}/v1/clients/doomed/operations", json={"request": {"type": "optim_step"}},
                          headers={"authorization": f"Bearer {svc.transport.token}"})
    assert response.status_code == 410 and response.json()["error"]["type"] == "ClientTerminatedError"
    with pytest.raises(ClientTerminatedError, match="TERMINATED"):
        run(svc.transport, "doomed", {"type": "optim_step"})


def test_an_unauthenticated_body_is_refused_before_it_is_read(svc):
    """64 MiB declared, not one byte of it sent: the 401 comes at once (the old server waited for the body)."""
    head = (b"POST /v1/training_clients HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (64 << 20))
    start = time.monotonic()
    answer = raw_http(svc.base_url, head)
    assert answer.startswith(b"HTTP/1.1 401") and time.monotonic() - start < 5
    assert b"AuthenticationError" in answer or b"www-authenticate" in answer.lower()


def test_a_chunked_body_is_counted_and_cut_off_at_the_callers_limit(svc, victim):
    """Transfer-Encoding: chunked carries no Content-Length: the bytes are counted as they arrive."""
    token = victim.transport.token
    head = (f"POST /v1/clients/{victim.id}/operations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"x" * (1 << 20)
    sent = []

    def chunks():
        for _ in range(80):  # 80 MiB, far past what this batch_size=2 client may send
            sent.append(len(chunk))
            yield b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        yield b"0\r\n\r\n"

    answer = raw_http(svc.base_url, head, chunks(), read_timeout=30)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"RequestTooLargeError" in answer
    assert sum(sent) < 40 << 20  # refused long before the end (the socket's buffers hold a few MiB)
    assert victim.refresh().info.queue_depth == 0


@pytest.mark.parametrize("request_body, status, error, message", [
    ({"type": "forward_backward", "batch": random_batch(rows=3)}, 413, "RequestTooLargeError",
     "3 examples, more than batch_size=2"),
    ({"type": "forward_backward", "batch": random_batch(rows=2, width=65)}, 413, "RequestTooLargeError",
     "more than max_seq_len=64"),
    ({"type": "forward_backward", "batch": {"input_ids": [[1, VOCAB]]}}, 422, "ValidationError",
     f"token id {VOCAB}, outside the model's vocabulary of {VOCAB}"),
    ({"type": "forward_backward", "batch": {"input_ids": [[1, 1 << 63]]}}, 422, "ValidationError",
     "0 to 9223372036854775807"),
    ({"type": "sample", "prompt": [1, 2], "seed": 1 << 70}, 422, "ValidationError", "seed"),
    ({"type": "compute_logprobs", "tokens": [1, 10 ** 6]}, 422, "ValidationError", "outside the model's vocabulary"),
])
def test_submissions_are_checked_at_the_door_against_what_the_client_can_run(svc, victim, request_body, status,
                                                                             error, message):
    before = victim.refresh().info.queue_depth
    response = httpx.post(f"{svc.base_url}/v1/clients/{victim.id}/operations", json={"request": request_body},
                          headers={"authorization": f"Bearer {svc.transport.token}"})
    assert response.status_code == status, response.text
    assert response.json()["error"]["type"] == error and message in response.json()["error"]["message"]
    assert victim.refresh().info.queue_depth == before


def test_a_batch_with_one_bad_submission_queues_nothing(svc, victim):
    nested: dict = {}
    node = nested
    for _ in range(100):
        node["a"] = {}
        node = node["a"]
    steps = len(svc.get_audit_logs(training_client_id=victim.id, operation="optim_step", limit=1000))
    body = {"submissions": [{"request": {"type": "optim_step"}},
                            {"request": {"type": "save_state", "metadata": nested}}]}
    response = httpx.post(f"{svc.base_url}/v1/clients/{victim.id}/operations/batch", json=body,
                          headers={"authorization": f"Bearer {svc.transport.token}"})
    assert response.status_code == 422 and response.json()["error"]["type"] == "ValidationError"
    over = {"submissions": [{"request": {"type": "optim_step"}},
                            {"request": {"type": "forward_backward", "batch": random_batch(rows=5)}}]}
    response = httpx.post(f"{svc.base_url}/v1/clients/{victim.id}/operations/batch", json=over,
                          headers={"authorization": f"Bearer {svc.transport.token}"})
    assert response.status_code == 413 and "batch_size=2" in response.json()["error"]["message"]
    time.sleep(0.5)
    assert len(svc.get_audit_logs(training_client_id=victim.id, operation="optim_step", limit=1000)) == steps


def test_metadata_is_bounded_in_size_and_depth(victim):
    with pytest.raises(ValidationError, match="more than 65536"):
        victim.save_state(metadata={"blob": "x" * 70_000})
    deep: dict = {}
    node = deep
    for _ in range(20):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(ValidationError, match="deeper than 16 levels"):
        victim.save_state(metadata=deep)


def test_one_clients_largest_request_does_not_freeze_the_server(svc, victim):
    """A body at this client's limit (here one row of two million tokens, refused once parsed) is parsed on
    a worker thread: /healthz keeps answering meanwhile."""
    from tensafe_trainer.service.admission import Limits, body_limit

    limit = body_limit(Limits("training", 2, 64, VOCAB))
    prefix, suffix = b'{"submissions":[{"request":{"type":"forward","batch":{"input_ids":[[', b"]]}}}]}"
    body = prefix + b",".join([b"7"] * ((limit - len(prefix) - len(suffix)) // 2)) + suffix
    assert limit - 4 <= len(body) <= limit
    worst, done = 0.0, threading.Event()

    def probe():
        nonlocal worst
        with httpx.Client() as client:
            while not done.is_set():
                start = time.monotonic()
                client.get(f"{svc.base_url}/healthz", timeout=30)
                worst = max(worst, time.monotonic() - start)
                time.sleep(0.01)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        for _ in range(3):
            response = httpx.post(f"{svc.base_url}/v1/clients/{victim.id}/operations/batch", content=body,
                                  timeout=120, headers={"authorization": f"Bearer {svc.transport.token}",
                                                        "content-type": "application/json"})
            assert response.status_code == 413 and "max_seq_len=64" in response.json()["error"]["message"]
    finally:
        done.set()
        prober.join()
    assert worst < 1.0, f"/healthz took {worst:.2f}s while a large request was parsed"  # a loose bound


def test_a_failed_sample_leaves_the_accumulated_gradients_alone(tensafe_home):
    """The engine's own rule behind the door's checks: only an operation that accumulates gradients may
    discard them when it fails. A sample failing inside the engine (its seed past what torch takes, sent
    past the door's check here) once silently dropped the batch, and the next optim_step changed nothing."""
    from tensafe_trainer.engine.process import slot_on_own_host
    from tensafe_trainer.engine.protocol import SlotSpec

    from tg_tinker.types import (BatchData, ForwardBackwardRequest, ForwardRequest, OptimStepRequest,
                                 SampleRequest)

    config = tiny_config()
    engine = slot_on_own_host(SlotSpec.training("tc-keep", "default", config), tensafe_home)
    batch = BatchData(**random_batch())
    try:
        engine.hand_over(0, ForwardRequest(batch=batch))
        before = engine.reply("forward").result["loss"]
        engine.hand_over(1, ForwardBackwardRequest(batch=batch))
        assert engine.reply("forward_backward").ok
        bad = SampleRequest.model_construct(type="sample", prompt=[1, 2], max_tokens=2, temperature=1.0, top_p=1.0,
                                            top_k=None, stop=None, seed=1 << 70, num_samples=1)
        engine.hand_over(2, bad)
        failed = engine.reply("sample")
        assert failed.error is not None and "discarded" not in failed.error["message"]
        engine.hand_over(3, OptimStepRequest())
        assert engine.reply("optim_step").ok
        engine.hand_over(4, ForwardRequest(batch=batch))
        assert engine.reply("forward").result["loss"] < before  # the step used the batch's gradients
    finally:
        engine.close()


def test_an_engine_that_dies_while_idle_puts_its_client_in_error_at_once(tmp_path):
    from process_helpers import engine_pids

    with ServiceClient(home=tmp_path) as service:
        tc = service.create_training_client(tiny_config(), client_id="idle")
        os.kill(engine_pids(service.local_trainer.process.pid)[-1], signal.SIGKILL)
        for _ in range(100):
            if tc.refresh().status.value == "ERROR":
                break
            time.sleep(0.1)
        assert tc.info.status.value == "ERROR" and "died while idle" in tc.info.error
        assert httpx.get(f"{service.base_url}/readyz").json()["failed"] == 1
        with pytest.raises(ClientFailedError, match="is ERROR"):
            tc.optim_step().result(timeout=30)
        # Re-created under the same id: the old instance's token is revoked, the new one works.
        old_token = tc.transport.token
        fresh = service.create_training_client(tiny_config(), client_id="idle")
        assert fresh.optim_step().result().step == 1
        with Transport(service.base_url, old_token) as stale, pytest.raises(AuthenticationError, match="replaced"):
            stale.request("GET", "/v1/clients/idle")


def test_engine_processes_get_no_admin_token(svc, victim):
    from process_helpers import engine_pids

    # Nor the server's own starting environment (/proc keeps it): the local backend hands the token over in a
    # 0600 file, removed once the server has read it.
    local = svc.local_trainer
    server_environ = open(f"/proc/{local.process.pid}/environ", "rb").read()
    assert local.token.encode() not in server_environ
    assert not (local.directory / "token").exists()
    for pid in engine_pids(local.process.pid):
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        assert not any(entry.startswith(b"TENSAFE_AUTH_TOKEN=") for entry in environ)
        assert local.token.encode() not in b"\0".join(environ)


def test_docs_need_a_token_and_readyz_names_no_client(svc, victim):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{svc.base_url}{path}").status_code == 401
    ready = httpx.get(f"{svc.base_url}/readyz").text
    assert victim.id not in ready


def test_a_silent_connection_is_closed_after_the_header_deadline(svc, monkeypatch):
    from tensafe_trainer.api.http_guard import HEADER_TIMEOUT_S

    parsed = urlparse(svc.base_url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=HEADER_TIMEOUT_S + 20) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
        start = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server
        assert HEADER_TIMEOUT_S - 1 <= time.monotonic() - start <= HEADER_TIMEOUT_S + 10


def test_an_oversized_header_is_refused(svc):
    answer = raw_http(svc.base_url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * (1 << 20) + b"\r\n\r\n")
    assert not answer.startswith(b"HTTP/1.1 200")


def test_clients_per_trainer_are_limited_with_a_clear_error(tmp_path, monkeypatch):
    from tg_tinker import ResourceExhaustedError

    monkeypatch.setenv("TENSAFE_MAX_CLIENTS", "1")
    with ServiceClient(home=tmp_path) as service:
        first = service.create_training_client(tiny_config())
        with pytest.raises(ResourceExhaustedError, match="already runs 1 clients, its limit"):
            service.create_training_client(tiny_config())
        first.close()  # its slot is free once its engine process has exited (a moment later)
        for _ in range(100):
            try:
                second = service.create_training_client(tiny_config())
                break
            except ResourceExhaustedError:
                time.sleep(0.1)
        assert second.optim_step().result().step == 1


def test_a_client_is_refused_when_the_machine_lacks_the_memory_to_start_it(tmp_path, monkeypatch):
    from tg_tinker import ResourceExhaustedError

    monkeypatch.setenv("TENSAFE_MIN_FREE_MEMORY", str(1 << 50))  # a petabyte: more than any machine has free
    with ServiceClient(home=tmp_path) as service:
        with pytest.raises(ResourceExhaustedError, match="MiB of memory available, less than the"):
            service.create_training_client(tiny_config())


def test_open_docs_is_a_flag_of_the_server(tmp_path):
    from fastapi.testclient import TestClient
    from tensafe_trainer.api.app import create_app
    from tensafe_trainer.service.trainer import Settings

    for open_docs, status in ((False, 401), (True, 200)):
        app = create_app(Settings(home=tmp_path / str(open_docs), token="admin-token", open_docs=open_docs))
        with TestClient(app) as client:
            assert client.get("/openapi.json").status_code == status
            assert client.get("/v1/clients").status_code == 401  # the flag opens the docs only
            assert client.get("/v1/clients", headers={"authorization": "Bearer admin-token"}).json() == []


def test_tenant_ids_match_in_full_and_reads_create_no_folder(svc, home):
    for bad in ("t2\n", "../t2", "t2/x"):
        with pytest.raises((ValidationError, AuthenticationError)):
            svc.transport.request("GET", "/v1/artifacts", params={"tenant_id": bad})
    svc.transport.request("GET", "/v1/artifacts", params={"tenant_id": "never-used"})
    assert not (home / "artifacts" / "never-used").exists() and not (home / "artifacts" / "t2\n").exists()


# --- what the attacker review of #17 found, each now refused ------------------------------------------


def test_a_request_still_arriving_when_its_client_is_replaced_acts_on_nothing(svc):
    """Its token was good when the head arrived; by the time the body has, the client is another tenant's."""
    old = create(svc, "raced", "t1")
    wait_ready(svc, "raced")
    body = json.dumps({"request": {"type": "optim_step"}}).encode()
    head = (f"POST /v1/clients/raced/operations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {old['access_token']}"
            f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    parsed = urlparse(svc.base_url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=30) as sock:
        sock.sendall(head + body[:1])  # past the door, body on its way
        time.sleep(0.5)
        svc.transport.request("DELETE", "/v1/clients/raced")
        create(svc, "raced", "t2")
        sent = 1
        while svc.transport.request("GET", "/v1/clients/raced")["status"] not in ("READY", "ERROR"):
            if sent < len(body) - 1:  # a byte a second: an engine may take longer to start than the server waits
                sock.sendall(body[sent:sent + 1])  # between two pieces of a body (10 s)
                sent += 1
            time.sleep(1.0)
        sock.sendall(body[sent:])
        answer = sock.recv(65536)
    try:
        assert answer.startswith(b"HTTP/1.1 401"), answer[:300]
        assert svc.transport.request("GET", "/v1/clients/raced")["step"] == 0  # t2's client untouched
    finally:
        svc.transport.request("DELETE", "/v1/clients/raced")


def test_a_new_client_under_an_old_id_cannot_read_the_old_ones_operations(svc):
    old = create(svc, "heir", "t1")
    wait_ready(svc, "heir")
    with Transport(svc.base_url, old["access_token"]) as token:
        record = token.request("POST", "/v1/clients/heir/operations", json={"request": {"type": "optim_step"}})
    svc.transport.request("DELETE", "/v1/clients/heir")
    new = create(svc, "heir", "t2")
    wait_ready(svc, "heir")
    try:
        with Transport(svc.base_url, new["access_token"]) as token:
            with pytest.raises(PermissionDeniedError, match="earlier client 'heir'"):
                token.request("GET", f"/v1/operations/{record['operation_id']}")
            with pytest.raises(PermissionDeniedError, match="earlier client 'heir'"):
                token.request("POST", "/v1/operations/wait", json={"operation_ids": [record["operation_id"]]})
    finally:
        svc.transport.request("DELETE", "/v1/clients/heir")


def test_sampling_clients_a_token_makes_end_with_its_client_and_are_capped(svc):
    """The one sampler policy of both doors (service/samplers.py): a client's token keeps at most
    MAX_LIVE_SAMPLERS sampling clients live; a newer one closes the oldest, whose token then hears why."""
    from tensafe_trainer.service.samplers import MAX_LIVE_SAMPLERS

    parent = create(svc, "parent", "default")
    wait_ready(svc, "parent")
    with Transport(svc.base_url, parent["access_token"]) as token:
        saved = run(token, "parent", {"type": "save_state", "kind": "sampler"})["result"]["artifact_id"]
        oldest, *children = [token.request("POST", "/v1/sampling_clients", json={"artifact_id": saved})
                             for _ in range(MAX_LIVE_SAMPLERS + 1)]
    with Transport(svc.base_url, oldest["access_token"]) as token, \
            pytest.raises(AuthenticationError, match="its owner opened a newer one"):
        token.request("GET", f"/v1/clients/{oldest['client_id']}")
    assert svc.transport.request("GET", f"/v1/clients/{children[0]['client_id']}")["status"] != "TERMINATED"
    svc.transport.request("DELETE", "/v1/clients/parent")
    for child in children:
        for _ in range(1200):  # TERMINATED once its engine has stopped (it may still be loading: ~9 s of imports here)
            if svc.transport.request("GET", f"/v1/clients/{child['client_id']}")["status"] == "TERMINATED":
                break
            time.sleep(0.1)
        assert svc.transport.request("GET", f"/v1/clients/{child['client_id']}")["status"] == "TERMINATED"
        with Transport(svc.base_url, child["access_token"]) as token, pytest.raises(AuthenticationError):
            token.request("GET", f"/v1/clients/{child['client_id']}")


def test_a_trickled_body_is_cut_off_and_open_paths_take_no_body(svc, victim):
    from tensafe_trainer.api.gate import BODY_IDLE_S

    token = victim.transport.token
    head = (f"POST /v1/clients/{victim.id}/operations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{").encode()
    start = time.monotonic()
    answer = raw_http(svc.base_url, head, read_timeout=BODY_IDLE_S + 20)
    assert answer.startswith(b"HTTP/1.1 408") and b"RequestTimeoutError" in answer
    assert BODY_IDLE_S - 1 <= time.monotonic() - start <= BODY_IDLE_S + 10
    held = raw_http(svc.base_url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\nx")
    assert held.startswith(b"HTTP/1.1 413") and b"takes no request body" in held


def test_a_body_in_tiny_chunks_is_refused(svc, victim):
    token = victim.transport.token
    head = (f"POST /v1/clients/{victim.id}/operations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    start = time.monotonic()
    answer = raw_http(svc.base_url, head, [b"1\r\nx\r\n" * 100_000, b"0\r\n\r\n"], read_timeout=30)
    assert answer == b"" and time.monotonic() - start < 10  # the connection is closed, nothing ran
    assert victim.refresh().info.queue_depth == 0


def test_a_body_full_of_errors_gets_a_short_answer(svc, victim):
    body = b'{"request":{"type":"sample","prompt":[' + b",".join([b"-1"] * 100_000) + b"]}}"
    response = httpx.post(f"{svc.base_url}/v1/clients/{victim.id}/operations", content=body, timeout=60,
                          headers={"authorization": f"Bearer {svc.transport.token}",
                                   "content-type": "application/json"})
    assert response.status_code == 422 and len(response.content) < 20_000
    assert "more" in response.json()["error"]["message"] and response.json()["error"]["details"]["error_count"] > 10
    for bad in (b"{not json", b"\xff\xfe", b"[" * 5000):
        response = httpx.post(f"{svc.base_url}/v1/sampling_clients", content=bad,
                              headers={"authorization": f"Bearer {svc.transport.token}",
                                       "content-type": "application/json"})
        assert response.status_code == 400 and response.json()["error"]["type"] == "MalformedRequestError"


@pytest.mark.parametrize("request_body, message", [
    ({"type": "sample", "prompt": [1] * 60, "max_tokens": 4096}, "prompt + max_tokens has 4156 tokens"),
    ({"type": "optim_step", "apply_dp_noise": True}, "no dp_config enabled"),
    ({"type": "forward_backward_sampled"}, "needs dp_config.dataset_id"),
])
def test_more_of_what_the_engine_would_refuse_is_refused_at_the_door(svc, victim, request_body, message):
    response = httpx.post(f"{svc.base_url}/v1/clients/{victim.id}/operations", json={"request": request_body},
                          headers={"authorization": f"Bearer {svc.transport.token}"})
    assert response.status_code in (413, 422) and message in response.json()["error"]["message"], response.text


def test_a_request_head_is_counted_in_full(svc):
    answer = raw_http(svc.base_url, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 100_000
                      + b"\r\n\r\n")
    assert not answer.startswith(b"HTTP/1.1 200")


def test_work_for_a_terminated_client_through_other_endpoints_is_410(svc):
    create(svc, "gone", "default")
    wait_ready(svc, "gone")
    svc.transport.request("DELETE", "/v1/clients/gone")
    with pytest.raises(ClientTerminatedError):
        svc.transport.request("POST", "/v1/sampling_clients", json={"training_client_id": "gone"})


def test_the_refusal_budget_refills_at_its_rate_and_never_past_its_burst():
    from tensafe_trainer.api.gate import RefusalBudget

    now = [100.0]
    budget = RefusalBudget(burst=3, per_s=2.0, clock=lambda: now[0])

    class Client:  # a stand-in for a session: the budget only needs an object to key on
        pass

    noisy, quiet = Client(), Client()
    for _ in range(3):
        assert budget.wait_s(noisy) == 0
        budget.charge(noisy)
    assert budget.wait_s(noisy) == pytest.approx(0.5)  # empty: one refusal back after 1 / 2 s
    assert budget.wait_s(quiet) == 0  # one client's refusals are its own
    now[0] += 0.25
    assert budget.wait_s(noisy) == pytest.approx(0.25)
    now[0] += 0.25
    assert budget.wait_s(noisy) == 0
    budget.charge(noisy)
    now[0] += 3600  # an hour idle refills to the burst, not past it
    for _ in range(3):
        budget.charge(noisy)
    assert budget.wait_s(noisy) == pytest.approx(0.5)


def test_a_refusal_that_made_the_server_read_a_large_body_costs_more():
    """The door review's Tinker attack: 10 MB bodies naming no model, each read and then refused, at a pace under
    the refill rate, were never slowed. Now each MiB read costs one more refusal."""
    from tensafe_trainer.api.gate import REFUSAL_BYTES, RefusalBudget

    now = [100.0]
    budget = RefusalBudget(burst=16, per_s=2.0, clock=lambda: now[0])
    prober = object.__new__(type("Key", (), {}))
    budget.charge(prober, 10 * REFUSAL_BYTES)  # 11 of 16
    budget.charge(prober, REFUSAL_BYTES - 1)  # 1 more
    assert budget.wait_s(prober) == 0
    budget.charge(prober, 5 * REFUSAL_BYTES)
    assert budget.wait_s(prober) == pytest.approx((1 - (16 - 12 - 6)) / 2.0)


def test_a_token_refused_too_often_has_its_bodies_refused_unread_until_it_refills(svc, victim):
    from tensafe_trainer.api.gate import REFUSALS_BURST, REFUSALS_PER_S

    noisy = create(svc, "noisy", "loud-tenant")
    wait_ready(svc, "noisy")
    auth = {"authorization": f"Bearer {noisy['access_token']}", "content-type": "application/json"}
    path = f"{svc.base_url}/v1/clients/noisy/operations"
    try:
        with httpx.Client(timeout=30) as client:
            for _ in range(REFUSALS_BURST):
                assert client.post(path, content=b"{not json", headers=auth).status_code in (400, 422)
            refused = client.post(path, json={"request": {"type": "optim_step"}}, headers=auth)
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["type"] == "ResourceExhaustedError"
            assert "refused too often" in refused.json()["error"]["message"]
            assert int(refused.headers["retry-after"]) >= 1
            # Without a body it still gets through: it can collect what it queued.
            assert client.get(f"{svc.base_url}/v1/clients/noisy", headers=auth).status_code == 200
            # Other clients and the trainer's own token are not held to this client's refusals.
            victim_token = victim.transport.token
            assert client.post(f"{svc.base_url}/v1/clients/{victim.id}/operations", content=b"{not json",
                               headers={**auth, "authorization": f"Bearer {victim_token}"}).status_code in (400, 422)
            admin = {**auth, "authorization": f"Bearer {svc.transport.token}"}
            for _ in range(REFUSALS_BURST + 2):
                assert client.post(path, content=b"{not json", headers=admin).status_code in (400, 422)
            time.sleep(1.5 / REFUSALS_PER_S)
            record = client.post(path, json={"request": {"type": "optim_step"}}, headers=auth)
            assert record.status_code == 201, record.text
    finally:
        svc.transport.request("DELETE", "/v1/clients/noisy")


def test_a_refusal_that_leaves_a_body_unread_holds_its_sender_back(svc):
    """Answered at once, a sender of oversized bodies reconnects and pushes megabytes into the server's
    buffers dozens of times a second; held back, one connection gets about one refusal a second, and the
    server keeps answering everyone else meanwhile."""
    from tensafe_trainer.api.gate import REFUSAL_DELAY_S

    head = (b"POST /v1/training_clients HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (8 << 20))
    chunk = b"x" * (1 << 20)
    worst, done = 0.0, threading.Event()

    def probe():
        nonlocal worst
        with httpx.Client() as client:
            while not done.is_set():
                start = time.monotonic()
                assert client.get(f"{svc.base_url}/healthz", timeout=30).status_code == 200
                worst = max(worst, time.monotonic() - start)
                time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        start = time.monotonic()
        for _ in range(3):
            answer = raw_http(svc.base_url, head, [chunk] * 8, read_timeout=30)
            assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        spent = time.monotonic() - start
    finally:
        done.set()
        prober.join()
    assert spent >= 3 * REFUSAL_DELAY_S * 0.9, f"three refusals in {spent:.2f}s: not held back"
    assert worst < 1.0, f"/healthz took {worst:.2f}s meanwhile"


def test_at_most_64_refusals_are_held_back_at_once(svc):
    """Holding a refusal costs a connection: past MAX_DELAYED at once, the rest are answered at once."""
    from tensafe_trainer.api.gate import MAX_DELAYED, REFUSAL_DELAY_S

    parsed = urlparse(svc.base_url)
    head = b"POST /v1/training_clients HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    socks = [socket.create_connection((parsed.hostname, parsed.port), timeout=30) for _ in range(MAX_DELAYED + 8)]
    try:
        start = time.monotonic()
        for sock in socks:
            sock.sendall(head)
        waited, pending = [], set(socks)
        while pending:  # in the order the answers arrive
            readable, _, _ = select.select(list(pending), [], [], 30)
            assert readable, "no answer within 30 s"
            for sock in readable:
                assert sock.recv(12) == b"HTTP/1.1 401"
                waited.append(time.monotonic() - start)
                pending.discard(sock)
    finally:
        for sock in socks:
            sock.close()
    answered_at_once = [w for w in waited if w < REFUSAL_DELAY_S * 0.5]
    assert 8 <= len(answered_at_once) < MAX_DELAYED, waited
    assert len([w for w in waited if w >= REFUSAL_DELAY_S * 0.9]) >= MAX_DELAYED - 8
