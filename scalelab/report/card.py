"""The report card: one Markdown and one self-contained HTML report over any set of run folders.

A RUN_DIR may be a pretraining run, a post-training stage (SFT, RM, DPO, PPO, GRPO), a scaling sweep's
out_dir (results.csv, fit.json and its plots), or any folder a study wrote PNGs and Markdown into (its run
sub-folders come along). Everything is read from files already there; sections with nothing to show are left out.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
import tomllib
from pathlib import Path

import torch

from scalelab.errors import ScalelabError
from scalelab.evals.plots import plt, save_figure
from scalelab.model.gpt import GPT, GPTConfig
from scalelab.report.blocks import STAGE_TITLES, Card, Code, Figure, Notes, RunInfo, Section, Table
from scalelab.report.html import render_html
from scalelab.run import CONFIG_FILE
from scalelab.train.metrics import read_metrics

CARD_NAME = "report_card"
# Flat-metric files an eval harness may leave in a run folder; results.json only counts inside a run folder,
# because a study's results.json is a dump of its whole design, not metrics.
EVAL_RESULT_FILES = ("eval_results.json", "results.json")
NOTE_FILES = ("summary.md", "results.md", "fit.md", "emergence.md")
PLOT_CAPTIONS = {
    "loss.png": "training and validation loss, validation bits per byte against the n-gram baseline",
    "subtasks.png": "validation loss by sub-task (filler, names, facts, digits) over training",
    "fit_chinchilla.png": "scaling: Chinchilla fit L(N, D) = E + A/N^alpha + B/D^beta over the sweep",
    "loss_vs_compute.png": "scaling: loss against training compute, with the fitted compute frontier",
    "isoflop.png": "scaling: IsoFLOP curves, loss against model size at fixed compute",
    "emergence.png": "emergence: exact match next to continuous metrics across model scale",
}
SKIPPED_KEYS = {"checkpoint", "init", "stage"}
MAX_SAMPLES = 5
MAX_TABLE_ROWS = 60


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def eval_file_metrics(obj, prefix: str) -> dict[str, float]:
    """An eval result file's numbers. ``scalelab eval --out`` writes {"tasks": {task: {"shots": {k: metrics}}}},
    nested deeper than ``flat_metrics`` looks, so each task and shot count becomes one flat prefix."""
    tasks = obj.get("tasks") if isinstance(obj, dict) else None
    if not isinstance(tasks, dict) or not all(isinstance(t, dict) and "shots" in t for t in tasks.values()):
        return flat_metrics(obj, prefix)
    out = {f"{prefix}{k}": v for k, v in obj.items() if _is_number(v) and k not in SKIPPED_KEYS}
    for task, entry in tasks.items():
        for shots, metrics in entry["shots"].items():
            out.update(flat_metrics(metrics, f"{prefix}{task}.{shots}-shot.", 0))
    return out


def flat_metrics(obj, prefix: str = "", depth: int = 3) -> dict[str, float]:
    """Numeric leaves of nested dicts as {"a.b": value}; lists, strings and bookkeeping keys are skipped."""
    out: dict[str, float] = {}
    if not isinstance(obj, dict) or depth < 0:
        return out
    for k, v in obj.items():
        if k in SKIPPED_KEYS:
            continue
        name = f"{prefix}{k}"
        if _is_number(v):
            out[name] = v
        elif isinstance(v, dict):
            out.update(flat_metrics(v, name + ".", depth - 1))
    return out


def last_eval(records: list[dict]) -> dict[str, float]:
    """Every metric of the last eval step (several eval records may share it: loss first, exact match after)."""
    evals = [r for r in records if r.get("kind") == "eval"]
    if not evals:
        return {}
    step = evals[-1].get("step")
    out: dict[str, float] = {}
    for r in evals:
        if r.get("step") == step:
            out.update({k: v for k, v in r.items() if _is_number(v) and k not in ("step", "time", "elapsed")})
    return out


def _detect_stage(run: Path, summary: dict, records: list[dict]) -> str | None:
    stage_file = _load_json(run / "stage.json") or {}
    setup = next((r for r in records if r.get("kind") == "setup"), {})
    stage = stage_file.get("stage") or summary.get("stage") or setup.get("stage")
    if stage:
        return "grpo" if str(stage).lower() in ("grpo", "rl") else str(stage).lower()
    if "train" in summary or "flops_per_token" in setup or records:
        return "base"
    if (run / "results.csv").is_file() and ((run / "fit.json").is_file() or (run / "runs").is_dir()):
        return "scaling"
    if summary:
        return "study"
    return None


def _figures(run: Path) -> list[Figure]:
    return [Figure(p, PLOT_CAPTIONS.get(p.name, p.stem.replace("_", " "))) for p in sorted(run.glob("*.png"))
            if not p.name.startswith(CARD_NAME)]  # an earlier card's own plot is not the run's


def _notes(run: Path) -> list[Notes]:
    return [Notes(p.read_text(encoding="utf-8").strip(), p.name) for p in (run / n for n in NOTE_FILES) if p.is_file()]


def _samples(run: Path, summary: dict) -> list[str]:
    out = [s["prompt"] + s["completion"] for s in summary.get("samples", [])
           if isinstance(s, dict) and "completion" in s]
    path = run / "samples.jsonl"
    if not out and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                s = json.loads(line)
                out.append(s["prompt"] + s["completion"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    ev = summary.get("eval") if isinstance(summary.get("eval"), dict) else {}
    tasks = ev.get("tasks") if isinstance(ev.get("tasks"), dict) else {}
    for name, task in tasks.items():
        graded = task.get("samples") if isinstance(task, dict) else None
        for s in [g for g in (graded or []) if isinstance(g, dict)][:2]:
            mark = "right" if s.get("correct") else "wrong"
            out.append(f"[{name}, {mark}] {s.get('prompt', '').strip()} {s.get('output', '')}"
                       f"  (answer: {s.get('answer')})")
    return [s.strip() for s in out[: MAX_SAMPLES * 2]]


def _model_flops_per_token(config_table: dict) -> int | None:
    """Training FLOPs per token of the run's model, built on the meta device (no memory, no weights)."""
    try:


        with torch.device("meta"):
            return GPT(GPTConfig(**config_table["model"])).flops_per_token()
    except Exception:  # an unreadable or foreign model section: FLOPs are then just not shown
        return None


def _compute(info: RunInfo, summary: dict, records: list[dict], config_table: dict) -> None:
    train = summary.get("train") if isinstance(summary.get("train"), dict) else {}
    setup = next((r for r in records if r.get("kind") == "setup"), {})
    timed = [r["elapsed"] for r in records if _is_number(r.get("elapsed"))]
    info.wall_seconds = train.get("wall_seconds") or summary.get("wall_seconds") or (max(timed) if timed else None)
    info.steps = train.get("steps") or summary.get("steps") or summary.get("iterations")
    tokens_logged = [r["tokens"] for r in records if r.get("kind") == "train" and _is_number(r.get("tokens"))]
    info.tokens = train.get("tokens_seen") or (tokens_logged[-1] if tokens_logged else None)
    if info.stage == "sft" and info.tokens is None and info.steps and setup.get("blocks"):
        # SFT steps run the full (packed or padded) block, masked tokens included
        batch = min(config_table.get("sft", {}).get("batch_size", 0) or 0, setup["blocks"])
        info.tokens = info.steps * batch * config_table.get("model", {}).get("block_size", 0) or None
    recorded = train.get("flops") or summary.get("flops")
    if _is_number(recorded):
        info.flops, info.flops_source = recorded, "recorded by the run"
    elif info.tokens:
        per_token = setup.get("flops_per_token") or _model_flops_per_token(config_table)
        if per_token:
            info.flops, info.flops_source = per_token * info.tokens, "flops_per_token x tokens processed"


def _scaling(info: RunInfo, run: Path) -> None:
    with open(run / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    keep = [k for k in ("name", "N", "D", "C", "loss", "best_val_loss", "wall_seconds") if rows and k in rows[0]]
    info.table = Table(keep, [[_fmt_cell(r.get(k, "")) for k in keep] for r in rows[:MAX_TABLE_ROWS]])

    def total(key):
        vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
        return sum(vals) if vals else None

    info.wall_seconds, info.tokens, info.flops = total("wall_seconds"), total("D"), total("C")
    info.flops_source = "sum of C over the sweep's runs" if info.flops else ""
    info.steps = total("steps")
    fit = _load_json(run / "fit.json") or {}
    for name in ("chinchilla", "power_law_frontier"):
        part = fit.get(name) if isinstance(fit.get(name), dict) else {}
        info.metrics.update({f"{name}.{k}": v for k, v in part.items() if _is_number(v)})
    info.metrics.update(flat_metrics(_load_json(run / "prediction.json") or {}, "prediction.", 0))


def collect_run(path: str | Path, name: str | None = None) -> RunInfo:
    run = Path(path)
    if not run.is_dir():
        raise ScalelabError(f"{run} does not exist or is not a folder")
    records = read_metrics(run / "metrics.jsonl")
    summary = _load_json(run / "summary.json")
    summary = summary if isinstance(summary, dict) else {}
    stage = _detect_stage(run, summary, records)
    if stage is None and (any(run.glob("*.png")) or _child_runs(run)):
        stage = "study"
    if stage is None:
        raise ScalelabError(f"{run} is not a run folder (no metrics.jsonl, summary.json, results.csv or plots in it)")
    info = RunInfo(run, name or run.resolve().name, stage, records=records)
    config_path = run / CONFIG_FILE
    config_table = {}
    if config_path.is_file():
        info.config_text = config_path.read_text(encoding="utf-8")
        try:
            config_table = tomllib.loads(info.config_text)
        except ValueError:
            config_table = {}
    elif (run / "sweep.toml").is_file():
        info.config_text = (run / "sweep.toml").read_text(encoding="utf-8")
    info.figures, info.notes = _figures(run), _notes(run)
    if stage == "scaling":
        _scaling(info, run)
    elif stage != "study":
        info.metrics = flat_metrics(summary)
        # the last in-training eval; a post-training summary already holds the same keys
        info.metrics.update({k: v for k, v in last_eval(records).items() if k not in info.metrics})
        for name in EVAL_RESULT_FILES:
            info.metrics.update(eval_file_metrics(_load_json(run / name) or {}, f"{name.removesuffix('.json')}."))
        _compute(info, summary, records, config_table)
        info.samples = _samples(run, summary)
    setup = next((r for r in records if r.get("kind") == "setup"), {})
    info.recorded_machine = {k: setup[k] for k in ("device", "world_size", "nodes") if k in setup}
    if isinstance(summary.get("machine"), (str, dict)):
        info.recorded_machine["machine"] = summary["machine"]
    return info


def _child_runs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_dir() and ((p / "metrics.jsonl").is_file() or (p / "summary.json").is_file()))


def collect_runs(run_dirs) -> list[RunInfo]:
    """Each RUN_DIR, and for a study folder also the run folders directly inside it."""
    out = []
    for d in run_dirs:
        info = collect_run(d)
        out.append(info)
        if info.stage == "study":
            out += [collect_run(child, f"{info.name}/{child.name}") for child in _child_runs(info.path)]
    seen: dict[str, int] = {}
    for r in out:  # two folders of one name (runs/a/base, runs/b/base) stay apart in every table
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r.name = f"{r.name} ({seen[r.name]})"
    return out


def machine_info() -> dict[str, str]:
    """The machine writing the report: CPU model, cores, RAM, torch and any CUDA device."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {"CPU": cpu, "logical cores": str(os.cpu_count()), "platform": platform.platform(),
            "Python": platform.python_version(), "torch": torch.__version__}
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        info["RAM"] = f"{ram / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    info["CUDA device"] = (f"{torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})"
                           if torch.cuda.is_available() else "none")
    return info


def _fmt(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int) or (float(v).is_integer() and abs(v) < 1e15):
        return f"{int(v):,}"
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def _fmt_cell(s: str) -> str:
    try:
        return _fmt(float(s)) if s not in ("", None) else ""
    except ValueError:
        return s


def _duration(s) -> str:
    if s is None:
        return "not recorded"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min ({s:.0f} s)"


def plot_loss_overview(runs: list[RunInfo], out_path: Path) -> Path | None:
    """Every run's training loss (and validation loss where logged) on one axis, by optimizer step."""
    curves = [(r, [x for x in r.records if x.get("kind") == "train" and _is_number(x.get("loss"))],
               [x for x in r.records if x.get("kind") == "eval" and _is_number(x.get("val_loss"))]) for r in runs]
    curves = [c for c in curves if c[1] or c[2]]
    if not curves:
        return None

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r, train, evals in curves:
        label = f"{r.name} ({STAGE_TITLES.get(r.stage, r.stage)})"
        line = None
        if train:
            (line,) = ax.plot([x["step"] for x in train], [x["loss"] for x in train], alpha=0.8,
                              label=f"{label}: train")
        if evals:
            ax.plot([x["step"] for x in evals], [x["val_loss"] for x in evals], "o--", markersize=3,
                    color=line.get_color() if line else None, label=f"{label}: val")
    ax.set(xlabel="optimizer step", ylabel="loss (each stage's own objective)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out_path, "loss curves")


def build_card(runs: list[RunInfo], out_dir: Path, title: str) -> Card:
    sections = []
    stages = [s for s in STAGE_TITLES if any(r.stage == s and r.metrics for r in runs)]
    stages += sorted({r.stage for r in runs if r.metrics and r.stage not in STAGE_TITLES})
    if stages:
        sec = Section("Metrics by stage")
        for stage in stages:
            group = [r for r in runs if r.stage == stage and r.metrics]
            names = list(dict.fromkeys(k for r in group for k in r.metrics))
            sec.blocks += [f"**{STAGE_TITLES.get(stage, stage)}**",
                           Table(["metric"] + [r.name for r in group],
                                 [[k] + [_fmt(r.metrics[k]) if k in r.metrics else "" for r in group] for k in names])]
        sections.append(sec)
    spent = [r for r in runs if r.wall_seconds or r.flops or r.steps]
    if spent:
        rows = [[r.name, STAGE_TITLES.get(r.stage, r.stage), _fmt(r.steps) if r.steps else "",
                 _duration(r.wall_seconds), _fmt(r.tokens) if r.tokens else "",
                 f"{r.flops:.3e}" if r.flops else "not recorded", r.flops_source]
                for r in spent]
        sections.append(Section("Time and compute", [
            Table(["run", "stage", "steps", "wall time", "tokens processed", "training FLOPs", "FLOPs from"], rows),
            "FLOPs follow `GPT.flops_per_token` (forward + backward, PaLM convention) times the tokens each stage "
            "processed; stages that log no token count (RM, DPO, PPO, GRPO) show none.",
        ]))
    loss_png = plot_loss_overview(runs, out_dir / f"{CARD_NAME}_loss.png")
    if loss_png:
        sections.append(Section("Loss curves", [Figure(loss_png, "training loss (lines) and validation loss "
                                                                 "(dashed, dots) of every run, by optimizer step")]))
    figures = [(r, f) for r in runs for f in r.figures]
    if figures:
        sections.append(Section("Plots", [Figure(f.path, f"{r.name}: {f.caption}") for r, f in figures]))
    tables = [r for r in runs if r.table]
    notes = [(r, n) for r in runs for n in r.notes]
    if tables or notes:
        sec = Section("Study results")
        for r in tables:
            sec.blocks += [f"**{r.name}**: the sweep's runs (`results.csv`)", r.table]
        sec.blocks += [Notes(n.text, f"{r.name}/{n.label}") for r, n in notes]
        sections.append(sec)
    sampled = [r for r in runs if r.samples]
    if sampled:
        sections.append(Section("Samples", [Code("\n\n".join(r.samples), f"{r.name}", "text") for r in sampled]))
    here = machine_info()
    machine = Section("Machine", [f"This report was written on {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by:",
                                  Table(["", "this machine"], [[k, v] for k, v in here.items()])])
    recorded = [r for r in runs if r.recorded_machine]
    if recorded:
        keys = list(dict.fromkeys(k for r in recorded for k in r.recorded_machine))
        machine.blocks += ["What the runs recorded when they trained:",
                           Table(["run"] + keys, [[r.name] + [str(r.recorded_machine.get(k, "")) for k in keys]
                                                  for r in recorded])]
    sections.append(machine)
    configs = [r for r in runs if r.config_text]
    if configs:
        sections.append(Section("Run configs", [Code(r.config_text, f"{r.name}: {_config_name(r)}", "toml")
                                                for r in configs]))
    return Card(title, sections)


def _config_name(r: RunInfo) -> str:
    return CONFIG_FILE if (r.path / CONFIG_FILE).is_file() else "sweep.toml"


def _md_table(t: Table) -> list[str]:
    def cell(s):
        return str(s).replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(cell(h) for h in t.headers) + " |", "|" + "---|" * len(t.headers),
            *("| " + " | ".join(cell(c) for c in row) + " |" for row in t.rows), ""]


def render_markdown(card: Card, out_dir: Path, runs: list[RunInfo]) -> str:
    listed = ", ".join(f"`{r.path}` ({STAGE_TITLES.get(r.stage, r.stage)})" for r in runs)
    lines = [f"# {card.title}", "", f"Runs: {listed}", ""]
    for sec in card.sections:
        lines += [f"## {sec.title}", ""]
        for b in sec.blocks:
            if isinstance(b, Table):
                lines += _md_table(b)
            elif isinstance(b, Figure):
                rel = Path(os.path.relpath(b.path.resolve(), out_dir.resolve())).as_posix()
                lines += [f"![{b.caption}]({rel})", "", f"*{b.caption}*", ""]
            elif isinstance(b, Code):
                fence = "````" if "```" in b.text else "```"
                lines += [f"**{b.label}**", "", fence + b.lang, b.text.rstrip(), fence, ""]
            elif isinstance(b, Notes):
                # a study's own headings sit below this card's sections
                body = "\n".join("##" + ln if ln.startswith("#") else ln for ln in b.text.splitlines())
                lines += [f"**{b.label}**", "", body, ""]
            else:
                lines += [b, ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report_card(run_dirs, out: str | Path | None = None, title: str | None = None) -> tuple[Path, Path]:
    """report_card.md and report_card.html (self-contained) over the given runs; returns both paths.

    Without ``out`` the card goes into the folder that holds every run (the run folder itself for one run).
    """
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise ScalelabError("report needs at least one run folder")
    runs = collect_runs(dirs)
    out_dir = Path(out) if out else Path(os.path.commonpath([d.resolve() for d in dirs]))
    out_dir.mkdir(parents=True, exist_ok=True)
    card = build_card(runs, out_dir, title or f"Report card: {', '.join(r.name for r in runs[:4])}"
                      + (f" and {len(runs) - 4} more" if len(runs) > 4 else ""))
    md_path, html_path = out_dir / f"{CARD_NAME}.md", out_dir / f"{CARD_NAME}.html"
    md_path.write_text(render_markdown(card, out_dir, runs), encoding="utf-8")
    html_path.write_text(render_html(card, runs), encoding="utf-8")
    return md_path, html_path
