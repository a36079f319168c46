"""What every post-training stage shares: checkpoints, log-probabilities, batches and the step loop.

The starting run and the stage's own run folder are scalelab.run.Run objects (Run.open, Run.create).
"""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from scalelab.config import TrainConfig
from scalelab.errors import ScalelabError
from scalelab.infer.engine import Engine, GenerationParams
from scalelab.model.gpt import GPT
from scalelab.posttrain.chat import chat_stop_ids, prompt_ids
from scalelab.posttrain.mixture import exact_match_reward
from scalelab.run import CHECKPOINTS_DIR
from scalelab.runtime import autocast_context
from scalelab import checkpoint as ckpt
from scalelab.train.metrics import MetricsLogger
from scalelab.train.optim import lr_at, optimizer_step, set_lr


def stage_train_config(train: TrainConfig, section) -> TrainConfig:
    """The loop settings of [train] (log_every, dtype) with the stage's own steps, batch size and optimizer."""
    return replace(train, steps=section.steps, batch_size=section.batch_size, optim=section.optim, grad_accum=1)


def save(run: Path, model: GPT, optimizer, step: int, stage: str) -> Path:
    return ckpt.save_checkpoint(run / CHECKPOINTS_DIR, model, optimizer, step, {"stage": stage})


def progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)


def token_logprobs(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) for every t: shape (B, T-1)."""
    logits = model(ids[:, :-1]).float()
    return torch.gather(F.log_softmax(logits, -1), 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def sequence_logprob(model: GPT, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the tokens ``mask`` marks (the reply), one value per row."""
    return (token_logprobs(model, ids) * mask[:, 1:].float()).sum(-1)


def epoch_batches(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Row indices, batch by batch, reshuffled each epoch, forever."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield order[i : i + batch_size]


def run_steps(
    params,
    optimizer: torch.optim.Optimizer,
    train: TrainConfig,
    step_fn: Callable[[int], tuple[torch.Tensor, dict]],
    eval_fn: Callable[[], dict] | None,
    eval_every: int,
    logger: MetricsLogger,
    device: torch.device,
    desc: str,
    show_progress: bool,
) -> tuple[list[float], dict]:
    """The shared loop of SFT, RM and DPO: schedule, step, clip, log, evaluate. Returns losses and the last eval."""
    bar = progress(show_progress, train.steps, desc)
    losses, last_eval, start = [], {}, time.perf_counter()
    params = [p for p in params if p.requires_grad]
    for step in range(train.steps):
        lr = lr_at(step, train.optim, train.steps)
        set_lr(optimizer, lr)
        with autocast_context(device, train.dtype):
            loss, stats = step_fn(step)
        grad_norm = optimizer_step(loss, optimizer, params, train.optim)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ScalelabError(f"{desc} loss became {value} at step {step + 1}; lower the learning rate or check the data")
        losses.append(value)
        done = step + 1
        if done % train.log_every == 0 or done == train.steps:
            logger.log(kind="train", step=done, loss=value, lr=lr, grad_norm=float(grad_norm),
                       elapsed=time.perf_counter() - start, **stats)
        if eval_fn is not None and (done % eval_every == 0 or done == train.steps):
            last_eval = eval_fn()
            logger.log(kind="eval", step=done, elapsed=time.perf_counter() - start, **last_eval)
        if bar:
            bar.set_postfix(loss=f"{value:.3f}")
            bar.update(1)
    if bar:
        bar.close()
    return losses, last_eval


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (what fine-tuning a model costs in RAM)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kilobytes


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def generate_replies(model: GPT, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                     seed: int = 0, max_batch: int = 32):
    """One reply per prompt through the batched KV-cache engine; stops at the end of the assistant turn."""
    was_training = model.training
    engine = Engine(model, tokenizer, max_batch=max(1, min(max_batch, len(prompts))))
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=1.0, seed=seed,
                              stop_token_ids=chat_stop_ids(tokenizer))
    try:
        return engine.generate(prompts, params)
    finally:
        model.train(was_training)


def chat_exact_match(model: GPT, tokenizer, records: list[dict], max_new_tokens: int = 32) -> dict:
    """Greedy replies to held-out instruction records, scored by exact match: overall and per task family."""
    ctx = model.config.block_size
    usable = [(r, prompt_ids(tokenizer, r["messages"][:-1])) for r in records if "answer" in r]
    usable = [(r, p) for r, p in usable if len(p) < ctx]
    if not usable:
        return {}
    outs = generate_replies(model, tokenizer, [p for _, p in usable], max_new_tokens)
    by_task: dict[str, list[float]] = {}
    for (r, _), c in zip(usable, outs):
        by_task.setdefault(r["task"], []).append(exact_match_reward(c.text, r["answer"]))
    scores = [s for v in by_task.values() for s in v]
    out = {"exact_match": sum(scores) / len(scores), "exact_match_n": len(scores)}
    out.update({f"exact_match/{k}": sum(v) / len(v) for k, v in sorted(by_task.items())})
    return out
