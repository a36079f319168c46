"""Training plots (PNG). matplotlib runs headless."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def split_rolled_back(records: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(kept records, abandoned records, interventions), each in log order.

    A spike-guard intervention abandons the train and eval records logged since the step it
    rolled back to; the log keeps them, and plots show them apart from the model's actual history.
    """
    kept: list[dict] = []
    abandoned: list[dict] = []
    interventions: list[dict] = []
    for r in records:
        if r.get("kind") == "intervention":
            interventions.append(r)
            back = r.get("rolled_back_to", r["step"])
            abandoned += [k for k in kept if k.get("kind") in ("train", "eval") and k["step"] > back]
            kept = [k for k in kept if not (k.get("kind") in ("train", "eval") and k["step"] > back)]
        else:
            kept.append(r)
    return kept, abandoned, interventions


def plot_loss_curves(records: list[dict], out_path: str | Path, baseline_bpb: float | None = None, title: str = "") -> Path:
    kept, abandoned, interventions = split_rolled_back(records)
    train = [r for r in kept if r.get("kind") == "train"]
    evals = [r for r in kept if r.get("kind") == "eval"]
    abandoned_train = [r for r in abandoned if r.get("kind") == "train"]
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", alpha=0.7)
    if abandoned_train:
        ax_loss.plot([r["step"] for r in abandoned_train], [r["loss"] for r in abandoned_train], ".", color="gray",
                     alpha=0.6, label="rolled back (abandoned)")
    for i, r in enumerate(interventions):
        ax_loss.axvline(r["step"], color="red", linestyle=":", alpha=0.8,
                        label=f"loss spike: rolled back ({len(interventions)})" if i == 0 else None)
        ax_loss.axvspan(r.get("rolled_back_to", r["step"]), r["step"], color="red", alpha=0.08)
        ax_bpb.axvline(r["step"], color="red", linestyle=":", alpha=0.8)
        if r.get("loss") is not None:
            ax_loss.plot([r["step"]], [r["loss"]], "x", color="red")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
        ax_bpb.plot([r["step"] for r in evals], [r["val_bpb"] for r in evals], "o-", label="model (val)")
    if baseline_bpb is not None:
        ax_bpb.axhline(baseline_bpb, color="gray", linestyle="--", label=f"n-gram baseline ({baseline_bpb:.3f})")
    ax_loss.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title="loss")
    ax_bpb.set(xlabel="optimizer step", ylabel="bits per byte", title="validation bits per byte")
    for ax in (ax_loss, ax_bpb):
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, out_path, title)


def label_fraction_axes(ax, title: str, xlabel: str, ylabel: str, legend_size: int = 7) -> None:
    """Labels for a panel whose y axis is a rate in [0, 1], with a little room so 0 and 1 stay visible."""
    if title:
        ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=legend_size)


def save_figure(fig, out_path: str | Path, title: str = "") -> Path:
    """Title, tight layout, PNG at 110 dpi, and the figure closed (long sweeps draw many)."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
