"""/metrics (Prometheus text format, whole server), request ids and JSON log lines, and the defaults a normal
frontend meets: no per-address cap, a cap on failed authentications, no names for strangers."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.config import ApiKeyEntry
from api.deps import get_authenticator, get_rate_limiter
from api.security import Authenticator, RateLimiter, hash_key
from tests.helpers import JPEG, sample


def test_metrics_count_requests_by_route_and_time_stages(client: TestClient, astronaut_jpeg: bytes) -> None:
    before = client.get("/metrics").text
    client.post("/api/register", data={"name": "A"}, files={"files": ("a.jpg", astronaut_jpeg, JPEG)})
    client.get("/api/users/abc")  # 404 on a templated route
    client.post("/api/verify", files={"file": ("a.jpg", astronaut_jpeg, JPEG)})
    page = client.get("/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    text = page.text
    route = {"method": "GET", "route": "/api/users/{user_id}", "status": "404"}
    assert sample(text, "face_http_requests_total", **route) == sample(before, "face_http_requests_total", **route) + 1
    assert "abc" not in text  # ids in paths never become labels
    assert sample(text, "face_http_requests_total", method="POST", route="/api/register", status="201") >= 1
    assert sample(text, "face_http_request_duration_seconds_count", method="POST", route="/api/verify") >= 1
    assert 'face_http_request_duration_seconds_bucket{le="0.05",method="POST",route="/api/verify"}' in text
    for stage in ("decode", "detect", "align", "embed", "search"):
        assert sample(text, "face_model_stage_duration_seconds_count", stage=stage) >= 1, stage
    assert sample(text, "face_registered_users", collection="default") == 1
    assert "face_inference_queue_depth" in text and "face_model_load_seconds" in text


def test_metrics_need_the_admin_scope_when_keys_are_on(client: TestClient, overrides: Any) -> None:
    keys = {"admin": "metrics-admin-key-0123", "client": "metrics-client-key-0123"}
    overrides[get_authenticator] = Authenticator(
        [ApiKeyEntry(name=scope, scope=scope, sha256=hash_key(key)) for scope, key in keys.items()]
    )
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"X-API-Key": keys["client"]}).status_code == 403
    assert client.get("/metrics", headers={"X-API-Key": keys["admin"]}).status_code == 200


def test_every_response_carries_a_request_id(client: TestClient) -> None:
    first, second = client.get("/health/live"), client.get("/health/live")
    assert re.fullmatch(r"[0-9a-f]{32}", first.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    assert client.get("/", headers={"X-Request-ID": "trace-42"}).headers["x-request-id"] == "trace-42"
    # Not a sane token: replaced rather than echoed into logs.
    assert client.get("/", headers={"X-Request-ID": "bad id\twith tabs"}).headers["x-request-id"] != "bad id"


def test_json_log_lines_carry_the_request_id(live_server: Callable) -> None:
    server = live_server(wait_ready=False, FACE_EMBEDDER="none", FACE_LOG_FORMAT="json")
    response = httpx.get(server.url + "/api/users/nobody", headers={"X-Request-ID": "find-me-7"}, timeout=30)
    assert response.status_code == 404
    deadline = time.monotonic() + 10
    while "find-me-7" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{") and "find-me-7" in line]
    assert lines, server.log()[-2000:]
    access = [entry for entry in lines if entry["logger"] == "api.access"]
    assert access and access[0]["status"] == 404 and access[0]["path"] == "/api/users/nobody"
    assert {"time", "level", "logger", "request_id", "message"} <= set(access[0])


def test_two_workers_report_one_server(live_server: Callable) -> None:
    """Multiprocess mode: whichever worker answers /metrics counts the requests of both."""
    server = live_server(workers=2, wait_ready=False, FACE_EMBEDDER="none")
    total = 40
    counted = {"method": "GET", "route": "/health/live", "status": "200"}
    before = sample(httpx.get(f"{server.url}/metrics", timeout=30).text, "face_http_requests_total", **counted)
    with httpx.Client(timeout=30) as http:
        for i in range(total):  # new connections spread over both workers
            http.get(f"{server.url}/health/live", headers={"connection": "close", "x-request-id": f"r{i}"})
    pids = set(server.access_pids("GET /health/live"))
    if len(pids) < 2:
        pytest.skip(f"all {total} requests landed on one worker ({pids}); nothing to add up")
    for _ in range(6):  # ask several times: either worker must give the whole count
        text = httpx.get(f"{server.url}/metrics", headers={"connection": "close"}, timeout=30).text
        assert sample(text, "face_http_requests_total", **counted) == before + total


def test_a_normal_frontend_is_not_capped_by_default(client: TestClient, overrides: Any) -> None:
    from api.config import Settings

    defaults = Settings()
    assert defaults.rate_limit is None and defaults.auth_failure_limit == "20/minute"
    overrides[get_rate_limiter] = RateLimiter(defaults.rate_limit, defaults.auth_failure_limit)
    codes = [
        client.post("/api/verify", files={"file": ("x.txt", b"not an image", JPEG)}).status_code for _ in range(150)
    ]
    assert 429 not in codes and set(codes) == {415}  # UNSUPPORTED_MEDIA_TYPE each time, never RATE_LIMITED


def test_failed_authentications_are_capped_per_address(client: TestClient, overrides: Any) -> None:
    good = "a-good-key-0123456789"
    overrides[get_authenticator] = Authenticator([ApiKeyEntry(name="app", scope="admin", sha256=hash_key(good))])
    overrides[get_rate_limiter] = RateLimiter(None, "5/minute")
    wrong = [client.get("/api/users", headers={"X-API-Key": f"guess-{i}"}).status_code for i in range(5)]
    assert wrong == [401] * 5
    blocked = client.get("/api/users", headers={"X-API-Key": good})
    assert blocked.status_code == 429 and blocked.json()["error"]["code"] == "RATE_LIMITED"
    assert int(blocked.headers["retry-after"]) >= 1


def test_per_key_rate_limits(client: TestClient, overrides: Any) -> None:
    limited, free = "limited-key-0123456789", "free-key-0123456789"
    overrides[get_authenticator] = Authenticator(
        [
            ApiKeyEntry(name="kiosk", scope="client", sha256=hash_key(limited), rate_limit="3/minute"),
            ApiKeyEntry(name="backend", scope="admin", sha256=hash_key(free)),
        ]
    )
    overrides[get_rate_limiter] = RateLimiter(None, None)
    codes = [client.get("/health/live").status_code for _ in range(2)]
    kiosk = [client.get("/metrics", headers={"X-API-Key": limited}).status_code for _ in range(4)]
    assert codes == [200, 200] and kiosk == [403, 403, 403, 429]  # counted per key, scope checked after
    assert all(client.get("/api/users", headers={"X-API-Key": free}).status_code == 200 for _ in range(10))


def test_an_unmatched_probe_names_nobody(
    client: TestClient, overrides: Any, astronaut: np.ndarray, to_jpeg: Callable[..., bytes]
) -> None:
    """Below the threshold nobody is named unless an admin asks: a client cannot enumerate the gallery.
    (A threshold of 1.0 turns the registered person's own photo into a stranger's.)"""
    client.post("/api/register", data={"name": "Eileen"}, files={"files": ("a.jpg", to_jpeg(astronaut), JPEG)})
    probe = {"file": ("p.jpg", to_jpeg(np.ascontiguousarray(astronaut[:, ::-1])), JPEG)}
    assert client.post("/api/verify", files=probe).json()["verified"] is True
    unmatched = client.post("/api/verify", data={"threshold": "1.0"}, files=probe).json()
    assert unmatched["verified"] is False and unmatched["user"] is None and unmatched["candidates"] == []
    assert "Eileen" not in json.dumps(unmatched)
    asked = client.post("/api/verify", data={"threshold": "1.0", "include_below_threshold": "true"}, files=probe)
    assert [c["name"] for c in asked.json()["candidates"]] == ["Eileen"]  # open mode: the caller is admin

    client_key = "client-key-0123456789"
    overrides[get_authenticator] = Authenticator([ApiKeyEntry(name="c", scope="client", sha256=hash_key(client_key))])
    refused = client.post(
        "/api/verify",
        data={"threshold": "1.0", "include_below_threshold": "true"},
        files=probe,
        headers={"X-API-Key": client_key},
    )
    assert refused.status_code == 403 and "Eileen" not in refused.text


def test_a_server_that_reuses_an_ended_servers_pid_starts_its_counters_at_zero(tmp_path: Path) -> None:
    """The metrics folder is named by the server's pid and start time: the folder of an ended server whose pid
    is now another process's (a restarted container's pid 1) is removed, never resumed."""
    import os

    from api.metrics import _remove_folders_of_ended_servers, _start_ticks

    mine = tmp_path / f"{os.getpid()}-{_start_ticks(os.getpid())}"
    same_pid_earlier_server = tmp_path / f"{os.getpid()}-1"
    live_other = tmp_path / f"1-{_start_ticks(1)}"
    for folder in (mine, same_pid_earlier_server, live_other):
        folder.mkdir()
    _remove_folders_of_ended_servers(tmp_path, keep=mine)
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted([mine.name, live_other.name])
