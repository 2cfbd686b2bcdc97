"""DP-SGD: per-example clipping, one Gaussian noise draw per optimizer step, and accounting.

One mechanism, stated once (docs/privacy.md has the argument):
- adjacency is add/remove one example (what opacus' accountants assume);
- one logical batch = every micro-batch since the last ``optim_step`` (or one Poisson draw of a
  registered dataset, see :meth:`AdapterSlot.forward_backward_sampled`); each example's gradient (of
  its own mean token loss) is clipped to C = ``max_grad_norm``, the clipped gradients are summed;
- ``optim_step`` adds N(0, (sigma C)^2) to that sum, from a CSPRNG (secure_random), and divides by a
  fixed public denominator: the expected logical batch size, never the number of examples that came;
- the accountant is fed exactly (sigma, q, steps) of what ran, into the dataset's ledger.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import torch
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from tg_tinker.config import DPConfig
from tg_tinker.errors import DPBudgetExceededError, TrainingClientError, ValidationError
from tg_tinker.types import DPMetrics, json_epsilon

from tensafe_trainer.privacy.ledger import History, PrivacyLedger
from tensafe_trainer.privacy.per_example import PerExampleGradients, accumulation_dtype, clip_and_sum
from tensafe_trainer.privacy.secure_random import KeyStream, add_secure_normal_

Sampling = Literal["poisson", "asserted", "none"]
DATA_BUDGET_ACCOUNTANT = "rdp"  # the accountant that holds every client to the data's own budget
# What the audit log and metrics may carry of a step's dp_metrics: nothing computed from the batch itself.
PUBLIC_DP_FIELDS = ("noise_applied", "noise_multiplier", "epsilon_spent", "total_epsilon", "delta",
                    "sample_rate", "sampling", "epsilon_q1", "epsilon_asserted", "asserted_sample_rate",
                    "expected_batch_size", "accountant_type", "group_size")


ADJACENCY = "add/remove one example"


def public_dp_metrics(metrics: Optional[dict]) -> Optional[dict]:
    return None if metrics is None else {k: metrics[k] for k in PUBLIC_DP_FIELDS if k in metrics}


@dataclass(frozen=True)
class SamplingPlan:
    """How a logical batch is drawn, the rate the accountant is given, and the fixed denominator.

    ``sample_rate`` is the rate the server certifies and the ledger records: q where the server draws the batch
    (``poisson``), 1 otherwise. ``asserted_rate`` is a client's own claim (``asserted``), used for nothing but the
    figure labelled as that claim."""

    mode: Sampling
    sample_rate: float
    expected_batch_size: float  # the public denominator of the noisy sum
    assumption: str
    asserted_rate: Optional[float] = None


def plan_sampling(cfg: DPConfig, effective_batch_size: int, server_samples: bool) -> SamplingPlan:
    """``server_samples``: the client samples a registered dataset on the server."""
    if server_samples:
        if cfg.sample_rate is None:
            raise ValidationError(f"sampling registered dataset {cfg.dataset_id!r} needs dp_config.sample_rate",
                                  {"field": "dp_config.sample_rate"})
        if cfg.group_size != 1:
            raise ValidationError("group_size applies to batches a client sends: the server's Poisson draw takes each "
                                  "row on its own", {"field": "dp_config.group_size"})
        q = cfg.sample_rate
        # The denominator is the client's declared expected batch (batch_size x accumulation steps), not q x N:
        # N changes when a row is added or removed, and the update's scale would then reveal it.
        return SamplingPlan("poisson", q, float(effective_batch_size), (
            f"Poisson sampling on the server: each example of dataset {cfg.dataset_id!r} independently with "
            f"probability {q:g}"))
    claimed = cfg.sample_rate if cfg.sample_rate is not None else (
        min(1.0, effective_batch_size / cfg.dataset_size) if cfg.dataset_size is not None else None)
    if claimed is not None:
        source = (f"sample_rate={claimed:g}" if cfg.sample_rate is not None else
                  f"effective batch {effective_batch_size} / dataset_size {cfg.dataset_size} = {claimed:g}")
        return SamplingPlan("asserted", 1.0, float(effective_batch_size), (
            f"the client's batches, charged at q = 1: the server did not draw them. The client asserts uniform "
            f"sampling at {source}; epsilon_asserted is that claim's epsilon, not a bound the server certifies "
            "(shuffled fixed-size batches are not Poisson sampling)"), asserted_rate=claimed)
    return SamplingPlan("none", 1.0, float(effective_batch_size),
                        "no sampling information: q = 1, no amplification by subsampling")


def privacy_unit(group_size: int) -> str:
    return ADJACENCY if group_size == 1 else f"add/remove one group of {group_size} consecutive examples"


@functools.lru_cache(maxsize=64)
def _rdp_curve(sigma: float, q: float):
    return rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)


# Below this noise multiplier epsilon is reported as infinite (an upper bound, if a loose one): it is in the
# thousands there anyway, and the accountants' series stop converging in useful time (PRV at 0.02 took 12 s a step,
# RDP at sigma**2 near underflow never ended), which on a shared model host would stall every client on it.
MIN_ACCOUNTED_SIGMA = 0.05


# Memoized: a step's "epsilon before" is the previous step's "epsilon after".
@functools.lru_cache(maxsize=8)
def epsilon_of(mechanism: str, delta: float, history: tuple) -> float:
    """Epsilon spent by ``history`` ((noise multiplier, sample rate, steps), ...) under ``mechanism`` ("rdp" or
    "prv": both upper bounds; tests/unit/privacy/test_accounting.py holds each against Google's dp-accounting PLD)."""
    if mechanism not in ("rdp", "prv"):
        raise ValueError(f"unknown accountant {mechanism!r}: rdp or prv")
    if not history:
        return 0.0
    if any(sigma < MIN_ACCOUNTED_SIGMA for sigma, _, _ in history):
        return math.inf
    if mechanism == "rdp":
        # opacus' compute_rdp is linear in steps, so the one-step RDP curve per (sigma, q) is cached:
        # the same arithmetic as RDPAccountant.get_epsilon without recomputing ~150 orders every step.
        total = sum(_rdp_curve(sigma, q) * steps for sigma, q, steps in history)
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=total, delta=delta)
    else:
        probe = create_accountant(mechanism=mechanism)
        probe.history = list(history)
        eps = probe.get_epsilon(delta=delta)
    eps = float(eps)
    return math.inf if math.isnan(eps) else max(0.0, eps)  # both dip below 0 at a large delta; epsilon >= 0 holds


def steps_by_rate(history) -> dict[tuple[float, float], int]:
    """Steps per (noise multiplier, sample rate): a history may list one pair in several entries."""
    out: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        out[(float(s), float(q))] = out.get((float(s), float(q)), 0) + int(n)
    return out


class Epsilons(NamedTuple):
    total: float
    q1: float
    asserted: Optional[float]


class PrivacyAccountant:
    """opacus' accountant over the dataset's ledger, plus the budget rule: a step that would pass
    ``target_epsilon`` (composed over every client's steps on the data) is refused before it is taken."""

    def __init__(self, cfg: DPConfig, plan: SamplingPlan, ledger: PrivacyLedger, client_id: str = ""):
        self.cfg, self.ledger, self.client_id = cfg, ledger, client_id
        self.use_plan(plan)
        if cfg.noise_multiplier is not None:
            self.noise_multiplier = float(cfg.noise_multiplier)
        else:
            try:  # calibrated at the rate the ledger records: the budget is held on the certified figure
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

    def _epsilon_of(self, history: History) -> float:
        return epsilon_of(self.cfg.accountant_type, self.cfg.target_delta, history)

    def total_epsilon(self) -> float:
        """Composed over every step any client took on this ledger's data, at the rates the server certified."""
        return self._epsilon_of(self.ledger.history())

    def epsilons(self, history: Optional[History] = None) -> Epsilons:
        """The ledger's figures, from one read of it: the certified epsilon; the same steps without amplification
        by subsampling (q = 1: what holds if no sampling claim does); and in ``asserted`` mode the client's claim,
        the steps charged at q = 1 taken at the asserted rate instead (as if every batch the server did not draw had
        been sampled as asserted: not a bound)."""
        history = self.ledger.history() if history is None else history
        rate = self.plan.asserted_rate
        return Epsilons(
            self._epsilon_of(history), self._epsilon_of(tuple((s, 1.0, n) for s, _, n in history)),
            None if rate is None else self._epsilon_of(tuple((s, rate if q == 1.0 else q, n) for s, q, n in history)))

    def claims(self) -> dict:
        """The public privacy claim of weights trained so far (what a receipt states): the certified epsilon first,
        a client's sampling claim only labelled as such."""
        history = self.ledger.history()
        figures = self.epsilons(history)
        out = {"dp": True, "total_epsilon": json_epsilon(figures.total), "delta": self.cfg.target_delta,
               "epsilon_q1": json_epsilon(figures.q1), "dataset_id": self.cfg.dataset_id,
               "accountant": self.cfg.accountant_type, "sampling": self.plan.mode,
               "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.cfg.max_grad_norm,
               "sample_rate": self.sample_rate, "expected_batch_size": self.plan.expected_batch_size,
               "adjacency": privacy_unit(self.cfg.group_size), "group_size": self.cfg.group_size,
               "steps": sum(n for _, _, n in history)}
        if self.plan.asserted_rate is not None:
            out.update({"epsilon_asserted": json_epsilon(figures.asserted),
                        "asserted_sample_rate": self.plan.asserted_rate,
                        "epsilon_asserted_is": "the client's claim of uniform sampling, not certified by the server"})
        return out

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
                limit, delta = budget  # held with RDP whatever the client's accountant
                now = epsilon_of(DATA_BUDGET_ACCOUNTANT, delta, before)
                then = epsilon_of(DATA_BUDGET_ACCOUNTANT, delta, after)
                if then > limit:
                    raise DPBudgetExceededError(
                        f"this step would pass the budget of {self._ledger_name()}: epsilon {now:.4g} -> {then:.4g} "
                        f"> {limit:g} (delta {delta:g}, set by the first client on it); no weights were changed",
                        {"current_epsilon": now, "max_epsilon": limit, "epsilon_after_step": then, "delta": delta})

        budget = (self.cfg.target_epsilon, self.cfg.target_delta) if self.cfg.target_epsilon is not None else None
        self.ledger.spend(self.noise_multiplier, self.sample_rate, check, self.client_id, budget, self.cfg.group_size)
        return spent["before"], spent["after"]

    def _ledger_name(self) -> str:
        return f"dataset {self.cfg.dataset_id!r}" if self.cfg.dataset_id else "this tenant's data"

    def state_dict(self) -> dict:
        """What a checkpoint records (for the record only: loading it never changes the ledger)."""
        return {"history": [list(h) for h in self.ledger.history()], "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "mechanism": self.cfg.accountant_type,
                "dataset_id": self.cfg.dataset_id, "ledger_head": self.ledger.head()}

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
        # (an old backup, an emptied file) would otherwise let these weights claim less than they spent. Both
        # sides summed per (sigma, q) first: a history may list one pair in several entries.
        ledger = steps_by_rate(self.ledger.history())
        for (s, q), n in steps_by_rate(state.get("history") or []).items():
            if ledger.get((s, q), 0) < n:
                raise ValidationError(
                    f"the privacy ledger of {self._ledger_name()} records {ledger.get((s, q), 0)} steps "
                    f"at noise multiplier {s:g} and sample rate {q:g}, but this checkpoint was trained with {n}: the "
                    "ledger was rolled back or replaced. Restore it (spent budget is never given back) before "
                    "loading these weights", {"ledger_steps": ledger.get((s, q), 0), "checkpoint_steps": n})
        # Counts can be refilled (a ledger emptied, then other steps taken): the ledger must still begin with the
        # very lines it held when the checkpoint was saved.
        head = state.get("ledger_head")
        if head is None and self.ledger.head() is not None:
            raise ValidationError(
                f"this checkpoint names no head of the privacy ledger of {self._ledger_name()} (saved before ledgers "
                "were chained, or over a Kubernetes PrivacyBudget): whether this ledger still holds the steps its "
                "weights were trained with cannot be checked, so it is not loaded for training (sampling from it "
                "works)", {"field": "ledger_head"})
        if head is not None and not self.ledger.covers(head):
            raise ValidationError(
                f"the privacy ledger of {self._ledger_name()} no longer begins with the {head['lines']} entries it "
                "held when this checkpoint was saved: it was rolled back or replaced. Restore it (spent budget is "
                "never given back) before loading these weights", {"ledger_lines": head["lines"]})


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

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _draw(self) -> list[torch.Tensor]:
        stream = KeyStream()
        out = []
        for shape, dtype in self._shapes:
            buffer = torch.zeros(shape, dtype=dtype)
            add_secure_normal_(buffer, self._std, stream)
            out.append(buffer)
        return out


class DPGradientAccumulator:
    """Collects clipped per-unit gradients across micro-batches; releases one noisy sum over a fixed denominator.

    The unit is one example, or with ``group_size`` G one group of G consecutive examples: the group's summed
    gradient is clipped as one, so the group moves the update by at most C. A group may span micro-batches (the
    Tinker SDK splits a call into requests by bytes): the rows of a group not yet complete are summed, unclipped,
    until its last row comes; a logical batch that ends inside a group is refused at ``release``."""

    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter], cfg: DPConfig,
                 noise_multiplier: float):
        self.cfg = cfg
        self.group_size = cfg.group_size
        self.hooks = PerExampleGradients(model, params)
        self.params = self.hooks.params
        self.noise = NoiseAhead(self.params, noise_multiplier * cfg.max_grad_norm)
        self.reset()

    def reset(self) -> None:
        self.summed: dict[torch.nn.Parameter, torch.Tensor] = {}
        self.num_examples = 0
        self.num_clipped = 0
        self.num_units = 0
        self.norm_sum = 0.0
        self.clipped_norm_sum = 0.0
        self.open_group: dict[torch.nn.Parameter, torch.Tensor] = {}  # the unclipped sum of a group in progress
        self.open_rows = 0

    def _units(self, grads: dict[torch.nn.Parameter, torch.Tensor]) -> dict[torch.nn.Parameter, torch.Tensor]:
        """Per-example gradients [B, ...] as per-unit gradients [U, ...]: groups of G consecutive rows summed,
        continuing a group left open by the previous micro-batch and leaving the last one open if it is short."""
        size = self.group_size
        if size == 1:
            return grads
        batch = next(iter(grads.values())).shape[0]
        take = min((size - self.open_rows) % size, batch)  # rows that continue the open group
        whole = (batch - take) // size * size
        closed = self.open_rows and self.open_rows + take == size
        units, left = {}, {}
        for p, g in grads.items():
            g = g.to(accumulation_dtype(g.dtype))
            parts = []
            if self.open_rows:
                head = self.open_group[p] + g[:take].sum(dim=0)
                if closed:
                    parts.append(head.unsqueeze(0))
                else:
                    left[p] = head
            if whole:
                parts.append(g[take:take + whole].reshape(whole // size, size, *g.shape[1:]).sum(dim=1))
            if take + whole < batch:
                left[p] = g[take + whole:].sum(dim=0)
            if parts:
                units[p] = torch.cat(parts)
        self.open_rows = (self.open_rows + take) % size if self.open_rows else 0
        self.open_rows += batch - take - whole
        self.open_group = left
        return units

    @contextlib.contextmanager
    def capturing(self):
        """Around a forward and its backward whose loss is a sum of per-example losses (of this accumulator's rows;
        a shared pass holds other slots' rows too, which reach none of these parameters): inside it,
        ``absorb`` takes the per-example gradients."""
        self.noise.start()
        with self.hooks.capture():
            yield

    def absorb(self, batch: int) -> float:
        """Clip the per-unit gradients of the ``batch`` rows just backpropagated and add them to the running sum;
        returns the norm of their clipped sum over the rows."""
        grads = self.hooks.collect()
        missing = [p for p in self.params if p not in grads]
        if missing:
            raise TrainingClientError(
                f"{len(missing)} trainable parameters got no per-example gradient (a module type the DP "
                "hooks do not support, such as LoRA on embeddings); DP cannot be guaranteed"
            )
        for p in self.params:
            p.grad = None  # autograd's batch-summed gradient is not used under DP
        units = self._units(grads)
        self.num_examples += batch
        if not units:
            return 0.0
        summed, norms, factors = clip_and_sum(units, self.cfg.max_grad_norm)
        for p, g in summed.items():
            if p in self.summed:
                self.summed[p].add_(g)
            else:
                self.summed[p] = g
        self.num_units += norms.shape[0]
        self.num_clipped += int((factors < 1.0).sum())
        self.norm_sum += float(norms.sum())
        self.clipped_norm_sum += float((norms * factors).sum())
        mean_sq = sum(float(g.pow(2).sum()) for g in summed.values())
        return math.sqrt(mean_sq) / batch

    def close(self) -> None:
        self.hooks.close()
        self.noise.close()

    def check_whole_groups(self) -> None:
        if self.open_rows:
            raise ValidationError(
                f"the logical batch ends inside a group: {self.open_rows} of its {self.group_size} rows came "
                "(dp group_size); a group is one privacy unit and is clipped whole. The batch was discarded: send "
                "whole groups, in order", {"field": "group_size", "group_size": self.group_size,
                                           "rows_of_open_group": self.open_rows})

    def release(self, denominator: float) -> None:
        """Write (clipped sum + N(0, (sigma C)^2)) / denominator into ``param.grad``, the noise from this step's
        fresh CSPRNG key (NoiseAhead), added in float32 or wider."""
        for p, noise in zip(self.params, self.noise.take()):
            total = self.summed.get(p)
            if total is None:
                total = torch.zeros(p.shape, dtype=accumulation_dtype(p.dtype), device=p.device)
            p.grad = total.add_(noise.to(p.device)).div_(denominator).to(p.dtype)

    def metrics(self, accountant: PrivacyAccountant, before: float, after: float) -> DPMetrics:
        n = max(self.num_units, 1)
        plan = accountant.plan
        figures = accountant.epsilons()
        return DPMetrics(
            noise_applied=True, noise_multiplier=accountant.noise_multiplier,
            epsilon_spent=(after - before) if math.isfinite(after) else math.inf,
            # max: others may have spent on the data since this step's charge
            total_epsilon=max(after, figures.total), epsilon_q1=figures.q1, delta=self.cfg.target_delta,
            grad_norm_before_clip=self.norm_sum / n, grad_norm_after_clip=self.clipped_norm_sum / n,
            num_clipped=self.num_clipped, num_examples=self.num_examples,
            sample_rate=accountant.sample_rate, sampling_assumption=accountant.sampling_assumption,
            accountant_type=self.cfg.accountant_type, sampling=plan.mode,
            expected_batch_size=plan.expected_batch_size, group_size=self.group_size,
            epsilon_asserted=figures.asserted, asserted_sample_rate=plan.asserted_rate,
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
