"""Unit tier (`make unit`): no Triton, no Kafka; runs in about a minute."""
