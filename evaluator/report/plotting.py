"""What every report plot shares: constants, figure layout, colours and histograms."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from evaluator.dataset import EvalDataset

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ROC_POINTS = 400  # per model: more is invisible at report size and only costs rendering time
SCATTER_POINTS = 3000  # per model, predicted vs actual (regression)
HIST_BINS = 50
TIME_BINS = 48  # arm shares over time
CALIBRATION_BINS = 10  # the bins the ECE in the metrics table uses
PNG_DPI = 100


def _colors(dataset: EvalDataset) -> dict[str, str]:
    """Stable colours: the champion is always black, so it is found at a glance in every plot."""
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
    out = {dataset.champion: "#222222"}
    for i, name in enumerate(m for m in dataset.models if m != dataset.champion):
        out[name] = palette[i % len(palette)]
    return out


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI)  # no bbox "tight": it draws twice
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _new_figure(
    width: float = 6.2, height: float = 4.2, ncols: int = 1, *, dates: bool = False
) -> Figure:
    """A figure with fixed margins (in inches, so they fit any size).

    matplotlib.figure.Figure, not pyplot: no global state, no GUI backend, nothing to close.
    Fixed margins, not a layout engine: constrained layout re-measures every text on every
    draw and cost more than the drawing itself (~0.4 s CPU per three-panel figure).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    bottom = 1.05 if dates else 0.55
    fig.subplots_adjust(
        left=0.7 / width,
        right=1.0 - 0.15 / width,
        bottom=bottom / height,
        top=1.0 - 0.35 / height,
        wspace=0.3,
    )
    fig.subplots(1, ncols, squeeze=False)
    return fig


def _hist(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Density histogram on equal-width ``edges`` in O(n): ``np.histogram`` given an edge array
    sorts its input in blocks (~0.1 s per million values), which dominated the score plot."""
    v = values[np.isfinite(values)]
    lo, hi = float(edges[0]), float(edges[-1])
    v = v[(v >= lo) & (v <= hi)]
    nb = edges.size - 1
    if v.size == 0:
        return np.zeros(nb)
    idx = np.minimum(((v - lo) * (nb / (hi - lo))).astype(np.int64), nb - 1)
    counts = np.bincount(idx, minlength=nb).astype(np.float64)
    return counts / (counts.sum() * (hi - lo) / nb)


def _central_edges(arrays: Sequence[np.ndarray], bins: int = HIST_BINS) -> np.ndarray:
    """Equal-width bin edges over the central 99% of the finite values (from a fixed-seed
    subsample: percentiles of a few million values are not worth their time for a plot)."""
    finite = [a[np.isfinite(a)] for a in arrays]
    rng = np.random.default_rng(0)
    pooled = np.concatenate([f if f.size <= 20_000 else rng.choice(f, 20_000) for f in finite])
    if pooled.size == 0:
        return np.linspace(0.0, 1.0, bins + 1)
    lo, hi = (float(v) for v in np.percentile(pooled, [0.5, 99.5]))
    return np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)


def _metric_value(payload: Mapping[str, Any], model: str, metric: str) -> Any:
    """A model's metric value from the report payload, None when it was not computed."""
    metrics = (payload["metrics"]["models"].get(model) or {}).get("metrics") or {}
    return (metrics.get(metric) or {}).get("value")
