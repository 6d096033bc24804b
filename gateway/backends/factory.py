"""The one place that chooses the gateway's backends: files (default) or Kafka.

`log.sink: kafka` puts everything on Kafka: the log sink, the registry store (a compacted
topic), the reward bus and the labels every replica reads; otherwise everything lives in local
files. The app factory (gateway/app.py) calls `build_backends` once and wires what it returns;
nothing else looks at `log.sink`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from gateway.backends.file_bus import FileRewardBus
from gateway.backends.file_sink import FileSink, read_stream
from gateway.backends.file_store import FileStore
from gateway.backends.registry_store import RegistryStore
from gateway.backends.reward_bus import RewardBus
from gateway.backends.sink import LogSink, StreamReader
from gateway.config import GatewayConfig

HISTORY_TIMEOUT_S = 10.0  # reading a stream back from Kafka at start-up gives up after this


@dataclass(frozen=True)
class Backends:
    """Where one gateway process keeps its records, registry state and rewards."""

    sink: LogSink
    store: RegistryStore
    bus: RewardBus
    read_stream: StreamReader  # the sink's streams read back (the audit history)
    labels_on_bus: bool  # every replica reads labels from the bus, so feedback need not pass
    # them to this process's learner directly


def uses_kafka(config: GatewayConfig) -> bool:
    return config.log.sink == "kafka"


def build_sink(config: GatewayConfig) -> LogSink:
    """The configured inference-log sink (file by default, Kafka when `log.sink: kafka`)."""
    if uses_kafka(config):
        from gateway.backends.kafka_sink import KafkaSink  # imported lazily: aiokafka is heavy

        return KafkaSink(config.log.kafka, Path(config.log.path) / "spill")
    return FileSink(
        config.log.path,
        segment_bytes=config.log.segment_bytes,
        fsync=config.log.fsync,
        fsync_interval_ms=config.log.fsync_interval_ms,
    )


def build_backends(config: GatewayConfig) -> Backends:
    """Every backend for `config`, all on Kafka or all on local files."""
    sink = build_sink(config)
    if uses_kafka(config):
        from gateway.backends.kafka_bus import KafkaRewardBus
        from gateway.backends.kafka_store import KafkaStore
        from gateway.backends.kafka_topics import read_topic_tail, stream_topics

        kafka = config.log.kafka
        topics = stream_topics(kafka)

        async def read_kafka(stream: str, count: int) -> list[bytes]:
            async with asyncio.timeout(HISTORY_TIMEOUT_S):
                return await read_topic_tail(kafka.bootstrap, topics[stream], count)

        return Backends(
            sink=sink,
            store=KafkaStore(kafka, config.admin.state_path),
            bus=KafkaRewardBus(kafka.bootstrap, kafka.rewards_topic, kafka.labels_topic),
            read_stream=read_kafka,
            labels_on_bus=True,
        )

    async def read_files(stream: str, _count: int) -> list[bytes]:
        return await asyncio.to_thread(read_stream, Path(config.log.path), stream)

    return Backends(
        sink=sink,
        store=FileStore(config.admin.state_path),
        bus=FileRewardBus(config.admin.rewards_path),
        read_stream=read_files,
        labels_on_bus=False,
    )
