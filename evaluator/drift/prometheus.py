"""Drift gauges in the evaluator's own Prometheus registry (scrape or Pushgateway)."""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Mapping
from typing import Any

from evaluator.drift.result import DriftResult


class DriftMetrics:
    """Drift gauges in the evaluator's own registry (never the gateway's default one).

    Label sets a route no longer has (a feature that went away) are removed on update, so a
    dashboard does not show yesterday's value as today's.
    """

    def __init__(self, registry: Any | None = None) -> None:
        from prometheus_client import CollectorRegistry, Gauge

        self.registry = registry if registry is not None else CollectorRegistry()
        rf, rm = ["route", "feature"], ["route", "model"]

        def g(name: str, doc: str, labels: list[str]) -> Any:
            return Gauge(name, doc, labels, registry=self.registry)

        self.psi = g("understudy_drift_psi", "PSI of a feature, live vs reference", rf)
        self.psi_threshold = g("understudy_drift_threshold",
                               "Drift threshold in force for a feature (PSI or JS)", rf)
        self.ks_pvalue = g("understudy_drift_ks_pvalue", "KS test p-value of a feature", rf)
        self.ks_statistic = g("understudy_drift_ks_statistic", "KS statistic of a feature", rf)
        self.wasserstein = g("understudy_drift_wasserstein",
                             "Wasserstein distance of a feature in reference SDs", rf)
        self.js = g("understudy_drift_js_distance",
                    "Jensen-Shannon distance (base 2) of a categorical feature", rf)
        self.chi2_pvalue = g("understudy_drift_chi2_pvalue",
                             "Chi-squared p-value of a categorical feature", rf)
        self.unseen = g("understudy_drift_unseen_share",
                        "Share of live rows in categories unseen in the reference", rf)
        self.drifted = g("understudy_drift_feature_drifted", "1 when a feature drifts", rf)
        self.rule = g("understudy_drift_feature_rule",
                      "1 when this rule flags the feature (distribution, unseen, missing, "
                      "absent), else 0: why a feature was or was not flagged",
                      ["route", "feature", "rule"])
        self.min_shift = g("understudy_drift_min_detectable_shift_sd",
                           "Smallest mean shift (reference SDs) the feature's rule flags about "
                           "half the time at the current n", rf)
        self.missing = g("understudy_drift_missing_share",
                         "Share of rows with a missing or non-finite value",
                         ["route", "feature", "window"])
        self.unseen_threshold = g("understudy_drift_unseen_threshold",
                                  "Unseen-category share from which a feature is flagged (the "
                                  "reference's own rate of new values plus its margin)", rf)
        self.share = g("understudy_drift_share", "Share of features that drift", ["route"])
        self.dataset_share = g("understudy_drift_dataset_share",
                               "Share of features the dataset rule counts (drifted, or "
                               "BH-significant above the lower dataset floor)", ["route"])
        self.dataset_counted = g("understudy_drift_dataset_counted",
                                 "1 when the dataset rule counts the feature", rf)
        self.detected = g("understudy_drift_detected",
                          "1 on dataset drift or prediction drift", ["route"])
        self.live_rows = g("understudy_drift_live_rows", "Rows in the live window", ["route"])
        self.last_run = g("understudy_drift_last_run_timestamp_seconds",
                          "When drift was last computed", ["route"])
        self.pred_psi = g("understudy_prediction_drift_psi", "Score PSI of a model", rm)
        self.pred_ks = g("understudy_prediction_drift_ks_pvalue", "Score KS p-value", rm)
        self.pred_drifted = g("understudy_prediction_drift_detected",
                              "1 when a model's scores drift", rm)
        self.pred_min_shift = g("understudy_prediction_drift_min_detectable_shift_sd",
                                "Smallest score shift (reference SDs) flagged about half the "
                                "time at the current n", rm)
        self.pred_positive = g("understudy_prediction_positive_share",
                               "Predicted-positive share", ["route", "model", "window"])
        self.pred_conf = g("understudy_prediction_confidence_share",
                           "Share of predictions per confidence bucket (live window)",
                           ["route", "model", "bucket"])
        self._labels: dict[str, list[tuple[Any, tuple[str, ...]]]] = {}

    def update(self, result: DriftResult) -> None:
        route = result.route
        for gauge, labels in self._labels.pop(route, []):
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
        used: list[tuple[Any, tuple[str, ...]]] = []

        def put(gauge: Any, labels: tuple[str, ...], value: float | None) -> None:
            if value is None or not math.isfinite(value):
                return
            gauge.labels(*labels).set(value)
            used.append((gauge, labels))

        for f in result.features:
            lab = (route, f.name)
            put(self.psi, lab, f.psi)
            put(self.psi_threshold, lab, f.threshold.value if f.threshold else None)
            put(self.ks_pvalue, lab, f.ks_pvalue)
            put(self.ks_statistic, lab, f.ks_statistic)
            put(self.wasserstein, lab, f.wasserstein_norm)
            put(self.js, lab, f.js_distance)
            put(self.chi2_pvalue, lab, f.chi2_pvalue)
            put(self.unseen, lab, f.unseen_share)
            put(self.drifted, lab, float(f.drifted))
            for rule in ("distribution", "unseen", "missing", "absent"):
                if rule != "unseen" or f.kind == "categorical":
                    put(self.rule, (*lab, rule), float(rule in f.rules))
            put(self.min_shift, lab, f.min_detectable_shift_sd)
            put(self.missing, (*lab, "reference"), f.missing_ref)
            put(self.missing, (*lab, "live"), f.missing_live)
            put(self.unseen_threshold, lab, f.unseen_threshold)
            if f.status != "insufficient":
                put(self.dataset_counted, lab, float(f.dataset_counted))
        for p in result.predictions:
            lab = (route, p.model)
            put(self.pred_psi, lab, p.psi)
            put(self.pred_ks, lab, p.ks_pvalue)
            put(self.pred_drifted, lab, float(p.drifted))
            put(self.pred_min_shift, lab, p.min_detectable_shift_sd)
            put(self.pred_positive, (*lab, "reference"), p.positive_share_ref)
            put(self.pred_positive, (*lab, "live"), p.positive_share_live)
            for b in p.confidence:
                put(self.pred_conf, (*lab, str(b["bucket"])), b["live"])
        put(self.share, (route,), result.share)
        put(self.dataset_share, (route,), result.dataset_share)
        put(self.detected, (route,), float(result.significant))
        put(self.live_rows, (route,), float(result.live.get("n") or 0))
        put(self.last_run, (route,), result.generated_at)
        self._labels[route] = used

    def push(self, url: str, job: str = "understudy_drift",
             grouping_key: Mapping[str, str] | None = None, timeout: float = 10.0) -> None:
        """Push every gauge to a Prometheus Pushgateway (batch runs: CronJob pattern)."""
        from prometheus_client import push_to_gateway

        push_to_gateway(url, job=job, registry=self.registry,
                        grouping_key=dict(grouping_key or {}), timeout=timeout)


_metrics: DriftMetrics | None = None
_metrics_lock = threading.Lock()


def metrics() -> DriftMetrics:
    """The process-wide drift gauges (the evaluator's registry, created on first use)."""
    global _metrics
    with _metrics_lock:
        if _metrics is None:
            _metrics = DriftMetrics()
        return _metrics


def start_metrics_server(port: int, addr: str = "0.0.0.0",  # noqa: S104 - scraped in-cluster
                         registry: Any | None = None) -> tuple[Any, threading.Thread]:
    """Serve /metrics for the evaluator's registry from a daemon thread; returns (server,
    thread) — `server.shutdown(); server.server_close()` stops it. For a long-running process
    (`evaluator run`, `drift --serve`); batch runs push to a Pushgateway instead."""
    from prometheus_client import start_http_server

    return start_http_server(port, addr=addr,
                             registry=registry if registry is not None else metrics().registry)
