"""Register, verify (1:N) and compare (1:1) over HTTP against the real models, and every error the API maps.

The session app loads the models once (``app_client`` in tests/conftest.py); the ``client`` fixture gives each
test an empty store and fails the test if any response was a 500 or carried a traceback.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.config import Settings
from api.main import create_app
from api.store import FaceStore
from tests.helpers import JPEG, error_of

# --- helpers ---------------------------------------------------------------------------------------------


def files_field(field: str, *named: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (name, data, JPEG)) for name, data in named]


def register(client: TestClient, name: str, *named: tuple[str, bytes], **form: Any) -> httpx.Response:
    return client.post("/api/register", data={"name": name, **form}, files=files_field("files", *named))


def verify(client: TestClient, data: bytes, name: str = "probe.jpg", **form: Any) -> httpx.Response:
    return client.post("/api/verify", data=form, files={"file": (name, data, JPEG)})


def compare(client: TestClient, first: bytes, second: bytes, **form: Any) -> httpx.Response:
    return client.post(
        "/api/compare", data=form, files={"image1": ("a.jpg", first, JPEG), "image2": ("b.jpg", second, JPEG)}
    )


def created_user(response: httpx.Response, name: str, faces: int) -> dict[str, Any]:
    assert response.status_code == 201, response.text
    body = response.json()
    user = body["user"]
    assert set(user) == {"id", "name", "faces", "collection", "created_at", "updated_at"}
    assert user["name"] == name and user["faces"] == faces
    assert isinstance(user["id"], str) and user["id"]
    return user


def users_total(client: TestClient) -> int:
    response = client.get("/api/users")
    assert response.status_code == 200, response.text
    return response.json()["total"]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mirrored_jpeg(astronaut: np.ndarray, to_jpeg: Callable[..., bytes]) -> bytes:
    return to_jpeg(np.ascontiguousarray(astronaut[:, ::-1]))


@pytest.fixture(scope="module")
def cropped_jpeg(astronaut: np.ndarray, to_jpeg: Callable[..., bytes]) -> bytes:
    """A 40 px border cropped off, rescaled to 400x400 and saved at a lower quality."""
    crop = Image.fromarray(astronaut[40:-40, 40:-40]).resize((400, 400), Image.Resampling.BILINEAR)
    return to_jpeg(np.asarray(crop), quality=75)


# --- the core flow on the astronaut alone (works on a fresh clone) ---------------------------------------


def test_empty_gallery_answers_not_verified(client: TestClient, astronaut_jpeg: bytes) -> None:
    response = verify(client, astronaut_jpeg)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["verified"] is False and body["user"] is None
    assert body["similarity"] is None and body["distance"] is None
    assert body["candidates"] == []
    assert 0.0 <= body["threshold"] <= 1.0
    box = body["face"]["box"]
    assert len(box) == 4 and all(isinstance(v, int) for v in box)
    assert 150 < box[0] + box[2] / 2 < 300 and 40 < box[1] + box[3] / 2 < 200, box  # the astronaut's face
    assert 0.5 < body["face"]["score"] <= 1.0


def test_a_gallery_of_another_embedder_is_refused_by_name_never_a_silent_miss(
    client: TestClient, client_store: FaceStore, astronaut_jpeg: bytes
) -> None:
    """People enrolled with another embedder (e.g. before FACE_EMBEDDER changed) are invisible to this model's
    search: verify says so, naming both models and how to re-enrol, instead of answering "nobody"."""
    rng = np.random.default_rng(0)
    faces = rng.standard_normal((2, 640)).astype(np.float32)
    client_store.add_user("enrolled before", faces / np.linalg.norm(faces, axis=1, keepdims=True), "other-embedder")
    response = client.post("/api/verify", files={"file": ("a.jpg", astronaut_jpeg, JPEG)})
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    configured = error["details"]["configured_model"]
    assert error["code"] == "MODEL_MISMATCH" and configured.startswith("dlib-resnet-v1")
    assert error["details"]["stored_models"] == {"other-embedder": 1}
    assert "other-embedder" in error["message"] and configured in error["message"]
    assert "enroll" in error["message"] and "FACE_EMBEDDER" in error["message"]


def test_astronaut_register_verify_compare_delete(
    client: TestClient, astronaut_jpeg: bytes, mirrored_jpeg: bytes, cropped_jpeg: bytes
) -> None:
    response = register(client, "Eileen Collins", ("astronaut.jpg", astronaut_jpeg))
    user = created_user(response, "Eileen Collins", faces=1)
    assert response.json()["rejected"] == []
    assert client.get("/").json()["users"] == 1

    for probe in (mirrored_jpeg, cropped_jpeg):
        body = verify(client, probe, top_k=3).json()
        assert body["verified"] is True, body
        assert body["user"] == {"id": user["id"], "name": "Eileen Collins"}
        assert body["threshold"] <= body["similarity"] <= 1.0
        assert body["distance"] >= 0.0
        assert [c["id"] for c in body["candidates"]] == [user["id"]]
        assert body["candidates"][0]["similarity"] == body["similarity"]

    body = compare(client, astronaut_jpeg, mirrored_jpeg).json()
    assert set(body) == {"verified", "similarity", "distance", "threshold"}
    assert body["verified"] is True and body["similarity"] >= body["threshold"]

    response = client.delete(f"/api/users/{user['id']}")
    assert response.status_code == 204 and response.content == b""
    body = verify(client, mirrored_jpeg).json()
    assert body["verified"] is False and body["user"] is None and body["candidates"] == []
    error_of(client.get(f"/api/users/{user['id']}"), 404, "USER_NOT_FOUND")
    assert client.get("/").json()["users"] == 0


def test_compare_with_a_threshold_above_the_similarity_is_not_verified(
    client: TestClient, astronaut_jpeg: bytes, cropped_jpeg: bytes
) -> None:
    same = compare(client, astronaut_jpeg, cropped_jpeg).json()
    assert same["verified"] is True
    strict = compare(client, astronaut_jpeg, cropped_jpeg, threshold=1.0).json()
    assert strict["threshold"] == 1.0
    assert strict["verified"] is (strict["similarity"] >= 1.0)
    loose = verify(client, astronaut_jpeg, threshold=0.0).json()
    assert loose["threshold"] == 0.0 and loose["verified"] is False  # empty gallery: nobody to match


def test_verify_uses_the_largest_face(
    client: TestClient, astronaut: np.ndarray, astronaut_jpeg: bytes, to_jpeg: Callable[..., bytes]
) -> None:
    user = created_user(register(client, "Astronaut", ("a.jpg", astronaut_jpeg)), "Astronaut", 1)
    small = np.asarray(Image.fromarray(astronaut).resize((320, 320), Image.Resampling.LANCZOS))
    canvas = np.full((512, 512 + 320, 3), 255, np.uint8)
    canvas[:, 320:] = astronaut  # the larger face on the right
    canvas[:320, :320] = small
    body = verify(client, to_jpeg(canvas)).json()
    assert body["face"]["box"][0] >= 320, body["face"]
    assert body["verified"] is True and body["user"]["id"] == user["id"]


def test_register_keeps_good_files_and_lists_the_rejected(
    client: TestClient, astronaut_jpeg: bytes, no_face_jpeg: bytes
) -> None:
    response = register(client, "Astronaut", ("astronaut.jpg", astronaut_jpeg), ("coffee.jpg", no_face_jpeg))
    created_user(response, "Astronaut", faces=1)
    rejected = response.json()["rejected"]
    assert len(rejected) == 1 and rejected[0]["file"] == "coffee.jpg"
    assert rejected[0]["error"]["code"] == "NO_FACE" and rejected[0]["error"]["message"]


def test_register_with_no_usable_file_fails_and_stores_nothing(
    client: TestClient, no_face_jpeg: bytes, tiny_face_jpeg: bytes
) -> None:
    error_of(register(client, "Nobody", ("coffee.jpg", no_face_jpeg)), 422, "NO_FACE")
    error = error_of(
        register(client, "Nobody", ("coffee.jpg", no_face_jpeg), ("tiny.jpg", tiny_face_jpeg)), 422, "NO_FACE"
    )
    rejected = {entry["file"]: entry["code"] for entry in error["details"]["rejected"]}
    assert rejected == {"coffee.jpg": "NO_FACE", "tiny.jpg": "FACE_TOO_SMALL"}
    assert users_total(client) == 0


def test_duplicate_face_is_refused_unless_allowed(
    client: TestClient, astronaut_jpeg: bytes, mirrored_jpeg: bytes
) -> None:
    first = created_user(register(client, "First", ("a.jpg", astronaut_jpeg)), "First", 1)
    error = error_of(register(client, "Second", ("b.jpg", mirrored_jpeg)), 409, "DUPLICATE_FACE")
    assert error["details"]["user"] == {"id": first["id"], "name": "First"}
    assert "First" in error["message"]
    assert users_total(client) == 1
    created_user(register(client, "Second", ("b.jpg", mirrored_jpeg), allow_duplicate="true"), "Second", 1)
    assert users_total(client) == 2


def test_register_with_liveness_stores_only_a_live_face(client: TestClient, astronaut_jpeg: bytes) -> None:
    response = register(client, "Astronaut", ("a.jpg", astronaut_jpeg), liveness="true")
    if response.status_code == 201:
        assert users_total(client) == 1
    else:  # a printed photo may well be judged a spoof; then nothing is stored
        error = error_of(response, 422, "SPOOF_DETECTED")
        assert error["details"]["file"] == "a.jpg" and 0.0 <= error["details"]["real_score"] <= 1.0
        assert users_total(client) == 0


# --- errors ----------------------------------------------------------------------------------------------


def gif_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="GIF")
    return buffer.getvalue()


IMAGE_ERRORS = {
    # id: (fixture name or bytes factory, status, code)
    "no-face": ("no_face_jpeg", 422, "NO_FACE"),
    "tiny-face": ("tiny_face_jpeg", 422, "FACE_TOO_SMALL"),
    "truncated-jpeg": (lambda astronaut_jpeg: astronaut_jpeg[:200], 422, "INVALID_IMAGE"),
    "empty-file": (lambda astronaut_jpeg: b"", 422, "INVALID_IMAGE"),
    "gif": (lambda astronaut_jpeg: gif_bytes(), 415, "UNSUPPORTED_MEDIA_TYPE"),
    "text": (lambda astronaut_jpeg: b"name,face\nada,1\n", 415, "UNSUPPORTED_MEDIA_TYPE"),
    "too-many-pixels": (lambda astronaut_jpeg: png_bytes(Image.new("1", (8000, 6000))), 413, "IMAGE_TOO_LARGE"),
}


@pytest.fixture(params=list(IMAGE_ERRORS), ids=list(IMAGE_ERRORS))
def bad_image(request: pytest.FixtureRequest, astronaut_jpeg: bytes) -> tuple[bytes, int, str]:
    source, status, code = IMAGE_ERRORS[request.param]
    data = request.getfixturevalue(source) if isinstance(source, str) else source(astronaut_jpeg)
    return data, status, code


def test_image_errors_on_verify(client: TestClient, bad_image: tuple[bytes, int, str]) -> None:
    data, status, code = bad_image
    error_of(verify(client, data), status, code)


def test_image_errors_on_register_and_compare(
    client: TestClient, bad_image: tuple[bytes, int, str], astronaut_jpeg: bytes
) -> None:
    data, status, code = bad_image
    error_of(register(client, "Someone", ("bad.jpg", data)), status, code)
    error_of(compare(client, astronaut_jpeg, data), status, code)
    assert users_total(client) == 0


def test_image_over_the_byte_limit(client: TestClient, app_settings: Settings, astronaut_jpeg: bytes) -> None:
    limit = app_settings.max_image_bytes
    data = astronaut_jpeg + bytes(limit + 1 - len(astronaut_jpeg))  # a JPEG with trailing bytes, one too many
    error = error_of(verify(client, data, name="big.jpg"), 413, "IMAGE_TOO_LARGE")
    assert error["details"] == {"file": "big.jpg", "limit": limit}


def test_multiple_faces_are_refused_at_registration(client: TestClient, two_faces_jpeg: bytes) -> None:
    error = error_of(register(client, "Twins", ("two.jpg", two_faces_jpeg)), 422, "MULTIPLE_FACES")
    assert error["details"]["faces"] == 2
    assert users_total(client) == 0


def test_too_many_files(client: TestClient, app_settings: Settings, astronaut_jpeg: bytes) -> None:
    limit = app_settings.max_files_per_request
    named = [(f"f{i}.jpg", b"x") for i in range(limit + 1)]  # refused before any file is read
    error = error_of(register(client, "Many", *named), 422, "TOO_MANY_FILES")
    assert error["details"]["limit"] == limit


@pytest.mark.parametrize(
    ("form", "field"),
    [
        ({"top_k": "0"}, "top_k"),
        ({"top_k": "101"}, "top_k"),
        ({"top_k": "many"}, "top_k"),
        ({"threshold": "-0.01"}, "threshold"),
        ({"threshold": "1.5"}, "threshold"),
        ({"threshold": "nan"}, "threshold"),
    ],
)
def test_verify_validation_errors(client: TestClient, astronaut_jpeg: bytes, form: dict, field: str) -> None:
    error = error_of(verify(client, astronaut_jpeg, **form), 422, "VALIDATION_ERROR")
    assert any(problem["field"] == field for problem in error["details"]["problems"]), error


def test_request_validation_errors(client: TestClient, astronaut_jpeg: bytes) -> None:
    error_of(client.post("/api/verify"), 422, "VALIDATION_ERROR")  # no file at all
    error_of(compare(client, astronaut_jpeg, astronaut_jpeg, threshold="2"), 422, "VALIDATION_ERROR")
    error_of(client.post("/api/compare", files={"image1": ("a.jpg", astronaut_jpeg, JPEG)}), 422, "VALIDATION_ERROR")
    error_of(register(client, "", ("a.jpg", astronaut_jpeg)), 422, "VALIDATION_ERROR")
    error_of(register(client, "x" * 201, ("a.jpg", astronaut_jpeg)), 422, "VALIDATION_ERROR")
    error_of(client.post("/api/register", data={"name": "No files"}), 422, "VALIDATION_ERROR")
    assert users_total(client) == 0


def test_unknown_route_and_method_use_the_envelope(client: TestClient) -> None:
    error_of(client.get("/api/nothing-here"), 404, "NOT_FOUND")
    error_of(client.get("/api/verify"), 405, "METHOD_NOT_ALLOWED")


def test_payload_too_large_is_refused_while_streaming(client: TestClient, app_settings: Settings) -> None:
    limit = app_settings.max_upload_bytes
    body = b"--x\r\n" + bytes(limit)  # over the limit: never parsed

    declared = client.post("/api/verify", content=body, headers={"content-type": "multipart/form-data; boundary=x"})
    assert error_of(declared, 413, "PAYLOAD_TOO_LARGE")["details"] == {"limit": limit}

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for start in range(0, len(body), 1 << 20):
            yield body[start : start + (1 << 20)]

    streamed = client.post(
        "/api/register", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert "content-length" not in streamed.request.headers
    error_of(streamed, 413, "PAYLOAD_TOO_LARGE")


def test_upload_limit_is_per_app_and_needs_no_models() -> None:
    app = create_app(Settings(max_upload_bytes=1024, store_path=Path("/nonexistent/never-opened.npz")))
    cheap = TestClient(app, client=("127.0.0.1", 50000))  # no lifespan: no store, no models
    response = cheap.post("/api/verify", files={"file": ("a.jpg", bytes(2048), JPEG)})
    assert error_of(response, 413, "PAYLOAD_TOO_LARGE")["details"] == {"limit": 1024}
    assert cheap.get("/health/live").json() == {"status": "ok"}


def test_not_ready_and_failed_models_answer_503(client: TestClient, overrides: Any, astronaut_jpeg: bytes) -> None:
    from api.deps import get_loading
    from api.state import ModelLoading

    overrides[get_loading] = ModelLoading()  # as during start-up, while the models load
    error_of(verify(client, astronaut_jpeg), 503, "NOT_READY")
    error_of(register(client, "Later", ("a.jpg", astronaut_jpeg)), 503, "NOT_READY")
    assert client.get("/health/ready").status_code == 503
    assert client.get("/api/users").json() == {"items": [], "total": 0}  # the store needs no models
    overrides[get_loading] = ModelLoading(error="OSError: model file missing")
    error = error_of(compare(client, astronaut_jpeg, astronaut_jpeg), 503, "MODEL_UNAVAILABLE")
    assert "model file missing" in error["message"]
    assert client.get("/health/ready").json() == {"status": "failed"}
    del overrides[get_loading]
    assert client.get("/health/ready").status_code == 200


@pytest.mark.parametrize("path", ["/api/emotion", "/api/anti-spoof"])
def test_analysis_endpoints_answer_or_say_unavailable(client: TestClient, astronaut_jpeg: bytes, path: str) -> None:
    response = client.post(path, files={"file": ("a.jpg", astronaut_jpeg, JPEG)})
    if response.status_code == 503:
        error_of(response, 503, "MODEL_UNAVAILABLE")
    else:
        assert response.status_code == 200, response.text
        assert response.json()["faces"]


# --- real photos of several people (../shared) -----------------------------------------------------------


@pytest.fixture(scope="module")
def people(shared_dir: Path) -> dict[str, dict[str, bytes]]:
    """Photos of deepface's identity set by person: A (id01), B (id03)."""
    folder = shared_dir / "identity" / "deepface"
    clusters = json.loads((folder / "clusters_derived.json").read_text())
    assert {"img2.jpg", "img4.jpg", "img5.jpg"} <= set(clusters["id01"])
    assert {"img8.jpg", "img9.jpg", "img47.jpg"} <= set(clusters["id03"])
    pick = {"A": ["img2.jpg", "img4.jpg", "img5.jpg"], "B": ["img8.jpg", "img9.jpg", "img47.jpg"]}
    return {person: {name: (folder / name).read_bytes() for name in names} for person, names in pick.items()}


@pytest.mark.shared
def test_real_people_register_verify_compare_delete(client: TestClient, people: dict[str, dict[str, bytes]]) -> None:
    a, b = people["A"], people["B"]
    user_a = created_user(register(client, "Person A", *list(a.items())[:2]), "Person A", faces=2)

    body = verify(client, a["img5.jpg"]).json()
    assert body["verified"] is True and body["user"] == {"id": user_a["id"], "name": "Person A"}, body
    same_similarity = body["similarity"]

    body = verify(client, b["img8.jpg"]).json()
    assert not (body["verified"] and body["user"]["id"] == user_a["id"]), body
    assert body["similarity"] < same_similarity

    same = compare(client, a["img2.jpg"], a["img5.jpg"]).json()
    different = compare(client, a["img2.jpg"], b["img8.jpg"]).json()
    assert same["verified"] is True and different["verified"] is False
    assert different["similarity"] < different["threshold"] <= same["similarity"]
    assert different["distance"] > same["distance"]

    user_b = created_user(register(client, "Person B", *list(b.items())[:2]), "Person B", faces=2)
    body = verify(client, b["img47.jpg"], top_k=5).json()
    assert body["verified"] is True and body["user"]["id"] == user_b["id"]
    assert [c["id"] for c in body["candidates"]] == [user_b["id"]]  # only matches are named
    ranked = verify(client, b["img47.jpg"], top_k=5, include_below_threshold="true").json()  # admin (open mode)
    assert [c["id"] for c in ranked["candidates"]] == [user_b["id"], user_a["id"]]
    body = verify(client, a["img5.jpg"], top_k=1).json()
    assert body["user"]["id"] == user_a["id"] and len(body["candidates"]) == 1

    assert client.delete(f"/api/users/{user_a['id']}").status_code == 204
    body = verify(client, a["img5.jpg"]).json()
    assert body["user"] is None or body["user"]["id"] != user_a["id"], body
    assert user_a["id"] not in [c["id"] for c in body["candidates"]]
    error_of(client.get(f"/api/users/{user_a['id']}"), 404, "USER_NOT_FOUND")
    error_of(client.delete(f"/api/users/{user_a['id']}"), 404, "USER_NOT_FOUND")
    assert client.get(f"/api/users/{user_b['id']}").status_code == 200


@pytest.mark.shared
def test_real_people_inconsistent_registration(client: TestClient, people: dict[str, dict[str, bytes]]) -> None:
    response = register(client, "Mixed", ("a.jpg", people["A"]["img2.jpg"]), ("b.jpg", people["B"]["img8.jpg"]))
    error = error_of(response, 422, "INCONSISTENT_FACES")
    assert error["details"]["file"] in {"a.jpg", "b.jpg"}
    assert error["details"]["similarity"] < error["details"]["threshold"]
    assert users_total(client) == 0


def test_the_response_guard_sees_every_response(client: TestClient, response_log: Any) -> None:
    client.get("/health/live")
    assert response_log.responses[-1].request.url.path == "/health/live"
    assert not response_log.problems()
