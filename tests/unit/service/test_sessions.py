"""Server bookkeeping that must stay bounded over a long run."""

from __future__ import annotations

import asyncio

from tg_tinker.types import OperationStatus, OptimStepRequest


def make_ops(n):
    from tensafe_trainer.service.sessions import Operation, fingerprint

    loop = asyncio.new_event_loop()
    request = OptimStepRequest()
    return loop, [Operation("tc-1", request, fingerprint(bytes(i + 1), request), loop)
                  for i in range(n)]


def test_finished_operations_drop_their_request():
    loop, (op,) = make_ops(1)
    assert op.request is not None
    op.finish(OperationStatus.SUCCEEDED, result={"step": 1})
    assert op.request is None and op.type == "optim_step" and op.record().result == {"step": 1}
    loop.close()


def training_spec(client_id, config):
    """What the server passes an engine process for a training client."""
    from tensafe_trainer.engine.protocol import SlotSpec

    return SlotSpec.training(client_id, "default", config)


def test_the_engine_takes_the_next_operation_early_and_a_withdrawn_one_never_runs(tensafe_home):
    """The session hands the engine the next operation while one runs; withdrawing it still works until it
    starts, decided by the engine's start gate."""
    from tensafe_trainer.engine.process import slot_on_own_host

    from conftest import random_batch, tiny_config
    from tg_tinker.types import BatchData, ForwardBackwardRequest

    engine = slot_on_own_host(training_spec("tc-gate", tiny_config(max_seq_len=512)), tensafe_home)
    try:
        big = ForwardBackwardRequest(batch=BatchData(**random_batch(rows=8, width=512)))
        engine.hand_over(0, big)
        engine.hand_over(1, OptimStepRequest())
        assert engine.withdraw(1) is True  # handed over, not started: operation 0 is still running
        first, second = engine.reply("forward_backward"), engine.reply("optim_step")
        assert first.ok and not first.withdrawn and first.result["tokens_processed"] == 8 * 511
        assert second.withdrawn and second.result is None
        engine.hand_over(2, OptimStepRequest())
        third = engine.reply("optim_step")
        assert third.ok and third.result["step"] == 1  # the withdrawn step never ran
        assert engine.withdraw(2) is False  # it ran: too late
        assert first.finished_at <= third.finished_at
    finally:
        engine.close()


def test_a_failure_in_the_session_worker_puts_the_client_in_error_instead_of_hanging(tensafe_home, tmp_path):
    """Whatever goes wrong in the worker's own bookkeeping (here: the engine answering out of order), the
    client's operations fail with the reason and its status says ERROR; nothing waits for ever."""
    from tensafe_trainer.storage.audit import AuditTrail
    from tensafe_trainer.storage.audit_writer import AuditWriter
    from tensafe_trainer.engine.process import slot_on_own_host
    from tensafe_keys.store import LocalKeyProvider
    from tensafe_trainer.service.sessions import Session

    from conftest import tiny_config
    from tg_tinker.types import ClientStatus

    class OutOfOrderEngine:
        """A real slot whose replies come numbered one ahead."""

        def __init__(self, slot):
            self.slot = slot

        def __getattr__(self, name):
            return getattr(self.slot, name)

        def reply(self, what):
            reply = self.slot.reply(what)
            reply.seq += 1
            return reply

    spec = training_spec("tc-broken", tiny_config())
    loop = asyncio.new_event_loop()
    trail = AuditTrail(tmp_path / "audit", LocalKeyProvider(tmp_path / "keys"))
    writer = AuditWriter(trail)
    session = Session("tc-broken", "default", "training", lambda: OutOfOrderEngine(slot_on_own_host(spec, tensafe_home)), writer, loop,
                      max_pending=16, hash_key=lambda: bytes(32))
    try:
        ops = [session.submit(OptimStepRequest()) for _ in range(3)]
        assert session.join(timeout=120)  # the worker ended instead of hanging
        writer.flush()  # outcomes are published once their audit entries are written
        info = session.info()
        assert info.status is ClientStatus.ERROR and "answered operation 1, expected 0" in info.error
        assert [op.status for op in ops] == [OperationStatus.FAILED] * 3
        assert all("worker failed" in op.error.message for op in ops)
        assert not session.engine.host.process.is_alive()
        assert [e.success for e in trail.query("default", training_client_id="tc-broken", limit=10)] == [False] * 3
    finally:
        writer.close()
        loop.close()
