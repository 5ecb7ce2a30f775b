"""The demo page at /demo, driven in Chromium: camera (a fake one playing the astronaut), register,
identify, compare, emotion, anti-spoofing and the service's errors, as a person would use them.

Screenshots: ``reports/demo/``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:  # conftest is pytest's to import, not ours
    from tests.browser.conftest import BrowserServer


NAME = "Eileen Collins"


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def shot(page, screenshots: Path, name: str) -> None:
    folder = screenshots / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    page.evaluate("() => window.scrollTo(0, 0)")  # the sticky error banner sits where it belongs
    page.screenshot(path=folder / f"{name}.png", full_page=True)


def open_demo(page, server: BrowserServer, key: str | None = None) -> None:
    """Loads /demo and types the API key (the server's own unless ``key`` says otherwise; "" for none)."""
    page.goto(server.url + "/demo")
    page.wait_for_selector("body[data-ready=true]")
    page.wait_for_selector("#service-status[data-state=ready]")
    key = server.api_key if key is None else key
    if key:
        page.fill("#api-key", key)
        page.locator("#api-key").blur()  # "change": the page keeps the key in sessionStorage


def start_camera(page) -> None:
    page.click("#camera-start")
    page.wait_for_selector("#capture:enabled")


def capture(page, times: int) -> None:
    for _ in range(times):
        before = len(page.locator("[data-testid=photo]").all())
        page.click("#capture")
        wait_photos(page, before + 1)


def wait_photos(page, count: int) -> None:
    # A function, not an expression: Playwright evaluates expressions with eval(), which the page's CSP forbids.
    page.wait_for_function("(n) => document.querySelectorAll('[data-testid=photo]').length >= n", arg=count)


def upload(page, selector: str, name: str, data: bytes, mime: str) -> None:
    page.set_input_files(selector, files=[{"name": name, "mimeType": mime, "buffer": data}])


def finish(page, result_id: str) -> str:
    """Waits until the result area left "pending"; returns its data-status (ok or error)."""
    page.wait_for_selector(f"#{result_id}:not([data-status=pending]):not([data-status=idle])")
    return page.get_attribute(f"#{result_id}", "data-status")


def canvas_pixel(page, canvas_id: str, x: int, y: int) -> list[int]:
    return page.evaluate(
        "([id, x, y]) => Array.from(document.getElementById(id).getContext('2d').getImageData(x, y, 1, 1).data)",
        [canvas_id, x, y],
    )


def assert_drawn(page, canvas_id: str, color: str, box: tuple[int, int, int, int]) -> None:
    """The canvas shows a box of ``color`` (#rrggbb): the middles of its left and right edges have it."""
    x, y, w, h = box
    expected = [int(color[i : i + 2], 16) for i in (1, 3, 5)]
    for px in (x, x + w):
        got = canvas_pixel(page, canvas_id, px, y + h // 2)[:3]
        assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) <= 3, (canvas_id, px, got, color)


# --- serving ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "demo", "served"),
    [
        ("development", None, True),
        ("test", None, True),
        ("production", None, False),
        ("production", True, True),
        ("development", False, False),
    ],
)
def test_demo_is_served_outside_production_unless_forced(tmp_path: Path, env: str, demo: bool | None, served: bool):
    """No models and no browser needed: the app is built but not started (routing only)."""
    from fastapi.testclient import TestClient

    from api.config import Settings
    from api.main import create_app

    settings = Settings(
        env=env, demo=demo, store_path=tmp_path / "face_database.npz", audit_log_path=tmp_path / "audit.log"
    )
    client = TestClient(create_app(settings))
    page, script, style = (client.get(p) for p in ("/demo", "/demo/static/demo.js", "/demo/static/demo.css"))
    if served:
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert 'id="register-button"' in page.text
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
        assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
        # Only the named assets, nothing else from the folder or beyond it.
        for path in ("/demo/static/index.html", "/demo/static/..%2F..%2Fconfig.py", "/demo/static/"):
            assert client.get(path).status_code == 404, path
    else:
        for response in (page, script, style):
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "NOT_FOUND"
    assert not any(p.startswith("/demo") for p in client.get("/openapi.json").json()["paths"])


def test_page_loads_nothing_from_elsewhere(tmp_path: Path):
    """No URL of another origin in the page or its assets (the page's CSP would refuse it anyway)."""
    from fastapi.testclient import TestClient

    from api.config import Settings
    from api.main import create_app

    client = TestClient(create_app(Settings(env="test", demo=None, audit_log_path=tmp_path / "audit.log")))
    html, script, style = (client.get(p).text for p in ("/demo", "/demo/static/demo.js", "/demo/static/demo.css"))
    for text in (html, script, style):
        assert "http://" not in text and "https://" not in text
    assert 'src="//' not in html and 'href="//' not in html
    assert "url(" not in style and "@import" not in style


# --- in the browser -----------------------------------------------------------------------------------------


def test_camera_shows_the_fake_video(page, server: BrowserServer, astronaut: np.ndarray):
    """The fake camera really plays the astronaut: the <video>'s frame, scaled down, matches the photo."""
    open_demo(page, server)
    start_camera(page)
    assert page.evaluate("[camera.videoWidth, camera.videoHeight]") == [512, 512]
    pixels = page.evaluate(
        """() => {
            const canvas = document.createElement('canvas');
            canvas.width = canvas.height = 32;
            const context = canvas.getContext('2d');
            context.drawImage(document.getElementById('camera'), 0, 0, 32, 32);
            return Array.from(context.getImageData(0, 0, 32, 32).data);
        }"""
    )
    frame = np.asarray(pixels, dtype=np.float64).reshape(32, 32, 4)[..., :3]
    expected = np.asarray(Image.fromarray(astronaut).resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    assert np.abs(frame - expected).mean() < 12, "the camera does not show the astronaut"


def test_register_from_three_captures_then_identify(page, server: BrowserServer, screenshots: Path):
    open_demo(page, server)
    start_camera(page)
    capture(page, 3)
    assert page.text_content("#photo-count") == "3"
    assert page.text_content("#register-count") == "3 photos"
    page.fill("#register-name", NAME)
    shot(page, screenshots, "01-captured")

    page.click("#register-button")
    assert finish(page, "result-register") == "ok", page.text_content("#error")
    assert page.text_content("#register-user-name") == NAME
    assert page.text_content("[data-testid=register-faces]") == "3"
    assert page.is_hidden("#error")
    shot(page, screenshots, "02-registered")

    page.click("#identify-button")
    assert finish(page, "result-identify") == "ok", page.text_content("#error")
    assert page.text_content("#identify-name") == NAME
    similarity = float(page.text_content("[data-testid=identify-similarity]"))
    threshold = float(page.text_content("[data-testid=identify-threshold-used]"))
    assert similarity >= threshold
    assert page.get_attribute("#identify-canvas", "data-faces") == "1"
    page.locator("#result-identify").scroll_into_view_if_needed()
    shot(page, screenshots, "03-identified")

    # The same face again: the service refuses it and the page says why.
    page.click("#register-button")
    assert finish(page, "result-register") == "error"
    assert page.is_visible("#error")
    assert page.text_content("#error-code") == "DUPLICATE_FACE"
    assert page.text_content("#error-message")
    shot(page, screenshots, "04-duplicate-refused")


def test_emotion_and_anti_spoofing_draw_every_face(
    page, server: BrowserServer, screenshots: Path, astronaut: np.ndarray
):
    open_demo(page, server)
    start_camera(page)
    capture(page, 1)

    page.click("#emotion-button")
    assert finish(page, "result-emotion") == "ok", page.text_content("#error")
    faces = page.locator("[data-testid=emotion-face]")
    assert faces.count() == 1
    emotion = faces.first.get_attribute("data-emotion")
    assert emotion in {"angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"}
    assert emotion in page.get_attribute("#emotion-canvas", "aria-label")
    x, y, w, h = (int(v) for v in faces.first.get_attribute("data-box").split(","))
    assert page.get_attribute("#emotion-canvas", "data-faces") == "1"
    # The box is drawn over the photo: the middle of its left edge has the face's colour in the list.
    assert_drawn(page, "emotion-canvas", faces.first.get_attribute("data-color"), (x, y, w, h))

    # Every face of an uploaded photo: two astronauts side by side.
    two = np.concatenate([astronaut, astronaut], axis=1)
    upload(page, "#file-input", "two-astronauts.jpg", jpeg_bytes(two), "image/jpeg")
    wait_photos(page, 2)
    page.click("#emotion-button")
    assert finish(page, "result-emotion") == "ok", page.text_content("#error")
    assert page.locator("[data-testid=emotion-face]").count() == 2
    assert page.get_attribute("#emotion-canvas", "data-faces") == "2"
    page.locator("#emotion-canvas").scroll_into_view_if_needed()
    shot(page, screenshots, "05-emotion-two-faces")

    page.click("#antispoof-button")
    assert finish(page, "result-antispoof") == "ok", page.text_content("#error")
    verdict = page.locator("[data-testid=antispoof-verdict]")
    assert verdict.get_attribute("data-real") in {"true", "false"}
    spoof_faces = page.locator("[data-testid=antispoof-face]")
    assert spoof_faces.count() == 2
    assert "real_score" in spoof_faces.first.text_content()
    assert page.get_attribute("#antispoof-canvas", "data-faces") == "2"
    for face in spoof_faces.all():
        box = tuple(int(v) for v in face.get_attribute("data-box").split(","))
        assert_drawn(page, "antispoof-canvas", face.get_attribute("data-color"), box)
    page.locator("#antispoof-canvas").scroll_into_view_if_needed()
    shot(page, screenshots, "06-anti-spoofing")


def test_compare_two_photos(page, server: BrowserServer, screenshots: Path, astronaut: np.ndarray):
    open_demo(page, server)
    start_camera(page)
    capture(page, 1)
    page.click("#compare-use-a")  # the capture
    upload(page, "#compare-file-b", "astronaut.png", png_bytes(astronaut), "image/png")
    page.wait_for_selector("#compare-preview-b:not([hidden])")
    page.click("#compare-button")
    assert finish(page, "result-compare") == "ok", page.text_content("#error")
    assert page.text_content("[data-testid=compare-verdict]") == "Same person"
    assert float(page.text_content("[data-testid=compare-similarity]")) > 0.9
    page.locator("#result-compare").scroll_into_view_if_needed()
    shot(page, screenshots, "07-compare")


def test_service_errors_are_shown(page, server: BrowserServer, screenshots: Path):
    # A blank photo: the service answers NO_FACE, the page shows its code and message.
    open_demo(page, server)
    blank = np.full((240, 320, 3), 255, dtype=np.uint8)
    upload(page, "#file-input", "blank.png", png_bytes(blank), "image/png")
    page.wait_for_selector("[data-testid=photo]")
    page.click("#identify-button")
    assert finish(page, "result-identify") == "error"
    assert page.is_visible("#error")
    assert page.text_content("#error-code") == "NO_FACE"
    assert page.text_content("#error-message").strip()
    assert "HTTP 422" in page.text_content("#error-context")
    assert page.get_attribute("#result-identify", "data-code") == "NO_FACE"
    shot(page, screenshots, "08-error-no-face")

    # Not an image at all.
    upload(page, "#file-input", "notes.txt", b"not a photo", "text/plain")
    wait_photos(page, 2)
    page.click("#emotion-button")
    assert finish(page, "result-emotion") == "error"
    assert page.text_content("#error-code") in {"UNSUPPORTED_MEDIA_TYPE", "INVALID_IMAGE"}

    # Dismissed, the banner goes (it also goes when the next action starts).
    page.click("#error-dismiss")
    assert page.is_hidden("#error")


def test_without_the_api_key_the_service_refuses(page, server: BrowserServer, screenshots: Path):
    open_demo(page, server, key="")
    start_camera(page)
    capture(page, 1)
    page.click("#identify-button")
    assert finish(page, "result-identify") == "error"
    assert page.text_content("#error-code") == "UNAUTHORIZED"
    assert "HTTP 401" in page.text_content("#error-context")
    shot(page, screenshots, "09-error-no-key")


def test_api_key_is_kept_for_the_tab_and_sent(page, server: BrowserServer):
    open_demo(page, server)
    assert page.evaluate("sessionStorage.getItem('face-demo:api-key')") == server.api_key
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.input_value("#api-key") == server.api_key
    upload(page, "#file-input", "blank.png", png_bytes(np.zeros((64, 64, 3), np.uint8)), "image/png")
    page.wait_for_selector("[data-testid=photo]")
    with page.expect_request("**/api/verify*") as sent:
        page.click("#identify-button")
    assert sent.value.headers.get("x-api-key") == server.api_key
    # Cleared: no longer stored, no longer sent.
    page.fill("#api-key", "")
    page.locator("#api-key").blur()
    assert page.evaluate("sessionStorage.getItem('face-demo:api-key')") is None
    finish(page, "result-identify")
    with page.expect_request("**/api/verify*") as sent:
        page.click("#identify-button")
    assert "x-api-key" not in sent.value.headers
