"""Shadow dispatch: send copies of a request to challengers without the client ever waiting.

Each (route, challenger) has a `ShadowLane` with a concurrency limit and a bounded queue. A copy
that finds the lane full is shed at once (status "shed", counted) instead of queueing without
bound; a copy that takes longer than the challenger's timeout (queue wait included) is cancelled
and logged as "timeout". So memory and pending tasks stay bounded however slow or dead a
challenger is, and since every challenger has its own connection pool, it cannot take
connections from the champion.

Micro-batching (`batch_max_rows` > 1, and the model's Triton config has `max_batch_size` > 0):
admitted copies queue in the lane and go up to `batch_max_rows` compatible rows per Triton
request (gateway/mirror/batching.py), at most `batch_max_wait_ms` after the oldest queued copy;
each batch is one of the `max_concurrency` calls. Batches are formed by callbacks, not by a
batcher task: at moderate rates a window opens every few copies, and a Task with its steps and
a Future per window were a large share of each copy's cost. A queued copy sets one lane timer
for its window's end, a copy that fills a batch sends it at once, and with every slot busy the
queued copies wait as one of the slots' waiters (no Task either) and go, with the copies that
joined meanwhile, when a slot is handed over to them. Every copy keeps its own
deadline, so it resolves within the lane's timeout whatever its batch does: one timer per lane
(copies share the lane's timeout, so deadlines come in admission order) fires at the oldest
live copy's deadline. A batch that Triton rejects is re-sent copy by copy, so one bad row never
fails the others.

Per-copy cost is kept low on purpose (every request pays it): a copy is one object, the future
its owner holds (`ShadowCopy`); the recorder hears of it through `listener` when the lane
resolves it, not through a done-callback scheduled on the loop; skipped and shed copies share
one resolved future per lane; outcomes are counted per batch; a copy that goes alone (a latency
probe, a lane that does not batch) and finds a free slot is called at once, like a batch, on the
lane's deadline timer: no Task (only a copy that must wait for a slot runs as one).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass
from functools import partial
from typing import Any

from gateway import metrics
from gateway.dataplane.protocol import InferRequest, decode_response
from gateway.errors import GatewayError, UpstreamTimeout
from gateway.mirror.batching import batch_signature, combine, split_outputs
from gateway.upstream.callback import DeadlineWatch
from gateway.upstream.client import TritonUpstream, UpstreamResponse
from understudy.records import Tensor

log = logging.getLogger(__name__)

# After a failed config fetch, copies go singly and the next copy retries after this long.
CONFIG_RETRY_S = 30.0
# Slow-lane isolation. A lane whose calls take SLOW_CALL_S or more, and SLOW_VS_SERVED times the
# route's served calls or more (smoothed service times: under machine load both grow, so a normal
# lane does not turn "slow"), batches at most SLOW_LANE_ROWS rows per call: each answer then
# resolves a few copies, not a burst that holds the event loop while champion requests wait
# behind it; a slow challenger gets fewer copies (the rest are shed, as when a lane is full)
# instead of delaying the champion. A batch answer's copies are resolved RESOLVE_SLICE per loop
# iteration.
# 40 ms: 20 batching windows of the 2 ms default this was measured with (BENCHMARKS.md); an
# absolute time, so that a longer window (the default is now 10 ms) does not hide a slow lane.
SLOW_CALL_S = 0.040
SLOW_VS_SERVED = 20
SLOW_LANE_ROWS = 4
RESOLVE_SLICE = 4
_CALL_EWMA = 0.2  # weight of the newest call in the smoothed service time
# A batching window has ended when the loop's time is this close to its end. Loop times are
# floats (uvloop's are whole milliseconds): when the window's timer fires, `enqueued +
# batch_wait_s` can still exceed the loop's time by a rounding error, and the timer would be set
# again with no delay, over and over until the next millisecond.
_WINDOW_ROUNDING_S = 1e-6


class CallTime:
    """A smoothed call service time in seconds (0.0 until the first call)."""

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds = 0.0

    def note(self, seconds: float) -> None:
        self.seconds = seconds if not self.seconds else (
            self.seconds + _CALL_EWMA * (seconds - self.seconds))


@dataclass(slots=True)
class ShadowResult:
    """What one model did with one request (served call or shadow copy)."""

    status: str  # ok | error | timeout | shed | skipped
    # The upstream call's service time (UpstreamResponse.latency_s); for error/timeout the time
    # since the call started. Never the lane's queueing.
    latency_s: float | None = None
    response: UpstreamResponse | None = None
    error: str | None = None
    # A batched copy's own outputs, split from the batch answer (then `response` is None).
    outputs: dict[str, Tensor] | None = None
    batch_rows: int | None = None  # rows of the Triton call that carried this copy
    model_version: str | None = None  # Triton's model_version from that call, with `outputs`


class ShadowCopy(asyncio.Future[ShadowResult]):
    """An admitted copy: the future its owner holds and the lane's bookkeeping in one object.

    `listener`, when set (the recorder sets it), is called synchronously once the lane has
    resolved the copy, instead of a done-callback the loop would schedule per copy. A copy
    cancelled by its owner is still resolved by the lane (queued: dropped as shed; in a call:
    when the call ends or its deadline comes), so the listener always runs.
    """

    __slots__ = ("called", "deadline", "ended", "enqueued", "key", "listener", "mode",
                 "request", "rows")

    def __init__(self, loop: asyncio.AbstractEventLoop, request: InferRequest, mode: str,
                 key: Hashable, rows: int, timeout_s: float) -> None:
        super().__init__(loop=loop)
        self.request = request
        self.mode = mode
        self.key = key
        self.rows = rows
        self.enqueued = now = loop.time()  # loop time
        self.deadline = now + timeout_s  # loop time
        self.called: float | None = None  # perf_counter when its call started; None: queued
        self.ended = False  # resolved by the lane
        self.listener: Callable[[], None] | None = None


class _Slots(asyncio.Semaphore):
    """A lane's `max_concurrency` call slots. A copy that goes alone takes a free one at once
    (`take_now`), so its call needs no Task, timeout context or Future (a probe, or every copy
    of a lane that does not batch); only a copy that must wait for a slot runs as a Task. The
    queued batch waits for one with `take_later`, no Task either."""

    def take_now(self) -> bool:
        """Take a slot exactly as `acquire` does when it need not wait; False if it would."""
        if self.locked():
            return False
        self._value -= 1
        return True

    def take_later(self, loop: asyncio.AbstractEventLoop, granted: Callable[[], None]) -> None:
        """Wait for a slot as `acquire` does, as a Future with a callback instead of a Task:
        `granted()` runs holding the slot. The semaphore hands slots to its waiters in order
        on every release (a call's end, a `_single` Task's exit, a waiter giving up), so this
        waiter and the Tasks in `acquire` are served alike and no freed slot goes unseen."""
        waiter = loop.create_future()
        if self._waiters is None:
            self._waiters = deque()
        self._waiters.append(waiter)
        waiter.add_done_callback(partial(self._handed, granted))

    def _handed(self, granted: Callable[[], None], waiter: asyncio.Future[Any]) -> None:
        """`take_later`'s slot was handed over: what `acquire` does after its wait, then
        `granted`."""
        assert self._waiters is not None
        self._waiters.remove(waiter)
        if self._value > 0:  # waiters that queued behind this one while a slot was free
            self._wake_up_next()
        granted()


class ShadowLane:
    """Admission control and dispatch for one challenger of one route."""

    def __init__(
        self,
        upstream: TritonUpstream,
        route: str,
        model: str,
        version: str,
        *,
        max_concurrency: int,
        max_queue: int,
        timeout_ms: int,
        role: str = "challenger",
        batch_max_rows: int = 1,
        batch_max_wait_ms: float = 0.0,
        latency_probe_every: int = 0,
        served: CallTime | None = None,
    ) -> None:
        self.upstream = upstream
        self.role = role
        self.route = route
        self.model = model
        self.version = version
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        # Copies admitted at once (running or queued): beyond this a copy is shed. A call carries
        # up to `batch_limit` copies once batching is on, so the in-flight part grows with it.
        self.capacity = max_concurrency + max_queue
        self.timeout_s = timeout_ms / 1000
        self.pool_name = f"shadow:{route}:{model}"
        self.batch_max_rows = batch_max_rows
        self.batch_wait_s = batch_max_wait_ms / 1000
        self.latency_probe_every = latency_probe_every
        self._batchable_copies = 0
        # Slow-lane isolation: this lane's smoothed call time, and the route's served calls'.
        self.calls = CallTime()
        self.served = served or CallTime()
        self._slots = _Slots(max_concurrency)
        self._admitted = 0
        upstream.pool(self.pool_name, limit=max_concurrency, model=model)
        metrics.SHADOW_INFLIGHT.labels(route, model).track(self)  # reads `_admitted`
        self._counters = {
            outcome: metrics.SHADOW_COPIES.labels(route, model, outcome)
            for outcome in ("sent", "ok", "error", "timeout", "shed", "skipped")
        }
        self._latency: dict[str, metrics.BatchedHistogram] = {}  # per mode
        self._resolved: dict[str, asyncio.Future[ShadowResult]] = {}  # skipped / shed
        self._batch_rows = metrics.SHADOW_BATCH_ROWS.labels(route, model)
        # Batching state: the model's max_batch_size (None until Triton's config is known),
        # and the rows per call it allows (0: no batching), set with it.
        self._max_batch_size: int | None = None
        self._call_rows = 0
        # The loop the lane runs on, looked up once (`get_running_loop` costs a getpid syscall
        # per call); a lane is bound to one loop anyway (its semaphore is).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._config_fetch: asyncio.Task[None] | None = None
        self._config_retry_at = 0.0
        self._queue: deque[ShadowCopy] = deque()
        self._queued_rows: dict[Hashable, int] = {}  # rows waiting per compatibility key
        # The batching window's end (`_window_end`), set while copies wait for it; and whether
        # queued copies wait for a call slot instead (`_slot_granted`). Neither: none queued.
        self._window: asyncio.TimerHandle | None = None
        self._awaiting_slot = False
        self._calls: set[asyncio.Task[None]] = set()
        # Copies on the lane's deadline timer (batched, or sent alone at once).
        self._deadlines: DeadlineWatch[ShadowCopy] = DeadlineWatch(self._expire)

    @property
    def admitted(self) -> int:
        return self._admitted

    def gauge_value(self) -> float:
        """Copies admitted and not finished: `understudy_shadow_inflight`, read at scrape."""
        return self._admitted

    def submit(self, request: InferRequest, mode: str) -> asyncio.Future[ShadowResult]:
        """Start a copy now; the returned future always resolves within the lane's timeout."""
        if self._admitted >= self.capacity:
            self._counters["shed"].inc()
            return self._done(_SHED_FULL)
        self._admitted += 1
        self._counters["sent"].inc()
        loop = self._loop or self._bind_loop()
        limit = self.batch_limit
        if limit:
            # Every Nth batchable copy goes alone (a latency probe): its latency is comparable
            # with a single served request.
            self._batchable_copies += 1
            probe_every = self.latency_probe_every
            if not probe_every or self._batchable_copies % probe_every:
                signature = batch_signature(request)
                # A copy that fills a batch by itself (or cannot be stacked) goes alone.
                if signature is not None and signature[1] < limit:
                    return self._enqueue(loop, request, mode, signature[0], signature[1], limit)
        elif self.batch_max_rows > 1 and self._max_batch_size is None:
            self._ensure_config()
        copy = ShadowCopy(loop, request, mode, None, 1, self.timeout_s)
        if self._slots.take_now():
            self._deadlines.watch(loop, copy)  # resolved at its deadline whatever its call does
            self._send([copy], 1, alone=True)
        else:
            self._spawn(self._single(copy))
        return copy

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    def _done(self, result: ShadowResult) -> asyncio.Future[ShadowResult]:
        """The lane's one resolved future for `result` (skipped, or shed at admission): its
        holders only read it, so one per lane replaces a future per copy. Re-made if the loop
        changed."""
        loop = asyncio.get_running_loop()
        done = self._resolved.get(result.status)
        if done is None or done.get_loop() is not loop:
            done = self._resolved[result.status] = loop.create_future()
            done.set_result(result)
        return done

    def _count(self, result: ShadowResult, mode: str) -> None:
        self._counters[result.status].inc()
        # A copy that shared its call (split `outputs`) carries the whole batch's time: left out,
        # as the evaluator leaves it out, so the histogram and the report agree.
        if result.latency_s is not None and result.outputs is None:
            histogram = self._latency.get(mode)
            if histogram is None:
                histogram = self._latency[mode] = metrics.child(
                    metrics.MODEL_LATENCY, self.route, self.model, self.role, mode)
            histogram.observe(result.latency_s)

    # -- micro-batching -------------------------------------------------------------------

    @property
    def batch_limit(self) -> int:
        """Rows per Triton call; 0 while batching is off (disabled, config unknown, or the
        model has no batch dimension). Read for every copy: only `slow` can change between
        config fetches, and it matters only above SLOW_LANE_ROWS."""
        limit = self._call_rows
        if limit > SLOW_LANE_ROWS and self.slow:
            return SLOW_LANE_ROWS
        return limit

    @property
    def slow(self) -> bool:
        """Calls take SLOW_CALL_S or more, and far longer than the route's served calls."""
        mine = self.calls.seconds
        return mine > SLOW_CALL_S and mine > SLOW_VS_SERVED * self.served.seconds

    def _note_call(self, seconds: float) -> None:
        """Smooth the lane's call time; entering or leaving "slow" resizes its admission."""
        was_slow = self.slow
        self.calls.note(seconds)
        if self.slow != was_slow and self._max_batch_size:
            self.capacity = self.max_concurrency * max(self.batch_limit, 1) + self.max_queue

    async def load_batching_config(self) -> int:
        """Fetch the model's max_batch_size now (normally fetched lazily by the first copy);
        returns `batch_limit`. Lets start-up code and tests wait until batching is on."""
        if self.batch_max_rows > 1 and self._max_batch_size is None:
            self._ensure_config(force=True)
            if self._config_fetch is not None:
                await asyncio.shield(self._config_fetch)
        return self.batch_limit

    def _ensure_config(self, *, force: bool = False) -> None:
        """Start one background config fetch unless one runs or a failure is too recent."""
        loop = asyncio.get_running_loop()
        if self._config_fetch is None and (force or loop.time() >= self._config_retry_at):
            self._config_fetch = asyncio.create_task(self._fetch_config())

    async def _fetch_config(self) -> None:
        try:
            config = await self.upstream.model_config(self.model, self.version)
            size = config.get("max_batch_size", 0)
            self._max_batch_size = size if isinstance(size, int) and size > 0 else 0
            rows = min(self.batch_max_rows, self._max_batch_size)
            self._call_rows = rows if rows > 1 else 0
            self.capacity = self.max_concurrency * max(self.batch_limit, 1) + self.max_queue
        except Exception as exc:  # copies simply keep going singly
            log.warning("lane %s/%s: no model config, shadow copies not batched: %s",
                        self.route, self.model, exc)
            self._config_retry_at = asyncio.get_running_loop().time() + CONFIG_RETRY_S
        finally:
            self._config_fetch = None

    def _enqueue(self, loop: asyncio.AbstractEventLoop, request: InferRequest, mode: str,
                 key: Hashable, rows: int, limit: int) -> ShadowCopy:
        copy = ShadowCopy(loop, request, mode, key, rows, self.timeout_s)
        # Resolved at its deadline (`_expire`) whatever its batch does. Copies share the lane's
        # timeout: deadlines come in admission order, one timer serves them all.
        self._deadlines.watch(loop, copy)
        self._queue.append(copy)
        queued = self._queued_rows[key] = self._queued_rows.get(key, 0) + rows
        if queued >= limit:
            self._pump()  # a full batch: no need to wait for the window's end
        elif self._window is None and not self._awaiting_slot:
            # The first copy queued: its window starts (even with no wait, the copies submitted
            # in this loop iteration still join).
            self._window = loop.call_at(copy.enqueued + self.batch_wait_s, self._window_end)
        return copy

    def _unqueue_rows(self, key: Hashable, rows: int) -> None:
        left = self._queued_rows[key] - rows
        if left > 0:
            self._queued_rows[key] = left
        else:
            del self._queued_rows[key]

    def _window_end(self) -> None:
        self._window = None
        self._pump()

    def _pump(self) -> None:
        """Send every batch that is due (its oldest copy's window ended, or a key has a full
        batch) while a call slot is free; then wait for the next window's end, or for a slot
        (`take_later`: copies queued meanwhile keep joining), or, with nothing queued, for
        nothing: an idle lane holds no timer. The window's timer may fire early (its oldest
        copy went, or expired): it then looks again and sets the next one."""
        if self._awaiting_slot:
            return  # the next slot freed goes to `_slot_granted`
        loop = self._loop or self._bind_loop()
        while self._queue:  # `_take` replaces the deque: read it anew each time
            limit = self.batch_limit
            due = self._queue[0].enqueued + self.batch_wait_s
            if (due > loop.time() + _WINDOW_ROUNDING_S
                    and max(self._queued_rows.values(), default=0) < limit):
                if self._window is None:
                    self._window = loop.call_at(due, self._window_end)
                return
            if not self._slots.take_now():
                self._awaiting_slot = True
                self._slots.take_later(loop, self._slot_granted)
                break
            self._send_next(limit)
        if self._window is not None:  # nothing left to wait for before the next copy
            self._window.cancel()
            self._window = None

    def _slot_granted(self) -> None:
        """A slot was handed over to the queued copies: the oldest and those that joined it
        go now (the window ended before the wait), then the rest are seen to."""
        self._awaiting_slot = False
        self._send_next(self.batch_limit)
        self._pump()

    def _send_next(self, limit: int) -> None:
        """Send the next batch on the slot the caller took for it."""
        batch, rows = self._take(limit)
        if batch:
            self._send(batch, rows)
        else:  # every queued copy was cancelled or expired meanwhile
            self._slots.release()

    def _take(self, limit: int) -> tuple[list[ShadowCopy], int]:
        """The oldest live copy plus every later compatible one that fits, in queue order,
        and their rows."""
        batch: list[ShadowCopy] = []
        rows = 0
        kept: deque[ShadowCopy] = deque()
        now = time.perf_counter()
        while self._queue and rows < limit:
            copy = self._queue.popleft()
            if copy.done():  # cancelled by its owner: nothing to send
                self._unqueue_rows(copy.key, copy.rows)
                self._resolve(copy, ShadowResult("shed", error="copy cancelled while queued"))
            elif not batch or (copy.key == batch[0].key and rows + copy.rows <= limit):
                copy.called = now
                batch.append(copy)
                rows += copy.rows
            else:
                kept.append(copy)
        if batch:  # one key: its queued rows go down once for the whole batch
            self._unqueue_rows(batch[0].key, rows)
        kept.extend(self._queue)
        self._queue = kept
        return batch, rows

    def _send(self, batch: list[ShadowCopy], rows: int, *, alone: bool = False) -> None:
        """One Triton call for the batch (its slot is held on entry and released when the call
        ends). Callback-driven, like the served call: no Task and no Future per batch, which
        every copy of a busy lane would otherwise share the cost of. `alone`: a copy that was
        never batched (a probe, or a lane that does not batch), sent as `_single` would send it:
        no rows counted in understudy_shadow_batch_rows, no `batch_rows` in its result."""
        called = time.perf_counter()
        try:
            if len(batch) == 1:
                request = batch[0].request
                body, content_type, header_length = (
                    request.body, request.content_type, request.header_length
                )
            else:
                combined = combine([c.request for c in batch],
                                   signatures=[(c.key, c.rows) for c in batch])
                body, content_type, header_length = (
                    combined.body, combined.content_type, combined.header_length
                )
            if not alone:
                self._batch_rows.observe(rows)
            called = time.perf_counter()
            for copy in batch:
                copy.called = called
            # Copies queue in admission order and share the lane's timeout: the last one's
            # deadline is the batch's latest.
            loop = self._loop or self._bind_loop()
            timeout_s = max(batch[-1].deadline - loop.time(), 0.001)
            self.upstream.infer_cb(
                self.model, self.version, body, content_type, header_length,
                lambda outcome: self._answered(batch, rows, alone, called, outcome),
                pool=self.pool_name, timeout_s=timeout_s,
            )
        except Exception as exc:  # the batch could not even be sent
            self._answered(batch, rows, alone, called, exc)

    def _answered(self, batch: list[ShadowCopy], rows: int, alone: bool, called: float,
                  outcome: UpstreamResponse | Exception) -> None:
        """A batch call's outcome: every copy resolved, or (a failed batch of several) the
        copies re-sent singly, so one bad row never fails the others."""
        self._slots.release()
        try:
            if isinstance(outcome, UpstreamResponse):
                self._note_call(outcome.latency_s)
                if len(batch) == 1:
                    self._resolve(batch[0], ShadowResult("ok", outcome.latency_s, outcome,
                                                         batch_rows=None if alone else rows))
                    return
                if self._deliver(batch, outcome, rows):
                    return
            elif isinstance(outcome, TimeoutError | UpstreamTimeout):
                self._note_call(time.perf_counter() - called)  # a lower bound: it is slow
                for copy in batch:
                    self._resolve(copy, self._timed_out(copy))
                return
            elif len(batch) == 1:
                message = outcome.message if isinstance(outcome, GatewayError) else repr(outcome)
                self._resolve(batch[0], ShadowResult("error", _since(batch[0].called, called),
                                                     error=message))
                return
            else:
                log.debug("lane %s/%s: batch of %d rows failed (%s); re-sending singly",
                          self.route, self.model, rows, outcome)
        except Exception:  # a bug here must not reach the connection that called back
            log.exception("lane %s/%s: batch answer handling failed", self.route, self.model)
            for copy in batch:
                self._resolve(copy, ShadowResult("error", error="batch answer handling failed"))
            return
        self._spawn(self._resend_singly(batch))

    async def _resend_singly(self, batch: list[ShadowCopy]) -> None:
        await asyncio.gather(*(self._single(c, from_batch=True) for c in batch
                               if not c.ended))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = (self._loop or self._bind_loop()).create_task(coro)
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    def _deliver(self, batch: list[ShadowCopy], resp: UpstreamResponse, rows: int) -> bool:
        """Hand every copy its rows of the batch answer; False if the answer cannot be split."""
        try:
            decoded = decode_response(resp.body, resp.header_length)
            parts = split_outputs(decoded["outputs"], [c.rows for c in batch])
        except Exception as exc:
            log.warning("lane %s/%s: batch answer not splittable (%s); re-sending singly",
                        self.route, self.model, exc)
            return False
        version = decoded.get("model_version")
        model_version = str(version) if version not in (None, "") else None
        latency_s = resp.latency_s
        results = [(copy, ShadowResult("ok", latency_s, outputs=outputs, batch_rows=rows,
                                       model_version=model_version))
                   for copy, outputs in zip(batch, parts, strict=True)]
        self._resolve_slices(results)
        return True

    def _resolve_slices(self, results: list[tuple[ShadowCopy, ShadowResult]]) -> None:
        """Resolve RESOLVE_SLICE copies now and the rest on later loop iterations, so a batch
        answer's records never arrive as one burst ahead of the champion requests waiting.
        Every result here is an "ok" split from a shared call: counted once per slice, and no
        latency observed (see `_count`)."""
        finished = 0
        for copy, result in results[:RESOLVE_SLICE]:
            finished += self._finish(copy, result)
        if finished:
            self._counters["ok"].inc(finished)
        if len(results) > RESOLVE_SLICE:
            loop = self._loop or self._bind_loop()
            loop.call_soon(self._resolve_slices, results[RESOLVE_SLICE:])

    async def _single(self, copy: ShadowCopy, *, from_batch: bool = False) -> None:
        """This copy alone, within its own deadline: a copy that goes alone but found every
        slot busy (with a free slot `_send` calls it at once), or the fallback after its batch
        failed (`from_batch`). Latency is the call's service time
        (request written -> answer read), so the latency guardrail never blames a challenger for
        the gateway's queueing; a copy whose time ran out while still queued is shed, not timed
        out.
        """
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            async with asyncio.timeout_at(copy.deadline):
                async with self._slots:
                    copy.called = time.perf_counter()
                    if from_batch:
                        self._batch_rows.observe(copy.rows)
                    resp = await self.upstream.infer(
                        self.model, self.version, copy.request.body, copy.request.content_type,
                        copy.request.header_length, pool=self.pool_name,
                        timeout_s=max(copy.deadline - loop.time(), 0.001),
                    )
            self._note_call(resp.latency_s)
            result = ShadowResult("ok", resp.latency_s, resp,
                                  batch_rows=copy.rows if from_batch else None)
        except (TimeoutError, UpstreamTimeout):
            if copy.called is not None:
                self._note_call(time.perf_counter() - copy.called)
            result = self._timed_out(copy)
        except GatewayError as exc:
            result = ShadowResult("error", _since(copy.called, started), error=exc.message)
        except Exception as exc:  # a shadow must never take the gateway down
            result = ShadowResult("error", _since(copy.called, started), error=repr(exc))
        except asyncio.CancelledError:  # shutdown: the record still gets this copy's line
            self._resolve(copy, ShadowResult("error",
                                             error="copy cancelled (gateway shutting down)"))
            raise
        self._resolve(copy, result)

    def _timed_out(self, copy: ShadowCopy) -> ShadowResult:
        if copy.called is None:
            return ShadowResult("shed", error=f"queued in the lane for the whole "
                                              f"{self.timeout_s * 1000:.0f} ms timeout")
        return ShadowResult("timeout", time.perf_counter() - copy.called,
                            error=f"no answer within {self.timeout_s * 1000:.0f} ms")

    def _expire(self, copy: ShadowCopy) -> None:
        """The copy's deadline: still queued → shed, in a call → timeout (the call may go on
        for the batch's other copies)."""
        if copy.ended:
            return
        if copy.called is None:
            self._queue.remove(copy)
            self._unqueue_rows(copy.key, copy.rows)
        self._resolve(copy, self._timed_out(copy))

    def _resolve(self, copy: ShadowCopy, result: ShadowResult) -> None:
        """Finish a copy exactly once and count it."""
        if self._finish(copy, result):
            self._count(result, copy.mode)

    def _finish(self, copy: ShadowCopy, result: ShadowResult) -> bool:
        """Release the copy's admission, answer it and tell its listener; False if it was
        already finished. The caller counts it (per copy, or per batch)."""
        if copy.ended:
            return False
        copy.ended = True
        self._admitted -= 1
        expiring = self._deadlines.items
        # Batches finish about in admission order: drop finished copies from the front now, so
        # they (and the answers they hold) are freed by refcount, not kept for the timer.
        while expiring and expiring[0].ended:
            expiring.popleft()
        if not copy.done():
            copy.set_result(result)
        listener = copy.listener
        if listener is not None:
            copy.listener = None
            listener()
        return True

    def skipped(self) -> asyncio.Future[ShadowResult]:
        """A copy not sent (sampled out, or the request was rejected before dispatch)."""
        self._counters["skipped"].inc()
        return self._done(_SKIPPED)


# What every skipped copy, and every copy shed because its lane was full, resolves to: shared
# (nothing mutates a result once made).
_SKIPPED = ShadowResult("skipped")
_SHED_FULL = ShadowResult("shed", error="challenger lane full; copy shed")


def _since(called: float | None, started: float) -> float:
    return time.perf_counter() - (called if called is not None else started)
