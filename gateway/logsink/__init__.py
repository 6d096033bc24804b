"""Inference log sinks: where records go (local segment files by default, Kafka when configured)."""

from gateway.logsink.base import LogSink

__all__ = ["LogSink"]
