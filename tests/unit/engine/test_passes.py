"""Shared passes (engine/passes.py): several slots' rows in one forward/backward, each client's update the one it
gets alone, whatever its neighbours send."""

from __future__ import annotations

import pytest
import torch

from conftest import dp_config
from tg_tinker import LoRAConfig
from tg_tinker.errors import TrainingClientError
from tg_tinker.types import BatchData, ForwardBackwardRequest

from engine_helpers import make_engine, padded_batch, sequences
from tensafe_trainer.engine.host import ModelHost
from tensafe_trainer.engine.losses import LOSSES
from tensafe_trainer.engine.passes import forward_backward_pass

NEIGHBOUR = dict(batch_size=4, lora_config=LoRAConfig(rank=8, alpha=4, target_modules=["q_proj", "o_proj"]))


def _request(loss: str, rows: int, seed: int, side: str = "right") -> ForwardBackwardRequest:
    batch = padded_batch(sequences(rows, seed=seed), side=side)
    inputs = None
    if loss != "cross_entropy":
        width = batch.shape[1]
        inputs = {"logprobs": [[-1.0 - 0.1 * t for t in range(width)] for _ in range(rows)],
                  "advantages": [[(-1) ** (r + t) * 0.5 for t in range(width)] for r in range(rows)]}
    return ForwardBackwardRequest(batch=BatchData(**{**batch.model_dump(), "loss_inputs": inputs}), loss_fn=loss,
                                  return_logprobs=True)


def _alone_and_shared(*clients: tuple[dict, ForwardBackwardRequest]):
    """Each client's forward_backward on a host of its own, then all of them in one pass on one host: the slots
    alone, their results, the slots that shared, and the shared pass's outcomes."""
    alone = [make_engine(**config) for config, _ in clients]
    results = [engine.forward_backward(r.batch, r) for engine, (_, r) in zip(alone, clients)]
    host = ModelHost.for_config(alone[0].config)
    shared = [make_engine(host=host, **config) for config, _ in clients]
    outcomes = forward_backward_pass([s.begin_client_batch(r.batch, r) for s, (_, r) in zip(shared, clients)])
    return alone, results, shared, outcomes


def _assert_same_gradients(shared, alone) -> None:
    if alone.dp is None:
        assert len(shared.gradient_sum) == len(alone.gradient_sum)
        for mine, theirs in zip(shared.gradient_sum, alone.gradient_sum):
            torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-13)
        return
    assert shared.dp.num_clipped == alone.dp.num_clipped and shared.dp.num_examples == alone.dp.num_examples
    by_name = {n: shared.dp.summed[p] for n, p in shared.trainable.items()}
    for name, p in alone.trainable.items():
        assert torch.isfinite(by_name[name]).all()
        torch.testing.assert_close(by_name[name], alone.dp.summed[p], rtol=1e-10, atol=1e-13)


def _assert_same_result(result, expected) -> None:
    assert result.tokens_processed == expected.tokens_processed and result.num_examples == expected.num_examples
    assert result.loss == pytest.approx(expected.loss, rel=1e-10)
    assert result.grad_norm == pytest.approx(expected.grad_norm, rel=1e-10)
    for row, other in zip(result.logprobs, expected.logprobs, strict=True):
        assert [v is None for v in row] == [v is None for v in other]
        assert [v for v in row if v is not None] == pytest.approx([v for v in other if v is not None], rel=1e-10)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_each_clients_gradient_in_a_shared_pass_is_the_one_it_gets_alone(loss):
    # Rows of different widths and padding sides, adapters of other ranks and targets, other losses.
    clients = [(dict(batch_size=4), _request(loss, rows=4, seed=1)),
               (NEIGHBOUR, _request("cross_entropy", rows=3, seed=2, side="left")),
               (dict(batch_size=4), _request("ppo", rows=2, seed=3))]
    alone, expected, shared, outcomes = _alone_and_shared(*clients)
    for i in range(len(clients)):
        _assert_same_result(outcomes[i], expected[i])
        _assert_same_gradients(shared[i], alone[i])


def test_each_dp_clients_clipped_sum_in_a_shared_pass_is_the_one_it_gets_alone():
    clients = [(dict(batch_size=4, dp_config=dp_config(max_grad_norm=0.05)), _request("cross_entropy", 4, seed=4)),
               (dict(NEIGHBOUR, dp_config=dp_config()), _request("cross_entropy", rows=4, seed=5, side="left")),
               (dict(batch_size=4), _request("cross_entropy", rows=2, seed=6))]
    alone, expected, shared, outcomes = _alone_and_shared(*clients)
    assert shared[0].dp.num_clipped == 4
    for i in range(len(clients)):
        _assert_same_result(outcomes[i], expected[i])
        _assert_same_gradients(shared[i], alone[i])


def test_a_neighbour_whose_loss_is_not_finite_fails_alone():
    # ratio = exp(logprob - sampled logprob) overflows: the neighbour's loss is infinite
    broken = _request("importance_sampling", rows=2, seed=7)
    broken.batch.loss_inputs["logprobs"] = [[-1e300] * broken.batch.shape[1]] * 2
    mine = (dict(batch_size=4), _request("cross_entropy", rows=4, seed=8))
    host = ModelHost.for_config(make_engine().config)
    alone = make_engine(**mine[0])
    expected = alone.forward_backward(mine[1].batch, mine[1])
    shared, neighbour = make_engine(host=host, **mine[0]), make_engine(host=host, batch_size=4)
    outcomes = forward_backward_pass([shared.begin_client_batch(mine[1].batch, mine[1]),
                                      neighbour.begin_client_batch(broken.batch, broken)])
    assert isinstance(outcomes[1], TrainingClientError) and "not finite" in str(outcomes[1])
    assert neighbour.gradient_sum is None and all(p.grad is None for p in neighbour.trainable.values())
    _assert_same_result(outcomes[0], expected)
    _assert_same_gradients(shared, alone)


def test_a_dp_neighbours_non_finite_row_is_dropped_from_its_own_batch_only():
    broken = _request("importance_sampling", rows=3, seed=9)
    broken.batch.loss_inputs["logprobs"][1] = [-1e300] * broken.batch.shape[1]
    clients = [(dict(batch_size=4, dp_config=dp_config(max_grad_norm=0.05)), _request("cross_entropy", 4, seed=10)),
               (dict(batch_size=4, dp_config=dp_config()), broken)]
    alone, expected, shared, outcomes = _alone_and_shared(*clients)
    assert expected[1].num_examples == 3 and expected[1].tokens_processed < sum(map(len, sequences(3, seed=9)))
    for i in range(len(clients)):
        _assert_same_result(outcomes[i], expected[i])
        _assert_same_gradients(shared[i], alone[i])


def test_a_part_that_fails_taking_its_gradients_fails_alone_and_the_others_take_theirs_once(monkeypatch):
    # After one part has taken its gradients into its logical batch, the pass must not fail as a whole: the host
    # would run every part again, and the concluded ones would count their rows twice (beyond their C under DP).
    clients = [(dict(batch_size=4, dp_config=dp_config(max_grad_norm=0.05)), _request("cross_entropy", 3, seed=11)),
               (dict(batch_size=4), _request("cross_entropy", rows=2, seed=12))]
    alone, expected, shared, _ = _alone_and_shared(*clients)
    host = ModelHost.for_config(alone[0].config)
    mine, neighbour = (make_engine(host=host, **config) for config, _ in clients)

    def out_of_memory(part):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(neighbour, "conclude", out_of_memory)
    outcomes = forward_backward_pass([mine.begin_client_batch(clients[0][1].batch, clients[0][1]),
                                      neighbour.begin_client_batch(clients[1][1].batch, clients[1][1])])
    assert isinstance(outcomes[1], RuntimeError)
    _assert_same_result(outcomes[0], expected[0])
    _assert_same_gradients(mine, alone[0])  # its 3 rows, once
    assert all(p.grad is None for p in neighbour.trainable.values())
