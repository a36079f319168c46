"""Kaplan et al. (2020)'s interacting L(N, D), a second functional form for forecasts.

    L(N, D) = E + [(N_c / N)^(α_N / α_D) + D_c / D]^α_D

Chinchilla's form adds a model-size term and a data term. Kaplan's adds them inside a power
α_D < 1, so the two limits interact: a bigger model gains more from the same data than the additive
form allows. Which form extrapolates better is an empirical question, so ``scalelab scaling predict``
can forecast with both and report the spread between them as part of its interval
(``scaling.forecast_forms``). Kaplan et al. fit without E; here E is free but may go to ~0.

On runs far below N_c and D_c (every small sweep), E, N_c and D_c trade off against one another
and are only weakly identified; the exponents and the forecast are what such data pin down, and
the bootstrap intervals show the difference (tests/test_scaling_kaplan.py).

The fit is the same robust recipe as the Chinchilla one (fit.py): Huber loss on log-loss residuals,
L-BFGS-B from a grid of starts, bootstrap refits for intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from scalelab.errors import ScalelabError
from scalelab.scaling.fit import (
    _check_chinchilla_grid,
    _numeric,
    _one_blas_thread,
    as_columns,
    bootstrap_weights,
    constants_table,
    fit_quality,
    percentile_ci,
)

KAPLAN_PARAMS = ("E", "N_c", "D_c", "alpha_N", "alpha_D")
# Centred coordinates (log N_c and log D_c relative to the data's mean log N and log D).
_BOUNDS = [(-20.0, 3.0), (-25.0, 25.0), (-25.0, 25.0), (0.01, 3.0), (0.01, 3.0)]
_LBFGS = {"maxiter": 3000, "ftol": 1e-13, "gtol": 1e-10}


def _log_law(th, lN, lD):
    """log L for parameter rows th = (log E, log N_c, log D_c, α_N, α_D), any leading shape."""
    th = np.asarray(th, dtype=float)
    le, lnc, ldc, aN, aD = (th[..., i, None] for i in range(5))
    inner = np.logaddexp((aN / aD) * (lnc - lN), ldc - lD)
    return np.logaddexp(le, aD * inner)


class _Objective:
    def __init__(self, lN, lD, lL, delta, weights=None):
        self.mN, self.mD = float(lN.mean()), float(lD.mean())
        self.u, self.v, self.y, self.delta = lN - self.mN, lD - self.mD, lL, delta
        self.w = np.ones_like(lL) if weights is None else np.asarray(weights, dtype=float)
        self.scale = 1.0 / (self.w.sum() * delta**2)

    def __call__(self, th) -> float:
        r = _log_law(th, self.u, self.v).ravel() - self.y
        d = self.delta
        h = np.where(np.abs(r) <= d, 0.5 * r * r, d * (np.abs(r) - 0.5 * d))
        return float(self.scale * (h @ self.w))

    def to_natural(self, th) -> np.ndarray:
        th = np.array(th, dtype=float)
        th[..., 1] += self.mN
        th[..., 2] += self.mD
        return th


def _starts() -> np.ndarray:
    g = np.meshgrid([-3.0, -1.0, 0.0, 0.5], [-3.0, 0.0, 3.0], [-3.0, 0.0, 3.0], [0.1, 0.3, 0.7], [0.1, 0.3, 0.7],
                    indexing="ij")
    return np.stack([x.ravel() for x in g], axis=1)


def _best_of(obj: _Objective, starts) -> np.ndarray:
    best, best_val = None, math.inf
    for s in starts:
        res = minimize(obj, s, method="L-BFGS-B", bounds=_BOUNDS, options=_LBFGS)
        if res.fun < best_val:
            best, best_val = res.x, float(res.fun)
    return best


@dataclass
class KaplanFit:
    E: float
    N_c: float
    D_c: float
    alpha_N: float
    alpha_D: float
    ci: dict[str, tuple[float, float]]
    n_points: int
    rms: float
    huber_delta: float = 1e-3
    # Bootstrap refits, columns (log E, log N_c, log D_c, α_N, α_D).
    samples: np.ndarray = field(default_factory=lambda: np.empty((0, 5)), repr=False, compare=False)

    @property
    def theta(self) -> np.ndarray:
        return np.array([math.log(self.E), math.log(self.N_c), math.log(self.D_c), self.alpha_N, self.alpha_D])

    def predict(self, N, D):
        N, D = np.broadcast_arrays(np.asarray(N, dtype=float), np.asarray(D, dtype=float))
        out = np.exp(_log_law(self.theta, np.log(N).ravel(), np.log(D).ravel())).reshape(N.shape)
        return float(out) if out.ndim == 0 else out

    def predict_interval(self, N, D, level: float = 0.95):
        """Percentile interval across bootstrap refits (parameter uncertainty of this form)."""
        if len(self.samples) == 0:
            raise ScalelabError("this fit has no bootstrap samples; refit with n_bootstrap > 0")
        N, D = np.broadcast_arrays(np.asarray(N, dtype=float), np.asarray(D, dtype=float))
        preds = np.exp(_log_law(self.samples, np.log(N).ravel(), np.log(D).ravel()))
        q = 50 * (1 - level)
        lo, hi = (np.percentile(preds, p, axis=0).reshape(N.shape) for p in (q, 100 - q))
        return (float(lo), float(hi)) if lo.ndim == 0 else (lo, hi)

    def to_dict(self) -> dict:
        return {"E": self.E, "N_c": self.N_c, "D_c": self.D_c, "alpha_N": self.alpha_N, "alpha_D": self.alpha_D,
                **fit_quality(self)}

    def markdown(self, digits: int = 4) -> list[str]:
        return constants_table(self, "**Kaplan fit** L(N, D) = E + [(N_c/N)^(α_N/α_D) + D_c/D]^α_D", KAPLAN_PARAMS,
                               ("E", "N_c", "D_c", "α_N", "α_D"), digits)


@_one_blas_thread
def fit_kaplan(df, n_bootstrap: int = 200, seed: int = 0, huber_delta: float = 1e-3, n_starts: int = 24) -> KaplanFit:
    """Huber regression of log L on Kaplan's interacting form; L-BFGS-B from the n_starts best grid points."""
    if huber_delta <= 0 or n_bootstrap < 0 or n_starts < 1:
        raise ScalelabError("huber_delta must be > 0, n_bootstrap >= 0 and n_starts >= 1")
    x = _numeric(as_columns(df), ("N", "D", "loss"))
    _check_chinchilla_grid(x)  # the same identifiability conditions: 3+ sizes, 3+ token counts, D not tied to N
    lN, lD, lL = np.log(x["N"]), np.log(x["D"]), np.log(x["loss"])
    n = len(lL)
    obj = _Objective(lN, lD, lL, huber_delta)
    grid = _starts()
    scores = np.array([obj(s) for s in grid])
    best = _best_of(obj, grid[np.argsort(scores)[:n_starts]])
    th = obj.to_natural(best)
    rms = float(np.sqrt(np.mean((_log_law(th, lN, lD).ravel() - lL) ** 2)))

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_bootstrap):
        bobj = _Objective(lN, lD, lL, huber_delta, weights=bootstrap_weights(rng, x))
        bobj.mN, bobj.mD, bobj.u, bobj.v = obj.mN, obj.mD, obj.u, obj.v
        starts = [best] + [np.clip(best + rng.normal(0, 0.1, 5), *np.array(_BOUNDS).T) for _ in range(2)]
        samples.append(obj.to_natural(_best_of(bobj, starts)))
    samp = np.array(samples) if samples else np.empty((0, 5))
    ci = percentile_ci(samp, KAPLAN_PARAMS, n_log=3)
    return KaplanFit(E=math.exp(th[0]), N_c=math.exp(th[1]), D_c=math.exp(th[2]), alpha_N=float(th[3]),
                     alpha_D=float(th[4]), ci=ci, n_points=n, rms=rms, huber_delta=huber_delta, samples=samp)
