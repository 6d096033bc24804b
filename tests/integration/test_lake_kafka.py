"""Three ingest members in one consumer group write the landing zone from a real Kafka broker;
one is killed (SIGKILL) while it writes a file. The report's dataset must equal the one a
single-member store builds from the same topics: nothing lost, nothing doubled.

`test_three_members_one_killed_mid_file` runs in `make test` (marker kafka, ~20k requests);
the 1M-record version is `slow` (`pytest -m slow tests/integration/test_lake_kafka.py`, numbers in
docs/BENCHMARKS.md "Landing zone").
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from evaluator.config import EvaluatorConfig, parse_config
from evaluator.ingest import KafkaIngestor
from evaluator.lake.reader import LakeReader
from evaluator.store import Store
from tests.support.lake import dataset_differences, experiment_log

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 6


async def _create_topics(bootstrap: str, *topics: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    client = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await client.start()
    try:
        await client.create_topics([NewTopic(t, num_partitions=PARTITIONS, replication_factor=1)
                                    for t in topics])
    finally:
        await client.close()


async def _produce(bootstrap: str, topics: dict[str, str],
                   records: list[tuple[str, bytes, bytes]]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                enable_idempotence=True, linger_ms=20,
                                max_batch_size=1 << 20)
    await producer.start()
    try:
        pending = []
        for stream, key, value in records:
            pending.append(await producer.send(topics[stream], value, key=key))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def _lag(bootstrap: str, group: str, topics: list[str]) -> int:
    """Records of the topics not yet covered by the group's committed offsets."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await probe.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        tps = [TopicPartition(t, p) for t in topics for p in range(PARTITIONS)]
        ends = await probe.end_offsets(tps)
        done = {tp: meta.offset for tp, meta in committed.items()}
        return sum(ends[tp] - max(done.get(tp, 0), 0) for tp in tps)
    finally:
        await probe.stop()
        await admin.close()


def _member_config(tmp_path: Path, bootstrap: str, topics: dict[str, str], group: str,
                   name: str, file_records: int) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({
        "source": {"type": "kafka", "batch_records": 2000, "poll_interval_s": 0.2,
                   "progress_interval_s": 5,
                   "kafka": {"bootstrap": bootstrap, "inferences_topic": topics["inferences"],
                             "labels_topic": topics["labels"], "group_id": group}},
        "lake": {"path": str(tmp_path / "lake"), "member": name,
                 "file_records": file_records, "flush_interval_s": 1},
    }))
    return path


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "evaluator", "run", "--config", str(config)], cwd=ROOT,
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _wait_all_assigned(logs: dict[str, Path], timeout_s: float) -> None:
    """Until every member's latest assignment holds partitions: records produced after that
    spread over all three members however slowly each one started."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        latest = {}
        for name, log in logs.items():
            lines = [ln for ln in log.read_text(errors="replace").splitlines()
                     if f"{name}: assigned" in ln]
            latest[name] = lines[-1].split(": assigned", 1)[1].strip() if lines else ""
        if all(latest.values()):
            return
        time.sleep(0.2)
    raise AssertionError(f"the group's members did not all get partitions: {latest}")


def _kill_mid_file(proc: subprocess.Popen[bytes], lake: Path, name: str,
                   timeout_s: float) -> str:
    """SIGKILL the member as soon as one of its files is half-written (a `.tmp` exists), after
    it has committed at least one file; returns what the kill interrupted."""
    deadline = time.monotonic() + timeout_s
    committed = False
    while time.monotonic() < deadline and proc.poll() is None:
        for dirpath, _, files in os.walk(lake):
            for f in files:
                if f"-{name}-" not in f:
                    continue
                if f.endswith(".parquet"):
                    committed = True
                elif committed and f.endswith(".tmp"):
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return "mid-file" if os.path.exists(os.path.join(dirpath, f)) else \
                        "after its file, before the offset commit"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return "between files"


async def _reference_store(config: EvaluatorConfig) -> Store:
    store = Store.open(config.store)
    await asyncio.wait_for(KafkaIngestor(config, store).run(once=True), 3600)
    store.expire_orphans()
    store.release()
    return store


async def three_members_one_killed(kafka: Any, tmp_path: Path, n: int,
                                   file_records: int) -> dict[str, Any]:
    from tests.support.kafka import unique_topic

    topics = {"inferences": unique_topic("lake-inf"), "labels": unique_topic("lake-labels")}
    group = f"lake-{topics['inferences'][-10:]}"
    await _create_topics(kafka.bootstrap, *topics.values())
    records = experiment_log(n)
    lake = tmp_path / "lake"
    names = ["m0", "m1", "m2"]
    procs = {name: _start(_member_config(tmp_path, kafka.bootstrap, topics, group, name,
                                         file_records * (4 if name == "m0" else 1)),
                          tmp_path / f"{name}.log") for name in names}
    try:
        _wait_all_assigned({name: tmp_path / f"{name}.log" for name in names}, timeout_s=300)
        t0 = time.monotonic()
        producing = asyncio.create_task(_produce(kafka.bootstrap, topics, records))
        # Watch for m0's half-written file while the records are still arriving.
        killed = await asyncio.to_thread(_kill_mid_file, procs["m0"], lake, "m0", 120)
        await producing
        produced_s = time.monotonic() - t0
        while await _lag(kafka.bootstrap, group, list(topics.values())) > 0:
            assert time.monotonic() - t0 < 3600, "the group did not catch up"
            for name in ("m1", "m2"):
                assert procs[name].poll() is None, (tmp_path / f"{name}.log").read_text()
            await asyncio.sleep(0.5)
        ingest_s = time.monotonic() - t0
    finally:
        for name in ("m1", "m2"):
            if procs[name].poll() is None:
                procs[name].send_signal(signal.SIGTERM)
        if procs["m0"].poll() is None:  # an earlier failure: let it, not the wait, be reported
            procs["m0"].send_signal(signal.SIGKILL)
        for proc in procs.values():
            proc.wait(timeout=60)
    assert procs["m1"].returncode == 0
    assert procs["m2"].returncode == 0

    store_cfg = parse_config({
        "source": {"type": "kafka", "batch_records": 20_000, "poll_interval_s": 0.5,
                   "kafka": {"bootstrap": kafka.bootstrap, "inferences_topic":
                             topics["inferences"], "labels_topic": topics["labels"],
                             "group_id": f"{group}-store"}},
        "store": {"path": str(tmp_path / "store.duckdb")},
        "lake": {"path": str(lake)}}, env={})
    store = await _reference_store(store_cfg)
    out: dict[str, Any] = {"killed": killed, "produced_s": produced_s, "ingest_s": ingest_s,
                           "records": len(records)}
    with LakeReader.open(store_cfg) as reader, store:
        for route in ("fraud", "price"):
            want = store.load_experiments(route)
            got = reader.load_experiments(route)
            assert dataset_differences(want, got) == [], route
            assert got.experiments == want.experiments
            everything = reader.load_dataset(route)
            assert dataset_differences(store.load_dataset(route), everything) == [], route
            assert len(everything) > 0.8 * n / 3
            out[route] = everything.stats
        assert reader.counters() == store.counters()
        assert reader.watermark() == store.watermark()
    files = [p for p in lake.rglob("*.parquet")]
    out["files"] = len(files)
    out["members_with_files"] = sorted({p.name.split("-")[1] for p in files})
    return out


@pytest.mark.kafka
async def test_three_members_one_killed_mid_file(kafka: Any, tmp_path: Path) -> None:
    out = await three_members_one_killed(kafka, tmp_path, n=20_000, file_records=1500)
    print(f"lake kafka test: m0 killed {out['killed']}; {out['records']:,} records; "
          f"{out['files']} files; stats {out['fraud']}")
    assert out["members_with_files"] == ["m0", "m1", "m2"]
    assert out["fraud"].duplicate_inferences > 0
    assert out["fraud"].duplicate_labels > 0


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(7200)
async def test_three_members_one_killed_1m_records(kafka: Any, tmp_path: Path) -> None:
    """550k requests: 1.07M inference and label records."""
    out = await three_members_one_killed(kafka, tmp_path, n=550_000, file_records=50_000)
    assert out["records"] > 1_000_000
    print(f"lake kafka 1M records: {json.dumps({k: str(v) for k, v in out.items()})}")
