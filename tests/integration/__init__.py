"""Integration tier: tests that run real Triton, a real Kafka broker or real processes."""
