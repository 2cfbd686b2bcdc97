"""The one future store of both doors (service/futures.py): bounds, the idempotency rule, the long-poll."""

from __future__ import annotations

import asyncio

import pytest

from tg_tinker.errors import ValidationError
from tg_tinker.types import OperationStatus, OptimStepRequest

from tensafe_trainer.service.futures import FutureStore, TaskFuture, long_poll
from tensafe_trainer.service.sessions import Operation


class Owner:
    """An owner is any object, told apart by identity (a client's Session, a Tinker model)."""

    def __init__(self, tenant_id: str = "t"):
        self.tenant_id = tenant_id


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def operation(loop, name: str = "tc-1") -> Operation:
    return Operation(name, OptimStepRequest(), "fp", loop)


def finish(op: Operation) -> None:
    op.finish(OperationStatus.SUCCEEDED, result={})


def test_only_the_oldest_finished_futures_are_forgotten(loop):
    store, owner = FutureStore(capacity=3), Owner()
    ops = [operation(loop) for _ in range(5)]
    for op in ops[:4]:
        store.add(op, owner)
    assert len(store) == 4  # the oldest is still pending: nothing may be forgotten
    finish(ops[0])
    finish(ops[1])
    store.add(ops[4], owner)
    assert len(store) == 3 and store.get(ops[4].id)[0] is ops[4]
    for gone in ops[:2]:
        with pytest.raises(KeyError):
            store.get(gone.id)


def test_one_owners_flood_forgets_only_its_own_and_the_ttl_the_rest(loop):
    store = FutureStore(capacity=100, per_owner=3, ttl_s=60)
    noisy, quiet = Owner(), Owner()
    kept = operation(loop, "quiet")
    store.add(kept, quiet)
    finish(kept)
    flood = [operation(loop, "noisy") for _ in range(6)]
    for op in flood:
        store.add(op, noisy)
        finish(op)
    assert [op.id for op in flood if _kept(store, op)] == [op.id for op in flood[3:]]  # its own oldest went
    assert _kept(store, kept)
    kept.finished_at -= 120  # past the TTL: forgotten at the next add
    store.add(operation(loop, "noisy"), noisy)
    assert not _kept(store, kept)


def _kept(store: FutureStore, op) -> bool:
    try:
        return store.get(op.id)[0] is op
    except KeyError:
        return False


def test_a_key_names_one_request_and_runs_once_for_its_owners_life(loop):
    store, owner, other = FutureStore(per_owner=1), Owner(), Owner()
    first = operation(loop)
    assert store.claim(owner, "k", b"body") is None
    store.add(first, owner, "k", b"body")
    assert store.claim(owner, "k", b"body") is first  # the retry gets the first future
    assert store.claim(other, "k", b"body") is None  # keys are per owner
    with pytest.raises(ValidationError, match="reused for a different request"):
        store.claim(owner, "k", b"another body")
    finish(first)
    store.add(operation(loop), owner)  # per_owner=1: the keyed future is forgotten
    with pytest.raises(ValidationError, match="already ran, and its result is no longer kept"):
        store.claim(owner, "k", b"body")  # a late retry: refused, never run a second time
    store.release(owner)  # the owner ended: nothing of its keys is kept
    assert store.claim(owner, "k", b"body") is None


def test_the_long_poll_waits_for_either_kind_of_future_and_never_cancels_it(loop):
    async def scenario():
        op = operation(loop)
        assert await long_poll(op, 0.01) is False and not op.finished
        asyncio.get_running_loop().call_later(0.02, finish, op)
        assert await long_poll(op, 5) is True

        release = asyncio.Event()

        async def answer():
            await release.wait()
            raise ValidationError("refused")

        task_future = TaskFuture(answer())
        assert await long_poll(task_future, 0.01) is False and not task_future.task.cancelled()
        release.set()
        assert await long_poll(task_future, 5) is True  # a failure is an answer, not the poll's exception
        assert isinstance(task_future.task.exception(), ValidationError) and task_future.finished_at is not None

    loop.run_until_complete(scenario())


def test_one_tenants_many_owners_do_not_push_out_another_tenants_futures(loop):
    """A tenant has many owners (sessions, models, samplers): bounded per tenant too, its flood forgets its own
    futures, not another tenant's (the attacker review of #27 flooded 50 owners x 2,000 against the global cap)."""
    store = FutureStore(capacity=20, per_tenant=10, per_owner=4)
    victim = operation(loop, "victim")
    store.add(victim, Owner("quiet"))
    finish(victim)
    for owner in [Owner("noisy") for _ in range(8)]:
        for _ in range(4):
            op = operation(loop, "noisy")
            store.add(op, owner)
            finish(op)
    assert _kept(store, victim) and len(store) == 11


def test_a_pending_future_does_not_hold_back_the_finished_ones_behind_it(loop):
    store, owner = FutureStore(capacity=100, per_owner=3, ttl_s=0.0), Owner()
    pending = operation(loop)
    store.add(pending, owner)
    done = [operation(loop) for _ in range(5)]
    for op in done:
        store.add(op, owner)
        finish(op)
    store.add(operation(loop), owner)
    assert _kept(store, pending) and not any(_kept(store, op) for op in done)


def test_a_future_done_before_its_callback_ran_is_kept_and_forgotten_like_any_other(loop):
    """The load benchmark found it: a Tinker answer whose task had finished, its done callback not yet run, met
    the store's scan (finished, with no finish time) and every request adding a future then answered 500."""
    async def scenario():
        store = FutureStore(ttl_s=0.0)
        owner = Owner()
        done = asyncio.get_running_loop().create_future()
        done.set_result({"ok": True})
        early = TaskFuture(done)  # its task is done; its done callback is only scheduled
        assert early.finished and early.finished_at is not None
        store.add(early, owner)
        later = TaskFuture(asyncio.sleep(0))
        store.add(later, owner)  # the scan meets ``early``: finished, past its TTL of 0 s
        with pytest.raises(KeyError):
            store.get(early.id)
        assert store.get(later.id)[0] is later
        await later.task

    loop.run_until_complete(scenario())
