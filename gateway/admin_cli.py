"""`python -m gateway challengers list|add|update|remove`, `promote|rollback|policy|audit`: the
admin API from a shell.

A thin client: every command is one HTTP call to a gateway's `/admin` API, so the CLI and curl
behave identically and the gateway stays the only place that validates. The standard library's
urllib is enough for one request per run and keeps the CLI free of an event loop.

- `--gateway URL` (default `$UNDERSTUDY_GATEWAY`, else http://127.0.0.1:8080).
- Token from `$UNDERSTUDY_ADMIN_TOKEN` (reads fall back to `$UNDERSTUDY_ADMIN_READ_TOKEN`);
  never a flag, so it does not end up in shell history or `ps`.
- Human-readable output by default, `--json` prints the server's JSON for scripts.
- Exit status: 0 done, 1 the gateway refused (its error message is printed), 2 usage error,
  3 the gateway could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_GATEWAY = "http://127.0.0.1:8080"
TOKEN_ENV = "UNDERSTUDY_ADMIN_TOKEN"  # noqa: S105 - the variable's name, not a secret
READ_TOKEN_ENV = "UNDERSTUDY_ADMIN_READ_TOKEN"  # noqa: S105
EXIT_REFUSED = 1
EXIT_UNREACHABLE = 3


class CliError(Exception):
    def __init__(self, message: str, code: int, payload: dict[str, Any]) -> None:
        super().__init__(message)
        self.code = code
        self.payload = payload


def request(
    args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    """One admin API call; returns the decoded JSON or raises CliError."""
    base = args.gateway.rstrip("/")
    url = base + "/admin" + path
    token = os.environ.get(TOKEN_ENV) or (
        os.environ.get(READ_TOKEN_ENV) if method == "GET" else None
    )
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if getattr(args, "expected_version", None) is not None and method != "GET":
        headers["If-Match"] = f'"{args.expected_version}"'
    req = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:  # noqa: S310
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            message = json.loads(raw)["error"]
        except (ValueError, KeyError, TypeError):
            message = raw.decode("utf-8", "replace").strip() or exc.reason
        if exc.code == 401 and not token:
            message += f" (set {TOKEN_ENV} to the gateway's admin token)"
        raise CliError(str(message), EXIT_REFUSED,
                       {"error": str(message), "status": exc.code}) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        message = f"cannot reach the gateway at {base}: {reason}"
        raise CliError(message, EXIT_UNREACHABLE, {"error": message, "status": None}) from None
    return json.loads(raw) if raw else {}


# -- human-readable output ----------------------------------------------------------------


def _ref(ref: dict[str, Any]) -> str:
    return f"{ref['model']}:{ref['version']}" if ref.get("version") else str(ref["model"])


def _policy(policy: dict[str, Any]) -> str:
    kind = policy.get("type", "champion")
    if kind == "epsilon_greedy":
        return f"epsilon_greedy (epsilon={policy.get('epsilon')})"
    if kind == "thompson":
        return f"thompson (prior Beta({policy.get('prior_alpha')}, {policy.get('prior_beta')}))"
    return str(kind)


def format_route(route: dict[str, Any]) -> str:
    lines = [
        f"route {route['name']}  version {route['version']}  policy {_policy(route['policy'])}",
        f"  champion    {_ref(route['champion'])}",
    ]
    for ch in route.get("challengers") or []:
        experiment = ch.get("experiment") or {}
        started = (time.strftime("%Y-%m-%d %H:%M", time.localtime(experiment["started"]))
                   if experiment.get("started") else "-")
        lines.append(
            f"  challenger  {_ref(ch):<16} {ch['mode']:<8} sample_rate={ch['sample_rate']:g}  "
            f"timeout={ch['timeout_ms']}ms  concurrency={ch['max_concurrency']}  "
            f"queue={ch['max_queue']}  experiment={experiment.get('id', '-')} since {started}"
        )
    if not route.get("challengers"):
        lines.append("  (no challengers)")
    if route.get("fallback"):
        lines.append(f"  fallback    {route['fallback']}")
    if route.get("rollback_to"):
        lines.append(f"  rollback to {_ref(route['rollback_to'])}  "
                     f"(python -m gateway rollback {route['name']})")
    who = route.get("updated_by") or {}
    if route.get("updated_at"):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(route["updated_at"]))
        lines.append(f"  last change {route.get('last_action')} at {stamp} by "
                     f"{who.get('scope')}:{who.get('fingerprint') or '-'}")
    return "\n".join(lines)


def format_audit(entry: dict[str, Any]) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.get("ts") or 0))
    who = entry.get("actor") or {}
    line = (f"{stamp}  {who.get('scope')}:{who.get('fingerprint') or '-':<12}  "
            f"{entry.get('action'):<17} {entry.get('route'):<12} {entry.get('outcome')}")
    if entry.get("version") is not None and entry.get("outcome") == "applied":
        line += f" -> version {entry['version']}"
    if entry.get("error"):
        line += f": {entry['error']}"
    return line


# -- commands -----------------------------------------------------------------------------


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def cmd_list(args: argparse.Namespace) -> tuple[Any, str]:
    if args.route:
        route = request(args, "GET", f"/routes/{_quote(args.route)}")
        return route, format_route(route)
    payload = request(args, "GET", "/routes")
    routes = payload.get("routes") or []
    return payload, "\n\n".join(format_route(r) for r in routes) or "no routes"


def cmd_add(args: argparse.Namespace) -> tuple[Any, str]:
    body: dict[str, Any] = {"model": args.model, "mode": args.mode}
    for key in ("version", "sample_rate", "timeout_ms", "max_concurrency", "max_queue",
                "batch_max_rows", "batch_max_wait_ms", "latency_probe_every"):
        value = getattr(args, key if key != "version" else "model_version")
        if value is not None:
            body[key] = value
    route = request(args, "POST", f"/routes/{_quote(args.route)}/challengers", body)
    return route, f"added challenger {args.model} to route {args.route}\n\n{format_route(route)}"


def cmd_update(args: argparse.Namespace) -> tuple[Any, str]:
    body: dict[str, Any] = {}
    for key in ("mode", "sample_rate", "timeout_ms", "max_concurrency", "max_queue",
                "batch_max_rows", "batch_max_wait_ms", "latency_probe_every"):
        value = getattr(args, key)
        if value is not None:
            body[key] = value
    if not body:
        raise CliError("nothing to change: give --mode and/or --sample-rate (or a limit)", 2,
                       {"error": "nothing to change", "status": None})
    route = request(args, "PATCH",
                    f"/routes/{_quote(args.route)}/challengers/{_quote(args.model)}", body)
    return route, (f"updated challenger {args.model} of route {args.route} (a new experiment "
                   f"starts when its mode or sample rate changed)\n\n{format_route(route)}")


def cmd_remove(args: argparse.Namespace) -> tuple[Any, str]:
    route = request(args, "DELETE",
                    f"/routes/{_quote(args.route)}/challengers/{_quote(args.model)}")
    return route, (f"removed challenger {args.model} from route {args.route}\n\n"
                   f"{format_route(route)}")


def cmd_promote(args: argparse.Namespace) -> tuple[Any, str]:
    body = {"model": args.model}
    if args.experiment:
        body["experiment"] = args.experiment
    route = request(args, "POST", f"/routes/{_quote(args.route)}/promote", body)
    previous = route.get("rollback_to") or {}
    text = (f"{args.model} is now the champion of route {args.route}; the previous champion "
            f"{_ref(previous) if previous else '?'} stays as a shadow challenger "
            f"(undo: python -m gateway rollback {args.route})\n\n{format_route(route)}")
    return route, text


def cmd_rollback(args: argparse.Namespace) -> tuple[Any, str]:
    route = request(args, "POST", f"/routes/{_quote(args.route)}/rollback", {})
    return route, (f"rolled back route {args.route}: {_ref(route['champion'])} is champion "
                   f"again\n\n{format_route(route)}")


def cmd_policy(args: argparse.Namespace) -> tuple[Any, str]:
    body: dict[str, Any] = {"type": args.type}
    for key in ("epsilon", "prior_alpha", "prior_beta", "sticky_header", "reward"):
        value = getattr(args, key)
        if value is not None:
            body[key] = value
    route = request(args, "PUT", f"/routes/{_quote(args.route)}/policy", body)
    return route, f"route {args.route} policy is now {_policy(route['policy'])}\n\n" \
                  f"{format_route(route)}"


def cmd_audit(args: argparse.Namespace) -> tuple[Any, str]:
    query = {"limit": str(args.limit)}
    if args.route:
        query["route"] = args.route
    payload = request(args, "GET", "/audit?" + urllib.parse.urlencode(query))
    entries = payload.get("entries") or []
    return payload, "\n".join(format_audit(e) for e in entries) or "no audit entries"


def _run(handler: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            payload, text = handler(args)
        except CliError as exc:
            if args.as_json:
                print(json.dumps(exc.payload))
            print(f"error: {exc}", file=sys.stderr)
            return exc.code
        print(json.dumps(payload, indent=2) if args.as_json else text)
        return 0

    return run


def add_admin_commands(sub: Any) -> None:
    """Register the admin commands on `python -m gateway`'s subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--gateway", default=os.environ.get("UNDERSTUDY_GATEWAY", DEFAULT_GATEWAY),
        help=f"gateway base URL (default: $UNDERSTUDY_GATEWAY or {DEFAULT_GATEWAY})",
    )
    common.add_argument("--json", dest="as_json", action="store_true",
                        help="print the server's JSON instead of a summary")
    common.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout in seconds")
    writes = argparse.ArgumentParser(add_help=False)
    writes.add_argument("--expected-version", type=int,
                        help="refuse (409) unless the route is still at this version")

    challengers = sub.add_parser("challengers",
                                 help="list, add, update or remove a route's challengers")
    csub = challengers.add_subparsers(dest="challengers_command", required=True)
    ls = csub.add_parser("list", parents=[common], help="routes with champion and challengers")
    ls.add_argument("route", nargs="?", help="one route (default: all)")
    ls.set_defaults(func=_run(cmd_list))

    add = csub.add_parser("add", parents=[common, writes],
                          help="register a challenger (validated against Triton first)")
    add.add_argument("route")
    add.add_argument("model")
    add.add_argument("--version", dest="model_version", help="Triton model version")
    add.add_argument("--mode", choices=("shadow", "explore"), default="shadow")
    add.add_argument("--sample-rate", type=float, help="share of requests mirrored (0-1)")
    add.add_argument("--timeout-ms", type=int)
    add.add_argument("--max-concurrency", type=int)
    add.add_argument("--max-queue", type=int)
    add.add_argument("--batch-max-rows", type=int, help="shadow micro-batching (1 disables)")
    add.add_argument("--batch-max-wait-ms", type=float)
    add.add_argument("--latency-probe-every", type=int,
                     help="send every Nth copy alone, for comparable latency (0: off)")
    add.set_defaults(func=_run(cmd_add))

    update = csub.add_parser("update", parents=[common, writes],
                             help="change a challenger's mode, sample rate or limits in place "
                                  "(starts a new experiment when mode or sample rate change)")
    update.add_argument("route")
    update.add_argument("model")
    update.add_argument("--mode", choices=("shadow", "explore"))
    update.add_argument("--sample-rate", type=float, help="share of requests mirrored (0-1)")
    update.add_argument("--timeout-ms", type=int)
    update.add_argument("--max-concurrency", type=int)
    update.add_argument("--max-queue", type=int)
    update.add_argument("--batch-max-rows", type=int)
    update.add_argument("--batch-max-wait-ms", type=float)
    update.add_argument("--latency-probe-every", type=int)
    update.set_defaults(func=_run(cmd_update))

    remove = csub.add_parser("remove", parents=[common, writes], help="unregister a challenger")
    remove.add_argument("route")
    remove.add_argument("model")
    remove.set_defaults(func=_run(cmd_remove))

    promote = sub.add_parser("promote", parents=[common, writes],
                             help="make a challenger the champion (the old one stays as shadow)")
    promote.add_argument("route")
    promote.add_argument("model")
    promote.add_argument("--experiment",
                         help="refuse (409) unless the challenger is still in this experiment")
    promote.set_defaults(func=_run(cmd_promote))

    rollback = sub.add_parser("rollback", parents=[common, writes],
                              help="undo the last promotion of a route")
    rollback.add_argument("route")
    rollback.set_defaults(func=_run(cmd_rollback))

    policy = sub.add_parser("policy", parents=[common, writes],
                            help="set a route's routing policy (replaces it entirely)")
    policy.add_argument("route")
    policy.add_argument("--type", required=True, choices=("champion", "epsilon_greedy", "thompson"))
    policy.add_argument("--epsilon", type=float)
    policy.add_argument("--prior-alpha", type=float)
    policy.add_argument("--prior-beta", type=float)
    policy.add_argument("--sticky-header", help="hash this request header for sticky arms")
    policy.add_argument("--reward", choices=("correct", "label", "reward"))
    policy.set_defaults(func=_run(cmd_policy))

    audit = sub.add_parser("audit", parents=[common], help="recent admin changes, newest first")
    audit.add_argument("--route")
    audit.add_argument("--limit", type=int, default=20)
    audit.set_defaults(func=_run(cmd_audit))
