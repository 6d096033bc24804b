"""`/admin/routes/{route}/rollout`: start (POST), status (GET) and abort (DELETE) a guarded
rollout, and the controller's wiring into the app (gateway/control/rollout.py).

The endpoints sit on the `/admin` sub-application, so they share its bearer-token auth (GET
needs the read token, POST and DELETE the write token) and its error mapping; every change is
audited by the registry like any other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web

from gateway.config import GatewayConfig
from gateway.control.rollout import RolloutController
from gateway.dataplane.recorder import Recorder
from gateway.dataplane.routes import RouteTable
from gateway.rest.admin import ACTOR, REGISTRY, _body, _expected_version, _json

CONTROLLER = web.AppKey("rollout_controller", RolloutController)


def _controller(request: web.Request) -> RolloutController:
    return request.config_dict[CONTROLLER]


async def start_rollout(request: web.Request) -> web.Response:
    body = await _body(request)
    view = await _controller(request).begin(
        request[ACTOR], request.match_info["route"], body, _expected_version(request, body))
    return _json(view, 201)


async def rollout_status(request: web.Request) -> web.Response:
    return _json(_controller(request).status(request.match_info["route"]))


async def abort_rollout(request: web.Request) -> web.Response:
    body = await _body(request)
    view = await _controller(request).abort(
        request[ACTOR], request.match_info["route"], _expected_version(request, body))
    return _json(view)


def add_rollout_endpoints(admin: web.Application) -> None:
    """Register the endpoints on the `/admin` sub-app (`install_admin(endpoints=...)`)."""
    admin.router.add_post("/routes/{route}/rollout", start_rollout)
    admin.router.add_get("/routes/{route}/rollout", rollout_status)
    admin.router.add_delete("/routes/{route}/rollout", abort_rollout)


def install_rollout(
    app: web.Application, config: GatewayConfig, routes: RouteTable, recorder: Recorder,
    *, tick_s: float = 0.25,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """The controller, fed every record; call after `install_admin` (it needs the registry).
    Returns its cleanup context: place it after the reward bus's, so the controller starts
    once the bus has replayed its history."""
    controller = RolloutController(app[REGISTRY], routes,
                                   webhook_url=config.admin.rollout_webhook_url, tick_s=tick_s)
    app[CONTROLLER] = controller  # the handlers find it through request.config_dict
    recorder.observers.append(controller.observe)

    async def rollout_ctx(_: web.Application) -> AsyncIterator[None]:
        await controller.start()
        yield
        await controller.close()

    return rollout_ctx
