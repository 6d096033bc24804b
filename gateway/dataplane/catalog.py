"""What clients may ask about a route besides inference, answered from its champion.

Both transports serve a route as if it were a Triton model: metadata, config, statistics and
readiness are the champion's, with the route's name in place of the model's (so tritonclient's
helpers and perf_analyzer's model checks work). One place, so HTTP and gRPC cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.dataplane.routes import RouteTable
from gateway.errors import UpstreamUnavailable
from gateway.upstream.client import TritonUpstream

SERVER_NAME = "understudy"
EXTENSIONS = ("binary_tensor_data", "model_repository")


class RouteCatalog:
    def __init__(self, routes: RouteTable, upstream: TritonUpstream) -> None:
        self.routes = routes
        self.upstream = upstream

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}

    def index(self) -> list[dict[str, str]]:
        """The repository index: one entry per route (the gateway's "models")."""
        return [{"name": runtime.name, "state": "READY"} for runtime in self.routes]

    async def server_ready(self) -> bool:
        """Ready when the Triton servers the champions live on are (`triton.models` may place
        one on another server than `triton.url`; a server holding only challengers does not
        count): the gateway has nothing to serve without them."""
        return await self.upstream.server_ready(
            [runtime.config.champion.model for runtime in self.routes]
        )

    async def metadata(self, route: str) -> dict[str, Any]:
        champion = self.routes.get(route).config.champion
        metadata = await self.upstream.metadata(champion.model, champion.version)
        metadata["name"] = route
        return metadata

    async def config(self, route: str) -> dict[str, Any]:
        champion = self.routes.get(route).config.champion
        config = await self.upstream.model_config(champion.model, champion.version)
        config["name"] = route
        return config

    async def stats(self, route: str) -> dict[str, Any]:
        """The champion's statistics (the requests it served for this and any other route)."""
        champion = self.routes.get(route).config.champion
        stats = await self.upstream.model_stats(champion.model, champion.version)
        for entry in stats.get("model_stats") or []:
            entry["name"] = route
        return stats

    async def all_stats(self) -> dict[str, Any]:
        """Every route's statistics, as Triton answers a statistics request without a name."""
        entries: list[Any] = []
        for runtime in self.routes:
            entries.extend((await self.stats(runtime.name)).get("model_stats") or [])
        return {"model_stats": entries}

    async def check_ready(self, route: str) -> None:
        """Return if the route's champion is ready, else raise UpstreamUnavailable."""
        runtime = self.routes.get(route)
        champion = runtime.config.champion
        if not await self.upstream.model_ready(champion.model, champion.version):
            raise UpstreamUnavailable(
                f"champion '{champion}' of route '{runtime.name}' is not ready"
            )
