"""``face_crop=true``: frontends that crop faces with their own detector send just the face; the whole image is
that face (the detector only refines it from inside the crop), on every endpoint that takes a photo."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.helpers import JPEG, error_of


@pytest.fixture(scope="module")
def face_box(astronaut: np.ndarray) -> tuple[int, int, int, int]:
    """The astronaut's face box as the service's detector sees it."""
    from api.config import Settings
    from api.services.detection import build_detector

    settings = Settings()
    detector = build_detector("yunet", settings.detection_confidence, 640, 300, 320)
    x, y, w, h = detector.detect(astronaut)[0].box
    return round(x), round(y), round(w), round(h)


def crop(image: np.ndarray, box: tuple[int, int, int, int], margin: float) -> np.ndarray:
    x, y, w, h = box
    dx, dy = round(w * margin), round(h * margin)
    return np.ascontiguousarray(image[max(0, y - dy) : y + h + dy, max(0, x - dx) : x + w + dx])


def test_a_tight_crop_is_one_face_on_every_endpoint(
    client: TestClient, astronaut: np.ndarray, face_box, to_jpeg
) -> None:
    tight = to_jpeg(crop(astronaut, face_box, 0.0))
    registered = client.post(
        "/api/register", data={"name": "Eileen"}, files={"files": ("a.jpg", to_jpeg(astronaut), JPEG)}
    )
    assert registered.status_code == 201, registered.text
    found = client.post("/api/verify", data={"face_crop": "true"}, files={"file": ("c.jpg", tight, JPEG)}).json()
    assert found["verified"] is True and found["user"]["name"] == "Eileen"
    compared = client.post(
        "/api/compare",
        data={"face_crop": "true"},
        files={"image1": ("a.jpg", tight, JPEG), "image2": ("b.jpg", to_jpeg(crop(astronaut, face_box, 0.3)), JPEG)},
    ).json()
    assert compared["verified"] is True
    emotion = client.post("/api/emotion", data={"face_crop": "true"}, files={"file": ("c.jpg", tight, JPEG)})
    spoof = client.post("/api/anti-spoof", data={"face_crop": "true"}, files={"file": ("c.jpg", tight, JPEG)})
    for response in (emotion, spoof):
        if response.status_code == 503:  # an optional model that is off here
            continue
        assert response.status_code == 200, response.text
        (face,) = response.json()["faces"]
        x, y, w, h = face["box"]
        assert w > 0 and h > 0 and x > -w and y > -h


def test_without_a_detectable_face_the_whole_crop_is_the_face(client: TestClient, to_jpeg) -> None:
    """A crop the detector cannot read (too blurry, too tight, a drawing) still gets an answer: the whole image
    with the landmark template, never NO_FACE."""
    grey = to_jpeg(np.full((120, 100, 3), 128, np.uint8))
    without = client.post("/api/emotion", files={"file": ("g.jpg", grey, JPEG)})
    with_crop = client.post("/api/emotion", data={"face_crop": "true"}, files={"file": ("g.jpg", grey, JPEG)})
    if with_crop.status_code == 503:
        pytest.skip("the emotion model is off here")
    error_of(without, 422, "NO_FACE")
    assert with_crop.status_code == 200 and with_crop.json()["faces"][0]["box"] == [0, 0, 100, 120]


def test_a_crop_smaller_than_the_minimum_face_is_refused(client: TestClient, to_jpeg, app_settings) -> None:
    side = app_settings.min_face_size - 1
    tiny = to_jpeg(np.full((side, side, 3), 128, np.uint8))
    response = client.post("/api/verify", data={"face_crop": "true"}, files={"file": ("t.jpg", tiny, JPEG)})
    error_of(response, 422, "FACE_TOO_SMALL")


def test_the_parameter_is_documented_where_photos_are_taken(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    refs = {
        "/api/verify": "post",
        "/api/register": "post",
        "/api/compare": "post",
        "/api/emotion": "post",
        "/api/anti-spoof": "post",
        "/api/users/{user_id}/faces": "post",
    }
    for path, method in refs.items():
        body = spec["paths"][path][method]["requestBody"]["content"]["multipart/form-data"]["schema"]
        name = body["$ref"].rsplit("/", 1)[1]
        assert "face_crop" in spec["components"]["schemas"][name]["properties"], path
