"""The lean HTTP server (gateway/rest/lean_server.py) through real sockets and real Triton:
it answers exactly like the aiohttp server it replaces, in request order when requests are
pipelined, with 413/414/431 at aiohttp's limits, and drains requests in flight on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re

import httptools
import orjson
import pytest

from gateway.rest.inference import ROUTES as ROUTE_TABLE
from gateway.rest.inference import UPSTREAM
from gateway.rest.lean_server import LeanServer
from gateway.rest.serving import LeanSite
from tests.conftest import GatewayFactory, GatewayHandle, fraud_body

pytestmark = pytest.mark.triton

ROUTES = {"fraud": {"champion": {"model": "fraud_v3"},
                    "challengers": [{"model": "fraud_v4", "sample_rate": 1.0}]}}
ROW = [0.25] * 8


class Answer:
    """One parsed HTTP answer."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""


class _Reader:
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.answers: list[Answer] = []
        self.current = Answer()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers[name.decode().lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        self.current.status = self.parser.get_status_code()
        self.answers.append(self.current)
        self.current = Answer()


async def exchange(url: str, raw: bytes, answers: int, *, chunks: list[bytes] | None = None
                   ) -> tuple[list[Answer], bool]:
    """Write `raw` (or `chunks`, one write each) on one connection; read `answers` answers.
    Returns them and whether the server closed the connection afterwards."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    parsed = _Reader()
    try:
        for chunk in chunks or [raw]:
            writer.write(chunk)
            await writer.drain()
        while len(parsed.answers) < answers:
            data = await asyncio.wait_for(reader.read(65536), 30)
            if not data:
                break
            parsed.parser.feed_data(data)
        closed = False
        with contextlib.suppress(TimeoutError):
            closed = await asyncio.wait_for(reader.read(1), 0.3) == b""
    finally:
        writer.close()
    return parsed.answers, closed


def post(path: str, body: bytes, headers: bytes = b"", version: bytes = b"1.1") -> bytes:
    return (b"POST %s HTTP/%s\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (path.encode(), version, len(body), headers, body))


def get(path: str, headers: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (path.encode(), headers)


def body(request_id: str | None = None, rows: int = 1) -> bytes:
    return orjson.dumps(fraud_body([ROW] * rows, request_id))


# Requests both servers must answer identically (status, content type, body, the data plane's
# headers), each on a fresh connection. Request ids are normalised (generated ones differ).
CASES: dict[str, bytes] = {
    "infer": post("/v2/models/fraud/infer", body("c1")),
    "infer-version": post("/v2/models/fraud/versions/3/infer?x=1", body("c2")),
    "infer-http10": post("/v2/models/fraud/infer", body("c3"), version=b"1.0"),
    "infer-http10-keepalive": post("/v2/models/fraud/infer", body("c4"),
                                   b"Connection: keep-alive\r\n", version=b"1.0"),
    "infer-close": post("/v2/models/fraud/infer", body("c5"), b"Connection: close\r\n"),
    "infer-chunked": (b"POST /v2/models/fraud/infer HTTP/1.1\r\nHost: x\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n"
                      % (len(body("c6")), body("c6"))),
    "bad-json": post("/v2/models/fraud/infer", b"{not json"),
    "unknown-route": post("/v2/models/nope/infer", body()),
    "request-id-header": post("/v2/models/fraud/infer", body(), b"X-Request-Id: hdr-1\r\n"),
    "request-id-too-long": post("/v2/models/fraud/infer", body(),
                                b"X-Request-Id: " + b"h" * 5000 + b"\r\n"),
    "too-large": post("/v2/models/fraud/infer", body(rows=200)),
    "binary-truncated": post("/v2/models/fraud/infer", b'{"inputs":[]}',
                             b"Inference-Header-Content-Length: 9999\r\n"),
    "percent-route": post("/v2/models/%ff/infer", body()),
    "nul-route": post("/v2/models/%00/infer", body()),
    "get-infer": get("/v2/models/fraud/infer"),
    "put-infer": b"PUT /v2/models/fraud/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    "live": get("/v2/health/live"),
    "ready": get("/v2/health/ready"),
    "post-live": post("/v2/health/live", b""),
    "metadata": get("/v2/models/fraud"),
    "server-metadata": get("/v2"),
    "no-such-path": get("/nowhere"),
    "feedback-bad": post("/v2/feedback", b"[1"),
    "admin-unauthorized": get("/admin/routes"),
}
_ID = re.compile(rb'"id":"[0-9a-f]{32}"')


def _comparable(answer: Answer) -> tuple[object, ...]:
    rid = answer.headers.get("x-request-id", "")
    body = answer.body.replace(rid.encode(), b"<id>") if rid else answer.body
    return (answer.status, answer.headers.get("content-type"),
            answer.headers.get("x-served-model"), answer.headers.get("x-route-policy"),
            answer.headers.get("inference-header-content-length"),
            rid if len(rid) != 32 else "<generated>",
            "www-authenticate" in answer.headers, _ID.sub(b'"id":"<id>"', body))


async def test_lean_answers_like_aiohttp(make_gateway: GatewayFactory) -> None:
    lean = await make_gateway(ROUTES, listen={"max_body_bytes": 4096})
    aio = await make_gateway(ROUTES, listen={"max_body_bytes": 4096, "server": "aiohttp"})
    for name, raw in CASES.items():
        got = {}
        for gw in (lean, aio):
            answers, closed = await exchange(gw.url, raw, 1)
            assert len(answers) == 1, (name, gw.config.listen.server)
            got[gw.config.listen.server] = (_comparable(answers[0]), closed)
        assert got["lean"] == got["aiohttp"], name
    # HEAD (answered by aiohttp without a Content-Length): byte-identical but for the Date.
    raw = b"HEAD /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n" + get("/v2/health/live")
    heads = []
    for gw in (lean, aio):
        host, port = gw.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(raw)
        data = b""
        while data.count(b"\r\n\r\n") < 2:
            data += await asyncio.wait_for(reader.read(4096), 30)
        writer.close()
        heads.append(re.sub(rb"Date: [^\r]*", b"", data))
    assert heads[0] == heads[1]
    await lean.stop()
    await aio.stop()
    lean_records = sorted(r["status"] for r in lean.records())
    assert lean_records == sorted(r["status"] for r in aio.records())


async def test_pipelined_requests_are_answered_in_order(make_gateway: GatewayFactory) -> None:
    """Inference, health, metrics (aiohttp) and a bad request in one write: the answers come
    back in request order, and a slow answer holds the later ones back, never overtaken."""
    gw = await make_gateway({**ROUTES, "slow": {"champion": {"model": "fraud_sleepy"}}},
                            triton={"timeout_ms": 10_000})
    raw = b"".join([
        post("/v2/models/slow/infer", body("p0")),
        post("/v2/models/fraud/infer", body("p1")),
        get("/metrics"),
        post("/v2/models/fraud/infer", b"{bad"),
        get("/v2/health/live"),
        get("/v2/models/fraud"),
        post("/v2/models/fraud/infer", body("p6", rows=3)),
    ])
    answers, closed = await exchange(gw.url, raw, 7)
    assert [a.status for a in answers] == [200, 200, 200, 400, 200, 200, 200]
    assert answers[0].headers["x-request-id"] == "p0"
    assert answers[1].headers["x-request-id"] == "p1"
    assert b"understudy_requests_total" in answers[2].body
    assert "malformed JSON" in orjson.loads(answers[3].body)["error"]
    assert orjson.loads(answers[5].body)["name"] == "fraud"
    assert len(orjson.loads(answers[6].body)["outputs"][0]["data"]) == 3
    assert not closed
    # The same requests split at awkward places (mid-head, mid-body) parse the same.
    cuts = [0, 7, 60, 61, 200, 333, 500, len(raw) - 1, len(raw)]
    pieces = [raw[a:b] for a, b in itertools.pairwise(cuts)]
    answers, _ = await exchange(gw.url, b"", 7, chunks=pieces)
    assert [a.status for a in answers] == [200, 200, 200, 400, 200, 200, 200]


async def test_limits_413_414_431(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(ROUTES, listen={"max_body_bytes": 4096})
    # 413: the body is read and dropped; the connection serves the next request.
    answers, closed = await exchange(
        gw.url, post("/v2/models/fraud/infer", body(rows=200)) + get("/v2/health/live"), 2)
    assert [a.status for a in answers] == [413, 200] and not closed
    assert "4096" in orjson.loads(answers[0].body)["error"]
    chunked = (b"POST /v2/models/fraud/infer HTTP/1.1\r\nHost: x\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b" " * 1024 + b"\r\n") * 1
    chunked += (b"400\r\n" + b" " * 1024 + b"\r\n") * 4 + b"0\r\n\r\n"
    answers, closed = await exchange(gw.url, chunked + get("/v2/health/live"), 2)
    assert [a.status for a in answers] == [413, 200] and not closed
    # 431 and 414: answered as JSON errors, then the connection closes.
    answers, closed = await exchange(
        gw.url, post("/v2/models/fraud/infer", body(), b"X-Big: " + b"a" * 9000 + b"\r\n"), 1)
    assert answers[0].status == 431 and closed
    assert "longer than 8190" in orjson.loads(answers[0].body)["error"]
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
    answers, closed = await exchange(gw.url, post("/v2/models/fraud/infer", body(), many), 1)
    assert answers[0].status == 431 and closed
    answers, closed = await exchange(gw.url, get("/v2/health/live?" + "q" * 9000), 1)
    assert answers[0].status == 414 and closed
    # Answers already queued before the refused request still go out first, in order.
    answers, closed = await exchange(
        gw.url, post("/v2/models/fraud/infer", body("before"))
        + get("/x", b"X-Big: " + b"a" * 9000 + b"\r\n"), 2)
    assert [a.status for a in answers] == [200, 431] and closed
    assert answers[0].headers["x-request-id"] == "before"
    # Malformed HTTP: aiohttp's plain-text 400, then close.
    malformed = (b"POST /v2/models/fraud/infer HTTP/1.1\r\n"
                 b"X-Request-Id: a\x01b\r\nContent-Length: 2\r\n\r\n{}")
    answers, closed = await exchange(gw.url, malformed, 1)
    assert answers[0].status == 400 and closed
    assert b"Invalid header value char" in answers[0].body
    resp = await gw.post_json("/v2/models/fraud/infer", fraud_body([ROW], "still-serving"))
    assert resp.status == 200


async def test_shutdown_drains_requests_in_flight(make_gateway: GatewayFactory) -> None:
    """Stopping (what SIGTERM does) while a slow champion call is in flight and a body is
    still arriving: both are answered, then the connections close, and both are logged."""
    gw = await make_gateway({"slow": {"champion": {"model": "fraud_sleepy"}}},
                            triton={"timeout_ms": 10_000})
    pending = asyncio.ensure_future(exchange(
        gw.url, post("/v2/models/slow/infer", body("drained")) + get("/v2/health/live"), 2))
    idle = asyncio.ensure_future(exchange(gw.url, b"", 1))  # an idle keep-alive connection
    # A request whose body is still arriving when the stop begins is read to its end and served.
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    uploading = post("/v2/models/slow/infer", body("uploading"))
    writer.write(uploading[:-20])
    await asyncio.sleep(0.5)  # all connected; the slow call is in flight
    stopping = asyncio.ensure_future(gw.stop())
    await asyncio.sleep(0.3)
    writer.write(uploading[-20:])
    parsed = _Reader()
    while not parsed.answers:
        data = await asyncio.wait_for(reader.read(65536), 30)
        assert data, "closed before answering the request being uploaded"
        parsed.parser.feed_data(data)
    assert parsed.answers[0].status == 200
    assert parsed.answers[0].headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 30) == b""
    writer.close()
    await stopping
    answers, closed = await pending
    assert [a.status for a in answers] == [200, 200]
    assert answers[0].headers["x-request-id"] == "drained" and closed
    idle_answers, idle_closed = await idle
    assert idle_answers == [] and idle_closed
    assert sorted(r["request_id"] for r in gw.records()) == ["drained", "uploading"]


async def _primed(gw: GatewayHandle, *routes: str) -> LeanServer:
    """Cache the routes' champion signatures (as a first request does), so requests take the
    callback path; returns the site's lean server, to watch requests in flight."""
    table = gw.app[ROUTE_TABLE]
    for route in routes:
        await table.champion_inputs(table.get(route))
    site = gw.server.site
    assert isinstance(site, LeanSite) and site._lean is not None
    return site._lean


async def test_callback_path_answers_in_order_when_completions_are_out_of_order(
    make_gateway: GatewayFactory,
) -> None:
    """Pipelined: a slow champion call, then a fast one. The fast call completes (and is
    logged) first, from its completion callback with no Task; its answer still waits for the
    slow one's, and both go out in request order on the kept-alive connection."""
    gw = await make_gateway({**ROUTES, "slow": {"champion": {"model": "fraud_sleepy"}}},
                            triton={"timeout_ms": 10_000})
    lean = await _primed(gw, "fraud", "slow")
    raw = post("/v2/models/slow/infer", body("late")) + post("/v2/models/fraud/infer",
                                                              body("early"))
    pending = asyncio.ensure_future(exchange(gw.url, raw, 2))
    await asyncio.sleep(0.5)
    assert (lean.pending, len(lean.inflight)) == (1, 0)  # the fast one is done, no Task
    answers, closed = await pending
    assert [a.headers["x-request-id"] for a in answers] == ["late", "early"]
    assert [a.status for a in answers] == [200, 200] and not closed
    assert answers[0].headers["x-served-model"] == "fraud_sleepy"
    await gw.stop()
    assert [r["request_id"] for r in gw.records()] == ["early", "late"]  # completion order


async def test_drain_waits_for_callback_requests(make_gateway: GatewayFactory) -> None:
    """SIGTERM's drain while a callback-driven request (no Task to wait for) is in flight: it
    is answered and logged before the gateway stops."""
    gw = await make_gateway({"slow": {"champion": {"model": "fraud_sleepy"}}},
                            triton={"timeout_ms": 10_000})
    lean = await _primed(gw, "slow")
    pending = asyncio.ensure_future(exchange(
        gw.url, post("/v2/models/slow/infer", body("cb-drained")), 1))
    await asyncio.sleep(0.3)
    assert (lean.pending, len(lean.inflight)) == (1, 0)
    await gw.stop()
    answers, closed = await pending
    assert [a.status for a in answers] == [200] and closed
    assert lean.pending == 0
    assert [r["request_id"] for r in gw.records()] == ["cb-drained"]


async def test_callback_timeout_is_a_504_and_logged(make_gateway: GatewayFactory) -> None:
    """A champion slower than triton.timeout_ms on the callback path: the timer answers 504
    with the usual body and headers, the connection to Triton is aborted (never reused), the
    client's connection stays usable, and the failure is logged as a timeout."""
    gw = await make_gateway({"slow": {"champion": {"model": "fraud_sleepy"}}, **ROUTES},
                            triton={"timeout_ms": 300})
    await _primed(gw, "slow", "fraud")
    raw = post("/v2/models/slow/infer", body("too-slow")) + post("/v2/models/fraud/infer",
                                                                  body("after"))
    answers, closed = await exchange(gw.url, raw, 2)
    assert [a.status for a in answers] == [504, 200] and not closed
    assert "did not answer within 300 ms" in orjson.loads(answers[0].body)["error"]
    assert answers[0].headers["x-request-id"] == "too-slow"
    assert answers[0].headers["x-served-model"] == "fraud_sleepy"
    assert gw.app[UPSTREAM].pool("fraud_sleepy").idle == 0  # aborted, not kept alive
    await gw.stop()
    status = {r["request_id"]: (r["status"], r["outputs"]["fraud_sleepy"]["status"])
              for r in gw.records() if r["request_id"] == "too-slow"}
    assert status == {"too-slow": (504, "timeout")}
