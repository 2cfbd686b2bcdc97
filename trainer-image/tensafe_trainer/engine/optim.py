"""Optimizers and learning-rate schedules from an ``OptimizerConfig``."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from tg_tinker.config import OptimizerConfig
from tg_tinker.errors import ValidationError
from tg_tinker.types import AdamStep


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.betas, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, betas=cfg.betas, eps=cfg.eps,
                                weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "adafactor":
        return torch.optim.Adafactor(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                     eps=(None, 1e-3))
    raise ValueError(f"unknown optimizer {cfg.name!r}")  # the config's Literal makes this unreachable


def lr_factor(cfg: OptimizerConfig, step: int) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.lr_schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, step: int) -> float:
    lr = cfg.learning_rate * lr_factor(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def apply_adam_step(optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter], step: AdamStep) -> float:
    """Set this step's Adam hyperparameters (Tinker's AdamParams) and clip the gradient's global norm."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise ValidationError(f"per-step Adam parameters need an Adam optimizer, this client has "
                              f"{type(optimizer).__name__}", {"field": "adam"})
    for group in optimizer.param_groups:
        group.update(lr=step.learning_rate, betas=(step.beta1, step.beta2), eps=step.eps,
                     weight_decay=step.weight_decay)
    if step.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], step.grad_clip_norm)
    return step.learning_rate
