"""The shared settings loader (understudy/settings.py) as both programs use it: environment
overrides (including the variables that are not overrides), YAML errors naming the file,
durations, and one ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest

from evaluator import config as evaluator_config
from gateway import config as gateway_config
from gateway.errors import ConfigError as GatewayConfigError
from understudy.settings import (
    ADMIN_TOKEN_ENV,
    LOG_LEVEL_ENV,
    NAMED_VARS,
    ConfigError,
    format_duration,
    log_level,
    parse_duration,
)


def test_one_config_error_for_both_programs() -> None:
    assert GatewayConfigError is ConfigError
    assert evaluator_config.ConfigError is ConfigError


def test_log_level_is_not_swallowed_by_the_log_section() -> None:
    env = {LOG_LEVEL_ENV: "debug", "UNDERSTUDY_LOG_PATH": "/data/log",
           "UNDERSTUDY_LOG_KAFKA_LINGER_MS": "7"}
    config = gateway_config.parse_config({}, env=env)
    assert config.log.path == "/data/log" and config.log.kafka.linger_ms == 7
    assert log_level(env) == "DEBUG"
    assert log_level({}) == "INFO"
    assert evaluator_config.parse_config({}, env=env).source.path == "./var/log"  # not its own


def test_an_override_naming_no_key_fails_with_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"UNDERSTUDY_LOG_PAHT: log has no key 'paht'"):
        gateway_config.parse_config({}, env={"UNDERSTUDY_LOG_PAHT": "/x"})
    with pytest.raises(ConfigError, match=r"UNDERSTUDY_LOG_KAFKA_BOOTSTAP: log\.kafka has no"):
        gateway_config.parse_config({}, env={"UNDERSTUDY_LOG_KAFKA_BOOTSTAP": "k:9092"})
    with pytest.raises(ConfigError, match=r"UNDERSTUDY_STORE_JOIN: store has no key 'join'"):
        evaluator_config.parse_config({}, env={"UNDERSTUDY_STORE_JOIN": "7d"})
    # decision is free-form: extra keys pass through to the decision policy, which checks them
    decided = evaluator_config.parse_config({}, env={"UNDERSTUDY_DECISION_ALPHA": "0.01"})
    assert decided.decision["alpha"] == 0.01


def test_variables_that_are_not_overrides_are_skipped() -> None:
    env = dict.fromkeys(NAMED_VARS, "x")
    gateway_config.parse_config({}, env=env)
    evaluator_config.parse_config({}, env=env)
    # a token variable the config names itself is a secret, not a typo of an admin key
    raw = {"admin": {"token_env": "UNDERSTUDY_ADMIN_SECRET"}}
    config = gateway_config.parse_config(raw, env={"UNDERSTUDY_ADMIN_SECRET": "s3cret"})
    assert config.admin.token_env == "UNDERSTUDY_ADMIN_SECRET"
    assert gateway_config.AdminConfig().token_env == ADMIN_TOKEN_ENV
    assert evaluator_config.GatewayAdminConfig().token_env == ADMIN_TOKEN_ENV


def test_overrides_keep_their_yaml_types_in_both_programs() -> None:
    gw = gateway_config.parse_config({}, env={"UNDERSTUDY_LISTEN_PORT": "9000",
                                              "UNDERSTUDY_TRITON_MODELS": "{m: {url: 'http://t:8000'}}"})
    assert gw.listen.port == 9000 and gw.triton.model_urls() == {"m": "http://t:8000"}
    ev = evaluator_config.parse_config({}, env={"UNDERSTUDY_STORE_JOIN_WINDOW": "36h",
                                                "UNDERSTUDY_DRIFT_ADAPTIVE": "false",
                                                "UNDERSTUDY_SOURCE_KAFKA_GROUP_ID": "g2"})
    assert ev.store.join_window == 36 * 3600
    assert ev.drift.adaptive is False and ev.source.kafka.group_id == "g2"
    with pytest.raises(ConfigError, match=r"UNDERSTUDY_TRITON_URL: not a YAML value"):
        gateway_config.parse_config({}, env={"UNDERSTUDY_TRITON_URL": "[unclosed"})


@pytest.mark.parametrize("load", [gateway_config.load_config, evaluator_config.load_config])
def test_yaml_errors_name_the_file_and_line(tmp_path: Path, load: object) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("routes:\n  fraud: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load(bad, env={})  # type: ignore[operator]
    message = str(info.value)
    assert str(bad) in message and "invalid YAML" in message
    assert f'in "{bad}", line 3' in message
    assert "<unicode string>" not in message
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load(listed, env={})  # type: ignore[operator]
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(binary, env={})  # type: ignore[operator]
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    load(empty, env={})  # type: ignore[operator]  # an empty file: every default


@pytest.mark.parametrize(("text", "seconds"), [
    ("14d", 14 * 86400.0), ("12h", 43200.0), ("30m", 1800.0), ("45s", 45.0), ("45", 45.0),
    ("250ms", 0.25), ("1w", 604800.0), (" 1.5h ", 5400.0), (90, 90.0), (0.5, 0.5),
])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["two weeks", "-1d", "0s", 0, -3, True, "1y", float("inf")])
def test_bad_durations_name_the_key(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"^store\.join_window: "):
        parse_duration(bad, "store.join_window")
    with pytest.raises(ConfigError, match=r"store\.join_window"):
        evaluator_config.parse_config({"store": {"join_window": bad}}, env={})


def test_format_duration_inverts_whole_units() -> None:
    for text in ("2w", "3d", "36h", "90m", "45s"):
        assert format_duration(parse_duration(text)) == text
    assert format_duration(0.25) == "0.25s"


def test_both_programs_reject_unknown_keys_and_bad_numbers_alike() -> None:
    with pytest.raises(ConfigError, match=r"^listen: unknown key\(s\) prot$"):
        gateway_config.parse_config({"listen": {"prot": 1}}, env={})
    with pytest.raises(ConfigError, match=r"^report: unknown key\(s\) outt$"):
        evaluator_config.parse_config({"report": {"outt": "x"}}, env={})
    with pytest.raises(ConfigError, match=r"^listen\.port: expected a number, got 'http'$"):
        gateway_config.parse_config({"listen": {"port": "http"}}, env={})
    with pytest.raises(ConfigError, match=r"^source\.batch_records: expected a number"):
        evaluator_config.parse_config({"source": {"batch_records": [1]}}, env={})
