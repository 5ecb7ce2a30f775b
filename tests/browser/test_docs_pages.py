"""Swagger UI (/docs) and ReDoc (/redoc) render every operation with no network but 127.0.0.1: their
JavaScript, CSS and the OpenAPI document come from the service itself (``api/docs_pages.py``).

Screenshots: ``reports/docs/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:  # conftest is pytest's to import, not ours
    from tests.browser.conftest import BrowserServer


HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# ReDoc's standalone bundle shows its vendor's logo from a CDN (hard-coded, no option turns it off): the page's
# Content-Security-Policy (api/docs_pages.py) keeps the browser from even asking for it.
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


@pytest.fixture(scope="module")
def operations(server: BrowserServer) -> list[tuple[str, str, str]]:
    """(method, path, summary) of every documented operation."""
    schema = httpx.get(server.url + "/openapi.json", timeout=10).json()
    found = [
        (method.upper(), path, operation.get("summary", ""))
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    ]
    assert len(found) >= 10, found
    return found


def shot(page, screenshots: Path, name: str, full_page: bool) -> None:
    folder = screenshots / "docs"
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=folder / f"{name}.png", full_page=full_page)


def test_swagger_ui_shows_every_operation_offline(page, server: BrowserServer, operations, screenshots: Path):
    page.goto(server.url + "/docs")
    page.wait_for_selector(".swagger-ui .information-container .title")
    page.wait_for_selector(".opblock")
    blocks = page.locator(".opblock")
    assert blocks.count() == len(operations)
    shown = sorted(
        (
            block.locator(".opblock-summary-method").inner_text().strip(),
            block.locator(".opblock-summary-path").get_attribute("data-path"),
        )
        for block in blocks.all()
    )
    assert shown == sorted((method, path) for method, path, _ in operations)
    assert "Face recognition service" in page.locator(".information-container .title").inner_text()
    shot(page, screenshots, "swagger-ui", full_page=True)

    # An operation opens and shows its parameters (the "Try it out" machinery is loaded).
    page.locator(".opblock-summary-path[data-path='/api/verify']").first.click()
    page.wait_for_selector(".opblock.is-open .try-out__btn")
    page.locator(".opblock.is-open").first.scroll_into_view_if_needed()
    shot(page, screenshots, "swagger-ui-verify", full_page=False)


def test_redoc_shows_every_operation_offline(page, page_watch, server: BrowserServer, operations, screenshots: Path):
    page.goto(server.url + "/redoc")
    page.wait_for_selector("[data-section-id^='operation/']")
    sections = page.locator("[data-section-id^='operation/']")
    assert sections.count() == len(operations)
    titles = page.locator("[data-section-id^='operation/'] h2").all_inner_texts()
    for _, path, summary in operations:
        assert summary in titles, f"{path}: {summary!r} not among ReDoc's titles"
    shot(page, screenshots, "redoc", full_page=False)
    assert REDOC_LOGO not in page_watch.blocked, "the CSP should have stopped the request before the network"
    # The browser reports the refused logo as a CSP violation: that refusal is the point, nothing else may be.
    page_watch.csp_violations[:] = [v for v in page_watch.csp_violations if "redoc.ly" not in v]
