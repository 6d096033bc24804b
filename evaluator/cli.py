"""`python -m evaluator run|report|promote`: the evaluator's command line.

- `run --config C [--once]`: the ingest loop (files or Kafka, per `source.type`); `--once`
  drains what is there and exits. SIGTERM/Ctrl-C finish the current batch and stop.
- `report --route R [--window 7d] [--out DIR] [--fail-on-blocked] [--engine duckdb|spark]`:
  loads every labelled row of each challenger's current experiment (`load_experiments`: since
  the earliest current experiment started, whatever the window says) from the store, or from
  the landing zone when `lake.path` is set — read by DuckDB, or by Spark at `spark.master` with
  `--engine spark` / `lake.engine: spark` (the same dataset either way) — decides each
  challenger (`evaluator.decision.decide` under the route's decision policy) and hands both to
  `evaluator.report.write_report(dataset, decisions, out_dir)`. The window never changes the
  verdict's data; it only selects rows for records without experiment ids (written by gateways
  before experiments existed: one implicit experiment, windowed as it always was).
- `promote --route R [--out DIR | --report PATH] [--dry-run]`: reads the newest `report.json`
  for the route and, only when its decision is PROMOTE and the report is bound to the live
  state, calls `POST {gateway}/admin/routes/{route}/promote` with `{"model", "expected_version",
  "experiment"}` (the gateway answers 409 when either moved meanwhile). Bound means: the
  report's route is --route, it is younger than `decision.max_report_age`, and
  `GET /admin/routes/{route}` shows the report's champion, the challenger with the report's
  experiment id, and the report's registry version. Bearer token from `gateway.token_env`
  (`gateway.read_token_env` is enough for `--dry-run`, which runs every check and prints the
  request).

- `lake compact|expire`: merge the landing zone's small files; delete date partitions older
  than `lake.retention` (evaluator/lake; with `lake.path` set, `run` writes Parquet there and
  `report` reads it with DuckDB instead of the embedded store).

- `drift --route R [--reference FILE | --reference-window 7d] [--window 1d] [--out DIR]
  [--push URL]`: data and prediction drift of the live window against a training snapshot or a
  past window of the log (evaluator/drift.py); prints a per-feature table, writes drift.json and
  drift.md, pushes gauges to a Pushgateway and fires the drift webhook once per episode.
  `--serve PORT --every 1h` keeps running and serves /metrics instead of exiting.

Exit status: 0 done (`report`: the report was written, whatever the verdicts); 1 failed (store,
gateway refused or unreachable); 2 usage or config error; 3 nothing to do (empty dataset;
decision is not PROMOTE); 4 refused: the report is stale or does not match the live route
(`promote`); 5 BLOCKED: a guardrail failed (`promote` on a BLOCKED decision, and `report
--fail-on-blocked` when any challenger is BLOCKED, after writing the report).

Adding a subcommand: write `_add_<name>(sub, common)` that registers its parser and sets
`func`, and list it in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from evaluator.config import (
    DECISION_DEFAULTS,
    DEFAULT_CONFIG_PATH,
    ConfigError,
    EvaluatorConfig,
    format_duration,
    load_config,
    parse_duration,
    with_store_path,
)
from evaluator.dataset import STATUS_CODES, EvalDataset, JoinStats
from evaluator.store import DatasetReads, EmptyDatasetError, Store, StoreError

log = logging.getLogger("evaluator")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOTHING, EXIT_STALE, EXIT_BLOCKED = 0, 1, 2, 3, 4, 5
REPORT_FILE = "report.json"
TOKEN_ENV = "UNDERSTUDY_ADMIN_TOKEN"  # noqa: S105 - the variable's name, not a secret


def _load(args: argparse.Namespace) -> EvaluatorConfig:
    path = args.config
    if path is None and Path(DEFAULT_CONFIG_PATH).exists():
        path = DEFAULT_CONFIG_PATH
    config = load_config(path)
    if getattr(args, "store", None):
        config = with_store_path(config, args.store)
    return config


def open_reader(config: EvaluatorConfig, engine: str | None = None) -> DatasetReads:
    """What `report` reads: the landing zone when `lake.path` is set, else the store. The lake
    is read with DuckDB, or with Spark (`engine`, else `lake.engine`; the `spark:` section)."""
    if not config.lake.path:
        if engine is not None:
            raise ConfigError(f"--engine {engine}: chooses what reads the landing zone, and "
                              "lake.path is not set")
        return Store.open(config.store, read_only=True)
    if (engine or config.lake.engine) == "spark":
        try:
            from evaluator.lake.spark_engine import SparkLakeReader
        except ModuleNotFoundError as exc:
            raise ConfigError(f"lake.engine spark needs {exc.name}: pip install "
                              "'understudy[spark]' (and a Java 17+ runtime)") from None
        return SparkLakeReader.open(config)
    from evaluator.lake.reader import LakeReader

    return LakeReader.open(config)


def _fmt_ts(ts: float | None) -> str:
    if ts is None:
        return "…"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# -- run --------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from evaluator import ingest

    config = _load(args)
    src = config.source
    where = (f"Kafka {src.kafka.bootstrap} topics {src.kafka.inferences_topic}, "
             f"{src.kafka.labels_topic} (group {src.kafka.group_id})"
             if src.type == "kafka" else f"segment files under {src.path}")
    into = (f"the landing zone {config.lake.path} (Parquet)" if config.lake.path else
            f"{config.store.path} ({config.store.engine}); join window "
            f"{format_duration(config.store.join_window)}")
    print(f"evaluator: ingesting from {where} into {into}"
          f"{'; draining once' if args.once else ''}", flush=True)
    if config.lake.path:
        from evaluator.lake import members

        run: Callable[..., Any] = members.run
    else:
        run = ingest.run
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: finishing the current batch, then stopping", signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        progress = run(config, once=args.once, stop=stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(f"evaluator: {progress.line()}", flush=True)
    return EXIT_OK


def _add_run(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("run", parents=[common], help="ingest inferences and labels into the store",
                       description="Consume the gateway's inference log and labels (segment "
                                   "files or Kafka) and join them in the evaluator's store.")
    p.add_argument("--once", action="store_true", help="drain what is there now, then exit")
    p.set_defaults(func=cmd_run)


# -- report -----------------------------------------------------------------------------------


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


def _report_writer() -> Callable[..., Any] | None:
    try:
        report = importlib.import_module("evaluator.report")
    except ModuleNotFoundError:
        return None
    return getattr(report, "write_report", None)


def _model_summary(dataset: EvalDataset) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, col in dataset.models.items():
        scored = col.status != STATUS_CODES["skipped"]
        counts = {s: int((col.status == code).sum()) for s, code in STATUS_CODES.items()}
        latency = col.latency_ms[np.isfinite(col.latency_ms)]
        out[name] = {
            "role": col.role, "modes": list(col.modes), "scored": int(scored.sum()),
            "status": counts,
            "error_rate": (float((scored & ~col.ok).sum() / scored.sum())
                           if scored.any() else None),
            "latency_p99_ms": float(np.percentile(latency, 99)) if latency.size else None,
        }
    return out


def write_summary(out_dir: Path, route: str, since: float | None, until: float | None,
                  stats: JoinStats, dataset: EvalDataset | None, error: str | None,
                  decisions: list[Any] | None = None) -> Path:
    """The stand-in report.json until evaluator.report exists: join stats, per-model counts
    and the decisions (`decisions_to_dict` shape), which is what `promote` reads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "route": route,
        "generated_at": time.time(),
        "window": {"since": since, "until": until,
                   "since_iso": _fmt_ts(since), "until_iso": _fmt_ts(until)},
        "join_stats": asdict(stats),
        "n": len(dataset) if dataset is not None else 0,
        "decisions": [d.to_dict() for d in decisions or []],
        "note": "summary only: evaluator.report (plots, Markdown, HTML) is not available",
    }
    if dataset is not None:
        summary.update(task=dataset.task, champion=dataset.champion,
                       challengers=dataset.challengers, models=_model_summary(dataset))
    if error:
        summary["error"] = error
    path = out_dir / REPORT_FILE
    path.write_text(json.dumps(summary, indent=2, allow_nan=False, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def cmd_report(args: argparse.Namespace) -> int:
    config = _load(args)
    window = parse_duration(args.window, "--window") if args.window else config.report.window
    out_dir = Path(args.out or config.report.out)
    route_cfg = config.route(args.route)
    store = open_reader(config, args.engine)
    try:
        span = store.time_range(args.route)
        experiments, since = store.experiment_span(args.route, window)
        if experiments:
            print(f"report: route {args.route!r}, current experiments "
                  + ", ".join(f"{c} {x.id} since {_fmt_ts(x.started)}"
                              for c, x in experiments.items())
                  + f" (the verdict uses all their rows; window {format_duration(window)} is "
                    "display only)", flush=True)
        else:
            print(f"report: route {args.route!r}, window {format_duration(window)} "
                  f"[{_fmt_ts(since)}, {_fmt_ts(span[1] if span else None)}] (records carry no "
                  "experiment ids: the window selects the data)", flush=True)
        try:
            dataset = store.load_experiments(args.route, task=route_cfg.task,
                                             threshold=route_cfg.threshold,
                                             span=(experiments, since))
        except EmptyDatasetError as exc:
            path = write_summary(out_dir, args.route, since, None, exc.stats, None, str(exc))
            print(f"report: {exc}\nreport: wrote {path}", file=sys.stderr)
            return EXIT_NOTHING
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
    writer = _report_writer()
    if writer is None:
        path = write_summary(out_dir, args.route, since, None, s, dataset, None, decisions)
        print(f"report: wrote {path} (summary; evaluator.report is not available)")
        return EXIT_OK
    paths = writer(dataset, decisions, out_dir, drift=_drift_for_report(config, args.route),
                   window=(since, span[1] if span else None))
    print(f"report: wrote {', '.join(str(p) for p in paths.values())}")
    blocked = [d.challenger for d in decisions if d.decision == "BLOCKED"]
    if blocked and args.fail_on_blocked:
        print(f"report: BLOCKED (a guardrail failed): {', '.join(blocked)}", file=sys.stderr)
        return EXIT_BLOCKED
    return EXIT_OK


def _drift_for_report(config: EvaluatorConfig, route: str) -> dict[str, Any] | None:
    """The route's latest drift.json (from `evaluator drift`), shown as a report section; a
    missing or unreadable file, or one for another route, just leaves the section out."""
    path = Path(config.drift.out) / "drift.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("route") == route else None


def _add_report(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("report", parents=[common], help="write the evaluation report of a route",
                       description="Join labels to the route's predictions in the window and "
                                   "write the report (JSON, Markdown, HTML).")
    p.add_argument("--route", required=True)
    p.add_argument("--window", help="e.g. 7d, 36h (default: report.window), ending at the route's "
                                    "newest inference. Display only: the verdict uses every row "
                                    "of each challenger's current experiment (records without "
                                    "experiment ids are still windowed)")
    p.add_argument("--out", help="output directory (default: report.out)")
    p.add_argument("--fail-on-blocked", action="store_true",
                   help=f"exit {EXIT_BLOCKED} (after writing the report) when a challenger is "
                        "BLOCKED by a guardrail")
    p.add_argument("--engine", choices=("duckdb", "spark"),
                   help="what reads the landing zone (default: lake.engine): DuckDB in this "
                        "process, or Spark at spark.master; same dataset, same verdicts")
    p.set_defaults(func=cmd_report)


# -- promote ----------------------------------------------------------------------------------


def _find_report(route: str, out: Path | None, report: Path | None) -> Path | None:
    """The newest report.json for the route: --report file/dir, else searched under --out."""
    if report is not None and report.is_file():
        return report
    root = report if report is not None else out
    if root is None or not root.exists():
        return None
    candidates = []
    for path in root.rglob(REPORT_FILE):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("route") == route:
            candidates.append((path.stat().st_mtime, path))
    return max(candidates)[1] if candidates else None


def read_decision(report: dict[str, Any]) -> tuple[str | None, str | None, str]:
    """(verdict, model, reason) from a report.json.

    Reads `decision: {"verdict": ..., "model": ...}` (also `"action"`/`"challenger"` spellings,
    or a bare string), or `decisions: [{...}, ...]` with one entry per challenger: exactly one
    PROMOTE among them is required.
    """
    def one(d: Any) -> tuple[str | None, str | None, str]:
        if isinstance(d, str):
            return d.upper(), None, ""
        if not isinstance(d, dict):
            return None, None, ""
        verdict = d.get("verdict") or d.get("action") or d.get("decision")
        model = d.get("model") or d.get("challenger")
        reason = d.get("reason") or "; ".join(map(str, d.get("reasons") or []))
        return (str(verdict).upper() if verdict else None), (str(model) if model else None), \
            str(reason)

    if report.get("decision") is not None:
        return one(report["decision"])
    many = report.get("decisions")
    if isinstance(many, dict):
        many = [{"model": k, **v} if isinstance(v, dict) else {"model": k, "verdict": v}
                for k, v in many.items()]
    if isinstance(many, list) and many:
        parsed = [one(d) for d in many]
        promote = [p for p in parsed if p[0] == "PROMOTE"]
        if len(promote) == 1:
            return promote[0]
        if len(promote) > 1:
            names = ", ".join(str(p[1]) for p in promote)
            return "AMBIGUOUS", None, f"several challengers say PROMOTE ({names})"
        return parsed[0][0], parsed[0][1], "; ".join(p[2] for p in parsed if p[2])
    return None, None, ""


class PromoteRefused(Exception):
    """The report may not be applied now; the message says why and what to do."""

    def __init__(self, message: str, code: int = EXIT_STALE) -> None:
        super().__init__(message)
        self.code = code


def decision_for(report: dict[str, Any], model: str) -> dict[str, Any]:
    """The report's decision entry for `model` (an empty dict when it has none)."""
    many = report.get("decisions")
    if isinstance(many, list):
        for d in many:
            if isinstance(d, dict) and model in (d.get("challenger"), d.get("model")):
                return d
    one = report.get("decision")
    return one if isinstance(one, dict) else {}


def report_binding(report: dict[str, Any], model: str) -> dict[str, Any]:
    """What the report's verdict is bound to: route, champion, challenger, experiment id and
    start, the data's end and the registry version (from the decision's `experiment` entry,
    which `evaluator.report` always writes; a bare report gives what its top level has)."""
    d = decision_for(report, model)
    exp = d.get("experiment") if isinstance(d.get("experiment"), dict) else {}
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
    cannot be reached, with EXIT_FAILED."""
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
                             f"{getattr(exc, 'reason', exc)}", EXIT_FAILED) from None
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode("utf-8", "replace")


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
                             f"(generated {_fmt_ts(generated)}), older than "
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
    config = _load(args)
    out = Path(args.out or config.report.out)
    path = _find_report(args.route, out, Path(args.report) if args.report else None)
    if path is None:
        where = args.report or out
        print(f"promote: no {REPORT_FILE} for route {args.route!r} under {where}; run "
              f"`python -m evaluator report --route {args.route}` first", file=sys.stderr)
        return EXIT_NOTHING
    report = json.loads(path.read_text())
    verdict, model, reason = read_decision(report)
    generated = report.get("generated_at")
    age = (f", generated {_fmt_ts(float(generated))}"
           if isinstance(generated, int | float) and math.isfinite(generated) else "")
    print(f"promote: {path}{age}: decision {verdict or 'none'}"
          f"{f' for {model}' if model else ''}{f' ({reason})' if reason else ''}")
    if verdict == "BLOCKED":
        print("promote: refused: the report's decision is BLOCKED (a guardrail failed); nothing "
              "was changed", file=sys.stderr)
        return EXIT_BLOCKED
    if verdict != "PROMOTE":
        print(f"promote: refused: the report's decision is {verdict or 'missing'}, not PROMOTE; "
              f"nothing was changed", file=sys.stderr)
        return EXIT_NOTHING
    if not model:
        print("promote: refused: the PROMOTE decision names no model", file=sys.stderr)
        return EXIT_FAILED
    write_token = os.environ.get(config.gateway.token_env or TOKEN_ENV)
    read_token = os.environ.get(config.gateway.read_token_env) if args.dry_run else None
    token = write_token or read_token
    if not token:
        need = config.gateway.token_env + (f" (or {config.gateway.read_token_env})"
                                           if args.dry_run else "")
        print(f"promote: refused: set {need} to the gateway's admin token: the live route is "
              "checked before anything is changed", file=sys.stderr)
        return EXIT_USAGE
    gateway = (args.gateway or config.gateway.url).rstrip("/")
    route_url = f"{gateway}/admin/routes/{urllib.parse.quote(args.route, safe='')}"
    try:
        max_age = float(config.decision_for(args.route)["max_report_age"])
        binding = check_report(report, args.route, model, max_age, time.time())
        status, live = _admin_request(config, route_url, token)
        if status != 200 or not isinstance(live, dict):
            raise PromoteRefused(f"GET {route_url} answered {status}: {live}",
                                 EXIT_FAILED if status != 404 else EXIT_STALE)
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
        return EXIT_OK
    if not write_token:
        print(f"promote: refused: set {config.gateway.token_env} to the gateway's admin (write) "
              "token", file=sys.stderr)
        return EXIT_USAGE
    try:
        status, answer = _admin_request(config, f"{route_url}/promote", write_token, body)
    except PromoteRefused as exc:
        print(f"promote: {exc}", file=sys.stderr)
        return exc.code
    if status != 200:
        detail = answer.get("error", answer) if isinstance(answer, dict) else answer
        print(f"promote: the gateway refused ({status}): {detail}", file=sys.stderr)
        return EXIT_STALE if status == 409 else EXIT_FAILED
    print(f"promote: POST {route_url}/promote -> {status}: promoted {model} to champion of "
          f"{args.route}")
    if args.verbose and answer:
        print(json.dumps(answer))
    return EXIT_OK


def _add_promote(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("promote", parents=[common],
                       help="apply a report's PROMOTE decision through the gateway admin API",
                       description="Read the newest report.json of the route; when (and only "
                                   "when) its decision is PROMOTE and the live route is still "
                                   "the one it decided on (champion, challenger, experiment, "
                                   "registry version; not older than decision.max_report_age), "
                                   f"ask the gateway to promote the challenger. Token from "
                                   f"${TOKEN_ENV}.")
    p.add_argument("--route", required=True)
    p.add_argument("--out", help="directory searched for report.json (default: report.out)")
    p.add_argument("--report", help="a report.json, or a directory to search")
    p.add_argument("--gateway", help="gateway base URL (default: gateway.url)")
    p.add_argument("--dry-run", action="store_true",
                   help="run every check (reads the live route) and print the call instead of "
                        "making it")
    p.set_defaults(func=cmd_promote)


# -- drift ------------------------------------------------------------------------------------


def cmd_drift(args: argparse.Namespace) -> int:
    from evaluator import drift  # scipy: imported only when drift runs

    return drift.run_command(args, _load(args))


def _add_drift(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("drift", parents=[common], help="data and prediction drift of a route",
                       description="Compare the route's live window with a reference (a "
                                   "training snapshot file or a past window of the log): PSI, "
                                   "KS, Wasserstein, chi-squared, Jensen-Shannon, unseen "
                                   "categories, score drift per model. See docs/DRIFT.md.")
    p.add_argument("--route", required=True)
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--reference", help="training snapshot: .csv, .jsonl or .parquet "
                                         "(default: drift.reference)")
    ref.add_argument("--reference-window",
                     help="past log window before the live one, e.g. 7d (default: "
                          "drift.reference_window)")
    p.add_argument("--window", help="live window ending at the newest inference, e.g. 1d")
    p.add_argument("--out", help="directory for drift.json / drift.md (default: drift.out)")
    p.add_argument("--push", help="Pushgateway URL (default: drift.pushgateway)")
    p.add_argument("--seasonality", choices=["none", "hour_of_day", "day_of_week",
                                             "day_of_week_hour", "weekday_weekend"],
                   help="reference segments (default: drift.seasonality)")
    p.add_argument("--fixed-thresholds", action="store_true",
                   help="use the fixed PSI/JS conventions, not adaptive thresholds")
    p.add_argument("--no-webhook", action="store_true", help="do not notify the webhook")
    p.add_argument("--serve", type=int, metavar="PORT",
                   help="keep running: recompute every --every and serve /metrics on PORT")
    p.add_argument("--every", help="recompute interval with --serve (default 1h)")
    p.set_defaults(func=cmd_drift)


# -- lake -------------------------------------------------------------------------------------


def cmd_lake(args: argparse.Namespace) -> int:
    from evaluator.lake.storage import Lake

    config = _load(args)
    if not config.lake.path:
        raise ConfigError("lake.path: not set (the landing zone to maintain)")
    lake = Lake(config.lake.path)
    if not lake.exists():
        raise StoreError(f"no landing zone at {config.lake.path}")
    lake.ensure()
    if args.action == "compact":
        done = lake.compact(min_files=config.lake.compact_min_files,
                            small_bytes=int(config.lake.compact_small_mb * 1e6))
        print(f"lake: compacted {done.files_in} file(s) in {done.partitions} partition(s) into "
              f"{done.files_out}; {done.rows_dropped} replayed row(s) dropped; "
              f"{done.tmp_removed} stale temporary file(s) removed")
        return EXIT_OK
    keep = parse_duration(args.older_than, "--older-than") if args.older_than else \
        config.lake.retention
    if keep is None:
        raise ConfigError("lake.retention: not set (or pass --older-than 90d)")
    cutoff = time.strftime("%Y-%m-%d", time.gmtime(time.time() - keep))
    done = lake.expire(cutoff)
    print(f"lake: deleted {done.partitions} partition(s) ({done.files_in} file(s)) dated "
          f"before {cutoff}")
    return EXIT_OK


def _add_lake(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("lake", parents=[common], help="maintain the Parquet landing zone",
                       description="compact: merge each partition's small files (and drop "
                                   "replayed rows). expire: delete date partitions older than "
                                   "lake.retention (or --older-than), in every table.")
    p.add_argument("action", choices=("compact", "expire"))
    p.add_argument("--older-than", help="expire: e.g. 90d (default: lake.retention)")
    p.set_defaults(func=cmd_lake)


# -- entry point ------------------------------------------------------------------------------

COMMANDS: tuple[Callable[[argparse._SubParsersAction, argparse.ArgumentParser], None], ...] = (
    _add_run, _add_report, _add_promote, _add_drift, _add_lake,
)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG_PATH} when "
                                         "present, else built-in defaults)")
    common.add_argument("--store", help="store path (overrides store.path)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser = argparse.ArgumentParser(
        prog="python -m evaluator",
        description="Understudy evaluator: join deferred labels to the inference log, test "
                    "challengers against the champion, and promote only on evidence.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreError as exc:
        print(f"store error: {exc}", file=sys.stderr)
        return EXIT_FAILED
