"""Replay records to Kafka: the evaluator's own source topics, when its source is Kafka.

A replay writes where the evaluator reads, so with `source.type: kafka` its records go to
`source.kafka.inferences_topic` / `labels_topic`, keyed by request id like the gateway's. Sent
with acks=all and idempotence; `close` waits for every send. The checkpoint is then the store
(the replay rows ingested so far, `logged.replayed_ids`): a re-run before the ingest caught up
resends some rows, and the store drops their re-delivered ids.
"""

from __future__ import annotations

import asyncio
from typing import Any

from evaluator.config import KafkaSourceConfig
from understudy.records import INFERENCES, LABELS


class KafkaReplaySink:
    """`emit` starts a send at once; `close` waits for all of them, then stops the producer."""

    def __init__(self, config: KafkaSourceConfig) -> None:
        self.config = config
        self.topics = {INFERENCES: config.inferences_topic, LABELS: config.labels_topic}
        self._producer: Any = None
        self._sends: list[asyncio.Future[Any]] = []

    async def start(self) -> None:
        from aiokafka import AIOKafkaProducer

        self._producer = AIOKafkaProducer(bootstrap_servers=self.config.bootstrap, acks="all",
                                          enable_idempotence=True,
                                          client_id="understudy-replay")
        await self._producer.start()

    def emit(self, stream: str, key: str, value: bytes) -> None:
        self._sends.append(asyncio.ensure_future(
            self._producer.send_and_wait(self.topics[stream], value, key=key.encode())))

    async def close(self) -> None:
        try:
            await asyncio.gather(*self._sends)
        finally:
            await self._producer.stop()
