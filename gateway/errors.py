"""Typed errors for the gateway, each carrying the HTTP status it maps to.

The HTTP layer turns any `GatewayError` into a KServe-style `{"error": "..."}` body in one place
(`gateway.rest.inference.error_reply`, for both HTTP servers); the gRPC adapter turns it into
the status code `grpc_code` names (`gateway.rpc.server`). The core never imports aiohttp's or
grpc's exceptions.
"""

from __future__ import annotations

# One class for both programs' config files and the admin API's route changes (the loader's).
from understudy.settings import ConfigError as ConfigError


class GatewayError(Exception):
    """Base class: `status` is the HTTP status code, `retriable` says whether a retry may help.

    `request_id` and `served_model` are set by the data plane once the failed request had
    them, so the client's error answer names them as a success would (headers / metadata);
    `headers` are extra HTTP headers the answer must carry (e.g. an auth challenge).
    """

    status: int = 500
    retriable: bool = False

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})
        self.request_id: str | None = None
        self.served_model: str | None = None


class BadRequest(GatewayError):
    status = 400


class Unauthorized(GatewayError):
    status = 401


class Forbidden(GatewayError):
    status = 403


class NotFound(GatewayError):
    status = 404


class Conflict(GatewayError):
    status = 409


class PayloadTooLarge(GatewayError):
    status = 413


class UnsupportedMediaType(GatewayError):
    status = 415


class UpstreamBadGateway(GatewayError):
    """Triton answered with something that is not a valid response (or a 5xx of its own)."""

    status = 502
    retriable = True


class UpstreamUnavailable(GatewayError):
    """Triton could not be reached or the model is not ready."""

    status = 503
    retriable = True


class UpstreamTimeout(GatewayError):
    status = 504
    retriable = True


class UpstreamClientError(GatewayError):
    """Triton rejected the request as malformed: pass its status and message through."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# How an upstream call's failure is worded, the same whether Triton was called over HTTP
# (gateway/upstream/client.py) or gRPC (gateway/upstream/grpc_client.py): a client sees one
# message for one failure whatever protocol the gateway used behind it.


def unknown_model(model: str, version: str, detail: str) -> NotFound:
    """Triton does not know `model` (or that `version` of it); `detail` is Triton's reason."""
    named = f"model '{model}' version {version}" if version else f"model '{model}'"
    return NotFound(f"{named} is not known to Triton: {detail}")


def upstream_timeout(what: str, timeout_s: float) -> UpstreamTimeout:
    """`what` (e.g. "model 'm'") did not answer within the call's deadline."""
    return UpstreamTimeout(f"{what} did not answer within {timeout_s * 1000:.0f} ms")


def upstream_unreachable(what: str, where: str, detail: object) -> UpstreamUnavailable:
    """The Triton at `where` could not be reached for `what`."""
    return UpstreamUnavailable(f"Triton unreachable for {what} at {where}: {detail}")


# HTTP status -> gRPC status code name (grpc.StatusCode[name]), the mapping Triton's own gRPC
# endpoint uses. A client's mistake is never UNKNOWN: any other 4xx is INVALID_ARGUMENT.
_GRPC_CODES: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "FAILED_PRECONDITION",
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def grpc_code(exc: GatewayError) -> str:
    """The gRPC status code name for `exc`, derived from its HTTP status."""
    code = _GRPC_CODES.get(exc.status)
    if code is not None:
        return code
    return "INVALID_ARGUMENT" if 400 <= exc.status < 500 else "INTERNAL"

