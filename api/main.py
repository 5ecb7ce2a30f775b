"""The FastAPI application: factory, start-up (models load once, off the event loop) and error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import __version__
from api.config import Settings, get_settings
from api.errors import FaceServiceError, StoreUnavailableError
from api.routers import analysis, collections, health, recognition, users
from api.security import AuditLog, Authenticator, RateLimiter, check_startup_security
from api.services.inference import InferenceRunner
from api.state import AppState, load_models
from api.store import open_store

logger = logging.getLogger("api")

DESCRIPTION = """
Register people by face, identify a face among everyone registered (1:N), compare two faces (1:1), read the
dominant emotion of a face and tell a live face from a photo or screen replay.

Every error answers `{"error": {"code", "message", "details"}}` with a stable `code`.
"""


def error_response(status: int, code: str, message: str, details: dict | None = None) -> JSONResponse:
    body: dict = {"code": code, "message": message}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status)


async def _load_in_background(state: AppState) -> None:
    try:
        state.models = await anyio.to_thread.run_sync(load_models, state)
        state.ready_after_s = time.monotonic() - state.started_at
        logger.info("Models loaded and warmed in %.1f s", state.ready_after_s)
    except Exception as exc:  # keep serving /health with the reason rather than dying silently
        state.load_error = f"{type(exc).__name__}: {exc}"
        logger.exception("Loading the models failed")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The store opens synchronously: a corrupt file, a bad FACE_STORE_URL or a database schema newer than
        # this code must stop start-up, not a later request. A database that is merely down must not: the
        # service starts, /health/ready answers 503 with the reason, and it is ready once the database is back.
        check_startup_security(settings)
        store = open_store(settings)
        try:
            await anyio.to_thread.run_sync(store.check)
        except StoreUnavailableError as exc:
            logger.warning("Starting without the store; /health/ready answers 503 until it is back: %s", exc.message)
        state = AppState(
            settings=settings,
            store=store,
            runner=InferenceRunner(settings.inference_threads, settings.inference_timeout_s),
            authenticator=Authenticator(settings.api_keys),
            rate_limiter=RateLimiter(settings.rate_limit),
            audit=AuditLog(settings.audit_log_path),
        )
        app.state.face = state
        # Models load in the background so /health/live answers during the few seconds this takes.
        loader = asyncio.create_task(_load_in_background(state))
        try:
            yield
        finally:
            loader.cancel()
            store.close()

    app = FastAPI(
        title="Face recognition service",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.add_middleware(UploadLimitMiddleware, max_bytes=settings.max_upload_bytes)
    for router in (health.router, recognition.router, users.router, collections.router, analysis.router):
        app.include_router(router)

    @app.exception_handler(FaceServiceError)
    async def domain_error(_: Request, exc: FaceServiceError) -> JSONResponse:
        response = error_response(exc.status, exc.code, exc.message, exc.details)
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": ".".join(str(p) for p in e.get("loc", ())[1:]), "problem": e.get("msg", "")} for e in exc.errors()
        ]
        return error_response(422, "VALIDATION_ERROR", "The request is not valid.", {"problems": problems})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "PAYLOAD_TOO_LARGE", 400: "BAD_REQUEST"}
        return error_response(exc.status_code, codes.get(exc.status_code, "HTTP_ERROR"), str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        # Never a traceback to the client; the log keeps it for the operator.
        logger.exception("Unhandled error")
        return error_response(500, "INTERNAL_ERROR", "An unexpected error occurred.")

    return app


class UploadLimitMiddleware:
    """Refuses bodies larger than ``max_bytes`` with 413 while they stream in, before they are parsed.

    A declared Content-Length over the limit is refused at once; a chunked body is counted as it arrives.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0
        response_started = refused = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Answer now: the framework turns errors raised while parsing into a 400 of its own,
                    # which tracking_send then drops.
                    if not response_started and not refused:
                        refused = True
                        await self._refuse(send)
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if refused:
                return
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(_BodyTooLarge):
            await self.app(scope, counting_receive, tracking_send)

    async def _refuse(self, send: Send) -> None:
        response = error_response(
            413, "PAYLOAD_TOO_LARGE", f"The request body exceeds {self.max_bytes} bytes.", {"limit": self.max_bytes}
        )
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


class _BodyTooLarge(Exception):
    pass


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


_configure_logging()
app = create_app()
