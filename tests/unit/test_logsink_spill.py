"""Unit tests for the Kafka sink's local spill buffer (no broker needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from gateway.backends.spill import (
    SEGMENT_SUFFIX,
    SpillBuffer,
    SpillLockedError,
    SpillRecord,
    framed_size,
    is_placeholder,
)


def recs(n: int, start: int = 0, size: int = 100) -> list[SpillRecord]:
    return [SpillRecord("inferences", f"req-{i}", b"v%06d" % i + b"x" * size)
            for i in range(start, start + n)]


def drain(spill: SpillBuffer, chunk: int = 7) -> list[SpillRecord]:
    out: list[SpillRecord] = []
    while True:
        batch = spill.peek(chunk, 1 << 20)
        if not batch.records:
            return out
        out.extend(r for r in batch.records if not is_placeholder(r))
        spill.commit(batch)


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{SEGMENT_SUFFIX}"))


@pytest.fixture
def spill(tmp_path: Path):
    buf = SpillBuffer(tmp_path / "spill", 10 << 20, segment_bytes=4096)
    buf.open()
    yield buf
    buf.close()


def test_round_trip_in_order_across_segments_and_deletes_them(spill: SpillBuffer) -> None:
    records = recs(200)
    assert spill.append(records) == 200
    assert spill.append(recs(50, start=200)) == 50
    assert len(segments(spill.directory)) >= 2  # rotated by size
    assert spill.pending_bytes == sum(framed_size(r) for r in recs(250))
    assert drain(spill) == recs(250)
    assert spill.pending_bytes == 0
    assert spill.is_empty()
    assert segments(spill.directory) == []  # delivered segments are deleted


def test_peek_does_not_consume_and_partial_commit_keeps_the_rest(spill: SpillBuffer) -> None:
    spill.append(recs(10))
    batch = spill.peek(4, 1 << 20)
    assert batch.records == recs(4)
    assert spill.peek(4, 1 << 20).records == recs(4)
    spill.commit(batch, 2)
    assert spill.peek(100, 1 << 20).records == recs(8, start=2)


def test_survives_reopen_with_cursor(tmp_path: Path) -> None:
    directory = tmp_path / "spill"
    first = SpillBuffer(directory, 1 << 20, segment_bytes=2048)
    first.open()
    first.append(recs(30))
    batch = first.peek(10, 1 << 20)
    first.commit(batch)
    first.close()

    second = SpillBuffer(directory, 1 << 20, segment_bytes=2048)
    second.open()
    second.append(recs(5, start=30))  # a new run appends after the leftovers
    assert drain(second) == recs(25, start=10)
    second.close()


def test_torn_tail_is_skipped_and_later_appends_still_read(tmp_path: Path) -> None:
    directory = tmp_path / "spill"
    first = SpillBuffer(directory, 1 << 20)
    first.open()
    first.append(recs(5))
    first.close()
    (segment,) = segments(directory)
    data = segment.read_bytes()
    segment.write_bytes(data[:-30])  # crash mid-write: last frame torn

    second = SpillBuffer(directory, 1 << 20)
    second.open()
    second.append(recs(3, start=100))
    assert drain(second) == recs(4) + recs(3, start=100)
    second.close()


def test_corrupted_frame_skips_rest_of_its_segment(tmp_path: Path) -> None:
    directory = tmp_path / "spill"
    first = SpillBuffer(directory, 1 << 20)
    first.open()
    first.append(recs(5))
    first.close()
    (segment,) = segments(directory)
    data = bytearray(segment.read_bytes())
    data[framed_size(recs(1)[0]) + 20] ^= 0xFF  # flip a byte inside the second frame's body
    segment.write_bytes(bytes(data))

    second = SpillBuffer(directory, 1 << 20)
    second.open()
    assert drain(second) == recs(1)
    assert second.pending_bytes == 0
    second.close()


def test_budget_takes_the_prefix_that_fits_and_flags_full(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    one = framed_size(recs(1)[0])
    spill = SpillBuffer(tmp_path / "spill", budget_bytes=10 * one)
    spill.open()
    try:
        assert spill.append(recs(4)) == 4
        assert not spill.full
        assert spill.append(recs(10, start=4)) == 6
        assert spill.full
        assert REGISTRY.get_sample_value("understudy_log_spill_full") == 1
        assert "spill buffer FULL" in caplog.text
        assert spill.append(recs(1, start=99)) == 0
        assert spill.disk_bytes <= 10 * one

        batch = spill.peek(10, 1 << 20)
        assert batch.records == recs(10)
        spill.commit(batch)
        assert not spill.full
        assert REGISTRY.get_sample_value("understudy_log_spill_full") == 0
        assert spill.append(recs(3, start=20)) == 3
    finally:
        spill.close()


def test_one_owner_per_directory(tmp_path: Path) -> None:
    first = SpillBuffer(tmp_path / "spill", 1 << 20)
    first.open()
    second = SpillBuffer(tmp_path / "spill", 1 << 20)
    with pytest.raises(SpillLockedError):
        second.open()
    first.close()
    second.open()  # released on close
    second.close()


def test_keys_values_and_streams_round_trip_exactly(spill: SpillBuffer) -> None:
    odd = [
        SpillRecord("labels", "ключ-✓", b""),
        SpillRecord("audit", "", b"\x00\n\xff" * 1000),
        SpillRecord("inferences", "k" * 300, b'{"a":1}'),
    ]
    spill.append(odd)
    assert drain(spill) == odd


def test_metric_tracks_pending_bytes(spill: SpillBuffer) -> None:
    spill.append(recs(3))
    assert REGISTRY.get_sample_value("understudy_log_spill_bytes") == spill.pending_bytes > 0
    drain(spill)
    assert REGISTRY.get_sample_value("understudy_log_spill_bytes") == 0


def test_appends_after_a_full_drain_are_replayed(tmp_path: Path) -> None:
    """Once replay had emptied the spill, the next append reused the drained segment's index
    while the cursor still pointed at its old end: the next outage's records were hidden
    (or read from mid-frame and skipped as damaged)."""
    buf = SpillBuffer(tmp_path / "spill", 10 << 20)
    buf.open()
    try:
        assert buf.append(recs(5, size=300)) == 5
        assert [r.key for r in drain(buf)] == [f"req-{i}" for i in range(5)]
        assert buf.append(recs(3, start=5, size=10)) == 3  # smaller than what was drained
        assert buf.pending_bytes > 0
        assert buf.append(recs(20, start=8, size=300)) == 20
        assert [r.key for r in drain(buf)] == [f"req-{i}" for i in range(5, 28)]
    finally:
        buf.close()


def test_discard_consumes_a_span_only_when_nothing_older_is_pending(spill: SpillBuffer) -> None:
    """The sink's copies of in-flight records: dropped unreplayed when Kafka acknowledged them,
    unless older records are still pending (then they stay and are delivered twice)."""
    written, span = spill.append_span(recs(4))
    assert written == 4
    assert span is not None
    assert spill.discard(span)
    assert spill.is_empty()
    assert spill.append(recs(2, start=10)) == 2  # pending before the next copies
    _, span = spill.append_span(recs(3, start=20))
    assert span is not None
    assert not spill.discard(span)
    assert [r.key for r in drain(spill)] == ["req-10", "req-11", "req-20", "req-21", "req-22"]
