"""The admin API (`/admin/...`): the HTTP adapter over `gateway.control.registry.Registry`.

Mounted as an aiohttp sub-application so that its auth middleware covers exactly the admin
endpoints: the data plane (`/v2/...`) stays unauthenticated. Errors are raised as
`GatewayError`s and turned into `{"error": ...}` bodies by
`gateway.rest.inference.error_middleware`, like
every other endpoint; auth errors carry their `WWW-Authenticate` header with them.

Auth (RFC 6750 bearer tokens):
- tokens come only from the environment variables named in `admin.token_env` (write scope)
  and `admin.read_token_env` (read scope), never from YAML, and are never logged;
- they are compared in constant time (`hmac.compare_digest` on SHA-256 digests, so not even
  the length leaks), against every configured token without short-circuiting;
- missing or wrong token: 401 with `WWW-Authenticate`; read token on a write: 403;
- no write token configured: writes are refused with 403 saying how to configure one (the
  admin API is never open by default). The write token also grants read.

Feedback scope: `POST /v2/feedback` (the data plane's one write that steers policies and ground
truth) needs the token in `admin.feedback_token_env` (default `$UNDERSTUDY_FEEDBACK_TOKEN`), or
the admin write token, whenever that variable is set; unset, feedback is open (and a WARNING
says so at start). The feedback token grants nothing on `/admin`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from aiohttp import web

from gateway.backends.factory import Backends
from gateway.config import AdminConfig, GatewayConfig
from gateway.control.audit import Actor, AuditLog, load_history, token_fingerprint
from gateway.control.registry import Registry
from gateway.dataplane.protocol import json_object
from gateway.dataplane.routes import RouteTable
from gateway.errors import BadRequest, Forbidden, Unauthorized
from gateway.rest.inference import FEEDBACK, MAX_BODY
from understudy.settings import ADMIN_READ_TOKEN_ENV, ADMIN_TOKEN_ENV, FEEDBACK_TOKEN_ENV

log = logging.getLogger(__name__)

Scope = Literal["read", "write", "feedback"]
REALM = "understudy-admin"
MIN_TOKEN_LENGTH = 16

REGISTRY = web.AppKey("registry", Registry)
ACTOR = web.RequestKey("admin_actor", Actor)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AuthRequired(Unauthorized):
    """401 with the RFC 6750 challenge the client needs to retry correctly."""

    def __init__(self, message: str, error: str | None = None) -> None:
        challenge = f'Bearer realm="{REALM}"' + (f', error="{error}"' if error else "")
        super().__init__(message, headers={"WWW-Authenticate": challenge})


class InsufficientScope(Forbidden):
    def __init__(self, message: str) -> None:
        super().__init__(message, headers={
            "WWW-Authenticate": f'Bearer realm="{REALM}", error="insufficient_scope"'})


@dataclass(frozen=True)
class _Token:
    scope: Scope
    digest: bytes
    actor: Actor


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class AdminAuth:
    """Checks bearer tokens; holds only their digests and fingerprints, never the tokens."""

    def __init__(
        self,
        write_token: str | None,
        read_token: str | None,
        *,
        write_env: str = ADMIN_TOKEN_ENV,
        read_env: str = ADMIN_READ_TOKEN_ENV,
        feedback_token: str | None = None,
        feedback_env: str = FEEDBACK_TOKEN_ENV,
    ) -> None:
        self.write_env = write_env
        self.read_env = read_env
        self.feedback_env = feedback_env
        self.feedback_required = bool(feedback_token)
        self._tokens: list[_Token] = []
        scopes: tuple[tuple[Scope, str | None, str], ...] = (
            ("write", write_token, write_env), ("read", read_token, read_env),
            ("feedback", feedback_token, feedback_env),
        )
        for scope, token, env in scopes:
            if not token:
                continue
            if len(token) < MIN_TOKEN_LENGTH:
                log.warning("admin token in $%s is shorter than %d characters; use a long "
                            "random secret", env, MIN_TOKEN_LENGTH)
            actor = Actor(scope, token_fingerprint(token))
            self._tokens.append(_Token(scope, _digest(token), actor))
        if write_token and read_token and write_token == read_token:
            log.warning("$%s and $%s hold the same token: it has write scope", write_env, read_env)
            self._tokens = [t for t in self._tokens if t.scope != "read"]
        if feedback_token and feedback_token in (write_token, read_token):
            log.warning("$%s holds an admin token; give feedback its own token", feedback_env)
            self._tokens = [t for t in self._tokens if t.scope != "feedback"]
        if not any(t.scope == "write" for t in self._tokens):
            log.warning("admin writes are disabled: $%s is not set", write_env)
        if not feedback_token:
            log.warning("POST /v2/feedback accepts labels without a token: set $%s "
                        "(admin.feedback_token_env) to require one", feedback_env)

    @classmethod
    def from_env(cls, config: AdminConfig, env: Mapping[str, str]) -> AdminAuth:
        return cls(
            env.get(config.token_env) or None,
            env.get(config.read_token_env) or None,
            write_env=config.token_env,
            read_env=config.read_token_env,
            feedback_token=env.get(config.feedback_token_env) or None,
            feedback_env=config.feedback_token_env,
        )

    @property
    def write_enabled(self) -> bool:
        return any(t.scope == "write" for t in self._tokens)

    def authenticate(self, authorization: str | None, need: Scope) -> Actor:
        """The caller's identity, or an Unauthorized/Forbidden error saying what to do."""
        if need == "write" and not self.write_enabled:
            raise Forbidden(
                "admin changes are disabled because no write token is configured: set the "
                f"environment variable {self.write_env} (admin.token_env) to a long random "
                "secret for the gateway and restart it"
            )
        if not any(t.scope in ("read", "write") for t in self._tokens):
            raise Forbidden(
                "the admin API is disabled because no token is configured: set the "
                f"environment variable {self.write_env} (read-write) or {self.read_env} "
                "(read-only) for the gateway and restart it"
            )
        match = self._match(authorization)
        if match.scope == "feedback":
            raise InsufficientScope(
                f"this token ({self.feedback_env}) may only post feedback (/v2/feedback)"
            )
        if need == "write" and match.scope != "write":
            raise InsufficientScope(
                f"this token has read-only scope; changes need the write token ({self.write_env})"
            )
        return match.actor

    def authorize_feedback(self, authorization: str | None) -> None:
        """Gate for POST /v2/feedback: open unless a feedback token is configured; then the
        feedback token or the admin write token."""
        if not self.feedback_required:
            return
        match = self._match(authorization)
        if match.scope not in ("feedback", "write"):
            raise InsufficientScope(
                f"posting feedback needs the feedback token ({self.feedback_env}) or the admin "
                "write token"
            )

    def _match(self, authorization: str | None) -> _Token:
        """The configured token the header carries; 401 when missing, malformed or unknown."""
        if not authorization:
            raise AuthRequired("missing bearer token: send 'Authorization: Bearer <token>'")
        scheme, _, credentials = authorization.strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() != "bearer" or not credentials:
            raise AuthRequired(
                "the Authorization header must be 'Bearer <token>'", error="invalid_request"
            )
        given = _digest(credentials)
        match: _Token | None = None
        for token in self._tokens:  # no early exit: the time taken does not say which matched
            if hmac.compare_digest(given, token.digest):
                match = token
        if match is None:
            raise AuthRequired("invalid token", error="invalid_token")
        return match


AUTH = web.AppKey("admin_auth", AdminAuth)


def required_scope(method: str) -> Scope:
    """The scope an `/admin` request needs: reading is read, anything else write (the OpenAPI
    document states the same from here, gateway/rest/openapi.py)."""
    return "read" if method in ("GET", "HEAD", "OPTIONS") else "write"


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    need = required_scope(request.method)
    request[ACTOR] = request.config_dict[AUTH].authenticate(
        request.headers.get("Authorization"), need
    )
    return await handler(request)


# -- helpers ------------------------------------------------------------------------------


def _json(payload: object, status: int = 200) -> web.Response:
    headers = {}
    if isinstance(payload, dict) and isinstance(payload.get("version"), int):
        headers["ETag"] = f'"{payload["version"]}"'
    return web.Response(body=orjson.dumps(payload), status=status,
                        content_type="application/json", headers=headers)


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    return json_object(raw, "the request body") if raw.strip() else {}


def _expected_version(request: web.Request, body: Mapping[str, Any]) -> int | None:
    """Compare-and-set version from `If-Match: "N"`, body `expected_version`, or the query."""
    raw: Any = request.headers.get("If-Match")
    if raw is not None:
        raw = raw.strip().removeprefix("W/").strip('"')
    elif "expected_version" in body:
        raw = body["expected_version"]
    else:
        raw = request.query.get("expected_version")
    if raw is None:
        return None
    try:
        if isinstance(raw, bool):
            raise ValueError
        return int(raw)
    except (TypeError, ValueError):
        raise BadRequest(f"expected_version must be an integer, got {raw!r}") from None


def _registry(request: web.Request) -> Registry:
    return request.config_dict[REGISTRY]


# -- handlers -----------------------------------------------------------------------------


async def list_routes(request: web.Request) -> web.Response:
    return _json({"routes": _registry(request).list_routes()})


async def get_route(request: web.Request) -> web.Response:
    return _json(_registry(request).get_route(request.match_info["route"]))


async def put_route(request: web.Request) -> web.Response:
    body = await _body(request)
    view, created = await _registry(request).put_route(
        request[ACTOR], request.match_info["route"], body, _expected_version(request, body)
    )
    return _json(view, 201 if created else 200)


async def delete_route(request: web.Request) -> web.Response:
    body = await _body(request)
    route = request.match_info["route"]
    await _registry(request).delete_route(request[ACTOR], route, _expected_version(request, body))
    return _json({"deleted": route})


async def add_challenger(request: web.Request) -> web.Response:
    body = await _body(request)
    view = await _registry(request).add_challenger(
        request[ACTOR], request.match_info["route"], body, _expected_version(request, body)
    )
    return _json(view, 201)


async def update_challenger(request: web.Request) -> web.Response:
    body = await _body(request)
    view = await _registry(request).update_challenger(
        request[ACTOR], request.match_info["route"], request.match_info["model"], body,
        _expected_version(request, body),
    )
    return _json(view)


async def remove_challenger(request: web.Request) -> web.Response:
    body = await _body(request)
    view = await _registry(request).remove_challenger(
        request[ACTOR], request.match_info["route"], request.match_info["model"],
        _expected_version(request, body),
    )
    return _json(view)


async def set_policy(request: web.Request) -> web.Response:
    body = await _body(request)
    view = await _registry(request).set_policy(
        request[ACTOR], request.match_info["route"], body, _expected_version(request, body)
    )
    return _json(view)


# The promote body's fields (the OpenAPI document lists these).
PROMOTE_FIELDS = ("model", "experiment", "expected_version")


async def promote(request: web.Request) -> web.Response:
    body = await _body(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("the body must name the challenger to promote: {\"model\": \"...\"}")
    unknown = sorted(set(body) - set(PROMOTE_FIELDS))
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}")
    experiment = body.get("experiment")
    if experiment is not None and (not isinstance(experiment, str) or not experiment):
        raise BadRequest("experiment must be the challenger's experiment id (a string)")
    view = await _registry(request).promote(
        request[ACTOR], request.match_info["route"], model, _expected_version(request, body),
        experiment,
    )
    return _json(view)


async def rollback(request: web.Request) -> web.Response:
    body = await _body(request)
    view = await _registry(request).rollback(
        request[ACTOR], request.match_info["route"], _expected_version(request, body)
    )
    return _json(view)


async def audit(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise BadRequest("limit must be an integer") from None
    entries = await _registry(request).audit_trail(
        min(max(limit, 0), 1000), request.query.get("route")
    )
    return _json({"entries": entries})


async def whoami(request: web.Request) -> web.Response:
    return _json(request[ACTOR].to_json())


def build_admin_app(registry: Registry, auth: AdminAuth) -> web.Application:
    """The `/admin` sub-application; mount with `app.add_subapp("/admin", ...)`."""
    admin = web.Application(middlewares=[auth_middleware])
    admin[REGISTRY] = registry
    admin[AUTH] = auth
    admin.router.add_get("/routes", list_routes)
    admin.router.add_get("/routes/{route}", get_route)
    admin.router.add_put("/routes/{route}", put_route)
    admin.router.add_delete("/routes/{route}", delete_route)
    admin.router.add_post("/routes/{route}/challengers", add_challenger)
    admin.router.add_patch("/routes/{route}/challengers/{model}", update_challenger)
    admin.router.add_delete("/routes/{route}/challengers/{model}", remove_challenger)
    admin.router.add_put("/routes/{route}/policy", set_policy)
    admin.router.add_post("/routes/{route}/promote", promote)
    admin.router.add_post("/routes/{route}/rollback", rollback)
    admin.router.add_get("/audit", audit)
    admin.router.add_get("/whoami", whoami)
    return admin


CleanupCtx = Callable[[web.Application], AsyncIterator[None]]


def install_admin(
    app: web.Application,
    config: GatewayConfig,
    routes: RouteTable,
    backends: Backends,
    *,
    env: Mapping[str, str] | None = None,
    endpoints: Sequence[Callable[[web.Application], None]] = (),
) -> CleanupCtx:
    """Wire the control plane into the gateway app: registry, audit, `/admin` sub-app.

    Returns the cleanup context that starts the registry (load the store, seed from YAML,
    apply to the route table, follow other replicas) and stops it; the caller places it after
    the sink's (audit entries go to the sink) and before the recorder's.
    """
    audit_log = AuditLog(backends.sink)
    registry = Registry(routes, backends.store, audit_log, config.routes,
                        source_of_truth=config.admin.source_of_truth)
    auth = AdminAuth.from_env(config.admin, os.environ if env is None else env)
    if FEEDBACK in app:
        app[FEEDBACK].authorize = auth.authorize_feedback
    admin = build_admin_app(registry, auth)
    admin[MAX_BODY] = config.listen.max_body_bytes  # error_middleware reads it from request.app
    app[REGISTRY] = registry
    for add_endpoints in endpoints:  # more /admin endpoints (e.g. gateway/rest/rollout.py)
        add_endpoints(admin)
    app.add_subapp("/admin", admin)

    async def registry_ctx(_: web.Application) -> AsyncIterator[None]:
        # Read concurrently with the registry's start: both may wait on the broker.
        history = asyncio.create_task(load_history(backends.read_stream, audit_log.capacity))
        try:
            await registry.start()
        finally:
            loaded = audit_log.load(await history)
        log.info("audit: %d past entries read from the audit stream", loaded)
        yield
        await registry.close()

    return registry_ctx
