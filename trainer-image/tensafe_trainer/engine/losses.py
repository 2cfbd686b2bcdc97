"""The loss registry: each loss a pure per-token function of the model's target logprobs.

A loss maps ``logprobs`` (the trained model's log-probability of each target token, [B, T], carrying
gradient) and the caller's per-token ``inputs`` (float tensors of the same shape) to a per-token loss.
The engine masks padding, reduces (a sum per datum, then over the batch or, under DP, clipped per
datum) and differentiates; a loss never sees another datum, which is what lets DP-SGD clip one datum's
gradient. The names, inputs and formulas are those of Tinker's built-in losses
(https://tinker-docs.thinkingmachines.ai/losses), so the same ``loss_fn`` means the same objective on
both front doors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

from tg_tinker.errors import ValidationError

if TYPE_CHECKING:  # the functions use tensor methods only, so the server checks names and inputs without torch
    from torch import Tensor

MAX_CONFIG_MAGNITUDE = 1e6  # a finite 1e300 still overflows in the loss (as a server error, the batch lost)
PerTokenLoss = Callable[["Tensor", Mapping[str, "Tensor"], Mapping[str, float]], "Tensor"]


@dataclass(frozen=True)
class Loss:
    name: str
    fn: PerTokenLoss
    inputs: tuple[str, ...]  # per-token float inputs besides target_tokens, all required
    optional: Mapping[str, float] = field(default_factory=dict)  # per-token inputs with a constant default
    config: Mapping[str, float] = field(default_factory=dict)  # loss_fn_config keys and their defaults

    def settings(self, given: Mapping[str, object] | None) -> dict[str, float]:
        """The loss's config: its defaults, overridden by the caller's known, finite keys."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.config))
        if unknown:
            raise ValidationError(f"loss_fn {self.name!r} takes no config {unknown}; it takes {sorted(self.config)}",
                                  {"field": "loss_fn_config", "unknown": unknown})
        settings = dict(self.config)
        for key, value in given.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or abs(value) > MAX_CONFIG_MAGNITUDE:
                raise ValidationError(f"loss_fn_config[{key!r}] must be a number within +-{MAX_CONFIG_MAGNITUDE:g}",
                                      {"field": f"loss_fn_config.{key}"})
            settings[key] = float(value)
        if settings.get("clip_low_threshold", 0.0) > settings.get("clip_high_threshold", math.inf):
            raise ValidationError("loss_fn_config: clip_low_threshold must not exceed clip_high_threshold",
                                  {"field": "loss_fn_config.clip_low_threshold"})
        return settings

    def check_inputs(self, given: set[str]) -> None:
        missing = sorted(set(self.inputs) - given)
        unknown = sorted(given - set(self.inputs) - set(self.optional))
        if missing or unknown:
            wants = ["target_tokens", *self.inputs, *(f"{k} (optional)" for k in self.optional)]
            what = f"lacks {missing}" if missing else f"has inputs it does not use {unknown}"
            raise ValidationError(f"loss_fn {self.name!r} {what}: it takes {wants}",
                                  {"field": "loss_fn_inputs", "missing": missing, "unknown": unknown})


def _ratio(logprobs: "Tensor", sampled: "Tensor") -> "Tensor":
    return (logprobs - sampled).exp()


def cross_entropy(logprobs, inputs, config):
    return -logprobs * inputs["weights"]


def importance_sampling(logprobs, inputs, config):
    return -_ratio(logprobs, inputs["logprobs"]) * inputs["advantages"]


def ppo(logprobs, inputs, config):
    ratio = _ratio(logprobs, inputs["logprobs"])
    clipped = ratio.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
    advantages = inputs["advantages"]
    return -(ratio * advantages).minimum(clipped * advantages)


def cispo(logprobs, inputs, config):
    ratio = _ratio(logprobs, inputs["logprobs"])
    clipped = ratio.clamp(config["clip_low_threshold"], config["clip_high_threshold"]).detach()
    return -clipped * logprobs * inputs["advantages"]


def dro(logprobs, inputs, config):
    penalty = (logprobs - inputs["logprobs"]).pow(2)
    return -(logprobs * inputs["advantages"] - 0.5 * config["beta"] * penalty)


_CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
_POLICY = ("logprobs", "advantages")

LOSSES: dict[str, Loss] = {loss.name: loss for loss in (
    Loss("cross_entropy", cross_entropy, (), optional={"weights": 1.0}),
    Loss("importance_sampling", importance_sampling, _POLICY),
    Loss("ppo", ppo, _POLICY, config=_CLIP),
    Loss("cispo", cispo, _POLICY, config=_CLIP),
    Loss("dro", dro, _POLICY, config={"beta": 0.05}),
)}


def get_loss(name: str) -> Loss:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValidationError(f"unknown loss_fn {name!r}; this trainer has {sorted(LOSSES)}",
                              {"field": "loss_fn", "known": sorted(LOSSES)}) from None
