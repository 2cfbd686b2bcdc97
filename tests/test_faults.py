"""Faults: an engine process killed mid-operation, the trainer killed under a waiting future."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tg_tinker import ClientStatus, ServiceClient, TGTinkerError, TrainingClientError
from tg_tinker import ConnectionError as TrainerUnreachable

from conftest import random_batch, tiny_config

SLOW_MODEL = "tiny-random-llama:hidden=256,layers=4,vocab=512"


def engine_pids(server_pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(server_pid), "--sort=start_time"],
                         capture_output=True, text=True).stdout
    pids = [int(p) for p in out.split()]
    return [p for p in pids if "multiprocessing" in open(f"/proc/{p}/cmdline").read().replace("\0", " ")
            and "resource_tracker" not in open(f"/proc/{p}/cmdline").read()]


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
    victim_pid = engine_pids(own_service._local.process.pid)[0]  # the oldest: tc's engine
    running = tc.forward_backward(random_batch(rows=8, width=512))
    queued = tc.optim_step()
    time.sleep(0.3)
    os.kill(victim_pid, signal.SIGKILL)
    with pytest.raises(TrainingClientError, match="engine process died"):
        running.result(timeout=60)
    with pytest.raises(TrainingClientError, match="lost its engine"):
        queued.result(timeout=60)
    assert tc.refresh().status is ClientStatus.ERROR
    with pytest.raises(TrainingClientError):
        tc.forward_backward(random_batch())
    # the server and the other client carry on, and the checkpoint resumes in a new client
    assert bystander.forward_backward(random_batch()).result().tokens_processed == 60
    resumed = own_service.create_training_client(config)
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
        service._local.process.kill()
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
    os.kill(engine_pids(own_service._local.process.pid)[-1], signal.SIGKILL)
    with pytest.raises(TrainingClientError):
        fresh.forward_backward(random_batch()).result(timeout=60)
    replaced = own_service.create_training_client(config, client_id="resume-me", resume_from="latest")
    assert replaced.step == newest.step == 4 and replaced.info.last_checkpoint == newest.artifact_id
    assert replaced.total_epsilon > epsilon
    assert replaced.optim_step().result().step == 5
    entry = own_service.get_audit_logs(training_client_id="resume-me", operation="resume")[-1]
    assert entry.artifact_ids_consumed == [newest.artifact_id]
    with pytest.raises(TGTinkerError, match="already exists"):
        own_service.create_training_client(config, client_id="resume-me", resume_from=older.artifact_id)


def test_a_flood_of_submissions_meets_back_pressure_and_loses_nothing(tmp_path, monkeypatch):
    from tg_tinker import ResourceExhaustedError

    monkeypatch.setenv("TENSAFE_MAX_PENDING", "4")
    with ServiceClient(home=tmp_path) as service:
        tc = service.create_training_client(tiny_config(model_ref=SLOW_MODEL, max_seq_len=512))
        accepted = [tc.forward_backward(random_batch(rows=8, width=512))]
        with pytest.raises(ResourceExhaustedError) as err:
            for _ in range(20):
                accepted.append(tc.optim_step())
        assert err.value.details["max_pending"] == 4 and "already has 4 operations queued" in err.value.message
        assert 4 <= len(accepted) <= 6
        steps = [f.result(timeout=120).step for f in accepted[1:]]
        assert steps == list(range(1, len(steps) + 1))  # everything accepted ran, in order
        assert tc.optim_step().result().step == len(steps) + 1  # and the queue takes work again
