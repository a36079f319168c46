"""The one way every stage builds its optimizer and steps its learning rate: from an OptimConfig."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor, Replicate
# Muon's orthogonalisation and shape-adjusted rate, reused so that ShardedMuon computes exactly what
# torch.optim.Muon does; only the gather around them is ours.
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

from scalelab.config import OptimConfig


def _param_groups(model: torch.nn.Module | Iterable[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """[matrices (decayed), the rest (not)] for a model with ``optimizer_groups``; one decayed group otherwise."""
    if isinstance(model, torch.nn.Module):
        if hasattr(model, "optimizer_groups"):
            return model.optimizer_groups(weight_decay)
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    return [{"params": [p for p in model if p.requires_grad], "weight_decay": weight_decay}]


def build_optimizer(model: torch.nn.Module | Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over a model (weight decay on its matrices only, through ``optimizer_groups``), or over a list
    of parameters (every one decayed by ``cfg.weight_decay``).

    ``cfg.name == "muon"``: Muon on the hidden matrices (the decayed group of ``optimizer_groups``; without
    it, every 2-D parameter) and AdamW on the rest, as one optimizer (MuonAdamW)."""
    groups = _param_groups(model, cfg.weight_decay)
    first = next(p for g in groups for p in g["params"])
    # foreach is the fast CPU path; fused exists only on accelerators
    fused = first.device.type == "cuda"

    def adamw(groups: list[dict]) -> torch.optim.AdamW:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)

    if cfg.name != "muon":
        return adamw(groups)
    if len(groups) == 2:  # optimizer_groups: [hidden matrices, embeddings + lm_head + norms]
        matrices, rest = groups[0]["params"], groups[1]["params"]
    else:
        params = groups[0]["params"]
        matrices, rest = [p for p in params if p.dim() == 2], [p for p in params if p.dim() != 2]
    if not matrices:
        return adamw([{"params": rest, "weight_decay": 0.0}])
    muon = ShardedMuon([{"params": matrices, "lr_scale": cfg.muon_lr / cfg.lr}], lr=cfg.muon_lr,
                       momentum=cfg.muon_momentum, weight_decay=cfg.muon_weight_decay)
    return MuonAdamW(adamw([{"params": rest, "weight_decay": 0.0}]), muon) if rest else muon


def _closure_loss(closure):
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class ShardedMuon(torch.optim.Muon):
    """torch.optim.Muon that also steps DTensor parameters (FSDP2, TP): the orthogonalisation needs the whole
    matrix, so the momentum update is gathered (``full_tensor``), orthogonalised identically on every rank,
    and each rank keeps its own shard of the result. The momentum buffer stays sharded like the parameter.
    On plain tensors this is the same arithmetic as torch.optim.Muon's single-tensor path."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                full = update.full_tensor() if isinstance(update, DTensor) else update
                ortho = _zeropower_via_newtonschulz(full, group["ns_coefficients"], group["ns_steps"], group["eps"])
                if isinstance(update, DTensor):
                    # Replicate -> the parameter's placements is a local slice: no communication.
                    ortho = DTensor.from_local(ortho, update.device_mesh, [Replicate()] * update.device_mesh.ndim,
                                               run_check=False).redistribute(update.device_mesh, update.placements)
                p.mul_(1 - lr * decay)
                p.add_(ortho, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer over two: AdamW's groups first, then Muon's, sharing one state table, so that
    ``param_groups``, ``state_dict`` and DCP's optimizer state see a single ordinary optimizer.
    A group's ``lr_scale`` (Muon's: muon_lr / lr) keeps the two rates in ratio under set_lr."""

    def __init__(self, adamw: torch.optim.AdamW, muon: ShardedMuon):
        self.adamw, self.muon = adamw, muon
        super().__init__(adamw.param_groups + muon.param_groups, {})
        self._share()

    def _share(self) -> None:
        n = len(self.adamw.param_groups)
        self.adamw.param_groups, self.muon.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.adamw.state = self.muon.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        self.adamw.step()
        self.muon.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # rebuilds param_groups and state: hand them to both halves again
        self._share()


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


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params, cfg: OptimConfig) -> torch.Tensor:
    """One update from ``loss``: backward, clip to ``cfg.grad_clip`` (0: measured, never clipped), step, and
    clear the gradients for the next one. Returns the gradient norm before clipping."""
    loss.backward()
    grad_norm = clip_grad_norm(params, cfg)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
