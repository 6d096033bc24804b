"""Pluggable backends: where log records, registry state and rewards live (files or Kafka)."""

from gateway.backends.sink import LogSink

__all__ = ["LogSink"]
