"""DP-SGD: per-example clipping, one Gaussian noise draw per optimizer step, and accounting.

One mechanism, stated once (docs/privacy.md has the argument):
- adjacency is add/remove one example (what opacus' accountants assume);
- one logical batch = every micro-batch since the last ``optim_step`` (or one Poisson draw of a
  registered dataset, see :meth:`TrainingEngine.forward_backward_sampled`); each example's gradient (of
  its own mean token loss) is clipped to C = ``max_grad_norm``, the clipped gradients are summed;
- ``optim_step`` adds N(0, (sigma C)^2) to that sum, from a CSPRNG (secure_random), and divides by a
  fixed public denominator: the expected logical batch size, never the number of examples that came;
- the accountant is fed exactly (sigma, q, steps) of what ran, into the dataset's ledger.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from tg_tinker.config import DPConfig
from tg_tinker.errors import DPBudgetExceededError, TrainingClientError, ValidationError
from tg_tinker.types import DPMetrics

from .ledger import History, PrivacyLedger
from .per_example import PerExampleGradients, accumulation_dtype, clip_and_sum
from .secure_random import KeyStream, add_secure_normal_

Sampling = Literal["poisson", "asserted", "none"]
DATA_BUDGET_ACCOUNTANT = "rdp"  # the accountant that holds every client to the data's own budget
# What the audit log and metrics may carry of a step's dp_metrics: nothing computed from the batch itself.
PUBLIC_DP_FIELDS = ("noise_applied", "noise_multiplier", "epsilon_spent", "total_epsilon", "delta",
                    "sample_rate", "sampling", "epsilon_q1", "expected_batch_size", "accountant_type")


ADJACENCY = "add/remove one example"


def _finite(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def public_dp_metrics(metrics: Optional[dict]) -> Optional[dict]:
    return None if metrics is None else {k: metrics[k] for k in PUBLIC_DP_FIELDS if k in metrics}


@dataclass(frozen=True)
class SamplingPlan:
    """How a logical batch is drawn, the rate the accountant is given, and the fixed denominator."""

    mode: Sampling
    sample_rate: float
    expected_batch_size: float  # the public denominator of the noisy sum
    assumption: str


def plan_sampling(cfg: DPConfig, effective_batch_size: int, server_samples: bool) -> SamplingPlan:
    """``server_samples``: the client samples a registered dataset on the server."""
    if server_samples:
        if cfg.sample_rate is None:
            raise ValidationError(f"sampling registered dataset {cfg.dataset_id!r} needs dp_config.sample_rate",
                                  {"field": "dp_config.sample_rate"})
        q = cfg.sample_rate
        # The denominator is the client's declared expected batch (batch_size x accumulation steps), not q x N:
        # N changes when a row is added or removed, and the update's scale would then reveal it.
        return SamplingPlan("poisson", q, float(effective_batch_size), (
            f"Poisson sampling on the server: each example of dataset {cfg.dataset_id!r} independently with "
            f"probability {q:g}"))
    if cfg.sample_rate is not None:
        return SamplingPlan("asserted", cfg.sample_rate, float(effective_batch_size), (
            f"sample_rate={cfg.sample_rate:g} as asserted by the client (uniform sampling is the client's "
            "claim; epsilon_q1 is the epsilon without it)"))
    if cfg.dataset_size is not None:
        q = min(1.0, effective_batch_size / cfg.dataset_size)
        return SamplingPlan("asserted", q, float(effective_batch_size), (
            f"sample_rate = effective batch {effective_batch_size} / dataset_size {cfg.dataset_size} = {q:g}, "
            "as asserted by the client (epsilon_q1 is the epsilon without it)"))
    return SamplingPlan("none", 1.0, float(effective_batch_size),
                        "no sampling information: q = 1, no amplification by subsampling")


@functools.lru_cache(maxsize=64)
def _rdp_curve(sigma: float, q: float):
    return rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)


# Memoized: a step's "epsilon before" is the previous step's "epsilon after".
@functools.lru_cache(maxsize=8)
def epsilon_of(mechanism: str, delta: float, history: tuple) -> float:
    """Epsilon spent by ``history`` ((noise multiplier, sample rate, steps), ...) under ``mechanism``.

    opacus' GDP accountant reads only the last entry of a history: a ledger that mixes several (sigma, q)
    (two clients, a restart with another sigma) is composed with RDP instead, a sound upper bound."""
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    if mechanism == "gdp" and len({(sigma, q) for sigma, q, _ in history}) > 1:
        mechanism = "rdp"
    if mechanism == "gdp":
        history = (history[0][:2] + (sum(steps for _, _, steps in history),),)
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
    """opacus' accountant over the dataset's ledger, plus the budget rule: a step that would pass
    ``target_epsilon`` (composed over every client's steps on the data) is refused before it is taken."""

    def __init__(self, cfg: DPConfig, plan: SamplingPlan, ledger: PrivacyLedger, client_id: str = ""):
        self.cfg, self.ledger, self.client_id = cfg, ledger, client_id
        self.use_plan(plan)
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

    def use_plan(self, plan: SamplingPlan) -> None:
        """Set how batches are drawn (before the first step, or when a client starts sampling a dataset
        registered after it started: the same q, so the noise multiplier stands)."""
        self.plan, self.sample_rate = plan, plan.sample_rate
        self.sampling_assumption = plan.assumption
        if self.cfg.accountant_type == "gdp":
            self.sampling_assumption += ("; GDP accounting is a CLT approximation that can underestimate "
                                         "epsilon (prefer rdp or prv)")

    def _epsilon_of(self, history: History) -> float:
        return epsilon_of(self.cfg.accountant_type, self.cfg.target_delta, history)

    def total_epsilon(self) -> float:
        """Composed over every step any client took on this ledger's data."""
        return self._epsilon_of(self.ledger.history())

    def epsilon_q1(self) -> float:
        """The same steps without amplification by subsampling (q = 1): what holds if the sampling claim does not."""
        return self._epsilon_of(tuple((s, 1.0, n) for s, _, n in self.ledger.history()))

    def claims(self) -> dict:
        """The public privacy claim of weights trained so far (what a receipt states)."""
        total = self.total_epsilon()
        return {"dp": True, "dataset_id": self.cfg.dataset_id, "total_epsilon": total if math.isfinite(total) else None,
                "delta": self.cfg.target_delta, "epsilon_q1": _finite(self.epsilon_q1()),
                "accountant": self.cfg.accountant_type, "sampling": self.plan.mode,
                "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.cfg.max_grad_norm,
                "sample_rate": self.sample_rate, "expected_batch_size": self.plan.expected_batch_size,
                "adjacency": ADJACENCY, "steps": sum(n for _, _, n in self.ledger.history())}

    def spend_step(self) -> tuple[float, float]:
        """Check and record one step in the ledger, atomically; raises (recording nothing) past the budget.
        Returns (epsilon before, epsilon after)."""
        spent = {}

        def check(before: History, after: History) -> None:
            spent["before"], spent["after"] = self._epsilon_of(before), self._epsilon_of(after)
            target = self.cfg.target_epsilon
            if target is not None and spent["after"] > target:
                raise DPBudgetExceededError(
                    f"this step would spend the privacy budget: epsilon {spent['before']:.4g} -> "
                    f"{spent['after']:.4g} > target_epsilon {target:g} (delta {self.cfg.target_delta:g}, composed "
                    f"over every client's steps on {self._ledger_name()}); no weights were changed",
                    {"current_epsilon": spent["before"], "max_epsilon": target,
                     "epsilon_after_step": spent["after"], "delta": self.cfg.target_delta},
                )
            budget = self.ledger.budget()  # the data's own, which a client's higher target cannot override
            if budget is not None:
                limit, delta = budget  # held with RDP whatever the client's accountant (GDP can underestimate)
                now = epsilon_of(DATA_BUDGET_ACCOUNTANT, delta, before)
                then = epsilon_of(DATA_BUDGET_ACCOUNTANT, delta, after)
                if then > limit:
                    raise DPBudgetExceededError(
                        f"this step would pass the budget of {self._ledger_name()}: epsilon {now:.4g} -> {then:.4g} "
                        f"> {limit:g} (delta {delta:g}, set by the first client on it); no weights were changed",
                        {"current_epsilon": now, "max_epsilon": limit, "epsilon_after_step": then, "delta": delta})

        budget = (self.cfg.target_epsilon, self.cfg.target_delta) if self.cfg.target_epsilon is not None else None
        self.ledger.spend(self.noise_multiplier, self.sample_rate, check, self.client_id, budget)
        return spent["before"], spent["after"]

    def _ledger_name(self) -> str:
        return f"dataset {self.cfg.dataset_id!r}" if self.cfg.dataset_id else "this tenant's data"

    def state_dict(self) -> dict:
        """What a checkpoint records (for the record only: loading it never changes the ledger)."""
        return {"history": [list(h) for h in self.ledger.history()], "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "mechanism": self.cfg.accountant_type,
                "dataset_id": self.cfg.dataset_id}

    def check_checkpoint(self, state: dict) -> None:
        if state.get("mechanism") != self.cfg.accountant_type:
            raise ValidationError(
                f"checkpoint was accounted with {state.get('mechanism')!r}, this client uses "
                f"{self.cfg.accountant_type!r}"
            )
        if state.get("dataset_id") != self.cfg.dataset_id:
            raise ValidationError(
                f"checkpoint was trained on dataset_id {state.get('dataset_id')!r}, this client's ledger is "
                f"{self.cfg.dataset_id!r}: its weights carry that data's privacy loss, which this client's epsilon "
                "would not count", {"field": "dp_config.dataset_id"})
        # The ledger must hold at least what the checkpoint's weights were trained with: a ledger rolled back
        # (an old backup, an emptied file) would otherwise let these weights claim less than they spent.
        ledger = {(float(s), float(q)): int(n) for s, q, n in self.ledger.history()}
        for s, q, n in state.get("history") or []:
            if ledger.get((float(s), float(q)), 0) < int(n):
                raise ValidationError(
                    f"the privacy ledger of {self._ledger_name()} records {ledger.get((float(s), float(q)), 0)} steps "
                    f"at noise multiplier {s:g} and sample rate {q:g}, but this checkpoint was trained with {n}: the "
                    "ledger was rolled back or replaced. Restore it (spent budget is never given back) before "
                    "loading these weights", {"ledger_steps": ledger.get((float(s), float(q)), 0),
                                               "checkpoint_steps": int(n)})


class NoiseAhead:
    """Draws a step's noise on a thread of its own while the step's batches are computed: the noise depends on
    nothing but a fresh key and the parameters' shapes, so there is no reason to make the step wait for it (on a
    GPU the CPU draws while the device computes). Drawn on the CPU in float32 or wider, one fresh key a step."""

    def __init__(self, params: list[torch.nn.Parameter], std: float):
        self._shapes = [(p.shape, accumulation_dtype(p.dtype)) for p in params]
        self._std = std
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dp-noise")
        self._next: Optional[concurrent.futures.Future] = None

    def start(self) -> None:
        if self._next is None:
            self._next = self._pool.submit(self._draw)

    def take(self) -> list[torch.Tensor]:
        """This step's noise, one tensor per parameter; the next call draws anew."""
        self.start()
        noise, self._next = self._next.result(), None
        return noise

    def _draw(self) -> list[torch.Tensor]:
        stream = KeyStream()
        out = []
        for shape, dtype in self._shapes:
            buffer = torch.zeros(shape, dtype=dtype)
            add_secure_normal_(buffer, self._std, stream)
            out.append(buffer)
        return out


class DPGradientAccumulator:
    """Collects clipped per-example gradients across micro-batches; releases one noisy sum over a fixed
    denominator."""

    def __init__(self, model: torch.nn.Module, cfg: DPConfig, noise_multiplier: float):
        self.cfg = cfg
        self.hooks = PerExampleGradients(model)
        self.params = self.hooks.params
        self.noise = NoiseAhead(self.params, noise_multiplier * cfg.max_grad_norm)
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
        self.noise.start()
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

    def release(self, denominator: float) -> None:
        """Write (clipped sum + N(0, (sigma C)^2)) / denominator into ``param.grad``, the noise from this step's
        fresh CSPRNG key (NoiseAhead), added in float32 or wider."""
        for p, noise in zip(self.params, self.noise.take()):
            total = self.summed.get(p)
            if total is None:
                total = torch.zeros(p.shape, dtype=accumulation_dtype(p.dtype), device=p.device)
            p.grad = total.add_(noise.to(p.device)).div_(denominator).to(p.dtype)

    def metrics(self, accountant: PrivacyAccountant, before: float, after: float) -> DPMetrics:
        n = max(self.num_examples, 1)
        plan = accountant.plan
        return DPMetrics(
            noise_applied=True, noise_multiplier=accountant.noise_multiplier,
            epsilon_spent=(after - before) if math.isfinite(after) else math.inf,
            total_epsilon=after, delta=self.cfg.target_delta,
            grad_norm_before_clip=self.norm_sum / n, grad_norm_after_clip=self.clipped_norm_sum / n,
            num_clipped=self.num_clipped, num_examples=self.num_examples,
            sample_rate=accountant.sample_rate, sampling_assumption=accountant.sampling_assumption,
            accountant_type=self.cfg.accountant_type, sampling=plan.mode,
            expected_batch_size=plan.expected_batch_size,
            epsilon_q1=accountant.epsilon_q1() if plan.mode == "asserted" else None,
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
