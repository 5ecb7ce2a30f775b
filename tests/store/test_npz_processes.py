"""The store behind a real two-worker server (``uvicorn --workers 2``): every worker sees every write at once.

tests/services/test_store.py covers the store itself across processes (concurrent writers, SIGKILL); this
file checks the same guarantee end to end over HTTP, where consecutive requests land on either worker.
Which worker answered each request is read from the access log (each line starts with the worker's pid),
and every check repeats until both workers have answered it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from api.store.npz import NpzFaceStore
from tests.helpers import JPEG

ROUNDS = 25  # of 8 concurrent requests on fresh connections, until both workers have answered


def on_both_workers(server: Any, method: str, path: str, **kwargs: Any) -> list[httpx.Response]:
    """Send ``method path`` repeatedly, 8 at a time on new connections, until two workers have answered it.

    ``path`` must be unique to this call (add an ignored query parameter) so its access-log lines are its own.
    """
    responses: list[httpx.Response] = []
    lock = threading.Lock()

    def one() -> None:
        response = httpx.request(method, server.url + path, timeout=120, **kwargs)  # a new connection each time
        with lock:
            responses.append(response)

    for _ in range(ROUNDS):
        threads = [threading.Thread(target=one) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if len(set(server.access_pids(f"{method} {path} "))) >= 2:
            return responses
    pytest.fail(f"{ROUNDS * 8} requests {method} {path} all landed on one worker: {server.access_pids(method)[:5]}")


def listed(responses: list[httpx.Response]) -> set[tuple[tuple[str, str, int], ...]]:
    """The distinct user lists that the responses show."""
    for response in responses:
        assert response.status_code == 200, response.text
    return {tuple((u["id"], u["name"], u["faces"]) for u in r.json()["items"]) for r in responses}


def test_two_workers_share_the_store(live_server: Callable, tmp_path: Path) -> None:
    """Without models (they fail to load at once): users written by a third process, renamed and deleted
    over HTTP; every request on either worker sees the latest state."""
    server = live_server(workers=2, wait_ready=False, FACE_EMBEDDER="none")
    store = NpzFaceStore(tmp_path / "face_database.npz")  # the file the server uses
    rng = np.random.default_rng(0)
    users = [store.add_user(f"user {i}", rng.standard_normal((i + 1, 16)).astype(np.float32), "m") for i in range(3)]
    expected = tuple((u.id, u.name, u.faces) for u in users)

    assert listed(on_both_workers(server, "GET", "/api/users?check=written")) == {expected}

    renamed = httpx.patch(f"{server.url}/api/users/{users[1].id}", json={"name": "renamed"}, timeout=30)
    assert renamed.status_code == 200 and renamed.json()["name"] == "renamed"
    expected = (expected[0], (users[1].id, "renamed", 2), expected[2])
    assert listed(on_both_workers(server, "GET", "/api/users?check=renamed")) == {expected}
    assert {r.json()["name"] for r in on_both_workers(server, "GET", f"/api/users/{users[1].id}?c=1")} == {"renamed"}

    assert httpx.delete(f"{server.url}/api/users/{users[0].id}", timeout=30).status_code == 204
    assert listed(on_both_workers(server, "GET", "/api/users?check=deleted")) == {expected[1:]}
    gone = on_both_workers(server, "GET", f"/api/users/{users[0].id}?check=deleted")
    assert {(r.status_code, r.json()["error"]["code"]) for r in gone} == {(404, "USER_NOT_FOUND")}
    assert {r.json()["users"] for r in on_both_workers(server, "GET", "/?check=deleted")} == {2}
    assert [u.id for u in NpzFaceStore(tmp_path / "face_database.npz").list_users()[0]] == [u.id for u in users[1:]]


@pytest.mark.slow
def test_two_workers_register_list_verify_and_delete(
    live_server: Callable, astronaut: np.ndarray, to_jpeg: Callable[..., bytes]
) -> None:
    """With the models loaded in both workers: registrations and a deletion over HTTP, seen by both."""
    server = live_server(workers=2)
    deadline = time.monotonic() + 180
    attempt = 0
    while {r.status_code for r in on_both_workers(server, "GET", f"/health/ready?attempt={attempt}")} != {200}:
        assert time.monotonic() < deadline, "the second worker did not load its models in time"
        attempt += 1
        time.sleep(1)

    photos = {
        "original": to_jpeg(astronaut),
        "mirrored": to_jpeg(np.ascontiguousarray(astronaut[:, ::-1])),
        "rescaled": to_jpeg(np.asarray(Image.fromarray(astronaut).resize((400, 400), Image.Resampling.BILINEAR))),
    }
    ids = {}
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for name, photo in photos.items():  # separate requests, on whichever worker
            response = http.post(
                "/api/register",
                data={"name": name, "allow_duplicate": "true"},
                files={"files": (f"{name}.jpg", photo, JPEG)},
                headers={"connection": "close"},
            )
            assert response.status_code == 201, response.text
            ids[name] = response.json()["user"]["id"]

    expected = tuple((ids[name], name, 1) for name in photos)
    assert listed(on_both_workers(server, "GET", "/api/users?check=registered")) == {expected}
    probe = {"data": {"top_k": "5"}, "files": {"file": ("p.jpg", photos["mirrored"], JPEG)}}
    verified = on_both_workers(server, "POST", "/api/verify?check=registered", **probe)
    for response in verified:
        body = response.json()
        assert body["verified"] is True and {c["id"] for c in body["candidates"]} == set(ids.values()), body

    assert httpx.delete(f"{server.url}/api/users/{ids['mirrored']}", timeout=30).status_code == 204
    assert listed(on_both_workers(server, "GET", "/api/users?check=deleted")) == {(expected[0], expected[2])}
    gone = on_both_workers(server, "GET", f"/api/users/{ids['mirrored']}?check=deleted")
    assert {r.status_code for r in gone} == {404}
    verified = on_both_workers(server, "POST", "/api/verify?check=deleted", **probe)
    for response in verified:
        candidates = {c["id"] for c in response.json()["candidates"]}
        assert candidates == {ids["original"], ids["rescaled"]}, response.text
