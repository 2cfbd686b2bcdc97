"""Which host process a client's slot goes on (service/hosts.py), and a host running its slots' operations in
shared passes (engine/process.py)."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import random_batch, tiny_config
import dataclasses

from tg_tinker.types import (BatchData, ComputeLogprobsRequest, ForwardBackwardRequest, ForwardRequest,
                             OptimStepRequest, SampleRequest, SaveStateRequest)

from tensafe_trainer.engine.process import busy_counter
from tensafe_trainer.engine.protocol import SlotSpec
from tensafe_trainer.service.hosts import HostPool


def _spec(client_id: str, tenant: str = "default", **config) -> SlotSpec:
    return SlotSpec.training(client_id, tenant, tiny_config(**config))


@pytest.fixture
def pool(tensafe_home):
    """A pool of hosts of 4 slots, per tenant, ending 0.2 s after their last slot leaves."""
    hosts = HostPool(tensafe_home, busy_counter(), capacity=4, idle_s=0.2)
    yield hosts
    hosts.close()


def _ended(host, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while host.process.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not host.process.is_alive()


def test_lora_clients_of_one_tenant_and_model_share_a_host_up_to_its_capacity(tensafe_home):
    pool = HostPool(tensafe_home, busy_counter(), capacity=2, idle_s=0.2)
    try:
        first, second = pool.attach(_spec("a")), pool.attach(_spec("b", seed=0, batch_size=2))
        other_tenant = pool.attach(_spec("c", tenant="other"))
        third = pool.attach(_spec("d"))  # the first host is full
        full = pool.attach(_spec("e", lora_config=None))
        assert first.host is second.host
        assert len({id(s.host) for s in (first, other_tenant, third, full)}) == 4
        shared = first.host
        first.close()
        assert shared.alive and second.alive  # the other slot goes on
        second.close()
        assert _ended(shared)  # idle past idle_s, with no slot: it ends
        full.close()
        assert _ended(full.host)  # a host of its own ends with its slot
    finally:
        pool.close()


def test_a_shared_host_outlives_the_thread_that_started_it(tensafe_home):
    # An engine dies with the thread that started it (cli/hardening.py): a session worker ends with its client.
    pool = HostPool(tensafe_home, busy_counter(), capacity=2, idle_s=0.2)
    try:
        started = []
        worker = threading.Thread(target=lambda: started.append(pool.attach(_spec("first"))))
        worker.start()
        worker.join()
        second = pool.attach(_spec("second"))
        assert second.host is started[0].host
        time.sleep(0.5)
        second.hand_over(0, ForwardRequest(batch=BatchData(**random_batch())))
        assert second.reply("forward").ok and second.host.alive
    finally:
        pool.close()


def test_on_a_host_tenants_share_each_tenant_gets_a_turn_as_often_whatever_its_number_of_clients(tensafe_home):
    pool = HostPool(tensafe_home, busy_counter(), capacity=5, idle_s=0.2, share_across_tenants=True)
    slow, *many = (pool.attach(_spec(name, tenant="many", max_seq_len=512)) for name in ("s", "a1", "a2", "a3"))
    one = pool.attach(_spec("b", tenant="one"))
    try:
        slow.hand_over(0, ForwardRequest(batch=BatchData(**random_batch(rows=8, width=512))))  # all queue behind it
        batch = BatchData(**random_batch())
        for slot in [*many, one]:
            for seq in range(2):
                slot.hand_over(seq, ForwardRequest(batch=batch))
        assert slow.reply("forward").ok
        finished = sorted((slot.reply("forward").finished_at, slot.client_id) for slot in [*many, one] for _ in "12")
        order = [client for _, client in finished]
        assert order.index("b") < order.index("a1") and order[:4].count("b") == 2, order  # b, a1, b, a2, ...
    finally:
        pool.close()


def test_tenants_share_a_host_only_when_the_trainer_allows_it(tensafe_home):
    pool = HostPool(tensafe_home, busy_counter(), capacity=4, idle_s=0.2, share_across_tenants=True)
    try:
        assert pool.attach(_spec("a", tenant="one")).host is pool.attach(_spec("b", tenant="two")).host
    finally:
        pool.close()


def test_forward_backwards_ready_at_once_run_in_one_pass_and_a_withdrawn_one_does_not(pool):
    slow, first, second, third = (pool.attach(_spec(name, max_seq_len=512)) for name in "swxy")
    batch = BatchData(**random_batch(rows=4, width=16))
    slow.hand_over(0, ForwardRequest(batch=BatchData(**random_batch(rows=8, width=512))))  # keeps the host busy
    for slot in (first, second, third):
        slot.hand_over(0, ForwardBackwardRequest(batch=batch))
    assert third.withdraw(0)
    assert slow.reply("forward").ok
    one, two, withdrawn = first.reply("forward_backward"), second.reply("forward_backward"), third.reply("")
    assert one.ok and two.ok and one.shared_pass and two.shared_pass
    assert one.result == two.result  # same base, same seed, same batch: the same numbers
    assert withdrawn.withdrawn
    for slot in (first, second):
        slot.hand_over(1, OptimStepRequest())
        assert slot.reply("optim_step").result["step"] == 1
    third.hand_over(1, OptimStepRequest())
    assert third.reply("optim_step").result["step"] == 1  # its numbering goes on past the withdrawn one


def test_a_sampler_of_a_lora_clients_weights_joins_that_clients_host_and_samples_as_it_would_alone(pool):
    trainer = pool.attach(_spec("trained"))
    trainer.hand_over(0, ForwardBackwardRequest(batch=BatchData(**random_batch())))
    trainer.hand_over(1, OptimStepRequest())
    trainer.hand_over(2, SaveStateRequest(kind="sampler"))
    assert trainer.reply("forward_backward").ok and trainer.reply("optim_step").ok
    artifact = trainer.reply("save_state").result["artifact_id"]
    trainer.hand_over(3, ForwardBackwardRequest(batch=BatchData(**random_batch(seed=1))))
    trainer.hand_over(4, OptimStepRequest(adam={"learning_rate": 0.5}))  # the trainer's adapter moves on, far
    assert trainer.reply("forward_backward").ok and trainer.reply("optim_step").ok
    spec = SlotSpec.sampling("sampler", "default", artifact_id=artifact)
    shared = pool.attach(dataclasses.replace(spec, saved_by=tiny_config()))
    alone = pool.attach(dataclasses.replace(spec, client_id="alone"))  # its saver unknown: a host of its own
    assert shared.host is trainer.host and alone.host is not trainer.host
    tokens = [5, 9, 200, 17, 3, 64, 81, 2]
    scores, samples = [], []
    for slot, seq in ((shared, 0), (alone, 0), (trainer, 5)):
        slot.hand_over(seq, ComputeLogprobsRequest(tokens=tokens))
        scores.append(slot.reply("compute_logprobs").result["logprobs"][1:])
    for slot in (shared, alone):
        slot.hand_over(1, SampleRequest(prompt=[1, 2, 3], max_tokens=8, temperature=1.0, seed=5))
        samples.append(slot.reply("sample").result["sequences"][0])
    assert scores[0] == pytest.approx(scores[1], rel=1e-6)  # its own weights (two processes: rounding may differ)
    assert samples[0]["tokens"] == samples[1]["tokens"]
    assert samples[0]["logprobs"] == pytest.approx(samples[1]["logprobs"], rel=1e-6)
    assert scores[0] != pytest.approx(scores[2], rel=1e-3)  # not the trainer's, which moved on


def test_a_sampler_sent_to_a_host_its_weights_do_not_fit_gets_a_host_of_its_own(pool):
    # The pool places a sampler by the config of the live client under its saver's id; that id may have been taken
    # by a client of another model since. Another model must not load inside that client's host.
    saver = pool.attach(_spec("saver"))
    saver.hand_over(0, SaveStateRequest(kind="sampler"))
    artifact = saver.reply("save_state").result["artifact_id"]
    other = pool.attach(_spec("replacement", seed=7))  # a tiny model of another seed: another model
    spec = SlotSpec.sampling("sampler", "default", artifact_id=artifact)
    sampler = pool.attach(dataclasses.replace(spec, saved_by=tiny_config(seed=7)))
    assert sampler.host is not other.host and sampler.host is not saver.host
    sampler.hand_over(0, SampleRequest(prompt=[1, 2], max_tokens=2, seed=1))
    assert sampler.reply("sample").ok
    assert other.host.attached == 1  # the refused start left nothing behind there
