"""The FastAPI application: factory, start-up (models load once, off the event loop) and error mapping."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import __version__
from api.composition import load_models
from api.config import Settings
from api.docs_pages import add_offline_docs
from api.errors import FaceServiceError, StoreUnavailableError, error_response
from api.logs import configure_logging
from api.middleware import RequestContextMiddleware, UploadLimitMiddleware
from api.routers import analysis, collections, demo, health, recognition, users
from api.routers import metrics as metrics_router
from api.security import AuditLog, Authenticator, RateLimiter, check_startup_security
from api.services.inference import InferenceRunner
from api.state import AppState, ModelLoading
from api.store import open_store

logger = logging.getLogger("api")

DESCRIPTION = """
Register people by face, identify a face among everyone registered (1:N), compare two faces (1:1), read the
dominant emotion of a face and tell a live face from a photo or screen replay.

Every error answers `{"error": {"code", "message", "details"}}` with a stable `code`.
"""


async def _load_in_background(settings: Settings, loading: ModelLoading) -> None:
    try:
        loading.models = await anyio.to_thread.run_sync(load_models, settings)
        loading.ready_after_s = time.monotonic() - loading.started_at
        logger.info("Models loaded and warmed in %.1f s", loading.ready_after_s)
        from api import metrics

        metrics.MODEL_LOAD_SECONDS.set(loading.ready_after_s)
    except Exception as exc:  # keep serving /health with the reason rather than dying silently
        loading.error = f"{type(exc).__name__}: {exc}"
        logger.exception("Loading the models failed")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app, built from ``settings`` (the environment when None). Nothing happens at import time: serve it
    with ``uvicorn --factory api.main:create_app``."""
    settings = settings or Settings()
    configure_logging(settings.log_format)  # keeps handlers a server or test runner configured already

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
            runner=InferenceRunner(
                settings.inference_concurrency, settings.inference_timeout_s, settings.max_queued_requests
            ),
            authenticator=Authenticator(settings.api_keys),
            rate_limiter=RateLimiter(settings.rate_limit, settings.auth_failure_limit),
            audit=AuditLog(settings.audit_log_path),
        )
        app.state.face = state
        # Models load in the background so /health/live answers during the few seconds this takes.
        loader = asyncio.create_task(_load_in_background(settings, state.loading))
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
        docs_url=None,  # served from local assets below: FastAPI's defaults load them from a CDN
        redoc_url=None,
    )
    add_offline_docs(app)
    app.add_middleware(UploadLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(RequestContextMiddleware)  # outermost: ids and metrics cover the 413s too
    for router in (
        health.router,
        recognition.router,
        users.router,
        collections.router,
        analysis.router,
        metrics_router.router,
        *demo.routers(settings),  # /demo: development and test, or FACE_DEMO=true
    ):
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


def server_command(port: int, host: str = "127.0.0.1", workers: int = 1) -> list[str]:
    """How to serve this app from another process (tools, tests): uvicorn with the app factory."""
    import sys

    command = [sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host", host]
    command += ["--port", str(port)]
    return command + (["--workers", str(workers)] if workers != 1 else [])


def __getattr__(name: str) -> FastAPI:
    """``api.main:app`` for servers that want a module-level app (``uvicorn api.main:app``, gunicorn): built
    from the environment on first access, not at import (PEP 562), so importing this module has no side
    effects. ``uvicorn --factory api.main:create_app`` is the same without the module attribute."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    app = globals()["app"] = create_app()
    return app
