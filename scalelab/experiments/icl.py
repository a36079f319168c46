"""In-context learning against model size: accuracy at 0, 1, 2, 4, 8 shots for several depths.

Each size is a GPT of a different depth (width = depth x ``model.aspect_ratio``), pretrained on the
same synthetic world corpus for the same number of steps; the world's QA is partly mixed into
pretraining (``data.world.qa_in_pretrain_fraction``), so the "Question: ... Answer: ..." format is
something a model can recognise from examples in its prompt. Every size is scored by the evaluation
harness (scalelab/evals/harness.py) on the same test items with the same seeded shots.

The claim under test (Brown et al. 2020): the gain from shots grows with model size. The summary
reports, per task, each size's gain from 0 shots to the most shots, and whether the gains grow with
the parameter count, whatever the data show.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from scalelab.errors import ScalelabError
from scalelab.evals.harness import TaskContext, get_task, run_eval
from scalelab.evals.lm import load_lm
from scalelab.evals.plots import plt, save_figure
from scalelab.experiments.base_run import clear_outputs_keep_base, ensure_base
from scalelab.experiments.study import Study
from scalelab.run import Run


@dataclass
class ICLConfig:
    out_dir: str = "runs/icl"
    depths: list[int] = field(default_factory=lambda: [1, 2, 4])
    shots: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8])
    tasks: list[str] = field(default_factory=lambda: ["world_qa", "world_qa_mc", "world_facts_newformat"])
    n: int = 60  # test items per task
    seed: int = 0


def validate(a: ICLConfig, cfg) -> None:
    if not a.depths or any(not isinstance(d, int) or d < 1 for d in a.depths):
        raise ScalelabError(f"invalid config: icl.depths must be depths >= 1, got {a.depths!r}")
    if not a.shots or any(not isinstance(s, int) or s < 0 for s in a.shots):
        raise ScalelabError(f"invalid config: icl.shots must be counts >= 0, got {a.shots!r}")
    if a.n < 1:
        raise ScalelabError(f"invalid config: icl.n must be at least 1, got {a.n}")
    for t in a.tasks:
        get_task(t)
    if not a.tasks:
        raise ScalelabError("invalid config: icl.tasks needs at least one harness task")
    if cfg.model.n_embd:
        raise ScalelabError("invalid config: set model.aspect_ratio, not model.n_embd: width must grow with depth")


def headline_metric(task: str) -> str:
    return get_task(task).metrics[0]


def run_icl(cfg, a: ICLConfig, overwrite: bool = False, log=print) -> dict:
    validate(a, cfg)
    out = Path(a.out_dir)
    if overwrite:
        clear_outputs_keep_base(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sizes, timings = [], {}
    for depth in sorted(set(a.depths)):
        t = time.perf_counter()
        c = replace(cfg, model=replace(cfg.model, depth=depth))
        base = ensure_base(c, out / f"base_d{depth}")
        timings[f"base_d{depth}"] = time.perf_counter() - t
        lm = load_lm(base)
        t = time.perf_counter()
        ctx = TaskContext(world=Run.open(base).world, seed=a.seed, n=a.n)
        res = run_eval(lm, list(a.tasks), sorted(set(a.shots)), ctx,
                       progress=lambda s, d=depth: log(f"depth {d}: {s}"))
        timings[f"eval_d{depth}"] = time.perf_counter() - t
        final_loss = _final_val_loss(base)
        sizes.append({"depth": depth, "n_embd": lm.model.config.n_embd, "params": lm.model.num_params(),
                      "final_val_loss": final_loss, "tasks": res["tasks"]})
        log(f"depth {depth}: {sizes[-1]['params']:,} params, val loss {final_loss}")
    timings["total"] = time.perf_counter() - t0
    result = {"icl": asdict(a), "sizes": sizes, "gains": gains(sizes, a), "timings_seconds": timings,
              "world": asdict(cfg.data.world), "train_steps": cfg.train.steps}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(result))
    plot(result, out / "icl.png")
    return result


def _final_val_loss(run: Path):
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    evals = [json.loads(line) for line in path.read_text().splitlines() if '"eval"' in line]
    evals = [r for r in evals if r.get("kind") == "eval"]
    return evals[-1]["val_loss"] if evals else None


def gains(sizes: list[dict], a: ICLConfig) -> dict:
    """Per task: each size's headline metric at the most shots minus at the fewest, and whether the
    gains grow with the parameter count (strictly, across every step up in size)."""
    lo, hi = str(min(a.shots)), str(max(a.shots))
    out = {}
    for task in a.tasks:
        metric = headline_metric(task)
        by_size = [(s["params"], s["tasks"][task]["shots"][hi][metric] - s["tasks"][task]["shots"][lo][metric])
                   for s in sorted(sizes, key=lambda s: s["params"])]
        out[task] = {"metric": metric, "gain_by_params": by_size,
                     "grows_with_size": (all(b[1] > a_[1] for a_, b in zip(by_size, by_size[1:]))
                                         if len(by_size) > 1 else None)}
    return out


def summary_markdown(result: dict) -> str:
    a = result["icl"]
    lines = ["# In-context learning vs model size", "",
             f"Sizes: depths {', '.join(str(s['depth']) for s in result['sizes'])}, each pretrained for "
             f"{result['train_steps']} steps on the same world corpus; {a['n']} test items per task, seed {a['seed']}.", ""]
    for task in a["tasks"]:
        metric = result["gains"][task]["metric"]
        shots = [str(k) for k in sorted(set(a["shots"]))]
        lines += [f"## {task} ({metric})", "", "| depth | params | " + " | ".join(f"{k}-shot" for k in shots) + " | gain |",
                  "|---|---|" + "---|" * (len(shots) + 1)]
        for s in result["sizes"]:
            vals = [s["tasks"][task]["shots"][k][metric] for k in shots]
            lines.append(f"| {s['depth']} | {s['params']:,} | " + " | ".join(f"{v:.3f}" for v in vals)
                         + f" | {vals[-1] - vals[0]:+.3f} |")
        g = result["gains"][task]
        verdict = {True: "grows", False: "does not grow", None: "cannot be compared across sizes (one size)"}[
            g["grows_with_size"]]
        lines += ["", f"The gain from {shots[0]} to {shots[-1]} shots {verdict} with model size here.", ""]
    t = result["timings_seconds"]
    lines += ["Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()), ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    a = result["icl"]
    shots = sorted(set(a["shots"]))
    fig, axes = plt.subplots(1, len(a["tasks"]), figsize=(5.5 * len(a["tasks"]), 4.2), squeeze=False)
    for ax, task in zip(axes[0], a["tasks"]):
        metric = result["gains"][task]["metric"]
        for s in result["sizes"]:
            ax.plot(range(len(shots)), [s["tasks"][task]["shots"][str(k)][metric] for k in shots], "o-",
                    label=f"depth {s['depth']} ({s['params'] / 1e6:.2f}M params)")
        ax.set_xticks(range(len(shots)), [str(k) for k in shots])
        ax.set(xlabel="shots in the prompt", ylabel=metric, title=task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, "In-context learning vs model size")


STUDY = Study("icl", ICLConfig, run_icl, summary_markdown,
              ("summary.md", "results.json", "icl.png"))
