"""Training plots (PNG). matplotlib runs headless."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curves(records: list[dict], out_path: str | Path, baseline_bpb: float | None = None, title: str = "") -> Path:
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", alpha=0.7)
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
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
