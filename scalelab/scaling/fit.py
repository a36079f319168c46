"""Scaling-law fits on a table of finished runs.

Three views of the same sweep: Hoffmann et al.'s parametric L(N, D) ("approach 3"), a
Kaplan-style L(C) through the compute frontier, and IsoFLOP parabolas ("approach 2").
Input is a pandas DataFrame, a list of dicts or a dict of columns, one row per run:
N (parameters), D (tokens), C (FLOPs), loss (nats/token), optionally budget and name.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares, minimize
from threadpoolctl import threadpool_limits

from scalelab.errors import ScalelabError


def _openblas_thread_controls() -> list[tuple]:
    """(get, set) thread-count functions of each OpenBLAS loaded in this process; empty off Linux."""
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "openblas" in ln.lower() and ln.split()[-1].startswith("/")}
    except OSError:
        return []
    controls = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_", ""), ("scipy_", "64_"), ("", ""), ("", "64_")):
            get = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                controls.append((get, put))
                break
    return controls


@contextlib.contextmanager
def _single_threaded_blas():
    # L-BFGS-B makes thousands of 5x5 BLAS calls; OpenBLAS waking its thread pool for each one made
    # these fits ~50x slower on a busy 2-core machine. Capped only for the fit, then restored.
    try:
        pass
    except ImportError:
        controls = _openblas_thread_controls()
        saved = [get() for get, _ in controls]
        for _, put in controls:
            put(1)
        try:
            yield
        finally:
            for (_, put), n in zip(controls, saved):
                put(n)
    else:
        with threadpool_limits(1, user_api="blas"):
            yield


def _one_blas_thread(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _single_threaded_blas():
            return fn(*args, **kwargs)

    return wrapper


CHINCHILLA_PARAMS = ("E", "A", "B", "alpha", "beta")
MIN_CHINCHILLA_RUNS = 5


# ---------------------------------------------------------------- input checks


def as_columns(data) -> dict[str, np.ndarray]:
    """Columns of a run table as arrays (object dtype until a fit asks for numbers)."""
    if hasattr(data, "columns") and hasattr(data, "to_numpy"):
        cols = {str(c): np.asarray(data[c].to_numpy(), dtype=object) for c in data.columns}
    elif isinstance(data, Mapping):
        cols = {str(k): np.asarray(v, dtype=object).reshape(-1) for k, v in data.items()}
        if len({len(v) for v in cols.values()}) > 1:
            raise ScalelabError("run table columns have different lengths")
    else:
        try:
            rows = list(data)
        except TypeError:
            raise ScalelabError(f"expected a DataFrame or a list of dicts of runs, got {type(data).__name__}") from None
        if not all(isinstance(r, Mapping) for r in rows):
            raise ScalelabError("expected a list of dicts, one per run")
        keys = list(dict.fromkeys(k for r in rows for k in r))
        cols = {str(k): np.array([r.get(k) for r in rows] + [None], dtype=object)[:-1] for k in keys}
    return cols


def _numeric(cols: dict, names: tuple[str, ...], allow_nan: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    missing = [n for n in names if n not in cols]
    if missing:
        raise ScalelabError(f"run table is missing column(s): {', '.join(missing)}")
    out = {}
    for n in names:
        try:
            x = np.array([np.nan if v is None else v for v in cols[n]], dtype=float)
        except (TypeError, ValueError):
            raise ScalelabError(f"column '{n}' is not numeric") from None
        bad = ~(np.isfinite(x) & (x > 0))
        if n in allow_nan:
            bad &= ~np.isnan(x)
        if bad.any():
            rows = ", ".join(str(i) for i in np.flatnonzero(bad)[:5])
            raise ScalelabError(f"column '{n}' must be positive and finite; bad value in row(s) {rows}")
        out[n] = x
    return out


def _row(cols: dict, i: int) -> dict:
    def plain(v):
        return v.item() if isinstance(v, np.generic) else v

    return {k: plain(v[i]) for k, v in cols.items()}


def _distinct(x: np.ndarray) -> np.ndarray:
    # Runs logged as 1e6 and 1.0000001e6 are the same model size; compare in log space.
    return np.unique(np.round(np.log(x), 6))


# ---------------------------------------------------------------- Chinchilla L(N, D)


class _HuberLogLoss:
    """Huber loss on log-loss residuals, in centred coordinates.

    Parameters are (a', b', e, alpha, beta) with a' = a - alpha*mean(log N) (likewise b'): the
    A-term's size at the centre of the data rather than at N = 1, which removes the strong a-alpha
    correlation that makes L-BFGS crawl. Rows carry integer weights so a bootstrap resample is a
    reweighting rather than a copy. Scaled by 1/(n delta^2) so L-BFGS-B's relative tolerances
    see an O(1) objective, not one of order delta^2.
    """
    def __init__(self, logN, logD, logL, delta, weights=None):
        self.mN, self.mD = float(logN.mean()), float(logD.mean())
        self.u, self.v, self.y = logN - self.mN, logD - self.mD, logL
        self.delta = delta
        self.w = np.ones_like(logL) if weights is None else np.asarray(weights, dtype=float)
        self.scale = 1.0 / (self.w.sum() * delta**2)

    def to_centred(self, th):
        th = np.array(th, dtype=float)
        th[..., 0] -= th[..., 3] * self.mN
        th[..., 1] -= th[..., 4] * self.mD
        return th

    def to_natural(self, th):
        th = np.array(th, dtype=float)
        th[..., 0] += th[..., 3] * self.mN
        th[..., 1] += th[..., 4] * self.mD
        return th

    def _huber(self, r):
        d = self.delta
        return np.where(np.abs(r) <= d, 0.5 * r * r, d * (np.abs(r) - 0.5 * d))

    def batch(self, th):
        """Objective for many centred parameter vectors at once, shape (K, 5) -> (K,)."""
        t1 = th[:, 0:1] - th[:, 3:4] * self.u
        t2 = th[:, 1:2] - th[:, 4:5] * self.v
        pred = np.logaddexp(np.logaddexp(t1, t2), th[:, 2:3])
        return self.scale * (self._huber(pred - self.y) * self.w).sum(axis=1)

    def __call__(self, th):
        a, b, e, al, be = th
        t = np.stack([a - al * self.u, b - be * self.v, np.full_like(self.u, e)])
        top = t.max(axis=0)
        ex = np.exp(t - top)
        pred = top + np.log(ex.sum(axis=0))
        soft = ex / ex.sum(axis=0)
        r = pred - self.y
        g = np.clip(r, -self.delta, self.delta) * self.w * self.scale
        grad = np.array([g @ soft[0], g @ soft[1], g @ soft[2], -(g * soft[0]) @ self.u, -(g * soft[1]) @ self.v])
        return float(self.scale * (self._huber(r) @ self.w)), grad


# Centred bounds: each term at the data's centre lies in e^-40..e^20 nats; exponents stay in [0, 3].
_BOUNDS = [(-40.0, 20.0), (-40.0, 20.0), (-20.0, 10.0), (0.0, 3.0), (0.0, 3.0)]
_LBFGS = {"maxiter": 3000, "ftol": 1e-13, "gtol": 1e-10}


def _init_grid() -> np.ndarray:
    """Hoffmann et al.'s initialisation grid in natural (a, b, e, alpha, beta) coordinates."""
    ab = np.arange(0.0, 26.0, 5.0)
    exps = np.round(np.arange(0.1, 0.71, 0.1), 2)
    g = np.meshgrid(ab, ab, [-1.0, -0.5, 0.0, 0.5, 1.0], exps, exps, indexing="ij")
    return np.stack([x.ravel() for x in g], axis=1)


def _best_of(obj: _HuberLogLoss, starts) -> tuple[np.ndarray, float]:
    best, best_val = None, math.inf
    for s in starts:
        res = minimize(obj, s, jac=True, method="L-BFGS-B", bounds=_BOUNDS, options=_LBFGS)
        if res.fun < best_val:
            best, best_val = res.x, float(res.fun)
    return best, best_val


@dataclass
class ChinchillaFit:
    """L(N, D) = E + A/N^alpha + B/D^beta, with bootstrap percentile intervals."""
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    ci: dict[str, tuple[float, float]]
    n_points: int
    rms: float  # root-mean-square residual of log-loss on the fitted runs
    huber_delta: float = 1e-3
    # Bootstrap refits, columns (log E, log A, log B, alpha, beta); empty when n_bootstrap=0.
    samples: np.ndarray = field(default_factory=lambda: np.empty((0, 5)), repr=False, compare=False)

    @property
    def theta(self) -> np.ndarray:
        return np.array([math.log(self.E), math.log(self.A), math.log(self.B), self.alpha, self.beta])

    @staticmethod
    def _law(th, N, D):
        # Evaluated in log space so huge A or tiny N cannot overflow an intermediate power.
        le, la, lb, al, be = (np.asarray(th)[..., i, None] for i in range(5))
        lN, lD = np.log(np.asarray(N, dtype=float)).ravel(), np.log(np.asarray(D, dtype=float)).ravel()
        return np.exp(le) + np.exp(la - al * lN) + np.exp(lb - be * lD)

    def predict(self, N, D):
        N, D = np.broadcast_arrays(np.asarray(N, dtype=float), np.asarray(D, dtype=float))
        out = self._law(self.theta, N, D).reshape(N.shape)
        return float(out) if out.ndim == 0 else out

    def _need_samples(self):
        if len(self.samples) == 0:
            raise ScalelabError("this fit has no bootstrap samples; refit with n_bootstrap > 0")

    def predict_interval(self, N, D, level: float = 0.95):
        """Percentile interval of the fitted mean law across bootstrap refits (parameter uncertainty, not run noise)."""
        self._need_samples()
        N, D = np.broadcast_arrays(np.asarray(N, dtype=float), np.asarray(D, dtype=float))
        preds = self._law(self.samples, N, D)
        q = 50 * (1 - level)
        lo, hi = (np.percentile(preds, p, axis=0).reshape(N.shape) for p in (q, 100 - q))
        return (float(lo), float(hi)) if lo.ndim == 0 else (lo, hi)

    @staticmethod
    def _log_n_opt(th, logC6):
        le, la, lb, al, be = (np.asarray(th)[..., i, None] for i in range(5))
        log_g = (np.log(al) + la - np.log(be) - lb) / (al + be)
        return log_g + be / (al + be) * logC6

    def compute_optimal(self, C, flops_per_token_per_param: float = 6.0, level: float = 0.95) -> dict:
        """N_opt = G (C/k)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)); D_opt = C/(k N_opt)."""
        C = np.asarray(C, dtype=float)
        if not (np.all(np.isfinite(C)) and np.all(C > 0)):
            raise ScalelabError("compute budget C must be positive and finite")
        k = float(flops_per_token_per_param)
        logC6 = np.log(C / k).ravel()
        n_opt = np.exp(self._log_n_opt(self.theta, logC6))
        out = {"N": n_opt, "D": C.ravel() / (k * n_opt)}
        if len(self.samples):
            q = 50 * (1 - level)
            ns = np.exp(self._log_n_opt(self.samples, logC6))
            n_lo, n_hi = np.percentile(ns, q, axis=0), np.percentile(ns, 100 - q, axis=0)
            out.update(N_lo=n_lo, N_hi=n_hi, D_lo=C.ravel() / (k * n_hi), D_hi=C.ravel() / (k * n_lo))
        else:
            out.update({key: np.full_like(n_opt, np.nan) for key in ("N_lo", "N_hi", "D_lo", "D_hi")})
        return {key: (float(v[0]) if C.ndim == 0 else v.reshape(C.shape)) for key, v in out.items()}

    def to_dict(self) -> dict:
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta, **fit_quality(self)}


def _check_chinchilla_grid(x: dict[str, np.ndarray]) -> None:
    n = len(x["loss"])
    if n < MIN_CHINCHILLA_RUNS:
        raise ScalelabError(f"need at least {MIN_CHINCHILLA_RUNS} runs, got {n}")
    for col, exp, what in (("N", "alpha", "model sizes"), ("D", "beta", "token counts")):
        vals = _distinct(x[col])
        if len(vals) == 1:
            raise ScalelabError(f"all runs have the same {col} ({x[col][0]:.3g}), so {exp} is unidentifiable; vary the {what}")
        if len(vals) == 2:
            raise ScalelabError(f"only 2 distinct {col} values, so {exp} is unidentifiable; need at least 3 {what}")
    # With D a fixed multiple of N the two power laws are indistinguishable.
    lN, lD = np.log(x["N"]), np.log(x["D"])
    resid = lD - np.polyval(np.polyfit(lN, lD, 1), lN)
    if resid.std() < 0.02:
        raise ScalelabError("log D is a linear function of log N across the runs, so alpha and beta cannot be separated; vary D at fixed N")


def fit_quality(fit) -> dict:
    """The JSON fields every bootstrapped Huber fit reports besides its constants."""
    return {"ci": {k: [float(v[0]), float(v[1])] for k, v in fit.ci.items()}, "n_points": fit.n_points,
            "rms": fit.rms, "huber_delta": fit.huber_delta, "n_bootstrap": int(len(fit.samples))}


def constants_table(fit, title: str, params, symbols, digits: int = 4) -> list[str]:
    """Markdown: a bootstrapped fit's title line, then each constant with its 95% interval."""
    lines = [f"{title} — {fit.n_points} runs, RMS log-loss residual {fit.rms:.2e}, {len(fit.samples)} bootstrap refits",
             "", "| constant | estimate | 95% CI |", "|---|---|---|"]
    for name, sym in zip(params, symbols):
        lo, hi = fit.ci[name]
        lines.append(f"| {sym} | {_g(getattr(fit, name), digits)} | [{_g(lo, digits)}, {_g(hi, digits)}] |")
    return lines


def bootstrap_weights(rng, x: dict[str, np.ndarray]) -> np.ndarray:
    """One bootstrap resample of the runs, as integer row weights."""
    n = len(x["loss"])
    for _attempt in range(20):
        idx = rng.integers(0, n, n)
        # A resample that lost all but two N (or D) values cannot pin the exponent down; redraw it.
        if len(_distinct(x["N"][idx])) >= 3 and len(_distinct(x["D"][idx])) >= 3:
            break
    return np.bincount(idx, minlength=n)


def percentile_ci(samples: np.ndarray, names, n_log: int) -> dict[str, tuple[float, float]]:
    """95% percentile intervals per column; the first ``n_log`` columns are logs of the constants."""
    ci = {}
    for j, name in enumerate(names):
        if len(samples):
            lo, hi = np.percentile(samples[:, j], [2.5, 97.5])
            ci[name] = (math.exp(lo), math.exp(hi)) if j < n_log else (float(lo), float(hi))
        else:
            ci[name] = (math.nan, math.nan)
    return ci


@_one_blas_thread
def fit_chinchilla(df, n_bootstrap: int = 200, seed: int = 0, huber_delta: float = 1e-3, n_starts: int = 64) -> ChinchillaFit:
    """Hoffmann et al. (2022) approach 3: Huber regression of log L on logsumexp(a - alpha log N, b - beta log D, e).

    L-BFGS-B runs from the n_starts most promising points of the initialisation grid (half the
    best-scoring, half spread at random over the rest), keeping the best; each bootstrap resample is
    refit from that optimum plus two perturbed starts.
    """
    if huber_delta <= 0 or n_bootstrap < 0 or n_starts < 1:
        raise ScalelabError("huber_delta must be > 0, n_bootstrap >= 0 and n_starts >= 1")
    x = _numeric(as_columns(df), ("N", "D", "loss"))
    _check_chinchilla_grid(x)
    logN, logD, logL = np.log(x["N"]), np.log(x["D"]), np.log(x["loss"])
    n = len(logL)
    obj = _HuberLogLoss(logN, logD, logL, huber_delta)
    rng = np.random.default_rng(seed)

    grid = obj.to_centred(_init_grid())
    order = np.argsort(obj.batch(grid))
    n_top = max(1, n_starts // 2)
    rest = rng.choice(order[n_top:], size=min(n_starts - n_top, len(order) - n_top), replace=False)
    best, _ = _best_of(obj, grid[np.concatenate([order[:n_top], rest])])

    th = obj.to_natural(best)
    resid = np.logaddexp(np.logaddexp(th[0] - th[3] * logN, th[1] - th[4] * logD), th[2]) - logL
    rms = float(np.sqrt(np.mean(resid**2)))

    samples = []
    jitter = np.array([0.5, 0.5, 0.2, 0.05, 0.05])
    for _ in range(n_bootstrap):
        bobj = _HuberLogLoss(logN, logD, logL, huber_delta, weights=bootstrap_weights(rng, x))
        bobj.mN, bobj.mD, bobj.u, bobj.v = obj.mN, obj.mD, obj.u, obj.v  # same centring as `best`
        starts = [best] + [np.clip(best + rng.normal(0, jitter), *np.array(_BOUNDS).T) for _ in range(2)]
        b_best, _ = _best_of(bobj, starts)
        samples.append(obj.to_natural(b_best))
    # Stored as (log E, log A, log B, alpha, beta) in the order CHINCHILLA_PARAMS names them.
    samp = np.array(samples)[:, [2, 0, 1, 3, 4]] if samples else np.empty((0, 5))

    ci = percentile_ci(samp, CHINCHILLA_PARAMS, n_log=3)
    return ChinchillaFit(
        E=math.exp(th[2]), A=math.exp(th[0]), B=math.exp(th[1]), alpha=float(th[3]), beta=float(th[4]),
        ci=ci, n_points=n, rms=rms, huber_delta=huber_delta, samples=samp,
    )


# ---------------------------------------------------------------- compute frontier L(C)


@dataclass
class PowerLawFit:
    """L(C) = E + (C_c / C)^alpha on the compute frontier; form 'power' means E is fixed at 0."""
    form: str  # "saturating" or "power"
    E: float
    alpha: float
    log_C_c: float  # natural log of C_c; C_c itself can overflow a float when alpha is small
    n_frontier: int
    rms: float  # RMS residual of log-loss on the frontier
    frontier: list[dict]
    note: str = ""

    @property
    def C_c(self) -> float:
        return math.exp(self.log_C_c) if self.log_C_c < 709 else math.inf

    def predict(self, C):
        C = np.asarray(C, dtype=float)
        out = self.E + np.exp(self.alpha * (self.log_C_c - np.log(C)))
        return float(out) if out.ndim == 0 else out

    def to_dict(self) -> dict:
        return {
            "form": self.form, "E": self.E, "alpha": self.alpha, "C_c": self.C_c, "log_C_c": self.log_C_c,
            "n_frontier": self.n_frontier, "rms": self.rms, "note": self.note, "frontier": self.frontier,
        }


def compute_frontier(df) -> list[int]:
    """Row indices of the compute frontier: by increasing C, each run that beats every cheaper run.

    Only the best run at each distinct C can qualify; sibling runs at the same budget are not frontier.
    """
    x = _numeric(as_columns(df), ("C", "loss"))
    order = np.lexsort((x["loss"], x["C"]))
    keep, best = [], math.inf
    for i in order:
        if x["loss"][i] < best:
            keep.append(int(i))
            best = x["loss"][i]
    return keep


@_one_blas_thread
def fit_power_law_frontier(df, min_saturating_points: int = 5) -> PowerLawFit:
    """Kaplan-style L(C) on the compute frontier.

    Tries the saturating form log L = logaddexp(log E, alpha (log C_c - log C)); falls back to the
    pure power law log L = log k - alpha log C when there are fewer than min_saturating_points
    frontier runs or the irreducible term is not pinned down (E at a bound or a near-singular Jacobian).
    """
    cols = as_columns(df)
    x = _numeric(cols, ("C", "loss"))
    idx = compute_frontier(cols)
    if len(idx) < 2:
        raise ScalelabError(f"need at least 2 runs on the compute frontier (distinct C, falling loss), got {len(idx)}")
    lC, lL = np.log(x["C"][idx]), np.log(x["loss"][idx])
    slope, log_k = np.polyfit(lC, lL, 1)
    alpha_p = -float(slope)
    power = PowerLawFit(
        form="power", E=0.0, alpha=alpha_p, log_C_c=float(log_k / alpha_p), n_frontier=len(idx),
        rms=float(np.sqrt(np.mean((log_k + slope * lC - lL) ** 2))), frontier=[_row(cols, i) for i in idx],
    )
    if len(idx) < min_saturating_points:
        power.note = f"only {len(idx)} frontier runs; fitted the pure power law"
        return power

    m = lC.mean()
    u = lC - m
    min_l = float(np.exp(lL.min()))

    def resid(p):  # p = (log E, k' = log of the reducible term at the centre, alpha)
        return np.logaddexp(p[0], p[1] - p[2] * u) - lL

    def jac(p):
        s = 1.0 / (1.0 + np.exp((p[1] - p[2] * u) - p[0]))  # weight of the E term
        return np.stack([s, 1 - s, -(1 - s) * u], axis=1)

    hi_e = math.log(min_l) - 1e-9
    best = None
    for frac in (0.2, 0.5, 0.8, 0.95):
        for mult in (1.0, 2.0, 5.0):
            e0 = math.log(frac * min_l)
            k0 = math.log(max(float(np.exp(lL.mean())) - frac * min_l, 1e-12))
            p0 = np.array([e0, k0, min(alpha_p * mult / (1 - frac), 4.9)])
            res = least_squares(resid, p0, jac=jac, bounds=([-30.0, -30.0, 1e-6], [hi_e, 20.0, 5.0]), xtol=1e-14, ftol=1e-14)
            if best is None or res.cost < best.cost:
                best = res
    le, kc, al = best.x
    E = math.exp(le)
    sv = np.linalg.svd(jac(best.x), compute_uv=False)
    cond = sv[0] / max(sv[-1], 1e-300)
    if not (1e-3 * min_l < E < 0.999 * min_l) or cond > 1e6:
        power.note = "the saturating form was ill-conditioned (irreducible loss not identified); fitted the pure power law"
        return power
    return PowerLawFit(
        form="saturating", E=E, alpha=float(al), log_C_c=float(m + kc / al), n_frontier=len(idx),
        rms=float(np.sqrt(np.mean(resid(best.x) ** 2))), frontier=power.frontier,
    )


# ---------------------------------------------------------------- IsoFLOP parabolas


@dataclass
class IsoFLOPFit:
    """N_opt = k_N C^a and D_opt = k_D C^b from parabola vertices of loss vs log N per budget."""
    a: float
    b: float
    log_k_N: float
    log_k_D: float
    a_stderr: float  # nan with only 2 usable budgets
    b_stderr: float
    table: list[dict]  # one row per budget, used or not, with the reason in 'note'
    flops_per_token_per_param: float = 6.0

    @property
    def n_used(self) -> int:
        return sum(r["used"] for r in self.table)

    def predict_N_opt(self, C):
        out = np.exp(self.log_k_N + self.a * np.log(np.asarray(C, dtype=float)))
        return float(out) if out.ndim == 0 else out

    def predict_D_opt(self, C):
        out = np.exp(self.log_k_D + self.b * np.log(np.asarray(C, dtype=float)))
        return float(out) if out.ndim == 0 else out

    def to_dict(self) -> dict:
        return {
            "a": self.a, "b": self.b, "a_stderr": self.a_stderr, "b_stderr": self.b_stderr,
            "k_N": math.exp(self.log_k_N), "k_D": math.exp(self.log_k_D),
            "flops_per_token_per_param": self.flops_per_token_per_param, "table": self.table,
        }


def _loglog(lC, ly) -> tuple[float, float, float]:
    slope, icpt = np.polyfit(lC, ly, 1)
    if len(lC) < 3:
        return float(slope), float(icpt), math.nan
    r = ly - (icpt + slope * lC)
    se = math.sqrt((r @ r) / (len(lC) - 2) / ((lC - lC.mean()) @ (lC - lC.mean())))
    return float(slope), float(icpt), se


def fit_isoflop(df, flops_per_token_per_param: float = 6.0) -> IsoFLOPFit:
    """Hoffmann et al. approach 2: per budget, the vertex of a parabola in (log N, loss) is N_opt.

    Rows without a budget label are ignored. Budgets with fewer than 3 distinct N, a parabola that
    opens downward, or a vertex outside the sampled N range are reported but not used.
    """
    cols = as_columns(df)
    x = _numeric(cols, ("budget", "N", "loss"), allow_nan=("budget",))
    labelled = ~np.isnan(x["budget"])
    if not labelled.any():
        raise ScalelabError("no run has a 'budget' label; IsoFLOP fitting needs runs grouped by budget")
    k = float(flops_per_token_per_param)
    table = []
    for c in np.unique(x["budget"][labelled]):
        sel = labelled & (x["budget"] == c)
        lN, loss = np.log(x["N"][sel]), x["loss"][sel]
        row = {"budget": float(c), "n_runs": int(sel.sum()), "n_distinct_N": int(len(_distinct(x["N"][sel]))),
               "N_opt": math.nan, "D_opt": math.nan, "loss_opt": math.nan, "coef": None,
               "N_min": float(np.exp(lN.min())), "N_max": float(np.exp(lN.max())), "vertex_inside": False,
               "used": False, "note": ""}
        table.append(row)
        if row["n_distinct_N"] < 3:
            row["note"] = f"only {row['n_distinct_N']} distinct N; a parabola needs 3"
            continue
        p2, p1, p0 = np.polyfit(lN, loss, 2)
        row["coef"] = (float(p2), float(p1), float(p0))
        if p2 <= 0:
            row["note"] = "parabola opens downward: no minimum in this budget"
            continue
        xv = -p1 / (2 * p2)
        row.update(N_opt=float(np.exp(xv)), D_opt=float(c / (k * np.exp(xv))), loss_opt=float(np.polyval([p2, p1, p0], xv)))
        row["vertex_inside"] = bool(lN.min() <= xv <= lN.max())
        if not row["vertex_inside"]:
            row["note"] = "vertex outside the sampled N range: extend the sweep toward the optimum"
            continue
        row["used"] = True
    used = [r for r in table if r["used"]]
    if len(used) < 2:
        reasons = "; ".join(f"{r['budget']:.3g}: {r['note']}" for r in table if not r["used"])
        raise ScalelabError(f"need at least 2 usable IsoFLOP budgets, got {len(used)}" + (f" ({reasons})" if reasons else ""))
    lC = np.log([r["budget"] for r in used])
    a, log_kn, a_se = _loglog(lC, np.log([r["N_opt"] for r in used]))
    b, log_kd, b_se = _loglog(lC, np.log([r["D_opt"] for r in used]))
    return IsoFLOPFit(a=a, b=b, log_k_N=log_kn, log_k_D=log_kd, a_stderr=a_se, b_stderr=b_se, table=table,
                      flops_per_token_per_param=k)


# ---------------------------------------------------------------- report table


def _g(v: float, digits: int) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}g}"


def summarize(*fits, digits: int = 4) -> str:
    """Markdown tables of fitted constants (with 95% bootstrap CIs where there are any)."""
    parts = []
    for fit in fits:
        if isinstance(fit, ChinchillaFit):
            lines = constants_table(fit, "**Chinchilla fit** L(N, D) = E + A/N^α + B/D^β", CHINCHILLA_PARAMS,
                                    ("E", "A", "B", "α", "β"), digits)
            lines.append(f"| a = β/(α+β) | {_g(fit.beta / (fit.alpha + fit.beta), digits)} | |")
        elif isinstance(fit, PowerLawFit):
            lines = [f"**Compute frontier** L(C) = E + (C_c/C)^α_C — form: {fit.form}, {fit.n_frontier} frontier runs, "
                     f"RMS log-loss residual {fit.rms:.2e}" + (f" ({fit.note})" if fit.note else ""), "",
                     "| constant | estimate |", "|---|---|",
                     f"| E | {_g(fit.E, digits)} |", f"| C_c | {_g(fit.C_c, digits)} |", f"| α_C | {_g(fit.alpha, digits)} |"]
        elif isinstance(fit, IsoFLOPFit):
            lines = [f"**IsoFLOP fit** N_opt ∝ C^a, D_opt ∝ C^b — {fit.n_used} of {len(fit.table)} budgets used", "",
                     "| exponent | estimate | std. error |", "|---|---|---|",
                     f"| a | {_g(fit.a, digits)} | {_g(fit.a_stderr, 2)} |", f"| b | {_g(fit.b, digits)} | {_g(fit.b_stderr, 2)} |",
                     "", "| budget C | runs | N_opt | D_opt | loss at N_opt | used | note |", "|---|---|---|---|---|---|---|"]
            for r in fit.table:
                lines.append(f"| {r['budget']:.3g} | {r['n_runs']} | {_g(r['N_opt'], 3)} | {_g(r['D_opt'], 3)} | "
                             f"{_g(r['loss_opt'], digits)} | {'yes' if r['used'] else 'no'} | {r['note']} |")
        elif hasattr(fit, "markdown"):  # forms that live in their own module (kaplan.py)
            lines = fit.markdown(digits)
        else:
            raise ScalelabError(f"summarize() takes scaling fits, got {type(fit).__name__}")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"
