"""Fixtures shared by the test suite: the development data folder and models built once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# api first (conftest is imported before any test module): it pins thread pools before numpy, OpenCV or
# TensorFlow load, so numpy is imported lazily below.
import api  # noqa: F401
from tests.helpers import jpeg_bytes, wait_for_server
from tools.common import FACEDATA

if TYPE_CHECKING:
    import numpy as np

REPO = Path(__file__).resolve().parents[1]
KERAS_MODEL = REPO / "face_embedding_model.keras"
FACENET_MODEL = REPO / "facenet_embedding_model.keras"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared/facedata`` (or $FACE_SHARED_DIR/facedata); tests that need it skip on a fresh clone."""
    if not FACEDATA.is_dir():
        pytest.skip(
            f"development data folder {FACEDATA} is absent (it lives beside the checkout, never in it; "
            "set FACE_SHARED_DIR to use another location)"
        )
    return FACEDATA


def _built_model(repo_file: Path, build: Callable[[], Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``repo_file`` when set-up made it, else a fresh build of it in a temporary folder; either way with its
    ONNX export beside it (what the service runs)."""
    from api.ml.runtime import export_onnx, onnx_path_of

    path = repo_file
    if not repo_file.is_file():
        path = tmp_path_factory.mktemp("models") / repo_file.name
        build().save(path)
    onnx_path = onnx_path_of(path)
    if not onnx_path.is_file() or onnx_path.stat().st_mtime < path.stat().st_mtime:
        export_onnx(path)
    return path


@pytest.fixture(scope="session")
def keras_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repo-root ``face_embedding_model.keras`` (dlib's ResNet), or a fresh build of it."""
    from api.ml.dlib_resnet import build_from_dat

    return _built_model(KERAS_MODEL, build_from_dat, tmp_path_factory)


@pytest.fixture(scope="session")
def facenet_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repo-root ``facenet_embedding_model.keras``, or a fresh build of it."""
    from api.ml.facenet import build_from_graph

    return _built_model(FACENET_MODEL, build_from_graph, tmp_path_factory)


@pytest.fixture(scope="session")
def engine(keras_model_path: Path):
    """The service's recognition pipeline (YuNet + similarity alignment + Keras dlib ResNet), built once."""
    from api.config import Settings
    from api.services.engine import build_engine

    return build_engine(Settings(embedding_model_path=keras_model_path))


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """skimage's astronaut (512x512 RGB, public domain): one frontal face, available without ../shared."""
    import numpy
    import skimage.data

    return numpy.ascontiguousarray(skimage.data.astronaut())


@pytest.fixture(scope="session")
def dlib_landmarks() -> Callable:
    """``find(image_rgb) -> dlib.full_object_detection | None``: dlib's HOG detector + 5-point predictor.

    None unless HOG finds exactly one face. Large images are searched on a <= 640 px copy (HOG is slow on
    big photos) and the box is scaled back, so the landmarks are those of the image given.
    """
    import cv2
    import dlib
    import face_recognition_models

    hog = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())

    def find(image_rgb: np.ndarray):
        factor = min(1.0, 640 / max(image_rgb.shape[:2]))
        work = image_rgb
        if factor < 1.0:
            work = cv2.resize(image_rgb, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
        detections = hog(work, 1 if max(work.shape[:2]) < 400 else 0)
        if len(detections) != 1:
            return None
        d = detections[0]
        rect = dlib.rectangle(*(round(v / factor) for v in (d.left(), d.top(), d.right(), d.bottom())))
        return predictor(image_rgb, rect)

    return find


# --- the HTTP API: one app (one model load) per session, a clean store per test --------------------------

READY_TIMEOUT_S = 180.0


def _wait_ready(client, timeout_s: float = READY_TIMEOUT_S) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get("/health/ready")
        if response.status_code == 200:
            return
        if response.json().get("status") == "failed":
            pytest.fail("the models failed to load (see the log above)")
        if time.monotonic() > deadline:
            pytest.fail(f"the models were not ready after {timeout_s:.0f} s")
        time.sleep(0.2)


class ResponseLog:
    """Every response the session client received during the current test (checked after each test)."""

    def __init__(self) -> None:
        self.responses: list = []

    def __call__(self, response) -> None:
        response.read()
        self.responses.append(response)

    def problems(self) -> list[str]:
        import re

        found = []
        for r in self.responses:
            if r.status_code >= 500 and r.status_code != 503:
                found.append(f"{r.request.method} {r.request.url.path} -> {r.status_code}: {r.text[:300]}")
            if "Traceback" in r.text or re.search(r'\.py\\?", line \d', r.text):
                found.append(f"{r.request.method} {r.request.url.path} leaked a traceback: {r.text[:300]}")
        return found


@pytest.fixture(scope="session")
def to_jpeg() -> Callable[..., bytes]:
    """``to_jpeg(image_rgb, quality=92) -> bytes``."""
    return jpeg_bytes


@pytest.fixture(scope="session")
def response_log() -> ResponseLog:
    return ResponseLog()


@pytest.fixture(scope="session")
def app_settings(tmp_path_factory: pytest.TempPathFactory, keras_model_path: Path):
    """The settings of the session's app (``app_client``)."""
    from api.config import Settings

    return Settings(
        store_path=tmp_path_factory.mktemp("store") / "face_database.npz",
        embedding_model_path=keras_model_path,
        # The suite sends far more requests than a real client; the limiter has tests of its own.
        rate_limit="100000/minute",
        audit_log_path=tmp_path_factory.mktemp("audit") / "audit.log",
    )


@pytest.fixture(scope="session")
def app_client(app_settings, response_log: ResponseLog):
    """A TestClient of ``create_app`` with the models loaded (once for the whole session).

    Prefer the function-scoped ``client``: it gives each test an empty store and checks that no response
    was a 500 or carried a traceback.
    """
    from fastapi.testclient import TestClient

    from api.main import create_app

    with TestClient(create_app(app_settings), client=("127.0.0.1", 50000)) as client:
        _wait_ready(client)
        client.event_hooks["response"].append(response_log)
        yield client


class Overrides:
    """``overrides[dependency] = value``: the app answers with ``value`` for that dependency (FastAPI's
    ``dependency_overrides``) until the end of the test."""

    def __init__(self, app) -> None:
        self.app = app
        self.saved = dict(app.dependency_overrides)

    def __setitem__(self, dependency: Callable, value: object) -> None:
        self.app.dependency_overrides[dependency] = lambda: value

    def __delitem__(self, dependency: Callable) -> None:
        self.app.dependency_overrides.pop(dependency, None)

    def restore(self) -> None:
        self.app.dependency_overrides.clear()
        self.app.dependency_overrides.update(self.saved)


@pytest.fixture
def overrides(app_client):
    replaced = Overrides(app_client.app)
    try:
        yield replaced
    finally:
        replaced.restore()


@pytest.fixture
def client_store(tmp_path: Path, app_settings):
    """The empty store that ``client`` serves for this test."""
    from api.store.npz import NpzFaceStore

    return NpzFaceStore(tmp_path / "face_database.npz", lock_timeout_s=app_settings.store_lock_timeout_s)


@pytest.fixture
def client(app_client, overrides: Overrides, client_store, response_log: ResponseLog):
    """The session client on an empty store of its own (``client_store``); checks after the test that no
    response was a 500 or carried a traceback."""
    from api.deps import get_store

    overrides[get_store] = client_store
    response_log.responses.clear()
    yield app_client
    problems = response_log.problems()
    response_log.responses.clear()
    assert not problems, "responses that must never happen:\n" + "\n".join(problems)


@pytest.fixture(scope="session")
def astronaut_jpeg(astronaut: np.ndarray) -> bytes:
    """One frontal face of ~90x110 px in a 512x512 JPEG."""
    return jpeg_bytes(astronaut)


@pytest.fixture(scope="session")
def no_face_jpeg() -> bytes:
    """A photo without any face (skimage's coffee cup)."""
    import skimage.data

    return jpeg_bytes(skimage.data.coffee())


@pytest.fixture(scope="session")
def tiny_face_jpeg(astronaut: np.ndarray) -> bytes:
    """The astronaut downscaled to 128x128: a face of ~25 px, below the 40 px minimum."""
    import numpy
    from PIL import Image

    return jpeg_bytes(numpy.asarray(Image.fromarray(astronaut).resize((128, 128), Image.Resampling.LANCZOS)))


@pytest.fixture(scope="session")
def two_faces_jpeg(astronaut: np.ndarray) -> bytes:
    """Two astronauts side by side (1024x512): two faces of the same size."""
    import numpy

    return jpeg_bytes(numpy.concatenate([astronaut, astronaut], axis=1))


# --- real servers: uvicorn in a subprocess on a free loopback port ---------------------------------------


class LiveServer:
    """A ``uvicorn --factory api.main:create_app`` process; its log (access lines carry the worker's pid first)
    in ``log_path``."""

    def __init__(self, process, url: str, log_path: Path) -> None:
        self.process = process
        self.url = url
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access_pids(self, request_line: str) -> list[int]:
        """The pid of the worker behind each access-log line containing ``request_line`` (e.g. 'GET /api/users')."""
        lines = self.log().splitlines()
        return [int(line.split(" ", 1)[0]) for line in lines if "uvicorn.access" in line and request_line in line]

    def stop(self) -> None:
        import os
        import signal
        import subprocess

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # uvicorn stops its workers on SIGTERM
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # the session this test started for it
                self.process.wait(timeout=10)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def live_server(tmp_path: Path, keras_model_path: Path):
    """``start(workers=1, wait_ready=True, **env) -> LiveServer``: a real server on a temporary store.

    ``env`` adds ``FACE_*`` variables (e.g. ``FACE_EMBEDDER="none"`` for a server whose models fail to load
    at once). It returns when /health/live answers, and when /health/ready does too if ``wait_ready``.
    Every server started is stopped after the test.
    """
    import json
    import os
    import subprocess

    started: list[LiveServer] = []
    log_config = tmp_path / "log_config.json"
    log_config.write_text(
        json.dumps(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "formatters": {"pid": {"format": "%(process)d %(name)s %(levelname)s %(message)s"}},
                "handlers": {
                    "stderr": {"class": "logging.StreamHandler", "formatter": "pid", "stream": "ext://sys.stderr"}
                },
                "loggers": {
                    "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
                    "uvicorn.access": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
                },
            }
        )
    )

    def start(workers: int = 1, wait_ready: bool = True, **env: str) -> LiveServer:
        port = _free_port()
        log_path = tmp_path / f"server-{port}.log"
        environment = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "FACE_STORE_PATH": str(tmp_path / "face_database.npz"),
            "FACE_EMBEDDING_MODEL_PATH": str(keras_model_path),
            "FACE_AUDIT_LOG_PATH": str(tmp_path / "audit.log"),
            # Open (no keys: loopback callers only, as admin), unencrypted, and not rate limited, whatever a
            # developer's .env says; the tests send far more requests than a real client.
            "FACE_ENV": "test",
            "FACE_API_KEYS": "[]",
            "FACE_STORE_ENCRYPTION_KEY": "",
            "FACE_RATE_LIMIT": "100000/minute",
            **env,
        }
        from api.main import server_command

        command = [*server_command(port, workers=workers), "--log-config", str(log_config)]
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        server = LiveServer(process, f"http://127.0.0.1:{port}", log_path)
        started.append(server)
        path = "/health/ready" if wait_ready else "/health/live"
        wait_for_server(process, server.url + path, server.log, READY_TIMEOUT_S)
        return server

    yield start
    for server in started:
        server.stop()
