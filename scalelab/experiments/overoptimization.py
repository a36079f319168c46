"""``scalelab experiments reward-overopt``: reward-model over-optimization in the shape of Gao et al. 2022.

The reward-hacking study plants a bias and watches PPO exploit it; this one asks the quantitative question:
as a policy is optimised harder against a learned proxy of a known "gold" reward, does the gold score
first rise and then fall while the proxy keeps rising?

- **Gold**: a programmatic scorer, never seen by the policy: the SQuAD-style word F1 of the reply against the
  task's exact answer (1 for exactly the answer, partial credit for overlapping words, nothing subtracted for
  length beyond what the F1's precision costs a padded reply).
- **Proxy**: a reward model (the shared RM stage, Bradley-Terry, the config's own ``[rm]``) trained on only
  ``rm.n_pairs`` pairs of the SFT policy's own samples, each pair labelled by gold. A second proxy is trained on
  the same sampled pairs labelled by ``gold + length_bias * reply tokens``: labels that carry a length bias.
- **Best-of-n**: ``bon_samples`` SFT samples per held-out prompt; for n = 1, 2, 4, ... the expected gold and proxy
  of the proxy's favourite of n (the unbiased estimator over all n-subsets), at ``KL_bon = log n - (n-1)/n``.
- **RL**: PPO (the config's own ``[ppo]``) against the proxy at each ``kl_coefs`` value, and against the
  length-biased proxy. Every ``eval_every`` iterations (and before the first) the policy samples ``eval_samples``
  replies to each best-of-n prompt, always with the same seed, scored for gold, proxy, reply length and the KL to
  the initial policy; the training rollouts' own statistics are kept too.

Every seed trains its own two proxies on its own sampled pairs and runs its own best-of-n draws and RL; the
pretrained base and the SFT policy are shared. The headline rule (``peak_then_fall``) is fixed in code and in
docs/posttrain.md before the preset's runs.
"""

from __future__ import annotations

import copy
import json
import random
import re
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from math import comb, log, sqrt
from pathlib import Path

import torch

from scalelab.errors import ScalelabError
from scalelab.evals.plots import plt
from scalelab.experiments.base_run import clear_outputs_keep_base, ensure_base, stage_config
from scalelab.experiments.study import Study
from scalelab.infer.engine import Engine
from scalelab.infer.request import GenerationParams
from scalelab.posttrain.chat import prompt_ids
from scalelab.posttrain.common import write_json
from scalelab.posttrain.data import pad_rows, split_holdout, write_jsonl
from scalelab.posttrain.mixture import SHORT_ANSWER_FAMILIES, instruction_mixture
from scalelab.posttrain.ppo import PPOTrainer, RewardModelScorer, logprobs_and_entropy
from scalelab.posttrain.reward_model import ScalarHeadModel, load_reward_model, run_rm
from scalelab.posttrain.sft import run_sft
from scalelab.run import Run
from scalelab.runtime import resolve_device, seed_everything

SECTION = "reward_overopt"
PROXIES = ("gold_labels", "length_biased")


@dataclass
class RewardOveroptConfig:
    out_dir: str = "runs/reward_overopt"
    base: str = ""  # an existing world pretraining run; empty: pretrain one in out_dir/base
    families: list[str] = field(default_factory=list)  # prompt families (empty: the short-answer ones)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    length_bias: float = 0.1  # the biased proxy's labels rank pairs by gold + this * reply tokens
    bon_prompts: int = 32  # held-out prompts for best-of-n
    bon_samples: int = 64  # SFT samples per prompt; n runs over the powers of 2 up to this
    kl_coefs: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.5])  # PPO against the gold-label proxy
    length_kl_coef: float = 0.0  # PPO against the length-biased proxy
    eval_every: int = 5  # PPO iterations between evaluations on the best-of-n prompts
    eval_samples: int = 4  # samples per best-of-n prompt at each evaluation (the same seed every time)
    # The stages are the config's own [sft], [rm] and [ppo]; the study sets only its design: the prompt families,
    # the RM's data (rm.n_pairs gold-labelled pairs of SFT samples) and [ppo].kl_coef per condition.


def check(rc: RewardOveroptConfig) -> None:
    if not rc.seeds or len(set(rc.seeds)) != len(rc.seeds):
        raise ScalelabError(f"reward_overopt.seeds must be a non-empty list of distinct seeds, got {rc.seeds}")
    if not rc.kl_coefs or any(b < 0 for b in rc.kl_coefs) or rc.length_kl_coef < 0:
        raise ScalelabError("reward_overopt.kl_coefs must be a non-empty list of values >= 0 (and length_kl_coef >= 0)")
    if rc.bon_samples < 2 or rc.bon_samples & (rc.bon_samples - 1):
        raise ScalelabError(f"reward_overopt.bon_samples must be a power of 2 >= 2, got {rc.bon_samples}")
    if min(rc.bon_prompts, rc.eval_every, rc.eval_samples) < 1:
        raise ScalelabError("reward_overopt.bon_prompts, eval_every and eval_samples must be positive")
    if rc.length_bias < 0:
        raise ScalelabError("reward_overopt.length_bias must be >= 0")


# -- gold, best-of-n and the headline rule ------------------------------------------------------------------------

_WORD = re.compile(r"-?[a-z0-9]+")


def gold_f1(reply: str, answer: str) -> float:
    """Word F1 of the reply against the exact answer (lower case, punctuation dropped, a minus sign kept)."""
    a, r = _WORD.findall(answer.lower()), _WORD.findall(reply.lower())
    if not a:
        raise ScalelabError("gold_f1 needs an answer with at least one word")
    same = sum((Counter(a) & Counter(r)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(r), same / len(a)
    return 2 * precision * recall / (precision + recall)


def kl_best_of_n(n: int) -> float:
    """KL(best-of-n || base) = log n - (n-1)/n nats (Stiennon et al. 2020; an upper bound, tight for distinct samples)."""
    if n < 1:
        raise ScalelabError("best-of-n needs n >= 1")
    return log(n) - (n - 1) / n


def best_of_n(proxy: list[float], values: list[float], n: int) -> float:
    """Expected ``values`` of the proxy's favourite among n of these N samples drawn without replacement,
    averaged over all C(N, n) subsets: the i-th lowest proxy score wins C(i-1, n-1) of them."""
    big_n = len(proxy)
    if len(values) != big_n or not 1 <= n <= big_n:
        raise ScalelabError(f"best_of_n needs equally many proxy scores and values and 1 <= n <= {big_n}")
    order = sorted(range(big_n), key=lambda i: proxy[i])
    return sum(comb(rank, n - 1) * values[i] for rank, i in enumerate(order)) / comb(big_n, n)


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def peak_then_fall(gold: list[list[float]], proxy: list[list[float]]) -> dict:
    """The headline rule, fixed before the runs it judges. ``gold[s][k]`` and ``proxy[s][k]``: seed s at point k
    (best-of-n: n = 1, 2, 4, ...; RL: the evaluations every eval_every iterations, the first before training), in order of growing optimisation.

    With m and sd the mean and standard deviation over seeds at each point, and p the point of the highest mean gold:
    "gold peaks, then falls" holds when all three hold:
      rose:          p is not the first point and m_gold[p] > m_gold[0]          (the gold score first went up);
      fell:          m_gold[last] < m_gold[p] - 2 * max(sd_gold[p], sd_gold[last]) (it ended clearly below its peak);
      proxy_rising:  m_proxy[last] > m_proxy[p]                                  (while the proxy still went up).
    """
    if not gold or len(gold) != len(proxy) or len({len(g) for g in gold + proxy}) != 1 or len(gold[0]) < 2:
        raise ScalelabError("peak_then_fall needs gold and proxy curves of one length (>= 2 points) for every seed")
    g = [mean_std([s[k] for s in gold]) for k in range(len(gold[0]))]
    pr = [mean_std([s[k] for s in proxy]) for k in range(len(proxy[0]))]
    p = max(range(len(g)), key=lambda k: g[k][0])
    margin = 2 * max(g[p][1], g[-1][1])
    rose = p > 0 and g[p][0] > g[0][0]
    fell = g[-1][0] < g[p][0] - margin
    proxy_rising = pr[-1][0] > pr[p][0]
    return {"peak_point": p, "gold_first": g[0][0], "gold_peak": g[p][0], "gold_peak_std": g[p][1],
            "gold_last": g[-1][0], "gold_last_std": g[-1][1], "fall": g[p][0] - g[-1][0], "margin": margin,
            "proxy_peak": pr[p][0], "proxy_last": pr[-1][0], "rose": rose, "fell": fell,
            "proxy_rising": proxy_rising, "holds": rose and fell and proxy_rising}


# -- sampling and scoring ---------------------------------------------------------------------------------------------


def sample(model, tok, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float, seed: int):
    """n samples per prompt (prompt-major) as (reply ids with the end marker if the turn ended, text)."""
    end = tok.token_id("<|assistant_end|>")
    engine = Engine(model, tok, max_batch=max(1, min(64, n * len(prompts))))
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=1.0, seed=seed,
                              n=n, stop_token_ids=(end,))
    was = model.training
    model.eval()
    try:
        outs = engine.generate(prompts, params)
    finally:
        model.train(was)
    return [(o.tokens + ([end] if o.finish_reason == "stop" else []), o.text) for o in outs]


def gold_pairs(model, tok, records: list[dict], n_pairs: int, length_bias: float, max_new_tokens: int,
               temperature: float, seed: int) -> dict[str, list[dict]]:
    """Two SFT samples per prompt, labelled by gold (ties dropped) and by gold + length_bias * reply tokens."""
    out: dict[str, list[dict]] = {k: [] for k in PROXIES}
    for start in range(0, len(records), 64):
        chunk = records[start : start + 64]
        replies = sample(model, tok, [prompt_ids(tok, r["messages"][:-1]) for r in chunk], 2, max_new_tokens,
                         temperature, seed + start)
        for i, r in enumerate(chunk):
            (ids_a, a), (ids_b, b) = replies[2 * i], replies[2 * i + 1]
            ga, gb = gold_f1(a, r["answer"]), gold_f1(b, r["answer"])
            for name, (sa, sb) in (("gold_labels", (ga, gb)),
                                   ("length_biased", (ga + length_bias * len(ids_a), gb + length_bias * len(ids_b)))):
                if sa != sb and a.strip() != b.strip() and len(out[name]) < n_pairs:
                    chosen, rejected = (a, b) if sa > sb else (b, a)
                    out[name].append({"prompt": r["messages"][-2]["content"], "chosen": chosen, "rejected": rejected,
                                      "meta": {"task": r["task"], "answer": r["answer"]}})
        if all(len(v) == n_pairs for v in out.values()):
            return out
    raise ScalelabError(f"only {min(len(v) for v in out.values())} of {n_pairs} gold-labelled pairs from "
                        f"{len(records)} prompts; lower rm.n_pairs")


class ProxyReward:
    """The PPO reward: the proxy's score; records gold, the proxy in initial-policy standard units, and length."""
    def __init__(self, scorer, center: float, scale: float):
        self.scorer, self.center, self.scale = scorer, center, scale
        self.last: dict = {}

    def score_batch(self, prompts, replies, texts, answers) -> list[float]:
        proxy = self.scorer.score_batch(prompts, replies, texts, answers)
        self.last = {"gold": statistics.fmean(gold_f1(t, a) for t, a in zip(texts, answers)),
                     "proxy": (statistics.fmean(proxy) - self.center) / self.scale,
                     "length": statistics.fmean(len(r) for r in replies)}
        return proxy


def bon_curves(proxy_scores: list[list[float]], golds: list[list[float]], lengths: list[list[float]], max_n: int,
               center: float, scale: float) -> list[dict]:
    """Best-of-n over prompts for n = 1, 2, 4, ..., max_n: gold, proxy (standard units), length, KL."""
    rows = []
    n = 1
    while n <= max_n:
        rows.append({"n": n, "kl": kl_best_of_n(n),
                     "gold": statistics.fmean(best_of_n(p, g, n) for p, g in zip(proxy_scores, golds)),
                     "proxy": (statistics.fmean(best_of_n(p, p, n) for p in proxy_scores) - center) / scale,
                     "length": statistics.fmean(best_of_n(p, ln, n) for p, ln in zip(proxy_scores, lengths))})
        n *= 2
    return rows


@torch.no_grad()
def evaluate(policy, reference, tok, scorer, prompts: list[list[int]], answers: list[str], n: int, max_new_tokens: int,
             temperature: float, seed: int, center: float, scale: float) -> dict:
    """n samples per prompt from the policy: mean gold, proxy (standard units), reply tokens, and the KL to the
    reference per reply, estimated as the mean over samples of sum_t log p(y_t) - log p_ref(y_t) (k1, unbiased)."""
    samples = sample(policy, tok, prompts, n, max_new_tokens, temperature, seed)
    expanded = [prompts[i // n] for i in range(len(samples))]
    rows = [(p + r, [0] * len(p) + [1] * len(r)) for p, (r, _) in zip(expanded, samples)]
    ids, mask = pad_rows(rows, max(len(r[0]) for r in rows), tok.bos_id)
    device = next(policy.parameters()).device
    ids, mask = ids.to(device), mask[:, 1:].float().to(device)
    was = policy.training
    policy.eval()
    logp, _ = logprobs_and_entropy(policy, ids, temperature)
    ref_logp, _ = logprobs_and_entropy(reference, ids, temperature)
    policy.train(was)
    proxy = scorer.score_batch(expanded, [r for r, _ in samples], [t for _, t in samples], None)
    return {"gold": statistics.fmean(gold_f1(t, answers[i // n]) for i, (_, t) in enumerate(samples)),
            "proxy": (statistics.fmean(proxy) - center) / scale,
            "length": statistics.fmean(len(r) for r, _ in samples),
            "kl": float(((logp - ref_logp) * mask).sum(1).mean())}


# -- the study ----------------------------------------------------------------------------------------------------


def _rl(cfg, rc, init, tok, scorer, center, scale, train_recs, eval_recs, kl_coef, seed, device) -> dict:
    seed_everything(seed)
    policy = init.load_model(device)
    ppo = replace(cfg.ppo, kl_coef=kl_coef)
    reward = ProxyReward(scorer, center, scale)
    # [ppo].critic_init as the PPO stage reads it: the SFT backbone with a fresh head, or a copy of the proxy itself
    critic = copy.deepcopy(scorer.rm) if ppo.critic_init == "reward_model" else ScalarHeadModel(copy.deepcopy(policy))
    critic = critic.to(device).train().requires_grad_(True)
    trainer = PPOTrainer(policy, critic, tok, ppo, reward, device, seed)
    rng = random.Random(f"reward-overopt-rl-{seed}")  # one prompt stream per seed, shared by every condition
    eval_prompts = [prompt_ids(tok, r["messages"][:-1]) for r in eval_recs]

    def point(it: int) -> dict:
        return {"iteration": it, **evaluate(policy, trainer.reference, tok, scorer, eval_prompts,
                                            [r["answer"] for r in eval_recs], rc.eval_samples, ppo.max_new_tokens,
                                            ppo.temperature, seed * 7919 + 3, center, scale)}

    train, evals = [], [point(0)]
    for it in range(1, ppo.iterations + 1):
        batch = rng.sample(train_recs, ppo.rollout_batch)
        stats = trainer.step([prompt_ids(tok, r["messages"][:-1]) for r in batch], [r["answer"] for r in batch])
        train.append({"iteration": it, "kl": stats["kl"], "ended": stats["ended"], **reward.last})
        if it % rc.eval_every == 0:
            evals.append(point(it))
    return {"eval": evals, "train": train}


def run_seed(cfg, rc: RewardOveroptConfig, out: Path, seed: int, families, log) -> dict:
    device = resolve_device(cfg.run.device)
    init = Run.open(out / "sft")
    model, tok = init.load_model(device), init.tokenizer
    max_new, temp = cfg.ppo.max_new_tokens, cfg.ppo.temperature
    ctx = model.config.block_size
    records = [r for r in instruction_mixture(init.world, 4000, seed=cfg.run.seed + 31337, families=families)
               if len(prompt_ids(tok, r["messages"][:-1])) <= ctx - max_new - 1]
    train_recs, heldout = split_holdout(records, 0.1, cfg.run.seed)
    rng = random.Random(f"reward-overopt-{seed}")
    pair_recs = rng.sample(train_recs, len(train_recs))
    bon_recs = rng.sample(heldout, min(rc.bon_prompts, len(heldout)))
    folder = out / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with torch.no_grad():
        pairs = gold_pairs(model, tok, pair_recs, cfg.rm.n_pairs, rc.length_bias, max_new, temp, seed * 7919 + 1)
    scorers, rm_acc = {}, {}
    for name in PROXIES:
        write_jsonl(folder / f"pairs_{name}.jsonl", pairs[name])
        seeded = replace(cfg, run=replace(cfg.run, seed=seed))
        rm_cfg = stage_config(seeded, folder / f"proxy_{name}",
                              rm=replace(cfg.rm, data="jsonl", path=str(folder / f"pairs_{name}.jsonl")))
        rm_acc[name] = run_rm(rm_cfg, out / "sft", overwrite=True).get("val_accuracy", float("nan"))
        rm, _ = load_reward_model(folder / f"proxy_{name}", device)
        scorers[name] = RewardModelScorer(rm, tok.token_id("<|assistant_end|>"), tok.bos_id, device)
    log(f"seed {seed}: proxies trained on {cfg.rm.n_pairs} pairs, held-out accuracy "
        f"{', '.join(f'{k} {v:.2f}' for k, v in rm_acc.items())} ({time.perf_counter() - t:.0f}s)")

    t = time.perf_counter()
    prompts = [prompt_ids(tok, r["messages"][:-1]) for r in bon_recs]
    with torch.no_grad():
        samples = sample(model, tok, prompts, rc.bon_samples, max_new, temp, seed * 7919 + 2)
        k = rc.bon_samples
        golds = [[gold_f1(samples[i * k + j][1], r["answer"]) for j in range(k)] for i, r in enumerate(bon_recs)]
        lengths = [[float(len(samples[i * k + j][0])) for j in range(k)] for i in range(len(bon_recs))]
        bon, norm = {}, {}
        for name, scorer in scorers.items():
            flat = scorer.score_batch([prompts[i // k] for i in range(len(samples))], [s[0] for s in samples],
                                      [s[1] for s in samples], None)
            norm[name] = (statistics.fmean(flat), statistics.pstdev(flat) or 1.0)
            per_prompt = [flat[i * k : (i + 1) * k] for i in range(len(bon_recs))]
            bon[name] = bon_curves(per_prompt, golds, lengths, k, *norm[name])
    log(f"seed {seed}: best-of-{k} gold {bon['gold_labels'][0]['gold']:.3f} -> {bon['gold_labels'][-1]['gold']:.3f} "
        f"({time.perf_counter() - t:.0f}s)")

    rl = {}
    runs = [("gold_labels", b) for b in rc.kl_coefs] + [("length_biased", rc.length_kl_coef)]
    for name, beta in runs:
        t = time.perf_counter()
        runs_ = _rl(cfg, rc, init, tok, scorers[name], *norm[name], train_recs, bon_recs, beta, seed, device)
        rl[f"{name}/kl{beta:g}"] = runs_
        ev = runs_["eval"]
        peak = max(ev, key=lambda e: e["gold"])
        log(f"seed {seed} rl {name} kl_coef {beta:g}: gold {ev[0]['gold']:.3f} -> peak {peak['gold']:.3f} "
            f"(it {peak['iteration']}) -> {ev[-1]['gold']:.3f}, proxy {ev[0]['proxy']:.2f} -> {ev[-1]['proxy']:.2f}, "
            f"length {ev[0]['length']:.1f} -> {ev[-1]['length']:.1f}, KL {ev[-1]['kl']:.2f} "
            f"({time.perf_counter() - t:.0f}s)")
    result = {"seed": seed, "recipe": _recipe(cfg, rc), "rm_val_accuracy": rm_acc, "proxy_norm": norm, "bon": bon,
              "rl": rl}
    write_json(folder / "result.json", result)
    return result


def _recipe(cfg, rc: RewardOveroptConfig) -> dict:
    """What a seed's result depends on, in the form it has once read back from disk."""
    own = {k: v for k, v in asdict(rc).items() if k != "seeds"}
    return json.loads(json.dumps({"study": own, "run_seed": cfg.run.seed,
                                  **{k: asdict(getattr(cfg, k)) for k in ("sft", "rm", "ppo")}}, default=str))


def seed_result(cfg, rc: RewardOveroptConfig, out: Path, seed: int, families, log) -> dict:
    """A seed's result: reused from an earlier (interrupted) run of the same recipe, else computed."""
    done = out / f"seed{seed}" / "result.json"
    if done.is_file():
        cached = json.loads(done.read_text())
        if cached.get("recipe") == _recipe(cfg, rc):
            log(f"seed {seed}: reusing {done}")
            return cached
    return run_seed(cfg, rc, out, seed, families, log)


def aggregate(per_seed: list[dict]) -> dict:
    """Mean and std over seeds of every curve, and the headline rule on each."""
    def curve(rows_by_seed: list[list[dict]], x: str) -> dict:
        keys = ("gold", "proxy", "length", "kl")
        n = min(len(r) for r in rows_by_seed)
        out = {x: [rows_by_seed[0][k][x] for k in range(n)]}
        for key in keys:
            stats = [mean_std([r[k][key] for r in rows_by_seed]) for k in range(n)]
            out[key], out[key + "_std"] = [s[0] for s in stats], [s[1] for s in stats]
        rule = peak_then_fall([[r[k]["gold"] for k in range(n)] for r in rows_by_seed],
                              [[r[k]["proxy"] for k in range(n)] for r in rows_by_seed])
        return {"curve": out, "rule": rule}

    bon = {name: curve([s["bon"][name] for s in per_seed], "n") for name in per_seed[0]["bon"]}
    rl = {cond: curve([s["rl"][cond]["eval"] for s in per_seed], "iteration") for cond in per_seed[0]["rl"]}
    return {"bon": bon, "rl": rl}


def run_reward_overopt(cfg, rc: RewardOveroptConfig, overwrite: bool = False, log=print) -> dict:
    check(rc)
    out = Path(rc.out_dir)
    if overwrite:
        clear_outputs_keep_base(out)
    if (out / "results.json").exists():
        raise ScalelabError(f"{out} already holds results.json; pass --overwrite to run again")
    out.mkdir(parents=True, exist_ok=True)
    cfg.run.progress = False
    t0 = time.perf_counter()
    families = rc.families or list(SHORT_ANSWER_FAMILIES)
    base = ensure_base(cfg, out / "base", rc.base)
    log(f"base: {base} ({time.perf_counter() - t0:.0f}s)")
    if not (out / "sft" / "summary.json").is_file():
        t = time.perf_counter()
        run_sft(stage_config(cfg, out / "sft", sft=replace(cfg.sft, data="mixture", families=families)), base,
                overwrite=True)
        log(f"sft ({time.perf_counter() - t:.0f}s)")
    sft_sum = json.loads((out / "sft" / "summary.json").read_text())
    per_seed = [seed_result(cfg, rc, out, s, families, log) for s in rc.seeds]
    agg = aggregate(per_seed)
    result = {"config": asdict(rc), "stages": {k: asdict(getattr(cfg, k)) for k in ("sft", "rm", "ppo")},
              "sft": sft_sum, "seeds": per_seed, "aggregate": agg, "wall_seconds": time.perf_counter() - t0}
    write_json(out / "results.json", result)
    plot(agg, rc, out / "reward_overopt.png")
    (out / "results.md").write_text(markdown(result))
    return result


# -- report -----------------------------------------------------------------------------------------------------------


def _sqrt_kl(xs: list[float]) -> list[float]:
    return [sqrt(max(x, 0.0)) for x in xs]


def _twin(ax, x, c, color, label, style="o-"):
    """Gold on ``ax`` (solid), the proxy on its twin axis (dashed), both mean ± std over seeds."""
    ax.errorbar(x, c["gold"], yerr=c["gold_std"], fmt=style, color=color, capsize=3, label=f"gold, {label}")
    ax.proxy_axis.errorbar(x, c["proxy"], yerr=c["proxy_std"], fmt="s--", color=color, alpha=0.5, capsize=2,
                           label=f"proxy, {label}")


def plot(agg: dict, rc: RewardOveroptConfig, path: Path) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.8))
    for ax in axes[:3]:
        ax.proxy_axis = ax.twinx()
        ax.set_ylabel("gold F1 (solid)")
        ax.proxy_axis.set_ylabel("proxy, SFT std units (dashed)")
    for i, (name, a) in enumerate(agg["bon"].items()):
        _twin(axes[0], _sqrt_kl(a["curve"]["kl"]), a["curve"], f"C{3 * i}", name)
    axes[0].set(title=f"best-of-n against each proxy (n = 1 ... {rc.bon_samples})", xlabel="sqrt(KL_bon) (nats^0.5)")
    for i, cond in enumerate(c for c in agg["rl"] if c.startswith("gold_labels")):
        c = agg["rl"][cond]["curve"]
        label = "beta = " + cond.split("/kl")[-1]
        _twin(axes[1], _sqrt_kl(c["kl"]), c, f"C{i}", label)
        _twin(axes[2], c["iteration"], c, f"C{i}", label)
    axes[1].set(title="PPO against the gold-label proxy", xlabel="sqrt(KL to the SFT policy) (nats^0.5)")
    axes[2].set(title="the KL coefficient: gold and proxy by iteration", xlabel="PPO iteration")
    cond = next(c for c in agg["rl"] if c.startswith("length_biased"))
    c = agg["rl"][cond]["curve"]
    ax = axes[3]
    ax.errorbar(c["iteration"], c["length"], yerr=c["length_std"], fmt="o-", color="C3", capsize=3, label="reply tokens")
    ax.set(title=f"PPO against the length-biased proxy (beta = {rc.length_kl_coef:g})", xlabel="PPO iteration",
           ylabel="reply tokens")
    twin = ax.twinx()
    twin.errorbar(c["iteration"], c["gold"], yerr=c["gold_std"], fmt="s--", color="C0", capsize=3, label="gold F1")
    twin.set_ylabel("gold F1 (dashed)")
    twin.legend(loc="lower right", fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=7)
    for ax in axes[:3]:
        ax.proxy_axis.legend(loc="lower right", fontsize=7)
    fig.suptitle(f"Reward over-optimization: mean ± std over seeds {rc.seeds}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _verdict(rule: dict) -> str:
    return ("**holds**" if rule["holds"] else "does not hold") + (
        f" (rose {'yes' if rule['rose'] else 'no'}, fell {rule['fall']:.3f} vs margin {rule['margin']:.3f}, "
        f"proxy rising {'yes' if rule['proxy_rising'] else 'no'})")


def markdown(result: dict) -> str:
    rc, agg, ppo = result["config"], result["aggregate"], result["stages"]["ppo"]
    acc = {name: mean_std([s["rm_val_accuracy"][name] for s in result["seeds"]]) for name in PROXIES}
    lines = ["# Reward over-optimization (Gao et al. 2022 shape)", "",
             f"Seeds {rc['seeds']}; proxies trained on {result['stages']['rm']['n_pairs']} gold-labelled pairs each "
             f"(held-out accuracy against gold labels: " +
             ", ".join(f"{k} {m:.2f} ± {s:.2f}" for k, (m, s) in acc.items()) + f"); length bias {rc['length_bias']} "
             f"per token. PPO {ppo['iterations']} iterations × {ppo['rollout_batch']} rollouts, lr {ppo['optim']['lr']}, "
             f"max {ppo['max_new_tokens']} new tokens. Wall time {result['wall_seconds']:.0f} s.", "",
             "Best-of-n (held-out prompts; mean ± std over seeds):", "",
             "| proxy | n | KL_bon | gold F1 | proxy (SFT std) | reply tokens |", "|---|---|---|---|---|---|"]
    for name, a in agg["bon"].items():
        c = a["curve"]
        for k, n in enumerate(c["n"]):
            lines.append(f"| {name} | {n} | {c['kl'][k]:.2f} | {c['gold'][k]:.3f} ± {c['gold_std'][k]:.3f} | "
                         f"{c['proxy'][k]:.2f} ± {c['proxy_std'][k]:.2f} | {c['length'][k]:.1f} |")
    lines += ["", f"PPO, evaluated every {rc['eval_every']} iterations ({rc['eval_samples']} samples on each best-of-n "
              "prompt, the same seed each time); the start, the gold peak and the end:", "",
              "| proxy / kl_coef | iteration | KL (nats) | gold F1 | proxy (SFT std) | reply tokens |",
              "|---|---|---|---|---|---|"]
    for cond, a in agg["rl"].items():
        c, p = a["curve"], a["rule"]["peak_point"]
        for k in sorted({0, p, len(c["gold"]) - 1}):
            lines.append(f"| {cond} | {c['iteration'][k]} | {c['kl'][k]:.2f} ± {c['kl_std'][k]:.2f} | "
                         f"{c['gold'][k]:.3f} ± {c['gold_std'][k]:.3f} | {c['proxy'][k]:.2f} ± {c['proxy_std'][k]:.2f} | "
                         f"{c['length'][k]:.1f} ± {c['length_std'][k]:.1f} |")
    lines += ["", "Headline rule (`peak_then_fall`): gold peaks, then falls, while the proxy still rises:", ""]
    lines += [f"- best-of-n, {name}: {_verdict(a['rule'])}" for name, a in agg["bon"].items()]
    lines += [f"- PPO, {cond}: {_verdict(a['rule'])}" for cond, a in agg["rl"].items()]
    return "\n".join(lines) + "\n"


def summary_text(result: dict) -> str:
    agg = result["aggregate"]
    return json.dumps({f"{kind}/{name}": a["rule"]["holds"] for kind in ("bon", "rl") for name, a in agg[kind].items()},
                      indent=1)


STUDY = Study(SECTION, RewardOveroptConfig, run_reward_overopt, summary_text, ("results.md", "reward_overopt.png"))
