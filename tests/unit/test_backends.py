"""The backends chosen once (gateway.backends.factory) and the one connect-and-retry helper
(gateway.backends.retry) every Kafka client uses. No Kafka needed: the Kafka backends are only
built here, never started."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from gateway.backends.factory import build_backends
from gateway.backends.file_bus import FileRewardBus
from gateway.backends.file_sink import FileSink
from gateway.backends.file_store import FileStore
from gateway.backends.kafka_bus import KafkaRewardBus
from gateway.backends.kafka_sink import KafkaSink
from gateway.backends.kafka_store import KafkaStore
from gateway.backends.retry import Backoff, connect_with_retry
from gateway.config import GatewayConfig, parse_config
from understudy.records import AUDIT

# ---------------------------------------------------------------------------------- Backoff


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    backoff = Backoff(0.1, 0.5)
    assert [backoff.next() for _ in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    backoff.reset()
    assert backoff.next() == pytest.approx(0.1)


def test_backoff_with_factor_one_is_a_fixed_interval() -> None:
    backoff = Backoff(2.0, 2.0, factor=1)
    assert [backoff.next() for _ in range(3)] == [2.0, 2.0, 2.0]


@pytest.mark.parametrize(("base", "cap", "factor"), [(-1.0, 1.0, 2.0), (2.0, 1.0, 2.0),
                                                       (0.1, 1.0, 0.5)])
def test_backoff_refuses_nonsense(base: float, cap: float, factor: float) -> None:
    with pytest.raises(ValueError, match="invalid backoff"):
        Backoff(base, cap, factor)


# ------------------------------------------------------------------------ connect_with_retry


class Flaky:
    """Fails `failures` times with `error`, then returns "client"."""

    def __init__(self, failures: int, error: BaseException | None = None) -> None:
        self.failures = failures
        self.error = error or ConnectionRefusedError("refused")
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "client"


async def test_retry_waits_the_backoff_between_failures_and_returns_the_client() -> None:
    waits: list[float] = []
    reported: list[tuple[str, float | None]] = []

    async def pause(seconds: float) -> None:
        waits.append(seconds)

    connect = Flaky(3)
    client = await connect_with_retry(
        connect, Backoff(0.5, 1.0), errors=(OSError,), pause=pause,
        on_failure=lambda exc, delay: reported.append((type(exc).__name__, delay)))
    assert client == "client"
    assert connect.calls == 4
    assert waits == [0.5, 1.0, 1.0]
    assert reported == [("ConnectionRefusedError", 0.5), ("ConnectionRefusedError", 1.0),
                        ("ConnectionRefusedError", 1.0)]


async def test_retry_gives_up_after_one_failed_attempt_when_told_to() -> None:
    """A client that is shutting down tries once, reports it with no next delay, and stops."""
    reported: list[float | None] = []

    async def pause(_: float) -> None:
        raise AssertionError("no wait once the caller gave up")

    connect = Flaky(10)
    result = await connect_with_retry(connect, Backoff(1.0, 1.0), pause=pause,
                                      give_up=lambda: True,
                                      on_failure=lambda _, delay: reported.append(delay))
    assert result is None
    assert connect.calls == 1
    assert reported == [None]


async def test_retry_lets_other_errors_through() -> None:
    connect = Flaky(1, error=KeyError("bug"))
    with pytest.raises(KeyError):
        await connect_with_retry(connect, Backoff(0.0, 0.0), errors=(OSError,))
    assert connect.calls == 1


async def test_retry_stops_when_cancelled() -> None:
    task = asyncio.create_task(connect_with_retry(Flaky(1_000_000), Backoff(0.01, 0.01)))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# ---------------------------------------------------------------------------------- factory


def _config(tmp_path: Path, sink: str) -> GatewayConfig:
    return parse_config({
        "log": {"sink": sink, "path": str(tmp_path / "logs"),
                "kafka": {"bootstrap": "127.0.0.1:1"}},
        "admin": {"state_path": str(tmp_path / "state.json"),
                  "rewards_path": str(tmp_path / "rewards.jsonl")},
    }, {})


def test_file_backends_are_all_local_files(tmp_path: Path) -> None:
    backends = build_backends(_config(tmp_path, "file"))
    assert isinstance(backends.sink, FileSink)
    assert isinstance(backends.store, FileStore)
    assert backends.store.path == tmp_path / "state.json"
    assert isinstance(backends.bus, FileRewardBus)
    assert backends.bus.path == tmp_path / "rewards.jsonl"
    assert not backends.labels_on_bus  # feedback hands labels to this process's learner


def test_kafka_backends_are_all_on_kafka(tmp_path: Path) -> None:
    backends = build_backends(_config(tmp_path, "kafka"))
    assert isinstance(backends.sink, KafkaSink)
    assert backends.sink.spill_dir == tmp_path / "logs" / "spill"
    assert isinstance(backends.store, KafkaStore)
    assert backends.store.cache_path == tmp_path / "state.json"  # the outage cache
    assert isinstance(backends.bus, KafkaRewardBus)
    assert backends.bus.bootstrap == "127.0.0.1:1"
    assert backends.labels_on_bus  # every replica reads labels from the topic


async def test_file_backends_read_the_audit_stream_back_from_the_sink(tmp_path: Path) -> None:
    """What the file sink wrote is what `read_stream` returns: the audit history at start."""
    backends = build_backends(_config(tmp_path, "file"))
    await backends.sink.start()
    entries = [orjson.dumps({"kind": "audit", "id": str(i)}) for i in range(3)]
    for entry in entries:
        backends.sink.emit(AUDIT, "route", entry)
    await backends.sink.close()
    assert await backends.read_stream(AUDIT, 10) == entries
