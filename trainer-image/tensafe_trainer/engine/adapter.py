"""An adapter slot: one client's trainable part on a model host (host.py), its optimizer, and the
accumulated gradient of a logical batch.

Not thread-safe by design: a training client's operations run one at a time, in order, on the
session's worker thread.

Loss conventions:
- ``labels[b][t]`` is the target for position t (already shifted); -100 positions are ignored.
- Without DP, the objective is the mean NLL over every label token in the logical batch (all
  micro-batches since the last ``optim_step``): gradients are summed and divided by the total
  token count at ``optim_step``, so accumulation equals one large batch exactly.
- With DP, each example's loss is the mean NLL over its own tokens, so that one example's
  gradient does not depend on the others; see privacy.py. A DP client on a registered dataset draws
  its logical batches on the server (``forward_backward_sampled``) and refuses batches of the client's.
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from tg_tinker.config import TrainingConfig
from tg_tinker.errors import TrainingClientError, ValidationError
from tg_tinker.types import (
    IGNORE_INDEX,
    BatchData,
    ForwardBackwardResult,
    AdamStep,
    ForwardResult,
    LossSpec,
    OptimStepResult,
)

from tensafe_trainer.engine.host import ModelHost, canonical_name, owns
from tensafe_trainer.engine.logits import causal_lm, chunk_for, row_logprobs
from tensafe_trainer.privacy.ledger import PrivacyLedger
from tensafe_trainer.engine.losses import get_loss
from tensafe_trainer.engine.memory import (
    TRAINING_BYTES_PER_CELL,
    activation_bytes_per_token,
    check_request_memory,
    check_trainable_state,
    request_memory_need,
)
from tensafe_trainer.engine.passes import PassPart, forward_backward_pass
from tensafe_trainer.engine.optim import apply_adam_step, build_optimizer, set_learning_rate
from tensafe_trainer.privacy.dp import DPGradientAccumulator, PrivacyAccountant, check_noise_request, plan_sampling
from tensafe_trainer.privacy.secure_random import bernoulli_mask

CHECKPOINT_FORMAT = 1
# Fields that define the model: a checkpoint only loads into a client whose config agrees on them.
MODEL_DEFINING = ("model_ref", "lora_config", "dtype")
CROSS_ENTROPY = LossSpec()


def pad_examples(examples: list[dict]) -> BatchData:
    """Examples of a registered dataset (``DatasetExample`` dicts) as one right-padded micro-batch."""
    width = max(len(e["input_ids"]) for e in examples)
    ids, mask, labels = [], [], []
    for e in examples:
        row, gap = e["input_ids"], width - len(e["input_ids"])
        ids.append(row + [0] * gap)
        mask.append((e.get("attention_mask") or [1] * len(row)) + [0] * gap)
        targets = e.get("labels") or row[1:] + [IGNORE_INDEX]
        labels.append(targets + [IGNORE_INDEX] * gap)
    return BatchData(input_ids=ids, attention_mask=mask, labels=labels)


class AdapterSlot:
    """``host``: the model host it trains on (default: a host of its own, for its config); LoRA slots share one.
    ``ledger``: the privacy ledger of the data (required with DP). ``dataset``: the examples of the registered
    dataset ``dp_config.dataset_id`` names, which this client then samples on the server. ``find_dataset``: looks
    for it again at the first ``forward_backward_sampled`` (a dataset registered after the client started, as on
    Kubernetes, where it is registered through the client's own trainer)."""

    def __init__(self, config: TrainingConfig, *, host: Optional[ModelHost] = None,
                 ledger: Optional[PrivacyLedger] = None, dataset: Optional[list[dict]] = None, client_id: str = "",
                 find_dataset: Optional[Callable[[], Optional[list[dict]]]] = None):
        self.config = config
        self.host = host if host is not None else ModelHost.for_config(config)
        self.device, self.dtype = self.host.device, self.host.dtype
        self.tokenizer, self.vocab_size, self.eos_token_id = (self.host.tokenizer, self.host.vocab_size,
                                                              self.host.eos_token_id)
        self.model, self.adapter = self.host.attach(config)  # adapter: its name on the host (None: the base itself)
        # Its rows may join other slots' in one pass (engine/passes.py); not with LoRA dropout, whose masks would
        # come from one random stream for every slot of the pass.
        self.shares_passes = self.host.routes(self.adapter) and not (config.lora_config and config.lora_config.dropout)
        self._randomness = _start_randomness(config.seed, self.device)
        self.logits_chunk = chunk_for(self.model)  # positions whose logits exist at once
        self.activation_bytes_per_token = activation_bytes_per_token(causal_lm(self.model).config)
        self.trainable = {canonical_name(n, self.adapter): p for n, p in self.model.named_parameters()
                          if (owns(n, self.adapter) if self.adapter is not None else p.requires_grad)}
        check_trainable_state(sum(p.numel() for p in self.trainable.values()),
                              config.batch_size if config.dp_enabled else 0)
        self.optimizer = build_optimizer(self.trainable.values(), config.optimizer)
        self.step = 0
        self.dp: Optional[DPGradientAccumulator] = None
        self.accountant: Optional[PrivacyAccountant] = None
        self.dataset = dataset
        self._find_dataset = find_dataset
        self._own_batches = False  # the client has trained on batches it sent: it cannot start sampling
        if dataset is not None and not config.dp_enabled:
            raise ValidationError("server-side sampling of a registered dataset is a DP mechanism: enable dp_config",
                                  {"field": "dp_config"})
        if config.dp_enabled:
            if ledger is None:
                raise ValueError("a DP engine needs the privacy ledger of its data")
            plan = plan_sampling(config.dp_config, config.effective_batch_size, dataset is not None)
            self.accountant = PrivacyAccountant(config.dp_config, plan, ledger, client_id)
            self.dp = DPGradientAccumulator(self.model, list(self.trainable.values()), config.dp_config,
                                            self.accountant.noise_multiplier)
        self._draw_failed = False
        self._batch_lost = False
        self._draw_charge: tuple[float, float] = (0.0, 0.0)
        # A Poisson batch was drawn since the last step. Only optim_step clears it (not a load_state or a
        # discarded batch): a second draw summed into the same release would double the sampling rate.
        self._sampled = False
        self._reset_accumulation()
        if dataset is not None:
            self._check_examples(dataset)

    def _check_examples(self, dataset: list[dict]) -> None:
        """Every registered example must run: a draw that failed on one would reveal that it was drawn."""
        name = self.config.dp_config.dataset_id
        top = max(max(max(e["input_ids"]), max(e.get("labels") or [0])) for e in dataset)
        if top >= self.vocab_size:
            raise ValidationError(
                f"dataset {name!r} holds token id {top}, outside the model's vocabulary of {self.vocab_size}",
                {"field": "dp_config.dataset_id", "token_id": top, "vocab_size": self.vocab_size})
        longest = max(len(e["input_ids"]) for e in dataset)
        if longest > self.config.max_seq_len:
            raise ValidationError(f"dataset {name!r} holds an example of {longest} tokens, more than max_seq_len="
                                  f"{self.config.max_seq_len}", {"field": "dp_config.dataset_id", "length": longest})
        self._run_worst_case(dataset)

    def _run_worst_case(self, dataset: list[dict]) -> None:
        """Run the largest micro-batch a draw can make (batch_size copies of the longest example) before any draw,
        and forget it: memory that fails here fails before a step is public, not at a draw that happened to be
        large (which would reveal that long examples were drawn)."""
        longest = max(dataset, key=lambda e: len(e["input_ids"]))
        try:
            self._forward_backward(pad_examples([longest] * self.config.batch_size), capped=False)
        except Exception as exc:
            raise TrainingClientError(
                f"this client cannot run the largest micro-batch a draw of dataset {self.config.dp_config.dataset_id!r}"
                f" can make (batch_size {self.config.batch_size} x {len(longest['input_ids'])} tokens: "
                f"{type(exc).__name__}); lower batch_size") from None
        finally:
            for p in self.trainable.values():
                p.grad = None
            self._reset_accumulation()

    # --- batches -----------------------------------------------------------------------------

    def _tensors(self, batch: BatchData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, width = batch.shape
        if rows > self.config.batch_size:
            raise ValidationError(
                f"batch has {rows} examples, more than batch_size={self.config.batch_size}",
                {"field": "input_ids", "rows": rows, "batch_size": self.config.batch_size},
            )
        if width > self.config.max_seq_len:
            raise ValidationError(
                f"sequence length {width} exceeds max_seq_len={self.config.max_seq_len}",
                {"field": "input_ids", "length": width, "max_seq_len": self.config.max_seq_len},
            )
        check_request_memory(**self._training_pass(rows, width))  # the door's check, before the load too
        ids = torch.tensor(batch.input_ids, dtype=torch.long)
        mask = (torch.tensor(batch.attention_mask, dtype=torch.long) if batch.attention_mask is not None
                else torch.ones_like(ids))
        if batch.labels is not None:
            labels = torch.tensor(batch.labels, dtype=torch.long)
        else:  # next-token prediction on the input itself
            labels = torch.full_like(ids, IGNORE_INDEX)
            labels[:, :-1] = ids[:, 1:]
        labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
        for name, tensor in (("input_ids", ids), ("labels", labels)):
            top = int(tensor.max())
            if top >= self.vocab_size:
                raise ValidationError(
                    f"{name} holds token id {top}, outside the model's vocabulary of {self.vocab_size}",
                    {"field": name, "token_id": top, "vocab_size": self.vocab_size},
                )
        return ids.to(self.device), mask.to(self.device), labels.to(self.device)

    def _token_nll(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token negative log-likelihood, [B, T], zero at ignored positions."""
        return -row_logprobs(self.model, ids, mask, labels, self.logits_chunk)

    # --- training ----------------------------------------------------------------------------

    def _reset_accumulation(self) -> None:
        self._grad_sum: Optional[list[torch.Tensor]] = None
        self._tokens = 0
        self._reduction: Optional[str] = None
        if self.dp is not None:
            self.dp.reset()

    @property
    def gradient_sum(self) -> Optional[list[torch.Tensor]]:
        """Without DP: the logical batch's summed gradient so far, one tensor per trainable parameter; None if none."""
        return self._grad_sum

    @property
    def samples_on_server(self) -> bool:
        return self.dataset is not None

    def _start_sampling(self) -> None:
        """Sample a dataset registered since the client started, if it has not trained on its own batches."""
        found = None
        if self.dp is not None and not self._own_batches and self._find_dataset is not None:
            found = self._find_dataset()
        if found is None:
            why = " (this client has trained on its own batches)" if self._own_batches else ""
            raise ValidationError("forward_backward_sampled needs dp_config.dataset_id naming a registered dataset"
                                  + why, {"operation": "forward_backward_sampled"})
        self._check_examples(found)
        self.accountant.use_plan(plan_sampling(self.config.dp_config, self.config.effective_batch_size, True))
        self.dataset = found

    def _refuse_after_failed_draw(self) -> None:
        if self._draw_failed:
            raise TrainingClientError("a Poisson draw of this client failed earlier: it releases no further step; "
                                      "start a new client from the last checkpoint")

    def forward_backward(self, batch: BatchData, spec: LossSpec = CROSS_ENTROPY) -> ForwardBackwardResult:
        return self._run(self.begin_client_batch(batch, spec))

    def begin_client_batch(self, batch: BatchData, spec: LossSpec = CROSS_ENTROPY) -> PassPart:
        """A forward_backward of the client's own batch as its part of a pass (its host may run it beside others')."""
        if self.samples_on_server:
            raise ValidationError(
                f"this client samples registered dataset {self.config.dp_config.dataset_id!r} on the server: "
                "call forward_backward_sampled(); client-supplied batches would void the sampling guarantee",
                {"operation": "forward_backward"})
        self._own_batches = True
        return self.begin(batch, spec)

    def training_pass_bytes(self, rows: int, width: int) -> int:
        """What a training pass of ``rows`` x ``width`` tokens needs (the request budget's count: memory.py)."""
        return request_memory_need(**self._training_pass(rows, width))

    def _training_pass(self, rows: int, width: int) -> dict:
        """A training pass of ``rows`` x ``width`` tokens as memory.py counts it: logits of one chunk of positions
        at a time, activations of every token."""
        return dict(rows=rows, width=min(width, self.logits_chunk or width), vocab_size=self.vocab_size,
                    bytes_per_cell=TRAINING_BYTES_PER_CELL, full_width=width,
                    activations_per_token=self.activation_bytes_per_token)

    def forward_backward_sampled(self) -> ForwardBackwardResult:
        """Draw one logical batch: each example of the registered dataset independently with probability q
        (CSPRNG coins), run it in micro-batches of ``batch_size``, and accumulate. One draw per optim_step."""
        if not self.samples_on_server:
            self._start_sampling()
        self._refuse_after_failed_draw()
        if self._sampled:
            raise ValidationError("a Poisson logical batch was already drawn for this step: call optim_step first "
                                  "(a second draw would double the sampling rate)",
                                  {"operation": "forward_backward_sampled"})
        # A draw is spent when it is drawn: charged in the data's ledger (durably, or refused past the budget)
        # before a coin is tossed, whether or not an optim_step follows. A client that sees a draw and abandons it
        # (a new client, a restart, a replaced pod, a discard) has paid for it.
        self._draw_charge = self.accountant.spend_step()
        self._sampled = True
        chosen = bernoulli_mask(len(self.dataset), self.accountant.sample_rate).nonzero().flatten().tolist()
        size = self.config.batch_size
        loss_sum, tokens, grad_sq, count = 0.0, 0, 0.0, 0
        try:
            for start in range(0, len(chosen), size):
                part = self._forward_backward(pad_examples([self.dataset[i] for i in chosen[start:start + size]]),
                                              capped=False)
                loss_sum += part.loss * part.tokens_processed
                tokens += part.tokens_processed
                count += part.num_examples
        except Exception as exc:
            # Releasing part of a draw would make one example's presence move the boundary of what was summed;
            # releasing noise alone would make the failure itself the signal. So nothing more is released.
            self.discard_gradients()
            self._draw_failed = True
            raise TrainingClientError(
                f"a Poisson draw failed part way ({type(exc).__name__}); to keep the guarantee this client releases "
                "no further step: start a new client from the last checkpoint") from None
        if self.dp.summed:
            grad_sq = sum(float(g.pow(2).sum()) for g in self.dp.summed.values())
        return ForwardBackwardResult(loss=loss_sum / max(tokens, 1), grad_norm=math.sqrt(grad_sq) / max(count, 1),
                                     tokens_processed=tokens, num_examples=count)

    def _forward_backward(self, batch: BatchData, capped: bool = True,
                          spec: LossSpec = CROSS_ENTROPY) -> ForwardBackwardResult:
        return self._run(self.begin(batch, spec, capped=capped))

    @staticmethod
    def _run(part: PassPart) -> ForwardBackwardResult:
        (outcome,) = forward_backward_pass([part])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def begin(self, batch: BatchData, spec: LossSpec = CROSS_ENTROPY, capped: bool = True) -> PassPart:
        """This slot's rows for a forward/backward pass (engine/passes.py), checked: nothing runs yet."""
        loss = get_loss(spec.loss_fn)
        settings = loss.settings(spec.loss_fn_config)
        ids, mask, labels = self._tensors(batch)
        inputs = self._loss_inputs(batch, loss, labels)
        self._check_reduction(spec.reduction)
        if capped and self.dp is not None and self.dp.num_examples + ids.shape[0] > self.config.effective_batch_size:
            raise ValidationError(
                f"a DP logical batch holds at most batch_size x gradient_accumulation_steps = "
                f"{self.config.effective_batch_size} examples (the accountant's sampling rate assumes it); "
                "call optim_step first", {"field": "input_ids"},
            )
        return PassPart(self, spec, loss, settings, ids, mask, labels, inputs)

    def objective(self, part: PassPart, logprobs: torch.Tensor) -> torch.Tensor:
        """What this slot's rows add to the pass's loss, given their log-probabilities: the sum of their token losses
        (their mean is taken at optim_step), or under DP the sum of per-example losses, a non-finite row's zeroed."""
        part.logprobs = logprobs
        per_token = self._per_token(part.loss, part.settings, part.inputs, logprobs, part.valid)
        if self.dp is None:
            part.per_token = self._finite(per_token)
            return part.per_token.sum()
        part.kept = torch.isfinite(per_token).all(dim=1)
        part.per_token = torch.where(part.kept.unsqueeze(1), per_token, 0.0)
        summed = part.per_token.sum(dim=1)
        if part.spec.reduction != "sum":
            summed = summed / part.token_counts.clamp(min=1).to(summed.dtype)
        return summed.sum()

    def conclude(self, part: PassPart) -> ForwardBackwardResult:
        """After the pass's backward: this slot's gradients into its logical batch (clipped per example under DP,
        inside the DP accumulator's capture)."""
        if self.dp is not None:
            grad_norm = self.dp.absorb(part.rows)
            n_tokens = int(part.token_counts[part.kept].sum())
        else:
            n_tokens = int(part.token_counts.sum())
            grad_norm = self._accumulate(n_tokens)
        total = float(part.per_token.detach().sum())
        return ForwardBackwardResult(loss=total / max(n_tokens, 1), grad_norm=grad_norm, tokens_processed=n_tokens,
                                     num_examples=part.rows, loss_sum=total,
                                     logprobs=self._rows(part.logprobs, part.valid) if part.spec.return_logprobs
                                     else None)

    def _check_reduction(self, reduction: str) -> None:
        """One logical batch reduces one way: a mean over its tokens and a plain sum do not mix."""
        if self._reduction is not None and self._reduction != reduction:
            raise ValidationError(f"this logical batch is reduced by {self._reduction!r}; a {reduction!r} "
                                  "forward_backward cannot join it: call optim_step first", {"field": "reduction"})
        self._reduction = reduction

    def _loss_inputs(self, batch: BatchData, loss, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        given = batch.loss_inputs or {}
        loss.check_inputs(set(given))
        tensors = {name: torch.tensor(rows, dtype=torch.float64) for name, rows in given.items()}
        for name, default in loss.optional.items():
            tensors.setdefault(name, torch.full(labels.shape, default, dtype=torch.float64))
        return {name: t.to(self.device) for name, t in tensors.items()}

    @staticmethod
    def _per_token(loss, settings: dict, inputs: dict[str, torch.Tensor], logprobs: torch.Tensor,
                   valid: torch.Tensor) -> torch.Tensor:
        """The loss of each token, zero where there is no target."""
        return torch.where(valid, loss.fn(logprobs, {k: v.to(logprobs.dtype) for k, v in inputs.items()}, settings),
                           0.0)

    @staticmethod
    def _rows(logprobs: torch.Tensor, valid: torch.Tensor) -> list[list[Optional[float]]]:
        return [[(float(v) if k else None) for v, k in zip(row, krow)]
                for row, krow in zip(logprobs.detach().tolist(), valid.tolist())]

    @staticmethod
    def _finite(nll: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(nll).all()):
            raise TrainingClientError("the loss is not finite for this batch; nothing was accumulated")
        return nll

    def _accumulate(self, n_tokens: int) -> float:
        """Move this micro-batch's summed gradient into the logical batch's sum; return its mean's norm."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.trainable.values()]
        for p in self.trainable.values():
            p.grad = None
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        if self._grad_sum is None:
            self._grad_sum = grads
        else:
            torch._foreach_add_(self._grad_sum, grads)
        self._tokens += n_tokens
        return norm / max(n_tokens, 1)

    def optim_step(self, apply_dp_noise: Optional[bool] = None, adam: Optional[AdamStep] = None) -> OptimStepResult:
        check_noise_request(self.dp is not None, apply_dp_noise)
        dp_metrics = None
        if self.dp is not None:
            self._refuse_after_failed_draw()
            self._refuse_a_partial_batch()
            if self.samples_on_server:
                if not self._sampled:
                    raise ValidationError("call forward_backward_sampled() before optim_step: the step's logical "
                                          "batch is drawn on the server", {"operation": "optim_step"})
                before, after = self._draw_charge  # charged when drawn
            else:
                before, after = self.accountant.spend_step()  # in the ledger, or raises: before any weight changes
            # The fixed public denominator: the expected batch size for a mean; none for a plain sum.
            self.dp.release(1.0 if self._reduction == "sum" else self.accountant.plan.expected_batch_size)
            dp_metrics = self.dp.metrics(self.accountant, before, after)
        elif self._grad_sum is not None:
            scale = 1.0 if self._reduction == "sum" else 1.0 / max(self._tokens, 1)
            for p, g in zip(self.trainable.values(), self._grad_sum):
                p.grad = g.mul_(scale)
        if adam is not None:
            lr = apply_adam_step(self.optimizer, self.trainable.values(), adam)
        else:
            lr = set_learning_rate(self.optimizer, self.config.optimizer, self.step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._sampled = False
        self._reset_accumulation()
        return OptimStepResult(step=self.step, learning_rate=lr, dp_metrics=dp_metrics)

    @torch.no_grad()
    def forward(self, batch: BatchData, spec: LossSpec = CROSS_ENTROPY) -> ForwardResult:
        loss = get_loss(spec.loss_fn)
        settings = loss.settings(spec.loss_fn_config)
        ids, mask, labels = self._tensors(batch)
        inputs = self._loss_inputs(batch, loss, labels)
        self.model.eval()
        try:
            logprobs = -self._token_nll(ids, mask, labels)
        finally:
            self.model.train()
        valid = labels != IGNORE_INDEX
        per_token = self._per_token(loss, settings, inputs, logprobs, valid)
        n_tokens = int(valid.sum())
        total = float(per_token.sum())
        return ForwardResult(loss=total / max(n_tokens, 1), tokens_processed=n_tokens,
                             logprobs=self._rows(logprobs, valid), loss_sum=total)

    def discard_gradients(self) -> None:
        """Forget a half-finished logical batch (after a failed operation). Under DP the step of that batch is then
        refused: the next optim_step would release a sum missing the rows before the failure."""
        if self.dp is not None and (self.dp.num_examples or self.dp.open_rows):
            self._batch_lost = True
        for p in self.trainable.values():
            p.grad = None
        self._reset_accumulation()

    def _refuse_a_partial_batch(self) -> None:
        lost, self._batch_lost = self._batch_lost, False
        try:
            if lost:
                raise ValidationError("this step's logical batch lost its earlier rows when a forward_backward failed: "
                                      "under DP its step is refused and the batch discarded; send the batch again",
                                      {"operation": "optim_step"})
            self.dp.check_whole_groups()
        except ValidationError:
            self._reset_accumulation()
            raise

    @property
    def public_model_name(self) -> str:
        return self.host.public_model_name

    @property
    def total_epsilon(self) -> Optional[float]:
        return self.accountant.total_epsilon() if self.accountant is not None else None

    def privacy_claims(self) -> dict:
        return self.accountant.claims() if self.accountant is not None else {"dp": False}

    def adapter_files(self) -> dict[str, bytes]:
        """The PEFT adapter folder that ``peft.PeftModel.from_pretrained`` loads, built in memory:
        ``adapter_config.json`` and ``adapter_model.safetensors``, as ``save_pretrained`` writes them."""
        import json

        from peft import get_peft_model_state_dict
        from safetensors.torch import save as save_safetensors

        if self.config.lora_config is None:
            raise ValidationError("this client does full fine-tuning: there is no adapter to export; "
                                  "use save_state for the full weights", {"field": "lora_config"})
        weights = {k: v.detach().cpu().contiguous()
                   # the adapter's own weights: not the base's embeddings, tied to the head, which PEFT adds once any
                   # slot of the host has LoRA on them (and which safetensors refuses as shared memory)
                   for k, v in get_peft_model_state_dict(self.model, adapter_name=self.adapter,
                                                         save_embedding_layers=False).items()}
        config = self.model.peft_config[self.adapter].to_dict()
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
        config["inference_mode"] = True
        return {"adapter_config.json": json.dumps(config, indent=2, sort_keys=True).encode(),
                "adapter_model.safetensors": save_safetensors(weights, metadata={"format": "pt"})}

    def export_adapter(self, folder: Path) -> list[str]:
        """Write the adapter folder (``adapter_files``) at ``folder``."""
        from tensafe_trainer.storage.artifacts import write_private_folder

        return write_private_folder(Path(folder), self.adapter_files())

    @contextlib.contextmanager
    def own_randomness(self):
        """Inside: torch's global generators (LoRA dropout draws from them) hold this slot's own stream, started from
        its seed and carried on from its last operation. On a shared host no slot's draws then move another's: one
        client cannot learn from its own dropout how many numbers a neighbour's batch drew."""
        outer = _randomness(self.device)
        _set_randomness(self.device, self._randomness)
        try:
            yield
        finally:
            self._randomness = _randomness(self.device)
            _set_randomness(self.device, outer)

    def forget_pass(self) -> None:
        """Drop what a pass that failed as a whole left in this slot's parameters (its logical batch is untouched)."""
        for p in self.trainable.values():
            p.grad = None

    def activate(self) -> None:
        """Make this slot's adapter the one its host's next pass runs with: before each of its operations."""
        self.host.activate(self.adapter)

    def close(self) -> None:
        """Leave the host: the adapter's weights go, and with this object its optimizer and accumulators."""
        if self.dp is not None:
            self.dp.close()
        self.host.detach(self.adapter)

    # --- checkpoints -------------------------------------------------------------------------

    def state_dict(self, include_optimizer: bool) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "config": self.config.model_dump(mode="json"),
            "trainable": {n: p.detach().cpu().clone() for n, p in self.trainable.items()},
            "optimizer": self.optimizer.state_dict() if include_optimizer else None,
            "accountant": self.accountant.state_dict() if self.accountant is not None else None,
        }

    def _check_fits(self, state: dict[str, Any]) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValidationError(f"unsupported checkpoint format {state.get('format')!r}")
        saved = TrainingConfig.parse(state["config"])
        for field in MODEL_DEFINING:
            if getattr(saved, field) != getattr(self.config, field):
                raise ValidationError(
                    f"checkpoint does not fit this client: {field} differs "
                    f"({getattr(saved, field)!r} vs {getattr(self.config, field)!r})", {"field": field})
        if set(state["trainable"]) != set(self.trainable):
            raise ValidationError("checkpoint parameters do not match this client's trainable parameters")

    def load_weights(self, state: dict[str, Any]) -> None:
        """Only the trained weights (for sampling)."""
        self._check_fits(state)
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(state["trainable"][name])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Weights, optimizer state, step and privacy accounting: training resumes exactly."""
        self._check_fits(state)  # every check before anything changes: a refused load leaves the client as it was
        if (state["accountant"] is None) != (self.accountant is None):
            raise ValidationError("checkpoint and client disagree on whether DP is enabled")
        if self.accountant is not None:
            self.accountant.check_checkpoint(state["accountant"])  # the ledger, not the checkpoint, holds the spend
        self.load_weights(state)
        if state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            self.optimizer = build_optimizer(self.trainable.values(), self.config.optimizer)
        self.step = int(state["step"])
        self._reset_accumulation()


def _start_randomness(seed: int, device: torch.device) -> tuple:
    cpu = torch.Generator().manual_seed(seed).get_state()
    if device.type != "cuda":
        return (cpu, None)
    return (cpu, torch.Generator(device=device).manual_seed(seed).get_state())


def _randomness(device: torch.device) -> tuple:
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_randomness(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def write_state(state: dict[str, Any], out) -> None:
    torch.save(state, out)


def serialize_state(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    write_state(state, buffer)
    return buffer.getvalue()


def deserialize_state(data: bytes) -> dict[str, Any]:
    # weights_only: a checkpoint is data, never code, even after it decrypted correctly.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
