"""The live route table: each route's config plus the runtime parts built from it.

A route's runtime (policy object, shadow lanes, cached champion signature) is rebuilt when its
config changes and swapped in atomically, so a request always sees one consistent version.
Requests in flight keep the runtime they started with.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from gateway import metrics
from gateway.config import (
    DEFAULT_BATCH_MAX_ROWS,
    DEFAULT_BATCH_MAX_WAIT_MS,
    DEFAULT_LATENCY_PROBE_EVERY,
    RouteConfig,
)
from gateway.dataplane.protocol import TensorSpec, parse_metadata_inputs
from gateway.errors import NotFound
from gateway.explore.policies import Decision, Policy, build_policy
from gateway.mirror.shadow import CallTime, ShadowLane
from gateway.upstream.client import TritonUpstream

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServedMetrics:
    """The metric children a request served by one model over one transport updates: resolved
    once per (route version, model, transport) rather than four cached lookups per request."""

    requests: metrics.BatchedCounter
    request_latency: metrics.BatchedHistogram
    model_latency: metrics.BatchedHistogram
    overhead: metrics.BatchedHistogram


@dataclass
class RouteRuntime:
    config: RouteConfig
    policy: Policy
    lanes: dict[str, ShadowLane]  # every model of the route that can be scored as a copy
    champion_inputs: tuple[TensorSpec, ...] | None = None
    inputs_fetch: asyncio.Future[tuple[TensorSpec, ...]] | None = None
    version_of: dict[str, str] = field(default_factory=dict)
    # Set by the registry for each applied state (gateway/control/registry.py), read by the
    # recorder.
    registry_version: int = 0
    experiments: dict[str, tuple[str, float]] = field(default_factory=dict)  # (id, sample_rate)
    # The served calls' smoothed service time (noted by the data plane): the lanes compare theirs
    # with it to tell a slow challenger from a busy machine (gateway/mirror/shadow.py).
    served_call: CallTime = field(default_factory=CallTime)
    # The decision of a request the champion serves without exploring: one shared, immutable
    # object rather than one per request.
    champion_decision: Decision = field(init=False)
    # The header carrying a request's sticky/sampling key, if the route names one.
    key_header: str | None = field(init=False)
    # ServedMetrics by (served model, transport), filled as they are first needed.
    served_metrics: dict[tuple[str, str], ServedMetrics] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        config = self.config
        champion = config.champion.model
        self.champion_decision = Decision(champion, 1.0, {champion: 1.0})
        self.key_header = config.policy.sticky_header or config.sample_key_header or None

    def add_served_metrics(self, model: str, protocol: str) -> ServedMetrics:
        """Resolve (and keep) the children `served_metrics` lacks for `model` and `protocol`."""
        name = self.config.name
        role = "champion" if model == self.config.champion.model else "challenger"
        children = self.served_metrics[model, protocol] = ServedMetrics(
            metrics.child(metrics.REQUESTS, name, model, "200", protocol),
            metrics.child(metrics.REQUEST_LATENCY, name),
            metrics.child(metrics.MODEL_LATENCY, name, model, role, "served"),
            metrics.child(metrics.OVERHEAD, name),
        )
        return children

    @property
    def name(self) -> str:
        return self.config.name


class RouteTable:
    """Routes by name; `apply` and `remove` are the only writers (the registry calls them)."""

    def __init__(self, upstream: TritonUpstream) -> None:
        self.upstream = upstream
        self._routes: dict[str, RouteRuntime] = {}

    def __iter__(self) -> Iterator[RouteRuntime]:
        return iter(list(self._routes.values()))

    def __contains__(self, name: str) -> bool:
        return name in self._routes

    def get(self, name: str) -> RouteRuntime:
        runtime = self._routes.get(name)
        if runtime is None:
            raise NotFound(f"unknown route '{name}'")
        return runtime

    def configs(self) -> dict[str, RouteConfig]:
        return {name: rt.config for name, rt in self._routes.items()}

    def apply(self, config: RouteConfig) -> RouteRuntime:
        previous = self._routes.get(config.name)
        policy = build_policy(config.policy, salt=config.name)
        if previous is not None and previous.config.policy == config.policy:
            policy.load_state(previous.policy.state())
        served_call = previous.served_call if previous is not None else CallTime()
        self._routes[config.name] = runtime = RouteRuntime(
            config=config,
            policy=policy,
            lanes=self._lanes(config, previous, served_call),
            served_call=served_call,
            champion_inputs=(
                previous.champion_inputs
                if previous is not None and previous.config.champion == config.champion
                else None
            ),
            version_of={
                config.champion.model: config.champion.version,
                **{c.model: c.version for c in config.challengers},
            },
        )
        return runtime

    def apply_all(self, configs: Mapping[str, RouteConfig]) -> None:
        for name in set(self._routes) - set(configs):
            self.remove(name)
        for config in configs.values():
            self.apply(config)

    def remove(self, name: str) -> None:
        self._routes.pop(name, None)

    def _lanes(self, config: RouteConfig, previous: RouteRuntime | None,
               served_call: CallTime) -> dict[str, ShadowLane]:
        lanes: dict[str, ShadowLane] = {}
        champion_timeout = 0
        for ch in config.challengers:
            champion_timeout = max(champion_timeout, ch.timeout_ms)
            old = previous.lanes.get(ch.model) if previous else None
            same = (
                old is not None
                and previous is not None
                and previous.config.challenger(ch.model) == ch
            )
            lanes[ch.model] = old if same and old is not None else ShadowLane(
                self.upstream, config.name, ch.model, ch.version,
                max_concurrency=ch.max_concurrency, max_queue=ch.max_queue,
                timeout_ms=ch.timeout_ms, batch_max_rows=ch.batch_max_rows,
                batch_max_wait_ms=ch.batch_max_wait_ms, latency_probe_every=ch.latency_probe_every,
                served=served_call,
            )
        # Under exploration the champion may not be served; it is then scored as a copy too.
        champion = config.champion
        if previous is not None and previous.config.champion == champion:
            lanes[champion.model] = previous.lanes[champion.model]
        else:
            lanes[champion.model] = ShadowLane(
                self.upstream, config.name, champion.model, champion.version,
                max_concurrency=64, max_queue=256,
                timeout_ms=max(champion_timeout, int(self.upstream.timeout_s * 1000)),
                role="champion", batch_max_rows=DEFAULT_BATCH_MAX_ROWS,
                batch_max_wait_ms=DEFAULT_BATCH_MAX_WAIT_MS,
                latency_probe_every=DEFAULT_LATENCY_PROBE_EVERY, served=served_call,
            )
        return lanes

    async def champion_inputs(self, runtime: RouteRuntime) -> tuple[TensorSpec, ...]:
        """The champion's input signature, fetched from Triton once and cached.

        Single-flight: a burst of first requests shares one metadata call instead of each
        queueing its own (which, on a cold start under load, timed requests out).
        """
        if runtime.champion_inputs is not None:
            return runtime.champion_inputs
        if runtime.inputs_fetch is None or runtime.inputs_fetch.done():
            runtime.inputs_fetch = asyncio.ensure_future(self._fetch_inputs(runtime))
        try:
            return await asyncio.shield(runtime.inputs_fetch)
        finally:
            if runtime.inputs_fetch.done() and runtime.inputs_fetch.exception() is not None:
                runtime.inputs_fetch = None  # let the next request retry

    async def _fetch_inputs(self, runtime: RouteRuntime) -> tuple[TensorSpec, ...]:
        champion = runtime.config.champion
        metadata = await self.upstream.metadata(champion.model, champion.version)
        runtime.champion_inputs = parse_metadata_inputs(metadata)
        return runtime.champion_inputs

    async def warm(self) -> None:
        """Fetch every champion's signature, and each lane's batching config, before traffic
        arrives (best effort: what fails here is fetched again by the first request)."""
        await asyncio.gather(
            *(lane.load_batching_config() for rt in self for lane in rt.lanes.values()),
            return_exceptions=True,
        )
        results = await asyncio.gather(
            *(self.champion_inputs(rt) for rt in self), return_exceptions=True
        )
        for runtime, result in zip(list(self), results, strict=True):
            if isinstance(result, BaseException):
                log.warning("route %s: champion signature not available yet: %s",
                            runtime.name, result)
