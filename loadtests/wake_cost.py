"""What a wake-up costs on this machine: CPU time of a sleep, and of fixed work after one.

    python loadtests/wake_cost.py [--repeat 2000]

Both proxies' CPU per request grows as the offered rate falls (docs/BENCHMARKS.md): fewer
requests share each wake-up. This measures that tax apart from any proxy: a process sleeps
for an interval (select with a timeout, as an event loop's poll does) and then does the same
chunk of Python work (dicts, lists, one orjson dump) each time; CPU time (getrusage) per
cycle, against the sleep alone and the work back to back.
"""

from __future__ import annotations

import argparse
import resource
import select

import orjson

INTERVALS_MS = (0.0, 0.2, 1.0, 1.5, 3.0, 10.0)


def work() -> bytes:
    rows = {str(i): [i, i * 2.0, {"a": i}] for i in range(60)}
    return orjson.dumps(rows)


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def per_cycle_us(interval_ms: float, repeat: int, *, with_work: bool) -> float:
    started = cpu_s()
    for _ in range(repeat):
        if interval_ms:
            select.select([], [], [], interval_ms / 1000)
        if with_work:
            work()
    return (cpu_s() - started) / repeat * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args(argv)
    print("| sleep between (ms) | CPU per cycle, sleep + work (µs) | sleep alone | work |")
    print("|---|---|---|---|")
    for interval in INTERVALS_MS:
        repeat = args.repeat if interval < 5 else max(args.repeat // 5, 1)
        both = per_cycle_us(interval, repeat, with_work=True)
        sleep = per_cycle_us(interval, repeat, with_work=False)
        print(f"| {interval:g} | {both:.1f} | {sleep:.1f} | {both - sleep:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
