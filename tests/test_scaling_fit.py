"""Scaling-law fits recover known constants from synthetic sweeps and reject tables they cannot fit."""

import json
import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from conftest import dev_import
from scalelab.errors import ScalelabError
from scalelab.scaling import (
    CHINCHILLA_PARAMS,
    ChinchillaFit,
    compute_frontier,
    fit_chinchilla,
    fit_isoflop,
    fit_power_law_frontier,
    summarize,
)
from scalelab.scaling.plots import plot_chinchilla_fit, plot_isoflop, plot_loss_vs_compute

# Hoffmann et al. (2022)'s published fit, used as ground truth.
TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
TRUE_A = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])


def law(N, D):
    return TRUE["E"] + TRUE["A"] / N ** TRUE["alpha"] + TRUE["B"] / D ** TRUE["beta"]


def grid_runs(seed=1, sigma=0.003, n_sizes=6, n_tokens=6):
    """A full N x D grid with multiplicative noise, as a list of dicts."""
    rng = np.random.default_rng(seed)
    rows = []
    for N in np.logspace(5, 8, n_sizes):
        for D in np.logspace(6, 10, n_tokens):
            loss = law(N, D) * math.exp(rng.normal(0, sigma))
            rows.append({"N": N, "D": D, "C": 6 * N * D, "loss": loss, "name": f"n{N:.0e}-d{D:.0e}"})
    return rows


def isoflop_runs(budgets=np.logspace(15, 19, 9), seed=0, sigma=0.003):
    """Per budget, 9 model sizes spread x/÷10 around the 20-tokens-per-parameter guess (not the true optimum)."""
    rng = np.random.default_rng(seed)
    rows = []
    for C in budgets:
        for N in math.sqrt(C / 120) * np.logspace(-1, 1, 9):
            D = C / (6 * N)
            rows.append({"N": N, "D": D, "C": C, "budget": C, "loss": law(N, D) * math.exp(rng.normal(0, sigma))})
    return rows


@pytest.fixture(scope="module")
def chin():
    return fit_chinchilla(grid_runs(), n_bootstrap=40, seed=0)


# ---------------------------------------------------------------- Chinchilla


def test_chinchilla_recovers_known_constants(chin):
    # Tolerances: about twice the worst error over noise seeds 1-4 (seed 1 here: E +0.8%, A +1.8%,
    # B -0.6%, alpha +0.0014, beta -0.0001; seeds 2-4 at most E 1.4%, A 1.0%, B 2.2%, beta 0.0018).
    assert chin.n_points == 36
    assert chin.E == pytest.approx(TRUE["E"], rel=0.025)
    assert chin.alpha == pytest.approx(TRUE["alpha"], abs=0.004)
    assert chin.beta == pytest.approx(TRUE["beta"], abs=0.004)
    assert chin.A == pytest.approx(TRUE["A"], rel=0.04)
    assert chin.B == pytest.approx(TRUE["B"], rel=0.045)
    assert chin.rms < 0.0035  # noise is 0.3% in log-loss (seeds 1-4: rms 0.0026-0.0032)


def test_chinchilla_bootstrap_intervals_cover_truth(chin):
    assert chin.samples.shape == (40, 5)
    for name in CHINCHILLA_PARAMS:
        lo, hi = chin.ci[name]
        assert lo < getattr(chin, name) < hi, name
        assert lo <= TRUE[name] <= hi, (name, lo, hi)


def test_chinchilla_predictions(chin):
    N, D = np.array([1e6, 1e7]), np.array([1e8, 1e9])
    pred = chin.predict(N, D)
    assert pred == pytest.approx(law(N, D), rel=0.002)  # seeds 1-4: at most 0.08% off
    assert isinstance(chin.predict(1e6, 1e8), float)
    lo, hi = chin.predict_interval(N, D)
    assert np.all(lo <= pred) and np.all(pred <= hi) and np.all(lo < hi)
    # Extrapolating past the data widens the interval.
    far_lo, far_hi = chin.predict_interval(1e11, 1e13)
    near_lo, near_hi = chin.predict_interval(1e7, 1e8)
    assert far_hi / far_lo > near_hi / near_lo


def test_compute_optimal_matches_closed_form_and_minimises_loss():
    fit = ChinchillaFit(**TRUE, ci={}, n_points=0, rms=0.0)
    a, b = TRUE["alpha"], TRUE["beta"]
    G = (a * TRUE["A"] / (b * TRUE["B"])) ** (1 / (a + b))
    for C in (1e18, 1e21, 5.76e23):
        opt = fit.compute_optimal(C)
        assert opt["N"] == pytest.approx(G * (C / 6) ** (b / (a + b)), rel=1e-9)
        assert opt["D"] == pytest.approx(C / (6 * opt["N"]), rel=1e-12)
        # Independently: the optimum minimises L(N, C/6N) along the IsoFLOP line.
        res = minimize_scalar(lambda x: fit.predict(math.exp(x), C / (6 * math.exp(x))), bounds=(5, 35), method="bounded",
                              options={"xatol": 1e-9})
        assert math.exp(res.x) == pytest.approx(opt["N"], rel=1e-3)
        assert math.isnan(opt["N_lo"])  # no bootstrap samples on a hand-built fit
    arr = fit.compute_optimal(np.array([1e18, 1e20]))
    assert arr["N"].shape == (2,) and arr["N"][1] > arr["N"][0]


def test_fitted_compute_optimal_has_bootstrap_interval(chin):
    opt = chin.compute_optimal(1e20)
    assert opt["N_lo"] < opt["N"] < opt["N_hi"]
    assert opt["D_lo"] < opt["D"] < opt["D_hi"]
    assert opt["N"] * opt["D"] * 6 == pytest.approx(1e20)


def test_to_dict_is_json(chin):
    d = json.loads(json.dumps(chin.to_dict()))
    assert d["n_bootstrap"] == 40 and set(d["ci"]) == set(CHINCHILLA_PARAMS)
    assert d["alpha"] == pytest.approx(chin.alpha)


def test_dataframe_and_list_inputs_agree():
    pd = dev_import("pandas")
    rows = grid_runs(seed=2, n_sizes=4, n_tokens=4)
    a = fit_chinchilla(rows, n_bootstrap=0, n_starts=8)
    b = fit_chinchilla(pd.DataFrame(rows), n_bootstrap=0, n_starts=8)
    assert a.alpha == pytest.approx(b.alpha) and a.E == pytest.approx(b.E)
    assert math.isnan(a.ci["E"][0])
    with pytest.raises(ScalelabError, match="no bootstrap samples"):
        a.predict_interval(1e6, 1e8)


# ---------------------------------------------------------------- IsoFLOP


def test_isoflop_recovers_allocation_exponent():
    fit = fit_isoflop(isoflop_runs())
    assert fit.n_used == 9
    assert fit.a == pytest.approx(TRUE_A, abs=0.004)  # measured: 0.0009 off, standard error 0.0011
    assert fit.b == pytest.approx(1 - fit.a, abs=1e-9)  # D_opt = C / 6 N_opt
    assert fit.a_stderr < 0.003
    assert all(r["vertex_inside"] for r in fit.table)
    row = fit.table[0]
    assert row["D_opt"] == pytest.approx(row["budget"] / (6 * row["N_opt"]))


def test_isoflop_flags_vertex_outside_range_and_skips_thin_budgets():
    rows = isoflop_runs(budgets=[1e16, 1e17, 1e18])
    # All sizes far below the optimum: the parabola's vertex lies past the largest N.
    rows += [{"N": N, "loss": law(N, 1e20 / (6 * N)), "budget": 1e20} for N in np.logspace(5, 6, 4)]
    rows += [{"N": N, "loss": law(N, 1e21 / (6 * N)), "budget": 1e21} for N in (1e6, 1e7)]
    rows += [{"N": 1e6, "loss": 5.0, "budget": None}]  # unlabelled run: ignored
    fit = fit_isoflop(rows)
    by_budget = {r["budget"]: r for r in fit.table}
    assert by_budget[1e20]["vertex_inside"] is False and not by_budget[1e20]["used"]
    assert "outside" in by_budget[1e20]["note"]
    assert not by_budget[1e21]["used"] and "distinct N" in by_budget[1e21]["note"]
    assert fit.n_used == 3


def test_isoflop_needs_two_usable_budgets():
    rows = isoflop_runs(budgets=[1e17])
    with pytest.raises(ScalelabError, match="at least 2 usable IsoFLOP budgets, got 1"):
        fit_isoflop(rows)
    with pytest.raises(ScalelabError, match="budget"):
        fit_isoflop(grid_runs())  # no budget column at all


# ---------------------------------------------------------------- compute frontier


def test_frontier_fit_extrapolates_to_held_out_compute():
    rows = isoflop_runs()
    train = [r for r in rows if r["C"] < 2e18]
    held = [r for r in rows if r["C"] > 2e18]
    fit = fit_power_law_frontier(train)
    assert fit.form == "saturating" and fit.alpha > 0
    # The Chinchilla envelope decays as C^-(alpha beta / (alpha + beta)).
    # measured: alpha 0.0006 off; the two held-out budgets 0.55% and 0.09% off
    assert fit.alpha == pytest.approx(TRUE["alpha"] * TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"]), abs=0.003)
    for C in sorted({r["C"] for r in held}):
        best = min(r["loss"] for r in held if r["C"] == C)
        assert fit.predict(C) == pytest.approx(best, rel=0.01)
    assert [r["C"] for r in fit.frontier] == sorted({r["C"] for r in train})


def test_frontier_keeps_only_runs_that_beat_all_cheaper_runs():
    rows = [{"C": 1e15, "loss": 4.0}, {"C": 1e15, "loss": 3.9}, {"C": 2e15, "loss": 4.1},
            {"C": 4e15, "loss": 3.5}, {"C": 8e15, "loss": 3.2}]
    assert compute_frontier(rows) == [1, 3, 4]
    fit = fit_power_law_frontier(rows)
    assert fit.form == "power" and fit.alpha > 0 and "frontier runs" in fit.note
    assert fit.predict(4e15) == pytest.approx(3.5, rel=0.03)


# ---------------------------------------------------------------- validation


def test_too_few_runs():
    with pytest.raises(ScalelabError, match="need at least 5 runs, got 3"):
        fit_chinchilla(grid_runs()[:3])


def test_degenerate_grids():
    rows = grid_runs()
    same_n = [r for r in rows if r["N"] == rows[0]["N"]]
    with pytest.raises(ScalelabError, match="same N .*alpha is unidentifiable"):
        fit_chinchilla(same_n)
    same_d = [r for r in rows if r["D"] == rows[0]["D"]]
    with pytest.raises(ScalelabError, match="same D .*beta is unidentifiable"):
        fit_chinchilla(same_d)
    fixed_ratio = [{"N": N, "D": 20 * N, "loss": law(N, 20 * N)} for N in np.logspace(5, 8, 8)]
    with pytest.raises(ScalelabError, match="cannot be separated"):
        fit_chinchilla(fixed_ratio)


def test_missing_columns_and_bad_values():
    rows = [{"N": r["N"], "C": r["C"]} for r in grid_runs()]
    with pytest.raises(ScalelabError, match="missing column.*D, loss"):
        fit_chinchilla(rows)
    bad = grid_runs()
    bad[4]["loss"] = -1.0
    bad[7]["loss"] = float("nan")
    with pytest.raises(ScalelabError, match="'loss' must be positive and finite.*4, 7"):
        fit_chinchilla(bad)
    with pytest.raises(ScalelabError, match="not numeric"):
        fit_power_law_frontier([{"C": "lots", "loss": 3.0}] * 3)
    with pytest.raises(ScalelabError, match="list of dicts"):
        fit_chinchilla([1, 2, 3])


# ---------------------------------------------------------------- report and plots


def test_summarize_markdown(chin):
    iso = fit_isoflop(isoflop_runs())
    text = summarize(chin, fit_power_law_frontier(isoflop_runs()), iso)
    assert "| α |" in text and "| E |" in text and "| a |" in text and "| 1e+15 |" in text
    assert f"{chin.alpha:.4g}" in text
    with pytest.raises(ScalelabError):
        summarize("not a fit")


def test_plots_write_pngs(tmp_path, chin):
    grid, iso_rows = grid_runs(), isoflop_runs(budgets=np.logspace(15, 18, 4))
    outs = [
        plot_loss_vs_compute(grid + iso_rows, fit_power_law_frontier(grid + iso_rows), tmp_path / "lc.png"),
        plot_isoflop(iso_rows, fit_isoflop(iso_rows), tmp_path / "sub" / "iso.png"),
        plot_chinchilla_fit(grid, chin, tmp_path / "chin.png"),
    ]
    for out in outs:
        data = out.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
