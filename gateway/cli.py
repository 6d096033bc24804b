"""`python -m gateway …`: serve, run the bundled Triton, and drive the admin API."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from gateway.admin_cli import add_admin_commands
from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError
from understudy.cli import EXIT_CODES_HELP, ExitCode, add_version, run
from understudy.segments import worker_dir
from understudy.settings import CONFIG_ENV, log_level

log = logging.getLogger("gateway")


def _serve_one(config: GatewayConfig, host: str, port: int, worker: int | None,
               started: Any = None) -> None:
    """Serve until SIGTERM. ``started`` (a multiprocessing Event) is set once the app's startup
    runs, which is after aiohttp has installed its SIGTERM handler: from then on a SIGTERM
    drains instead of killing."""
    from aiohttp import web

    from gateway.app import create_app
    from gateway.rest.serving import run
    from gateway.rpc.server import install_grpc

    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        pass
    if worker is not None:
        # One segment directory per worker process: file appends never interleave.
        path = worker_dir(Path(config.log.path), worker)  # the layout the evaluator reads
        config = replace(config, log=replace(config.log, path=str(path)))
    app = create_app(config)
    if started is not None:

        async def mark_started(_: web.Application) -> None:
            started.set()

        app.on_startup.append(mark_started)
    if config.listen.grpc_port:
        install_grpc(app, host, config.listen.grpc_port, config.listen.max_body_bytes)
    app.on_startup.append(freeze_heap)  # last: what the other hooks set up is frozen too
    run(app, config.listen.server, host, port, reuse_port=worker is not None or None,
        shutdown_timeout=30)


async def freeze_heap(_: object) -> None:
    """Move everything alive after start-up (numpy, scipy, aiohttp, the app: ~66k tracked
    objects) out of the collector's reach. A full (gen-2) collection walks all of it: 20-30 ms
    in a started gateway, and 55-120 ms measured under load on a busy 2-CPU machine, stalling
    every request in flight; with the heap frozen the same collection took 2.5 ms. Frozen
    objects are never freed, which is what start-up state is for anyway. (The collector's
    thresholds stay as they are: the request path leaves no reference cycles, so collections
    are rare.)"""
    gc.collect()
    gc.freeze()


DEFAULT_CONFIG_PATH = "configs/gateway.yaml"


def _config_path(given: str | None) -> str | None:
    """--config, else $UNDERSTUDY_CONFIG, else configs/gateway.yaml when run from a checkout
    (as the evaluator does), else the built-in defaults."""
    if given:
        return given
    if os.environ.get(CONFIG_ENV):
        return os.environ[CONFIG_ENV]
    return DEFAULT_CONFIG_PATH if Path(DEFAULT_CONFIG_PATH).exists() else None


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(_config_path(args.config))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    host = args.host or config.listen.host
    port = args.port if args.port is not None else config.listen.port
    if args.grpc_port is not None:
        config = replace(config, listen=replace(config.listen, grpc_port=args.grpc_port))
    grpc_port = config.listen.grpc_port
    grpc_note = f" and grpc://{host}:{grpc_port}" if grpc_port else ""
    banner = (f"understudy gateway on http://{host}:{port}{grpc_note} -> Triton "
              f"{config.triton.url} ({len(config.routes)} route(s), log sink {config.log.sink}, "
              f"{args.workers} worker(s))")
    if args.workers <= 1:
        print(banner, flush=True)
        _serve_one(config, host, port, None)
        return ExitCode.OK
    # SO_REUSEPORT lets every worker accept on the same port; the kernel spreads connections.
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    probe.close()
    ctx = multiprocessing.get_context("spawn")
    started = [ctx.Event() for _ in range(args.workers)]
    procs: list[Any] = []
    stopping = threading.Event()

    def forward(signum: int, _frame: object) -> None:
        # Each worker drains its shadows and flushes its log on SIGTERM; the parent only relays.
        # Installed before the first worker starts: a signal during start-up must not kill the
        # parent and orphan the workers it already started.
        stopping.set()
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    print(banner, flush=True)
    for i in range(args.workers):
        if stopping.is_set():
            break
        proc = ctx.Process(target=_serve_one, args=(config, host, port, i, started[i]),
                           daemon=False)
        procs.append(proc)
        proc.start()
    if stopping.is_set():  # a signal that arrived while a worker was starting missed it
        forward(signal.SIGTERM, None)
    for proc in procs:
        proc.join()
    # A worker that SIGTERM reached while it was still importing (before its handler existed)
    # dies of the signal; it had not served anything, so that is a clean stop, not a failure.
    failed = [proc.exitcode for proc, up in zip(procs, started[:len(procs)], strict=True)
              if proc.exitcode and not (proc.exitcode == -signal.SIGTERM and not up.is_set())]
    if failed:
        log.error("worker exit codes: %s", [proc.exitcode for proc in procs])
    return ExitCode.FAILED if failed else ExitCode.OK


def cmd_triton(args: argparse.Namespace) -> int:
    from understudy_demo.triton import main as triton_main

    return triton_main(
        [Path(p) for p in args.model_repository], args.http_port, args.grpc_port, args.metrics_port
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__,
                                     epilog=EXIT_CODES_HELP)
    add_version(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config",
                       help=f"YAML config (default: $UNDERSTUDY_CONFIG, else {DEFAULT_CONFIG_PATH} "
                            "when it exists, else built-in defaults)")
    serve.add_argument("--host", help="address to listen on (default: listen.host)")
    serve.add_argument("--port", type=int, help="HTTP port (default: listen.port, 8080)")
    serve.add_argument("--grpc-port", type=int,
                       help="gRPC port (default: listen.grpc_port, 8081; 0 disables gRPC)")
    serve.add_argument("--workers", type=int, default=1,
                       help="worker processes sharing the port via SO_REUSEPORT")
    serve.set_defaults(func=cmd_serve)

    triton = sub.add_parser("triton", help="run the Triton server bundled in nvidia-pytriton")
    triton.add_argument("--model-repository", action="append", required=True,
                        help="a Triton model repository (repeat for several)")
    triton.add_argument("--http-port", type=int, default=8000, help="Triton's HTTP port")
    triton.add_argument("--grpc-port", type=int, default=8001, help="Triton's gRPC port")
    triton.add_argument("--metrics-port", type=int, default=8002, help="Triton's metrics port")
    triton.set_defaults(func=cmd_triton)

    add_admin_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=log_level(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    args = build_parser().parse_args(argv)
    return run(lambda: int(args.func(args) or 0))
