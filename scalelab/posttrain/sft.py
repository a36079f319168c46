"""Instruction tuning: next-token loss on assistant tokens only, over packed chat conversations."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from scalelab.config import Config, TrainConfig
from scalelab.errors import ScalelabError
from scalelab.model.gpt import GPT
from scalelab.posttrain import common, lora
from scalelab.posttrain.data import (
    load_conversations,
    load_hf_conversations,
    masked_targets,
    pack,
    pad_rows,
    split_holdout,
    tokenize_conversations,
    write_jsonl,
)
from scalelab.posttrain.mixture import instruction_mixture, people_group
from scalelab.run import Run
from scalelab.runtime import resolve_device, seed_everything
from scalelab.train.metrics import MetricsLogger
from scalelab.train.optim import build_optimizer


def sft_loss(model: GPT, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the tokens ``mask`` marks; everything else is target -1, which GPT ignores."""
    x, y = masked_targets(ids, mask)
    return model(x, y)


def token_distill_loss(model: GPT, ids: torch.Tensor, mask: torch.Tensor, teacher: GPT,
                       temperature: float = 1.0) -> torch.Tensor:
    """Token-level distillation ("logit distillation"): KL(teacher || model) between the next-token distributions
    at the positions whose target ``mask`` marks, averaged over those positions. Both distributions are softened
    by ``temperature`` and the loss is scaled by its square, so the gradient keeps its size as the temperature
    changes (Hinton et al. 2015). The two models must share a vocabulary; the teacher gets no gradient."""
    x, keep = ids[:, :-1], mask[:, 1:].bool()
    with torch.no_grad():
        target = F.log_softmax(teacher(x)[keep].float() / temperature, dim=-1)
    log_probs = F.log_softmax(model(x)[keep].float() / temperature, dim=-1)
    return F.kl_div(log_probs, target, log_target=True, reduction="batchmean") * temperature ** 2


def sft_on_batches(init: GPT, batch_fn, tcfg: TrainConfig, log_path: Path, desc: str,
                   loss_fn=sft_loss) -> tuple[GPT, list[float]]:
    """A copy of ``init`` trained for ``tcfg.steps`` steps on ``batch_fn(step) -> (ids, mask)``, the loss on the
    tokens ``mask`` marks; logged to ``log_path``. (The copy in eval mode, its losses.) A study's SFT condition.
    ``loss_fn(model, ids, mask)``: next-token cross-entropy by default; token_distill_loss (with its teacher
    bound) distils instead."""
    model = copy.deepcopy(init).train()
    device = next(model.parameters()).device
    optimizer = build_optimizer(model, tcfg.optim)

    def step_fn(step):
        ids, mask = batch_fn(step)
        return loss_fn(model, ids.to(device), mask.to(device)), {}

    logger = MetricsLogger(log_path)
    losses, _ = common.run_steps(model.parameters(), optimizer, tcfg, step_fn, None, 1, logger, device, desc, False)
    logger.close()
    return model.eval(), losses


def load_sft_records(cfg: Config, world) -> list[dict]:
    """Records with "messages" (and, for the mixture, "task" and "answer")."""
    s = cfg.sft
    if s.data == "mixture":
        if world is None:
            raise ScalelabError("sft.data = 'mixture' needs a run trained on the synthetic world (its world.json); "
                                "use sft.data = 'jsonl' or 'hf' for other runs")
        return instruction_mixture(world, s.n_examples, seed=cfg.run.seed, families=s.families,
                                   people=people_group(world, s.people))
    if s.data == "jsonl":
        convs = load_conversations(s.path, s.messages_field)
    else:
        convs = load_hf_conversations(s.path, s.split, s.messages_field)
    return [{"messages": m} for m in convs]


def build_blocks(tokenizer, records: list[dict], block_size: int, packed: bool, seed: int):
    """(ids, mask) tensors of shape (N, block_size + 1) and how many conversations did not fit at all."""
    rows, dropped = tokenize_conversations(tokenizer, [r["messages"] for r in records], block_size + 1)
    if not rows:
        return None, dropped
    if packed:
        return pack(rows, block_size + 1, tokenizer.bos_id, seed=seed), dropped
    return pad_rows(rows, block_size + 1, tokenizer.bos_id), dropped


@torch.no_grad()
def masked_eval_loss(model: GPT, ids: torch.Tensor, mask: torch.Tensor, batch_size: int, device) -> float:
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(ids), batch_size):
        x, y = masked_targets(ids[i : i + batch_size].to(device), mask[i : i + batch_size].to(device))
        total += float(model(x, y, reduction="sum"))
        count += int((y != -1).sum())
    model.train(was)
    return total / max(count, 1)


def run_sft(cfg: Config, init_dir: str | Path, overwrite: bool = False) -> dict:
    """Fine-tune the --init run on chat data; writes a run folder with checkpoints, metrics and summary."""
    device = resolve_device(cfg.run.device)
    seed_everything(cfg.run.seed)
    init = Run.open(init_dir)
    init_model = init.load_model(device)
    run = Run.create(cfg, "sft", init, overwrite).path
    model, tok = init_model.train(), init.tokenizer
    records = load_sft_records(cfg, init.world)
    train_recs, val_recs = split_holdout(records, cfg.sft.val_fraction, cfg.run.seed)
    block = model.config.block_size
    (train_ids, train_mask), dropped = _blocks_or_fail(tok, train_recs, block, cfg)
    val = build_blocks(tok, val_recs, block, cfg.sft.pack, cfg.run.seed)[0] if val_recs else None
    write_jsonl(run / "sft_val.jsonl", val_recs)
    tcfg = common.stage_train_config(cfg.train, cfg.sft)
    s = cfg.sft
    trainable = lora.attach(model, s.lora_rank, s.lora_alpha, s.lora_targets) if s.lora_rank else model.num_params()
    optimizer = build_optimizer(model, tcfg.optim)
    logger = MetricsLogger(run / "metrics.jsonl")
    logger.log(kind="setup", step=0, stage="sft", conversations=len(train_recs), blocks=len(train_ids),
               dropped_too_long=dropped, trained_tokens=int(train_mask[:, 1:].sum()), params=model.num_params(),
               trainable_params=trainable, lora_rank=s.lora_rank)
    batches = common.epoch_batches(len(train_ids), min(tcfg.batch_size, len(train_ids)), cfg.run.seed)

    def step_fn(step):
        idx = next(batches)
        ids, mask = train_ids[idx].to(device), train_mask[idx].to(device)
        return sft_loss(model, ids, mask), {"tokens_trained": int(mask[:, 1:].sum())}

    def eval_fn():
        if val is None:
            return {}
        return {"val_loss": masked_eval_loss(model, val[0], val[1], tcfg.batch_size, device)}

    t0 = time.perf_counter()
    losses, last = common.run_steps(model.parameters(), optimizer, tcfg, step_fn, eval_fn, cfg.sft.eval_every, logger,
                                    device, "sft", cfg.run.progress)
    peak_rss = common.peak_rss_mb()  # of training itself, before merging makes a second copy
    if s.lora_rank:
        lora.save_adapter(model, run / lora.ADAPTER_FILE, s.lora_rank, s.lora_alpha)
        model = lora.merged_model(model, s.lora_rank, s.lora_alpha)
    path = common.save(run, model, optimizer, tcfg.steps, "sft")
    summary = {"stage": "sft", "init": str(init.path), "steps": tcfg.steps, "final_loss": losses[-1], **last,
               "peak_rss_mb": peak_rss, "trainable_params": trainable,
               "checkpoint": str(path), "wall_seconds": time.perf_counter() - t0}
    if cfg.sft.data == "mixture" and val_recs:
        summary.update(common.chat_exact_match(model, tok, val_recs[:128], cfg.eval.max_new_tokens))
        logger.log(kind="eval", step=tcfg.steps, **{k: v for k, v in summary.items() if k.startswith("exact_match")})
    logger.close()
    common.write_json(run / "summary.json", summary)
    return summary


def _blocks_or_fail(tok, records, block, cfg):
    out, dropped = build_blocks(tok, records, block, cfg.sft.pack, cfg.run.seed)
    if out is None:
        raise ScalelabError(f"no SFT conversation has an assistant token within the model's context of {block} tokens")
    return out, dropped
