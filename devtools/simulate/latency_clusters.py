"""Monte Carlo check of the p99 latency guardrail when slow calls cluster in time, recorded in
docs/STATISTICS.md: the former rule (latencies taken as independent) against the current one
(standard errors widened by the batch-means variance inflation of the p99's exceedances).

Reproduce (about 10 minutes on a busy 2-core machine; ``--quick`` for fewer runs)::

    .venv/bin/python -m devtools.simulate.latency_clusters --write docs/STATISTICS.md

Champion and challenger score the same n requests, one every 50 ms (the ``ts`` the check orders
by). Each request has a size factor exp(0.3 Z) shared by both models, times the model's own
lognormal draw (median 3 ms, sigma 0.5: p99 about 10 ms), as in ``devtools.simulate.guardrails``.
Latency processes:

* ``iid``: nothing else — every call independent of the others given its request;
* ``bursts``: each model's process also stalls at random, as a Triton Python stub did under
  machine load in CI: stalls start at rate 1 per 4,000 requests per model (independently for the
  two), last 50-150 consecutive requests, and add 15-45 ms to every call in them; each model also
  starts cold (its first 8 calls take 80 ms). Both models have the same process, so ``identical``
  is a true null; about 2.5% of calls are stalled, so the stationary p99 itself sits in the stall
  regime and a sample's p99 depends on how many stalls it caught — the dependence the former
  rule ignores;
* ``rare_bursts``: the same at 1 stall per 20,000 requests (0.5% of calls stalled): most samples
  catch none or one, like the CI run where one ~110-call stall hit the challenger.

Scenarios: ``identical`` (same process), ``latency_at_limit`` (challenger latencies x1.5, the
stalls' extra time included: the p99 ratio at the 1.5 limit and the difference past the 2 ms
margin, so the fail rate is the test's size), ``slower`` (x2 throughout: a genuine, time-spread
slowdown; the fail rate is the power).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence

import numpy as np

from devtools.simulate.guardrails import block_main
from devtools.simulate.tests import Rate, _run
from evaluator.dataset import F64, STATUS_CODES, ModelColumn
from evaluator.gates.guardrails import GuardrailLimits, check_guardrails

RESULTS_BEGIN = "<!-- simulate_latency_clusters:begin -->"
RESULTS_END = "<!-- simulate_latency_clusters:end -->"

PROCESSES = ("iid", "rare_bursts", "bursts")
SCENARIOS = ("identical", "latency_at_limit", "slower")
COLD_CALLS, COLD_MS = 8, 80.0
STALL_RATE = {"rare_bursts": 1 / 20_000, "bursts": 1 / 4000}  # starts per request per model
STALL_LENGTH = (50, 150)  # consecutive requests
STALL_EXTRA_MS = (15.0, 45.0)
INTERVAL_S = 0.05


def stalls(rng: np.random.Generator, n: int, rate: float) -> F64:
    """Extra milliseconds per call from one model process's random stalls and its cold start."""
    extra = np.zeros(n)
    for start in np.flatnonzero(rng.random(n) < rate):
        length = int(rng.integers(STALL_LENGTH[0], STALL_LENGTH[1] + 1))
        extra[start:start + length] += rng.uniform(*STALL_EXTRA_MS)
    extra[:COLD_CALLS] = np.maximum(extra[:COLD_CALLS], COLD_MS)
    return extra


def latency_pair(
    seed: int, n: int, process: str, scenario: str
) -> tuple[ModelColumn, ModelColumn, F64]:
    """Champion and challenger columns and the request times (module docstring)."""
    if process not in PROCESSES or scenario not in SCENARIOS:
        raise ValueError(f"unknown process/scenario {process!r}/{scenario!r}")
    rng = np.random.default_rng(seed)
    size = np.exp(0.3 * rng.standard_normal(n))
    lat_c = size * rng.lognormal(math.log(3.0), 0.5, n)
    lat_h = size * rng.lognormal(math.log(3.0), 0.5, n)
    if process != "iid":
        lat_c = lat_c + stalls(rng, n, STALL_RATE[process])
        lat_h = lat_h + stalls(rng, n, STALL_RATE[process])
    lat_h = lat_h * {"identical": 1.0, "latency_at_limit": 1.5, "slower": 2.0}[scenario]
    ok = np.full(n, STATUS_CODES["ok"], dtype=np.int8)
    zeros = np.zeros(n)
    ts = 1_767_000_000.0 + INTERVAL_S * np.arange(n)
    return (ModelColumn("c", "champion", zeros, ok, lat_c),
            ModelColumn("h", "challenger", zeros, ok.copy(), lat_h), ts)


FORMER = GuardrailLimits(max_error_rate_delta=None, latency_time_blocks=0)
CURRENT = GuardrailLimits(max_error_rate_delta=None)


def replicate(job: tuple[int, int, str, str]) -> tuple[bool, bool, bool, bool]:
    """(former rule failed, current failed, current insufficient, former insufficient)."""
    seed, n, process, scenario = job
    champ, chall, ts = latency_pair(seed, n, process, scenario)
    old = check_guardrails(champ, chall, FORMER, 0.05, ts).checks[0]
    new = check_guardrails(champ, chall, CURRENT, 0.05, ts).checks[0]
    return old.passed is False, new.passed is False, new.passed is None, old.passed is None


def study(n: int, process: str, scenario: str, reps: int, seed: int,
          workers: int = 1) -> dict[str, Rate]:
    jobs = [(seed + i, n, process, scenario) for i in range(reps)]
    out = np.array(_run(replicate, jobs, workers), dtype=bool)
    names = ("former_fail", "fail", "insufficient", "former_insufficient")
    return {k: Rate(int(out[:, j].sum()), reps) for j, k in enumerate(names)}


SIZES = (1000, 5000, 20_000)


def run_all(quick: bool, workers: int) -> str:
    start = time.time()
    reps = 400 if quick else 2000
    lines = [
        RESULTS_BEGIN,
        "",
        f"Generated by `python -m devtools.simulate.latency_clusters{' --quick' if quick else ''}"
        " --write docs/STATISTICS.md` (seeds fixed: cell k, route i uses "
        f"`default_rng(300,000 + 10,000 k + i)`; rates ± Monte Carlo SE; {reps} routes per cell).",
        "",
        "`latency_p99_ratio` at alpha 0.05, default limits (1.5, 2 ms margin, 25 time blocks).",
        "'fails' = the check failed (BLOCKED); 'insufficient' = a model's slow calls cluster",
        "beyond chance (95%) and leave it fewer than 368 effective latencies (never a failure).",
        "",
        "| process | scenario | requests | former rule fails | current fails "
        "| current insufficient |",
        "|---|---|---:|---|---|---|",
    ]
    cells = [(p, s, n) for p in PROCESSES for s in SCENARIOS for n in SIZES]
    for k, (process, scenario, n) in enumerate(cells):
        r = study(n, process, scenario, reps, 300_000 + 10_000 * k, workers)
        lines.append(f"| {process} | {scenario} | {n:,} | {r['former_fail']} | {r['fail']} "
                     f"| {r['insufficient']} |")
        print(f"{process} {scenario} {n}: {time.time() - start:.0f} s", file=sys.stderr)
    lines += ["", f"Run time: {time.time() - start:.0f} s.", "", RESULTS_END]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    block_main(__doc__ or "", run_all, RESULTS_BEGIN, RESULTS_END, argv)


__all__ = ["PROCESSES", "SCENARIOS", "latency_pair", "main", "replicate", "run_all", "stalls",
           "study"]

if __name__ == "__main__":
    main()
