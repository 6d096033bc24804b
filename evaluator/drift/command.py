"""`python -m evaluator drift`: one run (or a loop with --serve) of the drift check."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from evaluator.config import DriftConfig, EvaluatorConfig, format_duration, parse_duration
from evaluator.drift.data import _iso
from evaluator.drift.errors import BadReferenceError, EmptyWindowError
from evaluator.drift.prometheus import DriftMetrics, metrics, start_metrics_server
from evaluator.drift.result import DriftResult
from evaluator.drift.table import feature_table
from evaluator.drift.webhook import WebhookNotifier, alert_drift
from evaluator.drift.windows import drift_for_route, plan_windows
from understudy.cli import ExitCode

DRIFT_FILE = "drift.json"
DRIFT_MD = "drift.md"


def write_result(result: DriftResult, out_dir: str | Path) -> Path:
    """drift.json and drift.md into out_dir; returns the JSON path. drift.md is the report's
    drift section on its own (`evaluator.report.drift`), rendered from the same data."""
    from evaluator.report.document import render_markdown
    from evaluator.report.drift import drift_blocks

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / DRIFT_FILE
    path.write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
    (out / DRIFT_MD).write_text(render_markdown(drift_blocks(result)))
    return path


def run_command(args: argparse.Namespace, config: EvaluatorConfig) -> int:
    """`python -m evaluator drift` (arguments defined in evaluator/cli/drift.py).

    Exit status (`ExitCode`): OK computed (drift or not), FAILED a bad reference or a webhook
    that failed every retry, NOTHING nothing to compare (empty window), UNREACHABLE the
    Pushgateway could not be reached.
    """
    from evaluator.store import Store

    cfg = config.drift
    if args.seasonality:
        cfg = replace(cfg, seasonality=args.seasonality)
    if args.fixed_thresholds:
        cfg = replace(cfg, adaptive=False)
    reference_path = args.reference or (None if args.reference_window else cfg.reference)
    ref_window = parse_duration(args.reference_window, "--reference-window") \
        if args.reference_window else None
    window = parse_duration(args.window, "--window") if args.window else None
    out_dir = Path(args.out or cfg.out)
    push_url = args.push or cfg.pushgateway
    # The episode state is kept with --no-webhook too: it pins the log reference while an
    # episode is open, so the check keeps flagging a shift for as long as it lasts.
    notifier = WebhookNotifier.from_config(cfg)
    if args.no_webhook:
        notifier.url = None
    serve_port = args.serve if args.serve is not None else 0
    every = parse_duration(args.every, "--every") if args.every else 3600.0
    if serve_port:
        start_metrics_server(serve_port)
        print(f"drift: serving /metrics on :{serve_port}, every {format_duration(every)}",
              flush=True)
    if not serve_port:
        return _run_once(args.route, config, cfg, reference_path, ref_window, window, out_dir,
                         push_url, notifier, Store)
    from evaluator.store import StoreError

    try:
        while True:
            try:
                _run_once(args.route, config, cfg, reference_path, ref_window, window, out_dir,
                          push_url, notifier, Store)
            except StoreError as exc:  # e.g. the ingest loop held the file: try next round
                print(f"drift: store error: {exc}; retrying in {format_duration(every)}",
                      file=sys.stderr, flush=True)
            time.sleep(every)
    except KeyboardInterrupt:
        return ExitCode.OK


def _run_once(route: str, config: EvaluatorConfig, cfg: DriftConfig, reference_path: str | None,
              ref_window: float | None, window: float | None, out_dir: Path,
              push_url: str | None, notifier: WebhookNotifier | None, store_cls: Any) -> int:
    store = store_cls.open(config.store, read_only=True)
    try:
        pinned = notifier.pinned_until(route) if notifier is not None and not reference_path \
            else None
        windows = plan_windows(store, route, cfg, reference_path=reference_path,
                               reference_window=ref_window, window=window,
                               pinned_until=pinned)
        ref_len = format_duration(ref_window or cfg.reference_window)
        ref_desc = reference_path or f"log window of {ref_len} before the live one"
        if pinned is not None:
            ref_desc += f", pinned at {_iso(pinned)} while the drift episode is open"
        print(f"drift: route {route!r}, live [{_iso(windows.live_since)}, "
              f"{_iso(windows.live_until)}), reference {ref_desc}; seasonality "
              f"{cfg.seasonality}, {'adaptive' if cfg.adaptive else 'fixed'} thresholds",
              flush=True)
        result = drift_for_route(store, config, route, windows, cfg)
    except EmptyWindowError as exc:
        print(f"drift: {exc}", file=sys.stderr)
        return ExitCode.NOTHING
    except BadReferenceError as exc:
        print(f"drift: bad reference: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    finally:
        store.close()
    print(feature_table(result))
    path = write_result(result, out_dir)
    print(f"drift: wrote {path} and {path.with_name(DRIFT_MD)}")
    metrics().update(result)
    if push_url:
        batch = DriftMetrics()
        batch.update(result)
        try:
            batch.push(push_url, job=cfg.push_job, grouping_key={"route": route})
            print(f"drift: pushed metrics to {push_url} (job {cfg.push_job}, route {route})")
        except OSError as exc:
            print(f"drift: Pushgateway {push_url} unreachable: {exc}", file=sys.stderr)
            return ExitCode.UNREACHABLE
    if notifier is not None:
        outcome = alert_drift(notifier, result, windows.ref_until)
        if outcome in ("fired", "failed", "already_fired"):
            print(f"drift: webhook {outcome} (episode {route}:drift)")
        if outcome == "failed":
            return ExitCode.FAILED
    return ExitCode.OK
