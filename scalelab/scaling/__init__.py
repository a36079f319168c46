"""Scaling laws from a sweep of finished runs: Chinchilla L(N, D), the compute frontier L(C), IsoFLOP
parabolas, and the plots and Markdown tables for a report."""

from scalelab.scaling.fit import (
    CHINCHILLA_PARAMS,
    ChinchillaFit,
    IsoFLOPFit,
    PowerLawFit,
    as_columns,
    compute_frontier,
    fit_chinchilla,
    fit_isoflop,
    fit_power_law_frontier,
    summarize,
)

__all__ = [
    "CHINCHILLA_PARAMS",
    "ChinchillaFit",
    "IsoFLOPFit",
    "PowerLawFit",
    "as_columns",
    "compute_frontier",
    "fit_chinchilla",
    "fit_isoflop",
    "fit_power_law_frontier",
    "summarize",
]
