"""The FastAPI app: routes, authentication, the body-size limit, HTTP metrics and OpenAI-shaped errors.

Routes stay thin: read the body, hand it to `OpenAIServing`, return JSON or an SSE stream. Bodies are parsed by
the serving layer (not by FastAPI), so every client mistake becomes a 400 in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dgemma.server.async_engine import AsyncEngine
from dgemma.server.errors import APIError, bad_request, status_error
from dgemma.server.metrics import ServerMetrics
from dgemma.server.serving import ClientDisconnected, EventStream, OpenAIServing

log = logging.getLogger("dgemma.server")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
_OPEN_PATHS = ("/health", "/metrics", "/version", "/ping")  # never need the API key
_ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize", "/health",
           "/version", "/metrics", "/ping")


class _Guard:
    """ASGI middleware: API key, body-size limit (413) and per-route request counts by status.

    Written as plain ASGI (not BaseHTTPMiddleware) so that streaming responses and disconnects pass untouched.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: ServerMetrics):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        route = path if path in _ROUTES else ("/v1/models/{model}" if path.startswith("/v1/models/") else "other")
        status_seen = {"status": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status_seen["status"] = message["status"]
            await send(message)

        try:
            error = self._check_key(scope, path)
            if error is None:
                error = self._check_declared_length(scope)
            if error is not None:
                await error.response()(scope, receive, send_counted)
                return
            await self.app(scope, self._limited(receive), send_counted)
        finally:
            self.metrics.on_http(method, route, status_seen["status"])

    def _check_key(self, scope, path: str) -> APIError | None:
        if self.api_key is None or path in _OPEN_PATHS or scope["method"] == "OPTIONS":
            return None
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            reason = "missing" if not header else "wrong"
            return APIError(401, f"{reason} API key: send 'Authorization: Bearer <key>' with the key given to "
                                 "dgemma serve --api-key", code="invalid_api_key")
        return None

    def _check_declared_length(self, scope) -> APIError | None:
        length = dict(scope["headers"]).get(b"content-length")
        if length is None:
            return None
        try:
            size = int(length)
        except ValueError:
            return bad_request("the Content-Length header is not a number")
        return self._too_large(size) if size > self.max_body_bytes else None

    def _too_large(self, size: int | None) -> APIError:
        got = f"{size} bytes" if size is not None else "more"
        return APIError(413, f"request body too large: {got}, the limit is {self.max_body_bytes} bytes "
                             "(dgemma serve --max-body-bytes)", code="request_too_large")

    def _limited(self, receive):
        """Count chunked bodies too: more than the limit raises a 413 from inside the route's body read."""
        seen = {"bytes": 0}
        limit = self.max_body_bytes

        async def wrapped():
            message = await receive()
            if message["type"] == "http.request":
                seen["bytes"] += len(message.get("body", b""))
                if seen["bytes"] > limit:
                    raise self._too_large(None)
            return message

        return wrapped


class _EventStreamResponse(StreamingResponse):
    """Server-sent events whose requests are cancelled however the response ends, even if the client left before
    the first line (an async generator that never started would never run its own clean-up)."""

    def __init__(self, stream: EventStream):
        super().__init__(stream.lines, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._close = stream.close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._close()


async def _json_body(request: Request):
    body = await request.body()
    if not body:
        raise bad_request("the request body is empty: send a JSON object")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad_request("the request body nests JSON too deeply") from None


def build_app(serving: OpenAIServing, engine: AsyncEngine, metrics: ServerMetrics, *, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The OpenAI-compatible app around a serving layer; the engine thread starts and stops with the app."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            serving.shutting_down = True
            await engine.stop()

    app = FastAPI(title="dgemma", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = serving
    app.state.engine = engine
    app.state.metrics = metrics

    async def answer(result):
        if isinstance(result, dict):
            return JSONResponse(result)
        return _EventStreamResponse(result)

    @app.get("/health")
    async def health():
        if serving.shutting_down:
            raise APIError(503, "the server is shutting down")
        if not engine.alive:
            raise APIError(503, engine.dead_message, code="engine_dead")
        return Response(status_code=200)

    @app.get("/ping")
    async def ping():
        return await health()

    @app.get("/version")
    async def version():
        return serving.version()

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return serving.models()

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        return serving.model(name)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await answer(await serving.chat(await _json_body(request), request.receive))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(await serving.completions(await _json_body(request), request.receive))

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return serving.tokenize(await _json_body(request))

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return serving.detokenize(await _json_body(request))

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(ClientDisconnected)
    async def gone(_request: Request, _exc: ClientDisconnected):
        return Response(status_code=499)  # nobody reads it: the client is gone

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return status_error(404, f"no route {request.method} {request.url.path}").response()
        if exc.status_code == 405:
            return status_error(405, f"method {request.method} is not allowed on {request.url.path}").response()
        return status_error(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        return bad_request(f"invalid request: {exc.errors()[:3]}").response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return APIError(500, f"internal error ({type(exc).__name__}); the server logged the details").response()

    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)
    return app


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining at shutdown: new requests get 503, those in flight get `grace_s` seconds to
    finish, then are cancelled (a stream then ends cleanly with finish_reason "abort" and [DONE])."""

    def __init__(self, config: uvicorn.Config, serving: OpenAIServing, grace_s: float):
        super().__init__(config)
        self.serving = serving
        self.grace_s = grace_s

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.started:
            for server in self.servers:
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    log.info("serving the OpenAI API at http://%s:%d/v1 (Ctrl+C to stop)", host, port)

    async def shutdown(self, sockets=None):
        serving = self.serving
        serving.shutting_down = True
        in_flight = serving.in_flight
        if in_flight:
            log.info("shutting down: %d request(s) in flight get %.1f s to finish", in_flight, self.grace_s)

        def cancel() -> None:
            count = serving.abort_all()
            if count:
                log.info("shutdown timeout reached: cancelled %d request(s)", count)

        handle = asyncio.get_running_loop().call_later(self.grace_s, cancel)
        try:
            await super().shutdown(sockets)
        finally:
            handle.cancel()
