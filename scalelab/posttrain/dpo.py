"""Direct Preference Optimization (Rafailov et al., 2023) against a frozen reference model.

With log-ratios against the reference, rho_c = log pi(y_c|x) - log ref(y_c|x) and rho_r likewise,

    loss = -(1 - eps) log sigmoid(beta (rho_c - rho_r)) - eps log sigmoid(-beta (rho_c - rho_r))

(eps = label_smoothing, 0 for plain DPO). beta * rho is the implicit reward; its
held-out pairwise accuracy is reported like a reward model's.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from scalelab.config import Config
from scalelab.posttrain import common
from scalelab.posttrain.common import sequence_logprob
from scalelab.posttrain.data import preference_batch, split_holdout, tokenize_preferences, write_jsonl
from scalelab.posttrain.reward_model import load_pairs, tokenized_or_fail
from scalelab.run import Run
from scalelab.runtime import autocast_context, resolve_device, seed_everything
from scalelab.train.metrics import MetricsLogger
from scalelab.train.optim import build_optimizer


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0):
    """Mean DPO loss over pairs of summed reply log-probs; also the implicit rewards of both replies."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    logits = chosen_reward - rejected_reward
    loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return loss.mean(), chosen_reward.detach(), rejected_reward.detach()


@torch.no_grad()
def reference_logprobs(model, rows, pad_id: int, batch_size: int, device) -> torch.Tensor:
    """Summed reply log-probs under the frozen reference, chosen and rejected per pair: shape (N, 2).

    Computed once: the reference never changes, so DPO then needs one model in each step.
    """
    out = []
    for i in range(0, len(rows), batch_size):
        ids, mask, _, _ = preference_batch(rows[i : i + batch_size], pad_id)
        lp = sequence_logprob(model, ids.to(device), mask.to(device))
        out.append(torch.stack(lp.chunk(2), 1).cpu())
    return torch.cat(out)


def run_dpo(cfg: Config, init_dir: str | Path, overwrite: bool = False) -> dict:
    """DPO from the --init run (normally SFT) on preference pairs; the --init model is also the reference."""
    device = resolve_device(cfg.run.device)
    seed_everything(cfg.run.seed)
    init = Run.open(init_dir)
    init_model = init.load_model(device)
    run = Run.create(cfg, "dpo", init, overwrite).path
    tok, d = init.tokenizer, cfg.dpo
    policy = init_model.train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    train_p, val_p = split_holdout(load_pairs(d, init.world, cfg.run.seed), d.val_fraction, cfg.run.seed)
    block = policy.config.block_size
    train_rows, dropped = tokenized_or_fail(tok, train_p, block, "training")
    val_rows = tokenize_preferences(tok, val_p, block)[0]
    write_jsonl(run / "dpo_val.jsonl", [p.to_json() for p in val_p])
    tcfg = common.stage_train_config(cfg.train, d)
    # Same precision as the policy's forward passes, so policy == reference gives exactly log 2 at step one.
    with autocast_context(device, tcfg.dtype):
        ref_train = reference_logprobs(reference, train_rows, tok.bos_id, tcfg.batch_size, device)
        ref_val = reference_logprobs(reference, val_rows, tok.bos_id, tcfg.batch_size, device) if val_rows else None
    optimizer = build_optimizer(policy, tcfg.optim)
    logger = MetricsLogger(run / "metrics.jsonl")
    logger.log(kind="setup", step=0, stage="dpo", pairs=len(train_rows), val_pairs=len(val_rows),
               dropped_too_long=dropped, beta=d.beta, params=policy.num_params())
    batches = common.epoch_batches(len(train_rows), min(tcfg.batch_size, len(train_rows)), cfg.run.seed)

    def step_fn(step):
        idx = next(batches)
        ids, mask, _, _ = preference_batch([train_rows[i] for i in idx.tolist()], tok.bos_id)
        pc, pr = common.sequence_logprob(policy, ids.to(device), mask.to(device)).chunk(2)
        ref = ref_train[idx].to(device)
        loss, rc, rr = dpo_loss(pc, pr, ref[:, 0], ref[:, 1], d.beta, d.label_smoothing)
        return loss, {"reward_accuracy": float((rc > rr).float().mean()), "reward_margin": float((rc - rr).mean()),
                      "chosen_reward": float(rc.mean()), "rejected_reward": float(rr.mean())}

    @torch.no_grad()
    def eval_fn():
        if not val_rows:
            return {}
        was = policy.training
        policy.eval()
        losses, wins = [], []
        for i in range(0, len(val_rows), tcfg.batch_size):
            ids, mask, _, _ = preference_batch(val_rows[i : i + tcfg.batch_size], tok.bos_id)
            with autocast_context(device, tcfg.dtype):
                pc, pr = common.sequence_logprob(policy, ids.to(device), mask.to(device)).chunk(2)
            ref = ref_val[i : i + tcfg.batch_size].to(device)
            loss, rc, rr = dpo_loss(pc, pr, ref[:, 0], ref[:, 1], d.beta, d.label_smoothing)
            losses.append(float(loss) * len(pc))
            wins += (rc > rr).float().tolist()
        policy.train(was)
        return {"val_loss": sum(losses) / len(wins), "val_reward_accuracy": sum(wins) / len(wins)}

    t0 = time.perf_counter()
    losses, last = common.run_steps(policy.parameters(), optimizer, tcfg, step_fn, eval_fn, d.eval_every, logger,
                                    device, "dpo", cfg.run.progress)
    path = common.save(run, policy, optimizer, tcfg.steps, "dpo")
    summary = {"stage": "dpo", "init": str(init.path), "steps": tcfg.steps, "final_loss": losses[-1], **last,
               "peak_rss_mb": common.peak_rss_mb(),
               "checkpoint": str(path), "wall_seconds": time.perf_counter() - t0}
    records = [_record(p) for p in val_p if "answer" in p.meta]
    if records:
        summary.update(common.chat_exact_match(policy, tok, records[:128], cfg.eval.max_new_tokens))
        logger.log(kind="eval", step=tcfg.steps, **{k: v for k, v in summary.items() if k.startswith("exact_match")})
    logger.close()
    common.write_json(run / "summary.json", summary)
    return summary


def _record(p) -> dict:
    prompt = [{"role": "user", "content": p.prompt}] if isinstance(p.prompt, str) else p.prompt
    return {"messages": prompt + [{"role": "assistant", "content": p.meta["answer"]}], "task": p.meta.get("task", "?"),
            "answer": p.meta["answer"]}
