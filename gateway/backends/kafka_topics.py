"""Small Kafka topic helpers shared by the Kafka backends: an admin client, a topic's
partitions, and reading a topic's newest records back (the audit history at start-up)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from gateway.config import KafkaConfig
from understudy.records import AUDIT, INFERENCES, LABELS


def stream_topics(kafka: KafkaConfig) -> dict[str, str]:
    """The topic each log stream goes to."""
    return {INFERENCES: kafka.topic, LABELS: kafka.labels_topic, AUDIT: kafka.audit_topic}


@contextlib.asynccontextmanager
async def kafka_admin(bootstrap: str) -> AsyncIterator[Any]:
    """A started admin client, closed on exit (aiokafka is imported only when Kafka is used)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def topic_partitions(admin: Any, topic: str) -> set[int]:
    """The partition ids the brokers report for `topic` (empty while it is being created)."""
    return {
        int(p["partition"])
        for desc in await admin.describe_topics([topic])
        if desc.get("topic") == topic and not desc.get("error_code")
        for p in desc.get("partitions") or ()
    }


async def read_topic_tail(bootstrap: str, topic: str, count: int) -> list[bytes]:
    """The values of the last `count` records of each partition of `topic`, in offset order
    per partition; empty when the topic does not exist."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async with kafka_admin(bootstrap) as admin:
        if topic not in await admin.list_topics():
            return []
        tps = [TopicPartition(topic, p) for p in sorted(await topic_partitions(admin, topic))]
    if not tps:
        return []
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign(tps)
        begin = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(begin[tp], end[tp] - count))
        values: list[bytes] = []
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                values.extend(r.value for r in records if r.value)
        return values
    finally:
        await consumer.stop()
