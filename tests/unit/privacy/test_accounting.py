"""Every epsilon the trainer reports is an upper bound: each figure held against Google's dp-accounting (PLD, an
independent implementation) on the same history, and the checkpoint-vs-ledger check that keeps it from being
rolled back."""

from __future__ import annotations

import json
import math

import pytest

from tg_tinker import DPConfig, TrainingClientError, ValidationError
from tg_tinker.types import (
    BatchData,
    ClientInfo,
    DPMetrics,
    ForwardBackwardRequest,
    OptimStepRequest,
    SaveStateRequest,
)

from conftest import dp_config, tiny_config
from accounting_helpers import pld_epsilon
from engine_helpers import fresh_ledger, make_engine, padded_batch, sequences


@pytest.mark.parametrize("history", [
    ((0.6, 0.01, 50),),  # the audit's example, where GDP said 1.03
    ((1.0, 1.0, 3), (2.0, 0.1, 20)),  # two clients, two mechanisms, one ledger
    ((1.0, 0.001, 10_000),),
], ids=["audit", "mixed", "long"])
def test_both_accountants_we_run_are_at_or_above_googles_pld(history):
    from tensafe_trainer.privacy.dp import epsilon_of

    reference = pld_epsilon(history)
    for mechanism in ("rdp", "prv"):
        assert epsilon_of(mechanism, 1e-5, history) >= reference, mechanism


def test_an_engines_metrics_and_claims_are_at_or_above_pld_for_client_batches_and_poisson_draws():
    from engine_helpers import sampled_engine

    asserted = make_engine(dp_config=dp_config(noise_multiplier=1.1), batch_size=4)  # dataset_size: a claim
    for _ in range(3):
        asserted.forward_backward(padded_batch(sequences(4, seed=1)))
        metrics = asserted.optim_step().dp_metrics
    bound = pld_epsilon(((1.1, 1.0, 3),))  # client batches: q = 1 whatever the client asserts
    claims = asserted.privacy_claims()
    assert metrics.total_epsilon >= bound and claims["total_epsilon"] >= bound and metrics.epsilon_q1 >= bound
    assert claims["epsilon_asserted"] < bound  # the claim is labelled as one, never the headline
    assert "client's claim" in claims["epsilon_asserted_is"]

    poisson = sampled_engine(n=20, q=0.25)
    for _ in range(3):
        poisson.forward_backward_sampled()
        metrics = poisson.optim_step().dp_metrics
    assert metrics.total_epsilon >= pld_epsilon(((1.0, 0.25, 3),))
    assert poisson.privacy_claims()["total_epsilon"] == pytest.approx(metrics.total_epsilon)


def test_an_infinite_epsilon_is_said_as_such_never_as_null():
    engine = make_engine(dp_config=dp_config(noise_multiplier=1e-200), batch_size=2)
    engine.forward_backward(padded_batch(sequences(2, seed=3)))
    metrics = engine.optim_step().dp_metrics
    wire = metrics.model_dump(mode="json")  # what the engine process sends, and the server then as JSON
    assert wire["total_epsilon"] == "Infinity" and json.loads(metrics.model_dump_json())["epsilon_q1"] == "Infinity"
    assert DPMetrics.model_validate(wire).total_epsilon == math.inf  # the SDK reads it back as a float
    assert ClientInfo(client_id="c", kind="training", status="READY", step=1, tenant_id="t",
                      total_epsilon=math.inf).model_dump(mode="json")["total_epsilon"] == "Infinity"
    claims = engine.privacy_claims()
    assert claims["dp"] is True and claims["total_epsilon"] == "Infinity"


# --- the checkpoint against the ledger: a rollback refused, an intact ledger resumed -----------------------------


def alternating_runtimes(tmp_path):
    """Two clients on one dataset at different noise, stepping in turn: the ledger lists (1.0, 1.0) in several
    entries, (1.0, 1.0, 2), (2.0, 1.0, 1), (1.0, 1.0, 2), ..."""
    from tensafe_trainer.storage.artifacts import ArtifactStore
    from tensafe_trainer.engine.operations import Runtime
    from tensafe_keys.store import LocalKeyProvider

    store = ArtifactStore(tmp_path / "artifacts", LocalKeyProvider(tmp_path / "keys"))

    def runtime(client_id: str, sigma: float):
        config = tiny_config(batch_size=2, dp_config=DPConfig(noise_multiplier=sigma, dataset_id="shared"))
        return Runtime.for_training(client_id, "default", config, store, tmp_path / "privacy")

    return runtime


def step(runtime, seed: int) -> None:
    runtime.execute(ForwardBackwardRequest(batch=BatchData(**padded_batch(sequences(2, seed=seed)).model_dump())))
    runtime.execute(OptimStepRequest())


def forget_ledger_heads(tmp_path) -> None:
    for head in (tmp_path / "keys").rglob("*.head"):
        head.unlink()


def test_an_intact_ledger_with_repeated_entries_resumes_and_a_rolled_back_one_is_refused(tmp_path):
    runtime = alternating_runtimes(tmp_path)
    main, other = runtime("main", 1.0), runtime("other", 2.0)
    for round_ in range(3):
        step(main, seed=round_)
        step(main, seed=10 + round_)
        step(other, seed=20 + round_)
    main.execute(SaveStateRequest(kind="checkpoint"))  # trained with (1.0, 1.0, 2) three times
    step(main, seed=30)  # the ledger's last (1.0, 1.0) entry now holds 1 step
    ledger = main.engine.accountant.ledger
    history = ledger.history()
    assert len(history) == 7 and history[-1] == (1.0, 1.0, 1)

    resumed = runtime("main", 1.0)
    resumed.resume("latest")  # intact: 7 steps at (1.0, 1.0) in the ledger, 6 in the checkpoint
    assert resumed.engine.step == 6

    lines = ledger.path.read_bytes().splitlines(keepends=True)
    ledger.path.write_bytes(b"".join(lines[:-4]))  # a backup from before the last rounds: fewer steps
    with pytest.raises(TrainingClientError, match="rolled back"):  # the key store's head of the ledger
        runtime("main", 1.0).resume("latest")
    forget_ledger_heads(tmp_path)  # an insider who holds the key store too: the checkpoint's record still catches it
    with pytest.raises(ValidationError, match="rolled back"):
        runtime("main", 1.0).resume("latest")


def test_a_meaningless_delta_is_refused_and_an_epsilon_is_never_negative():
    from tensafe_trainer.privacy.dp import epsilon_of

    with pytest.raises(ValidationError, match="target_delta"):
        DPConfig(noise_multiplier=1.0, target_delta=0.5)  # the conversion gave -2.28 there (attacker review)
    for mechanism in ("rdp", "prv"):  # opacus' PRV alone says -0.05 here
        assert epsilon_of(mechanism, 0.1, ((10.0, 1.0, 3),)) >= 0.0


def test_a_ledger_emptied_and_refilled_by_other_steps_does_not_cover_an_earlier_checkpoint(tmp_path):
    """The attacker review's case: counts alone came back (10 steps by another client after the ledger was emptied),
    so a checkpoint trained on 10 steps loaded and claimed 19.05 where the data had spent 30 steps (39.83)."""
    runtime = alternating_runtimes(tmp_path)
    first = runtime("first", 1.0)
    for seed in range(3):
        step(first, seed)
    first.execute(SaveStateRequest(kind="checkpoint"))
    first.engine.accountant.ledger.path.write_bytes(b"")  # an insider empties the ledger
    with pytest.raises(TrainingClientError, match="rolled back"):  # the key store's head of the ledger
        step(runtime("second", 1.0), 10)
    forget_ledger_heads(tmp_path)  # ... and, holding the key store too, the ledger heads in it
    second = runtime("second", 1.0)
    for seed in range(3):  # the same counts again, other steps
        step(second, 10 + seed)
    with pytest.raises(ValidationError, match="no longer begins with"):
        runtime("first", 1.0).resume("latest")


# --- the ledger's entries: each checked, one unit per ledger (second attacker review) -----------------------------


@pytest.mark.parametrize("line", [
    b'{"noise_multiplier": 0.3, "sample_rate": 1.0, "steps": -1000}',  # set every epsilon to 0 before this check
    b'{"noise_multiplier": 1.0, "sample_rate": NaN, "steps": 1}',  # hung the RDP accountant
    b'{"noise_multiplier": 1.0, "sample_rate": 1.0, "steps": 1.5}',
    b'{"noise_multiplier": 1.0, "sample_rate": 1.0, "steps": 1, "epsilon_budget": 100}',
    b'{"noise_multiplier": 1.0, "sample_rate": 1.0, "steps": 1, "group_size": 4}',  # another unit
], ids=["negative-steps", "nan-rate", "fractional", "mixed-kinds", "mixed-units"])
def test_an_edited_ledger_is_refused_whole_never_read_around(line):
    from tg_tinker import TrainingClientError

    engine = make_engine(dp_config=dp_config(dataset_id="edited"), batch_size=2)
    engine.forward_backward(padded_batch(sequences(2, seed=1)))
    spent = engine.optim_step().dp_metrics.total_epsilon
    ledger = engine.accountant.ledger
    with open(ledger.path, "ab") as f:
        f.write(line + b"\n")
    reopened = type(ledger)(ledger.path.parent.parent, "default", "edited", keys=ledger.keys)
    with pytest.raises(TrainingClientError, match="invalid entry at line 2"):
        reopened.history()
    with pytest.raises(TrainingClientError, match="invalid entry at line 2"):  # no step is taken on it
        engine.forward_backward(padded_batch(sequences(2, seed=2)))
        engine.optim_step()
    assert spent > 0 and engine.step == 1


def test_a_ledger_counts_in_one_unit_and_a_client_of_another_is_refused():
    from engine_helpers import fresh_ledger_at

    ledger = fresh_ledger("units")
    rows = make_engine(dp_config=dp_config(dataset_id="units"), batch_size=4, ledger=ledger)
    rows.forward_backward(padded_batch(sequences(4, seed=1)))
    rows.optim_step()
    groups = make_engine(dp_config=dp_config(dataset_id="units", group_size=4), batch_size=4,
                         ledger=fresh_ledger_at(ledger))
    groups.forward_backward(padded_batch(sequences(4, seed=2)))
    with pytest.raises(ValidationError, match="units of 1 row"):  # row-clipped steps are not group steps
        groups.optim_step()
    assert ledger.history() == ((1.0, 1.0, 1),)


def test_a_checkpoint_that_names_no_ledger_head_does_not_load_over_a_file_ledger():
    from tensafe_trainer.engine.adapter import deserialize_state, serialize_state

    engine = make_engine(dp_config=dp_config(dataset_id="headless"), batch_size=2)
    engine.forward_backward(padded_batch(sequences(2, seed=1)))
    engine.optim_step()
    state = deserialize_state(serialize_state(engine.state_dict(include_optimizer=True)))
    state["accountant"].pop("ledger_head")  # as saved before ledgers were chained, or over a PrivacyBudget
    with pytest.raises(ValidationError, match="names no head"):
        engine.load_state_dict(state)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_a_noise_multiplier_below_the_accounted_floor_is_infinite_epsilon_at_once(mechanism):
    # Left to the accountants, 1e-160 at q = 0.001 never ended (a DP client's step stalled its whole model host).
    from tensafe_trainer.privacy.dp import MIN_ACCOUNTED_SIGMA, epsilon_of

    for sigma in (1e-160, 0.02, MIN_ACCOUNTED_SIGMA / 2):
        assert epsilon_of(mechanism, 1e-5, ((sigma, 1e-3, 3),)) == math.inf
    assert epsilon_of(mechanism, 1e-5, ((1.0, 1e-3, 3),)) < 1.0
