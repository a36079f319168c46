"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022), one sample per prompt.

Per rollout batch:

1. the policy writes replies through the batched KV-cache engine;
2. each reply gets a sequence score (a reward model, or a verifiable check), optionally whitened
   over the batch; every reply token pays a KL penalty against the frozen reference,
   r_t = -beta * KL_t, and the last token also receives the score;
3. a critic (a scalar head per position) gives values; GAE turns rewards and values into
   advantages (whitened) and returns;
4. a few minibatch epochs of the clipped surrogate plus a (clipped) value loss.

Positions follow ``token_logprobs``: index t scores token t + 1, so the value of the state a
reply token is written from is the critic's output at the position just before that token.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from scalelab.config import Config, PPOConfig
from scalelab.errors import ScalelabError
from scalelab.infer.engine import Engine, GenerationParams
from scalelab.model.gpt import GPT
from scalelab.posttrain import common
from scalelab.posttrain.chat import prompt_ids
from scalelab.posttrain.data import pad_rows, split_holdout, write_jsonl
from scalelab.posttrain.mixture import SHORT_ANSWER_FAMILIES, exact_match_reward, instruction_mixture, people_group
from scalelab.posttrain.reward_model import ScalarHeadModel, load_reward_model
from scalelab.run import Run
from scalelab.runtime import resolve_device, seed_everything
from scalelab.train.metrics import MetricsLogger
from scalelab.train.optim import build_optimizer, lr_at, set_lr

RewardFn = Callable[[list[int], list[int], str, object], float]


# -- the algorithm's pieces, each testable by hand ------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the entries ``mask`` keeps; with shift_mean=False the mean is added back."""
    m = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m if mask is not None else out


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the positions ``mask`` marks (one contiguous run per row).

    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}; past the last marked
    position V and A are 0 (the episode has ended). Returns (advantages, returns = A + V), zero off-mask.
    """
    mask = mask.to(values.dtype)
    T = rewards.shape[1]
    adv = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in range(T - 1, -1, -1):
        live_next = mask[:, t + 1] if t + 1 < T else torch.zeros_like(mask[:, 0])
        delta = rewards[:, t] + gamma * next_value * live_next - values[:, t]
        adv[:, t] = (delta + gamma * lam * next_adv * live_next) * mask[:, t]
        next_value, next_adv = values[:, t], adv[:, t]
    return adv, (adv + values) * mask


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy.

    k1 = log p - log p_ref (unbiased, can be negative); k3 = (r - 1) - log r with r = p_ref / p
    (unbiased and never negative; Schulman, "Approximating KL divergence"). Both are 0 when p = p_ref.
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ScalelabError(f"unknown KL estimator {kind!r} (k1 or k3)")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate: mean over tokens of max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)); and the clip fraction."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_frac


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
               ) -> torch.Tensor:
    """0.5 × mean squared error to the returns; with clip > 0 the pessimistic max with the clipped values."""
    loss = (values - returns) ** 2
    if clip > 0:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    return 0.5 * masked_mean(loss, mask)


class KLController:
    """beta for the KL penalty: fixed, or adapted towards a target KL per sequence (Ziegler et al. 2019)."""
    def __init__(self, beta: float, adaptive: bool = False, target: float = 6.0, horizon: int = 10000):
        self.value, self.adaptive, self.target, self.horizon = beta, adaptive, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        if self.adaptive:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.value *= 1 + error * n_samples / self.horizon


def logprobs_and_entropy(model: GPT, ids: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log-prob of the next token and the entropy of the distribution it was drawn from: (B, T-1) each."""
    logits = model(ids[:, :-1]).float() / temperature
    logp_all = F.log_softmax(logits, -1)
    logp = torch.gather(logp_all, 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def reply_logprobs_and_entropy(model: GPT, ids: torch.Tensor, mask: torch.Tensor,
                               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`logprobs_and_entropy` where ``mask`` (B, T-1) is 1, zeros elsewhere; the entropy carries no gradient.

    The output layer and the softmax run on the masked (reply) positions only. With a real vocabulary
    they are a large share of the pass: SmolLM2's 49,152 x 576 head on prompts longer than their replies.
    """
    where = mask.bool()
    hidden = model.hidden_states(ids[:, :-1])
    logp_all = F.log_softmax(model.logits(hidden[where]).float() / temperature, -1)  # (N, V)
    picked = torch.gather(logp_all, 1, ids[:, 1:][where].unsqueeze(-1)).squeeze(-1)
    logp = torch.zeros(where.shape, dtype=picked.dtype, device=picked.device).masked_scatter(where, picked)
    with torch.no_grad():
        ent = -(logp_all.exp() * logp_all).sum(-1)
        entropy = torch.zeros_like(logp).masked_scatter(where, ent)
    return logp, entropy


# -- rollouts and updates ---------------------------------------------------------------------------------------


@dataclass
class Rollout:
    ids: torch.Tensor  # (B, T) prompt + reply, right-padded
    mask: torch.Tensor  # (B, T-1) 1 where position t scores a reply token
    scores: torch.Tensor  # (B,) sequence rewards before whitening and KL
    lengths: list[int]  # reply tokens (the end marker included)
    texts: list[str]
    ended: list[bool]  # the reply closed its turn (else max_new_tokens cut it)


class PPOTrainer:
    def __init__(self, policy: GPT, critic: ScalarHeadModel, tokenizer, cfg: PPOConfig, reward_fn: RewardFn,
                 device=None, seed: int = 0, reference: GPT | None = None):
        self.policy, self.critic, self.tok, self.cfg, self.reward_fn = policy, critic, tokenizer, cfg, reward_fn
        self.device = device or next(policy.parameters()).device
        self.reference = (reference or copy.deepcopy(policy)).eval().requires_grad_(False)
        self.opt = build_optimizer(policy, cfg.optim)
        self.critic_opt = build_optimizer(critic, cfg.critic_optim)
        self.kl = KLController(cfg.kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon)
        self.end_id = tokenizer.token_id("<|assistant_end|>")
        self.iteration, self.seed = 0, seed
        self.rng = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def rollout(self, prompts: list[list[int]], extras: list) -> Rollout:
        c = self.cfg
        self.policy.eval()
        engine = Engine(self.policy, self.tok, max_batch=len(prompts))
        # One seed per prompt: with a shared seed, equal prompts would draw equal replies. Only the turn's
        # end marker stops a reply: writing another turn's marker is a mistake for the reward to punish.
        base = (self.seed * 100_003 + self.iteration) * 4099
        reqs = [engine.submit(p, GenerationParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_k=0,
                                                  top_p=1.0, seed=base + i, stop_token_ids=(self.end_id,)), prompt_index=i)
                for i, p in enumerate(prompts)]
        while not all(r.done for r in reqs):
            engine.step()
        outs = [r.wait()[0] for r in reqs]
        replies = [out.tokens + ([self.end_id] if out.finish_reason == "stop" else []) for out in outs]
        texts = [out.text for out in outs]
        ended = [out.finish_reason == "stop" for out in outs]
        if hasattr(self.reward_fn, "score_batch"):
            scores = [float(x) for x in self.reward_fn.score_batch(prompts, replies, texts, extras)]
        else:
            scores = [float(self.reward_fn(*args)) for args in zip(prompts, replies, texts, extras)]
        scores = [x - (0.0 if e else c.missing_eos_penalty) for x, e in zip(scores, ended)]
        rows = [(p + r, [0] * len(p) + [1] * len(r)) for p, r in zip(prompts, replies)]
        lengths = [len(r) for r in replies]
        ids, mask = pad_rows(rows, max(len(r[0]) for r in rows), self.tok.bos_id)
        return Rollout(ids.to(self.device), mask[:, 1:].float().to(self.device), torch.tensor(scores), lengths, texts, ended)

    def step(self, prompts: list[list[int]], extras: list | None = None) -> dict:
        """One rollout batch and its PPO updates; returns the iteration's statistics."""
        c = self.cfg
        roll = self.rollout(prompts, extras or [None] * len(prompts))
        ids, mask = roll.ids, roll.mask
        with torch.no_grad():
            old_logp, _ = logprobs_and_entropy(self.policy, ids, c.temperature)
            ref_logp, _ = logprobs_and_entropy(self.reference, ids, c.temperature)
            old_values = self.critic.values(ids)[:, :-1] * mask
            kl = kl_estimate(old_logp, ref_logp, c.kl_estimator) * mask
            score = roll.scores.to(self.device)
            if c.whiten_rewards and len(score) > 1:
                score = whiten(score, shift_mean=False)
            rewards = -self.kl.value * kl
            last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # last reply position of each row
            rewards[torch.arange(len(ids), device=ids.device), last] += score
            adv, returns = gae(rewards, old_values, mask, c.gamma, c.lam)
            adv = whiten(adv, mask)
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clip_frac", "entropy", "approx_kl")}
        for opt, optim in ((self.opt, c.optim), (self.critic_opt, c.critic_optim)):
            set_lr(opt, lr_at(self.iteration, optim, c.iterations))
        self.policy.train()
        self.critic.train()
        for _ in range(c.epochs):
            order = torch.randperm(len(ids), generator=self.rng)
            for i in range(0, len(ids), c.minibatch_size):
                mb = order[i : i + c.minibatch_size].to(self.device)
                m = mask[mb]
                logp, entropy = logprobs_and_entropy(self.policy, ids[mb], c.temperature)
                pg, clip_frac = policy_loss(logp, old_logp[mb], adv[mb], m, c.clip)
                ent = masked_mean(entropy, m)
                values = self.critic.values(ids[mb])[:, :-1]
                vf = value_loss(values, old_values[mb], returns[mb], m, c.value_clip)
                loss = pg - c.entropy_coef * ent + c.vf_coef * vf
                loss.backward()
                for model, opt, optim in ((self.policy, self.opt, c.optim), (self.critic, self.critic_opt, c.critic_optim)):
                    if optim.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    stats["policy_loss"].append(float(pg))
                    stats["value_loss"].append(float(vf))
                    stats["clip_frac"].append(float(clip_frac))
                    stats["entropy"].append(float(ent))
                    stats["approx_kl"].append(float(masked_mean(old_logp[mb] - logp, m)))
        seq_kl = float(kl.sum(1).mean())
        self.kl.update(seq_kl, len(ids))
        self.iteration += 1
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out.update(reward=float(roll.scores.mean()), kl=seq_kl, kl_coef=self.kl.value,
                   response_length=sum(roll.lengths) / len(roll.lengths),
                   ended=sum(roll.ended) / len(roll.ended))
        return out


# -- the stage --------------------------------------------------------------------------------------------------


def _reward_fn(cfg: Config, tokenizer, device) -> RewardFn:
    p = cfg.ppo
    if p.reward == "exact":
        return lambda prompt, reply, text, answer: exact_match_reward(text, answer)
    if not p.reward_model:
        raise ScalelabError("ppo.reward = 'rm' needs ppo.reward_model, the folder of an `scalelab rm` run")
    rm, rm_tok = load_reward_model(p.reward_model, device)
    if rm_tok.vocab_size != tokenizer.vocab_size:
        raise ScalelabError(f"the reward model's tokenizer ({rm_tok.vocab_size} ids) differs from the policy's "
                            f"({tokenizer.vocab_size}); train both from the same pretraining run")
    return RewardModelScorer(rm, tokenizer.token_id("<|assistant_end|>"), tokenizer.bos_id, device)


class RewardModelScorer:
    """A reward model as a PPO reward: every reply of a rollout batch scored in one forward pass."""
    def __init__(self, rm: ScalarHeadModel, end_id: int, pad_id: int, device):
        self.rm, self.end_id, self.pad_id, self.device = rm, end_id, pad_id, device

    def _ids(self, prompt: list[int], reply: list[int]) -> list[int]:
        # A reply cut off at max_new_tokens is scored as if it had ended, so the RM sees its usual layout.
        ids = prompt + (reply if reply[-1:] == [self.end_id] else reply + [self.end_id])
        return ids[-self.rm.config.block_size :]

    @torch.no_grad()
    def score_batch(self, prompts, replies, texts, extras) -> list[float]:
        seqs = [self._ids(p, r) for p, r in zip(prompts, replies)]
        ids, _ = pad_rows([(s, [1] * len(s)) for s in seqs], max(map(len, seqs)), self.pad_id)
        return self.rm(ids.to(self.device), torch.tensor([len(s) for s in seqs])).tolist()

    def __call__(self, prompt, reply, text, extra) -> float:
        return self.score_batch([prompt], [reply], [text], [extra])[0]


def run_ppo(cfg: Config, init_dir: str | Path, overwrite: bool = False) -> dict:
    """PPO from the --init (SFT) run on prompts from the instruction mixture; writes a run folder."""
    p = cfg.ppo
    device = resolve_device(cfg.run.device)
    seed_everything(cfg.run.seed)
    init = Run.open(init_dir)
    init_model = init.load_model(device)
    if init.world is None:
        raise ScalelabError("scalelab ppo draws its prompts from the synthetic world: --init must be a world run")
    run = Run.create(cfg, "ppo", init, overwrite).path
    tok, policy = init.tokenizer, init_model
    reward_fn = _reward_fn(cfg, tok, device)
    ctx = policy.config.block_size
    mixture = instruction_mixture(init.world, p.n_prompts, cfg.run.seed, p.families or SHORT_ANSWER_FAMILIES,
                                  people=people_group(init.world, p.people))
    records = [r for r in mixture
               if len(prompt_ids(tok, r["messages"][:-1])) <= ctx - 4]
    if len(records) < p.rollout_batch:
        raise ScalelabError(f"only {len(records)} prompts fit the model's context of {ctx}; raise ppo.n_prompts")
    train_recs, val_recs = split_holdout(records, 0.1, cfg.run.seed)
    write_jsonl(run / "ppo_val.jsonl", val_recs)
    if p.critic_init == "reward_model":
        if not p.reward_model:
            raise ScalelabError("ppo.critic_init = 'reward_model' needs ppo.reward_model")
        critic = copy.deepcopy(load_reward_model(p.reward_model, device)[0])
    else:
        critic = ScalarHeadModel(copy.deepcopy(policy)).to(device)
    trainer = PPOTrainer(policy, critic.train(), tok, p, reward_fn, device, cfg.run.seed)
    logger = MetricsLogger(run / "metrics.jsonl")
    logger.log(kind="setup", step=0, stage="ppo", prompts=len(train_recs), reward=p.reward, params=policy.num_params())
    before = common.chat_exact_match(policy, tok, val_recs[:64], p.max_new_tokens)
    logger.log(kind="eval", step=0, **before)
    rng = random.Random(f"ppo-prompts-{cfg.run.seed}")
    bar = common.progress(cfg.run.progress, p.iterations, "ppo")
    t0 = time.perf_counter()
    history = []
    for it in range(1, p.iterations + 1):
        batch = rng.sample(train_recs, p.rollout_batch)
        stats = trainer.step([prompt_ids(tok, r["messages"][:-1]) for r in batch], [r["answer"] for r in batch])
        history.append(stats)
        logger.log(kind="ppo", step=it, elapsed=time.perf_counter() - t0, **stats)
        if bar:
            bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.3f}")
            bar.update(1)
    if bar:
        bar.close()
    after = common.chat_exact_match(policy, tok, val_recs[:64], p.max_new_tokens)
    logger.log(kind="eval", step=p.iterations, **after)
    path = common.save(run, policy, trainer.opt, p.iterations, "ppo")
    logger.close()
    k = max(1, len(history) // 5)
    summary = {"stage": "ppo", "init": str(init.path), "iterations": p.iterations, "reward": p.reward,
               "reward_first": sum(h["reward"] for h in history[:k]) / k,
               "reward_last": sum(h["reward"] for h in history[-k:]) / k, "kl_last": history[-1]["kl"],
               "exact_match_before": before.get("exact_match"), "exact_match_after": after.get("exact_match"),
               "checkpoint": str(path), "wall_seconds": time.perf_counter() - t0}
    common.write_json(run / "summary.json", summary)
    return summary
