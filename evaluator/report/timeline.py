"""Plots over time: the sequential test's path and the arm shares."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from evaluator.dataset import EvalDataset
from evaluator.report.document import FigureImage
from evaluator.report.format import CORRECTION_LABELS, _p
from evaluator.report.plotting import TIME_BINS, _new_figure, _png


def _path_array(values: Sequence[Any] | None) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values or []], dtype=np.float64)


def look_limits(xs: np.ndarray, use_time: bool) -> tuple[float, float] | None:
    """x-axis limits around the sequential test's looks: 5% padding, at least an hour (or one
    request) each side. Explicit because matplotlib gives a single look (a first report) a
    multi-year date axis."""
    xs = xs[np.isfinite(xs)]
    if not xs.size:
        return None
    lo, hi = float(xs.min()), float(xs.max())
    pad = max((hi - lo) * 0.05, 3600.0 if use_time else 1.0)
    return lo - pad, hi + pad


def _fig_sequential(
    dataset: EvalDataset, rows: np.ndarray, colors: Mapping[str, str], payload: Mapping[str, Any]
) -> FigureImage | None:
    """log Lambda (the mSPRT likelihood ratio) per look against log(1/alpha): the always-valid
    p-value is min(1, 1 / max Lambda), so crossing the line is exactly p <= alpha. The right
    panel is the confidence sequence of the improvement, which must leave 0 for the same call."""
    seqs = [(d["challenger"], d["sequential"]) for d in payload["decisions"] if d.get("sequential")]
    if not seqs:
        return None
    use_time = all(
        len(ts) > 0 and bool(np.isfinite(ts).all())
        for ts in (_path_array(s["path"].get("ts")) for _, s in seqs)
    )
    fig = _new_figure(11.0, 3.9, ncols=2, dates=use_time)
    ax_lr, ax_cs = fig.axes
    # The family's alpha: each challenger's own "alpha" is already its corrected (Holm) level,
    # and the lines below apply the correction themselves.
    alpha = float(seqs[0][1].get("family_alpha") or payload["alpha"])
    xs = np.concatenate([_path_array(s["path"].get("ts" if use_time else "n")) for _, s in seqs])
    for name, s in seqs:
        path = s["path"]
        x = (_path_array(path.get("ts")) * 1e6).astype("datetime64[us]") if use_time else \
            _path_array(path.get("n"))
        log_lr = _path_array(path.get("log_lr"))
        color = colors.get(name, "#1f77b4")
        ax_lr.plot(x, log_lr, marker="o", ms=3, lw=1.5, color=color,
                   label=f"{name} (p = {_p(s.get('p_value'))})")
        est = _path_array(path.get("estimate"))
        ax_cs.plot(x, est, marker="o", ms=3, lw=1.5, color=color, label=name)
        cs_low, cs_high = _path_array(path.get("cs_low")), _path_array(path.get("cs_high"))
        ax_cs.fill_between(x, cs_low, cs_high, color=color, alpha=0.15, lw=0)
        if len(x) == 1:  # a band needs two looks: one look shows its interval as a bar
            ax_cs.vlines(x, cs_low, cs_high, color=color, alpha=0.5, lw=6)
    boundary = math.log(1.0 / alpha)
    ax_lr.axhline(boundary, color="#c5221f", lw=1.2, ls="--",
                  label=f"log(1/alpha) = {boundary:.2f}")
    n_ch = len(payload["decisions"])
    corr = (payload["decisions"][0].get("policy") or {}).get("correction", "none")
    if n_ch > 1 and corr != "none":
        ax_lr.axhline(math.log(n_ch / alpha), color="#c5221f", lw=1, ls=":",
                      label=f"log({n_ch}/alpha): first {CORRECTION_LABELS.get(corr, corr)} step")
    if ax_lr.get_ylim()[1] > 50:  # a clear winner dwarfs the boundary on a linear axis
        ax_lr.set_yscale("symlog", linthresh=10.0)
    # Looks are in label-arrival order (inference time only for records without label_ts).
    ax_lr.set(ylabel="log likelihood ratio",
              xlabel="label arrival time (UTC)" if use_time else "paired requests")
    ax_lr.legend(fontsize=7)
    ax_lr.grid(alpha=0.3)
    ax_cs.axhline(0.0, color="#888888", lw=1, ls="--")
    ax_cs.set(ylabel="improvement (+: challenger better)",
              xlabel="label arrival time (UTC)" if use_time else "paired requests")
    ax_cs.legend(fontsize=7)
    ax_cs.grid(alpha=0.3)
    limits = look_limits(xs, use_time)
    if limits is not None:
        lo, hi = limits
        for ax in (ax_lr, ax_cs):
            if use_time:
                ax.set_xlim(np.datetime64(int(lo * 1e6), "us"), np.datetime64(int(hi * 1e6), "us"))
            else:
                ax.set_xlim(lo, hi)
    if use_time:
        from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

        for ax in (ax_lr, ax_cs):
            locator = AutoDateLocator(maxticks=8)
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
            ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    return FigureImage(
        "sequential",
        "Sequential test over time",
        "Left: the always-valid test's log likelihood ratio at each look; reaching the red line "
        "means always-valid p <= alpha (before the correction across challengers). Right: the "
        "improvement estimate with its always-valid confidence sequence.",
        _png(fig),
    )


def _fig_arm_shares(
    dataset: EvalDataset, rows: np.ndarray, colors: Mapping[str, str], payload: Mapping[str, Any]
) -> FigureImage | None:
    ts = np.asarray(dataset.ts, dtype=np.float64)
    ok = np.isfinite(ts)
    if not ok.any():
        return None
    arms = list(payload["exploration"]["arm_shares"])
    served = np.asarray(dataset.served, dtype=object)[ok]
    code = np.full(served.size, len(arms), dtype=np.int64)
    for k, arm in enumerate(arms):
        code[served == arm] = k
    t = ts[ok]
    lo, hi = float(t.min()), float(t.max())
    nb = TIME_BINS if hi > lo else 1
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, nb + 1)
    b = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, nb - 1)
    k_all = len(arms) + 1
    counts = np.bincount(b * k_all + code, minlength=nb * k_all).reshape(nb, k_all)[:, :-1]
    totals = counts.sum(axis=1, keepdims=True)
    keep = totals[:, 0] > 0
    shares = counts[keep] / totals[keep]
    # Stacked bars, one per bin with traffic: an idle gap stays empty instead of being bridged
    # by a line interpolated across it.
    left = (edges[:-1][keep] * 1e6).astype("datetime64[us]")
    width = np.timedelta64(max(int((edges[1] - edges[0]) * 1e6), 1), "us")
    fig = _new_figure(7.5, 3.6, dates=True)
    ax = fig.axes[0]
    bottom = np.zeros(int(keep.sum()))
    for k, arm in enumerate(arms):
        ax.bar(left, shares[:, k], width=width, bottom=bottom, align="edge", label=arm,
               color=colors.get(arm, "#999999"), alpha=0.85, linewidth=0)
        bottom = bottom + shares[:, k]
    ax.set_xlim(np.datetime64(int(edges[0] * 1e6), "us"),
                np.datetime64(int(edges[-1] * 1e6), "us"))
    ax.set(ylabel="share of requests served", xlabel="inference time (UTC)", ylim=(0, 1))
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    locator = AutoDateLocator(maxticks=8)  # no "58:08.000000" ticks on a short span
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    ax.legend(fontsize=8, loc="upper right")
    idle = int(nb - keep.sum())
    return FigureImage(
        "arm_shares",
        "Arm shares over time",
        f"Share of requests each arm served, in {nb} equal time bins"
        + (f"; {idle} bins without traffic are left empty." if idle else "."),
        _png(fig),
    )
