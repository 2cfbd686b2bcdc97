"""The privacy mechanism's assumptions, each checked where today's code once broke it (issue #13):
the noise source, the fixed denominator, the ledger, server-side Poisson sampling, bf16, refusals."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from opacus.accountants import create_accountant
from scipy import stats

from tg_tinker import DPBudgetExceededError, DPConfig, OptimizerConfig, TrainingClientError, ValidationError

from conftest import dp_config
from engine_helpers import (
    dataset,
    fresh_ledger,
    make_engine,
    norm,
    padded_batch,
    per_example_gradients,
    sampled_engine,
    sequences,
    snapshot,
    update,
)


def noise_of_one_step(rows, **config) -> torch.Tensor:
    """The noise of one step, recovered from the update as an attacker with both weight snapshots would."""
    engine = make_engine(dp_config=dp_config(**config), batch_size=len(rows))
    before = snapshot(engine)
    engine.forward_backward(padded_batch(rows))
    engine.optim_step()
    return torch.cat([update(engine, before)[k].flatten() for k in sorted(before)])


# --- 1. the noise source ------------------------------------------------------------------------


def test_noise_is_not_reproducible_when_every_torch_seed_is_fixed(monkeypatch):
    """Today's bug: a Mersenne Twister seeded with 63 bits of which torch keeps 32. Pin every torch
    generator to one seed: a mechanism that draws from torch then repeats its noise exactly."""
    class Pinned(torch.Generator):
        def manual_seed(self, seed):
            return super().manual_seed(0)

    monkeypatch.setattr(torch, "Generator", Pinned)
    rows = sequences(2, seed=4)
    updates = []
    for _ in range(2):
        torch.manual_seed(0)
        updates.append(noise_of_one_step(rows))
    assert not torch.allclose(updates[0], updates[1])


def test_noise_never_comes_from_torch_or_numpy_generators(monkeypatch):
    import numpy as np

    def refuse(*args, **kwargs):
        raise AssertionError("the mechanism drew from a non-cryptographic generator")

    engine = make_engine(dp_config=dp_config(), batch_size=2)
    for name in ("normal", "randn", "rand", "randint", "bernoulli"):
        monkeypatch.setattr(torch, name, refuse)
    monkeypatch.setattr(torch.Tensor, "normal_", refuse)
    monkeypatch.setattr(np.random, "normal", refuse)
    engine.forward_backward(padded_batch(sequences(2, seed=1)))
    engine.optim_step()


def test_each_step_is_keyed_with_fresh_256_bit_entropy_from_the_os(monkeypatch):
    from tensafe_trainer.privacy import secure_random
    drawn = []
    real = secure_random.secrets.token_bytes
    engine = make_engine(dp_config=dp_config(), batch_size=2)
    monkeypatch.setattr(secure_random.secrets, "token_bytes", lambda n: drawn.append(n) or real(n))
    for _ in range(3):
        engine.forward_backward(padded_batch(sequences(2, seed=1)))
        engine.optim_step()
    assert drawn == [32, 32, 32]  # one key per step, 32 bytes each


def test_a_dp_checkpoint_continues_only_on_the_ledger_of_its_data_and_a_refused_load_changes_nothing():
    from tensafe_trainer.engine.adapter import deserialize_state, serialize_state

    trained = make_engine(dp_config=dp_config(dataset_id="Y"), batch_size=2)
    trained.forward_backward(padded_batch(sequences(2, seed=1)))
    trained.optim_step()
    state = deserialize_state(serialize_state(trained.state_dict(include_optimizer=True)))
    elsewhere = make_engine(dp_config=dp_config(dataset_id="Y-copy"), batch_size=2)
    before = snapshot(elsewhere)
    with pytest.raises(ValidationError, match="trained on dataset_id 'Y'"):
        elsewhere.load_state_dict(state)
    assert all(torch.equal(before[k], p) for k, p in elsewhere.trainable.items())


def test_a_checkpoint_does_not_load_over_a_ledger_rolled_back_behind_it():
    """An administrator of the volume empties (or restores an old copy of) the ledger file: the weights trained
    with 2 steps would then carry a receipt claiming fewer. The load is refused, naming the rollback."""
    from tensafe_trainer.engine.adapter import deserialize_state, serialize_state

    ledger = fresh_ledger("rolled")
    trained = make_engine(dp_config=dp_config(dataset_id="rolled"), batch_size=2, ledger=ledger)
    for seed in range(2):
        trained.forward_backward(padded_batch(sequences(2, seed=seed)))
        trained.optim_step()
    state = deserialize_state(serialize_state(trained.state_dict(include_optimizer=True)))
    original = ledger.path.read_bytes()
    ledger.path.write_bytes(b"")  # the rollback
    resumed = make_engine(dp_config=dp_config(dataset_id="rolled"), batch_size=2, ledger=type(ledger)(
        ledger.path.parent.parent, "default", "rolled", keys=ledger.keys))
    # The key store's head of the ledger catches it first; without it, the checkpoint's ledger head would.
    with pytest.raises((TrainingClientError, ValidationError), match="rolled back"):
        resumed.load_state_dict(state)
    assert resumed.step == 0
    refilled = fresh_ledger("rolled")
    for _ in range(2):  # as many steps again, but not the ones these weights were trained with
        refilled.spend(1.0, trained.accountant.sample_rate, lambda before, after: None)
    elsewhere = make_engine(dp_config=dp_config(dataset_id="rolled"), batch_size=2, ledger=refilled)
    with pytest.raises(ValidationError, match="no longer begins with the 2 entries"):
        elsewhere.load_state_dict(state)
    ledger.path.write_bytes(original)  # the ledger restored: it covers the checkpoint again
    restored = make_engine(dp_config=dp_config(dataset_id="rolled"), batch_size=2,
                           ledger=type(ledger)(ledger.path.parent.parent, "default", "rolled",
                                               keys=ledger.keys))
    restored.load_state_dict(state)
    assert restored.step == 2


def test_a_drawn_batch_cannot_be_thrown_away_and_drawn_again():
    from tensafe_trainer.engine.adapter import deserialize_state, serialize_state

    engine = sampled_engine()
    saved = deserialize_state(serialize_state(engine.state_dict(include_optimizer=True)))
    engine.forward_backward_sampled()
    engine.load_state_dict(saved)  # the draw's gradients go, the draw stays counted
    with pytest.raises(ValidationError, match="already drawn"):
        engine.forward_backward_sampled()
    engine.discard_gradients()
    with pytest.raises(ValidationError, match="already drawn"):
        engine.forward_backward_sampled()
    assert engine.optim_step().dp_metrics.num_examples == 0  # noise only, and charged
    engine.forward_backward_sampled()


def test_the_datas_budget_is_held_with_rdp_whatever_the_clients_accountant():
    from engine_helpers import fresh_ledger_at

    ledger = fresh_ledger("rdp-held")
    low = (rdp(1.0, 1.0, 2) + rdp(1.0, 1.0, 3)) / 2
    first = make_engine(dp_config=dp_config(dataset_id="rdp-held", target_epsilon=low), batch_size=2, ledger=ledger)
    first.forward_backward(padded_batch(sequences(2, seed=1)))
    first.optim_step()
    prv = make_engine(dp_config=dp_config(dataset_id="rdp-held", target_epsilon=100.0, accountant_type="prv"),
                      batch_size=2, ledger=fresh_ledger_at(ledger))
    prv.forward_backward(padded_batch(sequences(2, seed=2)))
    prv.optim_step()
    prv.forward_backward(padded_batch(sequences(2, seed=3)))
    with pytest.raises(DPBudgetExceededError, match="set by the first client"):
        prv.optim_step()


def test_the_first_clients_budget_binds_a_later_client_with_a_higher_target():
    from engine_helpers import fresh_ledger_at

    ledger = fresh_ledger("budgeted")
    low = (rdp(1.0, 1.0, 2) + rdp(1.0, 1.0, 3)) / 2  # two steps (client batches: q = 1)
    first = make_engine(dp_config=dp_config(dataset_id="budgeted", target_epsilon=low), batch_size=2, ledger=ledger)
    first.forward_backward(padded_batch(sequences(2, seed=1)))
    first.optim_step()
    greedy = make_engine(dp_config=dp_config(dataset_id="budgeted", target_epsilon=100.0), batch_size=2,
                         ledger=fresh_ledger_at(ledger))
    greedy.forward_backward(padded_batch(sequences(2, seed=2)))
    greedy.optim_step()
    greedy.forward_backward(padded_batch(sequences(2, seed=3)))
    with pytest.raises(DPBudgetExceededError, match="set by the first client"):
        greedy.optim_step()


def rdp(sigma, q, steps, delta=1e-5):
    reference = create_accountant(mechanism="rdp")
    reference.history = [(sigma, q, steps)]
    return reference.get_epsilon(delta=delta)


def test_keystream_is_aes_256_ctr_and_uniforms_use_53_bits():
    from tensafe_trainer.privacy.secure_random import KeyStream

    key = bytes(range(32))
    reference = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(64))
    words = KeyStream(key).words(8)
    assert words.numpy().tobytes() == reference
    expected = [((int.from_bytes(reference[i:i + 8], "little") >> 11) + 1) * 2.0 ** -53 for i in range(0, 64, 8)]
    assert KeyStream(key).uniform(8).tolist() == expected


def test_secure_gaussian_has_the_right_distribution():
    from tensafe_trainer.privacy.secure_random import secure_normal

    draws = secure_normal(200_000, std=3.0, key=bytes(32))  # a fixed key: the test cannot flake
    assert draws.dtype == torch.float64
    assert float(draws.mean()) == pytest.approx(0.0, abs=4 * 3.0 / math.sqrt(200_000))
    assert float(draws.std()) == pytest.approx(3.0, rel=0.01)
    assert stats.kstest(draws.numpy() / 3.0, "norm").pvalue > 0.01
    # A sum of four draws: no value sits on the lattice a single Box-Muller draw is confined to.
    assert len(set(draws[:10_000].tolist())) == 10_000


# --- 2. add/remove adjacency: a fixed denominator ----------------------------------------------


def test_a_row_repeated_twice_moves_the_weights_twice_as_far(no_noise):
    row = sequences(1, seed=11)[0]
    moves = {}
    for copies in (1, 2):
        engine = make_engine(dp_config=dp_config(max_grad_norm=0.05), batch_size=2)  # clipped: a bounded step
        before = snapshot(engine)
        engine.forward_backward(padded_batch([row] * copies))
        result = engine.optim_step().dp_metrics
        assert result.expected_batch_size == 2.0
        moves[copies] = norm(update(engine, before))
    assert moves[2] == pytest.approx(2 * moves[1], rel=1e-9)
    assert moves[1] == pytest.approx(0.05 / 2, rel=1e-4)  # the clipped gradient over the fixed denominator


def test_the_update_is_the_clipped_sum_over_the_expected_batch_size_however_many_came(no_noise):
    rows = sequences(3, seed=12)
    engine = make_engine(dp_config=dp_config(max_grad_norm=10.0), batch_size=4, gradient_accumulation_steps=2)
    reference = per_example_gradients(make_engine(), rows)
    before = snapshot(engine)
    engine.forward_backward(padded_batch(rows))
    engine.optim_step()
    for name, moved in update(engine, before).items():
        expected = sum(g[name] for g in reference) / 8  # 3 examples came; the denominator is 4 x 2
        torch.testing.assert_close(moved, expected, rtol=1e-8, atol=1e-12)


# --- 3. server-side Poisson sampling -------------------------------------------------------------


def test_poisson_coins_are_consistent_with_q():
    from tensafe_trainer.privacy.secure_random import bernoulli_mask

    n, q, draws = 200, 0.05, 2000
    masks = torch.stack([bernoulli_mask(n, q, key=i.to_bytes(32, "big")) for i in range(draws)])
    sizes = masks.sum(dim=1).double()
    assert float(sizes.mean()) == pytest.approx(n * q, rel=4 * math.sqrt((1 - q) / (n * q * draws)))
    assert float(sizes.var()) == pytest.approx(n * q * (1 - q), rel=0.1)
    counts = masks.sum(dim=0).numpy()  # each example's inclusions: Binomial(draws, q)
    spread = 5 * math.sqrt(draws * q * (1 - q))
    assert counts.min() > draws * q - spread and counts.max() < draws * q + spread
    assert stats.chisquare(counts).pvalue > 0.001  # no example favoured
    assert stats.binomtest(int(counts.sum()), n * draws, q).pvalue > 0.001
    assert not bernoulli_mask(1000, 1e-300, key=bytes(32)).any() and bernoulli_mask(1000, 1.0, key=bytes(32)).all()


def test_a_sampled_step_is_the_clipped_sum_of_the_drawn_examples_over_the_declared_batch(monkeypatch, no_noise):
    from tensafe_trainer.engine import adapter as engine_module
    chosen = [1, 4, 5, 9, 13, 17, 18]  # more than one micro-batch of 3
    monkeypatch.setattr(engine_module, "bernoulli_mask",
                        lambda n, q: torch.tensor([i in chosen for i in range(n)]))
    engine = sampled_engine()
    reference = per_example_gradients(make_engine(), [engine.dataset[i]["input_ids"] for i in chosen])
    before = snapshot(engine)
    drawn = engine.forward_backward_sampled()
    metrics = engine.optim_step().dp_metrics
    assert drawn.num_examples == len(chosen)
    assert metrics.sampling == "poisson" and metrics.sample_rate == 0.25 and metrics.expected_batch_size == 3.0
    for name, moved in update(engine, before).items():  # over batch_size x accumulation, never q x N
        torch.testing.assert_close(moved, sum(g[name] for g in reference) / 3.0, rtol=1e-8, atol=1e-12)


def test_the_sampled_update_does_not_depend_on_the_dataset_size(monkeypatch, no_noise):
    """Add/remove adjacency: one more row in the dataset (not drawn) must not change the update's scale (a
    denominator of q x N did: the weights then revealed N, and with it whether a row was present)."""
    from tensafe_trainer.engine import adapter as engine_module
    monkeypatch.setattr(engine_module, "bernoulli_mask", lambda n, q: torch.tensor([i < 4 for i in range(n)]))
    moves = []
    for n in (20, 21):
        engine = sampled_engine(n=n)
        before = snapshot(engine)
        engine.forward_backward_sampled()
        engine.optim_step()
        moves.append(update(engine, before))
    for name in moves[0]:
        torch.testing.assert_close(moves[0][name], moves[1][name], rtol=0, atol=0)


def test_sampled_batch_sizes_vary_around_q_times_n():
    engine = sampled_engine(n=40, q=0.25)
    sizes = []
    for _ in range(12):
        sizes.append(engine.forward_backward_sampled().num_examples)
        engine.optim_step()
    assert len(set(sizes)) > 1 and 0 < sum(sizes) / len(sizes) < 20


def test_a_sampling_client_refuses_client_batches_and_a_second_draw_per_step():
    engine = sampled_engine()
    with pytest.raises(ValidationError, match="forward_backward_sampled"):
        engine.forward_backward(padded_batch(sequences(2, seed=1)))
    with pytest.raises(ValidationError, match="before optim_step"):
        engine.optim_step()
    engine.forward_backward_sampled()
    with pytest.raises(ValidationError, match="already drawn"):
        engine.forward_backward_sampled()
    plain = make_engine(dp_config=dp_config(), batch_size=2)
    with pytest.raises(ValidationError, match="registered dataset"):
        plain.forward_backward_sampled()


def test_a_draw_is_charged_when_drawn_so_abandoned_draws_on_fresh_clients_all_count():
    from engine_helpers import fresh_ledger_at

    ledger = fresh_ledger("facts")
    for _ in range(5):  # a new client, a restart, a replaced pod: each draws, sees the draw, walks away
        sampled_engine(ledger=fresh_ledger_at(ledger)).forward_backward_sampled()
    assert ledger.history() == ((1.0, 0.25, 5),)


def test_a_draw_past_the_budget_is_refused_before_a_coin_is_tossed(monkeypatch):
    from tensafe_trainer.engine import adapter as engine_module
    budget = (rdp(1.0, 0.25, 2) + rdp(1.0, 0.25, 3)) / 2
    engine = make_engine(dp_config=DPConfig(noise_multiplier=1.0, max_grad_norm=10.0, dataset_id="facts",
                                            sample_rate=0.25, target_epsilon=budget),
                         batch_size=3, dataset=dataset(20, seed=21))
    tosses = []
    real = engine_module.bernoulli_mask
    monkeypatch.setattr(engine_module, "bernoulli_mask", lambda n, q: tosses.append(1) or real(n, q))
    for _ in range(2):
        engine.forward_backward_sampled()
        engine.optim_step()
    with pytest.raises(DPBudgetExceededError):
        engine.forward_backward_sampled()
    assert len(tosses) == 2 and engine.accountant.ledger.history() == ((1.0, 0.25, 2),)


def test_a_draw_that_fails_part_way_releases_nothing_more(monkeypatch):
    from tg_tinker import TrainingClientError

    engine = sampled_engine(n=40, q=0.9)
    spent = engine.total_epsilon
    calls = []
    real = engine.dp.absorb  # once per micro-batch of the draw

    def fail_second(batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(batch)

    monkeypatch.setattr(engine.dp, "absorb", fail_second)
    with pytest.raises(TrainingClientError, match="releases no further step"):
        engine.forward_backward_sampled()
    assert engine.dp.summed == {} and engine.dp.num_examples == 0  # the first micro-batch is gone too
    charged = engine.total_epsilon
    assert charged > spent  # the draw was spent when drawn
    for call in (engine.optim_step, engine.forward_backward_sampled):
        with pytest.raises(TrainingClientError, match="releases no further step"):
            call()
    assert engine.total_epsilon == charged and engine.step == 0


def test_a_dataset_registered_after_the_client_started_is_sampled_unless_it_trained_on_its_own_batches():
    from tensafe_trainer.engine.adapter import AdapterSlot

    from conftest import tiny_config
    from engine_helpers import SGD1

    registered: list = []
    config = tiny_config(dtype="float64", optimizer=SGD1, batch_size=3,
                         dp_config=DPConfig(noise_multiplier=1.0, dataset_id="late", sample_rate=0.5))
    late = AdapterSlot(config, ledger=fresh_ledger("late"),
                          find_dataset=lambda: registered[0] if registered else None)
    with pytest.raises(ValidationError, match="naming a registered dataset"):
        late.forward_backward_sampled()
    registered.append(dataset(10, seed=2))
    late.forward_backward_sampled()
    assert late.optim_step().dp_metrics.sampling == "poisson"
    own = AdapterSlot(config, ledger=fresh_ledger("late"), find_dataset=lambda: registered[0])
    own.forward_backward(padded_batch(sequences(2, seed=1)))
    with pytest.raises(ValidationError, match="trained on its own batches"):
        own.forward_backward_sampled()


def test_registered_examples_longer_than_max_seq_len_are_refused_before_any_draw():
    with pytest.raises(ValidationError, match="more than max_seq_len=64"):
        make_engine(dp_config=DPConfig(noise_multiplier=1.0, dataset_id="facts", sample_rate=0.5),
                    dataset=[{"input_ids": [1, 2, 3]}, {"input_ids": [5] * 70}])


def test_an_example_with_a_non_finite_gradient_contributes_nothing():
    from tensafe_trainer.privacy.per_example import clip_and_sum

    param = torch.nn.Parameter(torch.zeros(3))
    grads = {param: torch.tensor([[3.0, 4.0, 0.0], [float("inf"), 1.0, 1.0], [float("nan"), 0.0, 0.0]])}
    summed, _, factors = clip_and_sum(grads, 1.0)
    assert factors.tolist()[1:] == [0.0, 0.0]
    torch.testing.assert_close(summed[param], torch.tensor([0.6, 0.8, 0.0]), rtol=1e-5, atol=1e-6)


def test_noise_fills_tensors_of_any_size_across_chunks():
    from tensafe_trainer.privacy import secure_random
    for size in (1, 7, secure_random._CHUNK + 3):
        target = torch.zeros(size)
        secure_random.add_secure_normal_(target, 1.0)
        assert bool((target != 0).all())


def test_poisson_sampling_needs_a_rate_and_tokens_inside_the_vocabulary():
    with pytest.raises(ValidationError, match="needs dp_config.sample_rate"):
        make_engine(dp_config=DPConfig(noise_multiplier=1.0, dataset_id="facts"), dataset=dataset(4, seed=1))
    with pytest.raises(ValidationError, match="outside the model's vocabulary"):
        make_engine(dp_config=DPConfig(noise_multiplier=1.0, dataset_id="facts", sample_rate=0.5),
                    dataset=[{"input_ids": [1, 2, 99_999]}])


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_poisson_epsilon_matches_opacus_for_the_same_sigma_q_and_steps(accountant):
    config = DPConfig(noise_multiplier=1.2, max_grad_norm=1.0, dataset_id="facts", sample_rate=0.1,
                      accountant_type=accountant)
    engine = make_engine(dp_config=config, batch_size=4, dataset=dataset(30, seed=3))
    for _ in range(4):
        engine.forward_backward_sampled()
        metrics = engine.optim_step().dp_metrics
    reference = create_accountant(mechanism=accountant)
    reference.history = [(1.2, 0.1, 4)]
    assert metrics.total_epsilon == pytest.approx(reference.get_epsilon(delta=1e-5), rel=0.01)


def test_full_fine_tuning_samples_too():
    engine = sampled_engine(lora_config=None, q=0.5)
    before = snapshot(engine)
    engine.forward_backward_sampled()
    assert engine.optim_step().dp_metrics.sampling == "poisson"
    assert any(not torch.equal(before[k], p) for k, p in engine.trainable.items())


# --- 4. the ledger ------------------------------------------------------------------------------


def test_the_ledger_composes_every_client_on_the_data_and_survives_reopening():
    ledger = fresh_ledger("shared")
    config = dp_config(noise_multiplier=1.0, dataset_id="shared")
    first = make_engine(dp_config=config, batch_size=2, ledger=ledger)
    for _ in range(2):
        first.forward_backward(padded_batch(sequences(2, seed=1)))
        first.optim_step()
    from engine_helpers import fresh_ledger_at

    second = make_engine(dp_config=config, batch_size=2, ledger=fresh_ledger_at(ledger))  # a new client, restarted
    assert second.total_epsilon == pytest.approx(first.total_epsilon)
    second.forward_backward(padded_batch(sequences(2, seed=2)))
    third_step = second.optim_step().dp_metrics
    reference = create_accountant(mechanism="rdp")
    reference.history = [(1.0, 1.0, 3)]  # client batches: charged at q = 1
    assert third_step.total_epsilon == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-6)
    assert first.total_epsilon == pytest.approx(third_step.total_epsilon)  # the first client sees it too


def test_two_clients_spending_one_budget_at_once_cannot_both_pass_it():
    from tensafe_trainer.privacy.ledger import PrivacyLedger
    from tensafe_trainer.privacy.dp import PrivacyAccountant, plan_sampling

    ledger = fresh_ledger("race")
    reference = create_accountant(mechanism="rdp")
    reference.history = [(1.0, 1.0, 10)]
    ten = reference.get_epsilon(delta=1e-5)
    reference.history = [(1.0, 1.0, 11)]
    budget = (ten + reference.get_epsilon(delta=1e-5)) / 2  # room for exactly 10 steps
    config = DPConfig(noise_multiplier=1.0, sample_rate=0.01, target_epsilon=budget, dataset_id="race")
    passed, refused = [], []

    def client(name: str) -> None:
        own = PrivacyLedger(ledger.path.parent.parent, "default", "race",  # its own file handle, as a process has
                            keys=ledger.keys)
        accountant = PrivacyAccountant(config, plan_sampling(config, 4, False), own, name)
        for _ in range(10):
            try:
                accountant.spend_step()
                passed.append(name)
            except DPBudgetExceededError:
                refused.append(name)

    threads = [threading.Thread(target=client, args=(f"c{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(passed) == 10 and len(refused) == 10
    assert ledger.history() == ((1.0, 1.0, 10),)  # an asserted rate is not what the ledger certifies


def test_a_torn_ledger_line_is_not_a_step_and_is_dropped_by_the_next():
    ledger = fresh_ledger("torn")
    ledger.spend(1.0, 0.1, lambda before, after: None)
    with open(ledger.path, "ab") as f:
        f.write(b'{"noise_multiplier": 1.0, "sam')  # a crash mid-write: its step never changed weights
    reopened = type(ledger)(ledger.path.parent.parent, "default", "torn", keys=ledger.keys)
    assert reopened.history() == ((1.0, 0.1, 1),)
    reopened.spend(1.0, 0.1, lambda before, after: None)
    again = type(ledger)(ledger.path.parent.parent, "default", "torn", keys=ledger.keys)
    assert again.history() == ((1.0, 0.1, 2),)


# --- 6. refusals and bf16 -------------------------------------------------------------------------


def test_dp_without_noise_is_refused():
    with pytest.raises(ValidationError, match="noise_multiplier > 0"):
        DPConfig(noise_multiplier=0.0)
    DPConfig(enabled=False, noise_multiplier=0.0)  # DP off: nothing is claimed


def test_bf16_clipped_contributions_stay_within_the_bound(monkeypatch):
    from tensafe_trainer.privacy.per_example import clip_and_sum, per_example_norms

    engine = make_engine(dtype="bfloat16", lora_config=None, dp_config=dp_config(max_grad_norm=0.1),
                         optimizer=OptimizerConfig(name="sgd", learning_rate=0.1), batch_size=6)
    rows = sequences(6, seed=13)
    hooks = engine.dp.hooks
    collected = []  # the per-example gradients of each example's mean NLL, as the DP step collects them
    real_collect = hooks.collect
    monkeypatch.setattr(hooks, "collect", lambda: collected.append(real_collect()) or collected[-1])
    engine.forward_backward(padded_batch(rows))
    (grads,) = collected
    assert all(g.dtype == torch.bfloat16 for g in grads.values())
    for b in range(len(rows)):
        one = {p: g[b:b + 1] for p, g in grads.items()}
        summed, norms, _ = clip_and_sum(one, 0.1)
        assert float(norms[0]) > 0.1  # clipping is active
        assert all(s.dtype == torch.float32 for s in summed.values())
        assert float(per_example_norms({p: s.unsqueeze(0) for p, s in summed.items()})[0]) <= 0.1 * (1 + 1e-6)


# --- 7. smaller findings of the second audit ----------------------------------------------------------------------


def test_the_embedding_rule_gives_the_padding_row_no_gradient_as_autograd_does():
    from tensafe_trainer.privacy.per_example import PerExampleGradients

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4, padding_idx=0), torch.nn.Linear(4, 1))
    ids = torch.tensor([[0, 3, 0, 5], [2, 0, 0, 7]])  # the pad id used as a real token
    hooks = PerExampleGradients(model)
    with hooks.capture():
        model(ids).sum().backward()
        grads = hooks.collect()
    embedding = model[0].weight
    for row in range(2):
        model.zero_grad()
        model(ids[row:row + 1]).sum().backward()
        torch.testing.assert_close(grads[embedding][row], embedding.grad, rtol=1e-6, atol=1e-7)


def test_a_client_that_cannot_run_the_largest_possible_draw_fails_at_start_not_at_a_large_draw(monkeypatch):
    from tg_tinker import TrainingClientError
    from tensafe_trainer.engine import host as host_module
    real = host_module.load_model

    def small_memory(*args, **kwargs):  # a device that runs at most 30 tokens at once
        loaded = real(*args, **kwargs)
        decoder = loaded.model.get_decoder()  # the body every path runs (the head may run in chunks after it)
        forward = decoder.forward

        def limited(*a, input_ids=None, **k):
            if input_ids is not None and input_ids.numel() > 30:
                raise RuntimeError("out of memory")
            return forward(*a, input_ids=input_ids, **k)

        decoder.forward = limited
        return loaded

    monkeypatch.setattr(host_module, "load_model", small_memory)
    rows = dataset(20, seed=21)  # up to 12 tokens: 3 rows of 12 do not fit, 2 do
    config = DPConfig(noise_multiplier=1.0, dataset_id="facts", sample_rate=0.1)
    with pytest.raises(TrainingClientError, match="largest micro-batch"):
        make_engine(dp_config=config, batch_size=3, dataset=rows)
    fits = make_engine(dp_config=config, batch_size=2, dataset=rows)
    assert fits.dp.num_examples == 0 and fits.total_epsilon == 0  # the trial run left nothing behind
    fits.forward_backward_sampled()
    fits.optim_step()


def test_a_step_whose_batch_lost_rows_to_a_failure_is_refused_under_dp():
    engine = make_engine(dp_config=dp_config(), batch_size=6)
    before = snapshot(engine)
    engine.forward_backward(padded_batch(sequences(2, seed=1)))
    engine.discard_gradients()  # what the engine process does when a forward_backward fails unexpectedly
    engine.forward_backward(padded_batch(sequences(2, seed=2)))
    with pytest.raises(ValidationError, match="lost its earlier rows"):
        engine.optim_step()
    assert engine.total_epsilon == 0 and all(torch.equal(p, before[n]) for n, p in engine.trainable.items())
    engine.forward_backward(padded_batch(sequences(2, seed=3)))  # the batch sent again
    assert engine.optim_step().dp_metrics.num_examples == 2


def test_a_dp_clients_unexpected_failure_is_logged_by_type_only(caplog):
    from tensafe_trainer.engine.process import wire_error

    secret = RuntimeError("index 4242 out of range for row [17, 4242, 9]")
    for private in (False, True):
        caplog.clear()
        try:
            raise secret
        except RuntimeError as exc:
            wire = wire_error(exc, "forward_backward", private)
        assert "4242" in wire["message"]  # the client that owns the data gets it
        assert ("4242" in caplog.text) is not private and "RuntimeError" in caplog.text


def test_a_ledger_is_named_by_pseudonym_and_found_again_after_rotation_and_shred(tmp_path):
    """The folder lists no dataset id; the name survives a key rotation and a tenant's shred (spent budget must
    be found again), and a ledger named in clear by an earlier version is taken over, not started afresh."""
    from tensafe_trainer.privacy.ledger import PrivacyLedger
    from tensafe_keys.store import LocalKeyProvider

    keys = LocalKeyProvider(tmp_path / "keys")
    assert keys.names_key("acme") != keys.names_key("globex")
    ledger = PrivacyLedger(tmp_path / "privacy", "acme", "ward7-cohort", keys=keys)
    ledger.spend(1.0, 0.1, lambda before, after: None)
    assert "ward7" not in ledger.path.name
    keys.rotate("acme")
    keys.shred("acme")
    again = PrivacyLedger(tmp_path / "privacy", "acme", "ward7-cohort", keys=keys)
    assert again.path == ledger.path and again.history() == ((1.0, 0.1, 1),)
    legacy = tmp_path / "privacy" / "acme" / "older.jsonl"
    legacy.write_bytes(ledger.path.read_bytes())
    taken = PrivacyLedger(tmp_path / "privacy", "acme", "older", keys=keys)
    assert not legacy.exists() and taken.history() == ((1.0, 0.1, 1),)


@pytest.mark.parametrize("attack", ["renamed away", "emptied", "an older copy", "other lines"])
def test_a_ledger_rolled_back_or_removed_in_the_home_spends_nothing_more(tmp_path, attack):
    """The attacker review's budget reset: whoever can write the home renames the ledger away (or empties it,
    or puts back an older copy) and a fresh client, which needs no checkpoint, would start from zero. The key
    store keeps each ledger's head, so the ledger must still begin with it."""
    import shutil

    from tensafe_trainer.privacy.ledger import PrivacyLedger
    from tensafe_keys.store import LocalKeyProvider

    keys = LocalKeyProvider(tmp_path / "keys")
    ledger = PrivacyLedger(tmp_path / "privacy", "acme", "ward7", keys=keys)
    ledger.spend(1.0, 0.1, lambda before, after: None)
    older = ledger.path.read_bytes()
    ledger.spend(1.0, 0.1, lambda before, after: None)
    if attack == "renamed away":
        shutil.move(ledger.path, ledger.path.with_name("old.jsonl"))
    elif attack == "emptied":
        ledger.path.write_bytes(b"")
    elif attack == "an older copy":
        ledger.path.write_bytes(older)
    else:
        other = PrivacyLedger(tmp_path / "elsewhere", "acme", "ward7", keys=LocalKeyProvider(tmp_path / "k2"))
        for _ in range(3):
            other.spend(2.0, 0.1, lambda before, after: None)
        ledger.path.write_bytes(other.path.read_bytes())  # as many steps or more, but not these ones
    fresh = PrivacyLedger(tmp_path / "privacy", "acme", "ward7", keys=keys)
    with pytest.raises(TrainingClientError, match="rolled back, replaced or removed"):
        fresh.spend(1.0, 0.1, lambda before, after: None)
    with pytest.raises(TrainingClientError, match="rolled back, replaced or removed"):
        fresh.history()


def test_a_budget_line_written_into_the_ledger_file_sets_no_budget(tmp_path):
    """Second attacker review: a budget line appended by whoever can write the home became the data's budget
    (1e300: clients without a target of their own were no longer capped). The key store's head holds it."""
    from tensafe_trainer.privacy.ledger import PrivacyLedger
    from tensafe_keys.store import LocalKeyProvider

    keys = LocalKeyProvider(tmp_path / "keys")
    ledger = PrivacyLedger(tmp_path / "privacy", "acme", "ward7", keys=keys)
    ledger.path.write_bytes(b'{"delta": 1.0, "epsilon_budget": 1e300}\n')  # before any step
    ledger.spend(1.0, 0.1, lambda before, after: None, budget=(1.0, 1e-5))
    with open(ledger.path, "ab") as f:  # and after one
        f.write(b'{"delta": 1.0, "epsilon_budget": 1e300}\n')
    again = PrivacyLedger(tmp_path / "privacy", "acme", "ward7", keys=keys)
    assert again.budget() == (1.0, 1e-5) and again.history() == ((1.0, 0.1, 1),)
