"""The PostgreSQL store behind real service processes: several nodes on one database, the database going away
and coming back, and writers killed with SIGKILL.

tests/store/test_postgres.py covers the store object itself; these tests start real ``uvicorn`` servers
(``live_server``) with ``FACE_STORE_URL`` pointing at a fresh database of the session's PostgreSQL.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np
import pytest

from tests.helpers import JPEG
from tests.store.conftest import LocalPostgres

# pgserver's local server trusts socket connections, so a password in the URL is accepted and ignored: it
# stands for a real one, and must never show up in a response or a log line.
PASSWORD = "pw-never-shown-4711"


def with_password(url: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username or 'postgres'}:{PASSWORD}@{parts.hostname or ''}"
    return urlunsplit(parts._replace(netloc=netloc))


def wait_for(probe: Callable[[], bool], timeout_s: float = 180.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not hold within {timeout_s:.0f} s")
        time.sleep(0.25)


def test_two_nodes_on_one_database_see_each_others_writes_at_once(
    live_server: Callable, postgres_url: str, tmp_path: Path, astronaut: np.ndarray, to_jpeg: Callable[..., bytes]
) -> None:
    """Registered through node A: identified by node B at once; deleted through B: gone for A at once."""
    url = with_password(postgres_url)
    node_a = live_server(FACE_STORE_URL=url)
    node_b = live_server(FACE_STORE_URL=url)
    photo = to_jpeg(astronaut)
    probe = to_jpeg(np.ascontiguousarray(astronaut[:, ::-1]))
    with httpx.Client(base_url=node_a.url, timeout=120) as a, httpx.Client(base_url=node_b.url, timeout=120) as b:
        assert a.get("/").json()["store"] == "postgresql"
        registered = a.post("/api/register", data={"name": "Eileen"}, files={"files": ("e.jpg", photo, JPEG)})
        assert registered.status_code == 201, registered.text
        user_id = registered.json()["user"]["id"]

        found = b.post("/api/verify", files={"file": ("p.jpg", probe, JPEG)})
        assert found.status_code == 200 and found.json()["verified"] is True, found.text
        assert found.json()["user"] == {"id": user_id, "name": "Eileen"}
        assert b.get(f"/api/users/{user_id}").json()["name"] == "Eileen"
        assert b.get("/").json()["users"] == 1

        # The duplicate check of node B sees node A's registration.
        again = b.post("/api/register", data={"name": "Twin"}, files={"files": ("e.jpg", photo, JPEG)})
        assert again.status_code == 409 and again.json()["error"]["code"] == "DUPLICATE_FACE"

        assert b.delete(f"/api/users/{user_id}").status_code == 204
        assert a.get(f"/api/users/{user_id}").status_code == 404
        gone = a.post("/api/verify", files={"file": ("p.jpg", probe, JPEG)})
        assert gone.status_code == 200 and gone.json()["verified"] is False and gone.json()["candidates"] == []
        assert a.get("/").json()["users"] == 0
    assert not (tmp_path / "face_database.npz").exists(), "a node wrote the .npz file despite FACE_STORE_URL"
    for node in (node_a, node_b):
        assert PASSWORD not in node.log()


def test_database_down_at_start_up_then_lost_and_back(
    live_server: Callable,
    postgres_server: LocalPostgres,
    postgres_url: str,
    astronaut_jpeg: bytes,
) -> None:
    """Down at start-up: the service starts and says why it is not ready, then becomes ready by itself.
    Lost between requests: 503 STORE_UNAVAILABLE, nothing half-written; back: the same process serves again."""
    url = with_password(postgres_url)
    postgres_server.stop()
    node = live_server(wait_ready=False, FACE_STORE_URL=url)
    with httpx.Client(base_url=node.url, timeout=60) as http:
        # Models load regardless; readiness then names the store as the reason.
        wait_for(lambda: http.get("/health/ready").json()["status"] == "unavailable", what="ready: unavailable")
        ready = http.get("/health/ready")
        assert ready.status_code == 503 and "unavailable" in ready.json()["reason"]
        assert http.get("/").json() | {"version": None, "models": None} == {
            "status": "ok",
            "version": None,
            "ready": True,
            "users": None,
            "store": "postgresql",
            "models": None,
        }
        down = http.get("/api/users")
        assert down.status_code == 503 and down.json()["error"]["code"] == "STORE_UNAVAILABLE"

        postgres_server.start()
        wait_for(lambda: http.get("/health/ready").status_code == 200, timeout_s=60, what="ready again")
        files = {"files": ("a.jpg", astronaut_jpeg, JPEG)}
        created = http.post("/api/register", data={"name": "Before"}, files=files)
        assert created.status_code == 201, created.text

        postgres_server.stop()
        lost = [
            http.get("/api/users"),
            http.post("/api/verify", files={"file": ("a.jpg", astronaut_jpeg, JPEG)}),
            http.post("/api/register", data={"name": "During", "allow_duplicate": "true"}, files=files),
        ]
        for response in lost:
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "STORE_UNAVAILABLE"
        assert http.get("/health/ready").status_code == 503

        postgres_server.start()
        wait_for(lambda: http.get("/health/ready").status_code == 200, timeout_s=60, what="ready after the loss")
        users = http.get("/api/users").json()
        assert [u["name"] for u in users["items"]] == ["Before"], "the registration during the outage half-landed"
        bodies = [r.text for r in lost] + [ready.text]
    assert not any(PASSWORD in text for text in bodies)
    assert PASSWORD not in node.log()


def test_killed_writers_never_lose_acknowledged_registrations(postgres_url: str) -> None:
    """The crash tool against PostgreSQL: every acknowledged write survives a SIGKILL of its writer, the one in
    flight lands whole or not at all, and nothing unexplained appears (the tool checks descriptor values)."""
    from tools.store_crash_test import run

    report = run(postgres_url, kills=8, max_delay_s=0.4, seed=3)
    assert report.ok, report.problems[:5]
    assert report.acknowledged > 8 and report.users_at_end > 0


@pytest.mark.slow
def test_killed_writers_never_lose_acknowledged_registrations_long(postgres_url: str) -> None:
    from tools.store_crash_test import run

    report = run(postgres_url, kills=50, max_delay_s=0.5, seed=4)
    assert report.ok, report.problems[:5]
    assert report.in_flight_applied + report.in_flight_not_applied > 0
