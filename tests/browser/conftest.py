"""Browser tests: Playwright's sync API driving the system's Chromium (Debian's ``chromium`` package, which
``.ci/run`` installs; Playwright's own browser downloads are not used). A fake camera plays a Y4M file made
from skimage's astronaut, so ``getUserMedia`` works headless.

One real server (uvicorn, models loaded, a temporary store, one admin API key) serves every browser test of
the session; each test gets a fresh browser context whose requests may only go to 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from tests.helpers import wait_for_server

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("FACE_TEST_CHROMIUM", "/usr/bin/chromium"))
REPORTS = REPO / "reports"
READY_TIMEOUT_S = 180.0


def write_y4m(path: Path, rgb: np.ndarray, frames: int = 5) -> Path:
    """``rgb`` (H, W, 3 uint8, even sides) as a YUV4MPEG2 4:2:0 file of ``frames`` identical frames (BT.601,
    limited range: what Chromium's file-backed fake camera reads)."""
    height, width = rgb.shape[:2]
    assert height % 2 == 0 and width % 2 == 0, "4:2:0 needs even sides"
    x = rgb.astype(np.float64) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 16 + 65.481 * r + 128.553 * g + 24.966 * b
    cb = 128 - 37.797 * r - 74.203 * g + 112.0 * b
    cr = 128 + 112.0 * r - 93.786 * g - 18.214 * b

    def plane(p: np.ndarray) -> bytes:
        return np.clip(np.rint(p), 0, 255).astype(np.uint8).tobytes()

    def half(c: np.ndarray) -> np.ndarray:
        return c.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))

    frame = b"FRAME\n" + plane(y) + plane(half(cb)) + plane(half(cr))
    with path.open("wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F30:1 Ip A1:1 C420jpeg\n".encode())
        f.write(frame * frames)
    return path


@dataclass
class BrowserServer:
    """A running ``uvicorn --factory api.main:create_app`` with one admin key."""

    url: str
    api_key: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def chromium_path() -> Path:
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(
            f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install chromium; .ci/run does) "
            "or point FACE_TEST_CHROMIUM at one"
        )
    return CHROMIUM


@pytest.fixture(scope="session")
def fake_camera(tmp_path_factory: pytest.TempPathFactory, astronaut: np.ndarray) -> Path:
    """The Y4M file the fake camera plays: the astronaut, 512x512."""
    return write_y4m(tmp_path_factory.mktemp("camera") / "astronaut.y4m", astronaut)


# Module scope, not session: Playwright's sync API keeps an event loop running on the main thread while it is
# open, and tests after the browser tests that call asyncio.run() would fail ("cannot be called from a running
# event loop"). Starting Chromium again per module costs about a second.
@pytest.fixture(scope="module")
def browser(chromium_path: Path, fake_camera: Path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")

    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(chromium_path),
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-video-capture={fake_camera}",
            ],
        )
        try:
            yield chromium
        finally:
            chromium.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def server(chromium_path: Path, tmp_path_factory: pytest.TempPathFactory, keras_model_path: Path):
    """One real server for all browser tests (starting one loads the models: ~15 s on 2 cores).

    The same environment as ``tests/conftest.py``'s function-scoped ``live_server``, plus one admin key, so
    that the page's X-API-Key handling is exercised for real.
    """
    folder = tmp_path_factory.mktemp("browser-server")
    api_key = secrets.token_urlsafe(24)
    keys = [{"name": "browser-tests", "scope": "admin", "sha256": hashlib.sha256(api_key.encode()).hexdigest()}]
    port = _free_port()
    log_path = folder / "server.log"
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "FACE_ENV": "test",  # the demo page is on by default here
        "FACE_STORE_PATH": str(folder / "face_database.npz"),
        "FACE_EMBEDDING_MODEL_PATH": str(keras_model_path),
        "FACE_AUDIT_LOG_PATH": str(folder / "audit.log"),
        "FACE_API_KEYS": json.dumps(keys),
        "FACE_STORE_ENCRYPTION_KEY": "",
        "FACE_RATE_LIMIT": "100000/minute",
    }
    environment.pop("FACE_DEMO", None)
    from api.main import server_command

    command = server_command(port)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    running = BrowserServer(f"http://127.0.0.1:{port}", api_key, process, log_path)
    try:
        wait_for_server(process, running.url + "/health/ready", running.log, READY_TIMEOUT_S)
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the session started for it above
                process.wait(timeout=10)


@dataclass
class PageWatch:
    """What a page did that it must not: requests off the loopback host (blocked), uncaught script errors and
    Content-Security-Policy violations."""

    blocked: list[str] = field(default_factory=list)
    script_errors: list[str] = field(default_factory=list)
    csp_violations: list[str] = field(default_factory=list)
    # URLs a test knows the page asks for and may do without (still blocked, not reported).
    tolerated: set[str] = field(default_factory=set)

    def problems(self) -> list[str]:
        return (
            [f"request off 127.0.0.1 (blocked): {u}" for u in self.blocked if u not in self.tolerated]
            + [f"uncaught script error: {e}" for e in self.script_errors]
            + [f"CSP violation: {v}" for v in self.csp_violations]
        )


def offline_only(page, watch: PageWatch) -> None:
    """Aborts every request that is not to 127.0.0.1, as on a machine without internet."""

    def handle(route) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            watch.blocked.append(route.request.url)
            route.abort("internetdisconnected")

    page.route("**/*", handle)
    page.on("pageerror", lambda error: watch.script_errors.append(str(error)))
    page.on(
        "console",
        lambda message: (
            watch.csp_violations.append(message.text)
            if message.type == "error" and "Content Security Policy" in message.text
            else None
        ),
    )


@pytest.fixture
def page_watch() -> PageWatch:
    return PageWatch()


@pytest.fixture
def page(browser, page_watch: PageWatch) -> Iterator:
    """A fresh browser context and page (1280x900), offline but for 127.0.0.1; fails the test if the page
    requested anything elsewhere, threw an uncaught error or violated its CSP."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    page = context.new_page()
    offline_only(page, page_watch)
    try:
        yield page
    finally:
        context.close()
    problems = page_watch.problems()
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="session")
def screenshots() -> Path:
    """``reports/`` (git-ignored): screenshots land in ``reports/demo/`` and ``reports/docs/``."""
    REPORTS.mkdir(exist_ok=True)
    return REPORTS
