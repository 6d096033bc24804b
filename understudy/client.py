"""A Python client for the gateway's admin API (`/admin/...`), with typed results and errors.

`python -m gateway challengers|promote|rollback|policy|audit` is built on it, so a script that
imports `AdminClient` makes exactly the calls the CLI makes. It is synchronous and uses only the
standard library: one request per call, no event loop, importable where aiohttp is not installed.

    from understudy.client import AdminClient
    client = AdminClient("http://127.0.0.1:8080", token="...")
    route = client.add_challenger("fraud", "fraud_v5", sample_rate=0.5)
    print(route.version, [c.model for c in route.challengers])
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_GATEWAY = "http://127.0.0.1:8080"
GATEWAY_ENV = "UNDERSTUDY_GATEWAY"
TOKEN_ENV = "UNDERSTUDY_ADMIN_TOKEN"  # noqa: S105 - the variable's name, not a secret
READ_TOKEN_ENV = "UNDERSTUDY_ADMIN_READ_TOKEN"  # noqa: S105

# The fields a challenger takes on add / update (the admin API validates their values).
CHALLENGER_FIELDS = ("mode", "sample_rate", "timeout_ms", "max_concurrency", "max_queue",
                     "batch_max_rows", "batch_max_wait_ms", "latency_probe_every")
POLICY_FIELDS = ("epsilon", "prior_alpha", "prior_beta", "sticky_header", "reward")


class AdminError(Exception):
    """The call did not succeed; `status` is the HTTP status, None when there was no answer."""

    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class Refused(AdminError):
    """The gateway answered 4xx: bad input, unknown route, a version conflict, no permission."""


class ServerError(AdminError):
    """The gateway answered 5xx."""


class Unreachable(AdminError):
    """No answer: the gateway is down, the address is wrong, or the call timed out."""


@dataclass(frozen=True)
class ModelRef:
    model: str
    version: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelRef:
        return cls(str(data["model"]), data.get("version") or None)

    def __str__(self) -> str:
        return f"{self.model}:{self.version}" if self.version else self.model


@dataclass(frozen=True)
class Experiment:
    id: str
    started: float

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Experiment | None:
        return cls(str(data["id"]), float(data["started"])) if data else None


@dataclass(frozen=True)
class Challenger:
    ref: ModelRef
    mode: str
    sample_rate: float
    experiment: Experiment | None
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @property
    def model(self) -> str:
        return self.ref.model

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Challenger:
        return cls(ModelRef.from_json(data), str(data["mode"]), float(data["sample_rate"]),
                   Experiment.from_json(data.get("experiment")), data)


@dataclass(frozen=True)
class Route:
    """One route as `GET /admin/routes/{route}` returns it; `raw` keeps every field."""

    name: str
    version: int
    champion: ModelRef
    challengers: tuple[Challenger, ...]
    policy: Mapping[str, Any]
    rollback_to: ModelRef | None
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Route:
        rollback = data.get("rollback_to")
        return cls(
            name=str(data["name"]), version=int(data["version"]),
            champion=ModelRef.from_json(data["champion"]),
            challengers=tuple(Challenger.from_json(c) for c in data.get("challengers") or ()),
            policy=data.get("policy") or {"type": "champion"},
            rollback_to=ModelRef.from_json(rollback) if rollback else None, raw=data)

    def challenger(self, model: str) -> Challenger | None:
        return next((c for c in self.challengers if c.model == model), None)


@dataclass(frozen=True)
class AuditEntry:
    ts: float
    action: str
    route: str | None
    outcome: str
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AuditEntry:
        return cls(float(data.get("ts") or 0), str(data.get("action")), data.get("route"),
                   str(data.get("outcome")), data)


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _pick(values: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {k: values[k] for k in names if values.get(k) is not None}


class AdminClient:
    """The admin API of one gateway. Writes send `expected_version` as `If-Match` when given,
    so a change racing another one gets Refused (409) instead of overwriting it."""

    def __init__(self, base_url: str = DEFAULT_GATEWAY, *, token: str | None = None,
                 read_token: str | None = None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.read_token = read_token
        self.timeout = timeout

    @classmethod
    def from_env(cls, base_url: str | None = None, *, timeout: float = 30.0,
                 env: Mapping[str, str] | None = None) -> AdminClient:
        """Tokens come from the environment, never from flags (shell history, `ps`)."""
        env = os.environ if env is None else env
        return cls(base_url or env.get(GATEWAY_ENV) or DEFAULT_GATEWAY,
                   token=env.get(TOKEN_ENV) or None, read_token=env.get(READ_TOKEN_ENV) or None,
                   timeout=timeout)

    # -- reads ----------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        payload = self.call("GET", "/routes")
        return [Route.from_json(r) for r in payload.get("routes") or ()]

    def route(self, name: str) -> Route:
        return Route.from_json(self.call("GET", f"/routes/{_quote(name)}"))

    def audit(self, route: str | None = None, limit: int = 20) -> list[AuditEntry]:
        query = {"limit": str(limit), **({"route": route} if route else {})}
        payload = self.call("GET", "/audit?" + urllib.parse.urlencode(query))
        return [AuditEntry.from_json(e) for e in payload.get("entries") or ()]

    # -- writes ---------------------------------------------------------------------------

    def add_challenger(self, route: str, model: str, *, version: str | None = None,
                       expected_version: int | None = None, **settings: Any) -> Route:
        body = {"model": model, **_pick({"version": version}, ("version",)),
                **_pick(settings, CHALLENGER_FIELDS)}
        return self._route_call("POST", f"/routes/{_quote(route)}/challengers", body,
                                expected_version)

    def update_challenger(self, route: str, model: str, *, expected_version: int | None = None,
                          **settings: Any) -> Route:
        return self._route_call(
            "PATCH", f"/routes/{_quote(route)}/challengers/{_quote(model)}",
            _pick(settings, CHALLENGER_FIELDS), expected_version)

    def remove_challenger(self, route: str, model: str, *,
                          expected_version: int | None = None) -> Route:
        return self._route_call("DELETE", f"/routes/{_quote(route)}/challengers/{_quote(model)}",
                                None, expected_version)

    def promote(self, route: str, model: str, *, experiment: str | None = None,
                expected_version: int | None = None) -> Route:
        body = {"model": model, **_pick({"experiment": experiment}, ("experiment",))}
        return self._route_call("POST", f"/routes/{_quote(route)}/promote", body,
                                expected_version)

    def rollback(self, route: str, *, expected_version: int | None = None) -> Route:
        return self._route_call("POST", f"/routes/{_quote(route)}/rollback", {},
                                expected_version)

    def set_policy(self, route: str, policy_type: str, *, expected_version: int | None = None,
                   **settings: Any) -> Route:
        body = {"type": policy_type, **_pick(settings, POLICY_FIELDS)}
        return self._route_call("PUT", f"/routes/{_quote(route)}/policy", body, expected_version)

    # -- transport ------------------------------------------------------------------------

    def _route_call(self, method: str, path: str, body: dict[str, Any] | None,
                    expected_version: int | None) -> Route:
        return Route.from_json(self.call(method, path, body, expected_version=expected_version))

    def call(self, method: str, path: str, body: Any = None, *,
             expected_version: int | None = None) -> Any:
        """One admin API call: the decoded JSON answer, or a typed AdminError."""
        url = f"{self.base_url}/admin{path}"
        token = self.token or (self.read_token if method == "GET" else None)
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if expected_version is not None and method != "GET":
            headers["If-Match"] = f'"{expected_version}"'
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise self._error(exc.code, exc.read(), str(exc.reason), token) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(f"cannot reach the gateway at {self.base_url}: {reason}",
                              None) from None
        return json.loads(raw) if raw else {}

    @staticmethod
    def _error(status: int, raw: bytes, reason: str, token: str | None) -> AdminError:
        try:
            message = str(json.loads(raw)["error"])
        except (ValueError, KeyError, TypeError):
            message = raw.decode("utf-8", "replace").strip() or reason
        if status == 401 and not token:
            message += f" (set {TOKEN_ENV} to the gateway's admin token)"
        return (ServerError if status >= 500 else Refused)(message, status)
