"""The abstention study across worlds: one table, one figure and the claim's verdict.

``scalelab experiments abstain-worlds --runs runs/abstain_world3 ... --out runs/abstain_worlds`` reads
finished abstention folders (one per world seed, each a ``results.json``) and reports, per condition,
the mean and sample standard deviation over worlds of known accuracy, unknown abstention and unknown
hallucination, and for each world whether its headline met the target.

The claim's rule was fixed before the fresh worlds ran (docs/posttrain.md, "Fresh worlds 3 to 7"): the
headline is the condition each run's config names (``selected``: RL from (b) at abstain reward 0 in the
preset), judged against that world's own (a), and the claim holds when at least ``need`` of the worlds
meet the target. Nothing here picks a condition by its scores.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from scalelab.errors import ScalelabError
from scalelab.evals.plots import plt
from scalelab.experiments.abstain import meets_target
from scalelab.posttrain import common

METRICS = (("known_accuracy", "known accuracy"), ("unknown_abstain", "unknown: I don't know"),
           ("unknown_hallucination", "unknown: hallucination"))


def load_world(folder: Path) -> dict:
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise ScalelabError(f"{path} not found: run `scalelab experiments abstain` for that world first")
    result = json.loads(path.read_text())
    if "conditions" not in result or "a" not in result["conditions"] or not result.get("selected"):
        raise ScalelabError(f"{path} is not a finished abstention study with a headline condition")
    return result


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize_worlds(results: dict[str, dict], need: int) -> dict:
    """``results``: {label: results.json of one world}. Conditions present in every world are summarised."""
    if not results:
        raise ScalelabError("abstain-worlds needs at least one finished study folder (--runs)")
    headlines = {r["selected"] for r in results.values()}
    if len(headlines) != 1:
        raise ScalelabError(f"the worlds name different headline conditions ({sorted(headlines)}): they ran different presets")
    headline = headlines.pop()
    shared = [c for c in next(iter(results.values()))["conditions"] if all(c in r["conditions"] for r in results.values())]
    conditions = {c: {key: _mean_std([r["conditions"][c][key] for r in results.values()]) for key, _ in METRICS}
                  for c in shared}
    per_world = {}
    for label, r in results.items():
        a, h = r["conditions"]["a"], r["conditions"][headline]
        per_world[label] = {"world_seed": r["world"]["seed"], "a": {k: a[k] for k, _ in METRICS},
                            "headline": {k: h[k] for k, _ in METRICS},
                            "bar_known_accuracy": a["known_accuracy"] - 0.05,
                            "bar_hallucination": 0.5 * a["unknown_hallucination"],
                            "meets_target": meets_target(h, a)}
    met = sum(w["meets_target"] for w in per_world.values())
    return {"headline": headline, "need": need, "worlds_met": met, "n_worlds": len(results),
            "claim_holds": met >= need, "conditions": conditions, "per_world": per_world}


def summary_markdown(s: dict) -> str:
    lines = ["# Abstention across worlds", "",
             f"Headline (fixed by the config): `{s['headline']}`. Target per world: hallucination on unknown "
             "evaluation people <= half of (a)'s, known accuracy >= (a)'s - 0.05.", "",
             "| world | (a) known acc / halluc. | headline known acc / IDK / halluc. | bar: known >= / halluc. <= | met |",
             "|---|---|---|---|---|"]
    for label, w in s["per_world"].items():
        a, h = w["a"], w["headline"]
        lines.append(f"| {w['world_seed']} | {a['known_accuracy']:.3f} / {a['unknown_hallucination']:.3f} | "
                     f"{h['known_accuracy']:.3f} / {h['unknown_abstain']:.3f} / {h['unknown_hallucination']:.3f} | "
                     f"{w['bar_known_accuracy']:.3f} / {w['bar_hallucination']:.3f} | {'yes' if w['meets_target'] else 'no'} |")
    lines += ["", f"Mean ± std over {s['n_worlds']} worlds:", "",
              "| condition | " + " | ".join(name for _, name in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for c, m in s["conditions"].items():
        lines.append(f"| {c} | " + " | ".join(f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}" for k, _ in METRICS) + " |")
    verdict = "holds" if s["claim_holds"] else "does not hold"
    lines += ["", f"The headline meets the target on {s['worlds_met']} of {s['n_worlds']} worlds "
              f"(the claim needs {s['need']}): the claim **{verdict}**.", ""]
    return "\n".join(lines)


def plot_worlds(s: dict, path: Path) -> None:
    names = list(s["conditions"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    w = 0.27
    for k, (key, label) in enumerate(METRICS):
        ax1.bar([i + (k - 1) * w for i in range(len(names))], [s["conditions"][n][key]["mean"] for n in names], w,
                yerr=[s["conditions"][n][key]["std"] for n in names], capsize=3, label=label)
    ax1.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax1.set_ylim(0, 1.05)
    ax1.set_title(f"held-out people, mean ± std over {s['n_worlds']} worlds")
    ax1.legend(fontsize=8)
    for label, wd in s["per_world"].items():
        a, h = wd["a"], wd["headline"]
        ax2.annotate("", xy=(h["unknown_hallucination"], h["known_accuracy"]),
                     xytext=(a["unknown_hallucination"], a["known_accuracy"]), arrowprops={"arrowstyle": "->", "alpha": 0.6})
        ax2.plot(a["unknown_hallucination"], a["known_accuracy"], "s", color="grey", ms=5)
        ax2.plot(wd["bar_hallucination"], wd["bar_known_accuracy"], "k+", ms=8)
        ax2.plot(h["unknown_hallucination"], h["known_accuracy"], "o" if wd["meets_target"] else "x", ms=7,
                 label=f"world {wd['world_seed']}: {'met' if wd['meets_target'] else 'missed'}")
    ax2.set_xlabel("hallucination on unknown people")
    ax2.set_ylabel("accuracy on known people")
    ax2.set_xlim(0, 1.05)
    ax2.set_ylim(0, 1.05)
    ax2.set_title("(a) (grey square) -> headline per world; + marks the target's corner")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_worlds(folders: list[str], out_dir: str, need: int) -> dict:
    if not folders:
        raise ScalelabError("abstain-worlds needs --runs: one finished abstention folder per world")
    if not 1 <= need <= len(folders):
        raise ScalelabError(f"--need must be between 1 and the number of worlds ({len(folders)}), got {need}")
    summary = summarize_worlds({str(f): load_world(Path(f)) for f in folders}, need)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "results.json", summary)
    (out / "results.md").write_text(summary_markdown(summary))
    plot_worlds(summary, out / "abstain_worlds.png")
    return summary


def run_cli(args) -> None:
    runs = args.runs or []
    need = args.need or math.ceil(0.8 * len(runs))  # the committed rule: 4 of 5 worlds
    out = args.out or "runs/abstain_worlds"
    summary = run_worlds(runs, out, need)
    print(summary_markdown(summary))
    print(f"results: {out}/results.md, {out}/results.json, {out}/abstain_worlds.png")
