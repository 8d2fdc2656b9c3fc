"""The HTTP/JSON door: the gRPC services over HTTP/1.1 and JSON, in the server's own process and
event loop (``serve --http-port``, off by default).

Routes come from the ``google.api.http`` options of the protos (nextbest.rpc.http_routes), the
ones Envoy's gRPC-JSON transcoder and grpc-gateway read, so a proxy in front gives the same API.
Each request becomes the request message and goes to the same servicer method the gRPC server
calls, through the same layers: with tokens the same interceptors (metrics, auth, overload) run
per call, as grpc.aio runs them; without, the same wrap the gRPC handlers got at registration.
The servicers see a small context (``HttpContext``) with the part of grpc.aio's they use; a
``grpc-timeout`` header (as Envoy passes it on) is the call's deadline.

Answers are canonical proto3 JSON; failures are ``google.rpc.Status`` JSON (``code``,
``message``, ``details``) with the HTTP status Envoy's transcoder gives each gRPC code. A body
larger than ``max_message_bytes`` is refused with 413 (RESOURCE_EXHAUSTED) before it is read.
With TLS configured the door serves HTTPS with the same certificate (and client CA).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import ssl
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple, NoReturn

import grpc
from aiohttp import web
from google.protobuf import descriptor_pool, json_format

from nextbest.bandit.errors import InvalidInput
from nextbest.rpc.errors import message_of
from nextbest.rpc.http_routes import Route, build_request, match, routes_of
from nextbest.rpc.openapi import render, served
from nextbest.rpc.overload import MALFORMED
from nextbest.rpc.wrapping import Wrap

log = logging.getLogger("nextbest.http")

# As Envoy's gRPC-JSON transcoder (and grpc-gateway's runtime.HTTPStatusFromCode) map them.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


class _CallDetails(NamedTuple):
    """What a grpc.aio server interceptor reads of a call (grpc.HandlerCallDetails)."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


class HttpContext:
    """The part of grpc.aio.ServicerContext the servicers and their wrappers use."""

    def __init__(self, metadata: tuple[tuple[str, str], ...], peer: str, deadline: float | None = None) -> None:
        self._metadata = metadata
        self._peer = peer
        self._deadline = deadline  # on the event loop's clock
        self._code: grpc.StatusCode | None = None
        self._details = ""

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> NoReturn:
        self._code, self._details = code, details
        raise grpc.aio.AbortError()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - asyncio.get_running_loop().time()

    def cancelled(self) -> bool:
        return False

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    async def send_initial_metadata(self, metadata: Any) -> None:
        pass


_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def parse_timeout(value: str) -> float:
    """A ``grpc-timeout`` header (as Envoy's transcoder passes it on): 1 to 8 digits and a unit."""
    digits, unit = value[:-1], value[-1:]
    if not (1 <= len(digits) <= 8 and digits.isascii() and digits.isdigit() and unit in _TIMEOUT_UNITS):
        raise InvalidInput("grpc-timeout", "1 to 8 digits and a unit of H, M, S, m, u, n, e.g. 500m")
    return int(digits) * _TIMEOUT_UNITS[unit]


def status_json(code: grpc.StatusCode, message: str) -> web.Response:
    """A google.rpc.Status as JSON, with the HTTP status of its code."""
    body = {"code": code.value[0], "message": message_of(Exception(message)), "details": []}
    return web.Response(status=HTTP_STATUS.get(code, 500), text=json.dumps(body), content_type="application/json")


def https_context(cert_file: str, key_file: str, client_ca_file: str = "") -> ssl.SSLContext:
    """The gRPC port's TLS for HTTPS: the same certificate, and client certificates with a CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca_file)
    return context


Behavior = Callable[[Any, Any], Awaitable[Any]]


class HttpDoor:
    """The routes of the given servicers (by service full name), served with aiohttp."""

    def __init__(
        self,
        servicers: Mapping[str, object],
        *,
        max_body: int,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        wrap: Wrap | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        pool = descriptor_pool.Default()
        services = [pool.FindServiceByName(name) for name in servicers]
        self.routes: list[Route] = routes_of(services)
        self._openapi = render(served(services))  # docs/openapi.json, proto comments included
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        for route in self.routes:
            servicer = servicers[route.method.containing_service.full_name]
            handler = grpc.unary_unary_rpc_method_handler(getattr(servicer, route.method.name))
            self._handlers[route.full_method] = wrap(route.full_method, handler) if wrap is not None else handler
        self._interceptors = tuple(interceptors)
        self._max_body = max_body
        self._ssl = tls
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        """Listen; the bound port (port 0 picks a free one)."""
        app = web.Application(client_max_size=self._max_body)
        app.router.add_get("/v1/openapi.json", self.openapi, allow_head=False)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self._ssl, reuse_port=reuse_port or None)
        await site.start()
        bound: int = self._runner.addresses[0][1]
        return bound

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def openapi(self, request: web.Request) -> web.Response:
        """The OpenAPI document of these routes (public, as the API's shape is)."""
        return web.Response(text=self._openapi, content_type="application/json")

    async def _resolve(self, method: str, metadata: tuple[tuple[str, str], ...]) -> grpc.RpcMethodHandler:
        """The handler after the interceptors, outermost first, as grpc.aio resolves it."""
        base = self._handlers[method]
        chain = self._interceptors

        async def step(i: int, details: _CallDetails) -> grpc.RpcMethodHandler:
            if i == len(chain):
                return base
            handler: grpc.RpcMethodHandler = await chain[i].intercept_service(functools.partial(step, i + 1), details)
            return handler

        return await step(0, _CallDetails(method, metadata)) if chain else base

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.split("?", 1)[0]
        route, variables, other_verb = match(self.routes, request.method, path)
        if route is None:
            if other_verb:  # 405, as grpc-gateway answers a path served under another verb
                refused = status_json(grpc.StatusCode.UNIMPLEMENTED, f"{request.method} is not served on this path")
                refused.set_status(405)
                return refused
            return status_json(grpc.StatusCode.NOT_FOUND, f"no route for {request.method} {path[:200]}")
        # A request that does not parse still goes through the layers, as MALFORMED (the overload
        # guard's INVALID_ARGUMENT), so that auth refuses it first, as it does on the gRPC port.
        message: Any = MALFORMED
        problem: str | None = None
        deadline: float | None = None
        try:
            body: Any = None
            if route.body:
                raw = await request.read()
                body = json.loads(raw) if raw.strip() else ({} if route.body == "*" else None)
            message = build_request(route, variables, body, request.query.items())
            timeout = request.headers.get("grpc-timeout")
            deadline = None if timeout is None else asyncio.get_running_loop().time() + parse_timeout(timeout)
        except web.HTTPRequestEntityTooLarge:
            response = status_json(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request body larger than {self._max_body} bytes")
            response.set_status(413)
            return response
        except InvalidInput as e:
            problem = str(e)
        except (ValueError, RecursionError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            problem = f"body: not valid JSON: {e}"
        metadata = tuple((k.lower(), v) for k, v in request.headers.items())
        context = HttpContext(metadata, f"http:{request.remote or ''}", deadline)
        try:
            handler = await self._resolve(route.full_method, metadata)
            behavior: Behavior = handler.unary_unary
            answer = await behavior(message, context)
        except grpc.aio.AbortError:
            answer = None
        except Exception:
            if problem is not None:
                return status_json(grpc.StatusCode.INVALID_ARGUMENT, problem)
            ref = uuid.uuid4().hex[:12]
            log.exception("internal error in %s over HTTP (ref %s)", route.full_method, ref)
            return status_json(grpc.StatusCode.INTERNAL, f"internal error (ref {ref})")
        code = context.code()
        if problem is not None and code in (None, grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT):
            return status_json(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if code is not None and code != grpc.StatusCode.OK:
            return status_json(code, context.details())
        if answer is None:
            return status_json(grpc.StatusCode.INTERNAL, "no answer")
        return web.Response(text=json_format.MessageToJson(answer, indent=None), content_type="application/json")
