"""`evaluator promote`: apply a report's PROMOTE decision, only while the live route is the state
the report decided on."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evaluator.cli.common import TOKEN_ENV, fmt_ts, load
from evaluator.config import (
    EvaluatorConfig,
    format_duration,
)
from evaluator.report.writer import JSON_FILE
from understudy.cli import ExitCode


def _find_report(route: str, out: Path | None, report: Path | None) -> Path | None:
    """The newest report.json for the route: --report file/dir, else searched under --out."""
    if report is not None and report.is_file():
        return report
    root = report if report is not None else out
    if root is None or not root.exists():
        return None
    candidates = []
    for path in root.rglob(JSON_FILE):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("route") == route:
            candidates.append((path.stat().st_mtime, path))
    return max(candidates)[1] if candidates else None


def read_decision(report: Mapping[str, Any]) -> tuple[str | None, str | None, str]:
    """(verdict, model, reason) from a report.json `evaluator report` wrote: its `decisions` list
    (`ChallengerDecision.to_dict()`: `challenger`, `decision`, `reasons`), one entry per
    challenger. The one PROMOTE among them when there is exactly one; AMBIGUOUS when several
    say PROMOTE; else the first entry; (None, None, "") when there are no decisions."""
    decisions = [d for d in report.get("decisions") or [] if isinstance(d, Mapping)]
    parsed = [(str(d["decision"]) if d.get("decision") else None,
               str(d["challenger"]) if d.get("challenger") else None,
               "; ".join(map(str, d.get("reasons") or []))) for d in decisions]
    promote = [p for p in parsed if p[0] == "PROMOTE"]
    if len(promote) == 1:
        return promote[0]
    if len(promote) > 1:
        names = ", ".join(str(p[1]) for p in promote)
        return "AMBIGUOUS", None, f"several challengers say PROMOTE ({names})"
    if parsed:
        return parsed[0][0], parsed[0][1], "; ".join(p[2] for p in parsed if p[2])
    return None, None, ""


class PromoteRefused(Exception):
    """The report may not be applied now; the message says why and what to do."""

    def __init__(self, message: str, code: int = ExitCode.REFUSED) -> None:
        super().__init__(message)
        self.code = code


def decision_for(report: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The report's decision entry for challenger `model` (an empty dict when it has none)."""
    for d in report.get("decisions") or []:
        if isinstance(d, dict) and d.get("challenger") == model:
            return d
    return {}


def report_binding(report: dict[str, Any], model: str) -> dict[str, Any]:
    """What the report's verdict is bound to: route, champion, challenger, experiment id and
    start, the data's end and the registry version (from the decision's `experiment` entry,
    which `evaluator.report` always writes; a bare report gives what its top level has)."""
    d = decision_for(report, model)
    entry = d.get("experiment")
    exp: dict[str, Any] = entry if isinstance(entry, dict) else {}
    version = exp.get("registry_version")
    return {
        "route": exp.get("route", report.get("route")),
        "champion": exp.get("champion") or d.get("champion") or report.get("champion"),
        "challenger": model,
        "experiment": exp.get("id"),
        "started": exp.get("started"),
        "data_end": exp.get("data_end"),
        "registry_version": version if isinstance(version, int) and version >= 0 else None,
    }


def _admin_request(config: EvaluatorConfig, url: str, token: str, body: Any = None,
                   ) -> tuple[int, Any]:
    """One admin API call: (HTTP status, decoded JSON). Raises PromoteRefused when the gateway
    cannot be reached, with ExitCode.UNREACHABLE."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",  # noqa: S310
                                 headers={"Content-Type": "application/json",
                                          "Accept": "application/json",
                                          "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=config.gateway.timeout_s) as resp:  # noqa: S310
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    except (urllib.error.URLError, OSError) as exc:
        raise PromoteRefused(f"cannot reach the gateway at {url}: "
                             f"{getattr(exc, 'reason', exc)}", ExitCode.UNREACHABLE) from None
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def _refused_or_failed(status: int) -> ExitCode:
    """A 4xx answer is the gateway refusing (stale version, conflict, no such route, bad token);
    anything else is a failure."""
    return ExitCode.REFUSED if 400 <= status < 500 else ExitCode.FAILED


def check_report(report: dict[str, Any], route: str, model: str, max_age: float,
                 now: float) -> dict[str, Any]:
    """The offline checks (route, age, binding present); returns the binding."""
    if report.get("route") != route:
        raise PromoteRefused(f"the report is for route {report.get('route')!r}, not {route!r}; "
                             "nothing was changed")
    generated = report.get("generated_at")
    if not isinstance(generated, int | float) or not math.isfinite(generated):
        raise PromoteRefused("the report has no generated_at time, so its age is unknown; "
                             f"re-run `python -m evaluator report --route {route}`")
    if now - generated > max_age:
        raise PromoteRefused(f"the report is {format_duration(round(now - generated))} old "
                             f"(generated {fmt_ts(generated)}), older than "
                             f"decision.max_report_age {format_duration(max_age)}; re-run "
                             f"`python -m evaluator report --route {route}`")
    binding = report_binding(report, model)
    if binding["route"] != route:
        raise PromoteRefused(f"the decision for {model} is bound to route "
                             f"{binding['route']!r}, not {route!r}")
    if binding["registry_version"] is None:
        raise PromoteRefused(f"the report does not say which registry version of {route!r} its "
                             "data came from (records written before registry versions); "
                             "re-run the report on records from an upgraded gateway, or "
                             "promote by hand with `python -m gateway promote`")
    return binding


def check_live(binding: dict[str, Any], live: dict[str, Any]) -> None:
    """Refuse unless the live route is the state the report decided on."""
    route, model = binding["route"], binding["challenger"]
    champion = (live.get("champion") or {}).get("model")
    if champion != binding["champion"]:
        raise PromoteRefused(f"the live champion of {route!r} is {champion!r}, the report "
                             f"compared {model} with {binding['champion']!r}; the report is "
                             "stale: re-run it")
    entry = next((c for c in live.get("challengers") or []
                  if isinstance(c, dict) and c.get("model") == model), None)
    if entry is None:
        raise PromoteRefused(f"{model} is no longer a challenger of {route!r}; nothing was "
                             "changed")
    live_exp = entry.get("experiment")
    live_id = live_exp.get("id") if isinstance(live_exp, dict) else None
    if live_id != binding["experiment"]:
        raise PromoteRefused(f"{model}'s live experiment is {live_id!r}, the report's is "
                             f"{binding['experiment']!r} (its mode, sample rate or the route's "
                             "policy changed since): re-run the report")
    if live.get("version") != binding["registry_version"]:
        raise PromoteRefused(f"route {route!r} is at registry version {live.get('version')}, "
                             f"the report's data ends at version {binding['registry_version']}: "
                             "the route changed since; re-run the report")


def cmd_promote(args: argparse.Namespace) -> int:
    config = load(args)
    out = Path(args.out or config.report.out)
    path = _find_report(args.route, out, Path(args.report) if args.report else None)
    if path is None:
        where = args.report or out
        print(f"promote: no {JSON_FILE} for route {args.route!r} under {where}; run "
              f"`python -m evaluator report --route {args.route}` first", file=sys.stderr)
        return ExitCode.NOTHING
    report = json.loads(path.read_text())
    verdict, model, reason = read_decision(report)
    generated = report.get("generated_at")
    age = (f", generated {fmt_ts(float(generated))}"
           if isinstance(generated, int | float) and math.isfinite(generated) else "")
    print(f"promote: {path}{age}: decision {verdict or 'none'}"
          f"{f' for {model}' if model else ''}{f' ({reason})' if reason else ''}")
    if verdict == "BLOCKED":
        print("promote: refused: the report's decision is BLOCKED (a guardrail failed); nothing "
              "was changed", file=sys.stderr)
        return ExitCode.BLOCKED
    if verdict != "PROMOTE":
        print(f"promote: refused: the report's decision is {verdict or 'missing'}, not PROMOTE; "
              f"nothing was changed", file=sys.stderr)
        return ExitCode.NOTHING
    if not model:
        print("promote: refused: the PROMOTE decision names no model", file=sys.stderr)
        return ExitCode.FAILED
    write_token = os.environ.get(config.gateway.token_env or TOKEN_ENV)
    read_token = os.environ.get(config.gateway.read_token_env) if args.dry_run else None
    token = write_token or read_token
    if not token:
        need = config.gateway.token_env + (f" (or {config.gateway.read_token_env})"
                                           if args.dry_run else "")
        print(f"promote: refused: set {need} to the gateway's admin token: the live route is "
              "checked before anything is changed", file=sys.stderr)
        return ExitCode.USAGE
    gateway = (args.gateway or config.gateway.url).rstrip("/")
    route_url = f"{gateway}/admin/routes/{urllib.parse.quote(args.route, safe='')}"
    try:
        max_age = float(config.decision_for(args.route)["max_report_age"])
        binding = check_report(report, args.route, model, max_age, time.time())
        status, live = _admin_request(config, route_url, token)
        if status != 200 or not isinstance(live, dict):
            raise PromoteRefused(f"GET {route_url} answered {status}: {live}",
                                 _refused_or_failed(status))
        check_live(binding, live)
    except PromoteRefused as exc:
        print(f"promote: refused: {exc}", file=sys.stderr)
        return exc.code
    body: dict[str, Any] = {"model": model, "expected_version": binding["registry_version"]}
    if binding["experiment"] is not None:
        body["experiment"] = binding["experiment"]
    print(f"promote: the live route matches the report (champion {binding['champion']}, "
          f"version {binding['registry_version']}, experiment {binding['experiment'] or 'n/a'})")
    if args.dry_run:
        print(f"promote: dry run: would POST {route_url}/promote {json.dumps(body)}")
        return ExitCode.OK
    if not write_token:
        print(f"promote: refused: set {config.gateway.token_env} to the gateway's admin (write) "
              "token", file=sys.stderr)
        return ExitCode.USAGE
    try:
        status, answer = _admin_request(config, f"{route_url}/promote", write_token, body)
    except PromoteRefused as exc:
        print(f"promote: {exc}", file=sys.stderr)
        return exc.code
    if status != 200:
        detail = answer.get("error", answer) if isinstance(answer, dict) else answer
        print(f"promote: the gateway refused ({status}): {detail}", file=sys.stderr)
        return _refused_or_failed(status)
    print(f"promote: POST {route_url}/promote -> {status}: promoted {model} to champion of "
          f"{args.route}")
    if args.verbose and answer:
        print(json.dumps(answer))
    return ExitCode.OK


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("promote", parents=[common],
                       help="apply a report's PROMOTE decision through the gateway admin API",
                       description="Read the newest report.json of the route; when (and only "
                                   "when) its decision is PROMOTE and the live route is still "
                                   "the one it decided on (champion, challenger, experiment, "
                                   "registry version; not older than decision.max_report_age), "
                                   f"ask the gateway to promote the challenger. Token from "
                                   f"${TOKEN_ENV}.")
    p.add_argument("--route", required=True, help="the route whose report to apply")
    p.add_argument("--out", help="directory searched for report.json (default: report.out)")
    p.add_argument("--report", help="a report.json, or a directory to search (default: --out)")
    p.add_argument("--gateway", help="gateway base URL (default: gateway.url)")
    p.add_argument("--dry-run", action="store_true",
                   help="run every check (reads the live route) and print the call instead of "
                        "making it")
    p.set_defaults(func=cmd_promote)
