"""Does a replay move the champion's live p99? A/B rounds, alternating, with the A/A spread.

Setup: the bundled Triton and the gateway (file sink, route `fraud`: champion fraud_v3 alone,
so the champion's latency is all there is to move); seeded demo traffic through the gateway
plus labels, ingested into an evaluator store. Then `--rounds` pairs of rounds, alternating:

- A: wrk offers `--load-rate` requests/s to the gateway's `fraud` route for `--duration` s
  (Poisson arrivals, loadtests/post.lua) and reports the client-side p50/p99;
- B: the same while `python -m evaluator replay --route fraud --challenger fraud_v4 --rate
  --replay-rate` runs (started before the load, stopped after it; a fresh replay log each round
  so every round really replays), on the same Triton and the same cores.

The result is the ratio of the B and A medians of p99, next to the A/A spread (the largest
over the smallest A p99: how much p99 moves with no replay at all). `--write-doc` rewrites the
block in docs/BENCHMARKS.md.

    PYTHONPATH=. .venv/bin/python -m loadtests.replay_bench --rounds 4 --write-doc
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from loadtests.common import (
    ROOT,
    Gateway,
    count_records,
    fraud_rows,
    gateway_config,
    json_body,
    machine_info,
    stop_process,
    triton_server,
    write_body,
    wrk_rate,
)
from loadtests.docblock import write_marked_block

BEGIN = "<!-- replay-bench:begin -->"
END = "<!-- replay-bench:end -->"


def _env(work: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT),
            "UNDERSTUDY_SOURCE_PATH": str(work / "log-replay"),
            "UNDERSTUDY_STORE_PATH": str(work / "evaluator.db")}


def seed(gateway: Gateway, work: Path, requests: int) -> None:
    """Logged, labelled traffic for the replay to resend."""
    from understudy_demo.run import send_traffic

    asyncio.run(send_traffic(gateway.url, requests, 0, seed=7))
    time.sleep(1.0)  # the file sink's last flush
    subprocess.run([sys.executable, "-m", "evaluator", "run", "--once"], env=_env(work),
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def start_replay(work: Path, triton_url: str, rate: float, log: Path) -> subprocess.Popen[str]:
    """The replay as its own process; returns once it has read the log and starts sending."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "evaluator", "replay", "--route", "fraud", "--challenger",
         "fraud_v4", "--rate", f"{rate:g}", "--triton", triton_url, "--log", str(log),
         "--no-report"], env=_env(work), cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "logged rows" in line:
            return proc
    raise RuntimeError(f"replay exited before sending (status {proc.wait()})")


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rounds: list[dict[str, Any]] = []
    with triton_server(work) as triton:
        config = gateway_config(triton.url, work, "replay",
                                {"fraud": {"champion": {"model": "fraud_v3"}}})
        with Gateway(config, log_file=work / "gateway.log") as gateway:
            seed(gateway, work, args.seed_requests)
            body = json_body(fraud_rows(1)[0][0])
            body_file = write_body(body, work / "body.json")
            gateway.warm("fraud", body, 200)
            url = f"{gateway.url}/v2/models/fraud/infer"
            # an unrecorded round first: the first seconds at rate pay for warm-up, not replay
            wrk_rate(url, body_file, body, rate=args.load_rate, duration=args.duration)
            for i in range(2 * args.rounds):
                kind = "A" if i % 2 == 0 else "B"
                proc = None
                log = work / f"replay-{i}"
                if kind == "B":
                    proc = start_replay(work, triton.url, args.replay_rate, log)
                started = time.monotonic()
                try:
                    result = wrk_rate(url, body_file, body, rate=args.load_rate,
                                      duration=args.duration)
                finally:
                    elapsed = time.monotonic() - started
                    alive = proc is None or proc.poll() is None
                    stop_process(proc)  # type: ignore[arg-type]
                replayed = count_records(log) if kind == "B" else 0
                rounds.append({"round": i + 1, "kind": kind, "p50": result.p50,
                               "p99": result.p99, "rps": result.rps, "errors": result.errors,
                               "replayed": replayed,
                               "replay_rps": replayed / elapsed if kind == "B" else 0.0,
                               "replay_alive": alive})
                print(f"round {i + 1} {kind}: p50 {result.p50:.2f} ms, p99 {result.p99:.2f} ms, "
                      f"{result.rps:.0f} req/s"
                      + (f"; replay sent {replayed} ({replayed / elapsed:.0f}/s)"
                         if kind == "B" else ""), flush=True)
    a = [r["p99"] for r in rounds if r["kind"] == "A"]
    b = [r["p99"] for r in rounds if r["kind"] == "B"]
    return {"rounds": rounds, "a_median": statistics.median(a),
            "b_median": statistics.median(b),
            "ratio": statistics.median(b) / statistics.median(a),
            "aa_spread": max(a) / min(a), "bb_spread": max(b) / min(b)}


def markdown(summary: dict[str, Any], args: argparse.Namespace) -> str:
    m = machine_info()
    rows = "\n".join(
        f"| {r['round']} | {r['kind']} | {r['p50']:.2f} | {r['p99']:.2f} | {r['rps']:.0f} | "
        f"{r['errors']} | {r['replayed'] if r['kind'] == 'B' else '–'} | "
        f"{format(r['replay_rps'], '.0f') if r['kind'] == 'B' else '–'} |"
        for r in summary["rounds"])
    return (
        f"{BEGIN}\n"
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {m.get('cpu', '?')} "
        f"({m.get('nproc', '?')} cores, shared with other work: load average "
        f"{os.getloadavg()[0]:.1f}). Load: wrk at {args.load_rate:g} req/s for "
        f"{args.duration:g} s per round on route fraud (champion fraud_v3 alone); B rounds run "
        f"`evaluator replay --challenger fraud_v4 --rate {args.replay_rate:g}` on the same "
        f"Triton meanwhile (after one unrecorded warm-up round). Command: "
        f"`PYTHONPATH=. .venv/bin/python -m loadtests.replay_bench "
        f"--rounds {args.rounds} --load-rate {args.load_rate:g} --replay-rate "
        f"{args.replay_rate:g} --duration {args.duration:g} --write-doc`.\n\n"
        "| round | kind | p50 ms | p99 ms | req/s | errors | replayed | replay/s |\n"
        "|---|---|---|---|---|---|---|---|\n"
        f"{rows}\n\n"
        f"**Champion p99 with a replay / without: {summary['ratio']:.2f}** (medians "
        f"{summary['b_median']:.2f} / {summary['a_median']:.2f} ms); A/A spread (largest / "
        f"smallest p99 without a replay) {summary['aa_spread']:.2f}, B/B spread "
        f"{summary['bb_spread']:.2f}.\n"
        f"{END}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="A/B pairs (default 4)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per round")
    parser.add_argument("--load-rate", type=float, default=150.0, help="champion req/s")
    parser.add_argument("--replay-rate", type=float, default=200.0, help="replay --rate")
    parser.add_argument("--seed-requests", type=int, default=4000,
                        help="logged requests to replay (enough to outlast a round)")
    parser.add_argument("--work", default=str(ROOT / "var" / "replay-bench"))
    parser.add_argument("--write-doc", action="store_true",
                        help="rewrite the result block in docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    summary = run(args)
    block = markdown(summary, args)
    print(block)
    if args.write_doc:
        write_marked_block(ROOT / "docs" / "BENCHMARKS.md", block, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
