"""Monte Carlo checks of the decision procedure, recorded in docs/STATISTICS.md.

Reproduce (about 10 minutes on 2 cores; ``--quick`` for a smaller run)::

    .venv/bin/python -m devtools.simulate.tests --write docs/STATISTICS.md

What it checks, each with a fixed seed and the Monte Carlo standard error of every rate:

1. **A/A, fixed horizon** — champion and challenger are draws from the same model family; one
   decision at the end. The promotion rate must be <= alpha (it should be about alpha / 2: the
   test is two-sided and only the "better" side promotes).
2. **A/A, daily peeking with the fixed-horizon test** — the same data, but a decision every day
   and promotion on the first PROMOTE. This exceeds alpha; it is why the sequential test exists.
3. **A/A, daily peeking with the always-valid sequential test** (``use_sequential``) — back
   under alpha.
4. **Power** — the challenger is better by exactly the configured minimum effect; at the sample
   size the power analysis asks for (computed from a pilot window), the fixed-horizon promotion
   rate should match the configured power.

Scenarios 1-3 run for log loss (paired t-test) and AUROC (DeLong); 4 for both too.

The data-generating process (``simulate_dataset``): each request has a true log-odds
``L ~ N(b0, s^2)`` and label ``y ~ Bernoulli(sigmoid(L))``; a model with noise ``sigma`` scores
``sigmoid(L + e)`` with ``e ~ N(0, sigma^2)``, the champion's and the challenger's noise
correlated (``rho``) as shadow models trained on the same data are. Equal sigmas give an exact
A/A; a smaller challenger sigma a better challenger, whose true AUROC / log-loss advantage is
computed by a large fixed-seed Monte Carlo and solved for to equal the minimum effect. Requests
are spread evenly over ``days`` days; latencies and statuses are identical in distribution so
the guardrails pass.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize
from scipy.special import expit

from evaluator.dataset import STATUS_CODES, EvalDataset, ExperimentInfo, JoinStats, ModelColumn
from evaluator.decision import DecisionPolicy, decide
from evaluator.stats.metrics import PROB_EPS
from loadtests.docblock import write_marked_block

DAY = 86_400.0
RESULTS_BEGIN = "<!-- simulate_tests:begin -->"
RESULTS_END = "<!-- simulate_tests:end -->"


@dataclass(frozen=True)
class World:
    """Parameters of the simulated route (see the module docstring)."""

    b0: float = -1.0  # mean true log-odds (about 30% positives)
    s: float = 1.5  # spread of the true log-odds
    sigma_champion: float = 1.0
    sigma_challenger: float = 1.0
    rho: float = 0.5  # correlation of the two models' noise


def simulate_dataset(
    rng: np.random.Generator,
    n: int,
    world: World,
    *,
    days: int = 14,
    route: str = "sim",
    challengers: int = 1,
) -> EvalDataset:
    """A labelled, paired EvalDataset from ``world`` (``challengers`` exchangeable challengers)."""
    logit = world.b0 + world.s * rng.standard_normal(n)
    y = (rng.random(n) < expit(logit)).astype(np.float64)
    common = rng.standard_normal(n)
    ts = np.sort(rng.uniform(0.0, days * DAY, n))

    def noise(sigma: float) -> np.ndarray:
        own = rng.standard_normal(n)
        return sigma * (math.sqrt(world.rho) * common + math.sqrt(1.0 - world.rho) * own)

    def column(name: str, role: str, sigma: float) -> ModelColumn:
        scores = np.clip(expit(logit + noise(sigma)), PROB_EPS, 1.0 - PROB_EPS)
        return ModelColumn(
            name=name,
            role=role,  # type: ignore[arg-type]
            scores=scores,
            status=np.full(n, STATUS_CODES["ok"], dtype=np.int8),
            latency_ms=rng.lognormal(math.log(5.0), 0.3, n),
            modes=("shadow",),
        )

    models = {"champion": column("champion", "champion", world.sigma_champion)}
    for i in range(challengers):
        name = "challenger" if challengers == 1 else f"challenger{i + 1}"
        models[name] = column(name, "challenger", world.sigma_challenger)
    ones = np.ones(n)
    return EvalDataset(
        route=route,
        task="classification",
        champion="champion",
        request_ids=np.array([f"r{i}" for i in range(n)], dtype=object),
        ts=ts,
        labels=y,
        rewards=np.full(n, np.nan),
        served=np.full(n, "champion", dtype=object),
        propensity=ones,
        arm_probs={"champion": ones},
        policy_types=np.full(n, "champion", dtype=object),
        models=models,
        stats=JoinStats(inferences=n, labels=n, joined=n),
    )


def subset(dataset: EvalDataset, rows: np.ndarray | slice) -> EvalDataset:
    """The same dataset restricted to ``rows`` (a slice of the time-ordered rows: a past day)."""
    return dataset.take(rows)


# ----------------------------------------------------------------------------------------------
# True effects of a world (large fixed-seed Monte Carlo)
# ----------------------------------------------------------------------------------------------


def true_effects(world: World, n: int = 400_000, seed: int = 99) -> dict[str, float]:
    """Population AUROC and log-loss of both models (common random numbers across calls)."""
    from evaluator.stats.metrics import per_request_loss
    from evaluator.stats.significance import delong_covariance

    ds = simulate_dataset(np.random.default_rng(seed), n, world)
    y = ds.labels
    c, h = ds.models["champion"].scores, ds.models["challenger"].scores
    aucs, _ = delong_covariance(y, np.vstack([c, h]))
    return {
        "auroc_champion": float(aucs[0]),
        "auroc_challenger": float(aucs[1]),
        "auroc_gain": float(aucs[1] - aucs[0]),
        "log_loss_champion": float(per_request_loss("log_loss", y, c).mean()),
        "log_loss_challenger": float(per_request_loss("log_loss", y, h).mean()),
        "log_loss_gain": float(
            per_request_loss("log_loss", y, c).mean() - per_request_loss("log_loss", y, h).mean()
        ),
    }


def world_with_gain(
    metric: str, gain: float, base: World | None = None, mc_n: int = 400_000
) -> World:
    """The world whose challenger beats the champion by exactly ``gain`` on ``metric``."""
    base = base or World()
    key = "auroc_gain" if metric == "auroc" else "log_loss_gain"

    def f(sigma: float) -> float:
        return true_effects(replace(base, sigma_challenger=sigma), n=mc_n)[key] - gain

    sigma = optimize.brentq(f, 0.05, base.sigma_champion, xtol=1e-4)
    return replace(base, sigma_challenger=float(sigma))


# ----------------------------------------------------------------------------------------------
# Replications
# ----------------------------------------------------------------------------------------------


def _day_ends(ds: EvalDataset, days: int) -> list[int]:
    return [int(np.searchsorted(ds.ts, (d + 1) * DAY, side="left")) for d in range(days)]


def _promoted(ds: EvalDataset, policy: DecisionPolicy) -> bool:
    return decide(ds, policy)[0].decision == "PROMOTE"


def replicate_aa(args: tuple[int, str, int, int, int]) -> tuple[bool, bool, bool, bool]:
    """One A/A route: promoted by (fixed test once, sequential once, fixed daily, sequential
    daily). "Once" is the decision on all the data at the end; "daily" any PROMOTE on a day."""
    seed, metric, n, days, min_samples = args
    ds = simulate_dataset(np.random.default_rng(seed), n, World(), days=days)
    fixed = DecisionPolicy(primary_metric=metric, use_sequential=False, min_samples=min_samples)  # type: ignore[arg-type]
    seq = replace(fixed, use_sequential=True)
    fixed_days, seq_days = [], []
    for end in _day_ends(ds, days):
        day = subset(ds, slice(0, end))
        fixed_days.append(decide(day, fixed)[0].decision == "PROMOTE")
        seq_days.append(decide(day, seq)[0].decision == "PROMOTE")
    return fixed_days[-1], seq_days[-1], any(fixed_days), any(seq_days)


def replicate_power(args: tuple[int, str, World, float, int, int, bool]) -> tuple[bool, bool]:
    """One route with a true effect: (fixed-horizon promotion at n, sequential read daily)."""
    seed, metric, world, mde, n, days, with_sequential = args
    ds = simulate_dataset(np.random.default_rng(seed), n, world, days=days)
    fixed = DecisionPolicy(
        primary_metric=metric,  # type: ignore[arg-type]
        min_effect=mde,
        use_sequential=False,
        min_samples=100,
    )
    seq = replace(fixed, use_sequential=True)
    sequential = with_sequential and any(
        decide(subset(ds, slice(0, end)), seq)[0].decision == "PROMOTE"
        for end in _day_ends(ds, days)
    )
    return _promoted(ds, fixed), sequential


def _run(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int) -> list[Any]:
    if workers <= 1:
        return [fn(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, jobs, chunksize=max(1, len(jobs) // (workers * 8))))


@dataclass(frozen=True)
class Rate:
    hits: int
    reps: int

    @property
    def rate(self) -> float:
        return self.hits / self.reps

    @property
    def mcse(self) -> float:
        p = self.rate
        return math.sqrt(max(p * (1 - p), 1e-12) / self.reps)

    def __str__(self) -> str:
        return f"{self.rate:.4f} ± {self.mcse:.4f}"


def aa_study(
    metric: str, reps: int, n: int, days: int, min_samples: int, seed: int, workers: int = 1
) -> dict[str, Rate]:
    jobs = [(seed + i, metric, n, days, min_samples) for i in range(reps)]
    out = np.array(_run(replicate_aa, jobs, workers), dtype=bool)
    names = ("fixed_once", "sequential_once", "fixed_daily", "sequential_daily")
    return {name: Rate(int(out[:, i].sum()), reps) for i, name in enumerate(names)}


def power_study(
    metric: str,
    mde: float,
    reps: int,
    seed: int,
    days: int = 14,
    pilot_n: int = 20_000,
    workers: int = 1,
    mc_n: int = 400_000,
    with_sequential: bool = True,
) -> dict[str, Any]:
    """Required n from a pilot window, then the promotion rate at that n."""
    world = world_with_gain(metric, mde, mc_n=mc_n)
    policy = DecisionPolicy(primary_metric=metric, min_effect=mde, use_sequential=False)  # type: ignore[arg-type]
    pilot = simulate_dataset(np.random.default_rng(seed - 1), pilot_n, world, days=days)
    power = decide(pilot, policy)[0].power
    assert power is not None
    assert power.required_n is not None
    n = power.required_n
    jobs = [(seed + i, metric, world, mde, n, days, with_sequential) for i in range(reps)]
    out = np.array(_run(replicate_power, jobs, workers), dtype=bool)
    return {
        "world": world,
        "true": true_effects(world, n=mc_n),
        "required_n": n,
        "target_power": policy.power,
        "fixed": Rate(int(out[:, 0].sum()), reps),
        "sequential_daily": Rate(int(out[:, 1].sum()), reps),
    }


# ----------------------------------------------------------------------------------------------
# The shipped schedule: a report every day on all data since the experiment started
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """How reports are produced and read (defaults: the shipped CronJob, docs/DEPLOY.md)."""

    days: int = 60  # one report at the end of every day
    per_day: int = 200  # requests per day, all labelled eventually
    label_delay_days: float = 1.5  # exponential label delay (mean)
    window_days: float | None = None  # None: all rows since the experiment started
    label_order: bool = True  # hand decide() the label receipt times (False: leave them out)


@dataclass(frozen=True)
class Trajectory:
    """One route's daily verdicts, summarised: days are 1-based report days, 0 = never."""

    first_promote: int
    first_keep: int
    first_keep_worse: int
    promote_wrong_side: bool  # a PROMOTE while the CS was empty or below zero
    final: str


def simulate_schedule_route(
    rng: np.random.Generator,
    world: World,
    schedule: Schedule,
    *,
    before: World | None = None,
    switch_days: float = 0.0,
) -> EvalDataset:
    """A route under ``schedule``: requests uniform in time, labels after an exponential delay;
    the challenger follows ``before`` until ``switch_days`` and ``world`` after. The challenger
    carries experiment id "exp-1" and ``experiments`` names it (the decision uses its rows)."""
    n = schedule.days * schedule.per_day
    ts = np.sort(rng.uniform(0.0, schedule.days * DAY, n))
    label_ts = ts + rng.exponential(schedule.label_delay_days * DAY, n)
    logit = world.b0 + world.s * rng.standard_normal(n)
    y = (rng.random(n) < expit(logit)).astype(np.float64)
    common = rng.standard_normal(n)
    sigma_h = np.full(n, world.sigma_challenger)
    if before is not None:
        sigma_h[ts < switch_days * DAY] = before.sigma_challenger

    def column(name: str, role: str, sigma: np.ndarray | float) -> ModelColumn:
        noise = sigma * (
            math.sqrt(world.rho) * common + math.sqrt(1.0 - world.rho) * rng.standard_normal(n)
        )
        return ModelColumn(
            name=name,
            role=role,  # type: ignore[arg-type]
            scores=np.clip(expit(logit + noise), PROB_EPS, 1.0 - PROB_EPS),
            status=np.full(n, STATUS_CODES["ok"], dtype=np.int8),
            latency_ms=rng.lognormal(math.log(5.0), 0.3, n),
            modes=("shadow",),
            experiment=np.full(n, "exp-1", dtype=object) if role == "challenger" else None,
            sample_rate=np.ones(n) if role == "challenger" else None,
        )

    ones = np.ones(n)
    ds = EvalDataset(
        route="sim",
        task="classification",
        champion="champion",
        request_ids=np.array([f"r{i}" for i in range(n)], dtype=object),
        ts=ts,
        labels=y,
        rewards=np.full(n, np.nan),
        served=np.full(n, "champion", dtype=object),
        propensity=ones,
        arm_probs={"champion": ones},
        policy_types=np.full(n, "champion", dtype=object),
        models={
            "champion": column("champion", "champion", world.sigma_champion),
            "challenger": column("challenger", "challenger", sigma_h),
        },
        stats=JoinStats(inferences=n, labels=n, joined=n),
        registry_version=np.ones(n, dtype=np.int64),
        label_ts=label_ts,
    )
    return ds


def _report_view(ds: EvalDataset, day: int, schedule: Schedule) -> EvalDataset:
    """What the report at the end of ``day`` (1-based) sees: rows inferred and labelled by then
    (within the window, if any), with the experiment's bookkeeping as the store gives it."""
    end = day * DAY
    assert ds.label_ts is not None
    rows = (ds.ts <= end) & (ds.label_ts <= end)
    if schedule.window_days is not None:
        rows &= ds.ts > end - schedule.window_days * DAY
    view = ds.take(np.flatnonzero(rows))
    if not schedule.label_order:
        view = replace(view, label_ts=None)
    if view.ts.size:
        view = replace(
            view,
            experiments={
                "challenger": ExperimentInfo("exp-1", 0.0, float(view.ts.max()), "champion", 1)
            },
        )
    return view


def run_schedule(ds: EvalDataset, schedule: Schedule, config: Any) -> Trajectory:
    """Every daily report of one route through ``compute_decisions`` (the CLI's own call)."""
    from evaluator.cli import compute_decisions

    first = {"PROMOTE": 0, "KEEP": 0, "worse": 0}
    wrong = False
    final = "INCONCLUSIVE"
    for day in range(1, schedule.days + 1):
        d = compute_decisions(_report_view(ds, day, schedule), config)[0]
        final = d.decision
        if d.decision in ("PROMOTE", "KEEP") and not first[d.decision]:
            first[d.decision] = day
        if d.decision == "KEEP" and d.checks.get("significantly_worse") and not first["worse"]:
            first["worse"] = day
        if d.decision == "PROMOTE" and d.sequential is not None and d.sequential.cs_low.size:
            low, high = float(d.sequential.cs_low[-1]), float(d.sequential.cs_high[-1])
            wrong = wrong or low > high or high < 0
    return Trajectory(first["PROMOTE"], first["KEEP"], first["worse"], wrong, final)


def replicate_schedule(
    args: tuple[int, World, World | None, float, Schedule, str],
) -> Trajectory:
    seed, world, before, switch_days, schedule, config_path = args
    from evaluator.config import load_config

    config = load_config(config_path, env={})
    ds = simulate_schedule_route(
        np.random.default_rng(seed), world, schedule, before=before, switch_days=switch_days
    )
    return run_schedule(ds, schedule, config)


def schedule_study(
    world: World,
    schedule: Schedule,
    reps: int,
    seed: int,
    *,
    before: World | None = None,
    switch_days: float = 0.0,
    config_path: str = "configs/evaluator.yaml",
    workers: int = 1,
) -> dict[str, Any]:
    """Rates over ``reps`` routes: PROMOTE on any day, KEEP (worse) before PROMOTE, ..."""
    jobs = [(seed + i, world, before, switch_days, schedule, config_path) for i in range(reps)]
    runs: list[Trajectory] = _run(replicate_schedule, jobs, workers)

    def rate(pred: Callable[[Trajectory], bool]) -> Rate:
        return Rate(sum(1 for t in runs if pred(t)), reps)

    def before_promote(day: int, t: Trajectory) -> bool:
        return bool(day) and (not t.first_promote or day < t.first_promote)

    promote_days = [t.first_promote for t in runs if t.first_promote]
    return {
        "promote": rate(lambda t: bool(t.first_promote)),
        "promote_wrong_side": rate(lambda t: t.promote_wrong_side),
        "keep_worse_before_promote": rate(
            lambda t: bool(t.first_promote) and before_promote(t.first_keep_worse, t)
        ),
        "keep_before_promote": rate(
            lambda t: bool(t.first_promote) and before_promote(t.first_keep, t)
        ),
        "keep_worse_ever": rate(lambda t: bool(t.first_keep_worse)),
        "keep_ever": rate(lambda t: bool(t.first_keep)),
        "final_promote": rate(lambda t: t.final == "PROMOTE"),
        "median_promote_day": float(np.median(promote_days)) if promote_days else None,
        "runs": runs,
    }


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def run_all(quick: bool, workers: int) -> str:
    start = time.time()
    alpha = DecisionPolicy().alpha
    reps_aa = 200 if quick else 1000
    reps_pw = 200 if quick else 1000
    n, days, min_samples = 4200, 14, 200
    lines = [
        RESULTS_BEGIN,
        "",
        f"Generated by `python -m devtools.simulate.tests{' --quick' if quick else ''} "
        f"--write docs/STATISTICS.md` (alpha = {alpha}, seeds fixed; rates ± Monte Carlo SE).",
        "",
        f"### A/A: {reps_aa} routes each, {n} labelled requests over {days} days, "
        f"decision daily from {min_samples} requests",
        "",
        "| primary | fixed-horizon test, one look | sequential test, one look "
        "| fixed-horizon test read daily | sequential test read daily |",
        "|---|---|---|---|---|",
    ]
    for metric, seed in (("log_loss", 10_000), ("auroc", 20_000)):
        r = aa_study(metric, reps_aa, n, days, min_samples, seed, workers)
        print(f"A/A {metric} done after {time.time() - start:.0f} s", file=sys.stderr)
        lines.append(
            f"| {metric} | {r['fixed_once']} | {r['sequential_once']} | {r['fixed_daily']} "
            f"| {r['sequential_daily']} |"
        )
    lines += [
        "",
        f"### Power at the minimum detectable effect ({reps_pw} routes each, {days} daily looks "
        "for the sequential column)",
        "",
        "| primary | effect (true) | n from power analysis | target power "
        "| fixed-horizon promotion rate | sequential read daily, same n |",
        "|---|---|---|---|---|---|",
    ]
    for metric, mde, seed in (("log_loss", 0.01, 30_000), ("auroc", 0.01, 40_000)):
        p = power_study(metric, mde, reps_pw, seed, days, workers=workers)
        print(f"power {metric} done after {time.time() - start:.0f} s", file=sys.stderr)
        gain = p["true"]["auroc_gain" if metric == "auroc" else "log_loss_gain"]
        lines.append(
            f"| {metric} | {mde} ({gain:.4f}) | {p['required_n']} | {p['target_power']:.2f} "
            f"| {p['fixed']} | {p['sequential_daily']} |"
        )
    lines += ["", f"Run time: {time.time() - start:.0f} s.", "", RESULTS_END]
    return "\n".join(lines)


SCHEDULE_BEGIN = "<!-- simulate_schedule:begin -->"
SCHEDULE_END = "<!-- simulate_schedule:end -->"
SCHEDULE_METRICS = (
    "promote",
    "promote_wrong_side",
    "keep_worse_before_promote",
    "keep_before_promote",
    "keep_worse_ever",
    "keep_ever",
    "final_promote",
)


def schedule_scenarios(
    quick: bool, legacy: bool, per_day: int = 200, reps: int = 400
) -> list[tuple[str, World, World | None, Schedule, int, int]]:
    """(name, world, world before day 2, schedule, replications, seed) of every scenario.

    ``legacy`` runs the schedule that shipped before experiments: a 7-day sliding window and no
    label receipt times (the code on main before this change ignores them anyway).
    """
    if quick:
        reps = 60
    half = max(reps // 2, 1)
    base = Schedule(days=60, per_day=per_day, label_delay_days=1.5)
    gain = world_with_gain("auroc", DecisionPolicy().min_effect, mc_n=100_000 if quick else 400_000)
    wtb_before, wtb_after = World(sigma_challenger=2.0), World(sigma_challenger=0.5)
    if legacy:
        old = replace(base, window_days=7.0, label_order=False)
        return [
            ("A/A", World(), None, old, reps, 50_000),
            ("better by min_effect", gain, None, old, half, 60_000),
            ("worse 2 days, then better", wtb_after, wtb_before, old, half // 2, 70_000),
        ]
    inference = replace(base, label_order=False)
    return [
        ("A/A", World(), None, base, reps, 50_000),
        ("better by min_effect", gain, None, base, half, 60_000),
        ("worse 2 days, then better", wtb_after, wtb_before, base, half // 2, 70_000),
        ("worse 2 days, then better", wtb_after, wtb_before, inference, half // 2, 70_000),
        ("A/A", World(), None, inference, half, 50_000),
    ]


def run_schedule_studies(
    quick: bool,
    legacy: bool,
    workers: int,
    per_day: int = 200,
    reps: int = 400,
    save: Path | None = None,
    only: Sequence[str] = (),
) -> dict[str, Any]:
    """Every schedule scenario; JSON-ready (hit counts and replications). With ``save``, the
    results so far are written after each scenario (long runs on a busy machine)."""
    out: dict[str, Any] = {}
    start = time.time()
    for name, world, before, schedule, n_reps, seed in schedule_scenarios(
        quick, legacy, per_day, reps
    ):
        if only and name not in only:
            continue
        r = schedule_study(
            world, schedule, n_reps, seed, before=before, switch_days=2.0, workers=workers
        )
        order = "label" if schedule.label_order else "inference"
        out[f"{name} ({order} order)"] = {
            "scenario": name,
            "schedule": {k: getattr(schedule, k) for k in schedule.__dataclass_fields__},
            "reps": n_reps,
            "median_promote_day": r["median_promote_day"],
            **{m: [r[m].hits, r[m].reps] for m in SCHEDULE_METRICS},
        }
        print(f"{name}: done after {time.time() - start:.0f} s", file=sys.stderr, flush=True)
        out["run_time_s"] = round(time.time() - start)
        if save is not None:
            save.write_text(json.dumps(out, indent=1) + "\n")
    return out


def schedule_block(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """The Markdown table of docs/STATISTICS.md's schedule section: (label, results) runs,
    e.g. the previous code ("before") and this code ("after")."""
    lines = [
        SCHEDULE_BEGIN,
        "",
        "Generated by `python -m devtools.simulate.tests --schedule` (before: the same command "
        "run against the previous decision code with `--legacy`; seeds fixed; rates ± Monte "
        "Carlo SE).",
        "",
        "| code | requests/day, data, order | scenario | routes | PROMOTE on some day "
        "| PROMOTE with the CS empty or below 0 | KEEP (worse) before PROMOTE "
        "| any KEEP before PROMOTE "
        "| KEEP (worse) on some day | PROMOTE at day 60 | median day of first PROMOTE |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, results in runs:
        for r in results.values():
            if not isinstance(r, dict):
                continue
            name = r["scenario"]
            cells = [str(Rate(*r[m])) for m in SCHEDULE_METRICS if m not in ("keep_ever",)]
            day = r["median_promote_day"]
            sched = r["schedule"]
            window = sched["window_days"]
            data = "all rows" if window is None else f"{window:g}-day window"
            order = "label arrival" if sched["label_order"] else "inference time"
            lines.append(
                f"| {label} | {sched['per_day']}, {data}, {order} | {name} | {r['reps']} | "
                + " | ".join(cells)
                + f" | {'-' if day is None else f'{day:g}'} |"
            )
    lines += [
        "",
        "Run time: "
        + ", ".join(f"{label} {results.get('run_time_s', '?')} s" for label, results in runs)
        + " (2 workers on a shared 2-core machine).",
        "",
        SCHEDULE_END,
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer replications")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--write", type=Path, help="update the results block of this file")
    parser.add_argument(
        "--schedule", action="store_true", help="the daily-report schedule studies instead"
    )
    parser.add_argument("--legacy", action="store_true", help="schedule: the old 7-day window")
    parser.add_argument("--json", type=Path, help="schedule: save the results here")
    parser.add_argument(
        "--before",
        type=Path,
        action="append",
        default=[],
        help="schedule: JSON of a --legacy run to show first (repeatable)",
    )
    parser.add_argument("--from-json", type=Path, help="schedule: format this run, no simulation")
    parser.add_argument(
        "--also", type=Path, action="append", default=[], help="schedule: more JSON runs to show"
    )
    parser.add_argument(
        "--only", action="append", default=[], help="schedule: run only this scenario (repeatable)"
    )
    parser.add_argument("--per-day", type=int, default=200, help="schedule: requests per day")
    parser.add_argument("--reps", type=int, default=400, help="schedule: A/A replications")
    args = parser.parse_args(argv)
    if args.schedule:
        if args.from_json:
            results = json.loads(args.from_json.read_text())
        else:
            results = run_schedule_studies(
                args.quick,
                args.legacy,
                args.workers,
                args.per_day,
                args.reps,
                args.json,
                args.only,
            )
        runs = [("before", json.loads(path.read_text())) for path in args.before]
        label = "before" if args.legacy else "after"
        also = [(label, json.loads(path.read_text())) for path in args.also]
        block = schedule_block([*runs, (label, results), *also])
        print(block)
        if args.write:
            write_marked_block(args.write, block, SCHEDULE_BEGIN, SCHEDULE_END)
        return
    block = run_all(args.quick, args.workers)
    print(block)
    if args.write:
        write_marked_block(args.write, block, RESULTS_BEGIN, RESULTS_END)


if __name__ == "__main__":
    main()
