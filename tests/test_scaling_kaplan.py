"""Kaplan's interacting L(N, D): recovery of known constants, and its place in `scaling predict`."""

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


def test_kaplan_recovers_exponents_and_extrapolates(kap):
    assert kap.alpha_D == pytest.approx(TRUE["alpha_D"], rel=0.15)
    assert kap.alpha_N == pytest.approx(TRUE["alpha_N"], rel=0.15)
    assert kap.rms < 0.004
    # 10x beyond the largest fitted N and D
    N, D = 1e9, 1e11
    assert kap.predict(N, D) == pytest.approx(law(N, D), rel=0.01)
    lo, hi = kap.predict_interval(N, D)
    assert lo <= kap.predict(N, D) <= hi


def test_kaplan_reports_like_the_other_fits(kap):
    json.dumps(kap.to_dict())
    text = summarize(kap)
    assert "Kaplan fit" in text and "α_D" in text


def test_kaplan_needs_a_real_grid():
    rows = [r for r in runs() if r["N"] == runs()[0]["N"]]
    with pytest.raises(ScalelabError, match="same N"):
        fit_kaplan(rows, n_bootstrap=0)
