"""`python -m gateway challengers list|add|update|remove`, `promote|rollback|policy|audit`: the
admin API from a shell.

A thin layer over `understudy.client.AdminClient` (the Python client scripts use too): every
command is one HTTP call to a gateway's `/admin` API, so the CLI, the client and curl behave
identically and the gateway stays the only place that validates.

- `--gateway URL` (default `$UNDERSTUDY_GATEWAY`, else http://127.0.0.1:8080).
- Token from `$UNDERSTUDY_ADMIN_TOKEN` (reads fall back to `$UNDERSTUDY_ADMIN_READ_TOKEN`);
  never a flag, so it does not end up in shell history or `ps`.
- Human-readable output by default, `--json` prints the server's JSON for scripts.
- Exit status (`understudy.cli.ExitCode`, the same as the evaluator's): 0 done, 1 the gateway
  failed (5xx), 2 usage error, 4 the gateway refused (its error message is printed),
  6 the gateway could not be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from understudy.cli import ExitCode
from understudy.client import (
    DEFAULT_GATEWAY,
    GATEWAY_ENV,
    AdminClient,
    AdminError,
    Refused,
    Unreachable,
)
from understudy.vocabulary import POLICY_TYPES


class UsageError(Exception):
    """Arguments argparse accepted but that ask for nothing (e.g. an update with no change)."""


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


def format_route(route: Mapping[str, Any]) -> str:
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


def format_audit(entry: Mapping[str, Any]) -> str:
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

Handler = Callable[[AdminClient, argparse.Namespace], tuple[Any, str]]


def _settings(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


_LIMITS = ("timeout_ms", "max_concurrency", "max_queue", "batch_max_rows", "batch_max_wait_ms",
           "latency_probe_every")


def cmd_list(client: AdminClient, args: argparse.Namespace) -> tuple[Any, str]:
    if args.route:
        route = client.route(args.route)
        return route.raw, format_route(route.raw)
    routes = client.routes()
    payload = {"routes": [r.raw for r in routes]}
    return payload, "\n\n".join(format_route(r.raw) for r in routes) or "no routes"


def cmd_add(client: AdminClient, args: argparse.Namespace) -> tuple[Any, str]:
    route = client.add_challenger(args.route, args.model, version=args.model_version,
                                  expected_version=args.expected_version,
                                  **_settings(args, ("mode", "sample_rate", *_LIMITS)))
    return route.raw, (f"added challenger {args.model} to route {args.route}\n\n"
                       f"{format_route(route.raw)}")


def cmd_update(client: AdminClient, args: argparse.Namespace) -> tuple[Any, str]:
    changes = _settings(args, ("mode", "sample_rate", *_LIMITS))
    if not changes:
        raise UsageError("nothing to change: give --mode and/or --sample-rate (or a limit)")
    route = client.update_challenger(args.route, args.model,
                                     expected_version=args.expected_version, **changes)
    return route.raw, (f"updated challenger {args.model} of route {args.route} (a new experiment "
                       f"starts when its mode or sample rate changed)\n\n"
                       f"{format_route(route.raw)}")


def cmd_remove(client: AdminClient, args: argparse.Namespace) -> tuple[Any, str]:
    route = client.remove_challenger(args.route, args.model,
                                     expected_version=args.expected_version)
    return route.raw, (f"removed challenger {args.model} from route {args.route}\n\n"
                       f"{format_route(route.raw)}")


def cmd_promote(client: AdminClient, args: argparse.Namespace) -> tuple[Any, str]:
    route = client.promote(args.route, args.model, experiment=args.experiment,
                           expected_version=args.expected_version)
    previous = route.rollback_to
    text = (f"{args.model} is now the champion of route {args.route}; the previous champion "
            f"{previous or '?'} stays as a shadow challenger "
            f"(undo: python -m gateway rollback {args.route})\n\n{format_route(route.raw)}")
    return route.raw, text


def cmd_rollback(client: AdminClient, args: argparse.Namespace) -> tuple[Any, str]:
    route = client.rollback(args.route, expected_version=args.expected_version)
    return route.raw, (f"rolled back route {args.route}: {route.champion} is champion "
                       f"again\n\n{format_route(route.raw)}")


def cmd_policy(client: AdminClient, args: argparse.Namespace) -> tuple[Any, str]:
    route = client.set_policy(args.route, args.type, expected_version=args.expected_version,
                              **_settings(args, ("epsilon", "prior_alpha", "prior_beta",
                                                 "sticky_header", "reward")))
    return route.raw, (f"route {args.route} policy is now {_policy(dict(route.policy))}\n\n"
                       f"{format_route(route.raw)}")


def cmd_audit(client: AdminClient, args: argparse.Namespace) -> tuple[Any, str]:
    entries = client.audit(args.route, args.limit)
    payload = {"entries": [e.raw for e in entries]}
    return payload, "\n".join(format_audit(e.raw) for e in entries) or "no audit entries"


def format_rollout(view: dict[str, Any]) -> str:
    steps = ", ".join(f"{s:g}" for s in view.get("steps") or ())
    lines = [f"rollout {view.get('id')} of {view['target']} on route {view['route']}: "
             f"{view['status']} at {view['percent']:g}% (steps {steps}; route version "
             f"{view['version']})"]
    if view.get("reason"):
        lines.append(f"  {view['reason']}")
    live = view.get("live") or view.get("evidence") or {}
    if live:
        served = live.get("served") or {}
        errors = live.get("errors") or {}
        lines.append(f"  served     challenger {served.get('challenger', 0)}  champion "
                     f"{served.get('champion', 0)}   (needs {view['min_requests']} on the "
                     f"challenger and {view['min_seconds']:g}s per step)")
        lines.append(f"  errors     challenger {errors.get('challenger', 0)}  champion "
                     f"{errors.get('champion', 0)}   latency threshold "
                     f"{live.get('latency_threshold_ms') or '-'} ms")
        for guard in live.get("guards") or ():
            lines.append(f"  guard {guard['guard']:<8} e-value {guard['e_value']:.3g} "
                         f"(breach at {1 / view['alpha']:g})  rate ratio >= "
                         f"{guard['ratio_lower_bound']:.2f}"
                         f"{'  BREACHED' if guard['breached'] else ''}")
    return "\n".join(lines)


def _steps(raw: str) -> tuple[float, ...]:
    try:
        return tuple(float(s) for s in raw.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps: percents such as 5,25,50,100, not {raw!r}"
                                         ) from None


def cmd_rollout(client: AdminClient, args: argparse.Namespace) -> tuple[Any, str]:
    if args.first in ("status", "abort"):
        if args.second is None:
            raise UsageError(f"rollout {args.first} needs the route: rollout {args.first} ROUTE")
        rollout = (client.rollout(args.second) if args.first == "status"
                   else client.abort_rollout(args.second, expected_version=args.expected_version))
        return rollout.raw, format_rollout(dict(rollout.raw))
    if args.second is None:
        raise UsageError("name the challenger to roll out: rollout ROUTE MODEL [--steps ...]")
    rollout = client.start_rollout(args.first, args.second, steps=args.steps,
                                   min_requests=args.min_requests, min_seconds=args.min_seconds,
                                   alpha=args.alpha, expected_version=args.expected_version)
    return rollout.raw, (f"{format_rollout(dict(rollout.raw))}\n(follow it: python -m gateway "
                         f"rollout status {args.first}; stop it: rollout abort {args.first})")


def _exit_code(exc: AdminError) -> ExitCode:
    if isinstance(exc, Unreachable):
        return ExitCode.UNREACHABLE
    return ExitCode.REFUSED if isinstance(exc, Refused) else ExitCode.FAILED


def _run(handler: Handler) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        client = AdminClient.from_env(args.gateway, timeout=args.timeout)
        try:
            payload, text = handler(client, args)
        except UsageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return ExitCode.USAGE
        except AdminError as exc:
            if args.as_json:
                print(json.dumps({"error": exc.message, "status": exc.status}))
            print(f"error: {exc}", file=sys.stderr)
            return _exit_code(exc)
        print(json.dumps(payload, indent=2) if args.as_json else text)
        return ExitCode.OK

    return run


def add_admin_commands(sub: Any) -> None:
    """Register the admin commands on `python -m gateway`'s subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--gateway", default=None,
        help=f"gateway base URL (default: ${GATEWAY_ENV} or {DEFAULT_GATEWAY})",
    )
    common.add_argument("--json", dest="as_json", action="store_true",
                        help="print the server's JSON instead of a summary")
    common.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout in seconds")
    writes = argparse.ArgumentParser(add_help=False)
    writes.add_argument("--expected-version", type=int,
                        help="refuse (409) unless the route is still at this version")

    challengers = sub.add_parser("challengers",
                                 help="list, add, update or remove a route's challengers")
    csub = challengers.add_subparsers(dest="challengers_command", metavar="COMMAND", required=True)
    ls = csub.add_parser("list", parents=[common], help="routes with champion and challengers")
    ls.add_argument("route", nargs="?", help="one route (default: all routes)")
    ls.set_defaults(func=_run(cmd_list))

    target = argparse.ArgumentParser(add_help=False)
    target.add_argument("route", help="the route (the model name clients call)")
    target.add_argument("model", help="the challenger: a model name Triton serves")
    settings = argparse.ArgumentParser(add_help=False)
    settings.add_argument("--sample-rate", type=float, help="share of requests mirrored (0-1)")
    settings.add_argument("--timeout-ms", type=int, help="per-copy Triton timeout")
    settings.add_argument("--max-concurrency", type=int,
                          help="copies in flight to this challenger at once")
    settings.add_argument("--max-queue", type=int,
                          help="copies waiting; beyond it copies are dropped, never the client")
    settings.add_argument("--batch-max-rows", type=int,
                          help="shadow micro-batching (1 disables)")
    settings.add_argument("--batch-max-wait-ms", type=float,
                          help="longest a copy waits for a batch")
    settings.add_argument("--latency-probe-every", type=int,
                          help="send every Nth copy alone, for comparable latency (0: off)")

    add = csub.add_parser("add", parents=[common, writes, target, settings],
                          help="register a challenger (validated against Triton first)")
    add.add_argument("--version", dest="model_version", help="Triton model version")
    add.add_argument("--mode", choices=("shadow", "explore"), default="shadow",
                     help="shadow: copies only; explore: an arm the policy may serve")
    add.set_defaults(func=_run(cmd_add))

    update = csub.add_parser("update", parents=[common, writes, target, settings],
                             help="change a challenger's mode, sample rate or limits in place "
                                  "(starts a new experiment when mode or sample rate change)")
    update.add_argument("--mode", choices=("shadow", "explore"),
                        help="shadow: copies only; explore: an arm the policy may serve")
    update.set_defaults(func=_run(cmd_update))

    remove = csub.add_parser("remove", parents=[common, writes, target],
                             help="unregister a challenger")
    remove.set_defaults(func=_run(cmd_remove))

    promote = sub.add_parser("promote", parents=[common, writes],
                             help="make a challenger the champion (the old one stays as shadow)")
    promote.add_argument("route", help="the route (the model name clients call)")
    promote.add_argument("model", help="the challenger that becomes champion")
    promote.add_argument("--experiment",
                         help="refuse (409) unless the challenger is still in this experiment")
    promote.set_defaults(func=_run(cmd_promote))

    rollback = sub.add_parser("rollback", parents=[common, writes],
                              help="undo the last promotion of a route")
    rollback.add_argument("route", help="the route (the model name clients call)")
    rollback.set_defaults(func=_run(cmd_rollback))

    policy = sub.add_parser("policy", parents=[common, writes],
                            help="set a route's routing policy (replaces it entirely)")
    policy.add_argument("route", help="the route (the model name clients call)")
    policy.add_argument("--type", required=True,
                        choices=[t for t in POLICY_TYPES if t != "rollout"],
                        help="champion only, or an exploring policy")
    policy.add_argument("--epsilon", type=float,
                        help="epsilon_greedy: share of requests that explore")
    policy.add_argument("--prior-alpha", type=float, help="thompson: Beta prior alpha")
    policy.add_argument("--prior-beta", type=float, help="thompson: Beta prior beta")
    policy.add_argument("--sticky-header", help="hash this request header for sticky arms")
    policy.add_argument("--reward", choices=("correct", "label", "reward"),
                        help="what a posted label rewards an arm with")
    policy.set_defaults(func=_run(cmd_policy))

    rollout = sub.add_parser(
        "rollout", parents=[common, writes],
        help="move live traffic to a challenger in guarded steps (rollout ROUTE MODEL), or "
             "show or stop it (rollout status|abort ROUTE)")
    rollout.add_argument("first", metavar="ROUTE|status|abort",
                         help="the route to roll out on, or status / abort")
    rollout.add_argument("second", nargs="?", metavar="MODEL|ROUTE",
                         help="the challenger to roll out (or the route after status / abort)")
    rollout.add_argument("--steps", type=_steps,
                         help="percents of traffic per step, e.g. 5,25,50,100 (the default); "
                              "passing the last step promotes the challenger")
    rollout.add_argument("--min-requests", type=int,
                         help="requests the challenger must serve in a step before it advances "
                              "(default 200)")
    rollout.add_argument("--min-seconds", type=float,
                         help="shortest duration of a step in seconds (default 60)")
    rollout.add_argument("--alpha", type=float,
                         help="each guard's false-rollback rate per step (default 0.01)")
    rollout.set_defaults(func=_run(cmd_rollout))

    audit = sub.add_parser("audit", parents=[common], help="recent admin changes, newest first")
    audit.add_argument("--route", help="only this route")
    audit.add_argument("--limit", type=int, default=20, help="entries to show")
    audit.set_defaults(func=_run(cmd_audit))
