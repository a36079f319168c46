"""Kaplan's interacting L(N, D): what the fit recovers, and its place in `scaling predict`.

What it recovers, on a grid this far below N_c and D_c (the README says the same): from exact losses,
all five constants; from losses with 0.2% noise, the two exponents and the forecast, while E, N_c and
D_c trade off against one another (2-4x off) and their bootstrap intervals say so by being wide.
"""

import json
import math

import numpy as np
import pytest

from scalelab.errors import ScalelabError
from scalelab.scaling import summarize
from scalelab.scaling.kaplan import fit_kaplan

# Kaplan et al. (2020), eq. 1.5 (N without embeddings, D in tokens), plus a small irreducible term.
TRUE = {"E": 0.05, "N_c": 6.4e13, "D_c": 1.8e13, "alpha_N": 0.076, "alpha_D": 0.103}


def law(N, D):
    t = TRUE
    return t["E"] + ((t["N_c"] / N) ** (t["alpha_N"] / t["alpha_D"]) + t["D_c"] / D) ** t["alpha_D"]


def runs(seed=0, sigma=0.002):
    rng = np.random.default_rng(seed)
    return [{"N": N, "D": D, "C": 6 * N * D, "loss": law(N, D) * math.exp(rng.normal(0, sigma))}
            for N in np.logspace(5, 8, 6) for D in np.logspace(7, 10, 6)]


@pytest.fixture(scope="module")
def kap():
    return fit_kaplan(runs(), n_bootstrap=20, seed=0)


def test_kaplan_recovers_every_constant_from_exact_losses():
    """The parametrisation is identifiable in principle: without noise the fit lands on all five (measured: <0.2% off)."""
    exact = fit_kaplan(runs(sigma=0.0), n_bootstrap=0)
    for name, value in TRUE.items():
        assert getattr(exact, name) == pytest.approx(value, rel=0.01), name


def test_kaplan_with_noise_recovers_the_exponents_and_extrapolates(kap):
    # measured on this data: alpha_N +4.0%, alpha_D +4.3%, their ratio +0.2%, the 10x forecast +0.4%
    assert kap.alpha_D == pytest.approx(TRUE["alpha_D"], rel=0.07)
    assert kap.alpha_N == pytest.approx(TRUE["alpha_N"], rel=0.07)
    assert kap.alpha_N / kap.alpha_D == pytest.approx(TRUE["alpha_N"] / TRUE["alpha_D"], rel=0.015)
    assert kap.rms < 0.003  # the noise is 0.2% in log-loss
    # 10x beyond the largest fitted N and D
    N, D = 1e9, 1e11
    assert kap.predict(N, D) == pytest.approx(law(N, D), rel=0.006)
    lo, hi = kap.predict_interval(N, D)
    assert lo <= kap.predict(N, D) <= hi


def test_kaplan_intervals_show_what_the_noisy_data_leave_open(kap):
    """E, N_c and D_c are not pinned down by this grid: their bootstrap intervals are many times wider
    (in log) than the exponents' (measured: 17-29x), which is how a reader of the fit sees it."""
    log_width = {k: math.log(hi / lo) for k, (lo, hi) in kap.ci.items()}
    exponents = max(log_width["alpha_N"], log_width["alpha_D"])
    for name in ("E", "N_c", "D_c"):
        assert log_width[name] > 8 * exponents, (name, log_width)


def test_kaplan_reports_like_the_other_fits(kap):
    json.dumps(kap.to_dict())
    text = summarize(kap)
    assert "Kaplan fit" in text and "α_D" in text


def test_kaplan_needs_a_real_grid():
    rows = [r for r in runs() if r["N"] == runs()[0]["N"]]
    with pytest.raises(ScalelabError, match="same N"):
        fit_kaplan(rows, n_bootstrap=0)
