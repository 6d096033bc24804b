"""Python-level calls per request of a gateway tree under load: the work measure that does not
depend on how busy the machine is.

    python loadtests/calls_per_request.py [--tree PATH] [--rate 2000] [--seconds 10]
                                          [--shadows 1] [--top 40] [--out DIR]

Starts Triton and the tree's gateway (champion fraud_v3 + N shadows, 100% file logging) with
cProfile running on its main thread from start-up to its SIGTERM exit (a `sitecustomize.py` on
the gateway's PYTHONPATH), offers `--rate` req/s with wrk (Poisson arrivals) for `--seconds`,
then divides every function's call count by the requests answered. Prints the total (builtins
included) and the functions by calls per request and by self time per request.

Why: CPU time per request moves 5-10% between runs on a shared VM, so changes of a few percent
cannot be seen in it; call counts can (deterministic to about one call per request: start-up
calls are spread over the requests, so compare runs of the same length and rate). cProfile's
times are inflated by its own per-call cost: read them as weights, not durations. Compare trees
with `--tree`, e.g. a checkout of main against your branch.
"""

from __future__ import annotations

import argparse
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import common

# Imported by the gateway's interpreter at start-up (site imports `sitecustomize` from its path).
SITECUSTOMIZE = '''\
import atexit, cProfile, os

_profile = cProfile.Profile()
_profile.enable()


def _dump() -> None:
    _profile.disable()
    _profile.dump_stats(os.environ["UNDERSTUDY_CPROFILE_OUT"])


atexit.register(_dump)
'''


def profile_gateway(tree: Path, work: Path, rate: float, seconds: float, shadows: int
                    ) -> tuple[Path, int]:
    """Run the load; return the stats file and the number of requests the gateway answered."""
    shim = work / "shim"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
    stats = work / "gateway.prof"
    x, _ = common.fraud_rows(1)
    body = common.json_body(x[0])
    body_file = common.write_body(body, work / "body.json")
    routes = common.fraud_route(shadows)
    warm = 50
    with common.triton_server(work) as triton:
        config = common.gateway_config(triton.url, work, "gateway", routes)
        gateway = common.Gateway(config, log_file=work / "gateway.log", root=tree,
                                 env={"PYTHONPATH": str(shim),
                                      "UNDERSTUDY_CPROFILE_OUT": str(stats)}).start()
        try:
            gateway.warm("fraud", body, warm)
            result = common.wrk_rate(gateway.url + "/v2/models/fraud/infer", body_file, body,
                                     rate=rate, duration=seconds, cpus="1")
        finally:
            gateway.stop()
    if result.errors:
        raise RuntimeError(f"{result.errors} requests failed: {result}")
    if not stats.exists():
        raise RuntimeError(f"the gateway wrote no profile (see {work / 'gateway.log'})")
    return stats, result.requests + warm


def report(stats_file: Path, requests: int, tree: Path, top: int) -> float:
    """Print the calls per request; return the total."""
    stats = pstats.Stats(str(stats_file)).stats  # type: ignore[attr-defined]
    rows = []
    total = 0
    for (file, line, function), (_, calls, self_s, _, _) in stats.items():
        name = f"{file.replace(str(tree) + '/', '')}:{line} {function}"
        rows.append((calls / requests, self_s / requests * 1e6, name))
        total += calls
    per_request = total / requests
    print(f"{requests:,} requests; Python-level calls per request: {per_request:.1f}")
    if top:
        print("\nby calls per request:")
        for calls, self_us, name in sorted(rows, reverse=True)[:top]:
            print(f"{calls:8.2f}  self {self_us:6.2f} us  {name}")
        print("\nby self time per request (cProfile-inflated; functions called per request):")
        frequent = [r for r in rows if r[0] >= 0.05]
        for calls, self_us, name in sorted(frequent, key=lambda r: -r[1])[:top]:
            print(f"{calls:8.2f}  self {self_us:6.2f} us  {name}")
    return per_request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=common.ROOT,
                        help="the gateway checkout to measure (default: this one)")
    parser.add_argument("--rate", type=float, default=2000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--shadows", type=int, default=1, choices=(0, 1, 2))
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", type=Path,
                        default=common.ROOT / "var" / "bench" / "calls_per_request")
    args = parser.parse_args(argv)
    tree = args.tree.resolve()
    work = args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    stats, requests = profile_gateway(tree, work, args.rate, args.seconds, args.shadows)
    report(stats, requests, tree, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
