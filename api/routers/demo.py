"""The demo page at /demo: plain HTML, JavaScript and CSS from ``api/demo/`` that call this service's API from
the browser (camera or file upload, register, identify, compare, emotion, anti-spoofing). No build step and
nothing loaded from elsewhere; the Content-Security-Policy below enforces it.

Served in development and test, not in production unless ``FACE_DEMO=true`` (``Settings.demo``).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse

from api.config import Settings
from api.errors import error_response

ASSETS_DIR = Path(__file__).resolve().parent.parent / "demo"

# The only files served, by name: no path from the request ever reaches the file system.
ASSETS = {
    "demo.js": "text/javascript; charset=utf-8",
    "demo.css": "text/css; charset=utf-8",
}

SECURITY_HEADERS = {
    # Everything from this origin only; camera frames and photos are blob: URLs; the API is same-origin.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "media-src 'self' blob: mediastream:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "Permissions-Policy": "camera=(self), microphone=()",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def demo_enabled(settings: Settings) -> bool:
    """``FACE_DEMO`` when set; otherwise served in development and test, never in production."""
    if settings.demo is not None:
        return settings.demo
    return settings.env in ("development", "test")


def routers(settings: Settings) -> tuple[APIRouter, ...]:
    """The demo's router when ``settings`` allow it, else nothing (``/demo`` then answers 404)."""
    return (router,) if demo_enabled(settings) else ()


@router.get("/demo")
async def demo_page() -> FileResponse:
    return FileResponse(ASSETS_DIR / "index.html", media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@router.get("/demo/static/{name}", response_model=None)
async def demo_asset(name: str) -> FileResponse | JSONResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        return error_response(404, "NOT_FOUND", "Not Found")  # what the app answers for any unknown path
    return FileResponse(ASSETS_DIR / name, media_type=media_type, headers=SECURITY_HEADERS)
