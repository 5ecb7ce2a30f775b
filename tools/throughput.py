"""Throughput under concurrent load, side by side in one run (``python -m tools.load_test --concurrency 1 4 16``).

Every target serves the same gallery and gets the same photos:

* the gallery: 1,000 LFW people (the first photo of each of the first 1,000 people, in name order, who have two
  or more photos), plus the person of deepface's ``img1.jpg`` registered with their ``img2.jpg``;
* the load: ``img1.jpg`` (1137x910, the photo the throughput issue measured a new user's experience with) sent
  by ``concurrency`` client threads, each with its own keep-alive connection, ``requests_per_level`` requests
  in all per level, to verify (1:N), emotion and anti-spoofing;
* a recognition check: the second photo of 100 gallery people, one at a time (rank-1 hits), so that a target
  that answers fast but wrong shows it.

Each level reports requests/s (completed requests over the wall time of the level), p50 and p99 latency,
errors (any answer but 200, by status), and the target's resident memory after the run (all its processes).
A burst (``--burst``: many more clients than the service's queue holds) shows shedding and recovery: how many
requests were refused with 503 OVERLOADED and Retry-After, and the latency of single requests just after it.

Without ``../shared`` the gallery is 1,000 synthetic users and the photo scikit-image's astronaut; the report
says so.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from tools.common import FACEDATA, child_pids, lfw_people, memory_kb
from tools.load_test import probe_photo, running_service

Request = tuple[str, dict]  # (path, keyword arguments of httpx.Client.post)
ENDPOINTS = ("verify", "emotion", "anti-spoof")
REFERENCE_PHOTO = FACEDATA / "identity" / "deepface" / "img1.jpg"
REFERENCE_GALLERY_PHOTO = FACEDATA / "identity" / "deepface" / "img2.jpg"  # the same person (id01)
REFERENCE_NAME = "deepface id01"


@dataclass(frozen=True)
class Workload:
    gallery: list[tuple[str, bytes]]  # (name, photo) per person
    photo: bytes  # the load's photo
    probes: list[tuple[str, bytes]]  # (expected name, photo) of the recognition check
    source: str  # what the data are, for the report


def lfw_workload(people: int = 1000, probes: int = 100) -> Workload | None:
    """The LFW gallery and probes described in the module docstring; None without ``../shared``."""
    images = FACEDATA / "identity" / "lfw" / "images"
    if not images.is_dir() or not REFERENCE_PHOTO.is_file():
        return None
    chosen = lfw_people(people, images)
    gallery = [(name, photos[0].read_bytes()) for name, photos in chosen]
    gallery.append((REFERENCE_NAME, REFERENCE_GALLERY_PHOTO.read_bytes()))
    step = max(1, len(chosen) // probes)
    checks = [(name, photos[1].read_bytes()) for name, photos in chosen[::step][:probes]]
    return Workload(gallery, REFERENCE_PHOTO.read_bytes(), checks, f"LFW: {len(chosen)} people + deepface img1/img2")


@dataclass
class Level:
    endpoint: str
    concurrency: int
    seconds: float
    latencies_ms: list[float]
    statuses: Counter[int] = field(default_factory=Counter)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status != 200)

    def row(self) -> dict[str, float | int | str]:
        ok = sorted(self.latencies_ms)
        return {
            "endpoint": self.endpoint,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "rps": round(self.statuses[200] / self.seconds, 2),
            "p50_ms": round(statistics.median(ok), 1) if ok else float("nan"),
            "p99_ms": round(float(np.percentile(ok, 99)), 1) if ok else float("nan"),
            "errors": self.errors,
            "statuses": ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items())),
        }


def drive(
    base_url: str,
    request: Request,
    concurrency: int,
    total: int,
    endpoint: str,
    timeout_s: float = 120,
    for_seconds: float | None = None,
) -> Level:
    """``total`` copies of ``request`` (or as many as ``for_seconds`` allow) from ``concurrency`` threads, each
    on its own keep-alive connection. Latencies are kept for the answers with status 200."""
    path, kwargs = request
    remaining = iter(range(total))
    lock = threading.Lock()
    level = Level(endpoint, concurrency, 0.0, [])
    deadline = None if for_seconds is None else time.perf_counter() + for_seconds

    def client_loop() -> None:
        with httpx.Client(base_url=base_url, timeout=timeout_s) as client:
            while True:
                with lock:
                    if next(remaining, None) is None or (deadline is not None and time.perf_counter() > deadline):
                        return
                started = time.perf_counter()
                try:
                    status = client.post(path, **kwargs).status_code
                except httpx.HTTPError:
                    status = 0  # no answer at all
                elapsed_ms = (time.perf_counter() - started) * 1000.0
                with lock:
                    level.statuses[status] += 1
                    if status == 200:
                        level.latencies_ms.append(elapsed_ms)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client_loop) for _ in range(concurrency)]:
            future.result()
    level.seconds = time.perf_counter() - started
    return level


def process_tree_rss_mb(pid: int) -> float:
    """Resident memory of a server: its process and every descendant (uvicorn's and gunicorn's workers)."""
    total_kb = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            total_kb += memory_kb(current)["VmRSS"]
        except (OSError, KeyError):
            continue
        pending.extend(child_pids(current))
    return round(total_kb / 1024, 1)


def worker_rss_mb(pid: int) -> list[float]:
    """The resident memory of each worker of a server with a supervisor (``--workers N``), else of the process."""
    workers = [c for c in child_pids(pid) if _is_python(c)] or [pid]
    return [round(memory_kb(w)["VmRSS"] / 1024, 1) for w in workers]


def _is_python(pid: int) -> bool:
    try:
        return "python" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return False


@dataclass
class Burst:
    clients: int
    statuses: Counter[int]
    retry_after: Counter[str]
    accepted_p99_ms: float
    seconds: float
    after_p50_ms: float  # single requests once the burst is over: recovered?

    def row(self) -> dict[str, float | int | str]:
        return {
            "clients": self.clients,
            "answered": sum(self.statuses.values()),
            "ok": self.statuses[200],
            "overloaded_503": self.statuses[503],
            "other_errors": sum(n for s, n in self.statuses.items() if s not in (200, 503)),
            "retry_after_s": ", ".join(f"{v}: {n}" for v, n in sorted(self.retry_after.items())) or "-",
            "accepted_p99_ms": round(self.accepted_p99_ms, 1),
            "burst_s": round(self.seconds, 2),
            "after_p50_ms": round(self.after_p50_ms, 1),
        }


def burst(base_url: str, request: Request, clients: int, timeout_s: float = 120) -> Burst:
    """``clients`` requests at the same instant (one each), then 10 single requests."""
    path, kwargs = request
    gate = threading.Barrier(clients)

    def one() -> tuple[int, str | None, float]:
        with httpx.Client(base_url=base_url, timeout=timeout_s) as client:
            gate.wait()
            started = time.perf_counter()
            try:
                response = client.post(path, **kwargs)
            except httpx.HTTPError:
                return 0, None, 0.0
            return response.status_code, response.headers.get("retry-after"), (time.perf_counter() - started) * 1000

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda _: one(), range(clients)))
    seconds = time.perf_counter() - started
    statuses = Counter(status for status, _, _ in answers)
    retry_after = Counter(value for status, value, _ in answers if status == 503 and value is not None)
    accepted = [ms for status, _, ms in answers if status == 200]
    after = drive(base_url, request, 1, 10, "after burst").latencies_ms
    return Burst(
        clients,
        statuses,
        retry_after,
        float(np.percentile(accepted, 99)) if accepted else float("nan"),
        seconds,
        statistics.median(after) if after else float("nan"),
    )


def rank1_hits(
    base_url: str,
    identify: Callable[[bytes], Request],
    name_of: Callable[[httpx.Response], str | None],
    probes: list[tuple[str, bytes]],
) -> tuple[int, int]:
    """(right person named first, probes) over the recognition check, one request at a time."""
    hits = 0
    with httpx.Client(base_url=base_url, timeout=120) as client:
        for expected, photo in probes:
            path, kwargs = identify(photo)
            response = client.post(path, **kwargs)
            hits += response.status_code == 200 and name_of(response) == expected
    return hits, len(probes)


def timed_levels(
    base_url: str, requests: dict[str, Request], levels: list[int], per_level: Callable[[int], int]
) -> Iterator[Level]:
    """Every endpoint at every concurrency level, after two warm-up requests per endpoint."""
    for endpoint, request in requests.items():
        drive(base_url, request, 2, 2, endpoint)
        for concurrency in levels:
            yield drive(base_url, request, concurrency, per_level(concurrency), endpoint)


# --- the side-by-side run ---------------------------------------------------------------------------------
# key: (name, environment, uvicorn workers)
OUR_CONFIGS: dict[str, tuple[str, dict[str, str], int]] = {
    "on": ("service, batching on (1 worker)", {}, 1),
    "off": ("service, batching off (1 worker)", {"FACE_BATCH_MAX_FACES": "1"}, 1),
    "workers2": ("service, batching on (--workers 2)", {}, 2),
    # The service as it was before the throughput work, rebuilt from its settings: TensorFlow runs the models,
    # libfacedetection detects, no batching, 2 requests in inference at once (the rest queue without bound),
    # full-size JPEG decoding.
    "before": (
        "service as before (TensorFlow, no batching, 2 threads, full-size decoding)",
        {
            "FACE_INFERENCE_RUNTIME": "keras",
            "FACE_DETECTOR_RUNTIME": "library",
            "FACE_BATCH_MAX_FACES": "1",
            "FACE_INFERENCE_CONCURRENCY": "2",
            "FACE_MAX_QUEUED_REQUESTS": "100000",
            "FACE_REDUCED_DECODING": "false",
        },
        1,
    ),
}


def our_requests(photo: bytes) -> dict[str, Request]:
    upload = {"files": {"file": ("photo.jpg", photo, "image/jpeg")}}
    return {endpoint: (f"/api/{endpoint}", upload) for endpoint in ENDPOINTS}


def our_identify(photo: bytes) -> Request:
    return "/api/verify", {"files": {"file": ("photo.jpg", photo, "image/jpeg")}}


def our_name(response: httpx.Response) -> str | None:
    body = response.json()
    return body["user"]["name"] if body.get("verified") else None


def register_with_our_service(base_url: str, gallery: list[tuple[str, bytes]], threads: int = 4) -> dict[str, int]:
    """The gallery through ``POST /api/register`` (duplicates allowed: LFW has lookalikes), a few at a time."""

    def one(person: tuple[str, bytes]) -> int:
        name, photo = person
        with httpx.Client(base_url=base_url, timeout=120) as client:
            files = [("files", ("photo.jpg", photo, "image/jpeg"))]
            return client.post("/api/register", data={"name": name, "allow_duplicate": "true"}, files=files).status_code

    with ThreadPoolExecutor(threads) as pool:
        statuses = Counter(pool.map(one, gallery))
    return {"ok": statuses[201], "failed": sum(statuses.values()) - statuses[201]}


def synthetic_workload(users: int = 1000) -> Workload:
    """Without ../shared: scikit-image's astronaut is the whole gallery, the load and the recognition check."""
    photo = probe_photo()
    gallery = [("astronaut", photo)]
    return Workload(gallery, photo, [("astronaut", photo)], "synthetic: scikit-image's astronaut only (no ../shared)")


def requests_per_level(concurrency: int, slow: bool = False) -> int:
    """Enough requests for a stable rate: every client sends several; fewer for a target 10x slower."""
    return max(8, 2 * concurrency) if slow else max(40, 10 * concurrency)


def measure_our_service(
    name: str, env: dict[str, str], workers: int, store: Path, workload: Workload, levels: list[int], burst_clients: int
) -> dict:
    result: dict = {"target": name, "workers": workers}
    requests = our_requests(workload.photo)
    with running_service(workers=workers, FACE_STORE_PATH=str(store), **env) as (server, client, ready_s):
        result["startup_s"] = ready_s
        base = str(client.base_url)
        rss_before = worker_rss_mb(server.pid)
        result["levels"] = [lv.row() for lv in timed_levels(base, requests, levels, requests_per_level)]
        hits, total = rank1_hits(base, our_identify, our_name, workload.probes)
        result["rank1"] = f"{hits}/{total}"
        result["worker_rss_mb_idle"] = rss_before
        result["worker_rss_mb_after"] = worker_rss_mb(server.pid)
        result["server_rss_mb_after"] = process_tree_rss_mb(server.pid)
        if burst_clients:
            result["burst"] = burst(base, requests["verify"], burst_clients).row()
    return result


def measure_deepface_api(workload: Workload, levels: list[int], workdir: Path) -> dict:
    from tools.deepface_api import (
        anti_spoof_request,
        best_match,
        deepface_api_on_postgres,
        emotion_request,
        identify_request,
        prepare_deepface_home,
        register_gallery,
        unavailable_features,
    )

    def name_of(response: httpx.Response) -> str | None:
        match = best_match(response.json())
        return None if match is None else match.get("img_name")

    result: dict = {"target": "deepface API (gunicorn, 1 sync worker, Dlib + opencv, pgvector)", "workers": 1}
    home = prepare_deepface_home(workdir / "deepface_home")
    with deepface_api_on_postgres(home, workdir / "deepface_pg") as (api, startup_s):
        result["startup_s"] = startup_s
        registration = register_gallery(api.base_url, workload.gallery)
        result["registered"] = {k: registration[k] for k in ("ok", "failed", "faces", "seconds", "p50_ms")}
        unavailable = unavailable_features(api.base_url, workload.photo)
        result["unavailable"] = unavailable
        requests = {"verify": identify_request(workload.photo)}
        if "emotion" not in unavailable:
            requests["emotion"] = emotion_request(workload.photo)
        if "anti_spoof" not in unavailable:
            requests["anti-spoof"] = anti_spoof_request(workload.photo)
        per_level = lambda concurrency: requests_per_level(concurrency, slow=True)  # noqa: E731
        result["levels"] = [lv.row() for lv in timed_levels(api.base_url, requests, levels, per_level)]
        hits, total = rank1_hits(api.base_url, identify_request, name_of, workload.probes)
        result["rank1"] = f"{hits}/{total}"
        result["server_rss_mb_after"] = process_tree_rss_mb(api.process.pid)
        result["worker_rss_mb_after"] = worker_rss_mb(api.process.pid)
    return result


def compare_side_by_side(
    levels: list[int], targets: list[str], burst_clients: int, markdown: Path | None, json_path: Path | None
) -> dict:
    """Every target of ``targets`` (on, off, workers2, before, deepface) on the same workload, one after
    another."""
    workload = lfw_workload() or synthetic_workload()
    workdir = Path(tempfile.mkdtemp(prefix="face-throughput-"))
    report: dict = {"workload": workload.source, "levels": levels, "gallery": len(workload.gallery), "targets": []}
    try:
        store = workdir / "gallery.npz"
        print(f"registering {len(workload.gallery)} people with our service ...", flush=True)
        with running_service(FACE_STORE_PATH=str(store)) as (_, client, _):
            started = time.perf_counter()
            registered = register_with_our_service(str(client.base_url), workload.gallery)
            registered["seconds"] = round(time.perf_counter() - started, 1)
        report["our_registration"] = registered
        for key in targets:
            if key == "deepface":
                print("deepface's API ...", flush=True)
                report["targets"].append(measure_deepface_api(workload, levels, workdir))
                continue
            name, env, workers = OUR_CONFIGS[key]
            print(f"{name} ...", flush=True)
            copy = workdir / f"{key}.npz"
            shutil.copyfile(store, copy)
            report["targets"].append(
                measure_our_service(name, env, workers, copy, workload, levels, burst_clients if key == "on" else 0)
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["command"] = "python -m tools.load_test " + " ".join(sys.argv[1:])
    print(json.dumps(report, indent=2))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    if markdown:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(render_markdown(report))
    return report


def render_markdown(report: dict) -> str:
    lines = [
        f"Command: `{report['command']}`",
        "",
        f"Workload: {report['workload']}; gallery {report['gallery']} photos "
        f"(our service registered {report['our_registration']['ok']}).",
        "",
        "| target | endpoint | concurrency | requests/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for target in report["targets"]:
        for level in target["levels"]:
            lines.append(
                f"| {target['target']} | {level['endpoint']} | {level['concurrency']} | {level['rps']} | "
                f"{level['p50_ms']} | {level['p99_ms']} | {level['errors']} |"
            )
    lines += [
        "",
        "| target | rank-1 hits | worker RSS MB (after) | server RSS MB | start-up s |",
        "|---|---|---|---|---|",
    ]
    for target in report["targets"]:
        lines.append(
            f"| {target['target']} | {target.get('rank1')} | {target.get('worker_rss_mb_after')} | "
            f"{target.get('server_rss_mb_after')} | {target.get('startup_s')} |"
        )
    for target in report["targets"]:
        if "burst" in target:
            lines += [
                "",
                f"Burst against {target['target']}: " + ", ".join(f"{k} {v}" for k, v in target["burst"].items()),
            ]
        if target.get("unavailable"):
            lines += ["", f"{target['target']}: " + "; ".join(f"{k}: {v}" for k, v in target["unavailable"].items())]
    return "\n".join(lines) + "\n"
