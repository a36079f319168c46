"""Scaling-law figures (PNG, headless). Runs are drawn first and fits on top, so curves stay visible."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.ticker import LogFormatterSciNotation, LogLocator, NullFormatter

from scalelab.evals.plots import plt  # the one headless (Agg) matplotlib set-up

from scalelab.scaling.fit import ChinchillaFit, IsoFLOPFit, PowerLawFit, _numeric, as_columns  # noqa: E402

_RUNS, _FIT, _MARK = 2, 3, 4  # z-orders: data under fitted curves under highlighted optima


def _save(fig, out) -> Path:
    # A log x axis spanning a decade or so labels every minor tick by default, and the wide "3×10^5"
    # labels collide: label 1, 2 and 5 times each power of ten instead.
    for ax in fig.axes:
        if ax.get_xscale() == "log":
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False))
            ax.xaxis.set_minor_formatter(NullFormatter())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _span(x: np.ndarray, pad: float = 1.0, n: int = 200) -> np.ndarray:
    """Log-spaced points over [min/pad, max*pad]."""
    return np.logspace(np.log10(x.min() / pad), np.log10(x.max() * pad), n)


def _norm(n: np.ndarray) -> LogNorm:
    # A single model size would give LogNorm an empty range; widen it a hair.
    return LogNorm(vmin=n.min(), vmax=max(n.max(), n.min() * 1.001))


def _fmt(v: float) -> str:
    return f"{v:.2g}"


def plot_loss_vs_compute(df, power_fit: PowerLawFit, out) -> Path:
    """Every run's final loss against its compute, coloured by N; the frontier and L(C) fit on top."""
    cols = as_columns(df)
    x = _numeric(cols, ("N", "C", "loss"))
    fig, ax = plt.subplots(figsize=(7, 5))
    sc = ax.scatter(x["C"], x["loss"], c=x["N"], norm=_norm(x["N"]), cmap="viridis", s=22, alpha=0.8, zorder=_RUNS, label="runs")
    fig.colorbar(sc, ax=ax, label="parameters N")
    fr = power_fit.frontier
    if fr:
        ax.scatter([r["C"] for r in fr], [r["loss"] for r in fr], s=70, facecolors="none", edgecolors="crimson",
                   linewidths=1.5, zorder=_MARK, label="compute frontier")
    cs = _span(x["C"], pad=2.0)
    desc = (f"fit: {power_fit.E:.3g} + ({_fmt(power_fit.C_c)}/C)^{power_fit.alpha:.3f}" if power_fit.form == "saturating"
            else f"fit: ({_fmt(power_fit.C_c)}/C)^{power_fit.alpha:.3f}")
    ax.plot(cs, power_fit.predict(cs), color="crimson", lw=1.8, zorder=_FIT, label=desc)
    if power_fit.E > 0:
        ax.axhline(power_fit.E, color="gray", ls=":", lw=1, zorder=_RUNS, label=f"irreducible E = {power_fit.E:.3g}")
    ax.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", ylabel="final validation loss (nats/token)",
           title="loss vs compute")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, out)


def plot_isoflop(df, iso_fit: IsoFLOPFit, out) -> Path:
    """Left: loss vs N for each budget with its parabola and optimum. Right: N_opt and D_opt vs C."""
    cols = as_columns(df)
    x = _numeric(cols, ("budget", "N", "loss"), allow_nan=("budget",))
    fig, (ax, ax_opt) = plt.subplots(1, 2, figsize=(12, 5))
    budgets = [r["budget"] for r in iso_fit.table]
    cmap = plt.get_cmap("plasma")
    colour = {c: cmap(0.85 * i / max(len(budgets) - 1, 1)) for i, c in enumerate(budgets)}
    for row in iso_fit.table:
        c = row["budget"]
        sel = x["budget"] == c
        ax.scatter(x["N"][sel], x["loss"][sel], color=colour[c], s=20, zorder=_RUNS, label=f"C = {c:.2g}")
        if row["coef"] is not None:
            ns = np.logspace(np.log10(row["N_min"]), np.log10(row["N_max"]), 100)
            ax.plot(ns, np.polyval(row["coef"], np.log(ns)), color=colour[c], lw=1.2, zorder=_FIT)
        if np.isfinite(row["N_opt"]):
            ax.scatter([row["N_opt"]], [row["loss_opt"]], marker="*", s=160, zorder=_MARK, edgecolors="black",
                       color=colour[c] if row["used"] else "white")
    ax.scatter([], [], marker="*", s=160, color="white", edgecolors="black", label="optimum (hollow: not used)")
    ax.set(xscale="log", xlabel="parameters N", ylabel="final validation loss (nats/token)", title="IsoFLOP profiles")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.13))

    used = [r for r in iso_fit.table if r["used"]]
    uc = np.array([r["budget"] for r in used])
    ax_opt.scatter(uc, [r["N_opt"] for r in used], color="tab:blue", zorder=_RUNS, label="N_opt (parameters)")
    ax_opt.scatter(uc, [r["D_opt"] for r in used], color="tab:orange", marker="s", zorder=_RUNS, label="D_opt (tokens)")
    cs = _span(uc, pad=3.0)
    ax_opt.plot(cs, iso_fit.predict_N_opt(cs), color="tab:blue", zorder=_FIT, label=f"N_opt ∝ C^{iso_fit.a:.3f}")
    ax_opt.plot(cs, iso_fit.predict_D_opt(cs), color="tab:orange", zorder=_FIT, label=f"D_opt ∝ C^{iso_fit.b:.3f}")
    ax_opt.set(xscale="log", yscale="log", xlabel="compute budget C (FLOPs)", ylabel="compute-optimal N or D",
               title="compute-optimal allocation")
    ax_opt.grid(alpha=0.3, which="both")
    ax_opt.legend(fontsize=8)
    return _save(fig, out)


def plot_chinchilla_fit(df, fit: ChinchillaFit, out, max_curves: int = 40) -> Path:
    """Left: loss vs D, one colour per N, with the fitted L(N, D) curves. Right: predicted vs observed loss."""
    cols = as_columns(df)
    x = _numeric(cols, ("N", "D", "loss"))
    fig, (ax, ax_par) = plt.subplots(1, 2, figsize=(12, 5))
    norm = _norm(x["N"])
    cmap = plt.get_cmap("viridis")
    sc = ax.scatter(x["D"], x["loss"], c=x["N"], norm=norm, cmap=cmap, s=22, zorder=_RUNS)
    fig.colorbar(sc, ax=ax, label="parameters N")
    sizes = np.unique(x["N"])
    if len(sizes) > max_curves:
        sizes = np.unique(np.quantile(sizes, np.linspace(0, 1, max_curves), method="nearest"))
    for n in sizes:
        # Each curve spans only the D its own runs cover: on IsoFLOP grids every run has its own N,
        # and a full-width curve per N would pass nowhere near the other runs.
        d = x["D"][x["N"] == n]
        ds = _span(d, pad=2.0, n=100)
        ax.plot(ds, fit.predict(n, ds), color=cmap(norm(n)), lw=1.2, zorder=_FIT)
    ax.plot([], [], color="gray", label=f"fit: {fit.E:.3g} + {fit.A:.3g}/N^{fit.alpha:.3f} + {fit.B:.3g}/D^{fit.beta:.3f}")
    ax.axhline(fit.E, color="gray", ls=":", lw=1, zorder=_RUNS, label=f"irreducible E = {fit.E:.3g}")
    ax.set(xscale="log", yscale="log", xlabel="training tokens D", ylabel="final validation loss (nats/token)",
           title="loss vs data, one curve per model size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)

    pred = fit.predict(x["N"], x["D"])
    ax_par.scatter(x["loss"], pred, c=x["N"], norm=norm, cmap=cmap, s=22, zorder=_RUNS, label="runs")
    lim = np.array([min(x["loss"].min(), pred.min()) / 1.02, max(x["loss"].max(), pred.max()) * 1.02])
    ax_par.plot(lim, lim, color="black", lw=1, zorder=_FIT, label="predicted = observed")
    ax_par.set(xscale="log", yscale="log", xlim=lim, ylim=lim, xlabel="observed loss (nats/token)",
               ylabel="predicted loss (nats/token)", title=f"parity (RMS log residual {fit.rms:.2e})")
    ax_par.grid(alpha=0.3, which="both")
    ax_par.legend(fontsize=8)
    return _save(fig, out)


def plot_forecasts(df, forecasts: list[dict], out) -> Path:
    """Left: the fitted runs and each target against compute. Right: forecast against outcome, with a ±2% band."""
    x = _numeric(as_columns(df), ("C", "loss"))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10.5, 4.4))
    ax.scatter(x["C"], x["loss"], s=22, color="0.45", zorder=_RUNS, label="sweep runs (fitted)")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ends = []
    for i, f in enumerate(sorted(forecasts, key=lambda f: f.get("written_at", ""))):
        color, pred, actual = colors[i % len(colors)], f["predicted_loss"], f["actual_loss"]
        lo, hi = f["interval_95"]
        t = f["target"]
        name = f"{t.get('name', 'target')} ({'backtest' if f.get('backtest') else 'forecast written before the run'})"
        ax.scatter([t["C"]], [actual], marker="*", s=140, color=color, edgecolor="k", zorder=_MARK, label=name)
        bx.errorbar([actual], [pred], yerr=[[pred - lo], [hi - pred]], fmt="o", color=color, capsize=4, zorder=_FIT,
                    label=f"depth {t['depth']}: {pred:.3f} [{lo:.3f}, {hi:.3f}] vs {actual:.3f}, "
                          f"{100 * f['relative_error']:.1f}% off")
        ends += [lo, hi, actual]
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("Fitted runs and forecast targets")
    ax.legend(fontsize=7)
    ax.grid(True, which="major", alpha=0.3)
    if ends:
        a, b = min(ends) * 0.99, max(ends) * 1.01
        line = np.linspace(a, b, 50)
        bx.plot(line, line, color="k", lw=1, label="forecast = outcome")
        bx.fill_between(line, line * 0.98, line * 1.02, color="0.85", label="within 2%")
        bx.set_xlim(a, b)
        bx.set_ylim(a, b)
    bx.set_xlabel("actual final validation loss")
    bx.set_ylabel("forecast (95% interval)")
    bx.set_title("Forecast against outcome")
    bx.legend(fontsize=7, loc="upper left")
    bx.grid(True, alpha=0.3)
    return _save(fig, out)
