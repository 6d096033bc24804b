"""Micro-benchmark: a shadow lane's own CPU per copy, no sockets (Triton faked in-process).

    PYTHONPATH=. python loadtests/bench_lane.py [--copies 20000] [--repeat 5] [--burst 8]
                                                [--unbatched]

Submits `--copies` one-row JSON copies (8 FP32 features) to one `ShadowLane` with the default
batching (16 rows, 2 ms window, every 10th copy sent alone as a latency probe), `--burst`
copies per event-loop turn, and lets every copy resolve (`--unbatched`: a lane that does not
batch, every copy sent alone). The fake upstream answers each call on the next loop turn with a
canned answer of the right row count, through whichever entry point the lane uses (`infer` or
`infer_cb`), so what is timed is the lane: admission, the batching window, combining rows, the
call's bookkeeping, splitting the answer and resolving the copies. Prints the best-of-`--repeat`
process CPU µs per copy. Run it with PYTHONPATH set to two trees to compare them (alternate,
best of several runs).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

# The tree under test comes from PYTHONPATH (not this file's checkout), so one copy of this
# script measures any tree.
from gateway.dataplane.protocol import InferRequest, parse_request
from gateway.mirror.shadow import ShadowLane
from gateway.upstream.client import TritonUpstream, UpstreamResponse

ROW = [0.1, -0.2, 0.3, 0.4, -0.5, 0.6, 0.7, -0.8]


def _answer(rows: int) -> bytes:
    return orjson.dumps({"model_name": "m", "model_version": "1", "outputs": [
        {"name": "score", "datatype": "FP32", "shape": [rows, 1], "data": [0.5] * rows}]})


class FakeTriton(TritonUpstream):
    """Answers every call on the next loop turn; rows counted from the request's shape."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:9", timeout_ms=5000, max_connections=4)
        self._answers = {n: _answer(n) for n in range(1, 65)}

    def pool(self, name: str, limit: int | None = None, *, model: str | None = None) -> Any:
        return None

    async def model_config(self, model: str, version: str = "") -> dict[str, Any]:
        return {"name": model, "max_batch_size": 64}

    def _response(self, body: bytes) -> UpstreamResponse:
        start = body.index(b'"shape":[') + 9
        rows = int(body[start:body.index(b",", start)])
        return UpstreamResponse(200, self._answers[rows], "application/json", None, 0.001)

    async def infer(self, model: str, version: str, body: bytes, content_type: str,
                    header_length: int | None, *, pool: str | None = None,
                    timeout_s: float | None = None) -> UpstreamResponse:
        await asyncio.sleep(0)
        return self._response(body)

    def infer_cb(self, model: str, version: str, body: bytes, content_type: str,
                 header_length: int | None,
                 on_done: Callable[[UpstreamResponse | Exception], None], *,
                 pool: str | None = None, timeout_s: float | None = None) -> Any:
        return asyncio.get_running_loop().call_soon(on_done, self._response(body))


def copy_request() -> InferRequest:
    body = orjson.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 8],
                                     "data": ROW}]})
    return parse_request(body, None)


async def run(copies: int, burst: int, unbatched: bool = False) -> float:
    """CPU seconds per copy for one pass."""
    lane = ShadowLane(FakeTriton(), "bench", "m", "", max_concurrency=4, max_queue=copies,
                      timeout_ms=5000, batch_max_rows=1 if unbatched else 16,
                      batch_max_wait_ms=2.0, latency_probe_every=10)
    await lane.load_batching_config()
    request = copy_request()
    pending = []
    started = time.process_time()
    for i in range(copies):
        pending.append(lane.submit(request, "shadow"))
        if i % burst == burst - 1:
            await asyncio.sleep(0)
    results = await asyncio.gather(*pending)
    cpu = time.process_time() - started
    if any(r.status != "ok" for r in results):
        raise RuntimeError(f"copies not ok: {sorted({r.status for r in results})}")
    return cpu / copies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--burst", type=int, default=8, help="copies per loop turn")
    parser.add_argument("--unbatched", action="store_true", help="batch_max_rows 1")
    args = parser.parse_args(argv)
    try:
        import uvloop
        runner: Callable[..., Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.run
    best = min(runner(run(args.copies, args.burst, args.unbatched)) for _ in range(args.repeat))
    kind = "unbatched" if args.unbatched else "batching"
    print(f"shadow lane ({kind}): {best * 1e6:.2f} us CPU per copy (best of {args.repeat}, "
          f"{args.copies} copies, {args.burst} per loop turn)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
