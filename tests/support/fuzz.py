"""Harness for the property-based fuzz tests (tests/test_fuzz_*.py): a real gateway served from
its own thread and event loop (hypothesis drives plain functions), raw HTTP/1.1 requests that
fail on a dropped connection, per-status counts printed to the terminal, and the shared
strategies and answer checks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import http.client
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from gateway.app import create_app
from gateway.config import parse_config
from gateway.rest.serving import start_serving
from tests.conftest import read_stream
from understudy.record_schema import record_problems

# Reproducible in CI: derandomized, no example database, no deadline (real I/O).
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck), print_blob=False)


@dataclass
class FuzzGateway:
    """A real gateway on a real socket, served from its own thread and event loop."""

    host: str
    port: int
    log_dir: Path
    thread: threading.Thread
    request_stop: Callable[[], None]
    counts: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)
    ok_ids: list[str] = field(default_factory=list)
    conn: http.client.HTTPConnection | None = None

    def shutdown(self) -> None:
        """Stop like SIGTERM does (drain shadows, flush the sink) and wait for it."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.thread.is_alive():
            self.request_stop()
            self.thread.join(60)
        assert not self.thread.is_alive(), "gateway did not stop"

    def send(self, kind: str, method: str, path: str, body: bytes,
             headers: dict[str, str] | None = None) -> tuple[int, bytes, http.client.HTTPResponse]:
        """One request on a kept-alive connection; raises if the connection drops."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        self.conn.request(method, path, body=body, headers=headers or {})
        try:
            resp = self.conn.getresponse()
            data = resp.read()
        except (http.client.HTTPException, OSError) as exc:
            self.conn.close()
            self.conn = None
            raise AssertionError(f"connection dropped on {kind} {path}: {exc!r}") from exc
        self.counts[(kind, resp.status)] += 1
        if resp.will_close:
            self.conn.close()
            self.conn = None
        return resp.status, data, resp


def _serve(config: Any, ready: threading.Event, box: dict[str, Any]) -> None:
    async def main() -> None:
        serving = await start_serving(create_app(config), config.listen.server, "127.0.0.1", 0)
        box["port"] = serving.port
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        box["stop"] = lambda: loop.call_soon_threadsafe(stop.set)
        ready.set()
        await stop.wait()
        await serving.close()  # like SIGTERM: drain shadows, flush the sink

    try:
        asyncio.run(main())
    finally:
        ready.set()


@contextlib.contextmanager
def fuzz_gateway(triton_url: str, routes: dict[str, Any], tmp: Path, pytestconfig: pytest.Config,
                 *, max_body: int = 256 * 1024) -> Iterator[FuzzGateway]:
    """A gateway for `routes` on a free port; on exit it stops and its counts are printed."""
    config = parse_config({
        "triton": {"url": triton_url, "timeout_ms": 10_000},
        "listen": {"max_body_bytes": max_body},
        "log": {"path": str(tmp / "log"), "fsync": "never"},
        "admin": {"state_path": str(tmp / "state" / "registry.json"),
                  "rewards_path": str(tmp / "state" / "rewards.jsonl")},
        "routes": routes,
    }, env={})
    ready, box = threading.Event(), {}
    thread = threading.Thread(target=_serve, args=(config, ready, box), daemon=True)
    thread.start()
    assert ready.wait(60) and "port" in box, "gateway did not start"
    gw = FuzzGateway("127.0.0.1", box["port"], tmp / "log", thread, box["stop"])
    try:
        yield gw
    finally:
        gw.shutdown()
        # Straight to the terminal, past output capturing: CI logs show the counts every run.
        reporter = pytestconfig.pluginmanager.getplugin("terminalreporter")
        capture = pytestconfig.pluginmanager.getplugin("capturemanager")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line("")
                for line in summary(gw.counts):
                    reporter.write_line(line)


def summary(counts: collections.Counter[tuple[str, int]]) -> list[str]:
    """Requests tried and status codes, overall and per kind of input."""
    by_status: collections.Counter[int] = collections.Counter()
    by_kind: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    for (kind, status), n in counts.items():
        if n:
            by_status[status] += n
            by_kind[kind][status] += n

    def codes(c: collections.Counter[int]) -> str:
        return " ".join(f"{s}x{n}" for s, n in sorted(c.items()))

    return [f"fuzz: {sum(by_status.values())} requests, status codes {codes(by_status)}",
            *(f"fuzz:   {kind}: {sum(c.values())} ({codes(c)})" for kind, c in
              sorted(by_kind.items()))]


JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12,
)

def check_answer(status: int, data: bytes, resp: http.client.HTTPResponse) -> None:
    assert status < 500, (status, data[:300])
    if status >= 400:
        payload = orjson.loads(data)
        assert isinstance(payload, dict) and isinstance(payload.get("error"), str), data[:300]
        assert payload["error"], data[:300]
    elif resp.getheader("Inference-Header-Content-Length") is None:
        # A complete JSON answer. Parsed like tritonclient does (rapidjson): Triton writes a
        # non-finite score (from NaN features in a binary tensor) as NaN, which it accepts.
        json.loads(data)


def written_records(gw: FuzzGateway) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inferences, labels) the stopped gateway wrote, after checking each against schema v1."""
    gw.shutdown()
    inferences = read_stream(gw.log_dir, "inferences")
    labels = read_stream(gw.log_dir, "labels")
    bad = [(r.get("request_id"), p) for r in inferences + labels for p in record_problems(r)]
    assert bad == [], bad[:10]
    return inferences, labels


def five_xx_metrics(metrics_text: bytes, routes: dict[str, Any]) -> list[str]:
    """understudy_requests_total lines with a 5xx code for any of `routes`."""
    return [line for line in metrics_text.decode().splitlines()
            if line.startswith("understudy_requests_total") and 'code="5' in line
            and any(f'route="{route}"' in line for route in routes)]
