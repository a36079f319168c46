"""The one way every stage builds its optimizer and steps its learning rate: from an OptimConfig."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor, Replicate
# Muon's shape-adjusted rate, reused so that ShardedMuon scales its steps exactly as torch.optim.Muon does.
from torch.optim._muon import _adjust_lr

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
    # CPU keeps foreach: fused AdamW also runs on CPU, but a 10M-parameter compiled step was only 0.98x as long
    # with it, within the rounds' spread (bench/pretrain_throughput.py --variants), and foreach keeps the
    # recorded runs' numerics
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
    ns_dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.muon_ns_dtype]
    muon = ShardedMuon([{"params": matrices, "lr_scale": cfg.muon_lr / cfg.lr}], lr=cfg.muon_lr,
                       momentum=cfg.muon_momentum, weight_decay=cfg.muon_weight_decay, ns_dtype=ns_dtype)
    return MuonAdamW(adamw([{"params": rest, "weight_decay": 0.0}]), muon) if rest else muon


def _closure_loss(closure):
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def orthogonalize(updates: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration (the one torch.optim.Muon runs) on a stack of same-shape
    matrices (n, rows, cols) at once, in ``dtype``; returns the stack in ``dtype``.

    Ours rather than torch's per-matrix ``_zeropower_via_newtonschulz`` for two measured reasons
    (bench/muon_step.py): torch always iterates in bfloat16, which on a CPU without bf16 matrix units is
    slower than float32, and one batched matmul per shape replaces a Python loop of small matmuls."""
    a, b, c = coefficients
    x = updates.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide side: the Gram matrix is the smaller square
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where matrix units make it fast (CUDA, as torch.optim.Muon always does), float32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class ShardedMuon(torch.optim.Muon):
    """torch.optim.Muon, stepping same-shape matrices together, in a dtype that suits the device, and also
    DTensor parameters (FSDP2, TP).

    - The orthogonalisation needs the whole matrix, so a DTensor's momentum update is gathered
      (``full_tensor``), orthogonalised identically on every rank, and each rank keeps its own shard of
      the result. The momentum buffer stays sharded like the parameter.
    - ``ns_dtype``: the Newton-Schulz dtype; None picks ``default_ns_dtype`` per device. With bfloat16 this
      is torch.optim.Muon's arithmetic up to the order of the batched matmuls.
    - At most ``stack_numel`` elements are orthogonalised in one stack, which bounds the extra memory
      a gathered (FSDP) stack costs to about that many elements."""

    def __init__(self, params, *args, ns_dtype: torch.dtype | None = None, stack_numel: int = 1 << 24, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.ns_dtype, self.stack_numel = ns_dtype, stack_numel

    def _stacks(self, updates: list[torch.Tensor]) -> list[list[int]]:
        """Indices of ``updates`` grouped by shape and device, each group cut to at most stack_numel elements."""
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for i, u in enumerate(updates):
            by_shape[(tuple(u.shape), u.device)].append(i)
        stacks = []
        for indices in by_shape.values():
            per = max(1, self.stack_numel // updates[indices[0]].numel())
            stacks += [indices[k:k + per] for k in range(0, len(indices), per)]
        return stacks

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            for stack in self._stacks(updates):
                chunk = [updates[i] for i in stack]
                first = chunk[0]
                dtype = self.ns_dtype or default_ns_dtype(first.device)
                full = torch.stack([u.full_tensor() if isinstance(u, DTensor) else u for u in chunk])
                ortho = orthogonalize(full, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
                steps = []
                for u, o in zip(chunk, ortho.unbind(0)):
                    if isinstance(u, DTensor):
                        # Replicate -> the parameter's placements is a local slice: no communication.
                        o = DTensor.from_local(o, u.device_mesh, [Replicate()] * u.device_mesh.ndim,
                                               run_check=False).redistribute(u.device_mesh, u.placements)
                    steps.append(o.to(first.dtype))
                targets = [params[i] for i in stack]
                if decay:
                    torch._foreach_mul_(targets, 1 - lr * decay)
                torch._foreach_add_(targets, steps, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], first.shape))
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
