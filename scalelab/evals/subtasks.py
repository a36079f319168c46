"""Validation loss by sub-task over training: the curves, their saturation steps and the plot.

The tags themselves (which sub-task each validation token exercises) come from scalelab/data/subtask_tags.py.
"""

from __future__ import annotations

from pathlib import Path

from scalelab.data.subtask_tags import SUBTASKS
from scalelab.evals.plots import plt, save_figure


def subtask_curves(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Per sub-task (steps, val losses) from a run's metrics records."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        if r.get("kind") != "eval":
            continue
        for key, value in r.items():
            if key.startswith("val_loss/"):
                steps, losses = curves.setdefault(key.split("/", 1)[1], ([], []))
                steps.append(r["step"])
                losses.append(value)
    return curves


def saturation_steps(curves: dict[str, tuple[list[int], list[float]]], fraction: float = 0.9) -> dict[str, int]:
    """The first step at which each sub-task has made ``fraction`` of the improvement it makes in the run."""
    out = {}
    for name, (steps, losses) in curves.items():
        first, last = losses[0], min(losses)
        target = first - fraction * (first - last)
        out[name] = next(s for s, v in zip(steps, losses) if v <= target)
    return out


def plot_subtask_losses(records: list[dict], out_path: str | Path, title: str = "") -> Path | None:
    """Raw per-sub-task val loss, and each one's share of its own total improvement, against step.

    The right panel puts the sub-tasks on one scale, so the order in which they saturate is visible.
    Returns None when the run logged no sub-task losses.
    """
    curves = subtask_curves(records)
    curves = {k: v for k, v in curves.items() if len(v[0]) >= 2}
    if not curves:
        return None

    fig, (ax_raw, ax_norm) = plt.subplots(1, 2, figsize=(11, 4))
    total = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    ax_raw.plot(*zip(*total), "k--", lw=1, label="all tokens")
    sat = saturation_steps(curves)
    for name in SUBTASKS:
        if name not in curves:
            continue
        steps, losses = curves[name]
        (line,) = ax_raw.plot(steps, losses, "o-", ms=3, label=name)
        span = losses[0] - min(losses)
        progress = [(losses[0] - v) / span if span > 0 else 1.0 for v in losses]
        ax_norm.plot(steps, progress, "o-", ms=3, color=line.get_color(), label=f"{name} (90% at step {sat[name]})")
        ax_norm.axvline(sat[name], color=line.get_color(), lw=0.8, alpha=0.5)
    ax_raw.set(xlabel="optimizer step", ylabel="val loss (nats/token)", title="val loss by sub-task", yscale="log")
    ax_norm.set(xlabel="optimizer step", ylabel="share of the run's improvement", title="when each sub-task saturates")
    ax_norm.axhline(0.9, color="gray", lw=0.8, ls=":")
    for ax in (ax_raw, ax_norm):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, out_path, title)
