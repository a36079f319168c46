"""A short, readable report.md for a run folder, with its loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path

from scalelab.evals.metrics import bits_vs_baseline
from scalelab.evals.plots import plot_loss_curves
from scalelab.evals.subtasks import plot_subtask_losses, saturation_steps, subtask_curves
from scalelab.train.metrics import read_metrics


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_report(run_dir: str | Path) -> Path:
    run = Path(run_dir)
    records = read_metrics(run / "metrics.jsonl")
    ev = _load_json(run / "eval.json")
    summary = _load_json(run / "summary.json")
    setup = next((r for r in records if r.get("kind") == "setup"), {})
    plot_loss_curves(records, run / "loss.png", baseline_bpb=ev.get("ngram_val_bpb"), title=run.name)
    subtask_png = plot_subtask_losses(records, run / "subtasks.png", title=f"{run.name}: next-token loss by sub-task")
    lines = [f"# Run report: {run.name}", ""]
    if setup:
        lines += [
            f"- parameters: {setup['params']:,} ({setup['params_non_embedding']:,} without embeddings)",
            f"- training FLOPs per token: {setup['flops_per_token']:,}",
            f"- processes: {setup.get('world_size', 1)} on {setup.get('device', '?')}",
        ]
    train = summary.get("train", {})
    if train:
        lines += [
            f"- steps: {train['steps']}, tokens seen: {train['tokens_seen']:,}, wall time: {train['wall_seconds']:.1f} s",
            f"- best val loss during training: {train['best_val_loss']:.4f}",
        ]
    interventions = [r for r in records if r.get("kind") == "intervention"]
    if interventions:
        lines += ["", "## Loss-spike interventions", ""]
        lines += [f"- step {r['step']}: {r['reason']}; rolled back to step {r['rolled_back_to']} and skipped "
                  f"{r['skipped_batches']} batches" for r in interventions]
    if ev:
        lines += [
            "",
            "## Evaluation (full validation split)",
            "",
            "| model | val loss (nats/token) | val bits per byte |",
            "|---|---|---|",
            f"| this GPT | {ev['val_loss']:.4f} | {ev['val_bpb']:.4f} |",
            f"| {ev['ngram_order']}-gram Kneser–Ney baseline | {ev['ngram_val_loss']:.4f} | {ev['ngram_val_bpb']:.4f} |",
            "",
            f"The GPT needs {bits_vs_baseline(ev['bpb_improvement_over_ngram'])} per byte than the n-gram baseline. "
            f"Tokenizer compression on validation text: {ev['tokenizer_bytes_per_token_val']:.2f} bytes/token.",
        ]
        if ev.get("tasks"):
            lines += ["", "## Tasks (exact match, greedy)", "", "| task | accuracy | n |", "|---|---|---|"]
            for name, t in ev["tasks"].items():
                lines.append(f"| {name} | {t['accuracy']:.3f} | {t['n']} |")
            for name, t in ev["tasks"].items():
                if t.get("samples"):
                    lines += ["", f"Examples from `{name}`:", ""]
                    for s in t["samples"][:3]:
                        mark = "✓" if s["correct"] else "✗"
                        lines.append(f"- {mark} `{s['prompt'].splitlines()[0]}` → `{s['output']}` (answer `{s['answer']}`)")
    samples_path = run / "samples.jsonl"
    if samples_path.is_file():
        lines += ["", "## Samples", ""]
        for line in samples_path.read_text(encoding="utf-8").splitlines():
            s = json.loads(line)
            lines += ["```text", (s["prompt"] + s["completion"]).strip(), "```", ""]
    lines += ["", "![loss curves](loss.png)"]
    if subtask_png:
        sat = saturation_steps(subtask_curves(records))
        order = ", ".join(f"{name} at step {step}" for name, step in sorted(sat.items(), key=lambda kv: kv[1]))
        lines += ["", "## Sub-tasks", "",
                  f"Step at which each sub-task first reached 90% of its improvement in this run: {order}.",
                  "", "![val loss by sub-task](subtasks.png)"]
    lines += ["", "Config: [`config.toml`](config.toml). Metrics: `metrics.jsonl`. "
              "Everything on one page: [`report_card.html`](report_card.html)."]
    out = run / "report.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
