"""Collections over HTTP: create, list, delete, the `collection` parameter of every user and recognition
endpoint, API keys bound to collections, and the bad-input rules (nothing changes on any error)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.config import ApiKeyEntry
from api.deps import get_audit, get_authenticator
from api.security import AuditLog, Authenticator, hash_key
from api.store import FaceStore
from tests.helpers import JPEG


def error_code(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["code"]


def register(client: TestClient, photo: bytes, collection: str | None, name: str = "Eileen", **headers: str):
    params = {} if collection is None else {"collection": collection}
    return client.post(
        "/api/register",
        params=params,
        data={"name": name},
        files={"files": ("a.jpg", photo, JPEG)},
        headers=headers,
    )


def verify(client: TestClient, photo: bytes, collection: str | None, **headers: str) -> httpx.Response:
    params = {} if collection is None else {"collection": collection}
    return client.post("/api/verify", params=params, files={"file": ("p.jpg", photo, JPEG)}, headers=headers)


@pytest.fixture
def mirrored_jpeg(astronaut: np.ndarray, to_jpeg) -> bytes:
    return to_jpeg(np.ascontiguousarray(astronaut[:, ::-1]))


def test_create_list_and_delete(client: TestClient, astronaut_jpeg: bytes) -> None:
    listed = client.get("/api/collections")
    assert listed.status_code == 200
    assert [(c["name"], c["users"], c["faces"]) for c in listed.json()] == [("default", 0, 0)]

    created = client.post("/api/collections", json={"name": "site-berlin"})
    assert created.status_code == 201 and created.json()["name"] == "site-berlin" and created.json()["users"] == 0
    assert error_code(client.post("/api/collections", json={"name": "site-berlin"}), 409) == "COLLECTION_EXISTS"
    assert register(client, astronaut_jpeg, "site-berlin").status_code == 201
    one = client.get("/api/collections/site-berlin").json()
    assert (one["users"], one["faces"]) == (1, 1)

    refused = client.delete("/api/collections/site-berlin")
    assert error_code(refused, 409) == "COLLECTION_NOT_EMPTY"
    assert client.get("/api/collections/site-berlin").json()["users"] == 1  # nothing changed
    deleted = client.delete("/api/collections/site-berlin", params={"force": "true"})
    assert deleted.status_code == 200 and deleted.json() == {"name": "site-berlin", "users_deleted": 1}
    assert error_code(client.get("/api/collections/site-berlin"), 404) == "COLLECTION_NOT_FOUND"
    assert [c["name"] for c in client.get("/api/collections").json()] == ["default"]


@pytest.mark.parametrize("name", ["", "Upper", "with space", "x" * 65, "dot.ted", "ünï"])
def test_invalid_names_are_422_and_create_nothing(client: TestClient, name: str) -> None:
    assert error_code(client.post("/api/collections", json={"name": name}), 422) == "VALIDATION_ERROR"
    assert error_code(client.get("/api/users", params={"collection": name}), 422) == "VALIDATION_ERROR"
    assert [c["name"] for c in client.get("/api/collections").json()] == ["default"]


def test_default_cannot_be_deleted(client: TestClient) -> None:
    for force in ("false", "true"):
        assert error_code(client.delete("/api/collections/default", params={"force": force}), 409) == (
            "COLLECTION_PROTECTED"
        )
    assert [c["name"] for c in client.get("/api/collections").json()] == ["default"]


def test_unknown_collection_is_404_everywhere_and_registration_does_not_create_it(
    client: TestClient, astronaut_jpeg: bytes
) -> None:
    for response in (
        register(client, astronaut_jpeg, "nope"),
        verify(client, astronaut_jpeg, "nope"),
        client.get("/api/users", params={"collection": "nope"}),
        client.get("/api/users/0123", params={"collection": "nope"}),
        client.delete("/api/collections/nope"),
    ):
        assert error_code(response, 404) == "COLLECTION_NOT_FOUND"
    assert [c["name"] for c in client.get("/api/collections").json()] == ["default"]
    assert client.get("/api/users").json()["total"] == 0


def test_the_same_face_in_two_collections_is_isolated(
    client: TestClient, astronaut_jpeg: bytes, mirrored_jpeg: bytes
) -> None:
    for name in ("team-a", "team-b"):
        assert client.post("/api/collections", json={"name": name}).status_code == 201
    a = register(client, astronaut_jpeg, "team-a")
    b = register(client, astronaut_jpeg, "team-b")  # no DUPLICATE_FACE: the duplicate check sees team-b only
    assert a.status_code == 201 and b.status_code == 201, (a.text, b.text)
    a_id, b_id = a.json()["user"]["id"], b.json()["user"]["id"]
    assert (a.json()["user"]["collection"], b.json()["user"]["collection"]) == ("team-a", "team-b")
    duplicate = register(client, astronaut_jpeg, "team-a", name="again")
    assert error_code(duplicate, 409) == "DUPLICATE_FACE"

    found = verify(client, mirrored_jpeg, "team-a").json()
    assert found["verified"] is True and found["user"]["id"] == a_id
    assert {c["id"] for c in found["candidates"]} == {a_id}
    assert verify(client, mirrored_jpeg, "team-b").json()["user"]["id"] == b_id
    assert verify(client, mirrored_jpeg, None).json()["candidates"] == []  # default holds nobody

    # A user id of another collection is 404, never the user.
    for response in (
        client.get(f"/api/users/{b_id}", params={"collection": "team-a"}),
        client.patch(f"/api/users/{b_id}", params={"collection": "team-a"}, json={"name": "x"}),
        client.delete(f"/api/users/{b_id}", params={"collection": "team-a"}),
        client.post(
            f"/api/users/{b_id}/faces", params={"collection": "team-a"}, files={"files": ("a.jpg", mirrored_jpeg, JPEG)}
        ),
        client.get(f"/api/users/{b_id}"),
    ):
        assert error_code(response, 404) == "USER_NOT_FOUND"
        assert "Eileen" not in response.text
    assert client.get(f"/api/users/{b_id}", params={"collection": "team-b"}).json()["name"] == "Eileen"
    listed = client.get("/api/users", params={"collection": "team-a"}).json()
    assert [u["id"] for u in listed["items"]] == [a_id] and listed["total"] == 1
    assert client.get("/api/users").json() == {"items": [], "total": 0}
    assert client.get("/").json()["users"] == 2


def test_the_threshold_counts_only_the_collection_searched(
    client: TestClient, client_store: FaceStore, astronaut_jpeg: bytes
) -> None:
    rng = np.random.default_rng(0)
    client.post("/api/collections", json={"name": "big"})
    model_id = client.get("/").json()["models"]["embedder"]
    for i in range(300):
        faces = rng.standard_normal((1, 128)).astype(np.float32)
        client_store.add_user(f"s{i}", faces / np.linalg.norm(faces), model_id, collection="big")
    small = verify(client, astronaut_jpeg, None).json()["threshold"]
    big = verify(client, astronaut_jpeg, "big").json()["threshold"]
    assert big > small  # 300 users in "big", none in default


@pytest.fixture
def bound_keys(client: TestClient, overrides: Any, tmp_path: Path) -> tuple[dict[str, str], Path]:
    """Keys: ``a`` (admin, bound to team-a), ``ac`` (client, bound to team-a), ``all`` (admin, every collection)."""
    keys = {"a": "key-a-0123456789", "ac": "key-ac-0123456789", "all": "key-all-0123456789"}
    overrides[get_authenticator] = Authenticator(
        [
            ApiKeyEntry(name="a", scope="admin", sha256=hash_key(keys["a"]), collections=["team-a"]),
            ApiKeyEntry(name="ac", scope="client", sha256=hash_key(keys["ac"]), collections=["team-a"]),
            ApiKeyEntry(name="all", scope="admin", sha256=hash_key(keys["all"])),
        ]
    )
    audit_path = tmp_path / "audit.log"
    overrides[get_audit] = AuditLog(audit_path)
    return keys, audit_path


def test_a_key_bound_to_one_collection_cannot_touch_another(
    client: TestClient, bound_keys: tuple[dict[str, str], Path], astronaut_jpeg: bytes, mirrored_jpeg: bytes
) -> None:
    keys, audit_path = bound_keys
    everything = {"X-API-Key": keys["all"]}
    bound = {"X-API-Key": keys["a"]}
    for name in ("team-a", "team-b"):
        assert client.post("/api/collections", json={"name": name}, headers=everything).status_code == 201
    b_id = register(client, astronaut_jpeg, "team-b", **everything).json()["user"]["id"]

    for response in (
        register(client, astronaut_jpeg, "team-b", **bound),
        verify(client, mirrored_jpeg, "team-b", **bound),
        verify(client, mirrored_jpeg, "team-b", **{"X-API-Key": keys["ac"]}),
        verify(client, mirrored_jpeg, None, **bound),  # default is another collection too
        client.get("/api/users", params={"collection": "team-b"}, headers=bound),
        client.get(f"/api/users/{b_id}", params={"collection": "team-b"}, headers=bound),
        client.delete(f"/api/users/{b_id}", params={"collection": "team-b"}, headers=bound),
        client.get("/api/collections/team-b", headers=bound),
        client.delete("/api/collections/team-b", params={"force": "true"}, headers=bound),
        client.delete("/api/collections/not-there", headers=bound),  # same answer whether it exists or not
        client.post("/api/collections", json={"name": "team-c"}, headers=bound),
    ):
        assert error_code(response, 403) == "FORBIDDEN"
        assert b_id not in response.text
    assert client.get(f"/api/users/{b_id}", params={"collection": "team-b"}, headers=everything).status_code == 200
    assert [c["name"] for c in client.get("/api/collections", headers=bound).json()] == ["team-a"]

    a = register(client, astronaut_jpeg, "team-a", **bound)
    assert a.status_code == 201
    assert (
        verify(client, mirrored_jpeg, "team-a", **{"X-API-Key": keys["ac"]}).json()["user"]["id"]
        == (a.json()["user"]["id"])
    )
    entries = [json.loads(line) for line in audit_path.read_text().splitlines()]
    registrations = [e for e in entries if e["action"] == "register"]
    assert [(e["who"], e["collection"]) for e in registrations] == [("all", "team-b"), ("a", "team-a")]
    assert {e["collection"] for e in entries if e["action"] == "create_collection"} == {"team-a", "team-b"}


def test_openapi_documents_the_collection_parameter(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, method in (
        ("/api/register", "post"),
        ("/api/verify", "post"),
        ("/api/users", "get"),
        ("/api/users/{user_id}", "get"),
        ("/api/users/{user_id}", "patch"),
        ("/api/users/{user_id}", "delete"),
        ("/api/users/{user_id}/faces", "post"),
    ):
        parameters = {p["name"]: p for p in spec["paths"][path][method].get("parameters", [])}
        assert "collection" in parameters, (path, method)
        schema = parameters["collection"]["schema"]
        assert parameters["collection"]["in"] == "query" and schema["default"] == "default", (path, schema)
        assert schema["pattern"] == "^[a-z0-9_-]{1,64}$"
    compare = {p["name"] for p in spec["paths"]["/api/compare"]["post"].get("parameters", [])}
    assert "collection" not in compare  # 1:1 compare is collection-free
    assert {"get", "post"} <= set(spec["paths"]["/api/collections"])
    assert "delete" in spec["paths"]["/api/collections/{name}"]
