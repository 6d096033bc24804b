"""Monte Carlo checks of the guardrails and the data-health gate, recorded in docs/STATISTICS.md.

Reproduce (a few minutes on 2 cores; ``--quick`` for fewer runs)::

    .venv/bin/python -m devtools.simulate.guardrails --write docs/STATISTICS.md

Guardrails (``check_guardrails`` with the default limits: p99 ratio 1.5 with a 2 ms margin,
error-rate increase 1 pp, alpha 0.05), champion and challenger on the same n requests:

* latencies are skewed and correlated between the two models on a request: each request has a
  size factor exp(0.3 Z) shared by both, times the model's own draw — ``lognormal`` (median 3 ms,
  sigma 0.5: p99 about 10 ms) or ``tail`` (sigma 0.35 and 2% of requests 4x slower, so the p99
  sits in a second mode: the hard case for a quantile's standard error);
* scenarios: ``identical`` (same latency distribution, 2% error rate each: every BLOCKED is
  false), ``latency_at_limit`` (challenger latencies x1.5: p99 ratio exactly at the limit, +5 ms,
  so its fail rate is the latency test's size), ``errors_at_limit`` (3% vs 2%: the error test's
  size), ``slower`` (x1.5 + 5 ms: p99 ratio about 2, +10 ms), ``flakier`` (5% vs 2%: +3 pp);
* the former rule (point estimates against the limits) is run on the same data for comparison.

Data-health gate (``check_data_health``, alpha 0.001): an epsilon-greedy route (champion ``c``
and an explore challenger ``e`` whose probability drifts from 0.05 to 0.20 as a learning policy's
would) with a shadow challenger ``h`` at sample rate 0.5, 30% of whose copies are shed at random
(``healthy``), or: ``skewed_serving`` (``e`` actually served 1.25x as often as logged),
``low_coverage`` (copies lost before logging: 45% attempted at a logged 50%), ``load_shedding``
(74% of copies shed in the busy hours, 5% otherwise, and the busy hours' traffic has a different
score distribution — the situation that biased the paired comparison in issue 13).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy.special import expit

from devtools.simulate.tests import Rate, _run
from evaluator.dataset import STATUS_CODES, EvalDataset, ModelColumn
from evaluator.gates.guardrails import GuardrailLimits, check_guardrails
from evaluator.gates.health import check_data_health
from loadtests.docblock import write_marked_block

RESULTS_BEGIN = "<!-- simulate_guardrails:begin -->"
RESULTS_END = "<!-- simulate_guardrails:end -->"

SCENARIOS = ("identical", "latency_at_limit", "errors_at_limit", "slower", "flakier")
LATENCIES = ("lognormal", "tail")
FAULTS = ("healthy", "skewed_serving", "low_coverage", "load_shedding")


# ----------------------------------------------------------------------------------------------
# Guardrails
# ----------------------------------------------------------------------------------------------


def _latency(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    if kind == "lognormal":
        return rng.lognormal(math.log(3.0), 0.5, n)
    if kind == "tail":
        return rng.lognormal(math.log(3.0), 0.35, n) * np.where(rng.random(n) < 0.02, 4.0, 1.0)
    raise ValueError(f"unknown latency distribution {kind!r}")


def guardrail_pair(
    seed: int, n: int, scenario: str, latency: str = "lognormal"
) -> tuple[ModelColumn, ModelColumn]:
    """Champion and challenger columns for one simulated route (module docstring)."""
    rng = np.random.default_rng(seed)
    size = np.exp(0.3 * rng.standard_normal(n))
    lat_c = size * _latency(rng, n, latency)
    lat_h = size * _latency(rng, n, latency)
    rate_c, rate_h = 0.02, 0.02
    if scenario == "latency_at_limit":
        lat_h = lat_h * 1.5
    elif scenario == "errors_at_limit":
        rate_h = 0.03
    elif scenario == "slower":
        lat_h = lat_h * 1.5 + 5.0
    elif scenario == "flakier":
        rate_h = 0.05
    elif scenario != "identical":
        raise ValueError(f"unknown scenario {scenario!r}")
    err = STATUS_CODES["error"]
    st_c = np.where(rng.random(n) < rate_c, err, STATUS_CODES["ok"]).astype(np.int8)
    st_h = np.where(rng.random(n) < rate_h, err, STATUS_CODES["ok"]).astype(np.int8)
    zeros = np.zeros(n)
    return (
        ModelColumn("c", "champion", zeros, st_c, lat_c),
        ModelColumn("h", "challenger", zeros, st_h, lat_h),
    )


def _point_rule(champ: ModelColumn, chall: ModelColumn, limits: GuardrailLimits) -> bool:
    """The former guardrail: point estimates against the limits once min_requests are in."""
    ok_c, ok_h = champ.status != STATUS_CODES["error"], chall.status != STATUS_CODES["error"]
    if min(champ.status.size, chall.status.size) < limits.min_requests:
        return False
    ratio = np.quantile(chall.latency_ms, 0.99) / np.quantile(champ.latency_ms, 0.99)
    delta = (1 - ok_h.mean()) - (1 - ok_c.mean())
    return bool(ratio > (limits.max_latency_p99_ratio or math.inf)
                or delta > (limits.max_error_rate_delta or math.inf))


def replicate_guardrail(job: tuple[int, int, str, str]) -> tuple[bool, bool, bool, bool, bool]:
    """(blocked, latency failed, error failed, latency insufficient, former rule blocked)."""
    seed, n, scenario, latency = job
    champ, chall = guardrail_pair(seed, n, scenario, latency)
    limits = GuardrailLimits()
    res = check_guardrails(champ, chall, limits, 0.05)
    checks = {c.name: c for c in res.checks}
    return (
        res.status == "fail",
        checks["latency_p99_ratio"].passed is False,
        checks["error_rate_delta"].passed is False,
        checks["latency_p99_ratio"].passed is None,
        _point_rule(champ, chall, limits),
    )


def guardrail_study(
    n: int, scenario: str, latency: str, reps: int, seed: int, workers: int = 1
) -> dict[str, Rate]:
    jobs = [(seed + i, n, scenario, latency) for i in range(reps)]
    out = np.array(_run(replicate_guardrail, jobs, workers), dtype=bool)
    names = ("blocked", "latency_fail", "error_fail", "latency_insufficient", "former_rule")
    return {k: Rate(int(out[:, j].sum()), reps) for j, k in enumerate(names)}


# ----------------------------------------------------------------------------------------------
# Data health
# ----------------------------------------------------------------------------------------------


def health_dataset(seed: int, n: int, fault: str = "healthy") -> EvalDataset:
    """One simulated exploring route with a shadow challenger ``h`` (module docstring)."""
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}")
    rng = np.random.default_rng(seed)
    ts = np.sort(rng.random(n)) * 7 * 86_400.0
    busy = ((ts / 3600.0) % 24 >= 17) & ((ts / 3600.0) % 24 < 21)  # the evening peak
    logit = rng.standard_normal(n) - 1.0 + np.where(busy, 0.6, 0.0)  # different traffic mix
    labels = (rng.random(n) < expit(logit)).astype(np.float64)
    p_e = 0.05 + 0.15 * np.arange(n) / max(n - 1, 1)
    p_served_e = np.minimum(p_e * (1.25 if fault == "skewed_serving" else 1.0), 1.0)
    served_e = rng.random(n) < p_served_e
    served = np.where(served_e, "e", "c").astype(object)
    propensity = np.where(served_e, p_e, 1 - p_e)
    ok = STATUS_CODES["ok"]
    sampled = rng.random(n) < 0.5
    if fault == "low_coverage":
        sampled &= rng.random(n) < 0.9  # copies lost before they were logged
    shed_p = np.where(busy, 0.74, 0.05) if fault == "load_shedding" else np.full(n, 0.3)
    shed = sampled & (rng.random(n) < shed_p)
    st_h = np.where(sampled, np.where(shed, STATUS_CODES["shed"], ok), STATUS_CODES["skipped"])

    def scores(noise: float) -> np.ndarray:
        return expit(logit + noise * rng.standard_normal(n))

    s_h = np.where(st_h == ok, scores(0.8), np.nan)
    models = {
        "c": ModelColumn("c", "champion", scores(0.8), np.full(n, ok, np.int8), np.ones(n),
                         ("served", "shadow")),
        "e": ModelColumn("e", "challenger", scores(0.8), np.full(n, ok, np.int8), np.ones(n),
                         ("explore", "served"), sample_rate=np.full(n, 1.0)),
        "h": ModelColumn("h", "challenger", s_h, st_h.astype(np.int8), np.ones(n), ("shadow",),
                         sample_rate=np.full(n, 0.5)),
    }
    return EvalDataset(
        route="r", task="classification", champion="c",
        request_ids=np.arange(n).astype(str).astype(object), ts=ts, labels=labels,
        rewards=labels.copy(), served=served, propensity=propensity,
        arm_probs={"c": 1 - p_e, "e": p_e},
        policy_types=np.full(n, "epsilon_greedy", dtype=object), models=models,
    )


def replicate_health(job: tuple[int, int, str]) -> tuple[bool, bool, bool, bool]:
    """(gate failed, sample_ratio failed, coverage failed, shedding failed)."""
    seed, n, fault = job
    res = check_data_health(health_dataset(seed, n, fault), "h")
    by = {c.name: c.status == "fail" for c in res.checks}
    return res.status == "fail", by["sample_ratio"], by["coverage"], by["shedding"]


def health_study(n: int, fault: str, reps: int, seed: int, workers: int = 1) -> dict[str, Rate]:
    jobs = [(seed + i, n, fault) for i in range(reps)]
    out = np.array(_run(replicate_health, jobs, workers), dtype=bool)
    names = ("gate", "sample_ratio", "coverage", "shedding")
    return {k: Rate(int(out[:, j].sum()), reps) for j, k in enumerate(names)}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def run_all(quick: bool, workers: int) -> str:
    start = time.time()
    reps_g = 400 if quick else 2000
    reps_h = 400 if quick else 2000
    lines = [
        RESULTS_BEGIN,
        "",
        f"Generated by `python -m devtools.simulate.guardrails{' --quick' if quick else ''} "
        "--write docs/STATISTICS.md` (seeds fixed; rates ± Monte Carlo SE).",
        "",
        f"#### Guardrails, default limits, alpha 0.05 ({reps_g} routes per cell)",
        "",
        "BLOCKED = any check failed. The latency columns are the p99 check alone (its",
        "'insufficient' share in brackets: below 368 measured, or effective, latencies per",
        "model no distribution-free p99 bound exists). 'former rule' = point estimates vs the",
        "limits.",
        "",
        "| latency | scenario | requests | BLOCKED | latency check fails (insufficient) "
        "| error check fails | former rule BLOCKED |",
        "|---|---|---:|---|---|---|---|",
    ]
    cells: list[tuple[str, str, int]] = [
        (lat, sc, n) for lat in LATENCIES for sc in SCENARIOS for n in (100, 1000, 10_000)
        if not (lat == "tail" and sc in ("errors_at_limit", "flakier"))
    ]
    for k, (lat, sc, n) in enumerate(cells):
        r = guardrail_study(n, sc, lat, reps_g, 50_000 + 10_000 * k, workers)
        lines.append(
            f"| {lat} | {sc} | {n:,} | {r['blocked']} | {r['latency_fail']} "
            f"({r['latency_insufficient'].rate:.0%}) | {r['error_fail']} | {r['former_rule']} |"
        )
    print(f"guardrails done after {time.time() - start:.0f} s", file=sys.stderr)
    lines += [
        "",
        f"#### Data-health gate, alpha 0.001 ({reps_h} routes per cell)",
        "",
        "| data | requests | gate fails | sample ratio fails | coverage fails | shedding fails |",
        "|---|---:|---|---|---|---|",
    ]
    for k, (fault, n) in enumerate((f, n) for f in FAULTS for n in (1000, 10_000)):
        r = health_study(n, fault, reps_h, 900_000 + 10_000 * k, workers)
        lines.append(
            f"| {fault} | {n:,} | {r['gate']} | {r['sample_ratio']} | {r['coverage']} "
            f"| {r['shedding']} |"
        )
    print(f"health done after {time.time() - start:.0f} s", file=sys.stderr)
    lines += ["", f"Run time: {time.time() - start:.0f} s.", "", RESULTS_END]
    return "\n".join(lines)


def block_main(doc: str, run: Callable[[bool, int], str], begin: str, end: str,
               argv: Sequence[str] | None = None) -> None:
    """The command line of a simulation that prints its results block and, with --write,
    replaces it in a document (this module's and devtools.simulate.latency_clusters')."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="400 replications instead of 2000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--write", type=Path, help="update the results block of this file")
    args = parser.parse_args(argv)
    block = run(args.quick, args.workers)
    print(block)
    if args.write:
        write_marked_block(args.write, block, begin, end)


def main(argv: Sequence[str] | None = None) -> None:
    block_main(__doc__, run_all, RESULTS_BEGIN, RESULTS_END, argv)


__all__ = [
    "FAULTS",
    "LATENCIES",
    "SCENARIOS",
    "block_main",
    "guardrail_pair",
    "guardrail_study",
    "health_dataset",
    "health_study",
    "main",
    "run_all",
]

if __name__ == "__main__":
    main()
