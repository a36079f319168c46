"""Scaling sweeps: many pretraining runs from one recipe, a results table, fits, and a forecast.

    scalelab scaling sweep   --config configs/scaling_cpu.toml   # run the grid (resumable)
    scalelab scaling fit     --config configs/scaling_cpu.toml   # fit laws, write tables and plots
    scalelab scaling predict --config configs/scaling_cpu.toml   # forecast a bigger run, then run it

Every run of a sweep shares one tokenizer and one set of token shards (prepared once), the
recipe's seed and batch, and a learning-rate schedule stretched to its own length, as in
Chinchilla. A run is finished when its row is in ``results.csv``; a run folder without a row
is a crashed run and is redone from scratch.
"""

from __future__ import annotations

import copy
import csv
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from scalelab.config import Config, to_toml
from scalelab.data import subtask_tags
from scalelab.errors import ScalelabError
from scalelab.model.gpt import GPT
from scalelab.pipeline import PreparedData, prepare
from scalelab.run import Run
from scalelab.runtime import resolve_device
from scalelab.scaling import fit_chinchilla, fit_isoflop, fit_power_law_frontier, summarize
from scalelab.scaling.kaplan import fit_kaplan
from scalelab.scaling.plots import plot_chinchilla_fit, plot_forecasts, plot_isoflop, plot_loss_vs_compute
from scalelab.train.metrics import MetricsLogger
from scalelab.train.trainer import Trainer, evaluate_loss

RESULT_COLUMNS = [
    "name", "depth", "n_embd", "N", "N_total", "N_non_embedding", "D", "C", "C_6ND", "budget", "steps",
    "loss", "best_val_loss", "wall_seconds",
]


@dataclass
class RunSpec:
    name: str
    depth: int
    tokens: int
    budget: float | None = None


def _model_for(cfg: Config, depth: int, vocab_size: int) -> GPT:
    m = copy.deepcopy(cfg.model)
    m.depth, m.vocab_size = depth, vocab_size
    return GPT(m)


def _tokens_per_step(cfg: Config) -> int:
    return cfg.train.batch_size * cfg.model.block_size


def _rounded_tokens(cfg: Config, tokens: int) -> int:
    """The tokens a run of this budget really trains on: whole optimizer steps."""
    return max(1, round(tokens / _tokens_per_step(cfg))) * _tokens_per_step(cfg)


def plan_runs(cfg: Config, vocab_size: int) -> list[RunSpec]:
    s = cfg.scaling
    if not s.depths:
        raise ScalelabError("degenerate sweep: scaling.depths is empty")
    if s.design == "grid":
        if len(set(s.depths)) < 2 or len(set(s.tokens)) < 2:
            raise ScalelabError(
                "degenerate sweep: a grid needs at least 2 distinct depths and 2 distinct token budgets "
                f"to separate the N and D terms (got depths {s.depths}, tokens {s.tokens})"
            )
        specs = [RunSpec(f"d{d}_t{t}", d, int(t)) for d in s.depths for t in s.tokens]
        if s.max_run_flops > 0:
            # A "triangle" grid: small models still get the long token budgets, which show the fit how
            # loss behaves when N, not D, is the bottleneck, while big models skip the costly corner.
            fpt = {d: _model_for(cfg, d, vocab_size).flops_per_token() for d in set(s.depths)}
            specs = [r for r in specs if fpt[r.depth] * _rounded_tokens(cfg, r.tokens) <= s.max_run_flops]
            if len({r.depth for r in specs}) < 2 or len({r.tokens for r in specs}) < 2:
                raise ScalelabError(
                    f"degenerate sweep: scaling.max_run_flops = {s.max_run_flops:g} leaves fewer than 2 depths or "
                    "2 token budgets"
                )
        return specs
    if len(set(s.budgets)) < 2:
        raise ScalelabError(f"degenerate sweep: an IsoFLOP design needs at least 2 budgets (got {s.budgets})")
    specs = []
    for c in s.budgets:
        for d in s.depths:
            fpt = _model_for(cfg, d, vocab_size).flops_per_token()
            tokens = int(c / fpt)
            if tokens < _tokens_per_step(cfg):
                continue  # this budget cannot pay for one step of this model: not a point on the curve
            specs.append(RunSpec(f"c{c:.3g}_d{d}", d, tokens, float(c)))
    if not specs:
        raise ScalelabError("degenerate sweep: no budget pays for even one training step of any depth")
    return specs


def read_results(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    with open(p, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        row = {}
        for k, v in r.items():
            if k == "name":
                row[k] = v
            elif v in ("", None):
                row[k] = None
            else:
                row[k] = float(v) if any(ch in v for ch in ".eE") or k in ("budget",) else int(v)
        out.append(row)
    return out


def _write_results(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in RESULT_COLUMNS})
    tmp.replace(path)


def _prepare_shared(cfg: Config) -> PreparedData:
    return prepare(cfg, Path(cfg.scaling.out_dir) / "shared")


FINISHED_ROW = "row.json"  # a finished run's results row, next to its metrics


def train_one(cfg: Config, spec: RunSpec, data: PreparedData, run_dir: Path) -> dict:
    """Train one sweep run from scratch and measure its final loss on the whole validation split."""
    run_cfg = copy.deepcopy(cfg)
    run_cfg.model.depth = spec.depth
    run_cfg.model.vocab_size = data.tokenizer.vocab_size
    steps = max(1, round(spec.tokens / _tokens_per_step(cfg)))
    t = run_cfg.train
    t.steps = steps
    t.optim.warmup_steps = min(t.optim.warmup_steps, max(1, steps // 5))
    t.eval_every = max(1, steps // 4)
    t.ckpt_every = 0
    run_cfg.run.out_dir, run_cfg.run.progress = str(run_dir), False
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a folder without a results row is a crashed run: redo it whole
    run_dir.mkdir(parents=True)
    Run(run_dir, run_cfg).write_config()
    bpt = data.shards.bytes_per_token("val")
    tags = subtask_tags.load_tags(data.shards.dir, len(data.val_tokens))
    trainer = Trainer(run_cfg, run_dir, data.train_tokens, data.val_tokens, bpt, val_subtasks=tags)
    logger = MetricsLogger(run_dir / "metrics.jsonl")
    t0 = time.perf_counter()
    result = trainer.fit(logger=logger)
    wall = time.perf_counter() - t0
    device = resolve_device(run_cfg.run.device)
    loss, _ = evaluate_loss(trainer.model, data.val_tokens, max(1, t.batch_size), trainer.block_size, None, device, t.dtype)
    m = trainer.model
    n_total, n_non_emb = m.num_params(), m.num_params(include_embeddings=False)
    n = n_total if cfg.scaling.count_embeddings else n_non_emb
    d_tokens = steps * _tokens_per_step(cfg)
    row = {
        "name": spec.name, "depth": spec.depth, "n_embd": m.config.n_embd, "N": n, "N_total": n_total,
        "N_non_embedding": n_non_emb, "D": d_tokens, "C": float(m.flops_per_token() * d_tokens),
        "C_6ND": float(6 * n * d_tokens), "budget": spec.budget, "steps": steps, "loss": loss,
        "best_val_loss": min(loss, result.best_val_loss), "wall_seconds": wall,
    }
    (run_dir / FINISHED_ROW).write_text(json.dumps(row, indent=2, default=float))
    return row


def run_sweep(cfg: Config, progress: bool = True) -> list[dict]:
    out = Path(cfg.scaling.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = _prepare_shared(cfg)
    specs = plan_runs(cfg, data.tokenizer.vocab_size)
    (out / "sweep.toml").write_text(to_toml(cfg))
    results_path = out / "results.csv"
    rows = read_results(results_path)
    done = {r["name"] for r in rows}
    todo = [s for s in specs if s.name not in done]
    bar = None
    if progress and todo:
        bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc="sweep", unit="run")
    for spec in todo:
        row = train_one(cfg, spec, data, out / "runs" / spec.name)
        rows.append(row)
        _write_results(results_path, rows)  # after every run: a crash loses at most the run in flight
        if bar:
            bar.set_postfix(run=spec.name, loss=f"{row['loss']:.3f}")
            bar.update(1)
    if bar:
        bar.close()
    return rows


# -- fitting and forecasting ---------------------------------------------------------------------------


def fit_sweep(cfg: Config, rows: list[dict] | None = None) -> dict:
    out = Path(cfg.scaling.out_dir)
    rows = rows if rows is not None else read_results(out / "results.csv")
    if not rows:
        raise ScalelabError(f"no finished runs in {out / 'results.csv'}; run `scalelab scaling sweep` first")
    chin = fit_chinchilla(rows, n_bootstrap=cfg.scaling.n_bootstrap, seed=cfg.run.seed)
    fits = [chin]
    report = {"chinchilla": chin.to_dict(), "n_runs": len(rows)}
    plot_chinchilla_fit(rows, chin, out / "fit_chinchilla.png")
    if "kaplan" in cfg.scaling.forecast_forms:
        kap = _fit_form("kaplan", rows, cfg)
        fits.append(kap)
        report["kaplan"] = kap.to_dict()
    try:
        power = fit_power_law_frontier(rows)
        fits.append(power)
        report["power_law_frontier"] = power.to_dict() if hasattr(power, "to_dict") else str(power)
        plot_loss_vs_compute(rows, power, out / "loss_vs_compute.png")
    except ScalelabError as e:
        report["power_law_frontier_error"] = str(e)
    if any(r.get("budget") for r in rows):
        iso = fit_isoflop([r for r in rows if r.get("budget")])
        fits.append(iso)
        report["isoflop"] = iso.to_dict() if hasattr(iso, "to_dict") else str(iso)
        plot_isoflop([r for r in rows if r.get("budget")], iso, out / "isoflop.png")
    (out / "fit.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "fit.md").write_text(summarize(*fits) + "\n")
    return report


def _fit_form(form: str, rows: list[dict], cfg: Config):
    fitter = {"chinchilla": fit_chinchilla, "kaplan": fit_kaplan}[form]
    return fitter(rows, n_bootstrap=cfg.scaling.n_bootstrap, seed=cfg.run.seed)


def forecast(cfg: Config, fit_rows: list[dict], n: float, d_tokens: float) -> dict:
    """Each form's point forecast and 95% bootstrap interval, and their combination.

    With several forms the forecast is their mean and the interval spans all of their intervals:
    the choice of functional form is itself uncertain, and a bootstrap within one form cannot see that.
    """
    per_form = {}
    for form in cfg.scaling.forecast_forms:  # checked against FORECAST_FORMS when the config loads
        fit = _fit_form(form, fit_rows, cfg)
        lo, hi = (float(v) for v in fit.predict_interval(n, d_tokens))
        per_form[form] = {"predicted_loss": float(fit.predict(n, d_tokens)), "interval_95": [lo, hi],
                          "fit": fit.to_dict()}
    predicted = sum(f["predicted_loss"] for f in per_form.values()) / len(per_form)
    lo = min(f["interval_95"][0] for f in per_form.values())
    hi = max(f["interval_95"][1] for f in per_form.values())
    return {"predicted_loss": predicted, "interval_95": [lo, hi], "forms": per_form}


def predict_then_verify(cfg: Config) -> dict:
    """Fit on runs up to scaling.fit_max_flops, forecast the target run, write the forecast, then run it."""
    s = cfg.scaling
    if s.predict_depth < 1 or s.predict_tokens < 1:
        raise ScalelabError("scaling.predict_depth and scaling.predict_tokens must name the run to forecast")
    out = Path(s.out_dir)
    rows = read_results(out / "results.csv")
    fit_rows = [r for r in rows if not s.fit_max_flops or r["C"] <= s.fit_max_flops]
    if not fit_rows:
        raise ScalelabError(f"no runs with C <= scaling.fit_max_flops = {s.fit_max_flops:g} in {out / 'results.csv'}")
    data = _prepare_shared(cfg)
    model = _model_for(cfg, s.predict_depth, data.tokenizer.vocab_size)
    steps = max(1, round(s.predict_tokens / _tokens_per_step(cfg)))
    d_tokens = steps * _tokens_per_step(cfg)
    n = model.num_params(include_embeddings=cfg.scaling.count_embeddings)
    c_target = float(model.flops_per_token() * d_tokens)
    c_max = max(r["C"] for r in fit_rows)
    spec = RunSpec(f"predict_d{s.predict_depth}_t{s.predict_tokens}", s.predict_depth, s.predict_tokens)
    result = {
        "target": {"name": spec.name, "depth": s.predict_depth, "N": n, "D": d_tokens, "C": c_target},
        "fit_runs": len(fit_rows), "fit_max_C": c_max, "compute_ratio": c_target / c_max,
        **forecast(cfg, fit_rows, n, d_tokens),
        "written_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    # The forecast is on disk before the big run starts: it cannot be adjusted after the fact. Each
    # target keeps its own file, so an earlier forecast is never overwritten by a later one.
    paths = [out / "predictions" / f"{spec.name}.json", out / "prediction.json"]
    paths[0].parent.mkdir(exist_ok=True)
    for p in paths:
        p.write_text(json.dumps(result, indent=2, default=float))
    finished = out / "runs" / spec.name / FINISHED_ROW
    if finished.is_file():
        # The target already ran: this forecast was written after its loss existed. Still useful to
        # compare forecasting methods on a known run, but it is a backtest, and it says so.
        row = json.loads(finished.read_text())
        result["backtest"] = True
    else:
        row = train_one(cfg, spec, data, out / "runs" / spec.name)
        result["backtest"] = False
    lo, hi = result["interval_95"]
    result["actual_loss"] = row["loss"]
    result["relative_error"] = abs(result["predicted_loss"] - row["loss"]) / row["loss"]
    result["actual_inside_interval"] = lo <= row["loss"] <= hi
    for f in result["forms"].values():
        f["relative_error"] = abs(f["predicted_loss"] - row["loss"]) / row["loss"]
    result["target_run"] = row
    for p in paths:
        p.write_text(json.dumps(result, indent=2, default=float))

    done = [json.loads(p.read_text()) for p in sorted(paths[0].parent.glob("*.json"))]
    plot_forecasts(fit_rows, [f for f in done if "actual_loss" in f], out / "forecasts.png")
    return result


def describe_forecast(f: dict) -> str:
    lo, hi = f["interval_95"]
    forms = "".join(
        f"\n  {name}: {g['predicted_loss']:.4f} ({g['interval_95'][0]:.4f}-{g['interval_95'][1]:.4f})"
        + (f", error {100 * g['relative_error']:.2f}%" if "relative_error" in g else "")
        for name, g in f.get("forms", {}).items()
    )
    return (
        f"fit on {f['fit_runs']} runs with C <= {f['fit_max_C']:.3g} FLOPs; target N={f['target']['N']:,} "
        f"D={f['target']['D']:,} C={f['target']['C']:.3g} ({f['compute_ratio']:.1f}x)\n"
        f"predicted loss {f['predicted_loss']:.4f} (95% interval {lo:.4f}-{hi:.4f}); "
        f"actual {f['actual_loss']:.4f}; relative error {100 * f['relative_error']:.2f}%; "
        f"inside interval: {f['actual_inside_interval']}"
        + ("\n(backtest: the target had run before this forecast was written)" if f.get("backtest") else "") + forms
    )
