"""How sharply a metric rises with compute, measured the same way for every metric.

The rule (docs/emergence.md, fixed before the runs it judges): put the metric on a log2-compute axis,
join the points by straight lines, orient it so that up is better, and take the rise from the smallest
to the largest compute as the total. ``sharpness`` is the largest rise inside any window one octave
wide (a 2x step in compute) divided by that total.

- A metric that improves at a steady rate per doubling over a span of ``W`` octaves scores ``1 / W``
  (0.2 over 32x): :func:`smooth_share`.
- A metric that makes all of its progress between two neighbouring points at most 2x apart scores 1.
- The points must be at most 2x apart for a jump to be able to score 1: between points further apart
  the straight line spreads a jump over more than one octave. ``sharpness`` says so in ``resolved``.
- A metric that does not rise (total <= 0) has no sharpness (NaN): there is no rise to share out.

A metric counts as *sharp* when ``sharpness >= SHARP_CUT``: more than half of its whole rise falls in
one doubling of compute, 2.5x what a steady trend over 32x would put there.
"""

from __future__ import annotations

import math

import numpy as np

from scalelab.errors import ScalelabError

SHARP_CUT = 0.5  # share of the total rise inside one 2x window at or above which a curve is "sharp"
WINDOW_OCTAVES = 1.0  # the window: one doubling of compute
_GRID = 2048  # window start positions tried along the log2-compute axis


def _oriented(compute, values, higher_is_better: bool) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(compute, dtype=float)
    v = np.asarray(values, dtype=float)
    if c.shape != v.shape or c.ndim != 1:
        raise ScalelabError(f"sharpness needs one value per compute point, got {c.shape} and {v.shape}")
    if len(c) < 2:
        raise ScalelabError(f"sharpness needs at least 2 compute points, got {len(c)}")
    if np.any(~np.isfinite(c)) or np.any(c <= 0):
        raise ScalelabError("sharpness needs positive, finite compute values")
    order = np.argsort(c)
    x, y = np.log2(c[order]), v[order] * (1.0 if higher_is_better else -1.0)
    if np.any(np.diff(x) <= 0):
        raise ScalelabError("sharpness needs distinct compute values (average the seeds of a point first)")
    return x, y


def sharpness(compute, values, higher_is_better: bool = True) -> dict:
    """``{"sharpness", "total_rise", "window", "smooth_share", "resolved"}`` for one curve.

    ``window`` is the (low, high) compute of the steepest one-octave window; ``resolved`` is whether
    neighbouring points are at most 2x apart, so a jump could show as a share of 1.
    """
    x, y = _oriented(compute, values, higher_is_better)
    span = float(x[-1] - x[0])
    resolved = bool(np.all(np.diff(x) <= WINDOW_OCTAVES + 1e-9))
    total = float(y[-1] - y[0])
    out = {"total_rise": total, "smooth_share": smooth_share(span), "resolved": resolved,
           "sharpness": float("nan"), "window": None}
    if not np.all(np.isfinite(y)) or total <= 0:
        return out
    if span <= WINDOW_OCTAVES:
        out.update(sharpness=1.0, window=(float(2 ** x[0]), float(2 ** x[-1])))
        return out
    starts = np.linspace(x[0], x[-1] - WINDOW_OCTAVES, _GRID)
    rises = np.interp(starts + WINDOW_OCTAVES, x, y) - np.interp(starts, x, y)
    best = int(np.argmax(rises))
    # The best window is pinned where the curve bends, which is a data point; try those exactly too.
    knots = [s for s in np.concatenate([x, x - WINDOW_OCTAVES]) if x[0] <= s <= x[-1] - WINDOW_OCTAVES]
    lo, rise = float(starts[best]), float(rises[best])
    for s in knots:
        r = float(np.interp(s + WINDOW_OCTAVES, x, y) - np.interp(s, x, y))
        if r > rise:
            lo, rise = float(s), r
    out.update(sharpness=max(0.0, rise) / total, window=(float(2 ** lo), float(2 ** (lo + WINDOW_OCTAVES))))
    return out


def smooth_share(span_octaves: float) -> float:
    """The sharpness of a metric that rises steadily per doubling over ``span_octaves`` doublings."""
    return 1.0 if span_octaves <= WINDOW_OCTAVES else WINDOW_OCTAVES / span_octaves


def is_sharp(share: float) -> bool:
    return not math.isnan(share) and share >= SHARP_CUT


def mirage_prediction(per_digit_accuracy: float, n_digits: int) -> float:
    """Exact match if every one of ``n_digits`` digits were right independently with the same
    probability (Schaeffer et al. 2023): ``per_digit_accuracy ** n_digits``."""
    if n_digits < 1:
        raise ScalelabError(f"n_digits must be at least 1, got {n_digits}")
    return float(per_digit_accuracy) ** n_digits
