"""POST /api/emotion and POST /api/anti-spoof over HTTP against the real models.

Uses the session app (``client`` in tests/conftest.py: an empty store per test, and the test fails if any
response was a 500 or carried a traceback). Photos from ``../shared`` are used where present.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.config import Settings
from api.services.emotion import EMOTION_LABELS
from tests.helpers import JPEG, error_of
from tests.routers.test_recognition import IMAGE_ERRORS


def post_image(client: TestClient, path: str, data: bytes, name: str = "face.jpg", **form: Any) -> httpx.Response:
    return client.post(path, data=form, files={"file": (name, data, JPEG)})


def analysis_available(client: TestClient, feature: str) -> None:
    """Skip, saying why, when the app could not load the model of ``feature`` (emotion, anti-spoofing):
    ``GET /`` names no model for it then, and the endpoint answers 503 with the reason."""
    if client.get("/").json()["models"].get(feature) is None:
        path = {"emotion": "/api/emotion", "liveness": "/api/anti-spoof"}[feature]
        reason = client.post(path, files={"file": ("x.jpg", b"x", JPEG)}).json()["error"]["message"]
        pytest.skip(f"{feature} model unavailable: {reason}")


def check_box(box: list[int], width: int, height: int) -> None:
    x, y, w, h = box
    assert w > 0 and h > 0
    assert -w < x < width and -h < y < height  # a box may reach past the border, never lie outside it


def check_emotion_face(face: dict[str, Any], width: int, height: int) -> None:
    assert set(face) == {"box", "dominant_emotion", "emotions"}
    check_box(face["box"], width, height)
    scores = face["emotions"]
    assert list(scores) == list(EMOTION_LABELS)
    assert all(0.0 <= p <= 1.0 for p in scores.values())
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
    assert face["dominant_emotion"] == max(scores, key=scores.__getitem__)


@pytest.fixture(scope="module")
def big_and_small_jpeg(astronaut: np.ndarray, to_jpeg: Callable[..., bytes]) -> tuple[bytes, int, int]:
    """The astronaut beside a copy of itself at 60%: two faces of clearly different sizes, smaller one first."""
    small = np.asarray(Image.fromarray(astronaut).resize((307, 307), Image.Resampling.LANCZOS))
    canvas = np.full((512, 307 + 512, 3), 255, np.uint8)
    canvas[:307, :307] = small
    canvas[:, 307:] = astronaut
    return to_jpeg(canvas), canvas.shape[1], canvas.shape[0]


# --- emotion ---------------------------------------------------------------------------------------------


def test_emotion_of_one_face(client: TestClient, astronaut_jpeg: bytes) -> None:
    analysis_available(client, "emotion")
    response = post_image(client, "/api/emotion", astronaut_jpeg)
    assert response.status_code == 200, response.text
    faces = response.json()["faces"]
    assert len(faces) == 1
    check_emotion_face(faces[0], 512, 512)
    x, y, w, h = faces[0]["box"]
    assert 150 < x + w / 2 < 260 and 50 < y + h / 2 < 170  # the astronaut's face, not elsewhere


def test_emotion_of_every_face_largest_first(client: TestClient, big_and_small_jpeg: tuple[bytes, int, int]) -> None:
    analysis_available(client, "emotion")
    data, width, height = big_and_small_jpeg
    faces = post_image(client, "/api/emotion", data).json()["faces"]
    assert len(faces) == 2
    for face in faces:
        check_emotion_face(face, width, height)
    areas = [face["box"][2] * face["box"][3] for face in faces]
    assert areas[0] > 2 * areas[1]
    assert faces[0]["box"][0] > 307 > faces[1]["box"][0]  # the full-size astronaut is on the right

    only = post_image(client, "/api/emotion", data, all_faces="false").json()["faces"]
    assert len(only) == 1
    assert only[0]["box"] == faces[0]["box"]
    assert only[0]["emotions"] == pytest.approx(faces[0]["emotions"], abs=1e-6)


def test_emotion_is_the_same_for_a_face_alone_and_among_others(
    client: TestClient, astronaut_jpeg: bytes, big_and_small_jpeg: tuple[bytes, int, int]
) -> None:
    """Faces are classified independently: batching them together changes nothing beyond JPEG noise."""
    analysis_available(client, "emotion")
    alone = post_image(client, "/api/emotion", astronaut_jpeg).json()["faces"][0]
    among = post_image(client, "/api/emotion", big_and_small_jpeg[0]).json()["faces"][0]
    assert among["dominant_emotion"] == alone["dominant_emotion"]
    np.testing.assert_allclose(list(among["emotions"].values()), list(alone["emotions"].values()), atol=0.05)


EMOTION_ERRORS = {key: value for key, value in IMAGE_ERRORS.items() if key != "tiny-face"}


@pytest.mark.parametrize("case", list(EMOTION_ERRORS), ids=list(EMOTION_ERRORS))
@pytest.mark.parametrize("path", ["/api/emotion", "/api/anti-spoof"])
def test_bad_images_get_typed_errors(
    client: TestClient, request: pytest.FixtureRequest, astronaut_jpeg: bytes, path: str, case: str
) -> None:
    feature = "emotion" if path == "/api/emotion" else "liveness"
    analysis_available(client, feature)
    source, status, code = EMOTION_ERRORS[case]
    data = request.getfixturevalue(source) if isinstance(source, str) else source(astronaut_jpeg)
    error_of(post_image(client, path, data), status, code)


@pytest.mark.parametrize("path", ["/api/emotion", "/api/anti-spoof"])
def test_request_errors(client: TestClient, astronaut_jpeg: bytes, path: str) -> None:
    error = error_of(client.post(path), 422, "VALIDATION_ERROR")
    assert any(p["field"] == "file" for p in error["details"]["problems"])
    if path == "/api/emotion":
        response = post_image(client, path, astronaut_jpeg, all_faces="perhaps")
        error = error_of(response, 422, "VALIDATION_ERROR")
        assert any(p["field"] == "all_faces" for p in error["details"]["problems"])


@pytest.mark.shared
@pytest.mark.parametrize(("photo", "expected"), [("happy.jpg", "happy"), ("surprised.jpg", "surprise")])
def test_emotion_of_posed_photos(client: TestClient, shared_dir: Path, photo: str, expected: str) -> None:
    """face-api.js' posed expressions (../shared/facedata/emotion/faceapi): the two clearest ones."""
    analysis_available(client, "emotion")
    data = (shared_dir / "emotion" / "faceapi" / photo).read_bytes()
    faces = post_image(client, "/api/emotion", data, name=photo).json()["faces"]
    assert faces, photo
    assert faces[0]["dominant_emotion"] == expected, faces[0]["emotions"]
    assert faces[0]["emotions"][expected] > 0.5


# --- anti-spoofing ---------------------------------------------------------------------------------------


def test_anti_spoof_scores_every_face(
    client: TestClient, app_settings: Settings, big_and_small_jpeg: tuple[bytes, int, int]
) -> None:
    analysis_available(client, "liveness")
    data, width, height = big_and_small_jpeg
    body = post_image(client, "/api/anti-spoof", data).json()
    assert set(body) == {"is_real", "faces"}
    faces = body["faces"]
    assert len(faces) == 2
    threshold = app_settings.liveness_threshold
    for face in faces:
        assert set(face) == {"box", "is_real", "real_score"}
        check_box(face["box"], width, height)
        assert 0.0 <= face["real_score"] <= 1.0
        assert face["is_real"] == (face["real_score"] >= threshold)
    assert faces[0]["box"][2] > faces[1]["box"][2]  # largest first
    assert body["is_real"] == faces[0]["is_real"]  # the verdict is the largest face's


@pytest.mark.shared
def test_anti_spoof_tells_the_reference_live_face_from_the_printed_one(client: TestClient, shared_dir: Path) -> None:
    """The anti-spoofing project's own samples (../shared/facedata/antispoof/silent_face): T = live, F = spoof."""
    analysis_available(client, "liveness")
    folder = shared_dir / "antispoof" / "silent_face"
    verdicts = {}
    for name in ("image_T1.jpg", "image_F2.jpg"):
        body = post_image(client, "/api/anti-spoof", (folder / name).read_bytes(), name=name).json()
        verdicts[name] = body["is_real"]
    assert verdicts == {"image_T1.jpg": True, "image_F2.jpg": False}
