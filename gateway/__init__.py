"""Understudy gateway: a KServe V2 proxy for Triton with shadow challengers and exploration."""

__version__ = "0.1.0"
