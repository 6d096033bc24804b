"""Typed gateway configuration: YAML file + `UNDERSTUDY_<SECTION>_<KEY>` environment overrides.

Everything is validated once at start-up (or when the admin API changes a route) so the request
path can trust it. Dataclasses are frozen: a route change replaces the route object atomically.
Loading, overrides and errors are the shared loader's (understudy/settings.py); the words
(policy types, challenger modes, tasks) are the contract's (understudy/vocabulary.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from gateway.control.plan import RolloutPlan, parse_plan, rollout_problem
from understudy.records import AUDIT, DEFAULT_TOPICS, INFERENCES, LABELS
from understudy.settings import (
    ADMIN_READ_TOKEN_ENV,
    ADMIN_TOKEN_ENV,
    FEEDBACK_TOKEN_ENV,
    apply_env,
    build,
    check,
    load_yaml,
)
from understudy.vocabulary import (
    CHALLENGER_MODES,
    POLICY_TYPES,
    REWARD_SOURCES,
    TASKS,
    ChallengerMode,
    PolicyType,
    RewardSource,
    Task,
)

MIN_LOG_SAMPLE_RATE = 0.01
# Shadow micro-batching (gateway/mirror/batching.py): rows per Triton call, and how long the first
# queued copy may wait for company. Also used for the champion's lane under exploration. 10 ms:
# at moderate rates a window is a loop wake-up and a call shared by its copies, so a longer one
# costs less CPU per request (x0.92 against 2 ms at 700 req/s, BENCHMARKS.md); a copy's record is
# written up to that much later, the client never waits for it, and its latency excludes the wait.
DEFAULT_BATCH_MAX_ROWS = 16
DEFAULT_BATCH_MAX_WAIT_MS = 10.0
# Every Nth copy of a batching lane goes alone, so latency guardrails get samples comparable with
# the champion's single requests (a batched copy's latency is its whole batch's). 10: the
# evaluator's 100 latency samples per challenger arrive within ~1,000 copies, at the price of 10%
# of copies unbatched. (`make demo` turns batching off: every copy is a sample there.)
DEFAULT_LATENCY_PROBE_EVERY = 10
# The most calls one lane may keep in flight: far above any real lane (the default is 4, the
# champion's lane 64), and low enough that raising a live lane's limit stays cheap (its pool
# grows one slot at a time: an admin PATCH of 9e18 used to hang the event loop).
MAX_LANE_CONCURRENCY = 4096
# Triton model names as they may appear in an upstream URL path segment: letters, digits, `_`,
# `-`, `.`, not starting with `.` and without `..` (no `/`, `?`, `#`, whitespace, traversal).
MODEL_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
MODEL_VERSION = re.compile(r"[0-9]{1,19}")
SOURCES_OF_TRUTH: tuple[str, ...] = ("registry", "config")


@dataclass(frozen=True)
class Bound:
    """A numeric field's allowed range, declared once on the field (`bounded`): the parser checks
    it (`check_bounds`) and the admin API's OpenAPI document states it (gateway/rest/openapi.py),
    so a changed bound changes both. `note` is appended to the error message."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    note: str = ""

    def holds(self, value: float) -> bool:
        return (math.isfinite(value)
                and (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        """The error message's rule: 'must be in [0, 1]', 'must be positive', 'must be >= 1'."""
        low = (f"[{self.ge:g}" if self.ge is not None
               else f"({self.gt:g}" if self.gt is not None else None)
        high = (f"{self.le:g}]" if self.le is not None
                else f"{self.lt:g})" if self.lt is not None else None)
        if low is not None and high is not None:
            rule = f"must be in {low}, {high}"
        elif self.gt == 0 and high is None:
            rule = "must be positive"
        else:
            rule = " and ".join(
                f"must be {op} {limit:g}" for op, limit in
                ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                if limit is not None)
        return f"{rule} {self.note}" if self.note else rule


def bounded(default: float, **bound: Any) -> Any:
    """A dataclass field with a `Bound` (keyword arguments as `Bound`'s)."""
    return field(default=default, metadata={"bound": Bound(**bound)})


def field_bound(cls: type, name: str) -> Bound | None:
    """The `Bound` declared on field `name` of dataclass `cls`, if any."""
    bound = next(f for f in fields(cls) if f.name == name).metadata.get("bound")
    return bound if isinstance(bound, Bound) else None


def check_bounds(section: Any, where: str) -> None:
    """Every bounded field of a built dataclass within its `Bound`; ConfigError naming it."""
    for f in fields(section):
        bound = f.metadata.get("bound")
        if isinstance(bound, Bound):
            value = getattr(section, f.name)
            check(bound.holds(value), f"{where}.{f.name}: {bound.describe()}")


@dataclass(frozen=True)
class TritonModelConfig:
    """Where one model lives when it is not on `triton.url` (e.g. a challenger on another GPU)."""

    url: str
    # How the gateway calls this server: "http" (default) or "grpc" (then `grpc_url`, host:port).
    protocol: str = "http"
    grpc_url: str | None = None


UPSTREAM_PROTOCOLS: tuple[str, ...] = ("http", "grpc")


@dataclass(frozen=True)
class TritonConfig:
    url: str = "http://127.0.0.1:8000"
    timeout_ms: int = 1000
    max_connections: int = 256
    # Upstream protocol of the default server: "http" (default; measured in docs/BENCHMARKS.md,
    # "upstream protocol") or "grpc", which sends inference, metadata and health to `grpc_url`.
    protocol: str = "http"
    grpc_url: str | None = None
    # Models served by another Triton, by model name: {name: {url: "http://host:port"}}. Keyed by
    # model, not by route entry, so a model keeps its server through promote and rollback.
    models: Mapping[str, TritonModelConfig] = field(default_factory=dict)

    def model_urls(self) -> dict[str, str]:
        return {name: m.url for name, m in self.models.items()}

    def grpc_target(self) -> str | None:
        """The default server's gRPC host:port when it is called over gRPC, else None."""
        return self.grpc_url if self.protocol == "grpc" else None

    def model_grpc_targets(self) -> dict[str, str]:
        return {name: m.grpc_url for name, m in self.models.items()
                if m.protocol == "grpc" and m.grpc_url}


@dataclass(frozen=True)
class ListenConfig:
    host: str = "0.0.0.0"  # noqa: S104 - a gateway listens on all interfaces by default
    port: int = 8080
    # The KServe V2 / Triton gRPC service (gateway/rpc/server.py); 0 (or null) disables it.
    grpc_port: int = 8081
    # The largest request body (HTTP) or request message (gRPC) accepted.
    max_body_bytes: int = 8 * 1024 * 1024
    # Which HTTP server answers the client port: "lean" serves inference and health from an
    # httptools protocol (gateway/rest/lean_server.py) and hands every other path to aiohttp on
    # the same connection; "aiohttp" serves everything from aiohttp (the former server).
    server: str = "lean"


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap: str = "127.0.0.1:9092"
    topic: str = DEFAULT_TOPICS[INFERENCES]
    labels_topic: str = DEFAULT_TOPICS[LABELS]
    audit_topic: str = DEFAULT_TOPICS[AUDIT]
    registry_topic: str = "understudy.registry"
    rewards_topic: str = "understudy.rewards"
    linger_ms: int = 5
    compression: str = "zstd"
    max_request_bytes: int = 1024 * 1024
    spill_budget_bytes: int = 1024 * 1024 * 1024
    # The log guarantee (gateway/backends/kafka_sink.py): a record not acknowledged by Kafka within
    # this bound is in the fsynced local spill, broker up or not; a SIGKILL loses at most the
    # records accepted in the last max_unspilled_ms.
    max_unspilled_ms: int = 1000
    # Producer timings. request_timeout_ms: aiokafka's per-request timeout and batch expiry;
    # delivery_timeout_ms: how long a flight may go unacknowledged before the sink gives up on
    # the connection and starts a fresh producer (its records are on the spill long before).
    request_timeout_ms: int = 30_000
    delivery_timeout_ms: int = 30_000
    retry_backoff_ms: int = 200
    reconnect_backoff_max_ms: int = 5_000
    metadata_max_age_ms: int = 60_000
    close_timeout_ms: int = 10_000


@dataclass(frozen=True)
class LogConfig:
    sink: Literal["file", "kafka"] = "file"
    path: str = "./var/log"
    segment_bytes: int = 64 * 1024 * 1024
    fsync: Literal["always", "interval", "never"] = "interval"
    fsync_interval_ms: int = 200
    kafka: KafkaConfig = field(default_factory=KafkaConfig)


@dataclass(frozen=True)
class AdminConfig:
    token_env: str = ADMIN_TOKEN_ENV
    read_token_env: str = ADMIN_READ_TOKEN_ENV
    state_path: str = "./var/state/registry.json"
    rewards_path: str = "./var/state/rewards.jsonl"
    # Bearer token for POST /v2/feedback, read from this variable; unset: feedback is open.
    feedback_token_env: str = FEEDBACK_TOKEN_ENV
    # Who wins at start when the YAML's routes differ from the live registry (docs/ADMIN.md).
    source_of_truth: Literal["registry", "config"] = "registry"
    # POSTed a JSON event when a guarded rollout rolls back or completes (docs/ADMIN.md).
    rollout_webhook_url: str | None = None


@dataclass(frozen=True)
class ModelRef:
    model: str
    version: str = ""

    def __str__(self) -> str:
        return f"{self.model}:{self.version}" if self.version else self.model


@dataclass(frozen=True)
class ChallengerConfig:
    model: str
    version: str = ""
    mode: ChallengerMode = "shadow"
    sample_rate: float = bounded(1.0, ge=0.0, le=1.0)
    timeout_ms: int = bounded(1000, gt=0)
    # Calls in flight (a call carries a batch of copies when batching); 4 keeps a slow model's
    # answers from arriving in bursts big enough to delay champion requests (BENCHMARKS.md).
    max_concurrency: int = bounded(4, gt=0, le=MAX_LANE_CONCURRENCY)
    max_queue: int = bounded(64, ge=0)
    batch_max_rows: int = bounded(DEFAULT_BATCH_MAX_ROWS, ge=1, note="(1 disables batching)")
    # Also below timeout_ms (checked by parse_challenger).
    batch_max_wait_ms: float = bounded(DEFAULT_BATCH_MAX_WAIT_MS, ge=0.0)
    # 0: every copy may be batched
    latency_probe_every: int = bounded(DEFAULT_LATENCY_PROBE_EVERY, ge=0, note="(0: off)")

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.model, self.version)


@dataclass(frozen=True)
class PolicyConfig:
    type: PolicyType = "champion"
    epsilon: float = bounded(0.1, ge=0.0, le=1.0)
    prior_alpha: float = bounded(1.0, gt=0.0)
    prior_beta: float = bounded(1.0, gt=0.0)
    sticky_header: str | None = None
    reward: RewardSource = "correct"
    # type "rollout" only (set by the rollout controller, gateway/control/rollout.py): the
    # challenger that serves `fraction` of the requests.
    target: str | None = None
    fraction: float = 0.0


@dataclass(frozen=True)
class RouteConfig:
    name: str
    champion: ModelRef
    challengers: tuple[ChallengerConfig, ...] = ()
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    log_sample_rate: float = bounded(1.0, ge=MIN_LOG_SAMPLE_RATE, le=1.0)
    sample_key_header: str | None = None
    fallback: str | None = None
    threshold: float = 0.5
    task: Task = "classification"
    rollout: RolloutPlan | None = None  # the route's current or last guarded rollout

    def challenger(self, model: str) -> ChallengerConfig | None:
        return next((c for c in self.challengers if c.model == model), None)

    @property
    def explore_arms(self) -> tuple[str, ...]:
        """Arms an exploration policy chooses among: champion first, then explore challengers."""
        return (self.champion.model, *(c.model for c in self.challengers if c.mode == "explore"))


@dataclass(frozen=True)
class GatewayConfig:
    triton: TritonConfig = field(default_factory=TritonConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    log: LogConfig = field(default_factory=LogConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    routes: Mapping[str, RouteConfig] = field(default_factory=dict)

    def with_routes(self, routes: Mapping[str, RouteConfig]) -> GatewayConfig:
        return replace(self, routes=dict(routes))


def check_model_name(name: Any, where: str) -> str:
    """A Triton model name safe in an upstream URL path; ConfigError naming the field."""
    check(isinstance(name, str) and bool(name), f"{where}: required (a model name)")
    check(
        MODEL_NAME.fullmatch(name) is not None and ".." not in name,
        f"{where}: {name!r} is not a valid Triton model name (letters, digits, '_', '-', '.'; "
        "at most 128 characters; no '..', '/', '?', '#' or whitespace)",
    )
    return str(name)


def check_model_version(version: Any, where: str) -> str:
    """A Triton model version: empty (Triton's policy picks) or a decimal number."""
    text = "" if version is None else str(version)
    check(text == "" or MODEL_VERSION.fullmatch(text) is not None,
          f"{where}: {text!r} is not a valid model version (digits only, or empty)")
    return text


def exploration_problem(route: RouteConfig) -> str | None:
    """Why an exploring policy cannot explore on this route (no explore arm), else None."""
    if route.policy.type == "champion" or len(route.explore_arms) > 1:
        return None
    return (
        f"route '{route.name}': policy {route.policy.type} explores among the champion and the "
        "challengers in mode 'explore', and this route has none (every request would be served "
        "by the champion); add a challenger with mode 'explore' or use policy 'champion'"
    )


def parse_model_ref(raw: Any, where: str) -> ModelRef:
    if isinstance(raw, str):
        model, _, version = raw.partition(":")
        raw = {"model": model, "version": version}
    ref = build(ModelRef, raw, where)
    check(bool(ref.model), f"{where}.model: required")
    return ModelRef(check_model_name(ref.model, f"{where}.model"),
                    check_model_version(ref.version, f"{where}.version"))


def parse_challenger(raw: Any, where: str) -> ChallengerConfig:
    ch = build(ChallengerConfig, raw, where)
    check(bool(ch.model), f"{where}.model: required")
    check_model_name(ch.model, f"{where}.model")
    check_model_version(ch.version, f"{where}.version")
    check(ch.mode in CHALLENGER_MODES, f"{where}.mode: must be one of {CHALLENGER_MODES}")
    check_bounds(ch, where)
    check(
        ch.batch_max_wait_ms < ch.timeout_ms,
        f"{where}.batch_max_wait_ms: must be >= 0 and below timeout_ms ({ch.timeout_ms})",
    )
    return replace(ch, model=str(ch.model), version=str(ch.version or ""))


def parse_policy(raw: Any, where: str) -> PolicyConfig:
    policy = build(PolicyConfig, raw, where)
    check(policy.type in POLICY_TYPES, f"{where}.type: must be one of {POLICY_TYPES}")
    check_bounds(policy, where)
    check(policy.reward in REWARD_SOURCES, f"{where}.reward: correct|label|reward")
    check(policy.type != "rollout" or (bool(policy.target) and 0.0 < policy.fraction < 1.0),
          f"{where}: a rollout policy needs a target and a fraction in (0, 1)")
    return policy


def parse_route(name: str, raw: Any) -> RouteConfig:
    where = f"routes.{name}"
    check(isinstance(raw, Mapping), f"{where}: expected a mapping")
    allowed = {f.name for f in fields(RouteConfig)} - {"name"}
    unknown = sorted(set(raw) - allowed)
    check(not unknown, f"{where}: unknown key(s) {', '.join(map(str, unknown))}")
    check("champion" in raw, f"{where}.champion: required")
    champion = parse_model_ref(raw["champion"], f"{where}.champion")
    listed = raw.get("challengers") or []
    check(isinstance(listed, list | tuple), f"{where}.challengers: expected a list")
    challengers = tuple(
        parse_challenger(c, f"{where}.challengers[{i}]") for i, c in enumerate(listed)
    )
    models = [champion.model, *(c.model for c in challengers)]
    dupes = sorted({m for m in models if models.count(m) > 1})
    check(not dupes, f"{where}: model(s) listed twice: {', '.join(dupes)}")
    fallback = raw.get("fallback")
    check(
        fallback is None or fallback in models[1:],
        f"{where}.fallback: {fallback!r} is not one of the route's challengers",
    )
    # The scalars (log_sample_rate, threshold, sample_key_header, task) as `build` coerces them:
    # a value of the wrong type is a ConfigError naming it, never a TypeError.
    route = build(RouteConfig, raw, where, nested={
        "name": name,
        "champion": champion,
        "challengers": challengers,
        "policy": parse_policy(raw.get("policy"), f"{where}.policy"),
        "fallback": fallback,
        "rollout": parse_plan(raw.get("rollout"), f"{where}.rollout"),
    })
    check_bounds(route, where)
    _task(route.task, where)
    problem = rollout_problem(route)
    check(problem is None, f"{where}.rollout: {problem}")
    return route


def _task(value: Any, where: str) -> Task:
    check(value in TASKS, f"{where}.task: classification|regression")
    return value  # type: ignore[no-any-return]


def _check_kafka(kafka: KafkaConfig) -> None:
    """Timings must be positive; the unspilled bound must leave the sink's guard room to act."""
    for name in ("request_timeout_ms", "delivery_timeout_ms", "retry_backoff_ms",
                 "reconnect_backoff_max_ms", "metadata_max_age_ms", "close_timeout_ms",
                 "max_request_bytes", "spill_budget_bytes"):
        check(getattr(kafka, name) > 0, f"log.kafka.{name}: must be positive")
    check(kafka.linger_ms >= 0, "log.kafka.linger_ms: must be >= 0")
    check(kafka.max_unspilled_ms >= 20,
          f"log.kafka.max_unspilled_ms: must be >= 20, got {kafka.max_unspilled_ms}")
    check(kafka.max_unspilled_ms < kafka.delivery_timeout_ms,
          "log.kafka.max_unspilled_ms: must be below delivery_timeout_ms")


def _check_url(url: Any, where: str) -> None:
    check(
        isinstance(url, str) and re.fullmatch(r"http://[^/:]+(:\d+)?/?", url) is not None,
        f"{where}: expected http://host:port, got {url!r}",
    )


def _parse_triton(raw: Mapping[str, Any]) -> TritonConfig:
    raw = dict(raw)
    models_raw = raw.pop("models", None) or {}
    check(isinstance(models_raw, Mapping),
          "triton.models: expected a mapping of model name to {url: ...}")
    models = {
        check_model_name(name, "triton.models"): build(TritonModelConfig, spec,
                                                       f"triton.models.{name}")
        for name, spec in models_raw.items()
    }
    for name, model in models.items():
        _check_url(model.url, f"triton.models.{name}.url")
        _check_protocol(model.protocol, model.grpc_url, f"triton.models.{name}")
    triton = replace(build(TritonConfig, raw, "triton"), models=models)
    _check_url(triton.url, "triton.url")
    _check_protocol(triton.protocol, triton.grpc_url, "triton")
    return triton


def _check_protocol(protocol: Any, grpc_url: Any, where: str) -> None:
    check(protocol in UPSTREAM_PROTOCOLS,
          f"{where}.protocol: expected one of {', '.join(UPSTREAM_PROTOCOLS)}, got {protocol!r}")
    check(grpc_url is None or (isinstance(grpc_url, str)
                                and re.fullmatch(r"[^/:\s]+:\d+", grpc_url) is not None),
          f"{where}.grpc_url: expected host:port, got {grpc_url!r}")
    check(protocol != "grpc" or grpc_url is not None,
          f"{where}.grpc_url: required when protocol is grpc")


SECTIONS: dict[str, type] = {
    "triton": TritonConfig, "listen": ListenConfig, "log": LogConfig, "admin": AdminConfig,
}


def parse_config(
    raw: Mapping[str, Any] | None, env: Mapping[str, str] | None = None
) -> GatewayConfig:
    data: dict[str, Any] = dict(raw or {})
    allowed = {"triton", "listen", "log", "admin", "routes"}
    unknown = sorted(set(data) - allowed)
    check(not unknown, f"unknown top-level key(s): {', '.join(map(str, unknown))}")
    for section in ("triton", "listen", "log", "admin"):
        data[section] = dict(data.get(section) or {})
    if isinstance(data["log"].get("kafka"), Mapping):
        data["log"]["kafka"] = dict(data["log"]["kafka"])
    apply_env(data, SECTIONS, env)
    log_raw = dict(data["log"])
    kafka = build(KafkaConfig, log_raw.pop("kafka", None), "log.kafka")
    log = replace(build(LogConfig, log_raw, "log"), kafka=kafka)
    check(log.sink in ("file", "kafka"), "log.sink: must be file or kafka")
    check(log.fsync in ("always", "interval", "never"), "log.fsync: always|interval|never")
    _check_kafka(log.kafka)
    routes_raw = data.get("routes") or {}
    check(isinstance(routes_raw, Mapping), "routes: expected a mapping of route name to route")
    triton = _parse_triton(data["triton"])
    check(triton.timeout_ms > 0, "triton.timeout_ms: must be positive")
    check(triton.max_connections > 0, "triton.max_connections: must be positive")
    admin = build(AdminConfig, data["admin"], "admin")
    check(admin.source_of_truth in SOURCES_OF_TRUTH,
          f"admin.source_of_truth: must be one of {SOURCES_OF_TRUTH}")
    routes = {str(n): parse_route(str(n), r) for n, r in routes_raw.items()}
    for route in routes.values():
        problem = exploration_problem(route)
        check(problem is None, f"routes.{route.name}.policy: {problem}")
    if "grpc_port" in data["listen"] and data["listen"]["grpc_port"] is None:
        data["listen"]["grpc_port"] = 0  # null disables gRPC, like 0
    listen = build(ListenConfig, data["listen"], "listen")
    check(listen.server in ("lean", "aiohttp"),
          f"listen.server: must be lean or aiohttp, got {listen.server!r}")
    check(0 <= listen.grpc_port <= 65535, "listen.grpc_port: must be a port number (0 disables)")
    check(listen.grpc_port == 0 or listen.grpc_port != listen.port,
          f"listen.grpc_port: {listen.grpc_port} is also listen.port; gRPC needs its own port")
    return GatewayConfig(
        triton=triton,
        listen=listen,
        log=log,
        admin=admin,
        routes=routes,
    )


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read the YAML file (when given) and apply environment overrides; ConfigError if invalid."""
    return parse_config(load_yaml(path) if path is not None else {}, env)
