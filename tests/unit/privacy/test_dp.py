"""DP-SGD checked against independent computations: a per-example loop, opacus' accountants, statistics."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import create_accountant

from tg_tinker import DPBudgetExceededError, DPConfig, ValidationError

from conftest import dp_config
from engine_helpers import (
    assert_close,
    clipped_mean,
    fresh_ledger_at,
    make_engine,
    norm,
    padded_batch,
    per_example_gradients,
    sequences,
    snapshot,
    update,
)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_noise_free_update_is_mean_of_clipped_per_example_gradients(lora, side, no_noise):
    overrides = {} if lora else {"lora_config": None}
    rows = sequences(6, seed=3)
    reference = per_example_gradients(make_engine(**overrides), rows)
    norms = [norm(g) for g in reference]
    bound = sorted(norms)[2] * 1.01  # some examples above the bound, some below
    engine = make_engine(dp_config=dp_config(max_grad_norm=bound), batch_size=6, **overrides)
    expected = clipped_mean(reference, bound)
    before = snapshot(engine)
    engine.forward_backward(padded_batch(rows, side=side))
    result = engine.optim_step()
    assert_close(update(engine, before), expected, rtol=1e-8, atol=1e-12)
    metrics = result.dp_metrics
    assert metrics.num_clipped == sum(n > bound for n in norms) == 3
    assert metrics.num_examples == 6
    assert metrics.grad_norm_before_clip == pytest.approx(sum(norms) / 6, rel=1e-8)
    clipped = [n * min(1.0, bound / (n + 1e-6)) for n in norms]
    assert metrics.grad_norm_after_clip == pytest.approx(sum(clipped) / 6, rel=1e-8)


def test_accumulated_micro_batches_equal_one_batch_of_their_union(no_noise):
    rows = sequences(6, seed=5)
    config = dp_config(max_grad_norm=0.1)
    split = make_engine(dp_config=config, gradient_accumulation_steps=3, batch_size=2)
    union = make_engine(dp_config=config, batch_size=6)
    before = snapshot(split)
    for part in (rows[0:2], rows[2:4], rows[4:6]):
        split.forward_backward(padded_batch(part))
    split.optim_step()
    union.forward_backward(padded_batch(rows))
    union.optim_step()
    assert_close(update(split, before), update(union, before), rtol=1e-9)


def test_noise_is_added_once_per_step_with_the_configured_std(monkeypatch):
    from tensafe_trainer.privacy import dp as privacy
    sigma, bound = 2.0, 0.5
    rows = sequences(6, seed=7)
    engines = {}
    for name in ("quiet", "noisy"):
        engines[name] = make_engine(dp_config=dp_config(noise_multiplier=sigma, max_grad_norm=bound),
                                    gradient_accumulation_steps=3, batch_size=2)
    quiet, noisy = engines["quiet"], engines["noisy"]
    before = snapshot(quiet)
    real_noise = privacy.add_secure_normal_
    for engine in (quiet, noisy):
        if engine is quiet:
            monkeypatch.setattr(privacy, "add_secure_normal_", lambda target, std, stream=None: None)
        else:
            monkeypatch.setattr(privacy, "add_secure_normal_", real_noise)
        for part in (rows[0:2], rows[2:4], rows[4:6]):
            engine.forward_backward(padded_batch(part))
        engine.optim_step()
    # update = (sum of clipped + noise) / n, so n * (noisy - quiet) is the noise itself
    noise = torch.cat([(update(noisy, before)[k] - update(quiet, before)[k]).flatten() * 6 for k in before])
    assert noise.numel() > 1000
    assert float(noise.std()) == pytest.approx(sigma * bound, rel=0.06)  # once: not sqrt(3) or 3 times
    assert abs(float(noise.mean())) < 4 * sigma * bound / math.sqrt(noise.numel())


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_matches_opacus_accountant_and_an_asserted_rate_is_only_a_claim(accountant):
    config = DPConfig(noise_multiplier=1.1, max_grad_norm=1.0, dataset_size=400, target_delta=1e-5,
                      accountant_type=accountant)
    engine = make_engine(dp_config=config, batch_size=4)
    rows = sequences(4, seed=1)
    results = []
    for _ in range(5):
        engine.forward_backward(padded_batch(rows))
        results.append(engine.optim_step().dp_metrics)

    def opacus(q: float) -> float:
        reference = create_accountant(mechanism=accountant)
        reference.history = [(1.1, q, 5)]
        return reference.get_epsilon(delta=1e-5)

    last = results[-1]
    # The client's batches were not drawn by the server: charged at q = 1, whatever the client asserts.
    assert last.total_epsilon == pytest.approx(opacus(1.0), rel=1e-6) == last.epsilon_q1
    assert last.sample_rate == 1.0 and last.sampling == "asserted"
    assert last.epsilon_asserted == pytest.approx(opacus(0.01), rel=1e-6)
    assert last.epsilon_asserted < last.total_epsilon
    assert last.asserted_sample_rate == pytest.approx(0.01) and "dataset_size 400" in last.sampling_assumption
    assert "claim" in last.sampling_assumption
    assert sum(r.epsilon_spent for r in results) == pytest.approx(last.total_epsilon, rel=1e-6)


def test_the_gdp_accountant_is_refused_naming_the_field():
    with pytest.raises(ValidationError, match="accountant_type.*central-limit"):
        DPConfig(noise_multiplier=1.0, accountant_type="gdp")


def test_no_sampling_information_means_no_amplification():
    engine = make_engine(dp_config=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0), batch_size=4)
    engine.forward_backward(padded_batch(sequences(4, seed=2)))
    metrics = engine.optim_step().dp_metrics
    reference = create_accountant(mechanism="rdp")
    reference.step(noise_multiplier=1.0, sample_rate=1.0)
    assert metrics.sample_rate == 1.0 and "no amplification" in metrics.sampling_assumption
    assert metrics.sampling == "none" and metrics.epsilon_asserted is None
    assert metrics.total_epsilon == pytest.approx(reference.get_epsilon(delta=1e-5)) == metrics.epsilon_q1


def test_noise_multiplier_is_computed_from_the_budget_at_the_certified_rate():
    config = DPConfig(target_epsilon=3.0, planned_steps=50, dataset_size=1000, max_grad_norm=1.0)
    engine = make_engine(dp_config=config, batch_size=10)
    sigma = engine.accountant.noise_multiplier
    reference = create_accountant(mechanism="rdp")
    reference.history = [(sigma, 1.0, 50)]  # the client's batches: q = 1, not its asserted 10 / 1000
    assert reference.get_epsilon(delta=1e-5) <= 3.0
    reference.history = [(sigma * 0.9, 1.0, 50)]
    assert reference.get_epsilon(delta=1e-5) > 3.0  # not needlessly noisy


def _budget_for(steps: float) -> float:
    reference = create_accountant(mechanism="rdp")
    reference.history = [(1.0, 1.0, 2)]
    two = reference.get_epsilon(delta=1e-5)
    reference.history = [(1.0, 1.0, 3)]
    three = reference.get_epsilon(delta=1e-5)
    return (two + three) / 2  # room for two steps, not three


def test_budget_refuses_the_step_that_would_exceed_it_and_a_reload_does_not_reset_it(tmp_path):
    from tensafe_trainer.engine.adapter import AdapterSlot, deserialize_state, serialize_state

    config = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, dataset_size=400, target_epsilon=_budget_for(2.5))
    engine = make_engine(dp_config=config, batch_size=4)
    rows = sequences(4, seed=9)
    for _ in range(2):
        engine.forward_backward(padded_batch(rows))
        engine.optim_step()
    spent = engine.total_epsilon
    saved = serialize_state(engine.state_dict(include_optimizer=True))
    before = snapshot(engine)
    for _ in range(2):  # and later steps keep refusing
        engine.forward_backward(padded_batch(rows[:2])) if engine.dp.num_examples == 0 else None
        with pytest.raises(DPBudgetExceededError) as err:
            engine.optim_step()
        assert err.value.details["current_epsilon"] == pytest.approx(spent)
        assert err.value.details["max_epsilon"] == config.target_epsilon
        assert engine.step == 2
        for name, p in engine.trainable.items():
            assert torch.equal(p, before[name])
    # A new engine on the same data (a restart, or another client) with the checkpoint loaded: the ledger holds.
    restored = AdapterSlot(engine.config, ledger=fresh_ledger_at(engine.accountant.ledger))
    restored.load_state_dict(deserialize_state(saved))
    assert restored.total_epsilon == pytest.approx(spent)
    restored.forward_backward(padded_batch(rows))
    with pytest.raises(DPBudgetExceededError):
        restored.optim_step()


def test_dp_logical_batch_cannot_exceed_what_the_accountant_assumes():
    engine = make_engine(dp_config=dp_config(), batch_size=4)
    engine.forward_backward(padded_batch(sequences(4, seed=1)))
    with pytest.raises(ValidationError, match="at most batch_size x gradient_accumulation_steps"):
        engine.forward_backward(padded_batch(sequences(1, seed=2)))


def test_turning_noise_off_on_a_dp_client_is_refused():
    engine = make_engine(dp_config=dp_config(), batch_size=4)
    with pytest.raises(ValidationError, match="un-noised"):
        engine.optim_step(apply_dp_noise=False)
    plain = make_engine(batch_size=4)
    with pytest.raises(ValidationError, match="no dp_config"):
        plain.optim_step(apply_dp_noise=True)


# --- groups: G consecutive examples as one privacy unit -----------------------------------------------------------


def clipped_group_sum(grads: list[dict[str, torch.Tensor]], size: int, bound: float) -> dict[str, torch.Tensor]:
    """Independently: each group's summed gradient clipped to ``bound``, then summed."""
    total = {n: torch.zeros_like(g) for n, g in grads[0].items()}
    for start in range(0, len(grads), size):
        group = {n: sum(g[n] for g in grads[start:start + size]) for n in total}
        factor = min(1.0, bound / (norm(group) + 1e-6))
        for n in total:
            total[n] += factor * group[n]
    return total


@pytest.mark.parametrize("micro_batch", [6, 2, 4], ids=["one-batch", "groups-split", "groups-straddle"])
def test_a_group_is_clipped_as_one_unit_even_across_micro_batches(no_noise, micro_batch):
    rows = sequences(6, seed=13)
    reference = per_example_gradients(make_engine(), rows)
    groups = [sum(norm(g) for g in reference[i:i + 3]) for i in (0, 3)]
    bound = min(groups) * 0.5  # both groups clipped, each far above any one row's clipped share
    accumulation = -(-6 // micro_batch)
    engine = make_engine(dp_config=dp_config(max_grad_norm=bound, group_size=3), batch_size=micro_batch,
                         gradient_accumulation_steps=accumulation)
    before = snapshot(engine)
    for start in range(0, 6, micro_batch):
        engine.forward_backward(padded_batch(rows[start:start + micro_batch]))
    metrics = engine.optim_step().dp_metrics
    denominator = micro_batch * accumulation  # the declared logical batch, in rows
    expected = {n: t / denominator for n, t in clipped_group_sum(reference, 3, bound).items()}
    assert_close(update(engine, before), expected, rtol=1e-8, atol=1e-12)
    assert metrics.group_size == 3 and metrics.num_examples == 6 and metrics.num_clipped == 2


def test_a_group_moves_the_update_by_at_most_the_bound_where_rows_alone_would_move_it_more(no_noise):
    rows = [sequences(1, seed=17)[0]] * 4  # one prompt's 4 samples: the same direction four times
    bound = norm(per_example_gradients(make_engine(), rows[:1])[0]) * 0.5
    moved = {}
    for size in (1, 4):
        engine = make_engine(dp_config=dp_config(max_grad_norm=bound, group_size=size), batch_size=4)
        before = snapshot(engine)
        engine.forward_backward(padded_batch(rows))
        engine.optim_step()
        moved[size] = norm(update(engine, before)) * 4  # times the denominator: the clipped sum's norm
    assert moved[1] == pytest.approx(4 * bound, rel=1e-6)  # four units, each at the bound
    assert moved[4] == pytest.approx(bound, rel=1e-6)  # one unit


def test_a_logical_batch_that_ends_inside_a_group_is_refused_and_discarded():
    engine = make_engine(dp_config=dp_config(group_size=3), batch_size=6)
    before = snapshot(engine)
    engine.forward_backward(padded_batch(sequences(4, seed=1)))
    with pytest.raises(ValidationError, match="inside a group: 1 of its 3 rows"):
        engine.optim_step()
    assert engine.total_epsilon == 0 and engine.step == 0
    assert all(torch.equal(p, before[n]) for n, p in engine.trainable.items())
    engine.forward_backward(padded_batch(sequences(3, seed=2)))  # a fresh batch of whole groups
    assert engine.optim_step().dp_metrics.group_size == 3


def test_groups_apply_to_batches_a_client_sends_not_to_the_servers_poisson_draw():
    with pytest.raises(ValidationError, match="group_size"):
        make_engine(dp_config=DPConfig(noise_multiplier=1.0, dataset_id="facts", sample_rate=0.5, group_size=2),
                    dataset=[{"input_ids": [1, 2, 3]}] * 4)
