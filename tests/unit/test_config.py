"""Config parsing: defaults, env overrides, and errors that name the offending key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config, parse_config
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_config_loads() -> None:
    config = load_config(ROOT / "configs" / "gateway.yaml", env={})
    assert config.routes["fraud"].champion.model == "fraud_v3"
    assert [c.model for c in config.routes["fraud"].challengers] == ["fraud_v4"]
    assert config.routes["price"].task == "regression"


def test_env_overrides_keep_types() -> None:
    config = parse_config({}, env={
        "UNDERSTUDY_TRITON_URL": "http://triton:8000",
        "UNDERSTUDY_TRITON_TIMEOUT_MS": "250",
        "UNDERSTUDY_LOG_SINK": "kafka",
        "UNDERSTUDY_LOG_KAFKA_BOOTSTRAP": "kafka:9092",
        "UNDERSTUDY_LISTEN_PORT": "9000",
        "UNRELATED": "x",
    })
    assert config.triton.url == "http://triton:8000"
    assert config.triton.timeout_ms == 250
    assert config.log.sink == "kafka" and config.log.kafka.bootstrap == "kafka:9092"
    assert config.listen.port == 9000


@pytest.mark.parametrize(("raw", "message"), [
    ({"tritn": {}}, "unknown top-level key(s): tritn"),
    ({"triton": {"timeout_ms": "soon"}}, "triton.timeout_ms: expected a number"),
    ({"log": {"sink": "s3"}}, "log.sink"),
    ({"routes": {"r": {}}}, "routes.r.champion: required"),
    ({"routes": {"r": {"champion": "a", "challengers": [{"model": "b", "sample_rate": 1.5}]}}},
     "routes.r.challengers[0].sample_rate"),
    ({"routes": {"r": {"champion": "a", "challengers": [{"model": "a"}]}}}, "listed twice: a"),
    ({"routes": {"r": {"champion": "a", "log_sample_rate": 0.001}}}, "log_sample_rate"),
    ({"routes": {"r": {"champion": "a", "policy": {"type": "ucb"}}}}, "policy.type"),
    ({"routes": {"r": {"champion": "a", "fallback": "z"}}}, "fallback"),
    ({"routes": {"r": {"champion": "a", "colour": 1}}}, "unknown key(s) colour"),
    ({"triton": {"url": "https://triton:8000"}}, "triton.url: expected http://host:port"),
    ({"triton": {"url": "triton:8000"}}, "triton.url: expected http://host:port"),
    ({"triton": {"max_connections": 0}}, "triton.max_connections: must be positive"),
    ({"listen": {"grpc_port": 8080}}, "listen.grpc_port: 8080 is also listen.port"),
    ({"listen": {"grpc_port": 70000}}, "listen.grpc_port: must be a port number"),
])
def test_errors_name_the_problem(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        parse_config(raw, env={})
    assert message in str(info.value)


def test_grpc_port_default_and_disable() -> None:
    assert parse_config({}, env={}).listen.grpc_port == 8081
    assert parse_config({"listen": {"grpc_port": None}}, env={}).listen.grpc_port == 0
    assert parse_config({}, env={"UNDERSTUDY_LISTEN_GRPC_PORT": "0"}).listen.grpc_port == 0


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes: [unclosed")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad, env={})
