"""Group-normalised policy gradient (GRPO, Shao et al. 2024): PPO's surrogate without a critic.

Each prompt is sampled ``group_size`` times; a reply's advantage is its reward minus the
group's mean, divided by the group's std (plus eps), the same for every token of the reply.
For verifiable rewards this is the stable default: there is no value model to fit, and a
group where every reply scores the same gives zero gradient instead of noise.

Knobs from the later literature, each off or at GRPO's choice unless asked for:

- ``loss_norm``: how per-token losses become one number. "token" (the default, and what this
  trainer always did): sum over every reply token of the minibatch divided by their count, so a
  long reply's tokens weigh as much as a short one's (DAPO, Yu et al. 2025). "sequence": mean
  over each reply's tokens, then over replies (the GRPO paper), which down-weights long replies.
- ``kl_coef``: the KL to the frozen reference is a loss term (k3 estimator, never negative),
  not a reward term; 0 keeps no reference copy and runs no reference forward.
- ``clip``: PPO's ratio clip; None or 0 trains on the plain ratio surrogate.
- ``dynamic_sampling``: drop groups whose replies all score the same (their advantage is 0, so
  they only dilute the token average) and optionally sample fresh prompts to refill the batch
  (DAPO), at most ``max_refill_rounds`` extra rounds a step.
- ``old_logprobs``: the behaviour policy's log-probs in the ratio. "recompute" (the default) runs
  a no-grad forward of the policy over the sampled batch (with one epoch in one minibatch, the
  training forward's own log-probs, detached, which are the same numbers); "engine" takes the log-probs the engine
  computed while sampling (at the sampling temperature) and saves that forward. The two agree to
  float noise in fp32 (tests/test_grpo.py checks 1e-4): the engine decodes token by token through
  its KV cache, the trainer runs the whole sequence at once. With "recompute" the largest gap is
  logged as ``engine_logprob_gap``, a check that sampling and training see the same model.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Callable

import torch

from scalelab.config import GRPOConfig, OptimConfig
from scalelab.errors import ScalelabError
from scalelab.infer.engine import Engine, GenerationParams
from scalelab.model.gpt import GPT
from scalelab.posttrain.data import pad_rows
from scalelab.posttrain.ppo import kl_estimate, reply_logprobs_and_entropy
from scalelab.train.optim import build_optimizer, optimizer_step

# (prompt index, reply text, extra) -> reward; the extra is whatever the caller attached to the prompt
# (a task Problem, a QA item...)
TextReward = Callable[[int, str, object], float]
# (extra, reply text) -> is the reply's answer correct; gives the logged pass@1
CorrectFn = Callable[[object, str], bool]
# n -> (n fresh prompts, their extras): where dynamic sampling finds prompts to refill the batch
PromptSource = Callable[[int], tuple[list[list[int]], list]]

LOSS_NORMS = ("token", "sequence")


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


def reduce_tokens(x: torch.Tensor, mask: torch.Tensor, loss_norm: str) -> torch.Tensor:
    """Per-token values (B, T) to one number: "token" averages over all masked tokens, "sequence" over
    each row's masked tokens and then over the rows that have any."""
    if loss_norm == "token":
        return (x * mask).sum() / mask.sum().clamp(min=1)
    if loss_norm == "sequence":
        lengths = mask.sum(1)
        per_row = (x * mask).sum(1) / lengths.clamp(min=1)
        return per_row.sum() / (lengths > 0).sum().clamp(min=1)
    raise ScalelabError(f"unknown loss_norm {loss_norm!r} (one of {', '.join(LOSS_NORMS)})")


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip: float | None, loss_norm: str = "token", ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0
              ) -> tuple[torch.Tensor, dict]:
    """The GRPO objective to minimise, from per-token tensors (B, T); advantages broadcast per row (B, 1) or (B, T).

    Per token: max(-A r, -A clip(r, 1 - clip, 1 + clip)) (or -A r without a clip), r = exp(logp - old_logp),
    plus kl_coef × k3(logp, ref_logp); then ``reduce_tokens``. Returns the loss and its parts (policy loss,
    KL and clip fraction, each reduced the same way).
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    per_token = -advantages * ratio
    clip_frac = torch.zeros((), device=logp.device)
    if clip:
        clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
        clip_frac = reduce_tokens((clipped > per_token).to(logp.dtype), mask, loss_norm)
        per_token = torch.maximum(per_token, clipped)
    stats = {"policy_loss": reduce_tokens(per_token, mask, loss_norm).detach(), "clip_frac": clip_frac.detach()}
    if ref_logp is not None:
        # k3 from the current policy's tokens: its gradient pulls towards the reference.
        kl = kl_estimate(logp, ref_logp, "k3")
        stats["kl"] = reduce_tokens(kl, mask, loss_norm).detach()
        per_token = per_token + kl_coef * kl
    return reduce_tokens(per_token, mask, loss_norm), stats


@dataclass
class Group:
    """One prompt's ``group_size`` replies and what they scored."""
    prompt: list[int]
    extra: object
    outs: list  # engine Completions
    rewards: torch.Tensor  # (group_size,)
    correct: list[bool] | None

    @property
    def uniform(self) -> bool:
        """Every reply scored the same: zero advantage, zero policy gradient."""
        return bool((self.rewards == self.rewards[0]).all())


class GRPOTrainer:
    def __init__(self, policy: GPT, tokenizer, reward_fn: TextReward, *, group_size: int = 4,
                 optim: OptimConfig | None = None, kl_coef: float = 0.02, clip: float | None = 0.2, max_new_tokens: int = 16, temperature: float = 1.0,
                 minibatch_size: int = 32, epochs: int = 1, seed: int = 0,
                 reference: GPT | None = None, stop_strings: tuple[str, ...] = (), scale_advantages: bool = True,
                 loss_norm: str = "token", dynamic_sampling: bool = False, max_refill_rounds: int = 0,
                 old_logprobs: str = "recompute", correct_fn: CorrectFn | None = None):
        if group_size < 2:
            raise ScalelabError("GRPO needs group_size >= 2: a group of one reply has no baseline to compare with")
        if temperature <= 0:
            raise ScalelabError("GRPO needs a sampling policy: temperature must be positive")
        if loss_norm not in LOSS_NORMS:
            raise ScalelabError(f"loss_norm must be one of {', '.join(LOSS_NORMS)}, got {loss_norm!r}")
        if old_logprobs not in ("recompute", "engine"):
            raise ScalelabError(f"old_logprobs must be recompute or engine, got {old_logprobs!r}")
        if kl_coef < 0 or (clip is not None and clip < 0) or max_refill_rounds < 0:
            raise ScalelabError("kl_coef, clip and max_refill_rounds must be >= 0")
        self.policy, self.tok, self.reward_fn, self.correct_fn = policy, tokenizer, reward_fn, correct_fn
        self.group_size, self.kl_coef, self.clip = group_size, kl_coef, clip or None
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.minibatch_size, self.epochs = minibatch_size, epochs
        self.optim = optim or GRPOConfig().optim
        self.scale_advantages, self.loss_norm, self.old_logprobs = scale_advantages, loss_norm, old_logprobs
        self.dynamic_sampling, self.max_refill_rounds = dynamic_sampling, max_refill_rounds
        self.device = next(policy.parameters()).device
        self.reference = None
        if kl_coef > 0:
            self.reference = (reference or copy.deepcopy(policy)).eval().requires_grad_(False)
        self.opt = build_optimizer(policy, self.optim)
        # Chat replies end at <|assistant_end|> (a stop id the engine leaves out, so it is added back for
        # training); with stop_strings (plain-text formats) the stop text's tokens are already in the reply.
        self.stop_strings = tuple(stop_strings)
        self.end_id = None if self.stop_strings else tokenizer.token_id("<|assistant_end|>")
        self.seed, self.iteration = seed, 0
        self.rng = torch.Generator().manual_seed(seed)

    def _base_seed(self, round_: int) -> int:
        if round_ == 0:
            return (self.seed * 100_003 + self.iteration) * 4099
        key = f"grpo-refill:{self.seed}:{self.iteration}:{round_}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=6).digest(), "little")

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], round_: int = 0):
        """``group_size`` replies per prompt, prompt-major, each with its log-probs at the sampling temperature."""
        self.policy.eval()
        # Every sample of the batch decodes at once; the seeds are per sample, so batch mates change nothing.
        engine = Engine(self.policy, self.tok, max_batch=len(prompts) * self.group_size)
        base = self._base_seed(round_)
        # One seed per prompt: the engine derives a group's seeds from the request seed and the sample
        # index, so with one shared seed similar prompts would draw the same replies.
        reqs = [engine.submit(p, GenerationParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                                  top_k=0, top_p=1.0, seed=base + i, n=self.group_size,
                                                  stop_token_ids=() if self.end_id is None else (self.end_id,),
                                                  stop_strings=self.stop_strings, logprobs=True,
                                                  logprobs_at_temperature=True), prompt_index=i)
                for i, p in enumerate(prompts)]
        while not all(r.done for r in reqs):
            engine.step()
        return [c for r in reqs for c in r.wait()]

    def _groups(self, prompts: list[list[int]], extras: list, round_: int) -> list[Group]:
        outs, G = self.sample(prompts, round_), self.group_size
        groups = []
        for k, (p, extra) in enumerate(zip(prompts, extras)):
            mine = outs[k * G : (k + 1) * G]
            rewards = torch.tensor([float(self.reward_fn(k, o.text, extra)) for o in mine], dtype=torch.float64)
            correct = None if self.correct_fn is None else [bool(self.correct_fn(extra, o.text)) for o in mine]
            groups.append(Group(p, extra, mine, rewards, correct))
        return groups

    def _reply(self, out) -> tuple[list[int], list[float]]:
        # A reply cut by max_new_tokens is trained as written; only a closed turn gets its end marker.
        if out.finish_reason == "stop" and self.end_id is not None:
            return out.tokens + [self.end_id], out.logprobs + [out.stop_logprob]
        return out.tokens, out.logprobs

    def step(self, prompts: list[list[int]], extras: list | None = None, refill: PromptSource | None = None) -> dict:
        """Sample, score and update once; returns the step's statistics (and ``texts``, the replies to ``prompts``)."""
        extras = extras if extras is not None else [None] * len(prompts)
        G = self.group_size
        first = self._groups(prompts, extras, 0)
        sampled, train, rounds = list(first), list(first), 0
        if self.dynamic_sampling:
            train = [g for g in first if not g.uniform]
            while len(train) < len(prompts) and refill is not None and rounds < self.max_refill_rounds:
                rounds += 1
                more_prompts, more_extras = refill(len(prompts) - len(train))
                if not more_prompts:
                    break
                more = self._groups(more_prompts, more_extras, rounds)
                sampled += more
                train += [g for g in more if not g.uniform]
            train = train[: len(prompts)]
        out = self._update(train) if train else {}
        self.iteration += 1
        all_outs = [o for g in sampled for o in g.outs]
        rewards = torch.cat([g.rewards for g in sampled])
        out.update(reward=float(rewards.mean()), reward_std=float(rewards.std(unbiased=False)),
                   zero_adv_groups=sum(g.uniform for g in sampled),
                   dropped_groups=sum(g.uniform for g in sampled) if self.dynamic_sampling else 0,
                   trained_groups=len(train), sample_rounds=1 + rounds,
                   ended=sum(o.finish_reason == "stop" for o in all_outs) / len(all_outs),
                   response_length=sum(len(o.tokens) for o in all_outs) / len(all_outs))
        if self.correct_fn is not None:
            out["pass@1"] = sum(c for g in sampled for c in g.correct) / len(all_outs)
        out["texts"] = [o.text for g in first for o in g.outs]
        assert len(out["texts"]) == len(prompts) * G
        return out

    def _update(self, groups: list[Group]) -> dict:
        G = self.group_size
        rewards = torch.cat([g.rewards for g in groups])
        adv = group_advantages(rewards, G, scale=self.scale_advantages).to(self.device)
        rows, engine_rows = [], []
        for g in groups:
            for o in g.outs:
                reply, lps = self._reply(o)
                rows.append((g.prompt + reply, [0] * len(g.prompt) + [1] * len(reply)))
                engine_rows.append([0.0] * (len(g.prompt) - 1) + lps)
        length = max(len(r[0]) for r in rows)
        ids, mask = pad_rows(rows, length, self.tok.bos_id)
        ids, mask = ids.to(self.device), mask[:, 1:].float().to(self.device)
        # Position t scores token t + 1, so a reply's log-probs start at the prompt's last position.
        engine_logp = torch.zeros(len(rows), length - 1)
        for r, lps in enumerate(engine_rows):
            engine_logp[r, : len(lps)] = torch.tensor(lps)
        engine_logp = engine_logp.to(self.device)
        stats_out: dict[str, float] = {}
        # One epoch in one minibatch: the policy that sampled is the one about to be scored, so the
        # first (and only) training forward gives the behaviour log-probs too (detached), and the
        # separate no-grad forward is skipped. Same values: the model has no dropout.
        shared_forward = self.old_logprobs == "recompute" and self.epochs == 1 and self.minibatch_size >= len(ids)
        with torch.no_grad():
            old_logp = None
            if self.old_logprobs == "engine":
                old_logp = engine_logp
            elif not shared_forward:
                old_logp, _ = reply_logprobs_and_entropy(self.policy, ids, mask, self.temperature)
                stats_out["engine_logprob_gap"] = float(((old_logp - engine_logp).abs() * mask).max())
            ref_logp = None
            if self.reference is not None:
                ref_logp, _ = reply_logprobs_and_entropy(self.reference, ids, mask, self.temperature)
        token_adv = adv[:, None].expand_as(mask)
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "clip_frac", "entropy", "approx_kl")}
        if self.reference is not None:
            stats["kl"] = []
        self.policy.train()
        for _ in range(self.epochs):
            order = torch.randperm(len(ids), generator=self.rng)
            for s in range(0, len(ids), self.minibatch_size):
                mb = order[s : s + self.minibatch_size].to(self.device)
                m = mask[mb]
                logp, entropy = reply_logprobs_and_entropy(self.policy, ids[mb], m, self.temperature)
                if old_logp is None:
                    old_logp = torch.empty_like(logp)
                    old_logp[mb] = logp.detach()
                    stats_out["engine_logprob_gap"] = float(((old_logp - engine_logp).abs() * mask).max())
                loss, parts = grpo_loss(logp, old_logp[mb], token_adv[mb], m, self.clip, self.loss_norm,
                                        None if ref_logp is None else ref_logp[mb], self.kl_coef)
                optimizer_step(loss, self.opt, self.policy.parameters(), self.optim)
                for k, v in parts.items():
                    stats[k].append(float(v))
                stats["entropy"].append(float(reduce_tokens(entropy.detach(), m, "token")))
                # how far this minibatch's policy already moved from the one that sampled (k1, per token)
                stats["approx_kl"].append(float(reduce_tokens((old_logp[mb] - logp).detach(), m, "token")))
        return stats_out | {k: sum(v) / len(v) for k, v in stats.items()}


def trainer_from_config(policy: GPT, tokenizer, reward_fn: TextReward, g: GRPOConfig, seed: int,
                        **fixed) -> GRPOTrainer:
    """A trainer with the settings of a ``[grpo]`` section; ``fixed`` holds what the caller sets itself
    (correct_fn, stop_strings, a study's max_new_tokens)."""
    options = dict(group_size=g.group_size, optim=g.optim, kl_coef=g.kl_coef, clip=g.clip, max_new_tokens=g.max_new_tokens,
                   temperature=g.temperature, minibatch_size=g.minibatch_size or g.prompts_per_step * g.group_size,
                   epochs=g.epochs, seed=seed, scale_advantages=g.scale_advantages, loss_norm=g.loss_norm,
                   dynamic_sampling=g.dynamic_sampling, max_refill_rounds=g.max_refill_rounds,
                   old_logprobs=g.old_logprobs)
    return GRPOTrainer(policy, tokenizer, reward_fn, **(options | fixed))
