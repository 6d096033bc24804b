"""Typed gateway configuration: YAML file + `UNDERSTUDY_<SECTION>_<KEY>` environment overrides.

Everything is validated once at start-up (or when the admin API changes a route) so the request
path can trust it. Dataclasses are frozen: a route change replaces the route object atomically.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from gateway.errors import ConfigError

PolicyType = Literal["champion", "epsilon_greedy", "thompson"]
ChallengerMode = Literal["shadow", "explore"]
POLICY_TYPES: tuple[str, ...] = ("champion", "epsilon_greedy", "thompson")
CHALLENGER_MODES: tuple[str, ...] = ("shadow", "explore")
MIN_LOG_SAMPLE_RATE = 0.01
# Shadow micro-batching (gateway/mirror/batching.py): rows per Triton call, and how long the first
# queued copy may wait for company. Also used for the champion's lane under exploration.
DEFAULT_BATCH_MAX_ROWS = 16
DEFAULT_BATCH_MAX_WAIT_MS = 2.0
# Every Nth copy of a batching lane goes alone, so latency guardrails get samples comparable with
# the champion's single requests (a batched copy's latency is its whole batch's). 10: the
# evaluator's 100 latency samples per challenger arrive within ~1,000 copies, at the price of 10%
# of copies unbatched. (`make demo` turns batching off: every copy is a sample there.)
DEFAULT_LATENCY_PROBE_EVERY = 10
ENV_PREFIX = "UNDERSTUDY_"
# Triton model names as they may appear in an upstream URL path segment: letters, digits, `_`,
# `-`, `.`, not starting with `.` and without `..` (no `/`, `?`, `#`, whitespace, traversal).
MODEL_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
MODEL_VERSION = re.compile(r"[0-9]{1,19}")
SOURCES_OF_TRUTH: tuple[str, ...] = ("registry", "config")


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


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap: str = "127.0.0.1:9092"
    topic: str = "understudy.inferences"
    labels_topic: str = "understudy.labels"
    audit_topic: str = "understudy.audit"
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
    token_env: str = "UNDERSTUDY_ADMIN_TOKEN"  # noqa: S105 - the variable name, not a secret
    read_token_env: str = "UNDERSTUDY_ADMIN_READ_TOKEN"  # noqa: S105 - a name, not a secret
    state_path: str = "./var/state/registry.json"
    rewards_path: str = "./var/state/rewards.jsonl"
    # Bearer token for POST /v2/feedback, read from this variable; unset: feedback is open.
    feedback_token_env: str = "UNDERSTUDY_FEEDBACK_TOKEN"  # noqa: S105 - a name, not a secret
    # Who wins at start when the YAML's routes differ from the live registry (docs/ADMIN.md).
    source_of_truth: Literal["registry", "config"] = "registry"


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
    sample_rate: float = 1.0
    timeout_ms: int = 1000
    # Calls in flight (a call carries a batch of copies when batching); 4 keeps a slow model's
    # answers from arriving in bursts big enough to delay champion requests (BENCHMARKS.md).
    max_concurrency: int = 4
    max_queue: int = 64
    batch_max_rows: int = DEFAULT_BATCH_MAX_ROWS  # 1 disables batching
    batch_max_wait_ms: float = DEFAULT_BATCH_MAX_WAIT_MS
    latency_probe_every: int = DEFAULT_LATENCY_PROBE_EVERY  # 0: every copy may be batched

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.model, self.version)


@dataclass(frozen=True)
class PolicyConfig:
    type: PolicyType = "champion"
    epsilon: float = 0.1
    prior_alpha: float = 1.0
    prior_beta: float = 1.0
    sticky_header: str | None = None
    reward: Literal["correct", "label", "reward"] = "correct"


@dataclass(frozen=True)
class RouteConfig:
    name: str
    champion: ModelRef
    challengers: tuple[ChallengerConfig, ...] = ()
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    log_sample_rate: float = 1.0
    sample_key_header: str | None = None
    fallback: str | None = None
    threshold: float = 0.5
    task: Literal["classification", "regression"] = "classification"

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


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def field_default(f: Field[Any]) -> Any:
    """A dataclass field's default value (calling its factory), or None when it has none."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build a flat dataclass from a mapping, rejecting unknown keys with their location."""
    if raw is None:
        raw = {}
    _check(isinstance(raw, Mapping), f"{where}: expected a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    _check(not unknown, f"{where}: unknown key(s) {', '.join(map(str, unknown))}")
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        default = field_default(known[name])
        if isinstance(default, int | float) and not isinstance(default, bool):
            try:
                kwargs[name] = type(default)(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}.{name}: expected a number, got {value!r}") from None
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def check_model_name(name: Any, where: str) -> str:
    """A Triton model name safe in an upstream URL path; ConfigError naming the field."""
    _check(isinstance(name, str) and bool(name), f"{where}: required (a model name)")
    _check(
        MODEL_NAME.fullmatch(name) is not None and ".." not in name,
        f"{where}: {name!r} is not a valid Triton model name (letters, digits, '_', '-', '.'; "
        "at most 128 characters; no '..', '/', '?', '#' or whitespace)",
    )
    return str(name)


def check_model_version(version: Any, where: str) -> str:
    """A Triton model version: empty (Triton's policy picks) or a decimal number."""
    text = "" if version is None else str(version)
    _check(text == "" or MODEL_VERSION.fullmatch(text) is not None,
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
    ref = _build(ModelRef, raw, where)
    _check(bool(ref.model), f"{where}.model: required")
    return ModelRef(check_model_name(ref.model, f"{where}.model"),
                    check_model_version(ref.version, f"{where}.version"))


def parse_challenger(raw: Any, where: str) -> ChallengerConfig:
    ch = _build(ChallengerConfig, raw, where)
    _check(bool(ch.model), f"{where}.model: required")
    check_model_name(ch.model, f"{where}.model")
    check_model_version(ch.version, f"{where}.version")
    _check(ch.mode in CHALLENGER_MODES, f"{where}.mode: must be one of {CHALLENGER_MODES}")
    _check(0.0 <= ch.sample_rate <= 1.0, f"{where}.sample_rate: must be in [0, 1]")
    _check(ch.timeout_ms > 0, f"{where}.timeout_ms: must be positive")
    _check(ch.max_concurrency > 0, f"{where}.max_concurrency: must be positive")
    _check(ch.max_queue >= 0, f"{where}.max_queue: must be >= 0")
    _check(ch.batch_max_rows >= 1, f"{where}.batch_max_rows: must be >= 1 (1 disables batching)")
    _check(
        0.0 <= ch.batch_max_wait_ms < ch.timeout_ms,
        f"{where}.batch_max_wait_ms: must be >= 0 and below timeout_ms ({ch.timeout_ms})",
    )
    _check(ch.latency_probe_every >= 0, f"{where}.latency_probe_every: must be >= 0 (0: off)")
    return replace(ch, model=str(ch.model), version=str(ch.version or ""))


def parse_policy(raw: Any, where: str) -> PolicyConfig:
    policy = _build(PolicyConfig, raw, where)
    _check(policy.type in POLICY_TYPES, f"{where}.type: must be one of {POLICY_TYPES}")
    _check(0.0 <= policy.epsilon <= 1.0, f"{where}.epsilon: must be in [0, 1]")
    _check(policy.prior_alpha > 0 and policy.prior_beta > 0, f"{where}: priors must be > 0")
    _check(policy.reward in ("correct", "label", "reward"), f"{where}.reward: correct|label|reward")
    return policy


def parse_route(name: str, raw: Any) -> RouteConfig:
    where = f"routes.{name}"
    _check(isinstance(raw, Mapping), f"{where}: expected a mapping")
    allowed = {f.name for f in fields(RouteConfig)} - {"name"}
    unknown = sorted(set(raw) - allowed)
    _check(not unknown, f"{where}: unknown key(s) {', '.join(map(str, unknown))}")
    _check("champion" in raw, f"{where}.champion: required")
    champion = parse_model_ref(raw["champion"], f"{where}.champion")
    challengers = tuple(
        parse_challenger(c, f"{where}.challengers[{i}]")
        for i, c in enumerate(raw.get("challengers") or [])
    )
    models = [champion.model, *(c.model for c in challengers)]
    dupes = sorted({m for m in models if models.count(m) > 1})
    _check(not dupes, f"{where}: model(s) listed twice: {', '.join(dupes)}")
    rate = float(raw.get("log_sample_rate", 1.0))
    _check(
        MIN_LOG_SAMPLE_RATE <= rate <= 1.0,
        f"{where}.log_sample_rate: must be in [{MIN_LOG_SAMPLE_RATE}, 1]",
    )
    fallback = raw.get("fallback")
    _check(
        fallback is None or fallback in models[1:],
        f"{where}.fallback: {fallback!r} is not one of the route's challengers",
    )
    return RouteConfig(
        name=name,
        champion=champion,
        challengers=challengers,
        policy=parse_policy(raw.get("policy"), f"{where}.policy"),
        log_sample_rate=rate,
        sample_key_header=raw.get("sample_key_header"),
        fallback=fallback,
        threshold=float(raw.get("threshold", 0.5)),
        task=_task(raw.get("task", "classification"), where),
    )


def _task(value: Any, where: str) -> Literal["classification", "regression"]:
    _check(value in ("classification", "regression"), f"{where}.task: classification|regression")
    return value  # type: ignore[no-any-return]


def _check_kafka(kafka: KafkaConfig) -> None:
    """Timings must be positive; the unspilled bound must leave the sink's guard room to act."""
    for name in ("request_timeout_ms", "delivery_timeout_ms", "retry_backoff_ms",
                 "reconnect_backoff_max_ms", "metadata_max_age_ms", "close_timeout_ms",
                 "max_request_bytes", "spill_budget_bytes"):
        _check(getattr(kafka, name) > 0, f"log.kafka.{name}: must be positive")
    _check(kafka.linger_ms >= 0, "log.kafka.linger_ms: must be >= 0")
    _check(kafka.max_unspilled_ms >= 20,
           f"log.kafka.max_unspilled_ms: must be >= 20, got {kafka.max_unspilled_ms}")
    _check(kafka.max_unspilled_ms < kafka.delivery_timeout_ms,
           "log.kafka.max_unspilled_ms: must be below delivery_timeout_ms")


def _check_url(url: Any, where: str) -> None:
    _check(
        isinstance(url, str) and re.fullmatch(r"http://[^/:]+(:\d+)?/?", url) is not None,
        f"{where}: expected http://host:port, got {url!r}",
    )


def _parse_triton(raw: Mapping[str, Any]) -> TritonConfig:
    raw = dict(raw)
    models_raw = raw.pop("models", None) or {}
    _check(isinstance(models_raw, Mapping),
           "triton.models: expected a mapping of model name to {url: ...}")
    models = {
        check_model_name(name, "triton.models"): _build(TritonModelConfig, spec,
                                                        f"triton.models.{name}")
        for name, spec in models_raw.items()
    }
    for name, model in models.items():
        _check_url(model.url, f"triton.models.{name}.url")
        _check_protocol(model.protocol, model.grpc_url, f"triton.models.{name}")
    triton = replace(_build(TritonConfig, raw, "triton"), models=models)
    _check_url(triton.url, "triton.url")
    _check_protocol(triton.protocol, triton.grpc_url, "triton")
    return triton


def _check_protocol(protocol: Any, grpc_url: Any, where: str) -> None:
    _check(protocol in UPSTREAM_PROTOCOLS,
           f"{where}.protocol: expected one of {', '.join(UPSTREAM_PROTOCOLS)}, got {protocol!r}")
    _check(grpc_url is None or (isinstance(grpc_url, str)
                                and re.fullmatch(r"[^/:\s]+:\d+", grpc_url) is not None),
           f"{where}.grpc_url: expected host:port, got {grpc_url!r}")
    _check(protocol != "grpc" or grpc_url is not None,
           f"{where}.grpc_url: required when protocol is grpc")


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    """Apply `UNDERSTUDY_<SECTION>_<KEY>` overrides; nested keys continue with `_`.

    `UNDERSTUDY_LOG_KAFKA_BOOTSTRAP=h:9092` sets log.kafka.bootstrap. Values are parsed as YAML
    scalars so numbers and booleans keep their types.
    """
    sections: dict[str, type] = {
        "triton": TritonConfig, "listen": ListenConfig, "log": LogConfig, "admin": AdminConfig,
    }
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX):].lower()
        section = next((s for s in sections if rest.startswith(s + "_")), None)
        if section is None:
            continue
        key = rest[len(section) + 1:]
        target = raw.setdefault(section, {}) or {}
        raw[section] = target
        cls = sections[section]
        if section == "log" and key.startswith("kafka_"):
            target = target.setdefault("kafka", {}) or {}
            raw["log"]["kafka"] = target
            key = key[len("kafka_"):]
            cls = KafkaConfig
        if key not in {f.name for f in fields(cls)}:
            # The UNDERSTUDY_ namespace also holds secrets (UNDERSTUDY_ADMIN_TOKEN) and other
            # programs' settings; only names that are config keys are overrides.
            continue
        target[key] = yaml.safe_load(value) if value != "" else ""


def parse_config(
    raw: Mapping[str, Any] | None, env: Mapping[str, str] | None = None
) -> GatewayConfig:
    data: dict[str, Any] = dict(raw or {})
    allowed = {"triton", "listen", "log", "admin", "routes"}
    unknown = sorted(set(data) - allowed)
    _check(not unknown, f"unknown top-level key(s): {', '.join(map(str, unknown))}")
    for section in ("triton", "listen", "log", "admin"):
        data[section] = dict(data.get(section) or {})
    if isinstance(data["log"].get("kafka"), Mapping):
        data["log"]["kafka"] = dict(data["log"]["kafka"])
    _apply_env(data, os.environ if env is None else env)
    log_raw = dict(data["log"])
    kafka = _build(KafkaConfig, log_raw.pop("kafka", None), "log.kafka")
    log = replace(_build(LogConfig, log_raw, "log"), kafka=kafka)
    _check(log.sink in ("file", "kafka"), "log.sink: must be file or kafka")
    _check(log.fsync in ("always", "interval", "never"), "log.fsync: always|interval|never")
    _check_kafka(log.kafka)
    routes_raw = data.get("routes") or {}
    _check(isinstance(routes_raw, Mapping), "routes: expected a mapping of route name to route")
    triton = _parse_triton(data["triton"])
    _check(triton.timeout_ms > 0, "triton.timeout_ms: must be positive")
    _check(triton.max_connections > 0, "triton.max_connections: must be positive")
    admin = _build(AdminConfig, data["admin"], "admin")
    _check(admin.source_of_truth in SOURCES_OF_TRUTH,
           f"admin.source_of_truth: must be one of {SOURCES_OF_TRUTH}")
    routes = {str(n): parse_route(str(n), r) for n, r in routes_raw.items()}
    for route in routes.values():
        problem = exploration_problem(route)
        _check(problem is None, f"routes.{route.name}.policy: {problem}")
    if "grpc_port" in data["listen"] and data["listen"]["grpc_port"] is None:
        data["listen"]["grpc_port"] = 0  # null disables gRPC, like 0
    listen = _build(ListenConfig, data["listen"], "listen")
    _check(0 <= listen.grpc_port <= 65535, "listen.grpc_port: must be a port number (0 disables)")
    _check(listen.grpc_port == 0 or listen.grpc_port != listen.port,
           f"listen.grpc_port: {listen.grpc_port} is also listen.port; gRPC needs its own port")
    return GatewayConfig(
        triton=triton,
        listen=listen,
        log=log,
        admin=admin,
        routes=routes,
    )


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> GatewayConfig:
    raw: Mapping[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        _check(isinstance(raw, Mapping), f"{path}: top level must be a mapping")
    return parse_config(raw, env)
