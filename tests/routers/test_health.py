"""Status and probes: the root document, /health/live and /health/ready, in-process and on a real server."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from api import __version__
from tests.helpers import JPEG


def test_root_reports_status_version_readiness_users_and_models(client: TestClient, astronaut_jpeg: bytes) -> None:
    body = client.get("/").json()
    assert set(body) == {"status", "version", "ready", "users", "store", "models"}
    assert body["status"] == "ok" and body["version"] == __version__ and body["store"] == "npz"
    assert body["ready"] is True and body["users"] == 0
    models = body["models"]
    assert {"detector", "embedder", "emotion", "liveness"} <= set(models)
    assert models["detector"] and models["embedder"]
    client.post("/api/register", data={"name": "A"}, files={"files": ("a.jpg", astronaut_jpeg, JPEG)})
    assert client.get("/").json()["users"] == 1


def test_probes(client: TestClient) -> None:
    live = client.get("/health/live")
    assert live.status_code == 200 and live.json() == {"status": "ok"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ok"}


def test_probes_while_loading(client: TestClient, overrides: Any) -> None:
    from api.deps import get_loading
    from api.state import ModelLoading

    overrides[get_loading] = ModelLoading()
    assert client.get("/health/live").status_code == 200
    ready = client.get("/health/ready")
    assert ready.status_code == 503 and ready.json() == {"status": "loading"}
    body = client.get("/").json()
    assert body["ready"] is False and body["models"] == {} and body["users"] == 0


def test_server_without_models_serves_probes_users_and_upload_limits(live_server: Callable) -> None:
    """A server whose models cannot load keeps answering, says why, and still enforces the upload limit."""
    server = live_server(wait_ready=False, FACE_EMBEDDER="none", FACE_MAX_UPLOAD_BYTES="65536")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        deadline = time.monotonic() + 120
        while (ready := http.get("/health/ready")).json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.status_code == 503 and ready.json() == {"status": "failed"}
        assert http.get("/health/live").json() == {"status": "ok"}
        assert http.get("/").json()["ready"] is False
        assert http.get("/api/users").json() == {"items": [], "total": 0}
        response = http.post("/api/verify", files={"file": ("a.jpg", b"\xff\xd8\xff" + bytes(1000), JPEG)})
        assert response.status_code == 503 and response.json()["error"]["code"] == "MODEL_UNAVAILABLE"
        assert "none" in response.json()["error"]["message"]

        def chunks() -> Iterator[bytes]:  # a well-formed chunked upload, refused once 64 KiB have arrived
            yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
            for _ in range(16):
                yield bytes(16384)
            yield b"\r\n--x--\r\n"

        multipart = {"content-type": "multipart/form-data; boundary=x"}
        response = http.post("/api/verify", content=chunks(), headers=multipart)
        assert response.request.headers.get("transfer-encoding") == "chunked"
        assert response.status_code == 413, response.text
        assert response.json()["error"] == {
            "code": "PAYLOAD_TOO_LARGE",
            "message": "The request body exceeds 65536 bytes.",
            "details": {"limit": 65536},
        }
        assert http.get("/health/live").status_code == 200  # the server is fine afterwards


def test_liveness_probe_stays_fast_while_8_verify_requests_are_in_flight(
    live_server: Callable, astronaut: np.ndarray, to_jpeg: Callable[..., bytes]
) -> None:
    server = live_server()
    photo = to_jpeg(np.asarray(Image.fromarray(astronaut).resize((1024, 1024), Image.Resampling.BILINEAR)))
    with httpx.Client(base_url=server.url, timeout=60) as http:
        registered = http.post("/api/register", data={"name": "A"}, files={"files": ("a.jpg", photo, JPEG)})
        assert registered.status_code == 201, registered.text
        alone = []  # one verify with nothing else in flight: the yardstick for "queued under load"
        for _ in range(3):
            started = time.perf_counter()
            assert http.post("/api/verify", files={"file": ("a.jpg", photo, JPEG)}).status_code == 200
            alone.append(time.perf_counter() - started)
    median_alone = statistics.median(alone)

    stop = threading.Event()
    verify_spans: list[tuple[float, float]] = []
    statuses: list[int] = []

    def keep_verifying() -> None:  # one request in flight per thread until told to stop
        with httpx.Client(base_url=server.url, timeout=120) as http:
            while not stop.is_set():
                started = time.perf_counter()
                response = http.post("/api/verify", files={"file": ("a.jpg", photo, JPEG)})
                verify_spans.append((started, time.perf_counter()))
                statuses.append(response.status_code)

    probe_spans: list[tuple[float, float]] = []
    with httpx.Client(base_url=server.url, timeout=30) as probe:
        assert probe.get("/health/live").status_code == 200  # connection open before the load starts
        threads = [threading.Thread(target=keep_verifying, daemon=True) for _ in range(8)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.0)  # all 8 uploads sent and queued for inference
            for _ in range(25):
                started = time.perf_counter()
                response = probe.get("/health/live")
                probe_spans.append((started, time.perf_counter()))
                assert response.status_code == 200
                time.sleep(0.04)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=120)

    assert statuses and set(statuses) == {200}, statuses
    assert all(not t.is_alive() for t in threads)
    probe_times = [end - start for start, end in probe_spans]
    median_probe = statistics.median(probe_times)
    median_verify = statistics.median(end - start for start, end in verify_spans)
    # The load was real: verify requests queued behind each other (2 inference threads for 8 requests), so each
    # took several times as long as one alone, and during a typical probe all 8 were in flight. The yardstick is
    # relative: an absolute figure fails on a machine that is simply faster.
    in_flight = [sum(v0 < p0 and v1 > p1 for v0, v1 in verify_spans) for p0, p1 in probe_spans]
    assert median_verify > 2 * median_alone, (
        f"verify took {median_verify * 1000:.0f} ms under load, {median_alone * 1000:.0f} ms alone: no real load"
    )
    assert statistics.median(in_flight) >= 7, f"verify requests in flight during each probe: {in_flight}"
    assert median_probe < 0.05, (
        f"/health/live median {median_probe * 1000:.1f} ms under load (verify median {median_verify * 1000:.0f} ms); "
        f"all probes (ms): {[round(t * 1000, 1) for t in probe_times]}"
    )
