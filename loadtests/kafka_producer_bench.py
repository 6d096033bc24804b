"""Producer throughput of KafkaSink against a real broker (a measurement, not a test).

    .venv/bin/python loadtests/kafka_producer_bench.py [--bootstrap HOST:PORT] [--records 100000]
        [--size 1024] [--compression gzip] [--linger-ms 5] [--compare TREE [--rounds 3]]

Without --bootstrap it starts a throwaway broker with devtools/kafka_broker.py on free ports and
stops it afterwards. Records are ~`--size` bytes of inference-log-like JSON (random floats, so
gzip has realistic work to do, not a run of one repeated byte). The emitter behaves like the
gateway's record task: it emits in chunks and yields to the event loop between them, backing
off only while the sink's memory queue is deep, so the number is the sink's sustained rate
(emit -> acknowledged by Kafka with acks=all, idempotent), not how fast a list can be appended.

Also printed: the CPU of this process per record (emit, the sink's pump, aiokafka, compression:
everything the gateway would pay for its log), the mean cost of one `emit()` call, and the worst
event-loop stall seen by a 1 ms ticker during the run (what a client request would have waited
behind the sink).

`--rate N` emits N records/s instead of as fast as the sink takes them: CPU per record at a
load both sides sustain (small flights: what the linger is for). `--compare TREE` A/Bs the sink
of another checkout (e.g. `--compare ../main`) against this one: one broker, `--rounds` rounds
alternating the order, each run a fresh process importing `gateway` from its tree
(`--sink-tree`), then the medians.

`--raw` measures the clients alone instead, in alternating rounds: aiokafka's `send()` per
record (a key hash, partitioner and accumulator append per record) against
`create_batch()`/`append()`/`send_batch()` (one partition choice per batch: what KafkaSink does
for the inferences stream), and, when the confluent-kafka package is importable, librdkafka's
`produce()` per record (its own threads; their CPU is this process's too), as CPU µs per record
and records/s, acks=all and idempotent all: the evidence for batching, and for or against a
C-backed client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]


def load_broker():
    sys.path.insert(0, str(ROOT))
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
    # The sink of --sink-tree (another checkout, for --compare) or of this one.
    sys.path.insert(0, args.sink_tree or str(ROOT))
    from gateway.backends.kafka_sink import KafkaSink
    from gateway.config import KafkaConfig

    rng = random.Random(7)
    templates = [make_value(i, args.size, rng) for i in range(1000)]
    topic = f"understudy.bench.{time.time_ns()}"
    config = KafkaConfig(bootstrap=bootstrap, topic=topic, linger_ms=args.linger_ms,
                         compression=args.compression)
    with tempfile.TemporaryDirectory() as tmp:
        sink = KafkaSink(config, Path(tmp) / "spill")
        await sink.start()
        sink.emit("inferences", "warmup", templates[0])  # topic creation, connection, pid
        await sink.flush()

        emit_seconds = 0.0
        began, cpu0 = time.perf_counter(), time.process_time()
        with LoopLag() as lag:
            # --rate: chunks of rate/100 every 10 ms (a gateway's steady trickle of records)
            chunk = max(1, args.rate // 100) if args.rate else args.chunk
            for n, start in enumerate(range(0, args.records, chunk)):
                t0 = time.perf_counter()
                for i in range(start, min(start + chunk, args.records)):
                    sink.emit("inferences", f"bench-{i:08d}", templates[i % 1000])
                emit_seconds += time.perf_counter() - t0
                if args.rate:
                    await asyncio.sleep(max(0.0, began + (n + 1) * 0.01 - time.perf_counter()))
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
        elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu0
        await sink.close()

    mb = args.records * len(templates[0]) / 1e6
    if args.json:
        print(json.dumps({"records_s": args.records / elapsed,
                          "cpu_us": cpu / args.records * 1e6,
                          "emit_us": emit_seconds / args.records * 1e6,
                          "stall_ms": lag.worst * 1000, "spilled_b": spilled}), flush=True)
        return
    print(f"records={args.records} size={len(templates[0])}B compression={args.compression} "
          f"linger_ms={args.linger_ms}")
    print(f"throughput: {args.records / elapsed:,.0f} records/s, {mb / elapsed:.1f} MB/s "
          f"({elapsed:.2f} s, emit -> acknowledged); CPU {cpu / args.records * 1e6:.1f} us/record")
    print(f"emit(): {emit_seconds / args.records * 1e6:.2f} us/call; "
          f"worst event-loop stall: {lag.worst * 1000:.1f} ms; "
          f"spill backlog at flush: {spilled} B (replayed before the clock stopped)")


async def raw_producer(bootstrap: str, args: argparse.Namespace) -> None:
    from aiokafka import AIOKafkaProducer

    rng = random.Random(7)
    templates = [make_value(i, args.size, rng) for i in range(1000)]
    keys = [f"bench-{i:08d}".encode() for i in range(args.records)]
    modes = ["send", "batch"]
    try:
        import confluent_kafka  # noqa: F401
        modes.append("confluent")
    except ImportError:
        print("confluent-kafka not installed: its rounds are skipped", flush=True)
    for mode in modes * args.rounds:
        topic = f"understudy.rawbench.{mode}.{time.time_ns()}"
        if mode == "confluent":
            await asyncio.to_thread(confluent_producer, bootstrap, topic, templates, keys, args)
            continue
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                    enable_idempotence=True, linger_ms=args.linger_ms,
                                    compression_type=None if args.compression == "none"
                                    else args.compression)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"warm-up", key=b"w")
            partitions = sorted(await producer.partitions_for(topic))
            cpu0, wall0 = time.process_time(), time.perf_counter()
            futures = []
            if mode == "send":
                for i in range(args.records):
                    futures.append(await producer.send(topic, templates[i % 1000], key=keys[i]))
                    if i % args.chunk == args.chunk - 1:
                        await asyncio.sleep(0)
            else:
                i = turn = 0
                while i < args.records:
                    batch = producer.create_batch()
                    while i < args.records and batch.append(
                            key=keys[i], value=templates[i % 1000], timestamp=None) is not None:
                        i += 1
                    batch.close()
                    futures.append(await producer.send_batch(
                        batch, topic, partition=partitions[turn % len(partitions)]))
                    turn += 1
                    await asyncio.sleep(0)
            await asyncio.gather(*futures)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        finally:
            await producer.stop()
        print(f"{mode:5}: {args.records / wall:,.0f} records/s, "
              f"{cpu / args.records * 1e6:.1f} us CPU/record (this process)", flush=True)


def confluent_producer(bootstrap: str, topic: str, templates: list[bytes], keys: list[bytes],
                       args: argparse.Namespace) -> None:
    """librdkafka's producer on the same records: produce() per record, key-partitioned."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all",
                         "enable.idempotence": True, "linger.ms": args.linger_ms,
                         "compression.type": args.compression, "batch.size": 256 * 1024})
    failed: list[object] = []

    def delivered(err: object, _msg: object) -> None:
        if err is not None:
            failed.append(err)

    producer.produce(topic, b"warm-up", key=b"w", on_delivery=delivered)
    producer.flush(30)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(args.records):
        while True:
            try:
                producer.produce(topic, templates[i % 1000], key=keys[i], on_delivery=delivered)
                break
            except BufferError:  # its local queue is full: serve callbacks, then retry
                producer.poll(0.001)
        if i % args.chunk == args.chunk - 1:
            producer.poll(0)
    producer.flush(120)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    print(f"confluent: {args.records / wall:,.0f} records/s, "
          f"{cpu / args.records * 1e6:.1f} us CPU/record (this process, librdkafka's threads "
          f"included){f'; {len(failed)} FAILED' if failed else ''}", flush=True)


def compare(bootstrap: str, args: argparse.Namespace) -> None:
    """Run the sink bench for --compare's tree and this one, alternating, one process each."""
    trees = {"before": Path(args.compare).resolve(), "after": ROOT}
    common = ["--bootstrap", bootstrap, "--records", str(args.records), "--size", str(args.size),
              "--compression", args.compression, "--linger-ms", str(args.linger_ms),
              "--chunk", str(args.chunk), "--max-queue", str(args.max_queue),
              "--rate", str(args.rate), "--json"]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for round_no in range(args.rounds):
        order = list(trees) if round_no % 2 == 0 else list(trees)[::-1]
        for name in order:
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *common,
                                  "--sink-tree", str(trees[name])], check=True,
                                 capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            runs[name].append(result)
            print(f"round {round_no} {name:6} {json.dumps(result)}", flush=True)
    for name, results in runs.items():
        med = {k: statistics.median(r[k] for r in results) for k in results[0]}
        print(f"median {name:6} ({trees[name]}): {med['records_s']:,.0f} records/s, "
              f"{med['cpu_us']:.1f} us CPU/record, emit {med['emit_us']:.2f} us, "
              f"worst stall {med['stall_ms']:.1f} ms")


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
    parser.add_argument("--rate", type=int, default=0,
                        help="emit at this many records/s (default: as fast as the sink takes)")
    parser.add_argument("--raw", action="store_true",
                        help="the clients alone: send() per record vs create_batch/send_batch "
                             "(and confluent-kafka when installed)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="--raw / --compare: rounds of each mode / tree")
    parser.add_argument("--compare", metavar="TREE",
                        help="A/B the sink of another checkout against this one")
    parser.add_argument("--sink-tree", metavar="TREE", help="import the sink from this checkout")
    parser.add_argument("--json", action="store_true", help="one JSON line (used by --compare)")
    args = parser.parse_args()

    def run(bootstrap: str) -> None:
        if args.compare:
            compare(bootstrap, args)
        else:
            asyncio.run((raw_producer if args.raw else bench)(bootstrap, args))

    if args.bootstrap:
        run(args.bootstrap)
        return
    broker = load_broker()
    with tempfile.TemporaryDirectory() as tmp:
        began = time.monotonic()
        state = broker.start(Path(tmp) / "kafka", port=None, fresh=True)
        print(f"started kafka {state.version} at {state.bootstrap} "
              f"in {time.monotonic() - began:.1f}s")
        try:
            run(state.bootstrap)
        finally:
            broker.stop(Path(tmp) / "kafka")


if __name__ == "__main__":
    main()
