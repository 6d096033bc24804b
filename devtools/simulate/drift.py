"""Alert fatigue, measured: a weekly-seasonal stream checked daily with and without seasonal
references (`python -m devtools.simulate.drift [--fast]`; numbers in docs/DRIFT.md).

Why: the seed lesson's production pitfall — a model trained on weekday traffic "drifts" every
Saturday, the alert is always suppressed, and the on-call learns to ignore it. This simulation
shows whether `drift.seasonality` and `drift.adaptive` stop those pages without hiding a real
shift.

The stream (fixed seeds, one row per prediction, timestamps from Monday 2024-01-01 UTC):
* `amount_z`: N(0, 1) on weekdays, N(0.8, 1.2²) at weekends (people shop differently).
* `channel`: web/app/pos shares 50/30/20 on weekdays, 30/50/20 at weekends.
* `velocity_1h`, `merchant_risk`: N(0, 1), no rhythm.
* `promo_depth`: N(mu_day, 1) with mu_day ~ N(0, 0.35²) drawn per day — no weekly pattern, just
  a feature that is always this noisy from day to day (what adaptive thresholds are for).
* a model score sigmoid(-1.5 + 0.8 amount + 0.5 velocity + 0.3 merchant_risk), for prediction
  drift.
Reference: the first `weeks_reference` weeks (a training snapshot with timestamps). Then
`weeks_regular` weeks of the same process, each day checked as a 1-day live window: every page
there is a false alert. Then `weeks_shifted` weeks with a real shift (amount +0.6 SD, velocity
+0.7 SD, 5% of traffic from a new channel "kiosk"): every day there should page.

A page is `DriftResult.significant` (dataset drift at `drift_share`, or a model's scores
drifting), i.e. what fires the webhook.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from evaluator.config import DriftConfig
from evaluator.drift import DAY, FeatureData, compute_drift

MONDAY = 1_704_067_200.0  # 2024-01-01T00:00:00Z, a Monday
NUMERIC = ("amount_z", "velocity_1h", "merchant_risk", "promo_depth")
CHANNELS = ("web", "app", "pos")
WEEKDAY_MIX = (0.5, 0.3, 0.2)
WEEKEND_MIX = (0.3, 0.5, 0.2)
MODEL = "fraud_sim"

# (name, seasonality, adaptive): the four ways of setting up the same check.
MODES: tuple[tuple[str, str, bool], ...] = (
    ("pooled reference, fixed thresholds", "none", False),
    ("pooled reference, adaptive thresholds", "none", True),
    ("day-of-week reference, fixed thresholds", "day_of_week", False),
    ("day-of-week reference, adaptive thresholds", "day_of_week", True),
)


@dataclass(frozen=True)
class SimConfig:
    """Sizes and effects of the simulated stream."""

    seed: int = 20240101
    rows_per_day: int = 2000
    weeks_reference: int = 4
    weeks_regular: int = 6
    weeks_shifted: int = 2
    weekend_amount_shift: float = 0.8
    promo_day_sd: float = 0.35
    real_amount_shift: float = 0.6
    real_velocity_shift: float = 0.7
    real_new_channel_share: float = 0.05


FAST = SimConfig(rows_per_day=400, weeks_reference=3, weeks_regular=2, weeks_shifted=1)


def _day(rng: np.random.Generator, day: int, n: int, cfg: SimConfig, shifted: bool
         ) -> dict[str, np.ndarray]:
    """One day of traffic; day 0 is a Monday."""
    weekend = day % 7 >= 5
    ts = MONDAY + day * DAY + np.sort(rng.uniform(0, DAY, n))
    amount = rng.normal(cfg.weekend_amount_shift if weekend else 0.0,
                        1.2 if weekend else 1.0, n)
    velocity = rng.normal(0.0, 1.0, n)
    risk = rng.normal(0.0, 1.0, n)
    promo = rng.normal(rng.normal(0.0, cfg.promo_day_sd), 1.0, n)
    mix = np.asarray(WEEKEND_MIX if weekend else WEEKDAY_MIX)
    channel = np.asarray(CHANNELS, dtype=object)[rng.choice(3, n, p=mix)]
    if shifted:
        amount += cfg.real_amount_shift
        velocity += cfg.real_velocity_shift
        kiosk = rng.random(n) < cfg.real_new_channel_share
        channel[kiosk] = "kiosk"
    score = 1.0 / (1.0 + np.exp(-(-1.5 + 0.8 * amount + 0.5 * velocity + 0.3 * risk)))
    return {"ts": ts, "amount_z": amount, "velocity_1h": velocity, "merchant_risk": risk,
            "promo_depth": promo, "channel": channel, "score": score}


def _frame(days: Sequence[dict[str, np.ndarray]], source: str, since: float | None = None,
           until: float | None = None) -> FeatureData:
    cols = {k: np.concatenate([d[k] for d in days]) for k in days[0]}
    ts = cols.pop("ts")
    score = cols.pop("score")
    return FeatureData(columns=cols, ts=ts, scores={MODEL: score}, score_ts={MODEL: ts},
                       roles={MODEL: "champion"}, source=source, since=since, until=until)


def simulate(cfg: SimConfig = SimConfig(), drift: DriftConfig | None = None,
             modes: Sequence[tuple[str, str, bool]] = MODES) -> dict[str, Any]:
    """Run every mode over the same stream; returns rates per mode (see `format_table`)."""
    base = drift or DriftConfig()
    rng = np.random.default_rng(cfg.seed)
    ref_days = 7 * cfg.weeks_reference
    reference = _frame([_day(rng, d, cfg.rows_per_day, cfg, False) for d in range(ref_days)],
                       f"simulated reference, {cfg.weeks_reference} weeks")
    n_regular, n_shifted = 7 * cfg.weeks_regular, 7 * cfg.weeks_shifted
    live_days = []
    for k in range(n_regular + n_shifted):
        day = ref_days + k
        shifted = k >= n_regular
        live_days.append((day, shifted, _day(rng, day, cfg.rows_per_day, cfg, shifted)))

    out: dict[str, Any] = {"config": cfg.__dict__, "modes": {}}
    for name, seasonality, adaptive in modes:
        dc = replace(base, seasonality=seasonality, adaptive=adaptive)
        pages = {"regular": 0, "weekend": 0, "weekday": 0, "shifted": 0}
        feature_flags = {f: 0 for f in (*NUMERIC, "channel")}
        shifted_flags = {f: 0 for f in ("amount_z", "velocity_1h", "channel")}
        started = time.perf_counter()
        for day, shifted, data in live_days:
            since = MONDAY + day * DAY
            live = _frame([data], f"day {day}", since, since + DAY)
            result = compute_drift(reference, live, dc, route="sim")
            page = result.significant
            if shifted:
                pages["shifted"] += page
                for f in shifted_flags:
                    shifted_flags[f] += f in result.drifted_features
                continue
            pages["regular"] += page
            pages["weekend" if day % 7 >= 5 else "weekday"] += page
            for f in result.drifted_features:
                feature_flags[f] += 1
        weekends = sum(1 for d, s, _ in live_days if not s and d % 7 >= 5)
        weekdays = n_regular - weekends
        out["modes"][name] = {
            "seasonality": seasonality, "adaptive": adaptive,
            "false_alert_rate": pages["regular"] / n_regular,
            "false_alerts": pages["regular"], "regular_days": n_regular,
            "weekend_false_alert_rate": pages["weekend"] / max(weekends, 1),
            "weekday_false_alert_rate": pages["weekday"] / max(weekdays, 1),
            "feature_false_flag_rate": {f: v / n_regular for f, v in feature_flags.items()},
            "detection_rate": pages["shifted"] / n_shifted if n_shifted else None,
            "shifted_days": n_shifted,
            "shifted_feature_detection": {f: v / max(n_shifted, 1)
                                          for f, v in shifted_flags.items()},
            "seconds": time.perf_counter() - started,
        }
    return out


def format_table(results: dict[str, Any]) -> str:
    """The table docs/DRIFT.md quotes."""
    cfg = results["config"]
    lines = [f"{cfg['weeks_reference']} reference weeks, {cfg['weeks_regular']} regular weeks, "
             f"{cfg['weeks_shifted']} shifted weeks, {cfg['rows_per_day']} rows/day, "
             f"seed {cfg['seed']}; one check per day",
             "",
             "| setup | false pages (regular days) | on weekends | on weekdays | promo_depth "
             "flagged | real shift paged | amount / velocity / channel flagged |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, m in results["modes"].items():
        sf = m["shifted_feature_detection"]
        det = m["detection_rate"]
        lines.append(
            f"| {name} | {m['false_alert_rate']:.1%} ({m['false_alerts']}/{m['regular_days']}) "
            f"| {m['weekend_false_alert_rate']:.1%} | {m['weekday_false_alert_rate']:.1%} "
            f"| {m['feature_false_flag_rate']['promo_depth']:.1%} "
            f"| {'-' if det is None else f'{det:.1%}'} "
            f"| {sf['amount_z']:.0%} / {sf['velocity_1h']:.0%} / {sf['channel']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.simulate.drift",
        description="False-alert and detection rates of daily drift checks on a weekly-"
                    "seasonal stream, with and without seasonal references.")
    parser.add_argument("--fast", action="store_true", help="the small version the tests run")
    parser.add_argument("--seed", type=int, help="stream seed")
    parser.add_argument("--rows-per-day", type=int)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--incident", action="store_true",
                        help="the rolling-reference incident scenarios (issue 20) instead")
    args = parser.parse_args(argv)
    if args.incident:
        return _incident_main(args)
    cfg = FAST if args.fast else SimConfig()
    if args.seed is not None:
        cfg = replace(cfg, seed=args.seed)
    if args.rows_per_day:
        cfg = replace(cfg, rows_per_day=args.rows_per_day)
    results = simulate(cfg)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


INCIDENT_RUNS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("0.5 SD in the 3 features the model uses (3 of 32)", {"scenario": "model3"}),
    ("0.5 SD in 12 of 32 features (dataset rule)", {"scenario": "wide"}),
    ("model's features + 89% NaN in x10", {"scenario": "missing"}),
    ("model's features, windows from 06:00 (straddling midnight)",
     {"scenario": "model3", "check_hour": 6.0}),
)


def format_incident(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """The incident table docs/DRIFT.md quotes."""
    lines = ["| scenario | false pages / normal week | shift days paged | by the dataset rule "
             "| merchant_id flagged (normal days) | x10 flagged (shift days) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        flags = r["normal_feature_flags"].get("merchant_id", 0)
        lines.append(f"| {name} | {r['false_pages_per_week']:.2f} | {r['shift_pages']}/"
                     f"{r['shift_days']} | {r['shift_dataset_pages']}/{r['shift_days']} | "
                     f"{flags}/{r['normal_days']} | "
                     f"{r['shift_feature_flags'].get('x10', 0)}/{r['shift_days']} |")
    return "\n".join(lines)


def _incident_main(args: argparse.Namespace) -> int:
    base = FAST_INCIDENT if args.fast else IncidentConfig()
    if args.seed is not None:
        base = replace(base, seed=args.seed)
    if args.rows_per_day:
        base = replace(base, rows_per_day=args.rows_per_day)
    rows = []
    for name, overrides in INCIDENT_RUNS:
        rows.append((name, simulate_incident(replace(base, **overrides))))
        print(f"{name}: done", file=sys.stderr, flush=True)
    print(format_incident(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(rows), fh, indent=2)
    return 0



# --------------------------------------------------------------------------------------------
# Incidents against a rolling log reference (issue 20): does a real shift page on every day it
# lasts, and does the rest stay quiet?
# --------------------------------------------------------------------------------------------

N_WIDE = 30  # numeric features x00..x29
MODEL_FEATURES = (0, 1, 2)  # the model leans on these three
WEEKEND_FEATURES = (3, 4, 5, 6, 7)  # +weekend_sd (0.8) SD at weekends
N_IDS = 5000  # long-tail identifier: Zipf(1.1) over 5,000 merchant ids


@dataclass(frozen=True)
class IncidentConfig:
    """A route checked once a day against the 28 days of log before the live window.

    `scenario`: `model3` (0.5 SD in the 3 features the model uses: 3 of 32 features, so only
    prediction drift can page), `wide` (0.5 SD in 12 of 32 features: the dataset rule),
    `missing` (the model's features plus 89% NaN in x10). The shift lasts `shift_days` after
    `normal_days` checked normal days, then `after_days` normal days (the episode must close).
    `check_hour`: the live window is [day + h, day + 1 + h), so h > 0 straddles midnight.
    """

    seed: int = 20260101
    rows_per_day: int = 1000
    warmup_days: int = 28
    normal_days: int = 28
    shift_days: int = 7
    after_days: int = 7
    shift_sd: float = 0.5
    scenario: str = "model3"
    check_hour: float = 0.0
    reference_days: int = 28
    weekend_sd: float = 0.8  # weekend shift of x03..x07


FAST_INCIDENT = IncidentConfig(rows_per_day=500, warmup_days=21, normal_days=14,
                               after_days=3, reference_days=21)


def _wide_day(rng: np.random.Generator, day: int, n: int, cfg: IncidentConfig, shifted: bool
              ) -> dict[str, np.ndarray]:
    weekend = day % 7 >= 5
    ts = MONDAY + day * DAY + np.sort(rng.uniform(0, DAY, n))
    x = rng.normal(0.0, 1.0, (N_WIDE, n))
    if weekend:
        x[list(WEEKEND_FEATURES)] += cfg.weekend_sd
    if shifted:
        moved = range(12, 24) if cfg.scenario == "wide" else MODEL_FEATURES
        x[list(moved)] += cfg.shift_sd
        if cfg.scenario == "missing":
            x[10, rng.random(n) < 0.89] = np.nan
    x[10, rng.random(n) < 0.01] = np.nan  # a feature that is sometimes missing anyway
    p = 1.0 / np.arange(1, N_IDS + 1) ** 1.1
    ids = rng.choice(N_IDS, n, p=p / p.sum())
    mix = np.asarray(WEEKEND_MIX if weekend else WEEKDAY_MIX)
    logit = -1.5 + 0.6 * x[list(MODEL_FEATURES)].sum(axis=0) + 0.1 * np.nansum(x[3:10], axis=0)
    out = {f"x{j:02d}": x[j] for j in range(N_WIDE)}
    out.update(ts=ts, merchant_id=np.asarray([f"m{i}" for i in ids], dtype=object),
               channel=np.asarray(CHANNELS, dtype=object)[rng.choice(3, n, p=mix)],
               score=1.0 / (1.0 + np.exp(-logit)))
    return out


def simulate_incident(cfg: IncidentConfig = IncidentConfig(), drift: DriftConfig | None = None,
                      *, memory: bool = True) -> dict[str, Any]:
    """Daily checks of the recommended setup (day-of-week segments, adaptive thresholds, a
    rolling 28-day log reference); `memory`: the episode state pins the reference while an
    episode is open (what `python -m evaluator drift` does through `drift.state_path`).

    Returns pages per phase, the dataset-rule pages in the shift, per-feature flag counts and
    the days of the shift on which each shifted feature was flagged.
    """
    import tempfile
    from pathlib import Path

    dc = drift or DriftConfig(seasonality="day_of_week", adaptive=True)
    rng = np.random.default_rng(cfg.seed)
    total = cfg.warmup_days + cfg.normal_days + cfg.shift_days + cfg.after_days
    shift_start = cfg.warmup_days + cfg.normal_days
    days = [_wide_day(rng, d, cfg.rows_per_day, cfg,
                      shift_start <= d < shift_start + cfg.shift_days) for d in range(total)]
    cols = {k: np.concatenate([d[k] for d in days]) for k in days[0]}
    ts, score = cols.pop("ts"), cols.pop("score")
    phases = {"normal": [], "shift": [], "after": []}
    dataset_pages, flags = 0, {name: 0 for name in cols}
    dataset_shares: dict[str, list[float]] = {"normal": [], "shift": [], "after": []}
    shifted_flags: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        notifier = None
        if memory:
            from evaluator.drift import WebhookNotifier, reference_bounds

            notifier = WebhookNotifier(None, Path(tmp) / "state.json",
                                       clear_runs=dc.episode_clear_runs)
        for d in range(cfg.warmup_days, total):
            since = MONDAY + d * DAY + cfg.check_hour * HOUR_S
            until = since + DAY
            ref_since, ref_until = since - cfg.reference_days * DAY, since
            if notifier is not None:
                pinned = notifier.pinned_until("sim")
                ref_since, ref_until = reference_bounds(since, cfg.reference_days * DAY, pinned)
            live = _slice(cols, ts, score, since, until, f"day {d}")
            reference = _slice(cols, ts, score, ref_since, ref_until, "log reference")
            result = compute_drift(reference, live, dc, route="sim")
            if notifier is not None:
                notifier.observe("sim:drift", result.significant, {}, now=since,
                                 reference_until=ref_until)
            phase = ("normal" if d < shift_start else
                     "shift" if d < shift_start + cfg.shift_days else "after")
            phases[phase].append(bool(result.significant))
            dataset_shares[phase].append(result.dataset_share or 0.0)
            if phase == "shift":
                dataset_pages += bool(result.dataset_drift)
                for name in result.drifted_features:
                    shifted_flags[name] = shifted_flags.get(name, 0) + 1
            elif phase == "normal":
                for name in result.drifted_features:
                    flags[name] += 1
    weeks = cfg.normal_days / 7
    return {
        "config": cfg.__dict__, "memory": memory,
        "false_pages": sum(phases["normal"]), "normal_days": cfg.normal_days,
        "false_pages_per_week": sum(phases["normal"]) / weeks if weeks else None,
        "shift_pages": sum(phases["shift"]), "shift_days": cfg.shift_days,
        "shift_dataset_pages": dataset_pages,
        # the dataset rule's margin: its share on the quietest shift day and the busiest
        # normal day (it pages at drift_share)
        "shift_min_dataset_share": min(dataset_shares["shift"], default=None),
        "normal_max_dataset_share": max(dataset_shares["normal"], default=None),
        "after_pages": phases["after"],
        "normal_feature_flags": {k: v for k, v in flags.items() if v},
        "shift_feature_flags": shifted_flags,
    }


HOUR_S = 3600.0


def _slice(cols: dict[str, np.ndarray], ts: np.ndarray, score: np.ndarray, since: float,
           until: float, source: str) -> FeatureData:
    lo, hi = np.searchsorted(ts, [since, until], side="left")
    return FeatureData(columns={k: v[lo:hi] for k, v in cols.items()}, ts=ts[lo:hi],
                       scores={MODEL: score[lo:hi]}, score_ts={MODEL: ts[lo:hi]},
                       roles={MODEL: "champion"}, source=source, since=since, until=until)


if __name__ == "__main__":
    sys.exit(main())
