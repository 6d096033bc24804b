"""The report's plots of model quality (ROC, calibration, scores; regression: predicted vs actual,
residuals), and `make_figures`, which draws every plot of a report."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from evaluator.dataset import Array, EvalDataset
from evaluator.report.document import FigureImage
from evaluator.report.format import _int, _num
from evaluator.report.plotting import (
    CALIBRATION_BINS,
    HIST_BINS,
    ROC_POINTS,
    SCATTER_POINTS,
    _central_edges,
    _colors,
    _hist,
    _metric_value,
    _new_figure,
    _png,
)
from evaluator.report.timeline import _fig_arm_shares, _fig_sequential
from evaluator.stats.metrics import (
    calibration_curve,
    common_rows,
    probability_violations,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("evaluator.report")


def make_figures(dataset: EvalDataset, payload: Mapping[str, Any]) -> list[FigureImage]:
    """All plots for the HTML. A plot that cannot be drawn (one label class, non-probability
    scores, an unexpected error) becomes a note, never a missing report."""
    if len(dataset) == 0 or not dataset.models:
        return []
    rows = common_rows(dataset)
    if not rows.any():
        rows = np.ones(len(dataset), dtype=bool)
    colors = _colors(dataset)
    builders: list[tuple[str, Any]]
    if dataset.task == "classification":
        builders = [("roc", _fig_roc), ("calibration", _fig_calibration), ("scores", _fig_scores)]
    else:
        builders = [("predicted_vs_actual", _fig_pred_actual), ("residuals", _fig_residuals)]
    builders.append(("sequential", _fig_sequential))
    if payload["exploration"]["exploring"]:
        builders.append(("arm_shares", _fig_arm_shares))
    out: list[FigureImage] = []
    for name, build in builders:
        try:
            fig = build(dataset, rows, colors, payload)
        except Exception as exc:  # a broken plot must not lose the decision record
            log.exception("report plot %s failed", name)
            fig = FigureImage(name, name, "", "", f"Plot {name} could not be drawn: {exc}")
        if fig is not None:
            out.append(fig)
    return out


def roc_points(
    labels: np.ndarray, scores: np.ndarray, max_points: int = ROC_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """Exact (FPR, TPR) at up to ``max_points`` thresholds spread evenly over the score mass.

    Why not ``metrics.roc_curve(..., max_points=...)``: it sorts every score before thinning
    (O(n log n), ~0.5 s per model at 1M rows), only to throw away all but a few hundred points.
    Here the thresholds are quantiles of a fixed-seed subsample, and each point's TPR/FPR is
    counted over all rows (one ``searchsorted`` against the thresholds plus two ``bincount``s),
    so every plotted point lies exactly on the empirical ROC curve.
    """
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    keep = np.isfinite(s) & ((y == 0) | (y == 1))
    y, s = y[keep], s[keep]
    n_pos = int(np.count_nonzero(y == 1))
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC curve needs both classes")
    sample = s if s.size <= 50_000 else np.random.default_rng(0).choice(s, 50_000)
    edges = np.unique(np.quantile(sample, np.linspace(0.0, 1.0, max_points)))
    # idx = number of thresholds <= score: the score is predicted positive at threshold j
    # exactly when idx > j.
    idx = np.searchsorted(edges, s, side="right")
    pos = np.bincount(idx, weights=y, minlength=edges.size + 1)
    tot = np.bincount(idx, minlength=edges.size + 1).astype(np.float64)
    tp = np.cumsum(pos[::-1])[::-1][1:]  # tp[j] = positives with idx >= j + 1
    fp = np.cumsum((tot - pos)[::-1])[::-1][1:]
    fpr = np.concatenate(([0.0], fp[::-1] / n_neg, [1.0]))
    tpr = np.concatenate(([0.0], tp[::-1] / n_pos, [1.0]))
    return fpr, tpr


class _Curve(NamedTuple):
    """One model's line on a unit-square chart: points, legend label, line style."""

    x: Array
    y: Array
    label: str
    style: dict[str, Any]


def _unit_square(
    dataset: EvalDataset,
    colors: Mapping[str, str],
    curve: Callable[[str, Array], _Curve | str | None],
    *,
    key: str,
    what: str,
    title: str,
    empty_title: str,
    caption: str,
    axes: tuple[str, str],
    legend_loc: Literal["lower right", "upper left"],
    diagonal_label: str | None = None,
) -> FigureImage:
    """Every model's curve over a dashed diagonal on [0, 1]^2 (ROC, reliability diagram).

    ``curve`` gives a model's line from its scores, a note on why it is skipped, or None to leave
    it out silently; with no line drawn the figure is only a note.
    """
    fig = _new_figure(5.4, 4.6)
    ax = fig.axes[0]
    ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1, ls="--", label=diagonal_label)
    skipped = []
    drawn = 0
    for name, col in dataset.models.items():
        line = curve(name, col.scores)
        if isinstance(line, str):
            skipped.append(line)
        elif line is not None:
            ax.plot(line.x, line.y, color=colors[name], label=line.label, **line.style)
            drawn += 1
    if not drawn:
        return FigureImage(key, empty_title, "", "",
                           f"{what} not drawn: " + ("; ".join(skipped) or "no data"))
    ax.set(xlabel=axes[0], ylabel=axes[1], xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc=legend_loc, fontsize=8)
    ax.grid(alpha=0.3)
    return FigureImage(key, title, caption, _png(fig),
                       f"{what} skipped for " + "; ".join(skipped) if skipped else None)


def _fig_roc(
    dataset: EvalDataset, rows: np.ndarray, colors: Mapping[str, str], payload: Mapping[str, Any]
) -> FigureImage | None:
    y = dataset.labels[rows]

    def curve(name: str, scores: Array) -> _Curve | str:
        try:
            fpr, tpr = roc_points(y, scores[rows])
        except ValueError as exc:
            return f"{name}: {exc}"
        value = _metric_value(payload, name, "auroc")
        return _Curve(fpr, tpr, f"{name} (AUROC {_num(value, '.3f')})", {"lw": 1.6})

    return _unit_square(
        dataset, colors, curve, key="roc", what="ROC", title="ROC curves",
        empty_title="ROC curves",
        caption=f"All models on the same {_int(int(rows.sum()))} requests, at up to {ROC_POINTS} "
        "thresholds each; AUROC with DeLong CIs is in the metrics table.",
        axes=("false positive rate", "true positive rate"), legend_loc="lower right",
    )


def _fig_calibration(
    dataset: EvalDataset, rows: np.ndarray, colors: Mapping[str, str], payload: Mapping[str, Any]
) -> FigureImage | None:
    y = dataset.labels[rows]

    def curve(name: str, scores: Array) -> _Curve | str | None:
        s = scores[rows]
        if probability_violations(s):
            return f"{name} (scores outside [0, 1])"
        table = calibration_curve(y, s, n_bins=CALIBRATION_BINS, strategy="uniform")
        if table.counts.size == 0:
            return None
        ece = _metric_value(payload, name, "ece")
        return _Curve(table.mean_predicted, table.observed_rate, f"{name} (ECE {_num(ece, '.3f')})",
                      {"marker": "o", "ms": 3.5, "lw": 1.4})

    return _unit_square(
        dataset, colors, curve, key="calibration", what="Calibration",
        title="Calibration (reliability diagram)", empty_title="Calibration",
        caption=f"{CALIBRATION_BINS} equal-width bins, empty bins dropped; on the diagonal a "
        "predicted probability means what it says.",
        axes=("mean predicted probability (bin)", "observed positive rate"),
        legend_loc="upper left", diagonal_label="perfectly calibrated",
    )


def _label_panels(fig: Figure, titles: list[str], xlabel: str, ylabel: str) -> None:
    """A row of per-model panels labelled alike: each its title, the x label and small ticks;
    the y label once, on the first."""
    for ax, title in zip(fig.axes, titles, strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.axes[0].set_ylabel(ylabel, fontsize=8)


def _fig_scores(
    dataset: EvalDataset, rows: np.ndarray, colors: Mapping[str, str], payload: Mapping[str, Any]
) -> FigureImage | None:
    y = dataset.labels[rows]
    k = len(dataset.models)
    fig = _new_figure(min(3.4 * k, 11.0), 3.4, ncols=k)
    all_scores = [col.scores[rows] for col in dataset.models.values()]
    if not any(probability_violations(s) for s in all_scores):
        edges = np.linspace(0.0, 1.0, HIST_BINS + 1)
    else:  # logits or a broken model: the central 99% of what was emitted
        edges = _central_edges(all_scores)
    for ax, name, s in zip(fig.axes, dataset.models, all_scores, strict=True):
        for label, ls, txt in ((1.0, "-", "label 1"), (0.0, "--", "label 0")):
            part = s[(y == label) & np.isfinite(s)]
            if part.size:
                ax.stairs(_hist(part, edges), edges, color=colors[name], ls=ls, lw=1.3, label=txt)
        ax.legend(fontsize=7)
    _label_panels(fig, list(dataset.models), "score", "density")
    return FigureImage(
        "scores",
        "Score distributions",
        "Per model, by label (solid: positives, dashed: negatives); better separation, better "
        "ranking.",
        _png(fig),
    )


def _fig_pred_actual(
    dataset: EvalDataset, rows: np.ndarray, colors: Mapping[str, str], payload: Mapping[str, Any]
) -> FigureImage | None:
    idx = np.flatnonzero(rows & np.isfinite(dataset.labels))
    if idx.size == 0:
        return FigureImage("predicted_vs_actual", "Predicted vs actual", "", "",
                           "Predicted vs actual not drawn: no finite targets")
    if idx.size > SCATTER_POINTS:
        idx = np.sort(np.random.default_rng(0).choice(idx, SCATTER_POINTS, replace=False))
    y = dataset.labels[idx]
    k = len(dataset.models)
    fig = _new_figure(min(3.6 * k, 11.0), 3.6, ncols=k)
    lo, hi = np.percentile(y, [0.5, 99.5])
    for ax, (name, col) in zip(fig.axes, dataset.models.items(), strict=True):
        ax.scatter(y, col.scores[idx], s=3, alpha=0.35, color=colors[name], linewidths=0)
        ax.plot([lo, hi], [lo, hi], color="#888888", lw=1, ls="--")
        ax.grid(alpha=0.3)
    titles = [f"{name} (RMSE {_num(_metric_value(payload, name, 'rmse'))})"
              for name in dataset.models]
    _label_panels(fig, titles, "actual", "predicted")
    return FigureImage(
        "predicted_vs_actual",
        "Predicted vs actual",
        f"A random {_int(idx.size)} of the common requests (fixed seed); the dashed line is a "
        "perfect prediction.",
        _png(fig),
    )


def _fig_residuals(
    dataset: EvalDataset, rows: np.ndarray, colors: Mapping[str, str], payload: Mapping[str, Any]
) -> FigureImage | None:
    y = dataset.labels[rows]
    res = {name: col.scores[rows] - y for name, col in dataset.models.items()}
    if not any(np.isfinite(r).any() for r in res.values()):
        return FigureImage("residuals", "Residuals", "", "", "Residuals not drawn: no data")
    edges = _central_edges(list(res.values()))
    fig = _new_figure(6.2, 4.0)
    ax = fig.axes[0]
    for name, r in res.items():
        ax.stairs(_hist(r, edges), edges, color=colors[name], lw=1.4, label=name)
    ax.axvline(0.0, color="#888888", lw=1, ls="--")
    ax.set(xlabel="residual (predicted - actual)", ylabel="density")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return FigureImage(
        "residuals",
        "Residual distributions",
        "Central 99% of residuals per model on the common requests; narrower and centred on 0 "
        "is better.",
        _png(fig),
    )
