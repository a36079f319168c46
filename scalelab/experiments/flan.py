"""``scalelab experiments flan``: does instruction tuning generalise to task families it never saw?

Some families of the built-in instruction mixture are held out entirely. From one shared base, SFT
runs train on 1, 2, 4, ... of the remaining families (nested sets, drawn in a few random orders so
one lucky family does not decide the curve), always with the same number of conversations and
steps, so only the breadth of the data changes. Each run is scored on the held-out families:

- exact match and "contains the answer" of greedy replies (hard metrics, often ~0 at this scale);
- ended: share of replies that close their turn within ``max_new_tokens`` (format compliance);
- answer NLL: mean negative log-likelihood per gold answer token under the chat template, a
  continuous metric that moves before any exact match does.

0 training families is the base model itself, prompted with the same chat template.
"""

from __future__ import annotations

import json
import math
import random
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


@dataclass
class FlanConfig:
    out_dir: str = "runs/flan"
    base: str = ""  # an existing world pretraining run to start from; empty: pretrain one in out_dir/base
    heldout: list[str] = field(default_factory=lambda: ["classification", "comparison"])  # never trained on
    counts: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 6])  # training families per condition
    orders: int = 2  # orders of the training families (rotations of one shuffle); each k averages over them
    # Each SFT run is the [sft] stage of the study's config (n_examples, steps, batch_size, [sft.optim]);
    # the study sets only what it varies: the training families (and no validation split).
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
    if fc.orders < 1 or fc.eval_per_family < 1:
        raise ScalelabError("flan.orders and flan.eval_per_family must be positive")
    return pool


def family_sets(pool: list[str], counts: list[int], orders: int, seed: int) -> dict[int, list[tuple[str, ...]]]:
    """For each k, the distinct training sets: the first k families of each order (nested in k).

    The orders are rotations of one shuffle, spread evenly, so different orders start from different
    families: independent shuffles often agree on the first family, leaving k = 1 with one run.
    """
    out: dict[int, list[tuple[str, ...]]] = {}
    shuffled = list(pool)
    random.Random(f"flan-order-{seed}").shuffle(shuffled)
    for o in range(orders):
        shift = (o * len(pool)) // orders
        order = shuffled[shift:] + shuffled[:shift]
        for k in sorted(set(counts)):
            s = tuple(sorted(order[:k]))
            if s not in out.setdefault(k, []):
                out[k].append(s)
    return out


# -- scoring --------------------------------------------------------------------------------------------------


def score_replies(records: list[dict], texts: list[str], ended: list[bool], nll: list[float]) -> dict:
    """Overall (mean over families, so each weighs the same) and ``per_family``: exact, contains, ended, answer NLL."""
    if not (len(records) == len(texts) == len(ended) == len(nll)) or not records:
        raise ScalelabError("score_replies needs one reply, end flag and NLL per record, and at least one record")
    per: dict[str, dict[str, list[float]]] = {}
    for r, t, e, n in zip(records, texts, ended, nll):
        ans, reply = r["answer"].strip().lower(), t.strip().lower()
        d = per.setdefault(r["task"], {"exact": [], "contains": [], "ended": [], "answer_nll": []})
        d["exact"].append(float(reply == ans))
        d["contains"].append(float(bool(ans) and ans in reply))
        d["ended"].append(float(e))
        d["answer_nll"].append(float(n))
    fams = {f: {m: sum(v) / len(v) for m, v in d.items()} | {"n": len(d["exact"])} for f, d in sorted(per.items())}
    overall = {m: sum(f[m] for f in fams.values()) / len(fams) for m in ("exact", "contains", "ended", "answer_nll")}
    return overall | {"per_family": fams}


def aggregate(rows: list[dict]) -> list[dict]:
    """Rows (one per SFT run: k, families, metrics) -> one row per k: the mean and spread over its runs."""
    by_k: dict[int, list[dict]] = {}
    for r in rows:
        by_k.setdefault(r["k"], []).append(r)
    out = []
    for k in sorted(by_k):
        runs = by_k[k]
        row = {"k": k, "runs": len(runs)}
        for m in ("exact", "contains", "ended", "answer_nll"):
            vals = [r[m] for r in runs]
            row[m] = sum(vals) / len(vals)
            row[m + "_min"], row[m + "_max"] = min(vals), max(vals)
        out.append(row)
    return out


def heldout_records(world, heldout: list[str], per_family: int, seed: int) -> list[dict]:
    # A seed the SFT data never uses, so even a held-out family's phrasing+fact pairs are new.
    return instruction_mixture(world, per_family * len(heldout), seed=seed + 104729, families=heldout)


def evaluate(model, tok, records: list[dict], max_new_tokens: int) -> dict:
    ctx = model.config.block_size
    rows, _ = tokenize_conversations(tok, [r["messages"] for r in records], ctx + 1)
    if len(rows) != len(records):
        raise ScalelabError("a held-out conversation does not fit the model's context; raise model.block_size")
    was = model.training
    model.eval()
    nll = []
    with torch.no_grad():
        for i in range(0, len(rows), 16):
            ids, mask = pad_rows(rows[i : i + 16], max(len(r[0]) for r in rows[i : i + 16]), tok.bos_id)
            lp = common.token_logprobs(model, ids)
            m = mask[:, 1:].float()
            nll += (-(lp * m).sum(1) / m.sum(1).clamp(min=1)).tolist()
    outs = common.generate_replies(model, tok, [prompt_ids(tok, r["messages"][:-1]) for r in records], max_new_tokens)
    model.train(was)
    return score_replies(records, [o.text for o in outs], [o.finish_reason == "stop" for o in outs], nll)


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
    init_model = init.load_model(device)
    records = heldout_records(init.world, fc.heldout, fc.eval_per_family, cfg.run.seed)
    sets = family_sets(pool, fc.counts, fc.orders, cfg.run.seed)
    rows = []
    for k, fam_sets in sets.items():
        for fams in fam_sets:
            if k == 0:
                model, name = init_model, "base"
            else:
                name = "sft_" + "+".join(fams)
                sft = replace(cfg.sft, data="mixture", families=list(fams), val_fraction=0.0)
                scfg = stage_config(cfg, out / name, sft=sft)
                scfg.run.progress = False
                if not (out / name / "summary.json").is_file():
                    run_sft(scfg, base, overwrite=True)
                model = Run.open(out / name).load_model(device)
            t = time.perf_counter()
            m = evaluate(model, init.tokenizer, records, fc.max_new_tokens)
            rows.append({"k": k, "families": list(fams), "run": name, **m})
            log(f"k={k} {name}: exact {m['exact']:.3f} contains {m['contains']:.3f} ended {m['ended']:.3f} "
                f"answer_nll {m['answer_nll']:.3f} ({time.perf_counter() - t:.0f}s eval)")
    table = aggregate(rows)
    result = {"config": asdict(fc), "sft": asdict(cfg.sft), "pool": pool, "heldout_prompts": len(records), "runs": rows, "by_k": table,
              "wall_seconds": time.perf_counter() - t0}
    write_json(out / "results.json", result)
    plot(table, out / "flan.png", fc.heldout)
    (out / "results.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    fc, sft = result["config"], result["sft"]
    lines = [
        "# Flan: held-out task families vs number of training families", "",
        f"Held out: {', '.join(fc['heldout'])} ({result['heldout_prompts']} prompts). Training pool: "
        f"{', '.join(result['pool'])}. Each SFT run: {sft['n_examples']} conversations, {sft['steps']} steps "
        f"× {sft['batch_size']}; {fc['orders']} family orders (rotations of one shuffle). Wall time {result['wall_seconds']:.0f} s.", "",
        "| training families | runs | exact match | contains answer | ended turn | answer NLL (nats/token) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["by_k"]:
        lines.append(f"| {r['k']} | {r['runs']} | {r['exact']:.3f} | {r['contains']:.3f} | {r['ended']:.3f} | "
                     f"{r['answer_nll']:.3f} ({r['answer_nll_min']:.3f}–{r['answer_nll_max']:.3f}) |")
    lines += ["", "Per run:", "", "| k | families | exact | contains | ended | answer NLL |",
              "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['k']} | {', '.join(r['families']) or '(base)'} | {r['exact']:.3f} | {r['contains']:.3f} | "
                     f"{r['ended']:.3f} | {r['answer_nll']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path, heldout: list[str]) -> None:
    ks = [r["k"] for r in table]
    # A symlog-like axis: k = 0 (the base) sits left of 1, 2, 4, ... on a log2 scale.
    xs = [0.0 if k == 0 else 1 + math.log2(k) for k in ks]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for m, style in (("exact", "o-"), ("contains", "s-"), ("ended", "^--")):
        a.plot(xs, [r[m] for r in table], style, label=m)
    a.set_ylabel("share of held-out prompts")
    a.set_ylim(-0.02, 1.02)
    b.errorbar(xs, [r["answer_nll"] for r in table],
               yerr=[[r["answer_nll"] - r["answer_nll_min"] for r in table],
                     [r["answer_nll_max"] - r["answer_nll"] for r in table]], fmt="o-", capsize=3)
    b.set_ylabel("answer NLL, nats/token (lower is better)")
    for ax in (a, b):
        ax.set_xticks(xs, [str(k) for k in ks])
        ax.set_xlabel("training families")
        ax.grid(alpha=0.3)
    a.legend()
    fig.suptitle(f"Held-out families: {', '.join(heldout)}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_text(result: dict) -> str:
    return json.dumps(result["by_k"], indent=1)


# The stage settings this study once copied into [flan] (read, with a FutureWarning, for one release).
MOVED_KEYS = {"n_examples": "sft.n_examples", "steps": "sft.steps", "batch_size": "sft.batch_size",
              "lr": "sft.optim.lr", "warmup_steps": "sft.optim.warmup_steps"}

STUDY = Study(SECTION, FlanConfig, run_flan, summary_text, ("results.md",), MOVED_KEYS)
