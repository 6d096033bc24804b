"""Typed evaluator configuration: `configs/evaluator.yaml` + `UNDERSTUDY_<SECTION>_<KEY>` overrides.

Validated once at start-up so the ingest loop and the report can trust every value; a typo in a
key fails loudly with its location instead of silently using a default.

Sections (see configs/evaluator.yaml for every key with its default):

- `source`: where records come from. `type: file` reads the gateway's segment files under `path`
  (the gateway's `log.path`); `type: kafka` joins consumer group `kafka.group_id` on
  `kafka.inferences_topic` and `kafka.labels_topic`.
- `store`: the embedded store (`path`, `engine`), the `join_window` an orphan label waits for its
  inference, and the `duplicate_labels` policy. The only policy is `last_wins`: of several labels
  for one prediction the one the gateway received last (`received_ts`; ties go to the one read
  last) is used, and every extra one is counted in `JoinStats.duplicate_labels`. Corrections
  ("that was not fraud after all") are the common cause of a second label, hence last, not first.
- `routes`: optional per-route settings (`task`, `threshold`, `score_output`, and `decision`
  overrides, e.g. `primary_metric: rmse` for a regression route).
- `features`: optional names for the columns of multi-element input tensors (for drift).
- `decision`: a plain mapping handed to the decision policy (`primary_metric`, `alpha`,
  `margin`, `min_samples`, `min_effect`, `max_latency_p99_ratio`, `max_error_rate_delta`,
  `max_latency_p99_margin_ms`, `health_alpha`, `sequential`, and `max_report_age`, the
  duration after which `promote` refuses a report); known keys are type-checked here (durations
  become seconds), extra keys pass through untouched.
- `report`: default output directory and display window (the verdict's data is every row of
  each challenger's current experiment; the window only matters for records without experiment
  ids). `gateway`: the admin API `promote` reads (`read_token_env`) and calls (`token_env`).
- `drift`: `python -m evaluator drift` (evaluator/drift/): reference and live windows, PSI
  bins/epsilon and the 0.1/0.2 conventions, test levels, the drifted-feature share that makes a
  dataset verdict, day-of-week / hour-of-day reference segments with adaptive thresholds, and
  where results go (Pushgateway, webhook, metrics port). `UNDERSTUDY_DRIFT_WEBHOOK_URL` and
  `UNDERSTUDY_DRIFT_PUSHGATEWAY` set the URLs; the webhook's bearer token is read from the
  variable named by `drift.webhook_token_env`, never from YAML.

Environment overrides: `UNDERSTUDY_STORE_JOIN_WINDOW=7d` sets store.join_window,
`UNDERSTUDY_SOURCE_KAFKA_BOOTSTRAP=h:9092` sets source.kafka.bootstrap (nested keys continue
with `_`). Values are parsed as YAML scalars so numbers and booleans keep their types. Variables
whose section the evaluator does not have (e.g. the gateway's `UNDERSTUDY_LOG_PATH` or the admin
token `UNDERSTUDY_ADMIN_TOKEN`) are ignored, so both programs can share one environment. `routes`
and `features` are structured and only set from YAML.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from gateway.config import field_default

ENV_PREFIX = "UNDERSTUDY_"
DEFAULT_CONFIG_PATH = "configs/evaluator.yaml"

SourceType = Literal["file", "kafka"]
Engine = Literal["duckdb", "sqlite"]
TaskSetting = Literal["auto", "classification", "regression"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


class ConfigError(ValueError):
    """An invalid evaluator configuration; the message names the offending key."""


def parse_duration(value: Any, where: str = "duration") -> float:
    """'14d', '12h', '30m', '45s', '250ms', '1w' or a number of seconds -> seconds (> 0)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a duration like 14d, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ConfigError(f"{where}: expected a duration like 14d, 12h, 30m or 45s, "
                              f"got {value!r}")
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{where}: must be a positive duration, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """The inverse of parse_duration for whole units (14d, 36h, 90s) — for messages and reports."""
    for unit in ("w", "d", "h", "m", "s"):
        size = _UNITS[unit]
        if seconds >= size and float(seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{seconds:g}s"


def _duration_field(default: str) -> Any:
    return field(default=parse_duration(default), metadata={"duration": True})


@dataclass(frozen=True)
class KafkaSourceConfig:
    bootstrap: str = "127.0.0.1:9092"
    inferences_topic: str = "understudy.inferences"
    labels_topic: str = "understudy.labels"
    group_id: str = "understudy-evaluator"
    client_id: str = "understudy-evaluator"
    # How long `run --once` waits for the group to hand it partitions before giving up.
    assignment_timeout_s: float = 30.0


@dataclass(frozen=True)
class SourceConfig:
    type: SourceType = "file"
    path: str = "./var/log"  # the gateway's log.path (file source)
    batch_records: int = 20_000  # records per store transaction
    poll_interval_s: float = 1.0  # idle wait between polls once caught up
    progress_interval_s: float = 10.0  # progress line cadence on long runs
    kafka: KafkaSourceConfig = field(default_factory=KafkaSourceConfig)


@dataclass(frozen=True)
class StoreConfig:
    path: str = "./var/evaluator/store.duckdb"
    engine: Engine = "duckdb"  # chosen by loadtests/bench_store.py; see docs/BENCHMARKS.md
    join_window: float = _duration_field("14d")  # seconds an orphan label waits
    duplicate_labels: Literal["last_wins"] = "last_wins"
    score_output: str | None = None  # output tensor holding the score; None = the first one
    lock_timeout_s: float = 60.0  # a reader waits this long for the ingest loop's file lock
    expire_interval_s: float = 60.0  # how often the loop expires old orphan labels
    release_interval_s: float = 10.0  # a busy ingest loop lets go of a DuckDB file this often


@dataclass(frozen=True)
class RouteEvalConfig:
    task: TaskSetting = "auto"  # auto: classification when every label is 0 or 1
    threshold: float = 0.5  # score >= threshold is the positive class
    score_output: str | None = None  # overrides store.score_output for this route
    # the decision mapping for this route: the global `decision:` with this route's overrides
    # (e.g. a regression route's primary_metric: rmse); empty = the global one
    decision: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportConfig:
    out: str = "./var/reports"
    window: float = _duration_field("7d")


@dataclass(frozen=True)
class GatewayAdminConfig:
    url: str = "http://127.0.0.1:8080"
    token_env: str = "UNDERSTUDY_ADMIN_TOKEN"  # noqa: S105 - a variable name, not a secret
    # promote --dry-run reads the live route with this one when the write token is not set
    read_token_env: str = "UNDERSTUDY_ADMIN_READ_TOKEN"  # noqa: S105 - a variable name
    timeout_s: float = 10.0


Seasonality = Literal["none", "hour_of_day", "day_of_week", "day_of_week_hour",
                      "weekday_weekend"]
SEASONALITIES: tuple[str, ...] = ("none", "hour_of_day", "day_of_week", "day_of_week_hour",
                                  "weekday_weekend")


@dataclass(frozen=True)
class DriftConfig:
    """`drift:` — see configs/evaluator.yaml for what each key means and evaluator/drift/."""

    reference: str | None = None  # training snapshot (CSV/JSONL/Parquet); None = past log window
    reference_window: float = _duration_field("7d")  # past log window ending where live starts
    window: float = _duration_field("1d")  # live window, ending at the route's newest inference
    bins: int = 10  # PSI bins (reference quantiles)
    epsilon: float = 1e-4  # share used for a PSI bin that is empty on one side
    psi_warn: float = 0.1  # PSI conventions: < 0.1 negligible, 0.1-0.2 investigate,
    psi_alert: float = 0.2  # > 0.2 significant
    ks_alpha: float = 0.01  # a numeric feature drifts only if KS p < ks_alpha as well
    chi2_alpha: float = 0.01  # a categorical feature drifts only if chi-squared p < chi2_alpha
    js_alert: float = 0.1  # Jensen-Shannon distance (base 2) for a categorical feature
    unseen_alert: float = 0.01  # share of live rows in categories the reference never saw
    missing_alert: float = 0.05  # change in the share of missing values that counts as drift
    drift_share: float = 0.3  # dataset drift when this share of the features drifts
    min_samples: int = 100  # fewer rows on either side: the feature is `insufficient`
    max_categories: int = 50  # rarer categories are merged into "(other)"
    categorical: tuple[str, ...] = ()  # features treated as categorical even if numeric
    seasonality: Seasonality = "none"
    utc_offset_hours: float = 0.0  # local time of the segments (day boundaries)
    adaptive: bool = True  # thresholds from the variation between past reference windows
    adaptive_sigma: float = 3.0  # threshold = max(fixed, mean + sigma * sd of that variation)
    adaptive_min_periods: int = 3  # fewer past windows: the fixed threshold is used
    confidence_buckets: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
    out: str = "./var/drift"
    pushgateway: str | None = None  # Prometheus Pushgateway URL for batch runs
    push_job: str = "understudy_drift"
    metrics_port: int = 0  # > 0: `drift --serve` exposes /metrics here
    webhook_url: str | None = None  # set it with UNDERSTUDY_DRIFT_WEBHOOK_URL
    webhook_token_env: str = "UNDERSTUDY_WEBHOOK_TOKEN"  # noqa: S105 - a variable name
    webhook_retries: int = 4
    webhook_backoff_s: float = 0.5
    webhook_timeout_s: float = 5.0
    episode_clear_runs: int = 2  # quiet runs in a row that end a drift episode
    state_path: str = "./var/evaluator/drift_state.json"


DECISION_DEFAULTS: dict[str, Any] = {
    "primary_metric": "auroc",
    "alpha": 0.05,
    "margin": 0.0,
    "min_samples": 1000,
    "min_effect": 0.01,
    "max_latency_p99_ratio": 1.5,
    "max_error_rate_delta": 0.01,
    "max_latency_p99_margin_ms": 2.0,
    "health_alpha": 0.001,
    "sequential": True,
    "max_report_age": parse_duration("26h"),  # promote refuses older reports
}
_DURATION_DECISION_KEYS = ("max_report_age",)


@dataclass(frozen=True)
class EvaluatorConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    routes: Mapping[str, RouteEvalConfig] = field(default_factory=dict)
    features: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    decision: Mapping[str, Any] = field(default_factory=lambda: dict(DECISION_DEFAULTS))
    report: ReportConfig = field(default_factory=ReportConfig)
    gateway: GatewayAdminConfig = field(default_factory=GatewayAdminConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)

    def route(self, name: str) -> RouteEvalConfig:
        """Per-route settings, defaults when the route is not listed."""
        return self.routes.get(name) or RouteEvalConfig()

    def score_output(self, route: str) -> str | None:
        return self.route(route).score_output or self.store.score_output

    def decision_for(self, route: str) -> dict[str, Any]:
        """The decision mapping for a route (global values with the route's overrides)."""
        return dict(self.route(route).decision or self.decision)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _build(cls: type, raw: Any, where: str, nested: Mapping[str, Any] | None = None) -> Any:
    """Build a flat dataclass from a mapping: unknown keys rejected, numbers and durations coerced.

    `nested` holds already-built values for sub-sections (e.g. source.kafka).
    """
    if raw is None:
        raw = {}
    _check(isinstance(raw, Mapping), f"{where}: expected a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    _check(not unknown, f"{where}: unknown key(s) {', '.join(map(str, unknown))}")
    kwargs: dict[str, Any] = dict(nested or {})
    for name, value in raw.items():
        if name in kwargs:
            continue
        f = known[name]
        default = field_default(f)
        if f.metadata.get("duration"):
            kwargs[name] = parse_duration(value, f"{where}.{name}")
        elif isinstance(default, bool):
            _check(isinstance(value, bool), f"{where}.{name}: expected true/false, got {value!r}")
            kwargs[name] = value
        elif isinstance(default, int | float):
            try:
                kwargs[name] = type(default)(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}.{name}: expected a number, got {value!r}") from None
        elif isinstance(default, str) or default is None:
            _check(value is None or isinstance(value, str | int | float),
                   f"{where}.{name}: expected a string, got {type(value).__name__}")
            kwargs[name] = None if value is None else str(value)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


_OPTIONAL_LIMITS = ("max_latency_p99_ratio", "max_error_rate_delta")


def _parse_decision(raw: Any, prefix: str = "decision") -> dict[str, Any]:
    _check(raw is None or isinstance(raw, Mapping), f"{prefix}: expected a mapping")
    out = dict(DECISION_DEFAULTS)
    for key, value in (raw or {}).items():
        key = str(key)
        default = DECISION_DEFAULTS.get(key)
        where = f"{prefix}.{key}"
        if key in _DURATION_DECISION_KEYS:
            value = parse_duration(value, where)
        elif isinstance(default, bool):
            _check(isinstance(value, bool), f"{where}: expected true/false, got {value!r}")
        elif value is None and key in _OPTIONAL_LIMITS:
            pass  # null switches that guardrail off
        elif isinstance(default, int | float):
            try:
                value = type(default)(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        elif isinstance(default, str):
            _check(isinstance(value, str) and bool(value), f"{where}: expected a string")
        out[key] = value
    _check(0.0 < out["alpha"] < 1.0, f"{prefix}.alpha: must be in (0, 1)")
    _check(out["margin"] >= 0.0, f"{prefix}.margin: must be >= 0 (a non-inferiority margin)")
    _check(out["min_samples"] >= 1, f"{prefix}.min_samples: must be >= 1")
    _check(out["min_effect"] >= 0.0, f"{prefix}.min_effect: must be >= 0")
    ratio, delta = out["max_latency_p99_ratio"], out["max_error_rate_delta"]
    _check(ratio is None or ratio > 0.0, f"{prefix}.max_latency_p99_ratio: must be > 0")
    _check(delta is None or delta >= 0.0, f"{prefix}.max_error_rate_delta: must be >= 0")
    _check(out["max_latency_p99_margin_ms"] >= 0.0,
           f"{prefix}.max_latency_p99_margin_ms: must be >= 0")
    _check(0.0 < out["health_alpha"] < 1.0, f"{prefix}.health_alpha: must be in (0, 1)")
    return out


def _parse_features(raw: Any) -> dict[str, tuple[str, ...]]:
    """`features: {names: {tensor: [col, ...]}}` — names for the columns of an input tensor."""
    _check(raw is None or isinstance(raw, Mapping), "features: expected a mapping")
    raw = dict(raw or {})
    unknown = sorted(set(raw) - {"names"})
    _check(not unknown, f"features: unknown key(s) {', '.join(map(str, unknown))}")
    names = raw.get("names") or {}
    _check(isinstance(names, Mapping), "features.names: expected {tensor: [column names]}")
    out: dict[str, tuple[str, ...]] = {}
    for tensor, cols in names.items():
        where = f"features.names.{tensor}"
        _check(isinstance(cols, list | tuple) and all(isinstance(c, str) for c in cols),
               f"{where}: expected a list of column names")
        _check(len(set(cols)) == len(cols), f"{where}: duplicate column names")
        out[str(tensor)] = tuple(cols)
    return out


def _parse_drift(raw: Mapping[str, Any]) -> DriftConfig:
    """The `drift` section: scalars via _build, then the lists and the ranges."""
    raw = dict(raw)
    lists: dict[str, Any] = {}
    for key in ("categorical", "confidence_buckets"):
        if key in raw:
            value = raw.pop(key)
            value = [] if value is None else value
            _check(isinstance(value, list | tuple), f"drift.{key}: expected a list")
            lists[key] = tuple(value)
    cfg = _build(DriftConfig, raw, "drift")
    cats = lists.get("categorical", cfg.categorical)
    _check(all(isinstance(c, str) for c in cats), "drift.categorical: feature names (strings)")
    buckets = lists.get("confidence_buckets", cfg.confidence_buckets)
    try:
        buckets = tuple(float(b) for b in buckets)
    except (TypeError, ValueError):
        raise ConfigError("drift.confidence_buckets: expected numbers in [0.5, 1)") from None
    _check(bool(buckets) and all(0.5 <= b < 1.0 for b in buckets)
           and list(buckets) == sorted(set(buckets)),
           "drift.confidence_buckets: increasing numbers in [0.5, 1)")
    _check(cfg.bins >= 2, "drift.bins: must be >= 2")
    _check(0.0 < cfg.epsilon < 0.01, "drift.epsilon: must be in (0, 0.01)")
    _check(0.0 <= cfg.psi_warn <= cfg.psi_alert, "drift: need 0 <= psi_warn <= psi_alert")
    for key in ("ks_alpha", "chi2_alpha"):
        _check(0.0 < getattr(cfg, key) < 1.0, f"drift.{key}: must be in (0, 1)")
    _check(0.0 < cfg.js_alert <= 1.0, "drift.js_alert: must be in (0, 1]")
    _check(0.0 < cfg.unseen_alert <= 1.0, "drift.unseen_alert: must be in (0, 1]")
    _check(0.0 < cfg.missing_alert <= 1.0, "drift.missing_alert: must be in (0, 1]")
    _check(0.0 < cfg.drift_share <= 1.0, "drift.drift_share: must be in (0, 1]")
    _check(cfg.min_samples >= 1, "drift.min_samples: must be >= 1")
    _check(cfg.max_categories >= 2, "drift.max_categories: must be >= 2")
    _check(cfg.seasonality in SEASONALITIES,
           f"drift.seasonality: one of {', '.join(SEASONALITIES)}")
    _check(-14.0 <= cfg.utc_offset_hours <= 14.0, "drift.utc_offset_hours: within +-14")
    _check(cfg.adaptive_sigma >= 0.0, "drift.adaptive_sigma: must be >= 0")
    _check(cfg.adaptive_min_periods >= 2, "drift.adaptive_min_periods: must be >= 2")
    _check(cfg.webhook_retries >= 0, "drift.webhook_retries: must be >= 0")
    _check(cfg.webhook_backoff_s >= 0.0, "drift.webhook_backoff_s: must be >= 0")
    _check(cfg.webhook_timeout_s > 0.0, "drift.webhook_timeout_s: must be > 0")
    _check(cfg.episode_clear_runs >= 1, "drift.episode_clear_runs: must be >= 1")
    _check(0 <= cfg.metrics_port <= 65535, "drift.metrics_port: a TCP port (0: off)")
    return replace(cfg, categorical=tuple(cats), confidence_buckets=buckets)


_SECTIONS: dict[str, type] = {
    "source": SourceConfig, "store": StoreConfig, "decision": dict, "report": ReportConfig,
    "gateway": GatewayAdminConfig, "drift": DriftConfig,
}
_NESTED = {("source", "kafka")}


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    """Apply `UNDERSTUDY_<SECTION>_<KEY>` overrides in place (see the module docstring)."""
    for var, value in sorted(env.items()):
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX):].lower()
        section = next((s for s in _SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            continue
        key = rest[len(section) + 1:]
        target = raw.setdefault(section, {})
        for parent, child in _NESTED:
            if parent == section and key.startswith(child + "_"):
                target = target.setdefault(child, {})
                key = key[len(child) + 1:]
        target[key] = yaml.safe_load(value) if value != "" else ""


def parse_config(raw: Mapping[str, Any] | None,
                 env: Mapping[str, str] | None = None) -> EvaluatorConfig:
    """Validate a raw mapping (the parsed YAML) plus environment overrides."""
    data: dict[str, Any] = dict(raw or {})
    allowed = {*_SECTIONS, "routes", "features"}
    unknown = sorted(set(data) - allowed)
    _check(not unknown, f"unknown top-level key(s): {', '.join(map(str, unknown))}")
    for section in _SECTIONS:
        value = data.get(section)
        _check(value is None or isinstance(value, Mapping), f"{section}: expected a mapping")
        data[section] = dict(value or {})
    if isinstance(data["source"].get("kafka"), Mapping):
        data["source"]["kafka"] = dict(data["source"]["kafka"])
    _apply_env(data, os.environ if env is None else env)

    source_raw = dict(data["source"])
    kafka = _build(KafkaSourceConfig, source_raw.pop("kafka", None), "source.kafka")
    source = _build(SourceConfig, source_raw, "source", nested={"kafka": kafka})
    _check(source.type in ("file", "kafka"), "source.type: must be file or kafka")
    _check(source.batch_records > 0, "source.batch_records: must be positive")
    _check(source.poll_interval_s > 0, "source.poll_interval_s: must be positive")
    _check(bool(kafka.group_id), "source.kafka.group_id: required")

    store = _build(StoreConfig, data["store"], "store")
    _check(store.engine in ("duckdb", "sqlite"), "store.engine: must be duckdb or sqlite")
    _check(store.duplicate_labels == "last_wins",
           "store.duplicate_labels: the only policy is last_wins")
    _check(bool(store.path), "store.path: required")

    routes_raw = data.get("routes") or {}
    _check(isinstance(routes_raw, Mapping), "routes: expected {route: {task, threshold, ...}}")
    routes: dict[str, RouteEvalConfig] = {}
    for name, route_raw in routes_raw.items():
        route = _build(RouteEvalConfig, route_raw, f"routes.{name}")
        if route.decision:
            _check(isinstance(route.decision, Mapping), f"routes.{name}.decision: a mapping")
            route = replace(route, decision=_parse_decision(
                {**data["decision"], **route.decision}, f"routes.{name}.decision"))
        _check(route.task in ("auto", "classification", "regression"),
               f"routes.{name}.task: auto|classification|regression")
        _check(math.isfinite(route.threshold), f"routes.{name}.threshold: must be finite")
        routes[str(name)] = route

    return EvaluatorConfig(
        source=source,
        store=store,
        routes=routes,
        features=_parse_features(data.get("features")),
        decision=_parse_decision(data["decision"]),
        report=_build(ReportConfig, data["report"], "report"),
        gateway=_build(GatewayAdminConfig, data["gateway"], "gateway"),
        drift=_parse_drift(data["drift"]),
    )


def load_config(path: str | Path | None = None,
                env: Mapping[str, str] | None = None) -> EvaluatorConfig:
    """Read YAML (when a path is given) and apply environment overrides."""
    raw: Any = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        _check(isinstance(raw, Mapping), f"{path}: top level must be a mapping")
    return parse_config(raw, env)


def with_store_path(config: EvaluatorConfig, path: str) -> EvaluatorConfig:
    """A copy pointing at another store file (command-line `--store`)."""
    return replace(config, store=replace(config.store, path=path))
