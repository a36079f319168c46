"""The one way every stage builds its optimizer and steps its learning rate: from an OptimConfig."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from scalelab.config import OptimConfig


def build_optimizer(model: torch.nn.Module | Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over a model (weight decay on its matrices only, through ``optimizer_groups``), or over a list
    of parameters (every one decayed by ``cfg.weight_decay``)."""
    if isinstance(model, torch.nn.Module):
        groups = (model.optimizer_groups(cfg.weight_decay) if hasattr(model, "optimizer_groups")
                  else [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}])
    else:
        groups = [{"params": [p for p in model if p.requires_grad], "weight_decay": cfg.weight_decay}]
    first = next(p for g in groups for p in g["params"])
    # foreach is the fast CPU path; fused exists only on accelerators
    fused = first.device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``: linear warmup, then cosine,
    WSD or constant."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    # WSD: warmup, a long stable plateau, then a linear decay over the last decay_fraction of steps;
    # the plateau's checkpoints can be branched into cheap decays of different lengths.
    decay_steps = max(1, int(round(cfg.decay_fraction * total_steps)))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return peak
    return peak + (floor - peak) * min(1.0, (step - decay_start + 1) / decay_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's rate, scaled by the group's own ``lr_scale`` where it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def clip_grad_norm(params, cfg: OptimConfig) -> torch.Tensor:
    """The global gradient norm, clipped to ``cfg.grad_clip`` (0: measured, never clipped)."""
    return torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
