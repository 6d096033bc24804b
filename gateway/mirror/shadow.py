"""Shadow dispatch: send copies of a request to challengers without the client ever waiting.

Each (route, challenger) has a `ShadowLane` with a concurrency limit and a bounded queue. A copy
that finds the lane full is shed at once (status "shed", counted) instead of queueing without
bound; a copy that takes longer than the challenger's timeout (queue wait included) is cancelled
and logged as "timeout". So memory and pending tasks stay bounded however slow or dead a
challenger is, and since every challenger has its own connection pool, it cannot take
connections from the champion.

Micro-batching (`batch_max_rows` > 1, and the model's Triton config has `max_batch_size` > 0):
admitted copies queue in the lane and one batcher task sends up to `batch_max_rows` compatible
rows as one Triton request (gateway/mirror/batching.py), waiting at most `batch_max_wait_ms` after
the
oldest queued copy; each batch is one of the `max_concurrency` calls. Every copy keeps its own
deadline timer, so it resolves within the lane's timeout whatever its batch does. A batch that
Triton rejects is re-sent copy by copy, so one bad row never fails the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

from gateway import metrics
from gateway.dataplane.protocol import InferRequest, decode_response
from gateway.errors import GatewayError, UpstreamTimeout
from gateway.mirror.batching import batch_signature, combine, split_outputs
from gateway.upstream.client import TritonUpstream, UpstreamResponse
from understudy.records import Tensor

log = logging.getLogger(__name__)

# After a failed config fetch, copies go singly and the next copy retries after this long.
CONFIG_RETRY_S = 30.0


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


@dataclass(slots=True, eq=False)
class _Copy:
    """A queued (or batched) copy: identity-compared so it can be removed from the queue."""

    request: InferRequest
    mode: str
    key: Hashable
    rows: int
    future: asyncio.Future[ShadowResult]
    enqueued: float  # loop time
    deadline: float  # loop time
    timer: asyncio.TimerHandle | None = None
    called: float | None = None  # perf_counter when its call started; None while queued
    finished: bool = field(default=False)


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
        self._slots = asyncio.Semaphore(max_concurrency)
        self._admitted = 0
        upstream.pool(self.pool_name, limit=max_concurrency, model=model)
        self._inflight_gauge = metrics.SHADOW_INFLIGHT.labels(route, model)
        self._counters = {
            outcome: metrics.SHADOW_COPIES.labels(route, model, outcome)
            for outcome in ("sent", "ok", "error", "timeout", "shed", "skipped")
        }
        self._batch_rows = metrics.SHADOW_BATCH_ROWS.labels(route, model)
        # Batching state: the model's max_batch_size (None until Triton's config is known).
        self._max_batch_size: int | None = None
        self._config_fetch: asyncio.Task[None] | None = None
        self._config_retry_at = 0.0
        self._queue: deque[_Copy] = deque()
        self._queued_rows: dict[Hashable, int] = {}  # rows waiting per compatibility key
        self._wakeup = asyncio.Event()
        self._batcher: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[None]] = set()

    @property
    def admitted(self) -> int:
        return self._admitted

    def submit(self, request: InferRequest, mode: str) -> asyncio.Future[ShadowResult]:
        """Start a copy now; the returned future always resolves within the lane's timeout."""
        if self._admitted >= self.capacity:
            self._counters["shed"].inc()
            done: asyncio.Future[ShadowResult] = asyncio.get_running_loop().create_future()
            done.set_result(ShadowResult("shed", error="challenger lane full; copy shed"))
            return done
        self._admitted += 1
        self._inflight_gauge.inc()
        self._counters["sent"].inc()
        limit = self.batch_limit
        if limit > 1 and not self._is_latency_probe():
            signature = batch_signature(request)
            # A copy that fills a batch by itself (or cannot be stacked) goes alone, as today.
            if signature is not None and signature[1] < limit:
                return self._enqueue(request, mode, signature[0], signature[1], limit)
        elif self.batch_max_rows > 1 and self._max_batch_size is None:
            self._ensure_config()
        copy = self._new_copy(request, mode, None, 1)
        task = asyncio.create_task(self._single(copy))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        return copy.future

    def _count(self, result: ShadowResult, mode: str) -> None:
        self._counters[result.status].inc()
        # A copy that shared its call (split `outputs`) carries the whole batch's time: left out,
        # as the evaluator leaves it out, so the histogram and the report agree.
        if result.latency_s is not None and result.outputs is None:
            metrics.child(metrics.MODEL_LATENCY, self.route, self.model, self.role, mode).observe(
                result.latency_s
            )

    # -- micro-batching -------------------------------------------------------------------

    def _is_latency_probe(self) -> bool:
        """Every Nth copy goes alone: its latency is comparable with a single served request."""
        if not self.latency_probe_every:
            return False
        self._batchable_copies += 1
        return self._batchable_copies % self.latency_probe_every == 0

    @property
    def batch_limit(self) -> int:
        """Rows per Triton call; 0 while batching is off (disabled, config unknown, or the
        model has no batch dimension)."""
        if self.batch_max_rows <= 1 or not self._max_batch_size:
            return 0
        limit = min(self.batch_max_rows, self._max_batch_size)
        return limit if limit > 1 else 0

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
            self.capacity = self.max_concurrency * max(self.batch_limit, 1) + self.max_queue
        except Exception as exc:  # copies simply keep going singly
            log.warning("lane %s/%s: no model config, shadow copies not batched: %s",
                        self.route, self.model, exc)
            self._config_retry_at = asyncio.get_running_loop().time() + CONFIG_RETRY_S
        finally:
            self._config_fetch = None

    def _new_copy(self, request: InferRequest, mode: str, key: Hashable, rows: int) -> _Copy:
        loop = asyncio.get_running_loop()
        now = loop.time()
        return _Copy(request, mode, key, rows, loop.create_future(), now, now + self.timeout_s)

    def _enqueue(
        self, request: InferRequest, mode: str, key: Hashable, rows: int, limit: int
    ) -> asyncio.Future[ShadowResult]:
        copy = self._new_copy(request, mode, key, rows)
        copy.timer = asyncio.get_running_loop().call_at(copy.deadline, self._expire, copy)
        self._queue.append(copy)
        queued = self._queued_rows[key] = self._queued_rows.get(key, 0) + rows
        if queued >= limit:
            self._wakeup.set()
        if self._batcher is None:
            self._batcher = asyncio.create_task(self._batch_loop())
        return copy.future

    def _unqueue_rows(self, copy: _Copy) -> None:
        left = self._queued_rows[copy.key] - copy.rows
        if left > 0:
            self._queued_rows[copy.key] = left
        else:
            del self._queued_rows[copy.key]

    async def _batch_loop(self) -> None:
        """Form batches while copies are queued; exits when the queue is empty (the next copy
        starts a new loop), so an idle lane holds no task."""
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                limit = self.batch_limit
                wait = self._queue[0].enqueued + self.batch_wait_s - loop.time()
                if wait > 0 and max(self._queued_rows.values(), default=0) < limit:
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._wakeup.wait()
                    continue  # the oldest copy may have expired meanwhile: look again
                await self._slots.acquire()  # queued copies keep joining while all slots busy
                batch = self._take(limit)
                if not batch:
                    self._slots.release()
                    continue
                task = asyncio.create_task(self._send(batch))
                self._calls.add(task)
                task.add_done_callback(self._calls.discard)
        finally:
            self._batcher = None

    def _take(self, limit: int) -> list[_Copy]:
        """The oldest live copy plus every later compatible one that fits, in queue order."""
        batch: list[_Copy] = []
        rows = 0
        kept: deque[_Copy] = deque()
        now = time.perf_counter()
        while self._queue and rows < limit:
            copy = self._queue.popleft()
            if copy.future.done():  # cancelled by its owner: nothing to send
                self._unqueue_rows(copy)
                self._resolve(copy, ShadowResult("shed", error="copy cancelled while queued"))
            elif not batch or (copy.key == batch[0].key and rows + copy.rows <= limit):
                self._unqueue_rows(copy)
                copy.called = now
                batch.append(copy)
                rows += copy.rows
            else:
                kept.append(copy)
        kept.extend(self._queue)
        self._queue = kept
        return batch

    async def _send(self, batch: list[_Copy]) -> None:
        """One Triton call for the batch (its slot is held on entry and released here)."""
        loop = asyncio.get_running_loop()
        rows = sum(c.rows for c in batch)
        fallback = False
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
            self._batch_rows.observe(rows)
            called = time.perf_counter()
            for copy in batch:
                copy.called = called
            resp = await self.upstream.infer(
                self.model, self.version, body, content_type, header_length,
                pool=self.pool_name,
                timeout_s=max(max(c.deadline for c in batch) - loop.time(), 0.001),
            )
        except (TimeoutError, UpstreamTimeout):
            for copy in batch:
                self._resolve(copy, self._timed_out(copy))
        except Exception as exc:
            if len(batch) > 1:
                fallback = True
                log.debug("lane %s/%s: batch of %d rows failed (%s); re-sending singly",
                          self.route, self.model, rows, exc)
            else:
                message = exc.message if isinstance(exc, GatewayError) else repr(exc)
                self._resolve(batch[0], ShadowResult(
                    "error", _since(batch[0].called, time.perf_counter()), error=message))
        else:
            if len(batch) == 1:
                self._resolve(batch[0], ShadowResult("ok", resp.latency_s, resp, batch_rows=rows))
            else:
                fallback = not self._deliver(batch, resp, rows)
        finally:
            self._slots.release()
        if fallback:
            await asyncio.gather(*(self._single(c, from_batch=True) for c in batch
                                   if not c.finished))

    def _deliver(self, batch: list[_Copy], resp: UpstreamResponse, rows: int) -> bool:
        """Hand every copy its rows of the batch answer; False if the answer cannot be split."""
        try:
            decoded = decode_response(resp.body, resp.header_length)
            parts = split_outputs(decoded["outputs"], [c.rows for c in batch])
        except Exception as exc:
            log.warning("lane %s/%s: batch answer not splittable (%s); re-sending singly",
                        self.route, self.model, exc)
            return False
        version = decoded.get("model_version")
        for copy, outputs in zip(batch, parts, strict=True):
            self._resolve(copy, ShadowResult(
                "ok", resp.latency_s, outputs=outputs, batch_rows=rows,
                model_version=str(version) if version not in (None, "") else None,
            ))
        return True

    async def _single(self, copy: _Copy, *, from_batch: bool = False) -> None:
        """This copy alone, within its own deadline: a copy that is not batched, or the
        fallback after its batch failed (`from_batch`). Latency is the call's service time
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
            result = ShadowResult("ok", resp.latency_s, resp,
                                  batch_rows=copy.rows if from_batch else None)
        except (TimeoutError, UpstreamTimeout):
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

    def _timed_out(self, copy: _Copy) -> ShadowResult:
        if copy.called is None:
            return ShadowResult("shed", error=f"queued in the lane for the whole "
                                              f"{self.timeout_s * 1000:.0f} ms timeout")
        return ShadowResult("timeout", time.perf_counter() - copy.called,
                            error=f"no answer within {self.timeout_s * 1000:.0f} ms")

    def _expire(self, copy: _Copy) -> None:
        """The copy's deadline: still queued → shed, in a call → timeout (the call may go on
        for the batch's other copies)."""
        if copy.finished:
            return
        if copy.called is None:
            self._queue.remove(copy)
            self._unqueue_rows(copy)
        copy.timer = None
        self._resolve(copy, self._timed_out(copy))

    def _resolve(self, copy: _Copy, result: ShadowResult) -> None:
        """Finish a copy exactly once: release its admission, count it, answer its future."""
        if copy.finished:
            return
        copy.finished = True
        if copy.timer is not None:
            copy.timer.cancel()
        self._admitted -= 1
        self._inflight_gauge.dec()
        self._count(result, copy.mode)
        if not copy.future.done():
            copy.future.set_result(result)

    def skipped(self) -> asyncio.Future[ShadowResult]:
        """A copy not sent (sampled out, or the request was rejected before dispatch)."""
        self._counters["skipped"].inc()
        done: asyncio.Future[ShadowResult] = asyncio.get_running_loop().create_future()
        done.set_result(ShadowResult("skipped"))
        return done


def _since(called: float | None, started: float) -> float:
    return time.perf_counter() - (called if called is not None else started)
