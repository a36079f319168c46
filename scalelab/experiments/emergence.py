"""Emergence: a discontinuous metric or a real jump?

Schaeffer et al. (2023), "Are Emergent Abilities of Large Language Models a Mirage?", argue that
many "sudden" abilities come from scoring with a harsh metric (exact match needs every token right,
so its value is roughly p_token ** length) rather than from a sudden change in the model. We score
each sweep run on the same examples with exact match and with continuous metrics, and plot both
against compute, so one can see whether exact match jumps while the likelihood moves smoothly.

Metrics (means over examples; the answer is the continuation after one space, as in the generators):

- ``exact_match``: greedy output, cut at the first newline, equals the answer (``normalize_answer``).
- ``logprob_per_token``: mean log p(token) of the tokens of " " + answer given BOS + prompt, by
  teacher forcing. The target is tokenised separately from the prompt, so it is exactly the token
  sequence that greedy decoding would have to produce after the prompt's tokens.
- ``answer_prob``: exp(sum of those log-probs), the probability of the whole answer.
- ``edit_distance``: character Levenshtein distance between the normalised greedy output and the
  answer, divided by the answer's length and capped at 1. Characters rather than token ids keep it
  comparable across tokenizers; the cap stops one run-on output from dominating the mean.
- ``digit_credit``: numeric answers only (others are left out of the mean): the digits of output
  and answer are right-aligned and we count matching positions over the longer of the two, so a
  missing or extra digit costs credit. "1234" vs "1244" gives 0.75.
- ``brier``: multi-class Brier score of the next-token distribution at the answer's first token,
  (1 - p_target)^2 + sum over the other tokens of p^2; 0 is a confident right guess, 2 a confident
  wrong one.
"""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import torch

from scalelab.config import load_config
from scalelab.data.generators import generate as generate_task
from scalelab.data.world import World
from scalelab.errors import ScalelabError
from scalelab.evals.metrics import brier_score, digit_credit, normalized_edit_distance
from scalelab.evals.plots import plt
from scalelab.evals.tasks import normalize_answer
from scalelab.infer.sample import SamplingParams, generate
from scalelab.run import CHECKPOINTS_DIR, Run, is_run_folder
from scalelab.scaling.sweep import read_results
from scalelab.tokenizer import load_tokenizer
from scalelab.checkpoint import latest_checkpoint

METRICS = ("exact_match", "logprob_per_token", "answer_prob", "edit_distance", "digit_credit", "brier")
CONTINUOUS = METRICS[1:]
ROW_KEYS = ("name", "N", "D", "C", "task", "n") + METRICS
# Whether a bigger value of the metric is better; used to say "improves" in the summary.
HIGHER_IS_BETTER = {"exact_match": True, "logprob_per_token": True, "answer_prob": True,
                    "edit_distance": False, "digit_credit": True, "brier": False}
# One task name in ``evaluate_sweep`` may stand for several difficulty levels.
TASK_VARIANTS = {
    "addition": [("addition_2d", {"digits": 2}), ("addition_3d", {"digits": 3})],
    "multiplication": [("multiplication_2d", {"digits": 2})],
    "world_qa": [("world_qa", {})],
}


def _pair_ids(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    return [tokenizer.bos_id] + tokenizer.encode(prompt), tokenizer.encode(" " + answer)


@torch.no_grad()
def answer_logprobs(model, tokenizer, examples, batch_size: int = 32) -> list[dict]:
    """Per example: ``token_logprobs`` of the target " answer" and ``brier`` of its first token.

    Sequences are right-padded, which a causal model never attends to, so one batched pass gives
    the same numbers as one pass per example. A prompt too long for the context is cut from the
    left (the target is kept whole); a target that alone cannot fit gives an empty result.
    """
    ctx = model.config.block_size
    device = next(model.parameters()).device
    items = []
    for ex in examples:
        p, t = _pair_ids(tokenizer, ex.prompt, ex.answer)
        if not t or len(t) + 1 > ctx:
            items.append(None)
            continue
        p = p[-(ctx - len(t)):]
        items.append((p, t))
    out: list[dict] = [{"token_logprobs": [], "brier": float("nan")} for _ in examples]
    live = [i for i, it in enumerate(items) if it is not None]
    model.eval()
    for s in range(0, len(live), batch_size):
        chunk = live[s : s + batch_size]
        seqs = [items[i][0] + items[i][1] for i in chunk]
        width = max(len(q) for q in seqs)
        idx = torch.full((len(seqs), width), tokenizer.bos_id, dtype=torch.long)
        for r, q in enumerate(seqs):
            idx[r, : len(q)] = torch.tensor(q)
        logp = model(idx.to(device)).float().log_softmax(-1)
        for r, i in enumerate(chunk):
            p, t = items[i]
            # the logits at position k predict token k + 1
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(t), device=device)
            lp = logp[r, pos, torch.tensor(t, device=device)]
            out[i] = {"token_logprobs": lp.tolist(), "brier": brier_score(logp[r, len(p) - 1].exp(), t[0])}
    return out


@torch.no_grad()
def greedy_outputs(model, tokenizer, examples, max_new_tokens: int = 16) -> list[str]:
    """The greedy continuation of BOS + prompt, as ``exact_match`` sees it ("" when it cannot fit)."""
    # Every metric reads the output only up to its first newline, so decoding can stop there.
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=(tokenizer.bos_id,),
                            stop_strings=("\n",))
    outs = []
    for ex in examples:
        ids = [tokenizer.bos_id] + tokenizer.encode(ex.prompt)
        budget = model.config.block_size - len(ids)
        if budget <= 0:
            outs.append("")
            continue
        params.max_new_tokens = min(max_new_tokens, budget)
        outs.append(tokenizer.decode(generate(model, ids, params, decode=tokenizer.decode)[0]))
    return outs


def _nanmean(values) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def score_examples(model, tokenizer, examples, max_new_tokens: int = 16) -> dict[str, float]:
    """Every metric of :data:`METRICS` as a mean over ``examples`` (NaN where none applies)."""
    examples = list(examples)
    if not examples:
        raise ScalelabError("no examples to score")
    outputs = greedy_outputs(model, tokenizer, examples, max_new_tokens)
    lps = answer_logprobs(model, tokenizer, examples)
    em, ed, dc, lpt, prob, brier = [], [], [], [], [], []
    for ex, out, lp in zip(examples, outputs, lps):
        em.append(float(normalize_answer(out) == normalize_answer(ex.answer)))
        ed.append(normalized_edit_distance(out, ex.answer))
        dc.append(digit_credit(out, ex.answer))
        toks = lp["token_logprobs"]
        lpt.append(sum(toks) / len(toks) if toks else float("nan"))
        prob.append(math.exp(sum(toks)) if toks else float("nan"))
        brier.append(lp["brier"])
    return {"exact_match": _nanmean(em), "logprob_per_token": _nanmean(lpt), "answer_prob": _nanmean(prob),
            "edit_distance": _nanmean(ed), "digit_credit": _nanmean(dc), "brier": _nanmean(brier),
            "n": len(examples)}


# -- a whole sweep -------------------------------------------------------------------------------------


def _task_examples(task_key: str, params: dict, n: int, seed: int):
    return generate_task(task_key, n, seed, **params)


def _world_examples(run_dir: Path, n: int, seed: int, cache: dict):
    """QA the run saw in pretraining (a small model can only be asked to recall, not to generalise)."""
    if not is_run_folder(run_dir):
        return None
    cfg = Run.open(run_dir).cfg
    if cfg.data.source != "world":
        return None
    key = json.dumps(cfg.data.world.__dict__, sort_keys=True, default=str)
    if key not in cache:
        world = World(cfg.data.world)
        pairs = world.qa_pairs(world.qa_train_people)
        cache[key] = random.Random(seed).sample(pairs, min(n, len(pairs)))
    return cache[key]


def _resolve_tasks(tasks) -> list[tuple[str, str, dict]]:
    out = []
    for t in tasks:
        if t not in TASK_VARIANTS:
            raise ScalelabError(f"unknown emergence task {t!r} (known: {', '.join(TASK_VARIANTS)})")
        out += [(label, t, params) for label, params in TASK_VARIANTS[t]]
    return out


def evaluate_sweep(sweep_dir, tasks=("addition", "multiplication", "world_qa"), n: int = 100, seed: int = 0,
                   max_new_tokens: int = 16, progress: bool = False) -> list[dict]:
    """Score every finished run of a sweep on every task; writes emergence.csv and emergence.json."""
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise ScalelabError(f"sweep folder not found: {sweep}")
    if n < 1:
        raise ScalelabError(f"n must be at least 1, got {n}")
    results = read_results(sweep / "results.csv")
    finished = [r for r in results if latest_checkpoint(sweep / "runs" / r["name"] / CHECKPOINTS_DIR) is not None]
    if not finished:
        raise ScalelabError(f"no finished run with a checkpoint in {sweep} (is results.csv there? run the sweep first)")
    tok_dir = sweep / "shared" / "tokenizer"
    if not tok_dir.is_dir():
        raise ScalelabError(f"sweep tokenizer not found: {tok_dir}")
    tokenizer = load_tokenizer(tok_dir)
    variants = _resolve_tasks(tasks)
    # Every run answers the very same questions, so differences between runs are the model's alone.
    fixed = {label: _task_examples(key, params, n, seed) for label, key, params in variants if key != "world_qa"}
    world_cache: dict = {}
    rows = []
    for r in sorted(finished, key=lambda r: (r.get("C") or 0.0, r["name"])):
        run_dir = sweep / "runs" / r["name"]
        model = Run.open(run_dir).load_model()
        for label, key, _ in variants:
            examples = _world_examples(run_dir, n, seed, world_cache) if key == "world_qa" else fixed[label]
            if not examples:
                continue  # a run not trained on the synthetic world has no QA to recall
            scores = score_examples(model, tokenizer, examples, max_new_tokens)
            row = {"name": r["name"], "N": r.get("N"), "D": r.get("D"), "C": r.get("C"), "task": label, **scores}
            rows.append({k: row.get(k) for k in ROW_KEYS})
            if progress:
                print(f"{r['name']:>16} {label:>18} exact={scores['exact_match']:.3f} "
                      f"logp/tok={scores['logprob_per_token']:.3f}", flush=True)
        del model
    write_rows(rows, sweep / "emergence.csv", sweep / "emergence.json")
    return rows


def _clean(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def write_rows(rows: list[dict], csv_path, json_path) -> None:
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(ROW_KEYS))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if _clean(r.get(k)) is None else r.get(k)) for k in ROW_KEYS})
    # JSON has no NaN: a metric that does not apply (digit credit of a name) is written as null.
    Path(json_path).write_text(json.dumps([{k: _clean(r.get(k)) for k in ROW_KEYS} for r in rows], indent=2))


# -- plots and summary ---------------------------------------------------------------------------------

_LABELS = {"exact_match": "exact match", "logprob_per_token": "log p per answer token",
           "answer_prob": "P(whole answer)", "edit_distance": "edit distance / len (lower better)",
           "digit_credit": "per-digit credit", "brier": "Brier, first token (lower better)"}


def _tasks_in_order(rows: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r["task"] not in seen:
            seen.append(r["task"])
    return seen


def _num(v) -> float:
    return float("nan") if v is None or v == "" else float(v)


def plot_emergence(rows: list[dict], out_png) -> Path:
    """One row of panels per task: exact match, then each continuous metric, against compute (log x).

    One line per model size N: along a line only the data D grows, so a jump between lines is a
    jump in model size and a jump along one is a jump in training.
    """
    if not rows:
        raise ScalelabError("no emergence results to plot")
    tasks = _tasks_in_order(rows)
    sizes = sorted({_num(r["N"]) for r in rows if r.get("N") is not None})
    cmap = plt.get_cmap("viridis")
    colors = {nv: cmap(i / max(1, len(sizes) - 1)) for i, nv in enumerate(sizes)}
    fig, axes = plt.subplots(len(tasks), len(METRICS), figsize=(3.3 * len(METRICS), 2.8 * len(tasks)), squeeze=False)
    for ti, task in enumerate(tasks):
        trows = [r for r in rows if r["task"] == task]
        for mi, metric in enumerate(METRICS):
            ax = axes[ti][mi]
            drawn = False
            for nv in sizes:
                pts = sorted((_num(r["C"]), _num(r[metric])) for r in trows if _num(r["N"]) == nv)
                pts = [(c, v) for c, v in pts if c > 0 and not math.isnan(v)]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, "o-", color=colors[nv], label=f"N={nv:.3g}", markersize=4)
                    drawn = True
            if drawn:
                ax.set_xscale("log")
            else:
                ax.text(0.5, 0.5, "n/a for this task", ha="center", va="center", transform=ax.transAxes, color="gray")
                ax.set_xticks([])
                ax.set_yticks([])
            ax.set_xlabel("compute C (FLOPs)")
            ax.set_ylabel(_LABELS[metric], fontsize=8)
            ax.set_title(f"{task}: {metric}", fontsize=9)
            ax.grid(alpha=0.3)
        if sizes:
            axes[ti][0].legend(fontsize=7, title="model size", title_fontsize=7)
    fig.suptitle("Emergence: exact match vs continuous metrics over compute")
    # Fixed spacing instead of tight_layout: the automatic layout of a 4x6 grid costs seconds on a CPU box.
    height = fig.get_figheight()
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.5 / height, top=1 - 0.6 / height, wspace=0.45, hspace=0.6)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def curve_shape(values, higher_is_better: bool = True) -> dict:
    """How a metric moves along increasing compute: its range and the share of it in one step.

    ``step_share`` is the largest single improvement between neighbouring points divided by the
    metric's whole range: a smooth trend over k points gives about 1/(k-1), a jump gives near 1.
    """
    xs = [v for v in values if v is not None and not math.isnan(v)]
    if len(xs) < 2:
        return {"points": len(xs), "range": 0.0, "step_share": float("nan"), "step_at": None}
    arr = np.asarray(xs, dtype=float)
    steps = np.diff(arr) * (1 if higher_is_better else -1)
    rng = float(arr.max() - arr.min())
    at = int(np.argmax(steps))
    share = float(max(0.0, steps[at]) / rng) if rng > 0 else 0.0
    return {"points": len(xs), "range": rng, "step_share": share, "step_at": at}


def _verdict(trows: list[dict]) -> str:
    em = [_num(r["exact_match"]) for r in trows]
    lp = [_num(r["logprob_per_token"]) for r in trows]
    e, l = curve_shape(em, True), curve_shape(lp, True)
    k = e["points"]
    if k < 3:
        return f"Only {k} scored run(s): too few points to tell a jump from a trend."
    smooth_share = 1.0 / (k - 1)
    jump_cut = max(0.5, 2 * smooth_share)  # at least half the change, and twice a smooth curve's step
    lp_txt = (f"log-likelihood per token goes from {lp[0]:.3f} to {lp[-1]:.3f} "
              f"(largest single step {l['step_share']:.0%} of its range)")
    # Exact match over n examples is a binomial proportion: a spread inside ~2 standard errors of a
    # difference is sampling noise, not a jump.
    n = min(int(_num(r.get("n", 0)) or 0) for r in trows)
    p = float(np.clip(np.mean(em), 1e-3, 1 - 1e-3))
    noise = 2 * math.sqrt(2 * p * (1 - p) / n) if n else 0.0
    if e["range"] < 0.05 or e["range"] <= noise:
        return (f"Exact match stays flat (between {min(em):.2f} and {max(em):.2f}, within sampling noise of "
                f"±{noise:.2f} for n={n}) over this compute range, "
                f"while {lp_txt}: no emergence visible here, yet the continuous metric "
                f"{'still shows progress' if lp[-1] > lp[0] else 'shows no progress either'}.")
    i = e["step_at"]
    where = (f"between C={_num(trows[i]['C']):.3g} ({trows[i]['name']}, {em[i]:.2f}) and "
             f"C={_num(trows[i + 1]['C']):.3g} ({trows[i + 1]['name']}, {em[i + 1]:.2f})")
    if e["step_share"] >= jump_cut:
        if l["step_share"] >= jump_cut and l["step_at"] == i:
            return (f"Exact match jumps: {e['step_share']:.0%} of its change happens in one step {where}, and "
                    f"{lp_txt}, in the same step: the model itself changes there (or the sweep is too coarse "
                    "to resolve a smooth change), not only the metric.")
        if l["step_share"] >= jump_cut:
            return (f"Exact match jumps: {e['step_share']:.0%} of its change happens in one step {where}, and "
                    f"{lp_txt}, but in a different step: the sweep is too coarse or too noisy to say which.")
        return (f"Exact match jumps: {e['step_share']:.0%} of its change happens in one step {where}, while "
                f"{lp_txt}: consistent with a metric-made (\"mirage\") jump, the likelihood improves gradually.")
    return (f"Exact match rises gradually (largest single step {e['step_share']:.0%} of its range, a smooth trend "
            f"over {k} points would give about {smooth_share:.0%}), and {lp_txt}: no sharp emergence.")


def _fmt(v) -> str:
    v = _num(v)
    if math.isnan(v):
        return "–"
    return f"{v:.3g}" if abs(v) >= 1e4 or (0 < abs(v) < 1e-3) else f"{v:.3f}"


def summarize_emergence(rows: list[dict]) -> str:
    """Markdown: per task, every metric over increasing compute and a data-driven verdict."""
    if not rows:
        return "## Emergence\n\nNo results.\n"
    lines = ["## Emergence: exact match vs continuous metrics", "",
             "Runs in order of compute C. If exact match jumps while the per-token log-likelihood moves "
             "smoothly, the jump is made by the metric (Schaeffer et al., 2023).", ""]
    head = ["run", "N", "D", "C"] + list(METRICS)
    for task in _tasks_in_order(rows):
        trows = sorted((r for r in rows if r["task"] == task), key=lambda r: (_num(r["C"]), r["name"]))
        lines += [f"### {task}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in trows:
            lines.append("| " + " | ".join([str(r["name"])] + [_fmt(r.get(k)) for k in head[1:]]) + " |")
        lines += ["", _verdict(trows), ""]
    return "\n".join(lines)


def run_emergence(sweep_dir, out_dir=None, n: int = 100, seed: int = 0,
                  tasks=("addition", "multiplication", "world_qa"), max_new_tokens: int = 16,
                  progress: bool = False) -> dict:
    """Score a sweep, plot and summarise it. Tables go in the sweep folder; plot and summary in out_dir."""
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise ScalelabError(f"sweep folder not found: {sweep}")
    rows = evaluate_sweep(sweep, tasks=tasks, n=n, seed=seed, max_new_tokens=max_new_tokens, progress=progress)
    out = Path(out_dir) if out_dir else sweep
    out.mkdir(parents=True, exist_ok=True)
    png = plot_emergence(rows, out / "emergence.png")
    summary = summarize_emergence(rows)
    md = out / "emergence.md"
    md.write_text(summary + "\n", encoding="utf-8")
    return {"csv": str(sweep / "emergence.csv"), "json": str(sweep / "emergence.json"), "png": str(png),
            "summary_md": str(md), "summary": summary, "rows": rows}


def run_cli(args) -> None:
    """``scalelab experiments emergence``: the study over the runs of the sweep in scaling.out_dir."""
    cfg = load_config(args.config, args.overrides)
    result = run_emergence(cfg.scaling.out_dir, n=args.n, seed=cfg.run.seed, progress=cfg.run.progress)
    print(result["summary"])
    print(f"plot: {result['png']}; table: {result['csv']}")
