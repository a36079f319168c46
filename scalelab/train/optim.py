"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch

from scalelab.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    groups = model.optimizer_groups(cfg.weight_decay)
    # foreach is the fast CPU path; fused exists only on accelerators
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine, WSD or constant."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    # WSD: warmup, a long stable plateau, then a linear decay over the last decay_fraction of steps;
    # the plateau's checkpoints can be branched into cheap decays of different lengths.
    decay_steps = max(1, int(round(cfg.decay_fraction * cfg.steps)))
    decay_start = cfg.steps - decay_steps
    if step < decay_start:
        return peak
    return peak + (floor - peak) * min(1.0, (step - decay_start + 1) / decay_steps)
