"""`evaluator report`: decide each challenger of a route and write its report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from evaluator.cli.common import fmt_ts, load
from evaluator.config import (
    DECISION_DEFAULTS,
    ConfigError,
    EvaluatorConfig,
    format_duration,
    parse_duration,
)
from evaluator.dataset import EvalDataset
from evaluator.report import write_empty_report, write_report
from evaluator.store import EmptyDatasetError, Store
from understudy.cli import ExitCode


def policy_mapping(config: EvaluatorConfig, route: str) -> dict[str, Any]:
    """The route's decision mapping for `DecisionPolicy.from_mapping`: keys the config knows
    (DECISION_DEFAULTS) but the policy has no field for (e.g. `max_report_age`, which only
    `promote` reads) are left out; any other unknown key still fails as a typo."""
    import dataclasses

    from evaluator.decision import DecisionPolicy

    fields = {f.name for f in dataclasses.fields(DecisionPolicy)}
    return {k: v for k, v in config.decision_for(route).items()
            if k in fields or k not in DECISION_DEFAULTS}


def compute_decisions(dataset: EvalDataset, config: EvaluatorConfig) -> list[Any]:
    """PROMOTE / KEEP / BLOCKED / INCONCLUSIVE per challenger under the route's policy."""
    from evaluator.decision import DecisionPolicy, decide

    try:
        policy = DecisionPolicy.from_mapping(policy_mapping(config, dataset.route))
        return decide(dataset, policy)
    except ValueError as exc:  # policy does not fit the route (e.g. auroc on a regression)
        raise ConfigError(f"decision policy for route {dataset.route!r}: {exc} (set "
                          f"routes.{dataset.route}.decision)") from None


def cmd_report(args: argparse.Namespace) -> int:
    """Load every labelled row of each challenger's current experiment, decide, write the
    report; NOTHING when the route has no labelled data (a report.json saying so is written)."""
    config = load(args)
    window = parse_duration(args.window, "--window") if args.window else config.report.window
    out_dir = Path(args.out or config.report.out)
    route_cfg = config.route(args.route)
    store = Store.open(config.store, read_only=True)
    try:
        span = store.time_range(args.route)
        experiments, since = store.experiment_span(args.route, window)
        if experiments:
            print(f"report: route {args.route!r}, current experiments "
                  + ", ".join(f"{c} {x.id} since {fmt_ts(x.started)}"
                              for c, x in experiments.items())
                  + f" (the verdict uses all their rows; window {format_duration(window)} is "
                    "display only)", flush=True)
        else:
            print(f"report: route {args.route!r}, window {format_duration(window)} "
                  f"[{fmt_ts(since)}, {fmt_ts(span[1] if span else None)}] (records carry no "
                  "experiment ids: the window selects the data)", flush=True)
        try:
            dataset = store.load_experiments(args.route, task=route_cfg.task,
                                             threshold=route_cfg.threshold,
                                             span=(experiments, since))
        except EmptyDatasetError as exc:
            path = write_empty_report(out_dir, args.route, since, exc.stats, str(exc))
            print(f"report: {exc}\nreport: wrote {path}", file=sys.stderr)
            return ExitCode.NOTHING
    finally:
        store.close()  # release the file before the (slow) statistics
    s = dataset.stats
    print(f"report: {len(dataset):,} labelled predictions of {s.inferences:,} in the window "
          f"({s.duplicate_inferences:,} duplicate records, {s.duplicate_labels:,} duplicate "
          f"labels, {s.orphan_labels:,} orphan / {s.expired_orphans:,} expired labels "
          f"store-wide); champion {dataset.champion}, challengers "
          f"{', '.join(dataset.challengers) or 'none'}", flush=True)
    decisions = compute_decisions(dataset, config)
    for d in decisions:
        print(f"report: {d.challenger}: {d.decision} — {d.reasons[0] if d.reasons else ''}")
    paths = write_report(dataset, decisions, out_dir,
                         drift=_drift_for_report(config, args.route),
                         window=(since, span[1] if span else None))
    print(f"report: wrote {', '.join(str(p) for p in paths.values())}")
    blocked = [d.challenger for d in decisions if d.decision == "BLOCKED"]
    if blocked and args.fail_on_blocked:
        print(f"report: BLOCKED (a guardrail failed): {', '.join(blocked)}", file=sys.stderr)
        return ExitCode.BLOCKED
    return ExitCode.OK


def _drift_for_report(config: EvaluatorConfig, route: str) -> dict[str, Any] | None:
    """The route's latest drift.json (from `evaluator drift`), shown as a report section; a
    missing or unreadable file, or one for another route, just leaves the section out."""
    path = Path(config.drift.out) / "drift.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("route") == route else None


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("report", parents=[common], help="write the evaluation report of a route",
                       description="Join labels to the route's predictions in the window and "
                                   "write the report (JSON, Markdown, HTML).")
    p.add_argument("--route", required=True, help="the route to report on")
    p.add_argument("--window", help="e.g. 7d, 36h (default: report.window), ending at the route's "
                                    "newest inference. Display only: the verdict uses every row "
                                    "of each challenger's current experiment (records without "
                                    "experiment ids are still windowed)")
    p.add_argument("--out", help="output directory (default: report.out)")
    p.add_argument("--fail-on-blocked", action="store_true",
                   help=f"exit {int(ExitCode.BLOCKED)} (after writing the report) when a "
                        "challenger is BLOCKED by a guardrail")
    p.set_defaults(func=cmd_report)
