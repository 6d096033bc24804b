"""The embedded default reward bus: one append-only JSONL file every local replica tails."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

import orjson

from gateway.backends.reward_bus import ApplyReward, LabelHandler, RewardEvent

log = logging.getLogger(__name__)


class FileRewardBus:
    """Reward events in one append-only JSONL file; every process tails it."""

    def __init__(self, path: str | Path, poll_s: float = 0.2) -> None:
        self.path = Path(path)
        self.poll_s = poll_s
        self._offset = 0
        self._apply: ApplyReward | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, apply: ApplyReward, on_labels: LabelHandler) -> None:
        # Labels reach this process's learner directly from /v2/feedback in file mode.
        self._apply = apply
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        self._read_new()
        self._task = asyncio.create_task(self._follow(), name="reward-bus-follow")

    def _read_new(self) -> None:
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.splitlines():
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if self._apply is not None and isinstance(event, dict):
                self._apply(event)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                self._read_new()
            except OSError:
                log.exception("cannot read reward events from %s", self.path)

    async def publish(self, event: RewardEvent) -> None:
        line = orjson.dumps(event) + b"\n"
        # O_APPEND writes of one short line are atomic between processes on a local file system.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(OSError):
            self._read_new()
