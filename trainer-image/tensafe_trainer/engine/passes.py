"""One forward/backward pass over the rows of one or several slots of a host, each row routed to its own adapter.

Several LoRA clients of one base model whose forward_backward operations are ready at once run them as one pass
(the host process decides which: engine/process.py): their rows are stacked (right-padded to the widest, which a
causal model's real positions never attend to), each row goes through the base model and its own slot's adapter
(host.routed: a slice of the rows per adapter), each slot's loss is formed from its own rows only and the pass
backpropagates their sum once. A slot's adapter touches only its own rows, and rows do not mix in a causal LM, so
each slot's gradient is the one it would get alone (to floating-point rounding: the base's matrix products run
over more rows). Under DP each slot's per-example gradients come from its own adapter's hooks, clipped to its C
and noised at its optim_step from its own key; the other slots' rows reach none of its parameters.

A slot whose part fails on its own (a non-finite loss; anything failing while its gradients are taken into its
logical batch) gets its error; the others go on. Anything failing in the forward or backward, before any part has
taken its gradients, fails the pass, and the host process runs each part again alone: nothing is taken twice.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from tg_tinker.errors import TGTinkerError
from tg_tinker.types import IGNORE_INDEX, ForwardBackwardResult, LossSpec

from tensafe_trainer.engine.logits import row_logprobs


@dataclass
class PassPart:
    """One slot's rows in a pass, checked (AdapterSlot.begin), and what the pass computed of them."""

    slot: Any  # the AdapterSlot
    spec: LossSpec
    loss: Any  # the loss function's registry entry (engine/losses.py)
    settings: dict
    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    inputs: dict[str, torch.Tensor]
    logprobs: Optional[torch.Tensor] = None
    per_token: Optional[torch.Tensor] = None
    kept: Optional[torch.Tensor] = None  # under DP: the rows whose loss was finite
    valid: torch.Tensor = field(init=False)
    token_counts: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.valid = self.labels != IGNORE_INDEX
        self.token_counts = self.valid.sum(dim=1)

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])


def _stack(parts: list[PassPart]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(p.width for p in parts)

    def padded(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return (torch.cat([padded(p.ids, 0) for p in parts]), torch.cat([padded(p.mask, 0) for p in parts]),
            torch.cat([padded(p.labels, IGNORE_INDEX) for p in parts]))


def forward_backward_pass(parts: list[PassPart]) -> list[Union[ForwardBackwardResult, BaseException]]:
    """Run the parts' rows in one pass; each part's result, or the error that part alone failed with."""
    first = parts[0].slot
    outcomes: list[Union[ForwardBackwardResult, BaseException, None]] = [None] * len(parts)
    if len(parts) == 1:
        ids, mask, labels = parts[0].ids, parts[0].mask, parts[0].labels
    else:
        ids, mask, labels = _stack(parts)
    with contextlib.ExitStack() as stack:
        if len(parts) > 1:
            spans, start = [], 0
            for part in parts:
                spans.append((part.slot.adapter, start, start + part.rows))
                start += part.rows
            stack.enter_context(first.host.routed(spans))
        for part in parts:
            if part.slot.dp is not None:
                stack.enter_context(part.slot.dp.capturing())
        first.model.train()
        logprobs = row_logprobs(first.model, ids, mask, labels, first.logits_chunk)
        objectives, start = [], 0
        for i, part in enumerate(parts):
            try:
                objectives.append(part.slot.objective(part, logprobs[start:start + part.rows, :part.width]))
            except TGTinkerError as exc:  # this part's own failure (its loss is not finite): the others go on
                outcomes[i] = exc
            start += part.rows
        if objectives:
            torch.stack(objectives).sum().backward()
        for i, part in enumerate(parts):
            if outcomes[i] is None:
                try:
                    outcomes[i] = part.slot.conclude(part)
                except Exception as exc:  # noqa: BLE001 - this part's own failure, after others may have concluded:
                    outcomes[i] = exc  # the pass must not fail as a whole now (it would run concluded parts again)
            if isinstance(outcomes[i], BaseException):
                part.slot.forget_pass()  # the backward still reached its adapter (zero, or NaN from its own rows)
    return outcomes
