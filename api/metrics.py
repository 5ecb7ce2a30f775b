"""Prometheus metrics, shared by every worker process of one server (``uvicorn --workers N``).

prometheus-client's multiprocess mode keeps each process's values in memory-mapped files of one folder and
adds them up at scrape time, so ``/metrics`` answers for the whole server whichever worker takes the request.
The folder is ``FACE_METRICS_DIR`` or a temporary one per server: the workers of one uvicorn share their
parent's pid, a single process uses its own. ``PROMETHEUS_MULTIPROC_DIR`` must be set before
prometheus_client is imported, which is why this module sets it first.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def _start_ticks(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, /proc), or "" where there is no /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _server_folder() -> Path:
    configured = os.environ.get("FACE_METRICS_DIR") or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        return Path(configured)
    parent = multiprocessing.parent_process()  # uvicorn's supervisor, for each of its workers
    server_pid = parent.pid if parent is not None and parent.pid is not None else os.getpid()
    # The start time is part of the name: a server that gets the pid of an ended one (every restart of a
    # container whose server is pid 1) must not resume that server's counters.
    return Path(tempfile.gettempdir()) / "face-service-metrics" / f"{server_pid}-{_start_ticks(server_pid)}"


def _remove_folders_of_ended_servers(root: Path, keep: Path) -> None:
    """Folders left by servers that are gone would otherwise pile up (their values are never read again)."""
    with contextlib.suppress(OSError):
        for folder in root.iterdir():
            pid, _, started = folder.name.partition("-")
            if folder == keep or not pid.isdigit():
                continue
            try:
                os.kill(int(pid), 0)
                if started != _start_ticks(int(pid)):
                    raise ProcessLookupError  # that pid belongs to another process now
            except ProcessLookupError:
                shutil.rmtree(folder, ignore_errors=True)
            except PermissionError:
                pass


METRICS_DIR = _server_folder()
METRICS_DIR.mkdir(parents=True, exist_ok=True)
if not os.environ.get("FACE_METRICS_DIR"):
    _remove_folders_of_ended_servers(METRICS_DIR.parent, METRICS_DIR)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(METRICS_DIR)

from prometheus_client import (  # noqa: E402  (after PROMETHEUS_MULTIPROC_DIR, see the module docstring)
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily  # noqa: E402

# Request latency spans fast probes to multi-photo registrations.
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

REQUESTS = Counter("face_http_requests_total", "HTTP requests answered", ["method", "route", "status"])
REQUEST_SECONDS = Histogram(
    "face_http_request_duration_seconds",
    "Time to answer an HTTP request",
    ["method", "route"],
    buckets=_REQUEST_BUCKETS,
)
STAGE_SECONDS = Histogram(
    "face_model_stage_duration_seconds",
    "Time of one model stage call (detect, align, embed, emotion, anti_spoofing, search)",
    ["stage"],
    buckets=_STAGE_BUCKETS,
)
INFERENCE_QUEUE = Gauge(
    "face_inference_queue_depth", "Requests waiting for or running inference", multiprocess_mode="livesum"
)
BATCH_ROWS = Histogram(
    "face_model_batch_rows",
    "Rows (faces) per model call of the dynamic batcher, across requests",
    ["model"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
)
OVERLOADED = Counter("face_overloaded_total", "Requests refused with 503 OVERLOADED (the inference queue was full)")
MODEL_LOAD_SECONDS = Gauge(
    "face_model_load_seconds", "Seconds the models took to load and warm up, per worker", multiprocess_mode="liveall"
)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Time one model stage."""
    started = time.perf_counter()
    try:
        yield
    finally:
        STAGE_SECONDS.labels(name).observe(time.perf_counter() - started)


class _StoreCollector:
    """Registered users per collection, read from the store at scrape time: the store is shared by every
    worker and node, so a per-process gauge would only be stale."""

    def __init__(self, store) -> None:  # api.store.FaceStore
        self.store = store

    def collect(self):
        family = GaugeMetricFamily("face_registered_users", "Registered users per collection", labels=["collection"])
        with contextlib.suppress(Exception):  # an unavailable database must not break the metrics page
            for collection in self.store.list_collections():
                family.add_metric([collection.name], collection.users)
        yield family


def render(store) -> tuple[bytes, str]:
    """The metrics page of the whole server: every worker's values, plus the store's counts."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(_StoreCollector(store))
    return generate_latest(registry), CONTENT_TYPE_LATEST
