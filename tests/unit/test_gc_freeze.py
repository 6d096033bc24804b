"""`python -m gateway serve` freezes its start-up heap (gateway/cli.py, `freeze_heap`): a full
collection under load then walks only what requests allocate, not numpy/scipy/aiohttp."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import gateway.rest.serving
from gateway import cli
from gateway.config import parse_config


async def test_freeze_heap_moves_live_objects_out_of_the_collectors_reach() -> None:
    gc.unfreeze()
    tracked = len(gc.get_objects())
    try:
        await cli.freeze_heap(None)
        assert gc.get_freeze_count() >= tracked * 0.9  # what was alive is frozen
        assert len(gc.get_objects()) < tracked * 0.1  # a full collection has little to walk
    finally:
        gc.unfreeze()


def test_serve_runs_freeze_heap_at_startup(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    """The serve entrypoint installs the hook on the app it runs (after the app's own
    start-up hooks, so their state is frozen too)."""
    served: list[web.Application] = []
    monkeypatch.setattr(gateway.rest.serving, "run",
                        lambda app, *args, **kwargs: served.append(app))
    policy = asyncio.get_event_loop_policy()
    config = parse_config({"log": {"path": str(tmp_path / "log")},
                           "admin": {"state_path": str(tmp_path / "state" / "registry.json")}},
                          env={})
    try:
        cli._serve_one(config, "127.0.0.1", 0, None)
    finally:
        asyncio.set_event_loop_policy(policy)  # _serve_one installs uvloop's
    (app,) = served
    hooks: list[Any] = list(app.on_startup)
    assert hooks[-1] is cli.freeze_heap
