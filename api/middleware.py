"""ASGI middleware of the service."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response


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


REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
access_logger = logging.getLogger("api.access")


class RequestContextMiddleware:
    """Gives every request an id (the client's ``X-Request-ID`` when it is a sane token, else a new one),
    returns it as a response header, puts it on every log line of the request, logs one access line, and
    counts and times the request for ``/metrics`` by its route template (``/api/users/{user_id}``), so that
    ids in paths do not explode the label set."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from api import metrics  # imported on the first request: it sets up the metrics folder

        headers = dict(scope.get("headers", []))
        offered = headers.get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        request_id = offered if _REQUEST_ID.match(offered) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER.lower().encode(), request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "-")
            metrics.REQUESTS.labels(method, route, str(status)).inc()
            metrics.REQUEST_SECONDS.labels(method, route).observe(seconds)
            access_logger.info(
                "%s %s %d %.1f ms",
                method,
                scope.get("path", ""),
                status,
                seconds * 1000,
                extra={
                    "method": method,
                    "path": scope.get("path", ""),
                    "status": status,
                    "ms": round(seconds * 1000, 2),
                },
            )
            request_id_var.reset(token)
