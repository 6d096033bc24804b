"""Shadow dispatch: send copies of a request to challengers without the client ever waiting.

Each (route, challenger) has a `ShadowLane` with a concurrency limit and a bounded queue. A copy
that finds the lane full is shed at once (status "shed", counted) instead of queueing without
bound; a copy that takes longer than the challenger's timeout (queue wait included) is cancelled
and logged as "timeout". So memory and pending tasks stay bounded however slow or dead a
challenger is, and since every challenger has its own connection pool, it cannot take
connections from the champion.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from gateway import metrics
from gateway.errors import GatewayError, UpstreamTimeout
from gateway.protocol import InferRequest
from gateway.upstream import TritonUpstream, UpstreamResponse


@dataclass(slots=True)
class ShadowResult:
    """What one model did with one request (served call or shadow copy)."""

    status: str  # ok | error | timeout | shed | skipped
    latency_s: float | None = None
    response: UpstreamResponse | None = None
    error: str | None = None


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
    ) -> None:
        self.upstream = upstream
        self.role = role
        self.route = route
        self.model = model
        self.version = version
        self.capacity = max_concurrency + max_queue
        self.timeout_s = timeout_ms / 1000
        self.pool_name = f"shadow:{route}:{model}"
        self._slots = asyncio.Semaphore(max_concurrency)
        self._admitted = 0
        upstream.pool(self.pool_name, limit=max_concurrency)
        self._inflight_gauge = metrics.SHADOW_INFLIGHT.labels(route, model)
        self._counters = {
            outcome: metrics.SHADOW_COPIES.labels(route, model, outcome)
            for outcome in ("sent", "ok", "error", "timeout", "shed", "skipped")
        }

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
        return asyncio.ensure_future(self._run(request, mode))

    async def _run(self, request: InferRequest, mode: str) -> ShadowResult:
        """One copy. Latency is the challenger's own (from the call, not from the queue), so the
        evaluator's latency guardrail never blames a challenger for the gateway's queueing; a
        copy whose time ran out while still queued is reported as shed, not as a timeout."""
        started = time.perf_counter()
        called: float | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._slots:
                    called = time.perf_counter()
                    remaining = self.timeout_s - (called - started)
                    resp = await self.upstream.infer(
                        self.model,
                        self.version,
                        request.body,
                        request.content_type,
                        request.header_length,
                        pool=self.pool_name,
                        timeout_s=max(remaining, 0.001),
                    )
            result = ShadowResult("ok", resp.latency_s, resp)
        except (TimeoutError, UpstreamTimeout):
            if called is None:
                result = ShadowResult("shed", error=f"queued in the lane for the whole "
                                                    f"{self.timeout_s * 1000:.0f} ms timeout")
            else:
                result = ShadowResult(
                    "timeout", time.perf_counter() - called,
                    error=f"no answer within {self.timeout_s * 1000:.0f} ms",
                )
        except GatewayError as exc:
            result = ShadowResult("error", _since(called, started), error=exc.message)
        except Exception as exc:  # a shadow must never take the gateway down
            result = ShadowResult("error", _since(called, started), error=repr(exc))
        finally:
            self._admitted -= 1
            self._inflight_gauge.dec()
        self._counters[result.status].inc()
        if result.latency_s is not None:
            metrics.MODEL_LATENCY.labels(self.route, self.model, self.role, mode).observe(
                result.latency_s
            )
        return result

    def skipped(self) -> asyncio.Future[ShadowResult]:
        """A copy not sent (sampled out, or the request was rejected before dispatch)."""
        self._counters["skipped"].inc()
        done: asyncio.Future[ShadowResult] = asyncio.get_running_loop().create_future()
        done.set_result(ShadowResult("skipped"))
        return done


def _since(called: float | None, started: float) -> float:
    return time.perf_counter() - (called if called is not None else started)
