"""The gateway's OpenAPI 3.1 document (`GET /openapi.json`) and a small docs page (`GET /docs`).

Why it cannot drift from the handlers:
- the paths and methods are the live router's (`document` walks the app and its `/admin`
  sub-app); every route needs an entry in `OPERATIONS`, and one without (or an entry without a
  route) is a test failure (tests/unit/test_openapi.py);
- the admin bodies' schemas are derived from the dataclasses the parsers build
  (gateway/config.py): field names, JSON types, the vocabulary's `Literal`s, defaults, and the
  numeric ranges the parsers check (each field's `Bound`); model names and versions from the
  same patterns `check_model_name`/`check_model_version` use;
- the feedback item is the label validator's own schema (understudy/labels.py);
- the inference request is built from the constants the request validator checks
  (gateway/dataplane/protocol.py: datatypes, rank, dimension limit, typed parameters);
- the admin scopes come from `gateway.rest.admin.required_scope`, the one the middleware uses.

What JSON Schema cannot state (a value relative to another field: `batch_max_wait_ms` below
`timeout_ms`, `fallback` among the challengers, a shape's element count) is in descriptions;
tests/unit/test_openapi.py generates bodies from this document and checks the parsers accept
them, and breaks each stated constraint and checks the parsers refuse it, naming the field.
Schemathesis runs against the live gateway from it (tests/integration/test_openapi_live.py).
The schemas themselves are built in gateway/rest/openapi_schemas.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import orjson
from aiohttp import web

from gateway import __version__
from gateway.control.registry import ROUTE_NAME
from gateway.rest.admin import MIN_TOKEN_LENGTH, REALM, required_scope
from gateway.rest.inference import ROUTES
from gateway.rest.openapi_schemas import MODEL_NAME_SCHEMA, Schema, ref, schemas

OPENAPI_VERSION = "3.1.0"


# -- operations -----------------------------------------------------------------------------

ERRORS = {
    400: "Malformed or invalid request; `error` names the field.",
    401: "Missing or invalid bearer token (with `WWW-Authenticate`).",
    403: "The token's scope does not allow this, or no token is configured.",
    404: "Unknown route, challenger or path.",
    409: "Version mismatch (`expected_version`) or a conflicting state.",
    413: "Request body over listen.max_body_bytes (or too many feedback items).",
    422: "Well-formed, but names a model Triton cannot serve on this route.",
    502: "Triton answered with something that is not a valid response.",
    503: "Triton (or the model) is not reachable or not ready.",
    504: "Triton did not answer in time.",
}
UPSTREAM = (502, 503, 504)


@dataclass(frozen=True)
class Operation:
    summary: str
    tag: str
    ok: int = 200
    ok_schema: Schema | None = None
    body: str | None = None  # a components.schemas name
    body_required: bool = True
    errors: tuple[int, ...] = ()
    security: Literal["admin", "feedback"] | None = None
    ok_content: str = "application/json"
    description: str = ""


_ROUTE_ERR = (400, 401, 403, 404, 413)
_WRITE_ERR = (*_ROUTE_ERR, 409)
_CHANGE_ERR = (*_WRITE_ERR, 422, *UPSTREAM)
_OBJECT: Schema = {"type": "object"}
_ROUTE_VIEW = ref("RouteView")
_V2_READ = (404, *UPSTREAM)

# Every route the gateway registers, by (method, path template).
OPERATIONS: dict[tuple[str, str], Operation] = {
    ("GET", "/admin/routes"): Operation(
        "List routes", "admin", ok_schema={"type": "object", "required": ["routes"],
                                           "properties": {"routes": {"type": "array",
                                                                     "items": _ROUTE_VIEW}}},
        errors=(401, 403), security="admin"),
    ("GET", "/admin/routes/{route}"): Operation(
        "Get a route", "admin", ok_schema=_ROUTE_VIEW, errors=(401, 403, 404),
        security="admin"),
    ("PUT", "/admin/routes/{route}"): Operation(
        "Create or replace a route", "admin", ok_schema=_ROUTE_VIEW, body="RouteBody",
        errors=_CHANGE_ERR, security="admin",
        description="200 when replaced; 201 when created."),
    ("DELETE", "/admin/routes/{route}"): Operation(
        "Delete a route", "admin", ok_schema={"type": "object", "required": ["deleted"],
                                              "properties": {"deleted": {"type": "string"}}},
        body="VersionOnly", body_required=False, errors=_WRITE_ERR, security="admin"),
    ("POST", "/admin/routes/{route}/challengers"): Operation(
        "Add a challenger", "admin", ok=201, ok_schema=_ROUTE_VIEW, body="ChallengerBody",
        errors=_CHANGE_ERR, security="admin"),
    ("PATCH", "/admin/routes/{route}/challengers/{model}"): Operation(
        "Change a challenger's settings", "admin", ok_schema=_ROUTE_VIEW,
        body="ChallengerPatch", errors=_CHANGE_ERR, security="admin"),
    ("DELETE", "/admin/routes/{route}/challengers/{model}"): Operation(
        "Remove a challenger", "admin", ok_schema=_ROUTE_VIEW, body="VersionOnly",
        body_required=False, errors=_WRITE_ERR, security="admin"),
    ("PUT", "/admin/routes/{route}/policy"): Operation(
        "Set the route's policy", "admin", ok_schema=_ROUTE_VIEW, body="PolicyBody",
        body_required=False, errors=_CHANGE_ERR, security="admin"),
    ("POST", "/admin/routes/{route}/promote"): Operation(
        "Promote a challenger to champion", "admin", ok_schema=_ROUTE_VIEW, body="PromoteBody",
        errors=_CHANGE_ERR, security="admin"),
    ("POST", "/admin/routes/{route}/rollback"): Operation(
        "Undo the last promotion", "admin", ok_schema=_ROUTE_VIEW, body="VersionOnly",
        body_required=False, errors=_CHANGE_ERR, security="admin"),
    ("POST", "/admin/routes/{route}/rollout"): Operation(
        "Start a guarded rollout", "admin", ok=201, ok_schema=_OBJECT, body="RolloutStart",
        errors=_CHANGE_ERR, security="admin"),
    ("GET", "/admin/routes/{route}/rollout"): Operation(
        "The route's current or last rollout", "admin", ok_schema=_OBJECT,
        errors=(401, 403, 404), security="admin"),
    ("DELETE", "/admin/routes/{route}/rollout"): Operation(
        "Abort the running rollout", "admin", ok_schema=_OBJECT, body="VersionOnly",
        body_required=False, errors=_CHANGE_ERR, security="admin"),
    ("GET", "/admin/audit"): Operation(
        "Recent admin changes, newest first", "admin",
        ok_schema={"type": "object", "required": ["entries"],
                   "properties": {"entries": {"type": "array", "items": _OBJECT}}},
        errors=(400, 401, 403, 503), security="admin"),
    ("GET", "/admin/whoami"): Operation(
        "The caller's scope and token fingerprint", "admin",
        ok_schema={"type": "object", "required": ["scope"],
                   "properties": {"scope": {"type": "string"}}},
        errors=(401, 403), security="admin"),
    ("POST", "/v2/models/{route}/infer"): Operation(
        "Inference (served by the route's policy; challengers get shadow copies)", "inference",
        ok_schema=ref("InferenceResponse"), body="InferenceRequest",
        errors=(400, 404, 413, *UPSTREAM)),
    ("POST", "/v2/models/{route}/versions/{version}/infer"): Operation(
        "Inference (the version is the route's, not the URL's)", "inference",
        ok_schema=ref("InferenceResponse"), body="InferenceRequest",
        errors=(400, 404, 413, *UPSTREAM)),
    **{("GET", f"/v2/models/{{route}}{version}{suffix}"): Operation(
        f"The champion's {what}, named as the route", "inference", ok_schema=_OBJECT,
        errors=_V2_READ)
       for version in ("", "/versions/{version}")
       for suffix, what in (("", "metadata"), ("/config", "config"), ("/stats", "statistics"))},
    **{("GET", f"/v2/models/{{route}}{version}/ready"): Operation(
        "Ready when the route's champion is", "health", ok_content="", errors=(404, 503))
       for version in ("", "/versions/{version}")},
    ("GET", "/v2/health/live"): Operation("Liveness", "health", ok_content=""),
    ("GET", "/v2/health/ready"): Operation(
        "Ready when the champions' Triton is", "health", ok_content="", errors=(503,)),
    ("GET", "/v2"): Operation(
        "Server metadata", "inference",
        ok_schema={"type": "object", "required": ["name", "version", "extensions"]}),
    ("POST", "/v2/repository/index"): Operation(
        "The routes, as a model repository index", "inference",
        ok_schema={"type": "array", "items": {"type": "object",
                                              "required": ["name", "state"]}}),
    ("POST", "/v2/feedback"): Operation(
        "Post ground-truth labels or rewards", "feedback", ok_schema=ref("FeedbackAccepted"),
        body="FeedbackBody", errors=(400, 401, 403, 413), security="feedback",
        description="Items are validated one by one: good items are kept even when others "
                    "are bad (400 then lists each bad item)."),
    ("GET", "/metrics"): Operation("Prometheus metrics", "operations", ok_content="text/plain"),
    ("GET", "/openapi.json"): Operation("This document", "operations", ok_schema=_OBJECT),
    ("GET", "/docs"): Operation("A page listing the operations", "operations",
                                ok_content="text/html"),
}


def registered_routes(app: web.Application) -> Iterator[tuple[str, str]]:
    """(method, path template) of every route `app` serves, its sub-apps' included (their
    resources carry the prefix), HEAD aside."""
    for route in app.router.routes():
        if route.method not in ("HEAD", "*") and route.resource is not None:
            yield route.method, route.resource.canonical


def _parameters(path: str, routes: list[str], models: list[str]) -> list[Schema]:
    params: list[Schema] = []
    if "{route}" in path:
        schema: Schema = {"type": "string"}
        if path.startswith("/admin"):
            schema["pattern"] = ROUTE_NAME.pattern
        if routes:
            schema["examples"] = routes
        params.append({"name": "route", "in": "path", "required": True, "schema": schema})
    if "{model}" in path:
        schema = dict(MODEL_NAME_SCHEMA)
        if models:
            schema["examples"] = models
        params.append({"name": "model", "in": "path", "required": True, "schema": schema})
    if "{version}" in path:
        params.append({"name": "version", "in": "path", "required": True,
                       "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"}})
    return params


def _operation(method: str, path: str, op: Operation, routes: list[str], models: list[str]
               ) -> Schema:
    ok: Schema = {"description": op.description or "OK"}
    if op.ok_content == "application/json":
        ok["content"] = {"application/json": {"schema": op.ok_schema or _OBJECT}}
    elif op.ok_content:
        ok["content"] = {op.ok_content: {"schema": {"type": "string"}}}
    responses: dict[str, Schema] = {str(op.ok): ok}
    if method == "PUT" and path == "/admin/routes/{route}":
        responses["201"] = {"description": "Created",
                            "content": {"application/json": {"schema": _ROUTE_VIEW}}}
    error = {"application/json": {"schema": ref("Error")}}
    for status in op.errors:
        responses[str(status)] = {"description": ERRORS[status], "content": error}
    out: Schema = {"summary": op.summary, "tags": [op.tag],
                   "operationId": f"{method.lower()}{path.replace('/', '_')}".replace(
                       "{", "").replace("}", ""),
                   "responses": responses}
    if op.description:
        out["description"] = op.description
    params = _parameters(path, routes, models)
    if op.security == "admin":
        if required_scope(method) == "write":
            out["security"] = [{"adminWrite": []}]
            params += [
                {"name": "If-Match", "in": "header", "required": False,
                 "schema": {"type": "string", "pattern": '^(W/)?"?[0-9]+"?$'},
                 "description": "Compare-and-set on the route's version (its ETag)."},
                {"name": "expected_version", "in": "query", "required": False,
                 "schema": {"type": "integer"}},
            ]
        else:
            out["security"] = [{"adminRead": []}, {"adminWrite": []}]
    elif op.security == "feedback":
        out["security"] = [{"feedbackToken": []}, {"adminWrite": []}, {}]
    if path == "/admin/audit":
        params += [{"name": "limit", "in": "query", "required": False,
                    "schema": {"type": "integer", "default": 100},
                    "description": "At most this many (clamped to [0, 1000])."},
                   {"name": "route", "in": "query", "required": False,
                    "schema": {"type": "string"}}]
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {"required": op.body_required, "content": {
            "application/json": {"schema": ref(op.body)}}}
    return out


SECURITY_SCHEMES: dict[str, Schema] = {
    "adminWrite": {
        "type": "http", "scheme": "bearer",
        "description": "The admin write token (the variable admin.token_env names, default "
                       "UNDERSTUDY_ADMIN_TOKEN; at least "
                       f"{MIN_TOKEN_LENGTH} characters advised): every /admin operation, and "
                       f"/v2/feedback. Realm \"{REALM}\". Without one, admin writes are 403."},
    "adminRead": {
        "type": "http", "scheme": "bearer",
        "description": "The admin read-only token (admin.read_token_env, default "
                       "UNDERSTUDY_ADMIN_READ_TOKEN): GET /admin/...; a write is 403."},
    "feedbackToken": {
        "type": "http", "scheme": "bearer",
        "description": "The feedback token (admin.feedback_token_env, default "
                       "UNDERSTUDY_FEEDBACK_TOKEN): only POST /v2/feedback. When that variable "
                       "is unset, feedback needs no token."},
}


def document(app: web.Application, routes: list[str] | None = None,
             models: list[str] | None = None) -> Schema:
    """The OpenAPI document for `app`'s routes; `routes` and `models`: the route and model
    names to offer as examples of the path parameters.

    Raises KeyError for a registered route without an entry in `OPERATIONS`."""
    paths: dict[str, dict[str, Schema]] = {}
    for method, path in sorted(set(registered_routes(app))):
        op = OPERATIONS[(method, path)]
        paths.setdefault(path, {})[method.lower()] = _operation(method, path, op, routes or [],
                                                                models or [])
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "Understudy gateway", "version": __version__,
                 "description": "Champion/challenger gateway in front of Triton: the KServe V2 "
                                "data plane, ground-truth feedback and the admin API. Errors "
                                "are `{\"error\": \"...\"}`. Integers are written without a "
                                "fraction (1, not 1.0)."},
        "paths": paths,
        "components": {"schemas": schemas(), "securitySchemes": SECURITY_SCHEMES},
        "tags": [{"name": t} for t in ("inference", "feedback", "admin", "health",
                                       "operations")],
    }


# -- handlers -------------------------------------------------------------------------------

async def openapi_json(request: web.Request) -> web.Response:
    """Built per request: the route and model names offered as examples are the live ones."""
    configs = [runtime.config for runtime in request.app[ROUTES]]
    names = sorted(c.name for c in configs)
    models = sorted({m for c in configs for m in (c.champion.model,
                                                   *(ch.model for ch in c.challengers))})
    return web.Response(body=orjson.dumps(document(request.app, names, models)),
                        content_type="application/json")


DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Understudy gateway API</title>
<style>body{font:14px/1.4 system-ui,sans-serif;margin:2em;max-width:60em}
code{background:#f3f3f3;padding:0 .2em}td{padding:.2em .6em;vertical-align:top}
.m{font-weight:bold;font-family:monospace}</style></head>
<body><h1>Understudy gateway API</h1>
<p>The machine-readable document: <a href="openapi.json"><code>/openapi.json</code></a>
(OpenAPI 3.1). Errors are <code>{"error": "..."}</code>.</p>
<table id="ops"><tr><th>Method</th><th>Path</th><th>Summary</th><th>Auth</th><th>Responses</th>
</tr></table>
<script>
fetch("openapi.json").then(r => r.json()).then(doc => {
  const table = document.getElementById("ops");
  for (const [path, ops] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const row = table.insertRow();
      const auth = (op.security || []).map(s => Object.keys(s)[0] || "none").join(" or ");
      for (const [text, cls] of [[method.toUpperCase(), "m"], [path, "m"], [op.summary, ""],
                                 [auth, ""], [Object.keys(op.responses).join(" "), ""]]) {
        const cell = row.insertCell(); cell.textContent = text; cell.className = cls;
      }
    }
  }
});
</script></body></html>
"""


async def docs_page(_: web.Request) -> web.Response:
    return web.Response(text=DOCS_PAGE, content_type="text/html")


def add_openapi_routes(app: web.Application) -> None:
    """`GET /openapi.json` and `GET /docs` (unauthenticated: they hold no secrets)."""
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", docs_page)
