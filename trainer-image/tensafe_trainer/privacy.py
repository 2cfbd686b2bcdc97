"""DP-SGD: per-example clipping, one Gaussian noise draw per optimizer step, and accounting.

One logical batch = every ``forward_backward`` since the last ``optim_step``. Each example's
gradient (of its own mean token loss) is clipped to ``max_grad_norm`` in its micro-batch; the clipped
gradients are summed across micro-batches; ``optim_step`` adds N(0, (noise_multiplier *
max_grad_norm)^2) once to that sum and divides by the number of examples in the logical batch.
The batch size is treated as public, as it is for fixed-size batches.
"""

from __future__ import annotations

import functools
import math
import secrets
from typing import Callable, Optional

import torch
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from tg_tinker.config import DPConfig
from tg_tinker.errors import DPBudgetExceededError, TrainingClientError, ValidationError
from tg_tinker.types import DPMetrics

from .per_example import PerExampleGradients, clip_and_sum


def resolve_sample_rate(cfg: DPConfig, effective_batch_size: int) -> tuple[float, str]:
    """The sampling rate the accountant may assume, and the assumption in words."""
    if cfg.sample_rate is not None:
        return cfg.sample_rate, f"configured sample_rate={cfg.sample_rate:g} (caller asserts uniform sampling)"
    if cfg.dataset_size is not None:
        rate = min(1.0, effective_batch_size / cfg.dataset_size)
        return rate, (
            f"sample_rate = effective batch {effective_batch_size} / dataset_size {cfg.dataset_size} "
            f"= {rate:g} (caller asserts uniform sampling)"
        )
    return 1.0, "no sampling information: q = 1, no amplification by subsampling"


@functools.lru_cache(maxsize=64)
def _rdp_curve(sigma: float, q: float):
    return rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)


# Memoized: a step's "epsilon before" is the previous step's "epsilon after".
@functools.lru_cache(maxsize=8)
def epsilon_of(mechanism: str, delta: float, history: tuple) -> float:
    """Epsilon spent by ``history`` ((noise multiplier, sample rate, steps), ...) under ``mechanism``."""
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    if mechanism == "rdp":
        # opacus' compute_rdp is linear in steps, so the one-step RDP curve per (sigma, q) is cached:
        # the same arithmetic as RDPAccountant.get_epsilon without recomputing ~150 orders every step.
        total = sum(_rdp_curve(sigma, q) * steps for sigma, q, steps in history)
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=total, delta=delta)
        return float(eps)
    probe = create_accountant(mechanism=mechanism)
    probe.history = list(history)
    return float(probe.get_epsilon(delta=delta))


class PrivacyAccountant:
    """opacus' accountant plus the budget rule: refuse a step that would pass ``target_epsilon``."""

    def __init__(self, cfg: DPConfig, effective_batch_size: int):
        self.cfg = cfg
        self.sample_rate, self.sampling_assumption = resolve_sample_rate(cfg, effective_batch_size)
        if cfg.accountant_type == "gdp":
            self.sampling_assumption += ("; GDP accounting is a CLT approximation that can underestimate "
                                         "epsilon (prefer rdp or prv)")
        if cfg.noise_multiplier is not None:
            self.noise_multiplier = float(cfg.noise_multiplier)
        else:
            try:
                self.noise_multiplier = float(get_noise_multiplier(
                    target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta,
                    sample_rate=self.sample_rate, steps=cfg.planned_steps, accountant=cfg.accountant_type,
                ))
            except ValueError as exc:
                raise ValidationError(
                    f"cannot reach target_epsilon={cfg.target_epsilon} in {cfg.planned_steps} steps "
                    f"at sample rate {self.sample_rate:g}: {exc}", {"field": "dp_config.target_epsilon"}
                ) from None
        self._accountant = create_accountant(mechanism=cfg.accountant_type)

    def _epsilon_of(self, history) -> float:
        return epsilon_of(self.cfg.accountant_type, self.cfg.target_delta, tuple(tuple(h) for h in history))

    def total_epsilon(self) -> float:
        return self._epsilon_of(self._accountant.history)

    def _history_after_step(self):
        probe = create_accountant(mechanism=self.cfg.accountant_type)
        probe.history = list(self._accountant.history)
        probe.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return probe.history

    def check_step(self) -> tuple[float, float]:
        """(epsilon now, epsilon after one more step); raises if that passes the budget."""
        before = self.total_epsilon()
        after = self._epsilon_of(self._history_after_step())
        target = self.cfg.target_epsilon
        if target is not None and after > target:
            raise DPBudgetExceededError(
                f"this step would spend the privacy budget: epsilon {before:.4g} -> {after:.4g} "
                f"> target_epsilon {target:g} (delta {self.cfg.target_delta:g}); no weights were changed",
                {"current_epsilon": before, "max_epsilon": target, "epsilon_after_step": after,
                 "delta": self.cfg.target_delta},
            )
        return before, after

    def record_step(self) -> None:
        self._accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def state_dict(self) -> dict:
        return {"history": [list(h) for h in self._accountant.history], "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "mechanism": self.cfg.accountant_type}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mechanism") != self.cfg.accountant_type:
            raise ValidationError(
                f"checkpoint was accounted with {state.get('mechanism')!r}, this client uses "
                f"{self.cfg.accountant_type!r}"
            )
        self._accountant.history = [tuple(h) for h in state["history"]]


class DPGradientAccumulator:
    """Collects clipped per-example gradients across micro-batches; releases one noisy mean."""

    def __init__(self, model: torch.nn.Module, cfg: DPConfig):
        self.cfg = cfg
        self.hooks = PerExampleGradients(model)
        self.params = self.hooks.params
        self.reset()

    def reset(self) -> None:
        self.summed: dict[torch.nn.Parameter, torch.Tensor] = {}
        self.num_examples = 0
        self.num_clipped = 0
        self.norm_sum = 0.0
        self.clipped_norm_sum = 0.0

    def backward(self, per_example_loss_fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
        """Run ``per_example_loss_fn`` (the forward) and backpropagate the sum of its losses, then add
        the clipped per-example gradients to the running sum.

        Returns the per-example losses and the norm of this micro-batch's mean clipped gradient.
        """
        with self.hooks.capture():
            per_example_loss = per_example_loss_fn()
            per_example_loss.sum().backward()
            grads = self.hooks.collect()
        missing = [p for p in self.params if p not in grads]
        if missing:
            raise TrainingClientError(
                f"{len(missing)} trainable parameters got no per-example gradient (a module type the DP "
                "hooks do not support, such as LoRA on embeddings); DP cannot be guaranteed"
            )
        for p in self.params:
            p.grad = None  # autograd's batch-summed gradient is not used under DP
        summed, norms, factors = clip_and_sum(grads, self.cfg.max_grad_norm)
        for p, g in summed.items():
            if p in self.summed:
                self.summed[p].add_(g)
            else:
                self.summed[p] = g
        batch = per_example_loss.shape[0]
        self.num_examples += batch
        self.num_clipped += int((factors < 1.0).sum())
        self.norm_sum += float(norms.sum())
        self.clipped_norm_sum += float((norms * factors).sum())
        mean_sq = sum(float(g.pow(2).sum()) for g in summed.values())
        return per_example_loss, math.sqrt(mean_sq) / batch

    def release(self, noise_multiplier: float, add_noise: bool, fallback_batch: int) -> None:
        """Write the noisy mean of clipped gradients into ``param.grad`` (noise drawn once, here)."""
        denominator = self.num_examples or fallback_batch
        std = noise_multiplier * self.cfg.max_grad_norm
        generator = None
        for p in self.params:
            total = self.summed.get(p)
            total = torch.zeros_like(p) if total is None else total.to(p.dtype)
            if add_noise and std > 0:
                if generator is None or generator.device != p.device:
                    generator = torch.Generator(device=p.device)
                    generator.manual_seed(secrets.randbits(63))  # never from the user's seed
                total = total + torch.normal(0.0, std, size=p.shape, device=p.device, dtype=p.dtype,
                                             generator=generator)
            p.grad = total / denominator

    def metrics(self, accountant: PrivacyAccountant, before: float, after: float, noise: bool) -> DPMetrics:
        n = max(self.num_examples, 1)
        return DPMetrics(
            noise_applied=noise, noise_multiplier=accountant.noise_multiplier,
            epsilon_spent=(after - before) if math.isfinite(after) else math.inf,
            total_epsilon=after, delta=self.cfg.target_delta,
            grad_norm_before_clip=self.norm_sum / n, grad_norm_after_clip=self.clipped_norm_sum / n,
            num_clipped=self.num_clipped, num_examples=self.num_examples,
            sample_rate=accountant.sample_rate, sampling_assumption=accountant.sampling_assumption,
            accountant_type=self.cfg.accountant_type,
        )


def check_noise_request(dp_enabled: bool, apply_dp_noise: Optional[bool]) -> bool:
    """Resolve ``optim_step(apply_dp_noise=...)``: follows the config; never weakens it silently."""
    if apply_dp_noise is None:
        return dp_enabled
    if apply_dp_noise and not dp_enabled:
        raise ValidationError("apply_dp_noise=True but this training client has no dp_config enabled",
                              {"field": "apply_dp_noise"})
    if not apply_dp_noise and dp_enabled:
        raise ValidationError("apply_dp_noise=False would release an un-noised update from a DP client",
                              {"field": "apply_dp_noise"})
    return apply_dp_noise
