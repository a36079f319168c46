"""Fine-tuning modes for a task head, and the one training loop every head and mode shares.

Modes (what gets gradients):

- ``full``: the whole backbone and the head;
- ``last_k``: the last k transformer blocks and the head;
- ``frozen``: the head only (a probe trained by gradient descent, on frozen features);
- ``lora``: low-rank adapters on chosen Linear layers of the backbone, and the head.

LoRA comes from ``peft``: ``inject_adapter_in_model`` swaps each targeted nn.Linear of our GPT for
a LoRA layer (the frozen base weight plus B @ A, B zero-initialised so training starts from the
pretrained function); it needs nothing from HF transformers, so the backbone stays the project's GPT.
"""

from __future__ import annotations

import random
import time

import torch

from scalelab.config import OptimConfig
from scalelab.errors import ScalelabError
from scalelab.train.optim import build_optimizer, lr_at, optimizer_step, set_lr

MODES = ("full", "last_k", "frozen", "lora")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")


def add_lora(backbone, rank: int, alpha: float, targets: list[str]) -> list[str]:
    """Inject LoRA adapters into ``backbone`` in place; returns the adapted module names."""
    # deferred: peft is an optional extra (pip install scalelab[peft])
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ScalelabError(f"invalid config: LoRA rank must be at least 1, got {rank}")
    bad = sorted(set(targets) - set(LORA_TARGETS))
    if bad or not targets:
        raise ScalelabError(f"invalid LoRA target {bad[0] if bad else '(none)'!r} (choose from {', '.join(LORA_TARGETS)})")
    present = {n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = sorted(set(targets) - present)
    if missing:
        raise ScalelabError(f"the model has no {missing[0]!r} layers to adapt (this MLP kind lacks it)")
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets)),
                            backbone)
    return sorted({n.rsplit(".lora_", 1)[0] for n, _ in backbone.named_parameters() if ".lora_" in n})


def set_mode(head, mode: str, last_k: int = 1, lora_rank: int = 4, lora_alpha: float = 8.0,
             lora_targets: list[str] | tuple[str, ...] = ("q_proj", "v_proj")) -> dict:
    """Mark which parameters of ``head`` (a TaskHead) train in ``mode``; returns a description of the mode."""
    backbone = head.backbone
    if mode not in MODES:
        raise ScalelabError(f"unknown fine-tuning mode {mode!r} (choose from {', '.join(MODES)})")
    info = {"mode": mode}
    if mode == "lora":
        info["adapted"] = add_lora(backbone, lora_rank, lora_alpha, list(lora_targets))
        info |= {"rank": lora_rank, "alpha": lora_alpha}
    for name, p in backbone.named_parameters():
        if mode == "full":
            p.requires_grad_(True)
        elif mode == "lora":
            p.requires_grad_(".lora_" in name)
        else:
            p.requires_grad_(False)
    if mode == "last_k":
        depth = len(backbone.blocks)
        if not 1 <= last_k <= depth:
            raise ScalelabError(f"invalid config: last_k must be between 1 and the model depth {depth}, got {last_k}")
        for block in backbone.blocks[depth - last_k:]:
            block.requires_grad_(True)
        info["last_k"] = last_k
    if mode in ("full", "last_k") and not head.uses_lm_head and not backbone.config.tie_embeddings:
        # A classification head never reads lm_head: it would get no gradient, so it is not counted as trained.
        backbone.lm_head.weight.requires_grad_(False)
    if head.uses_lm_head:
        # For the generation head the LM head *is* the head: it trains in every mode.
        backbone.lm_head.weight.requires_grad_(True)
    for p in head.head_parameters():
        p.requires_grad_(True)
    info["trainable_params"] = trainable_parameters(head)
    return info


def trainable_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _batches(n: int, batch_size: int, seed: int):
    """Endless shuffled epochs of indices."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield order[i : i + batch_size]


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_head(head, rows: list, steps: int, optim: OptimConfig, batch_size: int = 32, seed: int = 0) -> dict:
    """``steps`` updates of the trainable parameters with ``optim`` (a stage's optimizer section, usually
    [sft.optim]: rate, warmup, schedule, weight decay, clip); returns losses and wall time."""
    if not rows:
        raise ScalelabError("no training examples")
    if steps < 0 or optim.lr <= 0 or batch_size < 1:
        raise ScalelabError("invalid config: steps >= 0, lr > 0 and batch_size >= 1 are required")
    params = [p for p in head.parameters() if p.requires_grad]
    if not params:
        raise ScalelabError("nothing to train: every parameter is frozen")
    torch.manual_seed(seed)
    opt = build_optimizer(params, optim)
    batches = _batches(len(rows), min(batch_size, len(rows)), seed)
    device = head.device
    losses = []
    head.train()
    t0 = time.perf_counter()
    for step in range(steps):
        set_lr(opt, lr_at(step, optim, steps))
        loss = head.loss(_to(head.collate([rows[i] for i in next(batches)]), device))
        optimizer_step(loss, opt, params, optim)
        losses.append(loss.item())
    head.eval()
    return {"losses": losses, "seconds": time.perf_counter() - t0}


@torch.no_grad()
def evaluate_head(head, rows: list, batch_size: int = 64) -> dict:
    """The head's metrics over ``rows`` (``finish`` of the summed ``score`` counts) and its mean loss."""
    if not rows:
        raise ScalelabError("no evaluation examples")
    was = head.training
    head.eval()
    total: dict = {}
    loss_sum = 0.0
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            b = _to(head.collate(chunk), head.device)
            for k, v in head.score(b).items():
                total[k] = total.get(k, 0) + v
            loss_sum += head.loss(b).item() * len(chunk)
    finally:
        head.train(was)
    return head.finish(total) | {"loss": loss_sum / len(rows), "n": len(rows)}


def base_weights_unchanged(adapted, original) -> bool:
    """Whether every weight of ``original`` still sits unchanged in ``adapted`` (a LoRA-injected copy of it)."""
    mine = {k.replace(".base_layer.", "."): v for k, v in adapted.state_dict().items() if ".lora_" not in k}
    theirs = original.state_dict()
    return set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)
