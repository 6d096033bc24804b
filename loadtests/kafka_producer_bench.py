"""Producer throughput of KafkaSink against a real broker (a measurement, not a test).

    .venv/bin/python loadtests/kafka_producer_bench.py [--bootstrap HOST:PORT] [--records 100000]
        [--size 1024] [--compression gzip] [--linger-ms 5]

Without --bootstrap it starts a throwaway broker with devtools/kafka_broker.py on free ports and
stops it afterwards. Records are ~`--size` bytes of inference-log-like JSON (random floats, so
gzip has realistic work to do, not a run of one repeated byte). The emitter behaves like the
gateway's record task: it emits in chunks and yields to the event loop between them, backing
off only while the sink's memory queue is deep, so the number is the sink's sustained rate
(emit -> acknowledged by Kafka with acks=all, idempotent), not how fast a list can be appended.

Also printed: the mean cost of one `emit()` call, and the worst event-loop stall seen by a 1 ms
ticker during the run (what a client request would have waited behind the sink).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.backends.kafka_sink import KafkaSink  # noqa: E402
from gateway.config import KafkaConfig  # noqa: E402


def load_broker():
    from devtools import kafka_broker

    return kafka_broker


def make_value(i: int, size: int, rng: random.Random) -> bytes:
    record = {
        "schema_version": 1, "kind": "inference", "request_id": f"bench-{i:08d}",
        "ts": time.time(), "route": "fraud", "policy": {"type": "champion"},
        "served": {"model": "fraud_v3", "version": "1"}, "propensity": 1.0,
        "inputs": {"features": {"datatype": "FP32", "shape": [1, 8], "data": []}},
        "outputs": {}, "status": 200, "gateway_latency_ms": 1.2,
    }
    features = record["inputs"]["features"]["data"]
    while len(orjson.dumps(record)) < size:
        features.append(round(rng.random(), 6))
    return orjson.dumps(record)


class LoopLag:
    """Worst delay of a 1 ms ticker: how long the event loop was blocked at a stretch."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, loop.time() - before - 0.001)

    def __enter__(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


async def bench(bootstrap: str, args: argparse.Namespace) -> None:
    rng = random.Random(7)
    templates = [make_value(i, args.size, rng) for i in range(1000)]
    topic = f"understudy.bench.{int(time.time())}"
    config = KafkaConfig(bootstrap=bootstrap, topic=topic, linger_ms=args.linger_ms,
                         compression=args.compression)
    with tempfile.TemporaryDirectory() as tmp:
        sink = KafkaSink(config, Path(tmp) / "spill")
        await sink.start()
        sink.emit("inferences", "warmup", templates[0])  # topic creation, connection, pid
        await sink.flush()

        emit_seconds = 0.0
        began = time.perf_counter()
        with LoopLag() as lag:
            for start in range(0, args.records, args.chunk):
                t0 = time.perf_counter()
                for i in range(start, min(start + args.chunk, args.records)):
                    sink.emit("inferences", f"bench-{i:08d}", templates[i % 1000])
                emit_seconds += time.perf_counter() - t0
                await asyncio.sleep(0)
                for _ in range(60_000):  # back off (at most a minute) while the sink is deep
                    if sink.queued <= args.max_queue:
                        break
                    await asyncio.sleep(0.001)
            await sink.flush()
            spilled = sink.spill.pending_bytes  # what went through the spill (fell behind)
            # flush() means "on disk": wait for Kafka's acks (the spill has no event to await).
            while not sink.spill.is_empty():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - began
        await sink.close()

    mb = args.records * len(templates[0]) / 1e6
    print(f"records={args.records} size={len(templates[0])}B compression={args.compression} "
          f"linger_ms={args.linger_ms}")
    print(f"throughput: {args.records / elapsed:,.0f} records/s, {mb / elapsed:.1f} MB/s "
          f"({elapsed:.2f} s, emit -> acknowledged)")
    print(f"emit(): {emit_seconds / args.records * 1e6:.2f} us/call; "
          f"worst event-loop stall: {lag.worst * 1000:.1f} ms; "
          f"spill backlog at flush: {spilled} B (replayed before the clock stopped)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", help="an existing broker; default: start a throwaway one")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--compression", default="gzip")
    parser.add_argument("--linger-ms", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=500, help="records emitted per loop turn")
    parser.add_argument("--max-queue", type=int, default=20_000,
                        help="back off while the sink holds more than this in memory")
    args = parser.parse_args()
    if args.bootstrap:
        asyncio.run(bench(args.bootstrap, args))
        return
    broker = load_broker()
    with tempfile.TemporaryDirectory() as tmp:
        began = time.monotonic()
        state = broker.start(Path(tmp) / "kafka", port=None, fresh=True)
        print(f"started kafka {state.version} at {state.bootstrap} "
              f"in {time.monotonic() - began:.1f}s")
        try:
            asyncio.run(bench(state.bootstrap, args))
        finally:
            broker.stop(Path(tmp) / "kafka")


if __name__ == "__main__":
    main()
