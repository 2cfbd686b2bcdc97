"""Faults: an engine process killed mid-operation, the trainer killed under a waiting future or while
writing a checkpoint, the SDK's connections cut mid-future."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
from conftest import random_batch, tiny_config
from process_helpers import engine_pids
from tg_tinker import ClientStatus, ServiceClient, TGTinkerError, TrainingClientError
from tg_tinker import ConnectionError as TrainerUnreachable
from tg_tinker.submission import OperationQueue
from tg_tinker.transport import Transport
from tg_tinker.types import BatchData, ForwardBackwardRequest

SLOW_MODEL = "tiny-random-llama:hidden=256,layers=4,vocab=512"


@pytest.fixture
def own_service(tmp_path):
    with ServiceClient(home=tmp_path) as service:
        yield service


def test_engine_killed_during_forward_backward_fails_the_future_and_keeps_checkpoints(own_service):
    config = tiny_config(model_ref=SLOW_MODEL, max_seq_len=512)
    tc = own_service.create_training_client(config)
    tc.forward_backward(random_batch()).result()
    tc.optim_step().result()
    checkpoint = tc.save_state()
    bystander = own_service.create_training_client(tiny_config())
    victim_pid = engine_pids(own_service.local_trainer.process.pid)[0]  # the oldest: tc's engine
    running = tc.forward_backward(random_batch(rows=8, width=512))
    queued = tc.optim_step()
    time.sleep(0.3)
    os.kill(victim_pid, signal.SIGKILL)
    with pytest.raises(TrainingClientError, match="engine process died"):
        running.result(timeout=60)
    with pytest.raises(TrainingClientError, match="lost its engine"):
        queued.result(timeout=60)
    assert tc.refresh().status is ClientStatus.ERROR
    with pytest.raises(TrainingClientError, match="is ERROR"):
        tc.forward_backward(random_batch()).result(timeout=60)
    # the server and the other client carry on, and the checkpoint resumes in a new client
    assert bystander.forward_backward(random_batch()).result().tokens_processed == 60
    resumed = own_service.create_training_client(config)
    own_service.grant_artifact(checkpoint.artifact_id, resumed.id)  # another client's checkpoint: granted
    assert resumed.load_state(checkpoint.artifact_id).step == 1
    resumed.forward_backward(random_batch()).result()
    assert resumed.optim_step().result().step == 2
    entries = own_service.get_audit_logs(training_client_id=tc.id)
    assert [(e.operation, e.success) for e in entries[-2:]] == [("forward_backward", False), ("optim_step", False)]
    assert "engine process died" in entries[-2].error and "lost its engine" in entries[-1].error


def test_trainer_killed_under_a_waiting_future_raises_instead_of_hanging(tmp_path):
    service = ServiceClient(home=tmp_path)
    try:
        tc = service.create_training_client(tiny_config(model_ref=SLOW_MODEL, max_seq_len=512))
        service.transport.retries, service.transport.backoff = 2, 0.05
        future = tc.forward_backward(random_batch(rows=8, width=512))
        service.local_trainer.process.kill()
        started = time.monotonic()
        with pytest.raises(TrainerUnreachable, match="unreachable"):
            future.result(timeout=120)
        assert time.monotonic() - started < 30
    finally:
        service.close()


def test_a_lost_client_is_replaced_and_resumes_from_its_latest_checkpoint(own_service):
    from conftest import dp_config

    config = tiny_config(dp_config=dp_config())
    fresh = own_service.create_training_client(config, client_id="resume-me", resume_from="latest")
    assert fresh.step == 0 and fresh.info.last_checkpoint is None  # nothing to resume on a first start
    for _ in range(2):
        fresh.forward_backward(random_batch())
        fresh.optim_step()
    epsilon = fresh.optim_step().result().dp_metrics.total_epsilon
    older = fresh.save_state()
    fresh.forward_backward(random_batch())
    fresh.optim_step().result()
    newest = fresh.save_state()
    os.kill(engine_pids(own_service.local_trainer.process.pid)[-1], signal.SIGKILL)
    with pytest.raises(TrainingClientError):
        fresh.forward_backward(random_batch()).result(timeout=60)
    replaced = own_service.create_training_client(config, client_id="resume-me", resume_from="latest")
    assert replaced.step == newest.step == 4 and replaced.info.last_checkpoint == newest.artifact_id
    assert replaced.total_epsilon > epsilon
    assert replaced.optim_step().result().step == 5
    with pytest.raises(TrainingClientError, match="replaced by a new instance"):
        fresh.optim_step()  # the dead instance's handle speaks for nobody, and says why
    entry = own_service.get_audit_logs(training_client_id="resume-me", operation="resume")[-1]
    assert entry.artifact_ids_consumed == [newest.artifact_id]
    with pytest.raises(TGTinkerError, match="already exists"):
        own_service.create_training_client(config, client_id="resume-me", resume_from=older.artifact_id)


def test_a_flood_of_submissions_meets_back_pressure_and_loses_nothing(tmp_path, monkeypatch):
    """The trainer refuses a fifth queued operation with ResourceExhaustedError (429); the SDK's sender
    waits for room instead, so a flood of calls all run, in order, none twice."""
    from tg_tinker import ResourceExhaustedError

    monkeypatch.setenv("TENSAFE_MAX_PENDING", "4")
    with ServiceClient(home=tmp_path) as service:
        tc = service.create_training_client(tiny_config(model_ref=SLOW_MODEL, max_seq_len=512))
        running = tc.forward_backward(random_batch(rows=8, width=512))
        tc.flush()  # on the trainer, and busy for a while
        transport, path = tc.transport, f"/v1/clients/{tc.id}/operations"
        for i in range(4):
            transport.request("POST", path, json={"request": {"type": "optim_step"}, "idempotency_key": f"k{i}"})
        with pytest.raises(ResourceExhaustedError) as err:
            transport.request("POST", path, json={"request": {"type": "optim_step"}, "idempotency_key": "k4"})
        assert err.value.details["max_pending"] == 4 and "already has 4 operations queued" in err.value.message
        flood = [tc.optim_step() for _ in range(20)]  # none raises: the sender waits while the queue is full
        assert [f.result(timeout=120).step for f in flood] == list(range(5, 25))  # all ran, in order
        assert running.result().tokens_processed > 0
        assert len(service.get_audit_logs(training_client_id=tc.id, operation="optim_step", limit=100)) == 24


def test_trainer_killed_while_writing_a_checkpoint_loses_nothing_saved(tmp_path):
    """SIGKILL the trainer while a checkpoint's temporary file is being written: the save's future fails
    (never reports success), the earlier checkpoint still loads, and no partial artifact is listed."""
    service = ServiceClient(home=tmp_path)
    try:
        config = tiny_config(model_ref="tiny-random-llama:hidden=512,layers=6,vocab=4096,intermediate=1024",
                             lora_config=None)  # full fine-tuning: a checkpoint of ~100 MB with Adam state
        tc = service.create_training_client(config, client_id="victim")
        tc.forward_backward(random_batch(vocab=4096))
        tc.optim_step().result()
        good = tc.save_state()
        folder = tmp_path / "artifacts" / "default"
        outcome: dict = {}
        saving = threading.Thread(target=lambda: outcome.update(result=_try(tc.save_state)))
        saving.start()
        deadline = time.monotonic() + 60
        while not list(folder.glob(".*.tmp")):
            assert time.monotonic() < deadline and saving.is_alive(), "the second save never started writing"
            time.sleep(0.001)
        server = service.local_trainer.process.pid
        for pid in [server] + engine_pids(server):  # the whole pod
            os.kill(pid, signal.SIGKILL)
        saving.join(120)
        assert isinstance(outcome["result"], TGTinkerError), outcome  # failed, not "saved"
        assert list(folder.glob(".*.tmp"))  # the interrupted write's leftovers
    finally:
        service.close()

    with ServiceClient(home=tmp_path) as again:
        listed = [a.artifact_id for a in again.list_artifacts()]
        assert listed == [good.artifact_id] and not list(folder.glob(".*.tmp"))  # cleaned at start
        resumed = again.create_training_client(config, client_id="victim", resume_from="latest")
        assert resumed.step == 1 and resumed.info.last_checkpoint == good.artifact_id


def _try(call):
    try:
        return call()
    except TGTinkerError as error:
        return error


def test_sdk_losing_its_connection_mid_future_still_gets_the_one_result(own_service):
    """Connections cut while a future waits: the SDK reconnects, the operation ran once, the result arrives."""
    target = own_service.base_url.rsplit(":", 1)
    target_host, target_port = target[0].split("//")[1], int(target[1])
    listener = socket.create_server(("127.0.0.1", 0))
    live: list[socket.socket] = []

    def pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def accept():
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((target_host, target_port))
            live.extend([client, upstream])
            threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    proxy = f"http://127.0.0.1:{listener.getsockname()[1]}"
    tc = own_service.create_training_client(tiny_config(model_ref=SLOW_MODEL, max_seq_len=512))
    through_proxy = Transport(proxy, tc.info.access_token)
    queue = OperationQueue(through_proxy, tc.id)
    future = queue.submit(ForwardBackwardRequest(batch=BatchData.parse(random_batch(rows=8, width=512))))
    time.sleep(0.3)
    for sock in list(live):  # the network drops every open connection mid-wait
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    result = future.result(timeout=120)
    assert result.loss > 0
    entries = own_service.get_audit_logs(training_client_id=tc.id, operation="forward_backward")
    assert len(entries) == 1  # it ran once
    listener.close()
    through_proxy.close()
