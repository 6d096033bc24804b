"""Reproducible bandit simulation: Thompson sampling vs epsilon-greedy on Bernoulli arms.

Runs the gateway's own policy classes (gateway.policies), so what is measured is what is shipped.
Each run draws every arm's potential outcome for every pull up front from a seeded generator, so
all policies face the same environment (common random numbers) and results do not depend on the
number of worker processes. Results and the exact command are recorded in docs/EXPLORATION.md.

    python -m evaluator.simulate_bandits --runs 200 --pulls 5000 --seed 7
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

import numpy as np

from gateway.policies import EpsilonGreedy, Policy, ThompsonSampling

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


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: prints the Markdown tables (and writes JSON with --json)."""
    parser = argparse.ArgumentParser(prog="python -m evaluator.simulate_bandits",
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
    args = parser.parse_args(argv)
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
