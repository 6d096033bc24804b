"""How the app is served on the client port: the runner, the lean (or plain aiohttp) site, and
a graceful run until SIGTERM, the way `web.run_app` does it.

Kept apart from gateway/rest/lean_server.py, which is the per-connection protocol.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from gateway.rest.lean_server import AnswerDone, LeanServer

log = logging.getLogger("gateway.rest.lean_server")  # one logger for the client port


class LeanSite(web.BaseSite):
    """A TCP site whose connections are `LeanProtocol`s (aiohttp behind them, see above)."""

    __slots__ = ("_host", "_lean", "_port", "_reuse_port", "_shutdown_timeout")

    def __init__(self, runner: web.AppRunner, host: str | None, port: int, *,
                 reuse_port: bool | None = None, shutdown_timeout: float = 30.0,
                 backlog: int = 128) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self._shutdown_timeout = shutdown_timeout
        self._lean: LeanServer | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host or '0.0.0.0'}:{self.port}"  # noqa: S104 - display only

    @property
    def port(self) -> int:
        sockets = getattr(self._server, "sockets", None)  # asyncio's and uvloop's servers
        if sockets:
            return int(sockets[0].getsockname()[1])
        return self._port

    async def start(self) -> None:
        await super().start()
        runner = self._runner
        assert isinstance(runner, web.AppRunner)
        assert runner.server is not None
        self._lean = LeanServer(runner.app, runner.server)
        self._lean.start_sweeping()
        self._server = await asyncio.get_running_loop().create_server(
            self._lean, self._host, self._port, backlog=self._backlog,
            reuse_address=True, reuse_port=self._reuse_port,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._lean is not None:
            await self._lean.drain(self._shutdown_timeout)
        await super().stop()


def make_runner(app: web.Application, server: str, *, handle_signals: bool = False,
                shutdown_timeout: float = 30.0) -> web.AppRunner:
    """The app's runner; with the lean server aiohttp only sees bridged requests, whose
    keep-alive the lean side owns (so aiohttp never idles a bridge out)."""
    if server == "lean":
        return web.AppRunner(app, handle_signals=handle_signals, access_log_class=AnswerDone,
                             access_log=log, keepalive_timeout=10.0**9,
                             shutdown_timeout=shutdown_timeout)
    return web.AppRunner(app, handle_signals=handle_signals, access_log=None,
                         shutdown_timeout=shutdown_timeout)


class Serving:
    """A started gateway: its runner and site; `close` shuts down like SIGTERM does."""

    def __init__(self, runner: web.AppRunner, site: LeanSite | web.TCPSite, host: str) -> None:
        self.runner = runner
        self.site = site
        self.host = host

    @property
    def port(self) -> int:
        return self.site.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_serving(app: web.Application, server: str, host: str, port: int, *,
                        reuse_port: bool | None = None, handle_signals: bool = False,
                        shutdown_timeout: float = 30.0) -> Serving:
    """Set the app up and listen on host:port with the `listen.server` kind of server."""
    runner = make_runner(app, server, handle_signals=handle_signals,
                         shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site: LeanSite | web.TCPSite
    if server == "lean":
        site = LeanSite(runner, host, port, reuse_port=reuse_port,
                        shutdown_timeout=shutdown_timeout)
    else:
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port)
    await site.start()
    return Serving(runner, site, host)


def run(app: web.Application, server: str, host: str, port: int, *,
        reuse_port: bool | None = None, shutdown_timeout: float = 30.0) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully (what `web.run_app` does, with
    the lean site)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    async def serve() -> None:
        serving = await start_serving(app, server, host, port, reuse_port=reuse_port,
                                      handle_signals=True, shutdown_timeout=shutdown_timeout)
        try:
            await asyncio.Event().wait()  # until SIGTERM/SIGINT cancels this task
        finally:
            await serving.close()

    main = loop.create_task(serve())
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        main.cancel()
        loop.run_until_complete(asyncio.gather(main, return_exceptions=True))
        rest = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in rest:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
