"""``scalelab experiments flan``: does instruction tuning generalise to task families it never saw?

Some families of the built-in instruction mixture are held out entirely. From one shared base, SFT
runs train on k = 1, 2, 4, ... of the remaining families, always with the same number of
conversations and steps, so only the breadth of the data changes. Each point is repeated over
``seeds``: seed s is both a fresh SFT seed (``run.seed + s``: which conversations are drawn, their
packing and batch order) and a fresh family draw (the shared shuffle of the training pool rotated
by s·|pool|/seeds, so seeds start from different families; within a seed the sets are nested in k).
Every run is scored on the same held-out prompts:

- exact match and "contains the answer" of greedy replies (hard metrics, often ~0 at this scale);
- ended: share of replies that close their turn within ``max_new_tokens`` (format compliance);
- answer NLL: mean negative log-likelihood per gold answer token under the chat template;
- ranked accuracy: the gold answer has the highest reply log-likelihood among the question's
  options (the two names, yes/no, or the family's categories), next to its chance level.

0 training families is the base model itself, prompted with the same chat template (one run: it
is deterministic). :func:`verdict` holds the rule, fixed before the preset ran, that decides
whether the held-out gain grows with k and whether it shows diminishing returns.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from scalelab.errors import ScalelabError
from scalelab.evals.plots import plt
from scalelab.experiments.base_run import clear_outputs_keep_base, ensure_base, stage_config
from scalelab.experiments.study import Study
from scalelab.posttrain import common
from scalelab.posttrain.chat import prompt_ids
from scalelab.posttrain.common import write_json
from scalelab.posttrain.data import pad_rows, tokenize_conversations
from scalelab.posttrain.mixture import FAMILIES, instruction_mixture
from scalelab.posttrain.sft import run_sft
from scalelab.run import Run
from scalelab.runtime import resolve_device

SECTION = "flan"
METRICS = ("exact", "contains", "ended", "answer_nll", "ranked", "chance")
# The metrics the verdict judges, and the sign that turns each into "higher is better".
JUDGED = {"answer_nll": -1.0, "ranked": 1.0}


@dataclass
class FlanConfig:
    out_dir: str = "runs/flan"
    base: str = ""  # an existing world pretraining run to start from; empty: pretrain one in out_dir/base
    heldout: list[str] = field(default_factory=lambda: ["classification", "comparison"])  # never trained on
    counts: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 6])  # training families per condition
    seeds: int = 3  # runs per k > 0: seed s = SFT seed run.seed + s and the family order rotated by s
    # Each SFT run is the [sft] stage of the study's config (n_examples, steps, batch_size, [sft.optim]);
    # the study sets only what it varies: the training families, the seed (and no validation split).
    eval_per_family: int = 48  # held-out prompts per held-out family
    max_new_tokens: int = 24


def check(fc: FlanConfig) -> list[str]:
    """The training pool (all families but the held-out ones); fails on a bad design."""
    bad = [f for f in fc.heldout if f not in FAMILIES]
    if bad:
        raise ScalelabError(f"flan.heldout: unknown families {bad} (families: {', '.join(FAMILIES)})")
    if not fc.heldout:
        raise ScalelabError("flan.heldout must name at least one family to test on")
    pool = [f for f in FAMILIES if f not in fc.heldout]
    if not fc.counts or any(k < 0 or k > len(pool) for k in fc.counts):
        raise ScalelabError(f"flan.counts must lie in 0..{len(pool)} (families left for training), got {fc.counts}")
    if fc.seeds < 1 or fc.eval_per_family < 1:
        raise ScalelabError("flan.seeds and flan.eval_per_family must be positive")
    return pool


def family_draws(pool: list[str], counts: list[int], seeds: int, seed: int) -> list[dict[int, tuple[str, ...]]]:
    """Per seed, the training set for each k > 0: the first k families of that seed's order (nested in k).

    The orders are rotations of one shuffle, spread evenly, so different seeds start from different
    families: independent shuffles often agree on the first family, leaving k = 1 with too few.
    """
    shuffled = list(pool)
    random.Random(f"flan-order-{seed}").shuffle(shuffled)
    draws = []
    for s in range(seeds):
        shift = (s * len(pool)) // seeds
        order = shuffled[shift:] + shuffled[:shift]
        draws.append({k: tuple(sorted(order[:k])) for k in sorted(set(counts)) if k > 0})
    return draws


def run_name(k: int, families: tuple[str, ...], s: int) -> str:
    return f"sft_k{k}_s{s}_" + "+".join(families)


# -- scoring --------------------------------------------------------------------------------------------------


def answer_options(records: list[dict]) -> list[list[str]]:
    """Each record's candidate answers, gold included: the record's own alternatives (the two names of a
    "who is older" question), yes/no, or else every distinct gold answer of its task and kind among
    ``records`` (a classification question's categories)."""
    pools: dict[tuple, set[str]] = {}
    for r in records:
        pools.setdefault((r["task"], r.get("meta", {}).get("kind")), set()).add(r["answer"])
    out = []
    for r in records:
        meta = r.get("meta", {})
        if meta.get("alternatives"):
            opts = list(meta["alternatives"])
        elif meta.get("kind") == "yes_no":
            opts = ["Yes", "No"]
        else:
            opts = sorted(pools[(r["task"], meta.get("kind"))])
        if r["answer"] not in opts:
            opts.append(r["answer"])
        out.append(opts)
    return out


def score_replies(records: list[dict], texts: list[str], ended: list[bool], nll: list[float],
                  ranked: list[float], chance: list[float]) -> dict:
    """Overall (mean over families, so each weighs the same) and ``per_family`` of every metric in METRICS."""
    if not records or any(len(x) != len(records) for x in (texts, ended, nll, ranked, chance)):
        raise ScalelabError("score_replies needs one reply, end flag, NLL, ranked flag and chance per record, "
                            "and at least one record")
    per: dict[str, dict[str, list[float]]] = {}
    for r, t, e, n, rk, ch in zip(records, texts, ended, nll, ranked, chance):
        ans, reply = r["answer"].strip().lower(), t.strip().lower()
        d = per.setdefault(r["task"], {m: [] for m in METRICS})
        d["exact"].append(float(reply == ans))
        d["contains"].append(float(bool(ans) and ans in reply))
        d["ended"].append(float(e))
        d["answer_nll"].append(float(n))
        d["ranked"].append(float(rk))
        d["chance"].append(float(ch))
    fams = {f: {m: sum(v) / len(v) for m, v in d.items()} | {"n": len(d["exact"])} for f, d in sorted(per.items())}
    overall = {m: sum(f[m] for f in fams.values()) / len(fams) for m in METRICS}
    return overall | {"per_family": fams}


def aggregate(rows: list[dict]) -> list[dict]:
    """Rows (one per SFT run: k, metrics) -> one row per k: the mean and the sample std over its runs
    (0 for a single run)."""
    by_k: dict[int, list[dict]] = {}
    for r in rows:
        by_k.setdefault(r["k"], []).append(r)
    out = []
    for k in sorted(by_k):
        runs = by_k[k]
        row = {"k": k, "runs": len(runs)}
        for m in METRICS:
            vals = [r[m] for r in runs]
            row[m] = statistics.fmean(vals)
            row[m + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(row)
    return out


def verdict(table: list[dict]) -> dict:
    """The rule for the headline, fixed before the preset ran. For each judged metric, the held-out gain
    g(k) = mean over seeds of (metric at k - metric of the base), signed so that higher is better, with
    σ(k) the std over seeds (the base is deterministic: σ(0) = 0).

    - **grows**: g(k_max) - g(k_min) > sqrt(σ(k_min)² + σ(k_max)²), between the fewest and the most
      training families (k > 0): more families help by more than the seed-to-seed spread.
    - **diminishing**: the gain per doubling of k, s(a→b) = (g(b) - g(a)) / log2(b/a), is smaller on the
      last step than on the first (k = 1→2 against, in the preset, 4→6) by more than
      sqrt(σs(first)² + σs(last)²), where σs(a→b) = sqrt(σ(a)² + σ(b)²) / log2(b/a).
    - **still_rising**: the last step's gain exceeds its own noise, s(last) > σs(last).

    Needs the base (k = 0) and at least three counts k > 0 (two steps); otherwise returns {}.
    """
    by_k = {r["k"]: r for r in table}
    ks = sorted(k for k in by_k if k > 0)
    if 0 not in by_k or len(ks) < 3:
        return {}
    out = {}
    for m, sign in JUDGED.items():
        g = {k: sign * (by_k[k][m] - by_k[0][m]) for k in ks}
        sd = {k: by_k[k][m + "_std"] for k in ks}

        def slope(a, b):
            d = math.log2(b / a)
            return (g[b] - g[a]) / d, math.hypot(sd[a], sd[b]) / d

        first, last = slope(ks[0], ks[1]), slope(ks[-2], ks[-1])
        spread = math.hypot(sd[ks[0]], sd[ks[-1]])
        out[m] = {"gain": {str(k): g[k] for k in ks}, "gain_std": {str(k): sd[k] for k in ks},
                  "k_range": [ks[0], ks[-1]], "grows": g[ks[-1]] - g[ks[0]] > spread, "growth": g[ks[-1]] - g[ks[0]], "growth_noise": spread,
                  "first_step": [ks[0], ks[1]], "last_step": [ks[-2], ks[-1]],
                  "slope_first": first[0], "slope_first_noise": first[1],
                  "slope_last": last[0], "slope_last_noise": last[1],
                  "diminishing": first[0] - last[0] > math.hypot(first[1], last[1]),
                  "still_rising": last[0] > last[1]}
    return out


def heldout_records(world, heldout: list[str], per_family: int, seed: int) -> list[dict]:
    # A seed the SFT data never uses, so even a held-out family's phrasing+fact pairs are new.
    return instruction_mixture(world, per_family * len(heldout), seed=seed + 104729, families=heldout)


def _reply_logprobs(model, tok, conversations: list[list[dict]]) -> tuple[list[float], list[float]]:
    """Per conversation: the summed log-probability of its assistant tokens, and their count."""
    rows, _ = tokenize_conversations(tok, conversations, model.config.block_size + 1)
    if len(rows) != len(conversations):
        raise ScalelabError("a held-out conversation does not fit the model's context; raise model.block_size")
    total, count = [], []
    for i in range(0, len(rows), 16):
        chunk = rows[i : i + 16]
        ids, mask = pad_rows(chunk, max(len(r[0]) for r in chunk), tok.bos_id)
        m = mask[:, 1:].float()
        total += (common.token_logprobs(model, ids) * m).sum(1).tolist()
        count += m.sum(1).tolist()
    return total, count


def evaluate(model, tok, records: list[dict], max_new_tokens: int) -> dict:
    options = answer_options(records)
    was = model.training
    model.eval()
    with torch.no_grad():
        lp, n = _reply_logprobs(model, tok, [r["messages"] for r in records])
        nll = [-a / max(b, 1.0) for a, b in zip(lp, n)]
        flat = [(i, o) for i, opts in enumerate(options) for o in opts]
        opt_lp, _ = _reply_logprobs(model, tok, [records[i]["messages"][:-1] + [{"role": "assistant", "content": o}]
                                                 for i, o in flat])
    best: dict[int, tuple[float, str]] = {}
    for (i, o), v in zip(flat, opt_lp):
        if i not in best or v > best[i][0]:
            best[i] = (v, o)
    ranked = [float(best[i][1] == r["answer"]) for i, r in enumerate(records)]
    chance = [1.0 / len(opts) for opts in options]
    outs = common.generate_replies(model, tok, [prompt_ids(tok, r["messages"][:-1]) for r in records], max_new_tokens)
    model.train(was)
    return score_replies(records, [o.text for o in outs], [o.finish_reason == "stop" for o in outs], nll, ranked, chance)


# -- the study ------------------------------------------------------------------------------------------------


def run_flan(cfg, fc: FlanConfig, overwrite: bool = False, log=print) -> dict:
    pool = check(fc)
    out = Path(fc.out_dir)
    if overwrite:
        clear_outputs_keep_base(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = ensure_base(cfg, out / "base", fc.base)
    log(f"base: {base} ({time.perf_counter() - t0:.0f}s)")
    device = resolve_device(cfg.run.device)
    init = Run.open(base)
    records = heldout_records(init.world, fc.heldout, fc.eval_per_family, cfg.run.seed)
    conditions = [(0, (), 0, "base")] if 0 in fc.counts else []
    for s, draw in enumerate(family_draws(pool, fc.counts, fc.seeds, cfg.run.seed)):
        conditions += [(k, fams, s, run_name(k, fams, s)) for k, fams in draw.items()]
    rows = []
    for k, fams, s, name in sorted(conditions, key=lambda c: (c[0], c[2])):
        if k == 0:
            model = init.load_model(device)
        else:
            sft = replace(cfg.sft, data="mixture", families=list(fams), val_fraction=0.0)
            scfg = stage_config(cfg, out / name, sft=sft)
            scfg.run.progress, scfg.run.seed = False, cfg.run.seed + s
            if not (out / name / "summary.json").is_file():
                run_sft(scfg, base, overwrite=True)
            model = Run.open(out / name).load_model(device)
        t = time.perf_counter()
        m = evaluate(model, init.tokenizer, records, fc.max_new_tokens)
        rows.append({"k": k, "seed": s, "families": list(fams), "run": name, **m})
        log(f"k={k} s={s} {name}: exact {m['exact']:.3f} contains {m['contains']:.3f} ended {m['ended']:.3f} "
            f"answer_nll {m['answer_nll']:.3f} ranked {m['ranked']:.3f} ({time.perf_counter() - t:.0f}s eval)")
    table = aggregate(rows)
    result = {"config": asdict(fc), "sft": asdict(cfg.sft), "pool": pool, "heldout_prompts": len(records),
              "runs": rows, "by_k": table, "verdict": verdict(table), "wall_seconds": time.perf_counter() - t0}
    write_json(out / "results.json", result)
    plot(table, out / "flan.png", fc.heldout)
    (out / "results.md").write_text(markdown(result))
    return result


def _pm(r: dict, m: str) -> str:
    return f"{r[m]:.3f} ± {r[m + '_std']:.3f}" if r["runs"] > 1 else f"{r[m]:.3f}"


def verdict_lines(v: dict) -> list[str]:
    names = {"answer_nll": "answer NLL", "ranked": "ranked accuracy"}
    lines = []
    for m, d in v.items():
        (a, b), (c, e), (lo, hi) = d["first_step"], d["last_step"], d["k_range"]
        lines.append(
            f"- {names[m]}: gain from k={lo} to k={hi}: {d['growth']:+.3f} against a seed spread of "
            f"{d['growth_noise']:.3f}, so it **{'grows' if d['grows'] else 'does not clearly grow'}** with k; "
            f"gain per doubling {d['slope_first']:+.3f} ± {d['slope_first_noise']:.3f} on k={a}→{b} and "
            f"{d['slope_last']:+.3f} ± {d['slope_last_noise']:.3f} on k={c}→{e}: diminishing returns "
            f"**{'shown' if d['diminishing'] else 'not shown'}**, last step "
            f"{'still rising' if d['still_rising'] else 'within noise of flat'}.")
    return lines


def markdown(result: dict) -> str:
    fc, sft = result["config"], result["sft"]
    lines = [
        "# Flan: held-out task families vs number of training families", "",
        f"Held out: {', '.join(fc['heldout'])} ({result['heldout_prompts']} prompts). Training pool: "
        f"{', '.join(result['pool'])}. Each SFT run: {sft['n_examples']} conversations, {sft['steps']} steps "
        f"× {sft['batch_size']}; {fc['seeds']} seeds per k > 0 (SFT seed and family draw). Mean ± std over seeds. "
        f"Wall time {result['wall_seconds']:.0f} s.", "",
        "| training families | runs | exact match | contains answer | ended turn | answer NLL (nats/token) | "
        "ranked accuracy | chance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["by_k"]:
        lines.append(f"| {r['k']} | {r['runs']} | {_pm(r, 'exact')} | {_pm(r, 'contains')} | {_pm(r, 'ended')} | "
                     f"{_pm(r, 'answer_nll')} | {_pm(r, 'ranked')} | {r['chance']:.3f} |")
    if result.get("verdict"):
        lines += ["", "Verdict (rule in `scalelab.experiments.flan.verdict`):", ""] + verdict_lines(result["verdict"])
    lines += ["", "Per run:", "", "| k | seed | families | exact | contains | ended | answer NLL | ranked |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['k']} | {r['seed']} | {', '.join(r['families']) or '(base)'} | {r['exact']:.3f} | "
                     f"{r['contains']:.3f} | {r['ended']:.3f} | {r['answer_nll']:.3f} | {r['ranked']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path, heldout: list[str]) -> None:
    ks = [r["k"] for r in table]
    # A symlog-like axis: k = 0 (the base) sits left of 1, 2, 4, ... on a log2 scale.
    xs = [0.0 if k == 0 else 1 + math.log2(k) for k in ks]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for m, style in (("exact", "o-"), ("contains", "s-"), ("ended", "^--"), ("ranked", "D-")):
        a.errorbar(xs, [r[m] for r in table], yerr=[r[m + "_std"] for r in table], fmt=style, capsize=3, label=m)
    a.plot(xs, [r["chance"] for r in table], ":", color="grey", label="ranked: chance")
    a.set_ylabel("share of held-out prompts (mean ± std over seeds)")
    a.set_ylim(-0.02, 1.02)
    b.errorbar(xs, [r["answer_nll"] for r in table], yerr=[r["answer_nll_std"] for r in table], fmt="o-", capsize=3)
    b.set_ylabel("answer NLL, nats/token (lower is better)")
    for ax in (a, b):
        ax.set_xticks(xs, [str(k) for k in ks])
        ax.set_xlabel("training families (0 = base)")
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.suptitle(f"Held-out families: {', '.join(heldout)}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_text(result: dict) -> str:
    return markdown({**result, "runs": []}).split("\nPer run:")[0]


# The stage settings this study once copied into [flan] (read, with a FutureWarning, for one release).
MOVED_KEYS = {"n_examples": "sft.n_examples", "steps": "sft.steps", "batch_size": "sft.batch_size",
              "lr": "sft.optim.lr", "warmup_steps": "sft.optim.warmup_steps"}

STUDY = Study(SECTION, FlanConfig, run_flan, summary_text, ("results.md", "results.json", "flan.png"), MOVED_KEYS)
