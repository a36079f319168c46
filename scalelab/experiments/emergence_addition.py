"""``scalelab experiments emergence-addition``: a model organism that crosses from 0 to 1 exact match.

A family of small GPTs is pretrained from scratch on multi-digit addition in the reversed-answer
format ("512+907= 9141": the sum least significant digit first, zero-padded to ``digits + 1``
digits; data generator ``addition_reversed``). Each compute point is one (``model.depth``,
``train.steps``) pair, trained once per seed by the shared pretraining pipeline with the config's
own [model] and [train] sections; the study sets only what it varies (depth, steps, seed) and the
corpus it writes. Under a constant learning rate one run per depth and seed serves every step count
of that depth from its checkpoints (``training_plan``).

Every run answers the same held-out problems (never in its training corpus), greedily, and the same
outputs are scored four ways:

- ``exact_match``: the output equals the answer (discontinuous);
- ``digit_accuracy``: share of the ``L = digits + 1`` answer positions the output gets right
  (position by position; a missing digit is wrong);
- ``edit_distance``: Levenshtein distance between the output's and the answer's token ids, divided
  by the answer's token count (lower is better);
- ``loglik``: the log-likelihood of the whole target (" " + answer) given BOS + prompt, by teacher
  forcing (nats; higher is better).

The sharpness rule (evals/sharpness.py, docs/emergence.md) is applied identically to every metric,
and exact match is compared with ``digit_accuracy ** L`` at each point (Schaeffer et al. 2023).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from matplotlib.ticker import NullFormatter

from scalelab.data.generators import generate as generate_examples
from scalelab.errors import ScalelabError
from scalelab.evals import sharpness as sh
from scalelab.evals.metrics import levenshtein
from scalelab.evals.plots import plt, save_figure
from scalelab.experiments.base_run import open_study_folder
from scalelab.experiments.emergence import answer_logprobs
from scalelab.experiments.study import Study
from scalelab.infer.sample import SamplingParams, generate
from scalelab.pipeline import pretrain
from scalelab.run import CHECKPOINTS_DIR, Run
from scalelab import checkpoint as ckpt

SECTION = "emergence_addition"
TASK = "addition_reversed"
METRICS = ("exact_match", "digit_accuracy", "edit_distance", "loglik")
HIGHER_IS_BETTER = {"exact_match": True, "digit_accuracy": True, "edit_distance": False, "loglik": True}
LABELS = {"exact_match": "exact match", "digit_accuracy": "per-digit accuracy",
          "edit_distance": "token edit distance / length (lower better)", "loglik": "log-likelihood of target (nats)"}


@dataclass
class AdditionEmergenceConfig:
    out_dir: str = "runs/emergence_addition"
    digits: int = 3  # digits per operand; answers have digits + 1
    train_examples: int = 40_000  # distinct training problems (the test problems excluded)
    test_examples: int = 200  # held-out problems every run answers
    # Compute point i trains model.depth = depths[i] for train.steps = steps[i]; the rest of the
    # model and the optimizer are the config's [model] and [train] sections.
    depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2, 2, 2])
    steps: list[int] = field(default_factory=lambda: [125, 250, 500, 1000, 2000, 4000])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # run.seed of each run (init and data order)
    data_seed: int = 0  # the corpus and the test problems (the same for every run)


def validate(a: AdditionEmergenceConfig, cfg) -> None:
    if not 1 <= a.digits <= 8:
        raise ScalelabError(f"invalid config: {SECTION}.digits must be between 1 and 8, got {a.digits}")
    if not a.depths or len(a.depths) != len(a.steps):
        raise ScalelabError(f"invalid config: {SECTION}.depths and {SECTION}.steps must be equally long lists "
                            f"(one entry per compute point), got {len(a.depths)} and {len(a.steps)}")
    if any(d < 1 for d in a.depths) or any(s < 1 for s in a.steps):
        raise ScalelabError(f"invalid config: {SECTION}.depths and {SECTION}.steps must be positive")
    if len(set(zip(a.depths, a.steps))) != len(a.depths):
        raise ScalelabError(f"invalid config: {SECTION} lists a (depth, steps) point twice")
    if not a.seeds or len(set(a.seeds)) != len(a.seeds):
        raise ScalelabError(f"invalid config: {SECTION}.seeds must be distinct and at least one")
    if a.test_examples < 1 or a.train_examples < 1:
        raise ScalelabError(f"invalid config: {SECTION}.train_examples and test_examples must be at least 1")
    pairs = (9 * 10 ** (a.digits - 1) if a.digits > 1 else 10) ** 2
    if a.train_examples + a.test_examples > 0.9 * pairs:
        raise ScalelabError(f"invalid config: {a.digits}-digit addition has only {pairs} problems; "
                            f"ask for at most {int(0.9 * pairs)} train + test examples")
    if cfg.tokenizer.kind != "char":
        raise ScalelabError("invalid config: emergence-addition needs tokenizer.kind = 'char' "
                            "(per-digit accuracy reads one token per digit)")
    if cfg.model.n_embd:
        raise ScalelabError("invalid config: set model.aspect_ratio, not model.n_embd: width must grow with depth")


# -- data ------------------------------------------------------------------------------------------------


def make_data(a: AdditionEmergenceConfig) -> tuple[list, list]:
    """(training examples, test examples): distinct problems, none of the test ones in training."""
    test, seen = [], set()
    for e in generate_examples(TASK, a.test_examples * 3, seed=a.data_seed, digits=a.digits):
        if (e.meta["a"], e.meta["b"]) not in seen and len(test) < a.test_examples:
            seen.add((e.meta["a"], e.meta["b"]))
            test.append(e)
    train, batch_seed = [], a.data_seed + 1
    while len(train) < a.train_examples:
        for e in generate_examples(TASK, a.train_examples, seed=batch_seed, digits=a.digits):
            key = (e.meta["a"], e.meta["b"])
            if key not in seen and len(train) < a.train_examples:
                seen.add(key)
                train.append(e)
        batch_seed += 1000  # a fresh stream of draws; the test seed range is never reused
    return train, test


def write_corpus(examples, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"text": e.text}) + "\n")
    return path


# -- scoring ----------------------------------------------------------------------------------------------


def digit_accuracy(output: str, answer: str) -> float:
    """Share of the answer's positions the output has right, position by position from the left."""
    return sum(1 for i, ch in enumerate(answer) if i < len(output) and output[i] == ch) / len(answer)


def greedy_answer_ids(model, tokenizer, examples, max_new_tokens: int) -> list[list[int]]:
    """The greedy continuation of BOS + prompt as token ids, up to the end of the document (BOS), with
    the separating space dropped: what is compared with the answer's ids."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=(tokenizer.bos_id,))
    space = tokenizer.encode(" ")
    outs = []
    for e in examples:
        ids = generate(model, [tokenizer.bos_id] + tokenizer.encode(e.prompt), params)[0]
        outs.append(ids[len(space):] if ids[: len(space)] == space else ids)
    return outs


def score(model, tokenizer, examples) -> dict:
    """The four metrics, as means over ``examples``, of one greedy decode and one teacher-forced pass."""
    n_answer = max(len(tokenizer.encode(e.answer)) for e in examples)
    out_ids = greedy_answer_ids(model, tokenizer, examples, max_new_tokens=n_answer + 2)
    lps = answer_logprobs(model, tokenizer, examples)
    em, da, ed, ll, texts = [], [], [], [], []
    for e, ids, lp in zip(examples, out_ids, lps):
        target = tokenizer.encode(e.answer)
        text = tokenizer.decode(ids)
        texts.append(text)
        em.append(float(ids == target))
        da.append(digit_accuracy(text, e.answer))
        ed.append(levenshtein(ids, target) / len(target))
        ll.append(sum(lp["token_logprobs"]))
    return {"exact_match": float(np.mean(em)), "digit_accuracy": float(np.mean(da)),
            "edit_distance": float(np.mean(ed)), "loglik": float(np.mean(ll)), "n": len(examples),
            "examples": [{"prompt": e.prompt, "answer": e.answer, "output": o} for e, o in zip(examples[:5], texts)]}


# -- the study -------------------------------------------------------------------------------------------


def _run_config(cfg, corpus: Path, out: Path, depth: int, steps: int, seed: int, ckpt_every: int):
    name = f"d{depth}_s{steps}_seed{seed}"
    return replace(cfg, run=replace(cfg.run, out_dir=str(out / "runs" / name), name=name, seed=seed),
                   data=replace(cfg.data, source="jsonl", path=str(corpus), text_field="text"),
                   model=replace(cfg.model, depth=depth),
                   train=replace(cfg.train, steps=steps, ckpt_every=ckpt_every, keep_checkpoints=0))


def training_plan(cfg, a: AdditionEmergenceConfig) -> list[tuple[int, int, list[int]]]:
    """(depth, steps to train, the step counts scored from its checkpoints) per training run of a seed.

    With a constant learning rate after warmup (``train.optim.schedule = "constant"``) the schedule and
    the batches do not depend on the run's length, so the checkpoint at step s of a longer run *is*
    the run of s steps, bit for bit: one run per depth and seed gives all of that depth's points.
    Any other schedule anneals to its own end, so every point is trained on its own.
    """
    by_depth: dict[int, list[int]] = {}
    for d, s in zip(a.depths, a.steps):
        by_depth.setdefault(d, []).append(s)
    plan = []
    for d in sorted(by_depth):
        steps = sorted(by_depth[d])
        if cfg.train.optim.schedule == "constant":
            plan.append((d, steps[-1], steps))
        else:
            plan += [(d, s, [s]) for s in steps]
    return plan


def run_emergence_addition(cfg, a: AdditionEmergenceConfig, overwrite: bool = False, log=print) -> dict:
    validate(a, cfg)
    out = open_study_folder(a.out_dir, overwrite, keep_base=False)
    t0 = time.perf_counter()
    train, test = make_data(a)
    corpus = write_corpus(train, out / "data" / "train.jsonl")
    (out / "data" / "test.json").write_text(json.dumps([{"prompt": e.prompt, "answer": e.answer} for e in test]))
    rows = []
    for depth, total, scored in training_plan(cfg, a):
        for seed in a.seeds:
            rc = _run_config(cfg, corpus, out, depth, total, seed, ckpt_every=math.gcd(*scored))
            t = time.perf_counter()
            summary = pretrain(rc, overwrite=True, stages=())
            seconds = time.perf_counter() - t
            run = Run.open(rc.run.out_dir)
            at_step = {ckpt.checkpoint_step(c): c for c in ckpt.list_checkpoints(run.path / CHECKPOINTS_DIR)}
            for steps in scored:
                model = ckpt.load_model(at_step[steps])
                tokens = steps * cfg.train.batch_size * cfg.model.block_size
                s = score(model, run.tokenizer, test)
                row = {"depth": depth, "steps": steps, "seed": seed, "params": model.num_params(),
                       "D": tokens, "C": float(model.flops_per_token() * tokens),
                       "run": run.path.name, "train_seconds": seconds * steps / total,
                       **{k: s[k] for k in METRICS}, "n": s["n"], "examples": s["examples"]}
                rows.append(row)
                with open(out / "runs.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                log(f"depth {depth} steps {steps} seed {seed}: C={row['C']:.3g} exact {row['exact_match']:.3f} "
                    f"digits {row['digit_accuracy']:.3f} edit {row['edit_distance']:.3f} loglik {row['loglik']:.3f}")
            for step, path in at_step.items():  # checkpoints between scored points exist only for the spacing
                if step not in scored:
                    shutil.rmtree(path)
            log(f"run {run.path.name}: {seconds:.0f}s, final val loss {summary['train']['final_val_loss']:.4f}")
    result = analyse(rows, a)
    result["seconds_total"] = time.perf_counter() - t0
    result["config"] = {SECTION: asdict(a), "model": asdict(cfg.model), "train": asdict(cfg.train)}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(summary_markdown(result))
    plot(result, out / "emergence_addition.png")
    result["out_dir"] = str(out)
    return result


def analyse(rows: list[dict], a: AdditionEmergenceConfig) -> dict:
    """Per point mean ± std over seeds; sharpness of every metric (seed-mean curve and per seed); the
    mirage check per point."""
    n_digits = a.digits + 1
    keys = sorted({(r["depth"], r["steps"]) for r in rows}, key=lambda k: min(r["C"] for r in rows
                                                                              if (r["depth"], r["steps"]) == k))
    points = []
    for depth, steps in keys:
        rs = [r for r in rows if (r["depth"], r["steps"]) == (depth, steps)]
        p = {"depth": depth, "steps": steps, "params": rs[0]["params"], "C": float(np.mean([r["C"] for r in rs])),
             "seeds": len(rs)}
        for m in METRICS:
            vals = [r[m] for r in rs]
            p[m] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
        pred = [sh.mirage_prediction(r["digit_accuracy"], n_digits) for r in rs]
        em = p["exact_match"]["mean"]
        n = min(r["n"] for r in rs) * len(rs)
        tol = max(0.05, 2 * math.sqrt(max(em * (1 - em), 1e-12) / n))
        p["mirage"] = {"predicted": float(np.mean(pred)), "measured": em, "difference": em - float(np.mean(pred)),
                       "tolerance": tol, "holds": abs(em - float(np.mean(pred))) <= tol}
        points.append(p)
    sharp = {}
    compute = [p["C"] for p in points]
    for m in METRICS:
        curve = sh.sharpness(compute, [p[m]["mean"] for p in points], HIGHER_IS_BETTER[m]) if len(points) > 1 else None
        per_seed = []
        for seed in a.seeds:
            rs = sorted((r for r in rows if r["seed"] == seed), key=lambda r: r["C"])
            if len(rs) > 1 and len({r["C"] for r in rs}) == len(rs):
                per_seed.append(sh.sharpness([r["C"] for r in rs], [r[m] for r in rs], HIGHER_IS_BETTER[m])["sharpness"])
        finite = [v for v in per_seed if not math.isnan(v)]
        sharp[m] = {"curve": curve, "per_seed": per_seed,
                    "per_seed_mean": float(np.mean(finite)) if finite else float("nan"),
                    "per_seed_std": float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan"),
                    "sharp": bool(curve and sh.is_sharp(curve["sharpness"]))}
    continuous = [m for m in METRICS if m != "exact_match"]
    held = sharp["exact_match"]["sharp"] and not any(sharp[m]["sharp"] for m in continuous)
    return {"digits": a.digits, "answer_digits": n_digits, "points": points, "rows": rows, "sharpness": sharp,
            "sharp_cut": sh.SHARP_CUT, "claim_held": held,
            "mirage_holds_at": sum(p["mirage"]["holds"] for p in points)}


def _f(v, fmt=".3f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def verdict(result: dict) -> str:
    s = result["sharpness"]
    em = s["exact_match"]
    cont = [m for m in METRICS if m != "exact_match"]
    sharp_cont = [m for m in cont if s[m]["sharp"]]
    pts = result["points"]
    em_lo, em_hi = pts[0]["exact_match"]["mean"], pts[-1]["exact_match"]["mean"]
    share = em["curve"]["sharpness"] if em["curve"] else float("nan")
    head = (f"Exact match goes from {em_lo:.2f} to {em_hi:.2f} over {pts[-1]['C'] / pts[0]['C']:.0f}x compute, "
            f"with sharpness {_f(share, '.2f')} (sharp at >= {result['sharp_cut']}).")
    if result["claim_held"]:
        tail = ("Every continuous metric is below the cut: the claim held, the jump is the metric's, "
                "the continuous metrics rise gradually.")
    elif not em["sharp"]:
        tail = "Exact match is not sharp by the rule, so there is no jump for the mirage account to explain here."
    else:
        tail = (f"But {', '.join(sharp_cont)} {'is' if len(sharp_cont) == 1 else 'are'} sharp too: the claim did not "
                "hold, the model's outputs change abruptly there, not only the metric.")
    mir = (f"The mirage formula exact match ≈ (per-digit accuracy)^{result['answer_digits']} holds within tolerance at "
           f"{result['mirage_holds_at']} of {len(pts)} points.")
    return " ".join([head, tail, mir])


def summary_markdown(result: dict) -> str:
    a = result["config"][SECTION] if "config" in result else {}
    lines = ["# Emergence on reversed-answer addition", "",
             f"{result['digits']}-digit operands, {result['answer_digits']}-digit reversed answers; "
             f"{len(result['points'])} compute points, seeds {a.get('seeds', '')}; metrics on "
             f"{result['rows'][0]['n']} held-out problems, mean ± std over seeds.", "",
             "| depth | params | steps | C (FLOPs) | exact match | per-digit acc | edit dist | log-lik (nats) "
             f"| (digit acc)^{result['answer_digits']} | holds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        cells = [f"{p[m]['mean']:.3f} ± {p[m]['std']:.3f}" for m in METRICS]
        mir = p["mirage"]
        lines.append(f"| {p['depth']} | {p['params']:,} | {p['steps']} | {p['C']:.3g} | " + " | ".join(cells)
                     + f" | {mir['predicted']:.3f} | {'yes' if mir['holds'] else 'no'} |")
    lines += ["", "Sharpness (share of the total rise inside the steepest 2x compute window; "
              f"a steady trend over this span gives {_f(result['sharpness']['exact_match']['curve']['smooth_share'], '.2f') if result['sharpness']['exact_match']['curve'] else '–'}):", "",
              "| metric | total rise | sharpness (seed mean curve) | steepest window (C) | per seed, mean ± std | sharp |",
              "|---|---|---|---|---|---|"]
    for m in METRICS:
        s = result["sharpness"][m]
        c = s["curve"] or {}
        win = c.get("window")
        lines.append(f"| {m} | {_f(c.get('total_rise'))} | {_f(c.get('sharpness'), '.2f')} | "
                     f"{f'{win[0]:.3g}–{win[1]:.3g}' if win else '–'} | "
                     f"{_f(s['per_seed_mean'], '.2f')} ± {_f(s['per_seed_std'], '.2f')} | {'yes' if s['sharp'] else 'no'} |")
    lines += ["", verdict(result), ""]
    if "seconds_total" in result:
        lines += [f"Wall time: {result['seconds_total']:.0f} s.", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    """Every metric against compute, side by side, mean ± std over seeds; exact match's panel also
    shows the mirage prediction (per-digit accuracy)^L."""
    pts = result["points"]
    c = [p["C"] for p in pts]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6), squeeze=False)
    for ax, m in zip(axes[0], METRICS):
        for i, seed in enumerate(sorted({r["seed"] for r in result["rows"]})):
            rs = sorted((r for r in result["rows"] if r["seed"] == seed), key=lambda r: r["C"])
            ax.plot([r["C"] for r in rs], [r[m] for r in rs], "-", color="tab:blue", alpha=0.25, linewidth=1,
                    label="each seed" if i == 0 else None)
        ax.errorbar(c, [p[m]["mean"] for p in pts], yerr=[p[m]["std"] for p in pts], fmt="o-", capsize=3,
                    label="mean ± std over seeds")
        if m == "exact_match":
            ax.plot(c, [p["mirage"]["predicted"] for p in pts], "s--", color="gray", markersize=4,
                    label=f"(per-digit acc)^{result['answer_digits']}")
        s = result["sharpness"][m]["curve"]
        if s and s["window"]:
            ax.axvspan(*s["window"], color="orange", alpha=0.15, label=f"steepest 2x: {s['sharpness']:.2f} of rise")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on a 32x axis
        ax.set(xlabel="training compute C (FLOPs)", title=LABELS[m])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, f"{result['digits']}-digit reversed addition: every metric against compute")


def _summary(result: dict) -> str:
    return summary_markdown(result)


STUDY = Study(SECTION, AdditionEmergenceConfig, run_emergence_addition, _summary,
              ("results.md", "results.json", "emergence_addition.png"))
