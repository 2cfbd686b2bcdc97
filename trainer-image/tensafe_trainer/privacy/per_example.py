"""Per-example gradients for every trainable parameter, captured with module hooks.

The loss handed to ``backward`` must be a *sum* of per-example losses, so that row ``b`` of a
module's output gradient comes from example ``b`` alone. For each module that owns trainable
parameters we keep its input activations (forward hook) and its output gradient (tensor hook) and
form per-example gradients directly:

- ``nn.Linear`` (LoRA's A and B, and every projection under full fine-tuning): one einsum.
- ``nn.Embedding``: a scatter-add of the output gradient into the rows that were looked up.
- anything else (RMSNorm weights, ...): ``torch.func.vmap`` over a per-example ``vjp`` of the module.

Only trainable parameters are materialised per example, which for LoRA is a few hundred KB per
example: that is what makes DP on LoRA nearly free.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import nn


def _linear(module: nn.Linear, x: torch.Tensor, go: torch.Tensor) -> dict[str, torch.Tensor]:
    if x.dim() == 2:  # [B, features]: one position per example
        x, go = x.unsqueeze(1), go.unsqueeze(1)
    out = {}
    if module.weight.requires_grad:
        out["weight"] = torch.einsum("bto,bti->boi", go, x)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = go.sum(dim=1)
    return out


def _embedding(module: nn.Embedding, ids: torch.Tensor, go: torch.Tensor) -> dict[str, torch.Tensor]:
    batch = ids.shape[0]
    grad = torch.zeros(batch, *module.weight.shape, dtype=go.dtype, device=go.device)
    index = ids.reshape(batch, -1, 1).expand(-1, -1, go.shape[-1])
    grad.scatter_add_(1, index, go.reshape(batch, -1, go.shape[-1]))
    if module.padding_idx is not None:
        grad[:, module.padding_idx] = 0  # autograd gives the padding row no gradient: neither may its clipped sum
    return {"weight": grad}


def _generic(module: nn.Module, x: torch.Tensor, go: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {n: p.detach() for n, p in module.named_parameters(recurse=False) if p.requires_grad}

    def one_example(xi: torch.Tensor, gi: torch.Tensor):
        def run(p):
            return torch.func.functional_call(module, p, (xi.unsqueeze(0),))

        _, vjp = torch.func.vjp(run, params)
        return vjp(gi.unsqueeze(0))[0]

    return torch.func.vmap(one_example)(x, go)


_RULES: dict[type, Callable] = {nn.Linear: _linear, nn.Embedding: _embedding}


class PerExampleGradients:
    """Hooks a model. Inside :meth:`capture`, each hooked call's output gradient is paired with that call's own
    input activation (held by the hook on its output, not by call order): a call recomputed in the backward
    pass (a checkpointed chunk of the loss, engine/logits.py) adds a call whose output gets no gradient, so it
    records nothing. ``nn.Linear`` and ``nn.Embedding`` calls are reduced to per-example gradients at once (the
    output gradient, for the head a chunk's ``rows x positions x vocabulary``, is not kept); other modules'
    are formed by :meth:`collect`, after backward, since functorch transforms must not run inside autograd's
    engine. :meth:`collect` returns {param: [B, *shape]}, summed over calls (tied weights, chunks)."""

    def __init__(self, model: nn.Module, params: Optional[list[nn.Parameter]] = None):
        """``params``: the parameters to hook (a slot's own, on a host that carries several); default: every
        parameter of ``model`` that requires a gradient."""
        self._handles = []
        self._capturing = False
        self._grads: dict[nn.Parameter, torch.Tensor] = {}
        self._recorded: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        wanted = {id(p) for p in params} if params is not None else {id(p) for p in model.parameters() if p.requires_grad}
        self.params: list[nn.Parameter] = []
        seen = set()
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in wanted]
            if not own:
                continue
            for p in own:
                if id(p) not in seen:
                    seen.add(id(p))
                    self.params.append(p)
            self._handles.append(module.register_forward_hook(self._on_forward))
        if wanted != seen:
            raise RuntimeError("some trainable parameters are not owned by any hooked module")

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def capture(self):
        self._grads, self._recorded = {}, []
        self._capturing = True
        try:
            yield self
        finally:  # a backward that failed leaves no per-example tensor behind
            self._capturing = False
            self._grads, self._recorded = {}, []

    def _on_forward(self, module: nn.Module, inputs, output) -> None:
        if not self._capturing or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return
        activation = inputs[0].detach()
        output.register_hook(lambda grad, m=module, a=activation: self._on_backward(m, a, grad))

    def _on_backward(self, module: nn.Module, activation: torch.Tensor, grad_output: torch.Tensor) -> None:
        rule = _RULES.get(type(module))
        if rule is None:
            self._recorded.append((module, activation, grad_output.detach()))
        else:
            self._add(module, rule(module, activation, grad_output.detach()))

    def _add(self, module: nn.Module, grads: dict[str, torch.Tensor]) -> None:
        for name, grad in grads.items():
            param = getattr(module, name)
            self._grads[param] = self._grads[param] + grad if param in self._grads else grad

    def collect(self) -> dict[nn.Parameter, torch.Tensor]:
        self._capturing = False  # the generic rule calls the module again: that call must not be recorded
        for module, activation, grad_output in self._recorded:
            self._add(module, _generic(module, activation, grad_output))
        grads, self._grads, self._recorded = self._grads, {}, []
        return grads


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Clipped sums and noise are kept in float32 or wider, whatever the model's dtype (bf16 would put a
    clipped contribution above the bound and the noised values on a coarse grid)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_example_norms(grads: dict[nn.Parameter, torch.Tensor]) -> torch.Tensor:
    """L2 norm of each example's whole gradient (all parameters together), shape [B], in float64."""
    squares = [torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1, dtype=torch.float64).square()
               for g in grads.values()]
    return torch.stack(squares).sum(dim=0).sqrt()


def clip_and_sum(
    grads: dict[nn.Parameter, torch.Tensor], max_norm: float
) -> tuple[dict[nn.Parameter, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Clip each example's gradient to ``max_norm`` and sum over examples.

    Norms and clip factors are float64; each sum is float32 or wider (:func:`accumulation_dtype`). An example
    whose gradient is not finite contributes nothing (its factor is 0): a data-dependent failure here would
    otherwise reveal that the example was in the batch.
    Returns (summed clipped gradients, per-example norms before clipping, clip factors).
    """
    norms = per_example_norms(grads)
    finite = torch.isfinite(norms)
    factors = torch.where(finite, (max_norm / (norms + 1e-6)).clamp(max=1.0), 0.0)
    summed = {}
    for p, g in grads.items():
        wide = accumulation_dtype(g.dtype)
        if not bool(finite.all()):  # an overflowed example contributes nothing (0 x inf would poison the sum)
            g = torch.where(finite.view(-1, *[1] * (g.dim() - 1)), g, torch.zeros((), dtype=g.dtype, device=g.device))
        summed[p] = torch.einsum("b,b...->...", factors.to(wide), g.to(wide))
    return summed, norms, factors
