"""Concurrent writes and reads over real HTTP: ``uvicorn api.main:app --workers 2`` sharing one store file.

A seeded random mix of register / add faces / delete / verify / list operations is sent by 8 threads, each
request on a new connection so that both workers take a share. Every operation records when it started and
when its answer arrived. Afterwards:

* every acknowledged registration is present, unless its deletion was acknowledged; every acknowledged
  deletion is gone; ids are unique; each user has exactly 1 + (acknowledged additions) faces;
* no torn reads: every list taken during the run shows unique ids, only users created by a registration
  that had started, every user whose registration was acknowledged before the list started (and whose
  deletion had not started), none whose deletion was acknowledged before, and a face count between the
  acknowledged and the attempted additions; every verify names only registered users;
* both workers answer the same final list, and the store file loads in a fresh process-local store with the
  same users and descriptor rows.

The default run has 100 operations (plus 10 list reads), ~40 s with the server's start-up; a 500-operation
soak is marked ``slow`` (``make test-long``). A burst beyond the inference queue is shed with 503 OVERLOADED.
"""

from __future__ import annotations

import io
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from api.store.npz import NpzFaceStore
from tests.helpers import JPEG, report_line, sample
from tools.common import FACEDATA

THREADS = 8


@dataclass
class Op:
    kind: str
    user_id: str | None = None
    status: int | None = None
    body: Any = None
    started: float = 0.0
    ended: float = 0.0
    error: str | None = None
    path: str = ""


@dataclass
class Run:
    """Shared between the worker threads: which users exist as far as acknowledged answers tell."""

    people: list[list[bytes]]  # photos by person: additions to a user use photos of the same person
    rng: random.Random
    lock: threading.Lock = field(default_factory=threading.Lock)
    live: list[str] = field(default_factory=list)  # acknowledged registrations not (yet) chosen for deletion
    person_of: dict[str, int] = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)

    def photo(self, person: int | None = None) -> tuple[int, bytes]:
        with self.lock:
            if person is None:
                person = self.rng.randrange(len(self.people))
            return person, self.rng.choice(self.people[person])

    def pick(self, remove: bool) -> str | None:
        with self.lock:
            if not self.live:
                return None
            index = self.rng.randrange(len(self.live))
            return self.live.pop(index) if remove else self.live[index]


def photos_for_test(astronaut: np.ndarray, to_jpeg: Callable[..., bytes]) -> list[list[bytes]]:
    """Variants of the astronaut, and real photos of 10 other people (LFW) when ../shared is present."""
    variants = [
        astronaut,
        np.ascontiguousarray(astronaut[:, ::-1]),
        np.asarray(Image.fromarray(astronaut).resize((300, 300), Image.Resampling.BILINEAR)),
        np.ascontiguousarray(astronaut[20:, 30:]),
    ]
    people = [[to_jpeg(v) for v in variants]]
    lfw = FACEDATA / "identity" / "lfw" / "images"
    if lfw.is_dir():
        folders = [p for p in sorted(lfw.iterdir()) if len(list(p.glob("*.jpg"))) >= 3]
        for folder in folders[:: max(1, len(folders) // 10)][:10]:  # 10 people, spread over the alphabet
            people.append([f.read_bytes() for f in sorted(folder.glob("*.jpg"))[:3]])
    return people


def run_op(server_url: str, run: Run, planned: str) -> Op:
    kind = planned
    user_id = None
    if kind in ("add", "delete"):
        user_id = run.pick(remove=kind == "delete")
        if user_id is None:
            kind = "verify"  # nobody to change yet
    op = Op(kind, user_id)
    request: dict[str, Any]
    if kind == "register":
        person, photo = run.photo()
        request = {
            "method": "POST",
            "url": "/api/register",
            "data": {"name": f"person {person} Zoë {run.rng.getrandbits(32):08x}", "allow_duplicate": "true"},
            "files": [("files", ("r.jpg", photo, JPEG))],
        }
    elif kind == "add":
        request = {
            "method": "POST",
            "url": f"/api/users/{user_id}/faces",
            "data": {"allow_duplicate": "true"},
            "files": [("files", ("a.jpg", run.photo(run.person_of[user_id])[1], JPEG))],
        }
    elif kind == "delete":
        request = {"method": "DELETE", "url": f"/api/users/{user_id}"}
    elif kind == "verify":
        request = {
            "method": "POST",
            "url": "/api/verify",
            "data": {"top_k": "100"},
            "files": [("file", ("v.jpg", run.photo()[1], JPEG))],
        }
    else:
        request = {"method": "GET", "url": "/api/users", "params": {"limit": "1000"}}
    op.path = request["url"]
    assert user_id is None or user_id in op.path
    op.started = time.monotonic()
    try:
        with httpx.Client(base_url=server_url, timeout=300) as http:  # a new connection: either worker
            response = http.request(**request)
        op.status = response.status_code
        op.body = response.json() if response.content else None
    except httpx.HTTPError as exc:
        op.error = f"{type(exc).__name__}: {exc}"
    op.ended = time.monotonic()
    if kind == "register" and op.status == 201:
        op.user_id = op.body["user"]["id"]
        with run.lock:
            run.person_of[op.user_id] = person
            run.live.append(op.user_id)
    with run.lock:
        run.ops.append(op)
    return op


def plan(count: int, rng: random.Random) -> list[str]:
    """``count`` writes and verifies (the first ones register, so that there is something to change), with
    ``count // 10`` list reads spread among them."""
    head = ["register"] * min(THREADS, count)
    weights = {"register": 35, "add": 20, "delete": 17, "verify": 28}
    ops = head + rng.choices(list(weights), weights=list(weights.values()), k=count - len(head))
    for _ in range(count // 10):
        ops.insert(rng.randrange(len(head), len(ops) + 1), "list")
    return ops


def wait_until_both_workers_ready(server: Any, timeout_s: float = 300) -> None:
    """/health/ready answers 200 once one worker is ready; poll on new connections until two pids said so."""
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        path = f"/health/ready?attempt={attempt}"
        for _ in range(8):
            httpx.get(server.url + path, timeout=30)
        ready = [
            int(line.split(" ", 1)[0])
            for line in server.log().splitlines()
            if "uvicorn.access" in line and "/health/ready?attempt=" in line and '" 200' in line
        ]
        if len(set(ready)) >= 2:
            return
        time.sleep(1)
    pytest.fail(f"the two workers were not both ready within {timeout_s:.0f} s:\n{server.log()[-3000:]}")


def final_lists_from_both_workers(server: Any) -> list[tuple[tuple[str, str, int], ...]]:
    for attempt in range(40):
        path = f"/api/users?limit=1000&final={attempt}"
        answers = []
        for _ in range(8):
            response = httpx.get(server.url + path, timeout=60)
            assert response.status_code == 200, response.text
            answers.append(tuple((u["id"], u["name"], u["faces"]) for u in response.json()["items"]))
        if len(set(server.access_pids(f"GET {path} "))) >= 2:
            return answers
    pytest.fail("320 list requests all landed on one worker")


FACE_CODES = {"NO_FACE", "MULTIPLE_FACES", "FACE_TOO_SMALL", "INCONSISTENT_FACES"}


def photo_refused(op: Op) -> bool:
    """Refused because of the photo: an LFW crop may show a second face, or look unlike the person's others."""
    return op.kind in ("register", "add", "verify") and op.status == 422 and op.body["error"]["code"] in FACE_CODES


def check_history(ops: list[Op], final: dict[str, int]) -> dict[str, int]:
    unexpected = [o for o in ops if o.error or (o.status not in {200, 201, 204, 404} and not photo_refused(o))]
    assert not unexpected, [(o.kind, o.path, o.status, o.error, o.body) for o in unexpected]
    registered = {o.user_id: o for o in ops if o.kind == "register" and o.status == 201}
    assert len(registered) == sum(o.kind == "register" and o.status == 201 for o in ops), "an id given twice"
    deleted = {o.user_id: o for o in ops if o.kind == "delete" and o.status == 204}
    for o in ops:
        if o.status == 404:  # only a user deleted by an acknowledged deletion may be unknown
            assert o.kind in ("add", "delete") and o.user_id in deleted, (o.kind, o.path, o.body)
    adds: dict[str, list[Op]] = {}
    for o in ops:
        if o.kind == "add":
            adds.setdefault(o.user_id, []).append(o)
            if o.status == 200:
                assert o.body["rejected"] == [] and o.body["user"]["id"] == o.user_id, o.body

    # The final state: exactly the acknowledged registrations minus the acknowledged deletions.
    assert set(final) == set(registered) - set(deleted), "lost or resurrected users"
    for user_id, faces in final.items():
        acknowledged = sum(o.status == 200 for o in adds.get(user_id, []))
        assert faces == 1 + acknowledged, (user_id, faces, acknowledged)

    # Reads during the run: consistent snapshots, never ahead of the writes, never behind acknowledged ones.
    lists = [o for o in ops if o.kind == "list"]
    for read in lists:
        assert read.status == 200, read.body
        items = read.body["items"]
        ids = [u["id"] for u in items]
        assert len(ids) == len(set(ids)) == read.body["total"], "duplicate ids or a torn page"
        for user in items:
            origin = registered.get(user["id"])
            assert origin is not None and origin.started < read.ended, "a user nobody registered"
            user_adds = adds.get(user["id"], [])
            low = 1 + sum(a.status == 200 and a.ended < read.started for a in user_adds)
            high = 1 + sum(a.started < read.ended for a in user_adds)
            assert low <= user["faces"] <= high, (user, low, high)
        for user_id, origin in registered.items():
            removal = next((o for o in ops if o.kind == "delete" and o.user_id == user_id), None)
            if origin.ended < read.started and (removal is None or removal.started > read.ended):
                assert user_id in ids, "an acknowledged registration is missing from a later read"
            if removal is not None and removal.status == 204 and removal.ended < read.started:
                assert user_id not in ids, "an acknowledged deletion is visible in a later read"
    for o in ops:
        if o.kind == "verify" and o.status != 422:
            assert o.status == 200, o.body
            candidates = [c["id"] for c in o.body["candidates"]]
            assert len(candidates) == len(set(candidates)) and set(candidates) <= set(registered), o.body
            similarities = [c["similarity"] for c in o.body["candidates"]]
            assert similarities == sorted(similarities, reverse=True)
    return Counter(o.kind + (f" {o.status}" if o.status != 200 else "") for o in ops)


def concurrent_run(
    live_server: Callable, tmp_path: Path, people: list[list[bytes]], count: int, request: pytest.FixtureRequest
) -> None:
    started = time.monotonic()
    server = live_server(workers=2, FACE_INFERENCE_TIMEOUT_S="600", FACE_RATE_LIMIT="1000000/minute")
    wait_until_both_workers_ready(server)
    ready_s = time.monotonic() - started

    run = Run(people, random.Random(count))
    t0 = time.monotonic()
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(lambda kind: run_op(server.url, run, kind), plan(count, run.rng)))
    ops_s = time.monotonic() - t0

    answers = final_lists_from_both_workers(server)
    assert len(set(answers)) == 1, "the two workers disagree about the users"
    final = {user_id: faces for user_id, _, faces in answers[0]}
    assert len(final) == len(answers[0]), "duplicate ids in the final list"
    tally = check_history(run.ops, final)

    store = NpzFaceStore(tmp_path / "face_database.npz")  # the server's file, read by a fresh instance
    records, total = store.list_users()
    assert total == len(final) and [(r.id, r.name, r.faces) for r in records] == list(answers[0])
    for record in records:
        assert store.embeddings_of(record.id).shape == (record.faces, 128)

    pids = Counter(
        int(line.split(" ", 1)[0])
        for line in server.log().splitlines()
        if "uvicorn.access" in line and ('"POST /api/' in line or '"DELETE /api/' in line)
    )
    assert len(pids) == 2, f"the writes did not reach both workers: {pids}"
    line = (
        f"CONCURRENCY {count} ops + {count // 10} lists, {THREADS} threads, 2 workers: {dict(sorted(tally.items()))}; "
        f"{len(final)} users at the end; requests per worker {sorted(pids.values())}; "
        f"ops {ops_s:.0f} s (start-up {ready_s:.0f} s)"
    )
    report_line(request, line)
    print(line)


@pytest.fixture(scope="module")
def people(astronaut: np.ndarray, to_jpeg: Callable[..., bytes]) -> list[list[bytes]]:
    found = photos_for_test(astronaut, to_jpeg)
    for photos in found:
        for data in photos:
            Image.open(io.BytesIO(data)).verify()
    return found


def test_100_concurrent_operations_on_two_workers(
    live_server: Callable, tmp_path: Path, people: list[list[bytes]], request: pytest.FixtureRequest
) -> None:
    concurrent_run(live_server, tmp_path, people, 100, request)


@pytest.mark.slow
def test_500_concurrent_operations_on_two_workers(
    live_server: Callable, tmp_path: Path, people: list[list[bytes]], request: pytest.FixtureRequest
) -> None:
    concurrent_run(live_server, tmp_path, people, 500, request)


def test_a_burst_beyond_the_queue_is_shed_with_503_overloaded_and_the_service_recovers(
    live_server: Callable, astronaut_jpeg: bytes
) -> None:
    """One inference at a time and two waiting: a burst of 16 verifies gets quick 503 OVERLOADED answers with
    Retry-After for what does not fit, never a timeout or a 500; every accepted request succeeds, and once
    the burst is over the service answers as before."""
    server = live_server(FACE_INFERENCE_CONCURRENCY="1", FACE_MAX_QUEUED_REQUESTS="2")
    photo = astronaut_jpeg
    with httpx.Client(base_url=server.url, timeout=120) as http:
        registered = http.post("/api/register", data={"name": "A"}, files={"files": ("a.jpg", photo, JPEG)})
        assert registered.status_code == 201, registered.text
        refused_before = sample(http.get("/metrics").text, "face_overloaded_total")

    gate = threading.Barrier(16)

    def one() -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            gate.wait()
            return http.post("/api/verify", files={"file": ("a.jpg", photo, JPEG)})

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: one(), range(16)))
    statuses = Counter(a.status_code for a in answers)
    assert set(statuses) == {200, 503}, statuses
    assert statuses[200] >= 3 and statuses[503] >= 1, statuses
    for answer in answers:
        if answer.status_code == 503:
            assert answer.json()["error"]["code"] == "OVERLOADED", answer.text
            assert int(answer.headers["Retry-After"]) >= 1
        else:
            assert answer.json()["verified"] is True
    with httpx.Client(base_url=server.url, timeout=120) as http:
        after = [http.post("/api/verify", files={"file": ("a.jpg", photo, JPEG)}) for _ in range(3)]
        assert [a.status_code for a in after] == [200, 200, 200]
        refused_after = sample(http.get("/metrics").text, "face_overloaded_total")
    assert refused_after - refused_before == statuses[503], (refused_before, refused_after)
