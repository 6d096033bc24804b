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
- `spark`: where `report` runs Spark when the landing zone is read with `lake.engine: spark`
  (`master`, default `local[2]`; `lake_url` as Spark names the lake; `driver_memory`; `conf`).
- `drift`: `python -m evaluator drift` (evaluator/drift/): reference and live windows, PSI
  bins/epsilon and the 0.1/0.2 conventions, test levels, the drifted-feature share that makes a
  dataset verdict, day-of-week / hour-of-day reference segments with adaptive thresholds, and
  where results go (Pushgateway, webhook, metrics port). `UNDERSTUDY_DRIFT_WEBHOOK_URL` and
  `UNDERSTUDY_DRIFT_PUSHGATEWAY` set the URLs; the webhook's bearer token is read from the
  variable named by `drift.webhook_token_env`, never from YAML.

Environment overrides (the shared loader, understudy/settings.py):
`UNDERSTUDY_STORE_JOIN_WINDOW=7d` sets store.join_window, `UNDERSTUDY_SOURCE_KAFKA_BOOTSTRAP=h:9092`
sets source.kafka.bootstrap (nested keys continue with `_`). Values are parsed as YAML scalars so
numbers and booleans keep their types. Variables whose section the evaluator does not have (e.g.
the gateway's `UNDERSTUDY_LOG_PATH`) and the variables that are not overrides (the admin token
`UNDERSTUDY_ADMIN_TOKEN`, `UNDERSTUDY_LOG_LEVEL`, ...) are ignored, so both programs can share one
environment. `routes` and `features` are structured and only set from YAML.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from understudy.records import DEFAULT_TOPICS, INFERENCES, LABELS
from understudy.settings import (
    ADMIN_READ_TOKEN_ENV,
    ADMIN_TOKEN_ENV,
    WEBHOOK_TOKEN_ENV,
    apply_env,
    build,
    check,
    duration_field,
    load_yaml,
)

# re-exported: the evaluator's modules and tests know them as evaluator.config's
from understudy.settings import ConfigError as ConfigError
from understudy.settings import format_duration as format_duration
from understudy.settings import parse_duration as parse_duration

DEFAULT_CONFIG_PATH = "configs/evaluator.yaml"

SourceType = Literal["file", "kafka"]
Engine = Literal["duckdb", "sqlite"]
LakeEngine = Literal["duckdb", "spark"]
TaskSetting = Literal["auto", "classification", "regression"]


@dataclass(frozen=True)
class KafkaSourceConfig:
    bootstrap: str = "127.0.0.1:9092"
    inferences_topic: str = DEFAULT_TOPICS[INFERENCES]
    labels_topic: str = DEFAULT_TOPICS[LABELS]
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
    join_window: float = duration_field("14d")  # seconds an orphan label waits
    duplicate_labels: Literal["last_wins"] = "last_wins"
    score_output: str | None = None  # output tensor holding the score; None = the first one
    lock_timeout_s: float = 60.0  # a reader waits this long for the ingest loop's file lock
    expire_interval_s: float = 60.0  # how often the loop expires old orphan labels
    release_interval_s: float = 10.0  # a busy ingest loop lets go of a DuckDB file this often


@dataclass(frozen=True)
class LakeConfig:
    """`lake:` — the partitioned Parquet landing zone (evaluator/lake; docs/LAKE.md).

    With `path` set, `run` writes Parquet there instead of the embedded store and `report`
    reads it with DuckDB; empty keeps the embedded store.
    """

    path: str = ""  # a directory or fsspec URL (s3://bucket/prefix); empty: no lake
    member: str = ""  # this ingest member's name in file names; empty: <hostname>-<pid>
    file_records: int = 100_000  # records buffered per flush (one file per partition)
    flush_interval_s: float = 60.0  # ... or flush this often, whichever comes first
    compact_small_mb: float = 64.0  # `lake compact` merges files smaller than this
    compact_min_files: int = 4  # ... in a partition that has at least this many
    retention: float | None = None  # `lake expire` drops date partitions older than this
    memory_limit: str = ""  # DuckDB's memory_limit for reports (e.g. 4GB); empty: its default
    threads: int = 0  # DuckDB threads for reports; 0: one per core
    engine: LakeEngine = "duckdb"  # what `report` reads it with: duckdb | spark (`spark:`)


@dataclass(frozen=True)
class SparkConfig:
    """`spark:` — where `lake.engine: spark` (or `report --engine spark`) runs its jobs
    (evaluator/lake/spark_engine.py; docs/LAKE.md "Spark").

    The report process is Spark's driver: with `local[N]` it also runs the jobs (N threads);
    with a cluster master it sends them to executors and receives only the joined rows.
    """

    master: str = "local[2]"  # local[N] | spark://host:7077 | k8s://https://<api server> | yarn
    lake_url: str = ""  # the lake root as Spark's filesystem names it (s3a://b/p for s3://b/p)
    driver_memory: str = "4g"  # the driver JVM's heap (holds the joined rows it collects)
    conf: Mapping[str, Any] = field(default_factory=dict)  # any further spark.* settings


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
    window: float = duration_field("7d")


@dataclass(frozen=True)
class GatewayAdminConfig:
    url: str = "http://127.0.0.1:8080"
    token_env: str = ADMIN_TOKEN_ENV
    # promote --dry-run reads the live route with this one when the write token is not set
    read_token_env: str = ADMIN_READ_TOKEN_ENV
    timeout_s: float = 10.0


Seasonality = Literal["none", "hour_of_day", "day_of_week", "day_of_week_hour",
                      "weekday_weekend"]
SEASONALITIES: tuple[str, ...] = ("none", "hour_of_day", "day_of_week", "day_of_week_hour",
                                  "weekday_weekend")


@dataclass(frozen=True)
class DriftConfig:
    """`drift:` — see configs/evaluator.yaml for what each key means and evaluator/drift/."""

    reference: str | None = None  # training snapshot (CSV/JSONL/Parquet); None = past log window
    reference_window: float = duration_field("7d")  # past log window ending where live starts
    window: float = duration_field("1d")  # live window, ending at the route's newest inference
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
    webhook_token_env: str = WEBHOOK_TOKEN_ENV
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
    lake: LakeConfig = field(default_factory=LakeConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)

    def route(self, name: str) -> RouteEvalConfig:
        """Per-route settings, defaults when the route is not listed."""
        return self.routes.get(name) or RouteEvalConfig()

    def score_output(self, route: str) -> str | None:
        return self.route(route).score_output or self.store.score_output

    def decision_for(self, route: str) -> dict[str, Any]:
        """The decision mapping for a route (global values with the route's overrides)."""
        return dict(self.route(route).decision or self.decision)


_OPTIONAL_LIMITS = ("max_latency_p99_ratio", "max_error_rate_delta")


def _parse_decision(raw: Any, prefix: str = "decision") -> dict[str, Any]:
    check(raw is None or isinstance(raw, Mapping), f"{prefix}: expected a mapping")
    out = dict(DECISION_DEFAULTS)
    for key, value in (raw or {}).items():
        key = str(key)
        default = DECISION_DEFAULTS.get(key)
        where = f"{prefix}.{key}"
        if key in _DURATION_DECISION_KEYS:
            value = parse_duration(value, where)
        elif isinstance(default, bool):
            check(isinstance(value, bool), f"{where}: expected true/false, got {value!r}")
        elif value is None and key in _OPTIONAL_LIMITS:
            pass  # null switches that guardrail off
        elif isinstance(default, int | float):
            try:
                value = type(default)(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        elif isinstance(default, str):
            check(isinstance(value, str) and bool(value), f"{where}: expected a string")
        out[key] = value
    check(0.0 < out["alpha"] < 1.0, f"{prefix}.alpha: must be in (0, 1)")
    check(out["margin"] >= 0.0, f"{prefix}.margin: must be >= 0 (a non-inferiority margin)")
    check(out["min_samples"] >= 1, f"{prefix}.min_samples: must be >= 1")
    check(out["min_effect"] >= 0.0, f"{prefix}.min_effect: must be >= 0")
    ratio, delta = out["max_latency_p99_ratio"], out["max_error_rate_delta"]
    check(ratio is None or ratio > 0.0, f"{prefix}.max_latency_p99_ratio: must be > 0")
    check(delta is None or delta >= 0.0, f"{prefix}.max_error_rate_delta: must be >= 0")
    check(out["max_latency_p99_margin_ms"] >= 0.0,
          f"{prefix}.max_latency_p99_margin_ms: must be >= 0")
    check(0.0 < out["health_alpha"] < 1.0, f"{prefix}.health_alpha: must be in (0, 1)")
    return out


def _parse_features(raw: Any) -> dict[str, tuple[str, ...]]:
    """`features: {names: {tensor: [col, ...]}}` — names for the columns of an input tensor."""
    check(raw is None or isinstance(raw, Mapping), "features: expected a mapping")
    raw = dict(raw or {})
    unknown = sorted(set(raw) - {"names"})
    check(not unknown, f"features: unknown key(s) {', '.join(map(str, unknown))}")
    names = raw.get("names") or {}
    check(isinstance(names, Mapping), "features.names: expected {tensor: [column names]}")
    out: dict[str, tuple[str, ...]] = {}
    for tensor, cols in names.items():
        where = f"features.names.{tensor}"
        check(isinstance(cols, list | tuple) and all(isinstance(c, str) for c in cols),
              f"{where}: expected a list of column names")
        check(len(set(cols)) == len(cols), f"{where}: duplicate column names")
        out[str(tensor)] = tuple(cols)
    return out


def _parse_drift(raw: Mapping[str, Any]) -> DriftConfig:
    """The `drift` section: scalars via build, then the lists and the ranges."""
    raw = dict(raw)
    lists: dict[str, Any] = {}
    for key in ("categorical", "confidence_buckets"):
        if key in raw:
            value = raw.pop(key)
            value = [] if value is None else value
            check(isinstance(value, list | tuple), f"drift.{key}: expected a list")
            lists[key] = tuple(value)
    cfg = build(DriftConfig, raw, "drift")
    cats = lists.get("categorical", cfg.categorical)
    check(all(isinstance(c, str) for c in cats), "drift.categorical: feature names (strings)")
    buckets = lists.get("confidence_buckets", cfg.confidence_buckets)
    try:
        buckets = tuple(float(b) for b in buckets)
    except (TypeError, ValueError):
        raise ConfigError("drift.confidence_buckets: expected numbers in [0.5, 1)") from None
    check(bool(buckets) and all(0.5 <= b < 1.0 for b in buckets)
          and list(buckets) == sorted(set(buckets)),
          "drift.confidence_buckets: increasing numbers in [0.5, 1)")
    check(cfg.bins >= 2, "drift.bins: must be >= 2")
    check(0.0 < cfg.epsilon < 0.01, "drift.epsilon: must be in (0, 0.01)")
    check(0.0 <= cfg.psi_warn <= cfg.psi_alert, "drift: need 0 <= psi_warn <= psi_alert")
    for key in ("ks_alpha", "chi2_alpha"):
        check(0.0 < getattr(cfg, key) < 1.0, f"drift.{key}: must be in (0, 1)")
    check(0.0 < cfg.js_alert <= 1.0, "drift.js_alert: must be in (0, 1]")
    check(0.0 < cfg.unseen_alert <= 1.0, "drift.unseen_alert: must be in (0, 1]")
    check(0.0 < cfg.missing_alert <= 1.0, "drift.missing_alert: must be in (0, 1]")
    check(0.0 < cfg.drift_share <= 1.0, "drift.drift_share: must be in (0, 1]")
    check(cfg.min_samples >= 1, "drift.min_samples: must be >= 1")
    check(cfg.max_categories >= 2, "drift.max_categories: must be >= 2")
    check(cfg.seasonality in SEASONALITIES,
          f"drift.seasonality: one of {', '.join(SEASONALITIES)}")
    check(-14.0 <= cfg.utc_offset_hours <= 14.0, "drift.utc_offset_hours: within +-14")
    check(cfg.adaptive_sigma >= 0.0, "drift.adaptive_sigma: must be >= 0")
    check(cfg.adaptive_min_periods >= 2, "drift.adaptive_min_periods: must be >= 2")
    check(cfg.webhook_retries >= 0, "drift.webhook_retries: must be >= 0")
    check(cfg.webhook_backoff_s >= 0.0, "drift.webhook_backoff_s: must be >= 0")
    check(cfg.webhook_timeout_s > 0.0, "drift.webhook_timeout_s: must be > 0")
    check(cfg.episode_clear_runs >= 1, "drift.episode_clear_runs: must be >= 1")
    check(0 <= cfg.metrics_port <= 65535, "drift.metrics_port: a TCP port (0: off)")
    return replace(cfg, categorical=tuple(cats), confidence_buckets=buckets)


_SECTIONS: dict[str, type] = {
    "source": SourceConfig, "store": StoreConfig, "decision": dict, "report": ReportConfig,
    "gateway": GatewayAdminConfig, "drift": DriftConfig, "lake": LakeConfig,
    "spark": SparkConfig,
}
def parse_config(raw: Mapping[str, Any] | None,
                 env: Mapping[str, str] | None = None) -> EvaluatorConfig:
    """Validate a raw mapping (the parsed YAML) plus environment overrides."""
    data: dict[str, Any] = dict(raw or {})
    allowed = {*_SECTIONS, "routes", "features"}
    unknown = sorted(set(data) - allowed)
    check(not unknown, f"unknown top-level key(s): {', '.join(map(str, unknown))}")
    for section in _SECTIONS:
        value = data.get(section)
        check(value is None or isinstance(value, Mapping), f"{section}: expected a mapping")
        data[section] = dict(value or {})
    if isinstance(data["source"].get("kafka"), Mapping):
        data["source"]["kafka"] = dict(data["source"]["kafka"])
    apply_env(data, _SECTIONS, env)

    source_raw = dict(data["source"])
    kafka = build(KafkaSourceConfig, source_raw.pop("kafka", None), "source.kafka")
    source = build(SourceConfig, source_raw, "source", nested={"kafka": kafka})
    check(source.type in ("file", "kafka"), "source.type: must be file or kafka")
    check(source.batch_records > 0, "source.batch_records: must be positive")
    check(source.poll_interval_s > 0, "source.poll_interval_s: must be positive")
    check(bool(kafka.group_id), "source.kafka.group_id: required")

    store = build(StoreConfig, data["store"], "store")
    check(store.engine in ("duckdb", "sqlite"), "store.engine: must be duckdb or sqlite")
    check(store.duplicate_labels == "last_wins",
          "store.duplicate_labels: the only policy is last_wins")
    check(bool(store.path), "store.path: required")

    routes_raw = data.get("routes") or {}
    check(isinstance(routes_raw, Mapping), "routes: expected {route: {task, threshold, ...}}")
    routes: dict[str, RouteEvalConfig] = {}
    for name, route_raw in routes_raw.items():
        route = build(RouteEvalConfig, route_raw, f"routes.{name}")
        if route.decision:
            check(isinstance(route.decision, Mapping), f"routes.{name}.decision: a mapping")
            route = replace(route, decision=_parse_decision(
                {**data["decision"], **route.decision}, f"routes.{name}.decision"))
        check(route.task in ("auto", "classification", "regression"),
              f"routes.{name}.task: auto|classification|regression")
        check(math.isfinite(route.threshold), f"routes.{name}.threshold: must be finite")
        routes[str(name)] = route

    lake = build(LakeConfig, data["lake"], "lake")
    check(lake.file_records > 0, "lake.file_records: must be positive")
    check(lake.flush_interval_s > 0, "lake.flush_interval_s: must be positive")
    check(lake.compact_min_files >= 2, "lake.compact_min_files: at least 2")
    check(lake.engine in ("duckdb", "spark"), "lake.engine: must be duckdb or spark")
    spark = build(SparkConfig, data["spark"], "spark")
    check(bool(spark.master), "spark.master: required (e.g. local[2])")
    check(isinstance(spark.conf, Mapping) and all(
        isinstance(v, str | int | float | bool) for v in spark.conf.values()),
          "spark.conf: expected a mapping of Spark settings to scalars")
    if lake.retention is not None:
        lake = replace(lake, retention=parse_duration(lake.retention, "lake.retention"))

    return EvaluatorConfig(
        lake=lake,
        spark=spark,
        source=source,
        store=store,
        routes=routes,
        features=_parse_features(data.get("features")),
        decision=_parse_decision(data["decision"]),
        report=build(ReportConfig, data["report"], "report"),
        gateway=build(GatewayAdminConfig, data["gateway"], "gateway"),
        drift=_parse_drift(data["drift"]),
    )


def load_config(path: str | Path | None = None,
                env: Mapping[str, str] | None = None) -> EvaluatorConfig:
    """Read YAML (when a path is given) and apply environment overrides."""
    return parse_config(load_yaml(path) if path is not None else {}, env)


def with_store_path(config: EvaluatorConfig, path: str) -> EvaluatorConfig:
    """A copy pointing at another store file (command-line `--store`)."""
    return replace(config, store=replace(config.store, path=path))
