"""Benchmark: decide + the full report for 1M joined requests (`python -m loadtests.bench_report`).

The non-functional target (docs/SPEC): 1M joined requests -> full report (statistics, JSON,
Markdown, HTML with plots) in <= 20 s. This builds a synthetic route in memory — a champion and
two shadow challengers scoring every request over 14 days, one clearly better and one slightly
worse — so the measurement covers exactly the evaluator's work after `Store.load_dataset`
(timed separately in loadtests/bench_store.py), then times:

- ``decide``: every paired test, Holm correction, the sequential path, power, guardrails;
- ``write_report``: per-model metrics with CIs, off-policy (with ``--explore``), plots, files;

and reports wall and CPU seconds (the dev VM is shared, so CPU seconds are the steadier number),
the peak RSS of the process, and with ``--tracemalloc`` the peak memory allocated during
decide + report on top of the dataset. ``--profile`` prints the top cumulative entries of a
cProfile of the same work, to see where the time goes.

``synthetic_dataset`` is reused by tests/unit/test_eval_report.py.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import resource
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.special import expit

from evaluator.dataset import STATUS_CODES, EvalDataset, JoinStats, ModelColumn
from evaluator.decision import DecisionPolicy, decide
from evaluator.report import write_report

DAY = 86_400.0
START_TS = 1_767_225_600.0  # 2026-01-01T00:00:00Z: a realistic epoch for the time axes


def synthetic_dataset(
    n: int,
    *,
    seed: int = 0,
    task: Literal["classification", "regression"] = "classification",
    sigmas: Sequence[float] = (1.0, 0.7, 1.1),
    names: Sequence[str] = ("fraud_v3", "fraud_v4", "fraud_v5"),
    explore: float = 0.0,
    days: int = 14,
    route: str = "fraud",
    rho: float = 0.5,
) -> EvalDataset:
    """A joined, labelled route: ``names[0]`` is the champion, the rest challengers.

    Each model sees the true signal plus noise of scale ``sigmas[i]`` (correlated across models
    with ``rho``, as models trained on the same data are): a smaller sigma is a better model.
    Classification: true log-odds ``-1 + 1.5 z``, scores ``sigmoid(logit + noise)``, labels
    Bernoulli. Regression: target ``signal + N(0, 1)``, predictions ``signal + noise``.
    ``explore`` > 0 logs epsilon-greedy serving (epsilon = ``explore``, greedy = champion) with
    propensities and a reward (1 when the served model's decision was right, or minus its
    absolute error for regression); 0 is pure shadow traffic served by the champion.
    """
    if len(sigmas) != len(names) or len(names) < 1:
        raise ValueError("one sigma per model name, at least the champion")
    rng = np.random.default_rng(seed)
    signal = rng.standard_normal(n)
    common = rng.standard_normal(n)
    ts = START_TS + np.sort(rng.uniform(0.0, days * DAY, n))
    if task == "classification":
        logit = -1.0 + 1.5 * signal
        labels = (rng.random(n) < expit(logit)).astype(np.float64)
    else:
        logit = 10.0 + 2.0 * signal
        labels = logit + rng.standard_normal(n)
    scores: dict[str, np.ndarray] = {}
    models: dict[str, ModelColumn] = {}
    for i, (name, sigma) in enumerate(zip(names, sigmas, strict=True)):
        noise = sigma * (math.sqrt(rho) * common + math.sqrt(1.0 - rho) * rng.standard_normal(n))
        s = expit(logit + noise) if task == "classification" else logit + noise
        scores[name] = s
        models[name] = ModelColumn(
            name=name,
            role="champion" if i == 0 else "challenger",
            scores=s,
            status=np.full(n, STATUS_CODES["ok"], dtype=np.int8),
            latency_ms=rng.lognormal(math.log(5.0), 0.3, n),
            modes=("served",) if i == 0 else (("shadow", "explore") if explore else ("shadow",)),
        )
    k = len(names)
    probs = np.zeros((n, k))
    probs[:, 0] = 1.0
    if explore > 0:
        probs[:] = explore / k
        probs[:, 0] += 1.0 - explore
    served_idx = np.minimum((rng.random(n)[:, None] > np.cumsum(probs, axis=1)).sum(axis=1), k - 1)
    rows = np.arange(n)
    chosen = np.column_stack([scores[m] for m in names])[rows, served_idx]
    if explore <= 0:
        rewards = np.full(n, np.nan)
    elif task == "classification":
        rewards = ((chosen >= 0.5) == (labels == 1)).astype(np.float64)
    else:
        rewards = -np.abs(chosen - labels)
    name_arr = np.array(names, dtype=object)
    return EvalDataset(
        route=route,
        task=task,
        champion=names[0],
        request_ids=np.char.add("r", np.arange(n).astype(str)).astype(object),
        ts=ts,
        labels=labels,
        rewards=rewards,
        served=name_arr[served_idx],
        propensity=probs[rows, served_idx],
        arm_probs={m: probs[:, i] for i, m in enumerate(names)},
        policy_types=np.full(n, "epsilon_greedy" if explore > 0 else "champion", dtype=object),
        models=models,
        stats=JoinStats(
            inferences=n + n // 50,
            duplicate_inferences=n // 100,
            labels=n + n // 40,
            duplicate_labels=n // 50,
            orphan_labels=n // 200,
            expired_orphans=n // 1000,
            joined=n,
        ),
    )


@dataclass
class Timing:
    wall_s: float
    cpu_s: float


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, Timing]:
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, Timing(time.perf_counter() - w, time.process_time() - c)


def _rss_mb() -> float:
    # ru_maxrss is KiB on Linux (bytes on macOS): the peak of the whole process so far.
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / (1024 * 1024)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_once(
    dataset: EvalDataset, out_dir: Path, policy: DecisionPolicy | None = None
) -> dict[str, Any]:
    """decide + write_report on ``dataset``; wall/CPU seconds per stage and the verdicts."""
    decisions, t_decide = _timed(decide, dataset, policy)
    paths, t_report = _timed(write_report, dataset, decisions, out_dir)
    report = json.loads(paths["json"].read_text())
    return {
        "decide": t_decide,
        "report": t_report,
        "total": Timing(t_decide.wall_s + t_report.wall_s, t_decide.cpu_s + t_report.cpu_s),
        "report_stages_s": report["timings_s"],
        "verdicts": {d["challenger"]: d["decision"] for d in report["decisions"]},
        "sizes_kb": {k: round(p.stat().st_size / 1024) for k, p in paths.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="joined requests (default 1M)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=["classification", "regression"],
                        default="classification")
    parser.add_argument("--explore", type=float, default=0.0,
                        help="epsilon-greedy exploration rate (0: shadow only)")
    parser.add_argument("--out", help="report directory (default: a temporary one)")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="second pass under tracemalloc: peak allocation of decide+report")
    parser.add_argument("--profile", action="store_true",
                        help="third pass under cProfile: top cumulative functions")
    args = parser.parse_args(argv)

    policy = DecisionPolicy(primary_metric="auroc" if args.task == "classification" else "rmse")
    dataset, t_gen = _timed(synthetic_dataset, args.n, seed=args.seed, task=args.task,
                            explore=args.explore)
    rss_data = _rss_mb()
    load = os.getloadavg()[0]
    print(f"bench_report: {args.n:,} joined requests, {args.task}, champion + "
          f"{len(dataset.challengers)} challengers, explore {args.explore:g}; generated in "
          f"{t_gen.wall_s:.1f} s; peak RSS so far {rss_data:.0f} MB; load average {load:.1f} on "
          f"{os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        result = run_once(dataset, out, policy)
        rss_peak = _rss_mb()
        for stage in ("decide", "report", "total"):
            t: Timing = result[stage]
            print(f"  {stage:<7} {t.wall_s:7.2f} s wall  {t.cpu_s:7.2f} s CPU")
        stages = ", ".join(f"{k} {v:.2f}" for k, v in result["report_stages_s"].items())
        print(f"  report stages (wall s): {stages}")
        print(f"  verdicts: {result['verdicts']}; files (KiB): {result['sizes_kb']}")
        print(f"  peak RSS {rss_peak:.0f} MB ({rss_peak - rss_data:+.0f} MB over the dataset)")
        target = "met" if result["total"].wall_s <= 20.0 else "MISSED"
        print(f"  target <= 20 s wall: {target} ({result['total'].wall_s:.1f} s)")
        if args.tracemalloc:
            tracemalloc.start()
            run_once(dataset, out, policy)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            print(f"  tracemalloc: peak {peak / 2**20:.0f} MiB allocated during decide + report")
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            run_once(dataset, out, policy)
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
            print(buf.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
