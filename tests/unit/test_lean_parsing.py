"""The lean server's request parsing without sockets (gateway/rest/lean_server.py): the headers
the data plane sees, and the 431 limits however the head is split into reads.

The server measures header fields only when a read could hold one over the limit, so these
feed heads in pieces that are each small but together too long. The same limits through real
sockets and Triton: tests/integration/test_lean_server.py.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.rest.inference import CATALOG, MAX_BODY, SERVICE
from gateway.rest.lean_server import MAX_HEADERS, MAX_LINE, Headers, LeanProtocol, LeanServer


class _Transport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class _Service:
    """Takes every inference request and keeps its headers (the answer is not needed here)."""

    def __init__(self) -> None:
        self.headers: list[Any] = []

    def start(self, route: str, body: bytes, headers: Any, done: Any) -> bool:
        self.headers.append(headers)
        return True


def _connection() -> tuple[LeanProtocol, _Transport, _Service]:
    service = _Service()
    server = LeanServer({SERVICE: service, CATALOG: None, MAX_BODY: 1 << 20},  # type: ignore[arg-type]
                        None)  # type: ignore[arg-type]
    conn = server()
    transport = _Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport, service


def _request(headers: bytes, body: bytes = b"{}") -> bytes:
    return (b"POST /v2/models/r/infer HTTP/1.1\r\nContent-Length: %d\r\n%s\r\n%s"
            % (len(body), headers, body))


def _feed(conn: LeanProtocol, raw: bytes, piece: int) -> None:
    for start in range(0, len(raw), piece):
        conn.data_received(raw[start:start + piece])


def test_headers_are_case_insensitive_first_wins_and_decoded_as_aiohttp_does() -> None:
    conn, _, service = _connection()
    conn.data_received(_request(b"X-Request-Id: first\r\nx-request-id: second\r\n"
                                b"X-User: caf\xc3\xa9 \xff\r\n"))
    (headers,) = service.headers
    assert headers.get("X-REQUEST-ID") == headers["x-request-id"] == "first"
    assert headers.get("x-user") == "caf\u00e9 \udcff"  # bad UTF-8 as lone surrogates
    assert headers.get("Missing") is None and headers.get("Missing", "d") == "d"
    assert headers.get("X-Request-Id\u20ac") is None  # not a header name, and no error
    assert sorted(headers) == ["content-length", "x-request-id", "x-user"]
    assert len(headers) == 3 and "X-User" in headers
    with pytest.raises(KeyError):
        headers["nope"]


def test_a_long_header_field_is_refused_however_the_head_is_split() -> None:
    field = b"X-Big: " + b"a" * (MAX_LINE + 10) + b"\r\n"
    for piece in (100, 4000, MAX_LINE, 20000):
        conn, transport, service = _connection()
        _feed(conn, _request(field), piece)
        assert transport.written.startswith(b"HTTP/1.1 431 "), piece
        error = orjson.loads(transport.written.split(b"\r\n\r\n", 1)[1])["error"]
        assert error == f"header field 'X-Big' is longer than {MAX_LINE} bytes"
        assert transport.closed and not service.headers


def test_a_field_at_the_limit_passes_in_any_split() -> None:
    field = b"X-Big: " + b"a" * (MAX_LINE - len("X-Big")) + b"\r\n"
    for piece in (100, 4000, 20000):
        conn, transport, service = _connection()
        _feed(conn, _request(field), piece)
        assert not transport.written and len(service.headers) == 1, piece


def test_too_many_header_fields_in_small_reads() -> None:
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADERS + 5))
    conn, transport, _ = _connection()
    _feed(conn, _request(many), 50)
    error = orjson.loads(transport.written.split(b"\r\n\r\n", 1)[1])["error"]
    assert error == f"more than {MAX_HEADERS} header fields"


def test_headers_mapping_on_raw_names() -> None:
    headers = Headers({b"inference-header-content-length": b"12"})
    assert headers.get("Inference-Header-Content-Length") == "12"
    assert dict(headers) == {"inference-header-content-length": "12"}
