"""Service latency over real HTTP: start-up, verify against a large gallery, register, memory.

Starts ``uvicorn --factory api.main:create_app`` in a subprocess on a temporary store, seeds it with
``--users`` synthetic users (random unit descriptors of the configured embedder, ``FACE_EMBEDDER``, 2 faces
each: search cost is what is measured, not recognition quality), then times requests with httpx:

* start-up: process start until ``/health/ready`` answers 200;
* ``POST /api/verify`` with one 640x480 single-face photo (median and p90 of ``--requests``);
* ``POST /api/emotion`` and ``POST /api/anti-spoof`` with the same photo;
* ``POST /api/register`` with 3 photos of one person (then deleted again);
* ``/health/live`` while 8 verify requests are in flight;
* the server's resident memory now and at its peak (VmRSS / VmHWM).

    python -m tools.load_test --users 1000 --requests 40 --markdown reports/load.md

With ``--concurrency`` it measures throughput instead (:mod:`tools.throughput`): our service in several set-ups
and deepface's own REST API side by side, on one LFW gallery, at each number of concurrent clients::

    python -m tools.load_test --concurrency 1 4 16 --markdown reports/throughput.md --json reports/throughput.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from api.config import REPO_ROOT
from api.main import server_command
from api.store.npz import NpzFaceStore
from tools.common import FACEDATA, configured_embedder, free_port, memory_kb


def jpeg(image: np.ndarray, size: tuple[int, int] | None = None) -> bytes:
    picture = Image.fromarray(image)
    if size:
        picture = picture.resize(size)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def probe_photo() -> bytes:
    """A 640x480 photo with one face: astronaut (ships with scikit-image) letterboxed to 4:3."""
    import skimage.data

    astronaut = skimage.data.astronaut()  # 512x512
    canvas = np.full((480, 640, 3), 200, np.uint8)
    small = np.asarray(Image.fromarray(astronaut).resize((480, 480)))
    canvas[:, 80:560] = small
    return jpeg(canvas)


def register_photos() -> list[bytes]:
    """Three photos of one person: the deepface set when ../shared is here, else astronaut variants."""
    folder = FACEDATA / "identity" / "deepface"
    clusters = folder / "clusters_derived.json"
    if clusters.exists():
        by_person: dict[str, list[str]] = json.loads(clusters.read_text())  # person -> file names
        files = by_person[sorted(by_person)[0]][:3]
        return [(folder / name).read_bytes() for name in files]
    import skimage.data

    astronaut = skimage.data.astronaut()
    return [jpeg(astronaut), jpeg(astronaut[:, ::-1].copy()), jpeg(astronaut, (400, 400))]


def seed(store_path: Path, users: int, model_id: str, dimension: int = 128) -> None:
    store = NpzFaceStore(store_path)
    rng = np.random.default_rng(0)
    for number in range(users):
        vectors = rng.normal(size=(2, dimension)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        store.add_user(f"synthetic {number}", vectors, model_id)


@contextmanager
def running_service(workers: int = 1, **env: str) -> Iterator[tuple[subprocess.Popen, httpx.Client, float]]:
    """The app as ``api.main.server_command`` serves it, on a free port, with ``env`` added to this process's
    environment: its process, a client of it, and the seconds from launch until ``/health/ready`` answered
    200 (with ``workers`` > 1: until several answers in a row did, so that every worker is likely up). The
    server is stopped on leaving."""
    port = free_port()
    launched = time.perf_counter()
    server = subprocess.Popen(
        server_command(port, workers=workers),
        cwd=REPO_ROOT,
        env=dict(os.environ, **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0) as client:
            ready_in_a_row = 0
            while ready_in_a_row < 4 * workers - 3:
                try:
                    ready = client.get("/health/ready").status_code == 200
                    ready_in_a_row = ready_in_a_row + 1 if ready else 0
                    if ready:
                        continue
                except httpx.TransportError:
                    ready_in_a_row = 0
                if server.poll() is not None or time.perf_counter() - launched > 180:
                    raise SystemExit("the service did not become ready within 180 s")
                time.sleep(0.1)
            yield server, client, round(time.perf_counter() - launched, 2)
    finally:
        server.terminate()
        server.wait(timeout=30)


def timed(call) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = call()
    return (time.perf_counter() - started) * 1000.0, response


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        help="throughput mode (tools.throughput): these client concurrency levels, our service in the set-ups "
        "of --targets and deepface's own API side by side on one 1,000-person gallery",
    )
    parser.add_argument(
        "--targets",
        nargs="+",
        choices=["on", "off", "workers2", "before", "deepface"],
        default=["on", "off", "workers2", "before", "deepface"],
        help="throughput mode: batching on / off (1 worker), batching on with --workers 2, the service as it was "
        "before the throughput work (tools.throughput.OUR_CONFIGS), deepface's API",
    )
    parser.add_argument("--burst", type=int, default=96, help="throughput mode: clients of the overload burst")
    args = parser.parse_args()
    if args.concurrency:
        from tools.throughput import compare_side_by_side

        compare_side_by_side(args.concurrency, args.targets, args.burst, args.markdown, args.json)
        return

    model_id, dimension = configured_embedder()
    workdir = Path(tempfile.mkdtemp(prefix="face-load-"))
    store_path = workdir / "store.npz"
    started = time.perf_counter()
    seed(store_path, args.users, model_id, dimension)
    print(f"seeded {args.users} users in {time.perf_counter() - started:.1f} s", flush=True)

    results: dict[str, float | int | str] = {"users": args.users}
    with running_service(FACE_STORE_PATH=str(store_path)) as (server, client, ready_s):
        results["startup_to_ready_s"] = ready_s

        photo = probe_photo()
        verify_ms = []
        for _ in range(args.requests):
            elapsed, response = timed(lambda: client.post("/api/verify", files={"file": ("p.jpg", photo)}))
            response.raise_for_status()
            verify_ms.append(elapsed)
        results["verify_p50_ms"] = round(statistics.median(verify_ms), 1)
        results["verify_p90_ms"] = round(float(np.percentile(verify_ms, 90)), 1)

        for endpoint in ("emotion", "anti-spoof"):
            timings = []
            for _ in range(max(5, args.requests // 2)):
                elapsed, response = timed(
                    lambda endpoint=endpoint: client.post(f"/api/{endpoint}", files={"file": ("p.jpg", photo)})
                )
                if response.status_code == 503:
                    break  # the model is not installed here: nothing to time
                response.raise_for_status()
                timings.append(elapsed)
            if timings:
                results[f"{endpoint.replace('-', '_')}_p50_ms"] = round(statistics.median(timings), 1)

        photos = register_photos()
        register_ms = []
        for _ in range(max(3, args.requests // 8)):
            files = [("files", (f"{i}.jpg", data)) for i, data in enumerate(photos)]
            elapsed, response = timed(
                lambda files=files: client.post(
                    "/api/register", data={"name": "load test", "allow_duplicate": "true"}, files=files
                )
            )
            response.raise_for_status()
            register_ms.append(elapsed)
            client.delete(f"/api/users/{response.json()['user']['id']}")
        results["register_3_photos_p50_ms"] = round(statistics.median(register_ms), 1)

        verify_url = str(client.base_url.join("/api/verify"))
        with ThreadPoolExecutor(8) as pool:
            in_flight = [
                pool.submit(lambda: httpx.post(verify_url, files={"file": ("p.jpg", photo)}, timeout=60))
                for _ in range(8)
            ]
            time.sleep(0.05)
            live_ms = [timed(lambda: client.get("/health/live"))[0] for _ in range(5)]
            for future in in_flight:
                future.result().raise_for_status()
        results["live_while_8_verify_max_ms"] = round(max(live_ms), 1)
        results["live_while_8_verify_p50_ms"] = round(statistics.median(live_ms), 1)
        memory = memory_kb(server.pid)
        results["server_rss_mb"] = round(memory["VmRSS"] / 1024)
        results["server_peak_rss_mb"] = round(memory["VmHWM"] / 1024)

    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        lines = [
            f"Command: `python -m tools.load_test {' '.join(sys.argv[1:])}`",
            "",
            "| measure | value |",
            "|---|---|",
            *(f"| {key} | {value} |" for key, value in results.items()),
        ]
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
