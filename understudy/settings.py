"""The one settings loader: YAML files, `UNDERSTUDY_<SECTION>_<KEY>` overrides, durations, errors.

Both programs describe their configuration as frozen dataclasses (gateway/config.py,
evaluator/config.py) and build them through this module, so a key, a number, a duration, an
environment override and an error message behave the same in both.

Environment. Every variable either program reads is an override or is named in `NAMED_VARS`:

- Overrides: `UNDERSTUDY_<SECTION>_<KEY>=value` sets `<section>.<key>` of the program whose
  section it is (`UNDERSTUDY_LOG_KAFKA_BOOTSTRAP` sets the gateway's log.kafka.bootstrap;
  nested sections continue with `_`). Values are parsed as YAML scalars so numbers and booleans
  keep their types. A variable for a section the program does not have belongs to the other
  program and is ignored, so both can share one environment; a variable for one of its own
  sections that names no key there is a typo and fails start-up with its name.
- Named variables (`NAMED_VARS`): secrets and process settings that are not config keys, e.g.
  `UNDERSTUDY_LOG_LEVEL`, which would otherwise look like the gateway's `log.level`. So are the
  variables a config's `*_env` keys name (`admin.token_env` may name any variable).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, Field, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import yaml

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Section = TypeVar("Section", bound="DataclassInstance")

ENV_PREFIX: Final = "UNDERSTUDY_"

# Variables that are not `<section>_<key>` overrides.
CONFIG_ENV: Final = "UNDERSTUDY_CONFIG"
LOG_LEVEL_ENV: Final = "UNDERSTUDY_LOG_LEVEL"
ADMIN_TOKEN_ENV: Final = "UNDERSTUDY_ADMIN_TOKEN"  # noqa: S105 - a variable name, not a secret
ADMIN_READ_TOKEN_ENV: Final = "UNDERSTUDY_ADMIN_READ_TOKEN"  # noqa: S105 - a variable name
FEEDBACK_TOKEN_ENV: Final = "UNDERSTUDY_FEEDBACK_TOKEN"  # noqa: S105 - a variable name
WEBHOOK_TOKEN_ENV: Final = "UNDERSTUDY_WEBHOOK_TOKEN"  # noqa: S105 - a variable name
GATEWAY_URL_ENV: Final = "UNDERSTUDY_GATEWAY"
KAFKA_VERSION_ENV: Final = "UNDERSTUDY_KAFKA_VERSION"

NAMED_VARS: Final[dict[str, str]] = {
    CONFIG_ENV: "gateway serve: the YAML config when --config is not given",
    LOG_LEVEL_ENV: "gateway: the Python log level (DEBUG, INFO, WARNING, ...)",
    ADMIN_TOKEN_ENV: "admin API write token (gateway admin.token_env, evaluator "
                     "gateway.token_env, the admin CLI)",
    ADMIN_READ_TOKEN_ENV: "admin API read-only token (admin.read_token_env, "
                          "gateway.read_token_env)",
    FEEDBACK_TOKEN_ENV: "bearer token for POST /v2/feedback (admin.feedback_token_env)",
    WEBHOOK_TOKEN_ENV: "bearer token of the drift webhook (drift.webhook_token_env)",
    GATEWAY_URL_ENV: "the admin CLI's gateway base URL",
    KAFKA_VERSION_ENV: "devtools.kafka_broker: the Kafka release it downloads",
}

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


class ConfigError(Exception):
    """A configuration file or override is invalid; the message names the key or variable.

    Raised at start-up (or when the gateway's admin API changes a route), never per request.
    """


def check(cond: bool, message: str) -> None:
    """Raise ConfigError(message) unless `cond`."""
    if not cond:
        raise ConfigError(message)


def log_level(env: Mapping[str, str] | None = None) -> str:
    """The log level `UNDERSTUDY_LOG_LEVEL` asks for (default INFO)."""
    value = (os.environ if env is None else env).get(LOG_LEVEL_ENV, "").strip()
    return value.upper() or "INFO"


# -- durations -------------------------------------------------------------------------------


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


def duration_field(default: str) -> Any:
    """A dataclass field holding seconds, written in YAML as a duration ('7d')."""
    return field(default=parse_duration(default), metadata={"duration": True})


# -- sections --------------------------------------------------------------------------------


def field_default(f: Field[Any]) -> Any:
    """A dataclass field's default value (calling its factory), or None when it has none."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def build(cls: type[Section], raw: Any, where: str,
          nested: Mapping[str, Any] | None = None) -> Section:
    """A flat config dataclass from a mapping: unknown keys rejected with their location;
    numbers, booleans, strings and durations (fields made with `duration_field`) coerced.

    `nested` holds already-built values for sub-sections (e.g. log.kafka); other values whose
    default is neither a scalar nor None (mappings, tuples) pass through for the caller to check.
    """
    if raw is None:
        raw = {}
    check(isinstance(raw, Mapping), f"{where}: expected a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known), key=str)
    check(not unknown, f"{where}: unknown key(s) {', '.join(map(str, unknown))}")
    kwargs: dict[str, Any] = dict(nested or {})
    for name, value in raw.items():
        if name in kwargs:
            continue
        f = known[name]
        default = field_default(f)
        if f.metadata.get("duration"):
            kwargs[name] = parse_duration(value, f"{where}.{name}")
        elif isinstance(default, bool):
            check(isinstance(value, bool), f"{where}.{name}: expected true/false, got {value!r}")
            kwargs[name] = value
        elif isinstance(default, int | float):
            try:
                kwargs[name] = type(default)(value)
            except (TypeError, ValueError, OverflowError):
                raise ConfigError(f"{where}.{name}: expected a number, got {value!r}") from None
        elif isinstance(default, str) or default is None:
            check(value is None or isinstance(value, str | int | float),
                  f"{where}.{name}: expected a string, got {type(value).__name__}")
            kwargs[name] = None if value is None else str(value)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


# -- environment overrides -------------------------------------------------------------------


def _named_by(raw: Mapping[str, Any]) -> set[str]:
    """Variables a raw config names in its `*_env` keys (any section, one level down)."""
    names: set[str] = set()
    for section in raw.values():
        if isinstance(section, Mapping):
            names.update(v for k, v in section.items()
                         if isinstance(k, str) and k.endswith("_env") and isinstance(v, str))
    return names


def _subsection(target: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    current = target.get(name)
    check(current is None or isinstance(current, Mapping), f"{where}: expected a mapping")
    sub = dict(current or {})
    target[name] = sub
    return sub


def apply_env(raw: dict[str, Any], sections: Mapping[str, type],
              env: Mapping[str, str] | None = None) -> None:
    """Apply `UNDERSTUDY_<SECTION>_<KEY>` overrides to `raw` in place (see the module docstring).

    `sections` maps this program's section names to their dataclass (or `dict` for a free-form
    section whose keys its own parser checks). A sub-section is a field whose default is a
    dataclass (log.kafka, source.kafka); its keys continue with `_`.
    """
    env = os.environ if env is None else env
    named = set(NAMED_VARS) | _named_by(raw)
    for var, value in sorted(env.items()):
        if not var.startswith(ENV_PREFIX) or var in named:
            continue
        rest = var[len(ENV_PREFIX):].lower()
        section = next((s for s in sections if rest.startswith(s + "_")), None)
        if section is None:
            continue  # another program's section (or not an override at all)
        key = rest[len(section) + 1:]
        where = section
        target = _subsection(raw, section, section)
        cls = sections[section]
        if is_dataclass(cls):
            for f in fields(cls):
                default = field_default(f)
                if is_dataclass(default) and not isinstance(default, type) \
                        and key.startswith(f.name + "_"):
                    where = f"{section}.{f.name}"
                    target = _subsection(target, f.name, where)
                    cls, key = type(default), key[len(f.name) + 1:]
                    break
            check(key in {f.name for f in fields(cls)},
                  f"{var}: {where} has no key {key!r} (an override sets <section>.<key>; "
                  f"the variables that are not overrides: {', '.join(sorted(NAMED_VARS))})")
        try:
            target[key] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{var}: not a YAML value ({exc})") from None


# -- files -----------------------------------------------------------------------------------


def load_yaml(path: str | Path) -> Mapping[str, Any]:
    """A YAML config file's top-level mapping ({} for an empty file); errors name the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)  # a stream, so parse errors name the file, with line
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if raw is None:
        return {}
    check(isinstance(raw, Mapping), f"{path}: top level must be a mapping")
    return raw  # type: ignore[no-any-return]
