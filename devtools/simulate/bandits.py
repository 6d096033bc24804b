"""Reproducible bandit simulation: Thompson sampling vs epsilon-greedy on Bernoulli arms.

Runs the gateway's own policy classes (gateway.explore.policies), so what is measured is what is
shipped.
Each run draws every arm's potential outcome for every pull up front from a seeded generator, so
all policies face the same environment (common random numbers) and results do not depend on the
number of worker processes. Results and the exact command are recorded in docs/EXPLORATION.md.

    python -m devtools.simulate.bandits --runs 200 --pulls 5000 --seed 7

``--offpolicy`` instead checks the off-policy estimators (evaluator/stats/offpolicy.py) on simulated
exploration logs with a known value of "always serve X": bias ± Monte Carlo SE and 95% CI
coverage of IPS, SNIPS, DM and the cross-fitted DR, and how far DR moves from DM. Two logging
processes: ``constant`` (epsilon-greedy, constant propensities: before cross-fitting DR was
identically DM there) and ``drift`` (the policy explores arm m1 less and less while m1's reward
falls over time, which its score does not know: the reward model is misspecified, DM is biased,
DR must not be). Results in docs/STATISTICS.md:

    python -m devtools.simulate.bandits --offpolicy --runs 400 --write docs/STATISTICS.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import expit

from evaluator.dataset import EvalDataset, ModelColumn
from evaluator.stats.offpolicy import ESTIMATORS, estimate_policy_values
from gateway.explore.policies import EpsilonGreedy, Policy, ThompsonSampling
from loadtests.docblock import write_marked_block

DEFAULT_RATES = (0.10, 0.12, 0.15)
DEFAULT_EPSILONS = (0.05, 0.1, 0.2)


@dataclass(frozen=True)
class PolicySpec:
    """A picklable policy recipe: ("thompson", prior) or ("epsilon_greedy", epsilon)."""

    kind: str
    param: float = 0.0

    @property
    def label(self) -> str:
        return "thompson" if self.kind == "thompson" else f"eps-greedy {self.param:g}"

    def build(self) -> Policy:
        if self.kind == "thompson":
            return ThompsonSampling(1.0, 1.0)
        return EpsilonGreedy(self.param)


@dataclass(frozen=True)
class RunResult:
    """One run: cumulative pseudo-regret at each checkpoint and best-arm share in each window."""

    regret: tuple[float, ...]
    share: tuple[float, ...]


def default_checkpoints(pulls: int) -> tuple[int, ...]:
    """Window ends for the report: a few early ones, then five even steps up to `pulls`."""
    points = {p for p in (100, 250, 500, 1000) if p < pulls}
    points |= {round(pulls * i / 5) for i in range(1, 6)}
    return tuple(sorted(p for p in points if p > 0))


def simulate_run(
    spec: PolicySpec,
    rates: Sequence[float],
    pulls: int,
    seed: int,
    run: int,
    checkpoints: Sequence[int],
    batch: int = 1,
) -> RunResult:
    """One run of one policy. Rewards are applied every `batch` pulls (1 = immediately).

    Regret is pseudo-regret (sum of max rate minus the served arm's rate), which removes the
    reward noise from the comparison; the policy itself only ever sees 0/1 rewards.
    """
    arms = tuple(f"arm{i}" for i in range(len(rates)))
    rate = np.asarray(rates, dtype=float)
    best = int(np.argmax(rate))
    env = np.random.default_rng([seed, run])
    outcomes = env.random((pulls, len(rates))) < rate  # potential outcome of every arm, every pull
    rng = random.Random(seed * 1_000_003 + run)
    policy = spec.build()
    index = {a: i for i, a in enumerate(arms)}
    gaps = rate.max() - rate
    regret = 0.0
    on_best = 0
    pending: list[tuple[str, float]] = []
    regrets: list[float] = []
    shares: list[float] = []
    marks = iter(checkpoints)
    mark = next(marks, None)
    window_start = 0
    for t in range(pulls):
        arm = policy.decide(arms, None, rng).arm
        i = index[arm]
        regret += gaps[i]
        on_best += i == best
        pending.append((arm, float(outcomes[t, i])))
        if len(pending) >= batch:
            for a, r in pending:
                policy.update(a, r)
            pending.clear()
        if mark is not None and t + 1 == mark:
            regrets.append(regret)
            shares.append(on_best / (mark - window_start))
            on_best, window_start = 0, mark
            mark = next(marks, None)
    return RunResult(tuple(regrets), tuple(shares))


_Task = tuple[PolicySpec, tuple[float, ...], int, int, int, tuple[int, ...], int]


def _run_task(args: _Task) -> RunResult:
    return simulate_run(*args)


def simulate(
    specs: Sequence[PolicySpec],
    rates: Sequence[float] = DEFAULT_RATES,
    runs: int = 200,
    pulls: int = 5000,
    seed: int = 7,
    checkpoints: Sequence[int] | None = None,
    batch: int = 1,
    workers: int = 1,
) -> dict[str, dict[str, list[float]]]:
    """Mean and standard error over runs, per policy: regret and best-arm share per checkpoint."""
    points = tuple(checkpoints or default_checkpoints(pulls))
    tasks = [(s, tuple(rates), pulls, seed, r, points, batch) for s in specs for r in range(runs)]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            chunk = max(1, len(tasks) // (8 * workers))
            results = list(pool.map(_run_task, tasks, chunksize=chunk))
    else:
        results = [_run_task(t) for t in tasks]
    out: dict[str, dict[str, list[float]]] = {}
    for j, spec in enumerate(specs):
        chunk = results[j * runs:(j + 1) * runs]
        regret = np.array([r.regret for r in chunk])
        share = np.array([r.share for r in chunk])
        se = 1.0 / math.sqrt(max(runs, 1))
        out[spec.label] = {
            "checkpoints": list(points),
            "regret_mean": regret.mean(axis=0).tolist(),
            "regret_se": (regret.std(axis=0, ddof=1) * se if runs > 1 else regret[0] * 0).tolist(),
            "share_mean": share.mean(axis=0).tolist(),
            "share_se": (share.std(axis=0, ddof=1) * se if runs > 1 else share[0] * 0).tolist(),
        }
    return out


def markdown(results: dict[str, dict[str, list[float]]]) -> str:
    """Two tables: cumulative regret (mean ± se) and best-arm share per window."""
    labels = list(results)
    points = results[labels[0]]["checkpoints"]
    lines = ["Cumulative pseudo-regret (mean ± s.e.) after t pulls", ""]
    lines.append("| t | " + " | ".join(labels) + " |")
    lines.append("|---:|" + "---:|" * len(labels))
    for k, t in enumerate(points):
        cells = [f"{results[x]['regret_mean'][k]:.1f} ± {results[x]['regret_se'][k]:.1f}"
                 for x in labels]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += ["", "Share of pulls on the best arm within each window (mean)", ""]
    lines.append("| window | " + " | ".join(labels) + " |")
    lines.append("|---|" + "---:|" * len(labels))
    start = 0
    for k, t in enumerate(points):
        cells = [f"{results[x]['share_mean'][k]:.3f}" for x in labels]
        lines.append(f"| {start + 1}–{t} | " + " | ".join(cells) + " |")
        start = t
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Off-policy estimators on simulated exploration logs
# ----------------------------------------------------------------------------------------------

OFFPOLICY_ARMS = ("m0", "m1", "m2")
OFFPOLICY_SCENARIOS = ("constant", "drift")
OFFPOLICY_BEGIN = "<!-- simulate_offpolicy:begin -->"
OFFPOLICY_END = "<!-- simulate_offpolicy:end -->"


def _logit_base(k: int, x: np.ndarray) -> np.ndarray:
    return -0.5 + 0.6 * k * x - 0.3 * k + 0.8 * np.sin(x + k)


def _drift(k: int, t: np.ndarray, scenario: str) -> np.ndarray:
    """Concept drift the models' scores do not see: m1's reward falls over the log."""
    if scenario == "drift" and k == 1:
        return 1.2 * (0.5 - t)
    return np.zeros_like(t)


def _logging_probs(n: int, scenario: str) -> np.ndarray:
    t = np.arange(n) / max(n - 1, 1)
    if scenario == "constant":  # epsilon-greedy, epsilon 0.3, greedy arm m0
        return np.tile([0.8, 0.1, 0.1], (n, 1))
    if scenario == "drift":  # m1 explored 40% early, 5% late (a policy losing interest)
        p1 = 0.40 - 0.35 * t
        return np.column_stack([0.9 - p1, p1, np.full(n, 0.1)])
    raise ValueError(f"unknown scenario {scenario!r}")


def offpolicy_truth(scenario: str, n_mc: int = 1_000_000) -> dict[str, float]:
    """True value of "always serve X" (fixed-seed Monte Carlo over features and time)."""
    rng = np.random.default_rng(12345)
    x, t = rng.standard_normal(n_mc), rng.random(n_mc)
    return {
        a: float(expit(_logit_base(k, x) + _drift(k, t, scenario)).mean())
        for k, a in enumerate(OFFPOLICY_ARMS)
    }


def offpolicy_logs(seed: int, n: int, scenario: str) -> EvalDataset:
    """Exploration logs: every arm's (noisy) score logged, the served arm's Bernoulli reward."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    t = np.arange(n) / max(n - 1, 1)
    probs = _logging_probs(n, scenario)
    k = len(OFFPOLICY_ARMS)
    served = np.minimum((rng.random(n)[:, None] > np.cumsum(probs, axis=1)).sum(axis=1), k - 1)
    p_true = np.column_stack(
        [expit(_logit_base(j, x) + _drift(j, t, scenario)) for j in range(k)]
    )
    rewards = (rng.random(n) < p_true[np.arange(n), served]).astype(float)
    models = {
        a: ModelColumn(
            a,
            "champion" if j == 0 else "challenger",
            expit(_logit_base(j, x)) + 0.05 * rng.standard_normal(n),  # the score: no drift
            np.zeros(n, dtype=np.int8),
            np.ones(n),
        )
        for j, a in enumerate(OFFPOLICY_ARMS)
    }
    return EvalDataset(
        route="r",
        task="classification",
        champion="m0",
        request_ids=np.arange(n).astype(object),
        ts=t * 86_400.0,
        labels=np.zeros(n),
        rewards=rewards,
        served=np.array([OFFPOLICY_ARMS[i] for i in served], dtype=object),
        propensity=probs[np.arange(n), served],
        arm_probs={a: probs[:, j] for j, a in enumerate(OFFPOLICY_ARMS)},
        policy_types=np.full(n, "epsilon_greedy", dtype=object),
        models=models,
    )


def _offpolicy_run(job: tuple[int, int, str]) -> np.ndarray:
    """(arms, estimators, [value, ci_low, ci_high]) of one log."""
    seed, n, scenario = job
    report = estimate_policy_values(offpolicy_logs(seed, n, scenario))
    out = np.full((len(OFFPOLICY_ARMS), len(ESTIMATORS), 3), np.nan)
    for i, a in enumerate(OFFPOLICY_ARMS):
        for j, e in enumerate(ESTIMATORS):
            est = report.arms[a].estimates[e]
            if est.value is not None:
                out[i, j] = (est.value, est.ci_low, est.ci_high)
    return out


def offpolicy_study(
    scenario: str, runs: int = 400, n: int = 2000, seed: int = 11, workers: int = 1
) -> dict[str, dict[str, dict[str, float]]]:
    """Per arm and estimator: bias, its Monte Carlo SE, CI coverage, mean |estimate - DM|."""
    truth = offpolicy_truth(scenario)
    jobs = [(seed * 100_000 + r, n, scenario) for r in range(runs)]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            res = np.stack(list(pool.map(_offpolicy_run, jobs, chunksize=max(1, runs // 16))))
    else:
        res = np.stack([_offpolicy_run(j) for j in jobs])
    out: dict[str, dict[str, dict[str, float]]] = {}
    dm = ESTIMATORS.index("dm")
    for i, a in enumerate(OFFPOLICY_ARMS):
        out[a] = {}
        for j, e in enumerate(ESTIMATORS):
            v, lo, hi = res[:, i, j, 0], res[:, i, j, 1], res[:, i, j, 2]
            err = v - truth[a]
            out[a][e] = {
                "truth": truth[a],
                "bias": float(err.mean()),
                "bias_se": float(err.std(ddof=1) / math.sqrt(runs)),
                "coverage": float(((lo <= truth[a]) & (truth[a] <= hi)).mean()),
                "mean_abs_minus_dm": float(np.abs(v - res[:, i, dm, 0]).mean()),
            }
    return out


def offpolicy_markdown(runs: int, n: int, workers: int) -> str:
    """The results block for docs/STATISTICS.md."""
    lines = [
        OFFPOLICY_BEGIN,
        "",
        f"Generated by `python -m devtools.simulate.bandits --offpolicy --runs {runs} "
        f"--write docs/STATISTICS.md` ({runs} logs of {n:,} requests per scenario, seeds fixed; "
        "bias ± Monte Carlo SE; coverage of the 95% CI, whose Monte Carlo SE is about "
        f"{math.sqrt(0.05 * 0.95 / runs):.3f}).",
        "",
        "| logging | arm (true value) | estimator | bias | CI coverage | mean abs(est - DM) |",
        "|---|---|---|---|---|---|",
    ]
    for k, scenario in enumerate(OFFPOLICY_SCENARIOS):
        res = offpolicy_study(scenario, runs, n, 11 + k, workers)
        for a, by in res.items():
            for e, r in by.items():
                lines.append(
                    f"| {scenario} | {a} ({r['truth']:.4f}) | {e} | {r['bias']:+.4f} ± "
                    f"{r['bias_se']:.4f} | {r['coverage']:.3f} | {r['mean_abs_minus_dm']:.4f} |"
                )
    lines += ["", OFFPOLICY_END]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: prints the Markdown tables (and writes JSON with --json)."""
    parser = argparse.ArgumentParser(prog="python -m devtools.simulate.bandits",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=list(DEFAULT_RATES))
    parser.add_argument("--epsilons", type=float, nargs="+", default=list(DEFAULT_EPSILONS))
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--pulls", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--batch", type=int, default=1,
                        help="apply rewards every N pulls (delayed labels); 1 = immediately")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", dest="json_path", default=None, help="also write results here")
    parser.add_argument("--offpolicy", action="store_true",
                        help="check the off-policy estimators instead (bias, coverage, DR vs DM)")
    parser.add_argument("--n", type=int, default=2000, help="--offpolicy: requests per log")
    parser.add_argument("--write", type=Path, default=None,
                        help="--offpolicy: update the results block of this file")
    args = parser.parse_args(argv)
    if args.offpolicy:
        block = offpolicy_markdown(args.runs, args.n, args.workers)
        print(block)
        if args.write:
            write_marked_block(args.write, block, OFFPOLICY_BEGIN, OFFPOLICY_END)
        return 0
    specs = [PolicySpec("thompson"), *(PolicySpec("epsilon_greedy", e) for e in args.epsilons)]
    results = simulate(specs, args.rates, args.runs, args.pulls, args.seed,
                       batch=args.batch, workers=args.workers)
    print(f"rates={args.rates} runs={args.runs} pulls={args.pulls} seed={args.seed} "
          f"batch={args.batch}\n")
    print(markdown(results))
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
