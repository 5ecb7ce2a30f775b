"""The user endpoints over HTTP: list and page, read, rename, delete, add faces; 404 and validation errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.helpers import JPEG, error_of

UNKNOWN_ID = "0" * 32


def register(client: TestClient, name: str, *files: bytes, allow_duplicate: bool = False) -> dict[str, Any]:
    response = client.post(
        "/api/register",
        data={"name": name, "allow_duplicate": str(allow_duplicate).lower()},
        files=[("files", (f"{i}.jpg", data, JPEG)) for i, data in enumerate(files)],
    )
    assert response.status_code == 201, response.text
    return response.json()["user"]


def add_faces(client: TestClient, user_id: str, *named: tuple[str, bytes], **form: Any) -> httpx.Response:
    return client.post(
        f"/api/users/{user_id}/faces", data=form, files=[("files", (name, data, JPEG)) for name, data in named]
    )


@pytest.fixture(scope="module")
def variants(astronaut: np.ndarray, to_jpeg: Callable[..., bytes]) -> list[bytes]:
    """Slightly different photos of the astronaut (mirrored, rescaled, cropped)."""
    mirrored = np.ascontiguousarray(astronaut[:, ::-1])
    rescaled = np.asarray(Image.fromarray(astronaut).resize((420, 420), Image.Resampling.BILINEAR))
    cropped = np.ascontiguousarray(astronaut[20:, 30:])
    return [to_jpeg(mirrored), to_jpeg(rescaled, quality=80), to_jpeg(cropped)]


def test_empty_list(client: TestClient) -> None:
    response = client.get("/api/users")
    assert response.status_code == 200 and response.json() == {"items": [], "total": 0}


def test_read_list_and_page(client: TestClient, astronaut_jpeg: bytes, variants: list[bytes]) -> None:
    users = [
        register(client, f"user {i}", data, allow_duplicate=True) for i, data in enumerate([astronaut_jpeg, *variants])
    ]
    ids = [u["id"] for u in users]
    assert len(set(ids)) == 4

    page = client.get("/api/users").json()
    assert page["total"] == 4 and [u["id"] for u in page["items"]] == ids  # oldest first
    assert page["items"] == users

    assert client.get("/api/users", params={"offset": 1, "limit": 2}).json() == {"items": users[1:3], "total": 4}
    assert client.get("/api/users", params={"offset": 3, "limit": 2}).json() == {"items": users[3:], "total": 4}
    assert client.get("/api/users", params={"offset": 10}).json() == {"items": [], "total": 4}
    walked = [
        u["id"] for offset in range(0, 4) for u in client.get(f"/api/users?offset={offset}&limit=1").json()["items"]
    ]
    assert walked == ids

    one = client.get(f"/api/users/{ids[2]}")
    assert one.status_code == 200 and one.json() == users[2]
    created = datetime.fromisoformat(users[2]["created_at"].replace("Z", "+00:00"))
    assert created.tzinfo is not None and users[2]["updated_at"] == users[2]["created_at"]
    assert client.get("/").json()["users"] == 4


@pytest.mark.parametrize(
    "query", ["offset=-1", "limit=0", "limit=1001", "limit=ten", "offset=1.5"], ids=lambda q: q.replace("=", "-")
)
def test_paging_validation(client: TestClient, query: str) -> None:
    error = error_of(client.get(f"/api/users?{query}"), 422, "VALIDATION_ERROR")
    assert error["details"]["problems"][0]["field"] == query.split("=")[0]


def test_rename(client: TestClient, astronaut_jpeg: bytes) -> None:
    user = register(client, "Old name", astronaut_jpeg)
    response = client.patch(f"/api/users/{user['id']}", json={"name": "Eileen Collins 🚀"})
    assert response.status_code == 200, response.text
    renamed = response.json()
    assert renamed["name"] == "Eileen Collins 🚀" and renamed["id"] == user["id"] and renamed["faces"] == 1
    assert renamed["created_at"] == user["created_at"] and renamed["updated_at"] >= user["updated_at"]
    assert client.get(f"/api/users/{user['id']}").json() == renamed
    body = client.post("/api/verify", files={"file": ("a.jpg", astronaut_jpeg, JPEG)}).json()
    assert body["user"] == {"id": user["id"], "name": "Eileen Collins 🚀"}


@pytest.mark.parametrize("body", [{"name": ""}, {"name": "x" * 201}, {}, {"name": None}, {"nom": "x"}])
def test_rename_validation(client: TestClient, astronaut_jpeg: bytes, body: dict) -> None:
    user = register(client, "Name", astronaut_jpeg)
    error_of(client.patch(f"/api/users/{user['id']}", json=body), 422, "VALIDATION_ERROR")
    assert client.get(f"/api/users/{user['id']}").json()["name"] == "Name"


def test_rename_requires_json(client: TestClient, astronaut_jpeg: bytes) -> None:
    user = register(client, "Name", astronaut_jpeg)
    error_of(client.patch(f"/api/users/{user['id']}", content=b"{not json"), 422, "VALIDATION_ERROR")


def test_unknown_user(client: TestClient, astronaut_jpeg: bytes) -> None:
    error_of(client.get(f"/api/users/{UNKNOWN_ID}"), 404, "USER_NOT_FOUND")
    error_of(client.patch(f"/api/users/{UNKNOWN_ID}", json={"name": "x"}), 404, "USER_NOT_FOUND")
    error_of(client.delete(f"/api/users/{UNKNOWN_ID}"), 404, "USER_NOT_FOUND")
    error_of(add_faces(client, UNKNOWN_ID, ("a.jpg", astronaut_jpeg)), 404, "USER_NOT_FOUND")
    error_of(client.get(f"/api/users/{'x' * 65}"), 422, "VALIDATION_ERROR")  # ids are at most 64 characters


def test_delete(client: TestClient, astronaut_jpeg: bytes, variants: list[bytes]) -> None:
    keep = register(client, "Keep", astronaut_jpeg)
    gone = register(client, "Gone", variants[0], allow_duplicate=True)
    response = client.delete(f"/api/users/{gone['id']}")
    assert response.status_code == 204 and response.content == b""
    assert client.get("/api/users").json() == {"items": [keep], "total": 1}
    error_of(client.get(f"/api/users/{gone['id']}"), 404, "USER_NOT_FOUND")
    error_of(client.delete(f"/api/users/{gone['id']}"), 404, "USER_NOT_FOUND")
    candidates = client.post("/api/verify", files={"file": ("a.jpg", variants[0], JPEG)}).json()["candidates"]
    assert [c["id"] for c in candidates] == [keep["id"]]


def test_add_faces(client: TestClient, astronaut_jpeg: bytes, variants: list[bytes], no_face_jpeg: bytes) -> None:
    user = register(client, "Astronaut", astronaut_jpeg)
    response = add_faces(
        client, user["id"], ("v0.jpg", variants[0]), ("v1.jpg", variants[1]), ("cup.jpg", no_face_jpeg)
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["user"]["id"] == user["id"] and body["user"]["faces"] == 3
    assert body["user"]["updated_at"] >= user["updated_at"]
    assert [(r["file"], r["error"]["code"]) for r in body["rejected"]] == [("cup.jpg", "NO_FACE")]
    assert client.get(f"/api/users/{user['id']}").json()["faces"] == 3
    assert client.get("/api/users").json()["total"] == 1


def test_add_faces_errors(
    client: TestClient, astronaut_jpeg: bytes, variants: list[bytes], no_face_jpeg: bytes, two_faces_jpeg: bytes
) -> None:
    user = register(client, "Astronaut", astronaut_jpeg)
    error_of(add_faces(client, user["id"], ("cup.jpg", no_face_jpeg)), 422, "NO_FACE")
    error_of(add_faces(client, user["id"], ("two.jpg", two_faces_jpeg)), 422, "MULTIPLE_FACES")
    error_of(client.post(f"/api/users/{user['id']}/faces"), 422, "VALIDATION_ERROR")
    # The same face under another user is a duplicate of that user, not of this one.
    other = register(client, "Other", variants[2], allow_duplicate=True)
    error = error_of(add_faces(client, other["id"], ("v0.jpg", variants[0])), 409, "DUPLICATE_FACE")
    assert error["details"]["user"]["id"] == user["id"]
    assert add_faces(client, other["id"], ("v0.jpg", variants[0]), allow_duplicate="true").status_code == 200
    assert client.get(f"/api/users/{user['id']}").json()["faces"] == 1
    assert client.get(f"/api/users/{other['id']}").json()["faces"] == 2


@pytest.mark.shared
def test_add_a_different_persons_face(client: TestClient, shared_dir: Path) -> None:
    folder = shared_dir / "identity" / "deepface"
    clusters = json.loads((folder / "clusters_derived.json").read_text())
    assert "img2.jpg" in clusters["id01"] and "img8.jpg" in clusters["id03"]
    user = register(client, "Person A", (folder / "img2.jpg").read_bytes())
    response = add_faces(client, user["id"], ("b.jpg", (folder / "img8.jpg").read_bytes()))
    assert error_of(response, 422, "INCONSISTENT_FACES")["details"]["file"] == "b.jpg"
    assert client.get(f"/api/users/{user['id']}").json()["faces"] == 1
