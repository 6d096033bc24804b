"""Where the event loop's CPU goes, step by step, measured in place under load.

    python loadtests/callback_cpu.py [--rate 900] [--seconds 10] [--shadows 1]
                                     [--gateway-python EXE] [--tree PATH] [--load-cpus 1]
                                     [--out DIR]

Starts Triton and one gateway (champion fraud_v3 + N shadows, 100% file logging) whose
interpreter wraps the request path's callbacks and steps (`SPOTS`) in a timer of the thread's
own CPU time (`time.thread_time_ns`, main thread only, a step nested in itself counted once),
offers `--rate` req/s (wrk, Poisson arrivals) and reads the sums at the start and the end of a
`--seconds` window (SIGUSR2 makes the gateway write them). Prints, per request started in the
window (`InferenceService.start` calls): each step's CPU µs (its callees included), calls and
µs per call; the event loop thread's total; and what the top-level callbacks leave out
(uvloop's own work: reading sockets, polling, timers).

Why: py-spy cannot tell idle from busy under uvloop (its samples pile up on `run_forever`), and
cProfile's per-call cost swamps steps of a few µs. Hot microbenchmarks (bench_recorder.py,
bench_lane.py) give a step's cost with warm caches; this gives it where it runs, after the
wake-ups that make the same Python cost 2-4× more (wake_cost.py). Each timed call adds two
CLOCK_THREAD_CPUTIME_ID reads (about 2 µs per timed call here), so a step's number includes the
timers of the steps nested in it: read the nested ones as shares, and the top-level sum against
the total. `--tree` must not carry a sitecustomize.py of its own (an ablate.py tree does: it
would be imported instead of this one, and is refused).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import common

# (module, attribute path, label, depth in the printed tree); depth 0: a callback the event loop
# calls (their sum against the thread's total says what runs outside them); CROSS: a step called
# from several places, printed after the tree.
CROSS = -1
SPOTS: list[tuple[str, str, str, int]] = [
    ("gateway.rest.lean_server", "LeanProtocol.data_received",
     "client bytes in: HTTP parse, admit, validate, champion call", 0),
    ("gateway.dataplane.service", "InferenceService._admit",
     "ids, JSON parse, request checks", 1),
    ("gateway.dataplane.service", "InferenceService._proceed",
     "validate, decide, call the champion", 1),
    ("gateway.upstream.keepalive", "_Connection.data_received",
     "Triton bytes in: every answer (champion, batches, probes)", 0),
    ("gateway.rest.lean_server", "LeanProtocol.infer_answer",
     "the client's answer: render and write", 1),
    ("gateway.rest.lean_server", "LeanProtocol._flush", "write to the client", 2),
    ("gateway.dataplane.service", "InferenceService._served",
     "after the answer: copies, recorder.submit, metrics", 1),
    ("gateway.dataplane.service", "InferenceService._dispatch_copies",
     "copies dispatched", 2),
    ("gateway.mirror.shadow", "ShadowLane.submit", "lane admission (one copy)", 3),
    ("gateway.mirror.shadow", "batch_signature", "batch signature", 4),
    ("gateway.mirror.shadow", "ShadowLane._enqueue", "queued for the window", 4),
    ("gateway.mirror.shadow", "ShadowLane._answered",
     "a lane's answer: split, resolve, record ready", 1),
    ("gateway.mirror.shadow", "ShadowLane._window_end", "batch window ends", 0),
    ("gateway.dataplane.recorder", "Recorder._work", "record slices", 0),
    ("gateway.dataplane.recorder", "Recorder._record", "one record: build, observe, emit", 1),
    # called from several of the above
    ("gateway.upstream.keepalive", "_Connection.send",
     "write to Triton (champion, batch or probe)", CROSS),
    ("gateway.mirror.shadow", "ShadowLane._send",
     "a lane's call: combine, send (a window's batch or a probe)", CROSS),
]
REQUESTS = ("gateway.dataplane.service", "InferenceService.start")

# Imported by the gateway's interpreter at start-up (PATCH_AT_GATEWAY_IMPORT runs `_patch`).
SITECUSTOMIZE = '''\
import importlib, importlib.abc, json, os, signal, sys, threading, time


def _patch():
    spots = json.loads(os.environ["UNDERSTUDY_CALLBACK_SPOTS"])
    clock = time.thread_time_ns
    main = threading.get_ident()
    sums = {}

    def timed(owner, name, label):
        inner = getattr(owner, name)
        entry = sums[label] = [0, 0]
        active = [False]

        def wrapper(*args, **kwargs):
            if active[0] or threading.get_ident() != main:
                return inner(*args, **kwargs)
            active[0] = True
            started = clock()
            try:
                return inner(*args, **kwargs)
            finally:
                active[0] = False
                entry[0] += clock() - started
                entry[1] += 1

        setattr(owner, name, wrapper)

    for module, path, label in spots:
        owner = importlib.import_module(module)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        timed(owner, name, label)

    def dump(*_):
        with open(os.environ["UNDERSTUDY_CALLBACK_OUT"], "w") as fh:
            json.dump({"thread_ns": clock(), "process_ns": time.process_time_ns(),
                       "spots": sums}, fh)

    signal.signal(signal.SIGUSR2, dump)
    dump()  # written once at start-up: the runner checks the patch took before signalling
''' + common.PATCH_AT_GATEWAY_IMPORT
REQUESTS_LABEL = "requests"


def snapshot(pid: int, out: Path, timeout_s: float = 10.0) -> dict[str, Any]:
    """Ask the gateway for its sums (SIGUSR2) and read them once written."""
    out.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            data: dict[str, Any] = json.loads(out.read_text())
            return data
        except (OSError, ValueError):  # not written yet, or being written
            time.sleep(0.02)
    raise RuntimeError(f"the gateway wrote no sums to {out}")


def measure(tree: Path, work: Path, rate: float, seconds: float, shadows: int,
            python: str, cpus: str | None = "1") -> dict[str, Any]:
    """Run the load; the sums over the window, per request answered in it."""
    if (tree / "sitecustomize.py").exists():
        raise RuntimeError(f"{tree} has a sitecustomize.py of its own: it would be imported "
                           "instead of the timing one")
    shim = work / "shim"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
    sums_file = work / "sums.json"
    sums_file.unlink(missing_ok=True)
    spots = [[m, p, label] for m, p, label, _ in SPOTS] + [[*REQUESTS, REQUESTS_LABEL]]
    x, _ = common.fraud_rows(1)
    body = common.json_body(x[0])
    body_file = common.write_body(body, work / "body.json")
    routes = common.fraud_route(shadows)
    with common.triton_server(work) as triton:
        config = common.gateway_config(triton.url, work, "gateway", routes)
        with common.Gateway(config, log_file=work / "gateway.log", root=tree, python=python,
                            env={"PYTHONPATH": str(shim),
                                 "UNDERSTUDY_CALLBACK_SPOTS": json.dumps(spots),
                                 "UNDERSTUDY_CALLBACK_OUT": str(sums_file)}) as gateway:
            assert gateway.proc is not None
            if not sums_file.exists():  # SIGUSR2 would kill a gateway without the handler
                raise RuntimeError(f"the timing patch did not run (see {work / 'gateway.log'})")
            gateway.warm("fraud", body, 50)
            url = gateway.url + "/v2/models/fraud/infer"
            common.wrk(url, body_file, body, duration=2, cpus=cpus)  # pools, batching config
            loads: dict[str, common.LoadResult | BaseException] = {}

            def offer() -> None:
                try:
                    loads["wrk"] = common.wrk_rate(url, body_file, body, rate=rate,
                                                   duration=seconds + 4, cpus=cpus)
                except BaseException as exc:  # re-raised below, on the caller's thread
                    loads["wrk"] = exc

            load = threading.Thread(target=offer)
            load.start()
            try:
                time.sleep(2)  # wrk's ramp-up out of the window
                before = snapshot(gateway.proc.pid, sums_file)
                time.sleep(seconds)
                after = snapshot(gateway.proc.pid, sums_file)
            finally:
                load.join()
    done = loads["wrk"]
    if isinstance(done, BaseException):
        raise done
    if done.errors:
        raise RuntimeError(f"{done.errors} requests failed: {done}")
    return per_request(before, after)


def per_request(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The window's sums (after - before) divided by the requests started in it."""
    requests = after["spots"][REQUESTS_LABEL][1] - before["spots"][REQUESTS_LABEL][1]
    if requests <= 0:
        raise RuntimeError("no request was served in the window")
    steps = {}
    for _, _, label, _ in SPOTS:
        ns = after["spots"][label][0] - before["spots"][label][0]
        calls = after["spots"][label][1] - before["spots"][label][1]
        steps[label] = {"us_per_request": ns / requests / 1000, "calls_per_request":
                        calls / requests, "us_per_call": ns / calls / 1000 if calls else 0.0}
    thread_us = (after["thread_ns"] - before["thread_ns"]) / requests / 1000
    process_us = (after["process_ns"] - before["process_ns"]) / requests / 1000
    top = sum(steps[label]["us_per_request"] for _, _, label, depth in SPOTS if depth == 0)
    return {"requests": requests, "steps": steps, "loop_thread_us": thread_us,
            "other_threads_us": process_us - thread_us, "outside_callbacks_us": thread_us - top}


def report(result: dict[str, Any]) -> str:
    lines = [f"{result['requests']:,} requests in the window; CPU µs per request "
             "(a step includes its callees):",
             "",
             "| step | µs/request | calls/request | µs/call |",
             "|---|---|---|---|"]
    for _, _, label, depth in SPOTS:
        step = result["steps"][label]
        indent = "(inside any of the above) " if depth == CROSS else "· " * depth
        lines.append(f"| {indent}{label} | {step['us_per_request']:.1f} | "
                     f"{step['calls_per_request']:.2f} | {step['us_per_call']:.1f} |")
    lines += [f"| the event loop's thread, in all | {result['loop_thread_us']:.1f} | | |",
              f"| · outside the top-level callbacks (uvloop: reads, polling, timers) | "
              f"{result['outside_callbacks_us']:.1f} | | |",
              f"| other threads (the file sink's writer...) | "
              f"{result['other_threads_us']:.1f} | | |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=900)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--shadows", type=int, default=1, choices=(0, 1, 2))
    parser.add_argument("--tree", type=Path, default=common.ROOT,
                        help="the gateway checkout to measure (default: this one)")
    parser.add_argument("--gateway-python", default=sys.executable,
                        help="the interpreter that runs the gateway (as bench.py's option)")
    parser.add_argument("--load-cpus", default="1", help="taskset CPUs for wrk ('' = no pin)")
    parser.add_argument("--out", type=Path, default=common.ROOT / "var" / "bench" / "callback_cpu")
    args = parser.parse_args(argv)
    work = args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    result = measure(args.tree.resolve(), work, args.rate, args.seconds, args.shadows,
                     args.gateway_python, args.load_cpus or None)
    (work / "result.json").write_text(json.dumps(result, indent=1))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
