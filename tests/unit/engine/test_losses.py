"""The loss registry against formulas written out here element by element, values and gradients."""

import math
import random

import pytest
import torch

from tensafe_trainer.engine.losses import LOSSES, get_loss
from tg_tinker.errors import ValidationError


def _reference(name: str, lp: float, q: float, adv: float, w: float, cfg: dict) -> float:
    ratio = math.exp(lp - q)
    if name == "cross_entropy":
        return -lp * w
    if name == "importance_sampling":
        return -ratio * adv
    if name == "ppo":
        clipped = min(max(ratio, cfg["clip_low_threshold"]), cfg["clip_high_threshold"])
        return -min(ratio * adv, clipped * adv)
    if name == "cispo":
        clipped = min(max(ratio, cfg["clip_low_threshold"]), cfg["clip_high_threshold"])
        return -clipped * lp * adv
    if name == "dro":
        return -(lp * adv - 0.5 * cfg["beta"] * (lp - q) ** 2)
    raise AssertionError(name)


def _reference_grad(name: str, lp: float, q: float, adv: float, w: float, cfg: dict) -> float:
    """d loss / d logprob, by hand (CISPO's clipped ratio carries no gradient)."""
    ratio = math.exp(lp - q)
    low, high = cfg.get("clip_low_threshold"), cfg.get("clip_high_threshold")
    if name == "cross_entropy":
        return -w
    if name == "importance_sampling":
        return -ratio * adv
    if name == "ppo":  # the minimum picks the clipped branch (gradient 0) when it is the smaller one
        clipped = min(max(ratio, low), high)
        return 0.0 if clipped * adv < ratio * adv else -ratio * adv
    if name == "cispo":
        return -min(max(ratio, low), high) * adv
    if name == "dro":
        return -(adv - cfg["beta"] * (lp - q))
    raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_loss_matches_its_formula_in_value_and_gradient(name):
    rng = random.Random(name)
    loss = get_loss(name)
    cfg = loss.settings({"beta": 0.3} if name == "dro" else {"clip_low_threshold": 0.7} if "clip_low_threshold"
                        in loss.config else None)
    rows = [[(rng.uniform(-4, -0.01), rng.uniform(-4, -0.01), rng.uniform(-2, 2), rng.uniform(0, 1))
             for _ in range(7)] for _ in range(3)]
    logprobs = torch.tensor([[r[0] for r in row] for row in rows], dtype=torch.float64, requires_grad=True)
    inputs = {"logprobs": torch.tensor([[r[1] for r in row] for row in rows], dtype=torch.float64),
              "advantages": torch.tensor([[r[2] for r in row] for row in rows], dtype=torch.float64),
              "weights": torch.tensor([[r[3] for r in row] for row in rows], dtype=torch.float64)}
    per_token = loss.fn(logprobs, inputs, cfg)
    per_token.sum().backward()
    for b, row in enumerate(rows):
        for t, (lp, q, adv, w) in enumerate(row):
            assert float(per_token[b, t]) == pytest.approx(_reference(name, lp, q, adv, w, cfg), rel=1e-12, abs=1e-12)
            assert float(logprobs.grad[b, t]) == pytest.approx(_reference_grad(name, lp, q, adv, w, cfg),
                                                               rel=1e-9, abs=1e-12)


def test_ppo_and_cispo_clip_at_tinkers_default_thresholds():
    assert get_loss("ppo").settings(None) == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert get_loss("cispo").settings({"clip_high_threshold": 1.5})["clip_high_threshold"] == 1.5
    # A ratio of e^1 with a positive advantage is clipped to 1.2: the loss is -1.2 * A and has no gradient.
    lp = torch.tensor([[0.0]], dtype=torch.float64, requires_grad=True)
    out = get_loss("ppo").fn(lp, {"logprobs": torch.tensor([[-1.0]], dtype=torch.float64),
                                  "advantages": torch.tensor([[2.0]], dtype=torch.float64)},
                             get_loss("ppo").settings(None))
    out.sum().backward()
    assert float(out) == pytest.approx(-2.4) and float(lp.grad) == 0.0


def test_unknown_losses_inputs_and_config_are_refused_by_name():
    with pytest.raises(ValidationError, match="unknown loss_fn 'dpo'.*cross_entropy"):
        get_loss("dpo")
    with pytest.raises(ValidationError, match=r"'ppo' lacks \['advantages'\]"):
        get_loss("ppo").check_inputs({"logprobs"})
    with pytest.raises(ValidationError, match=r"'cross_entropy' has inputs it does not use \['advantages'\]"):
        get_loss("cross_entropy").check_inputs({"weights", "advantages"})
    get_loss("cross_entropy").check_inputs(set())  # weights are optional (all ones)
    with pytest.raises(ValidationError, match=r"'ppo' takes no config \['beta'\]"):
        get_loss("ppo").settings({"beta": 1.0})
    for bad in (float("nan"), "0.5", True, 1e300):  # 1e300 is finite, and would overflow inside the loss
        with pytest.raises(ValidationError, match=r"must be a number within \+-1e\+06"):
            get_loss("dro").settings({"beta": bad})
    with pytest.raises(ValidationError, match="clip_low_threshold must not exceed clip_high_threshold"):
        get_loss("ppo").settings({"clip_low_threshold": 1.5, "clip_high_threshold": 1.2})


# --- through the engine: gradients against an independent computation --------------------------

def _independent_policy_gradient(engine, rows, sampled, advantages, cfg):
    """Each row alone, unpadded, float64: the gradient of the sum of PPO's per-token loss, by hand."""
    import torch.nn.functional as F

    for p in engine.trainable.values():
        p.grad = None
    for r, q, adv in zip(rows, sampled, advantages):
        logits = engine.model(input_ids=torch.tensor([r[:-1]])).logits[0].double()
        lp = -F.cross_entropy(logits, torch.tensor(r[1:]), reduction="none")
        ratio = torch.exp(lp - torch.tensor(q[:len(r) - 1], dtype=torch.float64))
        a = torch.tensor(adv[:len(r) - 1], dtype=torch.float64)
        clipped = torch.clamp(ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
        (-torch.min(ratio * a, clipped * a)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in engine.trainable.items()}
    for p in engine.trainable.values():
        p.grad = None
    return grads


def _policy_batch(rows, sampled, advantages):
    from tg_tinker import BatchData

    width = max(len(r) for r in rows) - 1
    pad = lambda row, v: row + [v] * (width - len(row))  # noqa: E731
    return BatchData(input_ids=[pad(r[:-1], 0) for r in rows],
                     attention_mask=[pad([1] * (len(r) - 1), 0) for r in rows],
                     labels=[pad(r[1:], -100) for r in rows],
                     loss_inputs={"logprobs": [pad(q[:len(r) - 1], 0.0) for r, q in zip(rows, sampled)],
                                  "advantages": [pad(a[:len(r) - 1], 0.0) for r, a in zip(rows, advantages)]})


def test_a_sum_reduced_ppo_step_is_the_independent_gradient_and_reports_logprobs_and_loss_sum():
    from engine_helpers import assert_close, make_engine, snapshot, update
    from tg_tinker.types import ForwardBackwardRequest
    from engine_helpers import sequences

    engine = make_engine(batch_size=4)
    rows = sequences(3, seed=7, lengths=(5, 9))
    rng = random.Random(3)
    sampled = [[rng.uniform(-6, -1) for _ in r] for r in rows]
    advantages = [[rng.choice([-1.0, 0.5, 2.0]) for _ in r] for r in rows]
    cfg = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    expected = _independent_policy_gradient(engine, rows, sampled, advantages, cfg)
    before = snapshot(engine)
    spec = ForwardBackwardRequest(batch=_policy_batch(rows, sampled, advantages), loss_fn="ppo", loss_fn_config=cfg,
                                  reduction="sum", return_logprobs=True)
    result = engine.forward_backward(spec.batch, spec)
    engine.optim_step()  # SGD with lr 1 and a sum: the update is minus the gradient
    assert_close(update(engine, before), expected, rtol=1e-8, atol=1e-12)
    forward = engine.forward(spec.batch, spec)  # the same tokens under the updated weights differ; only shapes here
    assert [sum(v is not None for v in row) for row in result.logprobs] == [len(r) - 1 for r in rows]
    assert len(forward.logprobs) == len(rows)
    assert result.loss_sum == pytest.approx(result.loss * result.tokens_processed, rel=1e-12)


def test_a_logical_batch_does_not_mix_a_mean_and_a_sum():
    from engine_helpers import make_engine, padded_batch
    from tg_tinker.types import ForwardBackwardRequest
    from engine_helpers import sequences

    engine = make_engine(batch_size=4)
    batch = padded_batch(sequences(2, seed=1))
    engine.forward_backward(batch)
    with pytest.raises(ValidationError, match="reduced by 'mean'; a 'sum' forward_backward cannot join"):
        engine.forward_backward(batch, ForwardBackwardRequest(batch=batch, reduction="sum"))
    engine.optim_step()
    engine.forward_backward(batch, ForwardBackwardRequest(batch=batch, reduction="sum"))


def test_per_step_adam_parameters_are_those_of_an_independent_adamw_step():
    from engine_helpers import make_engine, padded_batch, snapshot
    from tg_tinker import OptimizerConfig
    from tg_tinker.types import AdamStep, ForwardBackwardRequest
    from engine_helpers import sequences

    engine = make_engine(batch_size=4, optimizer=OptimizerConfig(name="adamw", learning_rate=1e-4))
    batch = padded_batch(sequences(3, seed=5))
    step = AdamStep(learning_rate=0.03, beta1=0.5, beta2=0.7, eps=1e-6, weight_decay=0.1, grad_clip_norm=0.05)
    before = snapshot(engine)
    engine.forward_backward(batch, ForwardBackwardRequest(batch=batch, reduction="sum"))
    grads = [g.clone() for g in engine.gradient_sum]
    result = engine.optim_step(adam=step)
    assert result.learning_rate == 0.03
    total = float(torch.sqrt(sum((g ** 2).sum() for g in grads)))
    assert total > 0.05  # so the clip matters
    params = [before[n].clone().requires_grad_(True) for n in engine.trainable]
    for p, g in zip(params, grads):
        p.grad = g * (0.05 / (total + 1e-6))
    reference = torch.optim.AdamW(params, lr=0.03, betas=(0.5, 0.7), eps=1e-6, weight_decay=0.1)
    reference.step()
    for (name, p), ref in zip(engine.trainable.items(), params):
        torch.testing.assert_close(p.detach(), ref.detach(), rtol=1e-9, atol=1e-12, msg=name)
    with pytest.raises(ValidationError, match="need an Adam optimizer"):
        make_engine(batch_size=4).optim_step(adam=step)


# --- through the SDK and a local trainer ---------------------------------------------------------

def test_registered_losses_through_the_sdk_with_and_without_dp(service):
    from conftest import dp_config, random_batch, tiny_config
    from tg_tinker import AdamStep

    batch = random_batch(rows=3, width=12, seed=11)
    rng = random.Random(5)
    batch["loss_inputs"] = {"logprobs": [[rng.uniform(-7, -5) for _ in row] for row in batch["input_ids"]],
                            "advantages": [[rng.choice([-1.0, 1.0]) for _ in row] for row in batch["input_ids"]]}
    plain = service.create_training_client(tiny_config(optimizer={"name": "adamw", "learning_rate": 1e-3}))
    private = service.create_training_client(tiny_config(dp_config=dp_config(), seed=1))
    try:
        forward = plain.forward(batch, loss_fn="importance_sampling").result()
        fb = plain.forward_backward(batch, loss_fn="importance_sampling", reduction="sum",
                                    return_logprobs=True).result()
        # The importance-sampling loss from the logprobs the trainer reports, computed here.
        expected = sum(-math.exp(lp - q) * a
                       for lrow, qrow, arow in zip(fb.logprobs, batch["loss_inputs"]["logprobs"],
                                                   batch["loss_inputs"]["advantages"])
                       for lp, q, a in zip(lrow, qrow, arow) if lp is not None)
        assert fb.loss_sum == pytest.approx(expected, rel=1e-5)
        assert forward.loss_sum == pytest.approx(expected, rel=1e-5)  # same weights, same loss
        step = plain.optim_step(adam=AdamStep(learning_rate=0.02, grad_clip_norm=1.0)).result()
        assert step.learning_rate == 0.02
        with pytest.raises(ValidationError, match="'ppo' lacks"):
            plain.forward_backward({k: v for k, v in batch.items() if k != "loss_inputs"}, loss_fn="ppo").result()
        with pytest.raises(ValidationError, match="unknown loss_fn"):
            plain.forward_backward(batch, loss_fn="dpo").result()

        private.forward_backward(batch, loss_fn="ppo", reduction="sum").result()
        dp_step = private.optim_step().result()
        assert dp_step.dp_metrics is not None and dp_step.dp_metrics.total_epsilon > 0
    finally:
        plain.close()
        private.close()
