"""Group-normalised policy gradient (GRPO-style, Shao et al. 2024): PPO's clipped surrogate without a critic.

Each prompt is sampled ``group_size`` times; a reply's advantage is its reward minus the
group's mean, divided by the group's std (plus eps), the same for every token of the reply.
For verifiable rewards this is the stable default: there is no value model to fit, and a
group where every reply scores the same gives zero gradient instead of noise. The KL to the
frozen reference is a loss term (k3 estimator, never negative) rather than a reward term.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from scalelab.errors import ScalelabError
from scalelab.model.gpt import GPT
from scalelab.posttrain.data import pad_rows
from scalelab.posttrain.ppo import kl_estimate, logprobs_and_entropy, masked_mean, policy_loss

# (prompt index, reply text, extra) -> reward
TextReward = Callable[[int, str, object], float]


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale: bool = True) -> torch.Tensor:
    """(r - group mean) / (group std + eps) for rewards laid out prompt-major, ``group_size`` per prompt.

    With ``scale=False`` only the mean is taken off (Liu et al. 2025, "Dr. GRPO"). Dividing by the std
    makes the reward ordinal within a group: a group of {0, -1} gets the same advantages as {1, -1},
    so a reward's size (say, what "I don't know" is worth) only matters through mixed groups.
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise ScalelabError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    g = rewards.float().view(-1, group_size)
    # Population std: a group of one (or of equal rewards) has std 0 and so advantage 0.
    centered = g - g.mean(dim=1, keepdim=True)
    if not scale:
        return centered.view(-1)
    std = g.std(dim=1, unbiased=False, keepdim=True)
    return (centered / (std + eps)).view(-1)


class GRPOTrainer:
    def __init__(self, policy: GPT, tokenizer, reward_fn: TextReward, *, group_size: int = 4, lr: float = 1e-5,
                 kl_coef: float = 0.02, clip: float = 0.2, max_new_tokens: int = 16, temperature: float = 1.0,
                 minibatch_size: int = 32, epochs: int = 1, grad_clip: float = 1.0, seed: int = 0,
                 reference: GPT | None = None, stop_strings: tuple[str, ...] = (), scale_advantages: bool = True):
        if group_size < 2:
            raise ScalelabError("GRPO needs group_size >= 2: a group of one reply has no baseline to compare with")
        if temperature <= 0:
            raise ScalelabError("GRPO needs a sampling policy: temperature must be positive")
        self.policy, self.tok, self.reward_fn = policy, tokenizer, reward_fn
        self.group_size, self.kl_coef, self.clip = group_size, kl_coef, clip
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.minibatch_size, self.epochs, self.grad_clip = minibatch_size, epochs, grad_clip
        self.scale_advantages = scale_advantages
        self.device = next(policy.parameters()).device
        self.reference = (reference or copy.deepcopy(policy)).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(policy.optimizer_groups(0.0), lr=lr, betas=(0.9, 0.95))
        # Chat replies end at <|assistant_end|> (a stop id the engine leaves out, so it is added back for
        # training); with stop_strings (plain-text formats) the stop text's tokens are already in the reply.
        self.stop_strings = tuple(stop_strings)
        self.end_id = None if self.stop_strings else tokenizer.token_id("<|assistant_end|>")
        self.seed, self.iteration = seed, 0
        self.rng = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def sample(self, prompts: list[list[int]]):
        from scalelab.infer.engine import Engine, GenerationParams

        self.policy.eval()
        engine = Engine(self.policy, self.tok, max_batch=len(prompts))
        base = (self.seed * 100_003 + self.iteration) * 4099
        # One seed per prompt: the engine derives a group's seeds from the request seed and the sample
        # index, so with one shared seed similar prompts would draw the same replies.
        reqs = [engine.submit(p, GenerationParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                                  top_k=0, top_p=1.0, seed=base + i, n=self.group_size,
                                                  stop_token_ids=() if self.end_id is None else (self.end_id,),
                                                  stop_strings=self.stop_strings), prompt_index=i)
                for i, p in enumerate(prompts)]
        while not all(r.done for r in reqs):
            engine.step()
        return [c for r in reqs for c in r.wait()]

    def step(self, prompts: list[list[int]], extras: list | None = None) -> dict:
        extras = extras if extras is not None else [None] * len(prompts)
        outs = self.sample(prompts)
        G = self.group_size
        rewards = torch.tensor([float(self.reward_fn(i // G, o.text, extras[i // G])) for i, o in enumerate(outs)])
        adv = group_advantages(rewards, G, scale=self.scale_advantages).to(self.device)
        # A reply cut by max_new_tokens is trained as written; only a closed turn gets its end marker.
        rows = []
        for i, o in enumerate(outs):
            reply = o.tokens + ([self.end_id] if o.finish_reason == "stop" and self.end_id is not None else [])
            p = prompts[i // G]
            rows.append((p + reply, [0] * len(p) + [1] * len(reply)))
        ids, mask = pad_rows(rows, max(len(r[0]) for r in rows), self.tok.bos_id)
        ids, mask = ids.to(self.device), mask[:, 1:].float().to(self.device)
        with torch.no_grad():
            old_logp, _ = logprobs_and_entropy(self.policy, ids, self.temperature)
            ref_logp, _ = logprobs_and_entropy(self.reference, ids, self.temperature)
        token_adv = adv[:, None].expand_as(mask)
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "kl", "clip_frac", "entropy")}
        self.policy.train()
        for _ in range(self.epochs):
            order = torch.randperm(len(ids), generator=self.rng)
            for s in range(0, len(ids), self.minibatch_size):
                mb = order[s : s + self.minibatch_size].to(self.device)
                m = mask[mb]
                logp, entropy = logprobs_and_entropy(self.policy, ids[mb], self.temperature)
                pg, clip_frac = policy_loss(logp, old_logp[mb], token_adv[mb], m, self.clip)
                # k3 from the current policy's tokens: its gradient pulls towards the reference.
                kl = masked_mean(kl_estimate(logp, ref_logp[mb], "k3"), m)
                loss = pg + self.kl_coef * kl
                loss.backward()
                if self.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.grad_clip)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                stats["policy_loss"].append(float(pg.detach()))
                stats["kl"].append(float(kl.detach()))
                stats["clip_frac"].append(float(clip_frac))
                stats["entropy"].append(float(masked_mean(entropy, m).detach()))
        self.iteration += 1
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        zero_groups = int((rewards.view(-1, G).std(dim=1, unbiased=False) == 0).sum())
        out.update(reward=float(rewards.mean()), zero_adv_groups=zero_groups,
                   ended=sum(o.finish_reason == "stop" for o in outs) / len(outs),
                   response_length=sum(len(o.tokens) for o in outs) / len(outs))
        out["texts"] = [o.text for o in outs]
        return out
