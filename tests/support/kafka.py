"""Session-wide real Kafka broker for the test suite (registered via pytest_plugins).

`make test` (tests/run.sh) starts one broker with devtools/kafka_broker.py and exports
UNDERSTUDY_TEST_KAFKA_BOOTSTRAP and UNDERSTUDY_TEST_KAFKA_DIR; the fixture then uses it. Run on
its own (plain `pytest`), the fixture starts a broker on free ports in a temp dir and stops it
at the end of the session. A broker that cannot start fails the tests (`pytest.fail`), never
skips them: CI must not go green without having talked to Kafka.

Tests that restart the broker call `kafka.stop()` / `kafka.start()`: same directory, same port,
data kept, so producers and consumers reconnect to the same bootstrap address.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord

from devtools import kafka_broker

ROOT = Path(__file__).resolve().parents[2]
ENV_BOOTSTRAP = "UNDERSTUDY_TEST_KAFKA_BOOTSTRAP"
ENV_DIR = "UNDERSTUDY_TEST_KAFKA_DIR"


def load_broker_module() -> ModuleType:
    """The broker helper module (devtools/kafka_broker.py)."""
    return kafka_broker


@dataclass
class KafkaBroker:
    """A running test broker; `.bootstrap` is "127.0.0.1:PORT"."""

    directory: Path
    port: int
    external: bool  # started by make test, not by this session: left running at the end

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop the broker (SIGTERM, clean shutdown), keeping its data."""
        load_broker_module().stop(self.directory)

    def start(self) -> None:
        """(Re)start on the same directory and port; returns once it answers Metadata."""
        broker = load_broker_module()
        state = broker.status(self.directory)
        if state is not None:
            return
        previous = broker.read_state(self.directory)
        try:
            broker.start(self.directory, port=self.port,
                         controller_port=previous.controller_port if previous else None,
                         version=previous.version if previous else broker.DEFAULT_VERSION)
        except broker.BrokerError as exc:
            pytest.fail(f"Kafka broker did not restart: {exc}")

    def is_running(self) -> bool:
        return load_broker_module().status(self.directory) is not None


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """The session's real Kafka broker (see the module docstring)."""
    broker = load_broker_module()
    bootstrap = os.environ.get(ENV_BOOTSTRAP)
    directory = os.environ.get(ENV_DIR)
    if bootstrap and directory:
        port = int(bootstrap.rsplit(":", 1)[1])
        handle = KafkaBroker(Path(directory), port, external=True)
        if not broker.is_ready(port):
            handle.start()
        yield handle
        handle.start()  # leave it as make test started it, even if a test stopped it
        return
    workdir = tmp_path_factory.mktemp("kafka")
    try:
        state = broker.start(workdir, port=None, fresh=True)
    except Exception as exc:  # any failure to start must fail the tests, not skip them
        pytest.fail(f"cannot start the Kafka test broker in {workdir}: {exc}")
    handle = KafkaBroker(workdir, state.port, external=False)
    try:
        yield handle
    finally:
        broker.stop(workdir)


@pytest.fixture
def kafka_topic(request: pytest.FixtureRequest) -> str:
    """A topic name no other test (or earlier run on a kept broker) has used."""
    return unique_topic(request.node.name)


def unique_topic(hint: str = "t") -> str:
    """`understudy.test.<hint>.<random>`: Kafka topic charset, well under 249 chars."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", hint).strip("-.")[:60] or "t"
    return f"understudy.test.{safe}.{uuid.uuid4().hex[:10]}"


async def consume_all(
    bootstrap: str,
    topic: str,
    *,
    count: int | None = None,
    wait_s: float = 30.0,
    linger: float = 0.5,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Read a topic from the beginning until `count` records arrived (then `linger` seconds more,
    to catch any excess) or `wait_s` seconds passed; with `count=None`, until `linger` seconds pass
    without a new record. No consumer group: nothing is committed, every call sees it all.
    """
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        metadata_max_age_ms=1000,
        request_timeout_ms=10_000,
    )
    records: list[ConsumerRecord[bytes, bytes]] = []
    await consumer.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        last_new = loop.time()
        reached: float | None = None
        while loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
            new = [r for msgs in batch.values() for r in msgs]
            if new:
                records.extend(new)
                last_new = loop.time()
            if count is not None and len(records) >= count and reached is None:
                reached = loop.time()
            if reached is not None and loop.time() - reached >= linger:
                break
            if count is None and records and loop.time() - last_new >= linger:
                break
    finally:
        await consumer.stop()
    return records

