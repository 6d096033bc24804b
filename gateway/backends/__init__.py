"""Pluggable backends: where log records, registry state and rewards live (files or Kafka).

Three small interfaces, each with a file and a Kafka implementation, all chosen in one place
(`factory.build_backends`, called by the app factory):

- log sink (`sink.LogSink`): `file_sink.FileSink`, `kafka_sink.KafkaSink` (built in layers:
  `kafka_buffer`, `kafka_producer`, `kafka_guard`; its durable local `spill`);
- registry store (`registry_store.RegistryStore`): `file_store.FileStore`,
  `kafka_store.KafkaStore`;
- reward bus (`reward_bus.RewardBus`): `file_bus.FileRewardBus`, `kafka_bus.KafkaRewardBus`.

Every Kafka client connects and reconnects through `retry.connect_with_retry`; `kafka_topics`
holds the topic helpers they share.
"""

from gateway.backends.sink import LogSink

__all__ = ["LogSink"]
