"""Face store benchmark: bulk load, registration, search latency and recall, memory, at up to 1M users.

For every gallery size and backend the tool builds one gallery: the real LFW descriptors of
``../shared/facedata`` (computed once with the service's engine, largest face, cached in
``reports/bench_store/lfw_descriptors.npz``) mixed into synthetic identities, 3 faces per identity up to
100k users and 1 face per identity above (``--faces-per-user`` overrides). Synthetic faces are random unit
128-d vectors (``--synthetic random``, the default) or drawn from a Gaussian fitted to the LFW descriptors
(``--synthetic lfw-like``: as dense as real faces are, see :class:`FaceModel`). Then:

* bulk load: ``copy_store`` from an in-memory source into the ``.npz`` file (every batch rewrites the
  whole file), or ``import_users`` batches into PostgreSQL with the model's HNSW index dropped after the
  first batch and rebuilt once at the end (``build_search_index`` with ``--maintenance-work-mem``; its time
  is reported apart, as are the ``VACUUM ANALYZE`` and ``CHECKPOINT`` that follow);
* in a fresh client process (so that its RSS is the store's, not this tool's): store open to first answer,
  ``search(top_k=5)`` one probe per call as ``/api/verify`` does, per ``--ef-search`` value, over LFW probes
  (other photos of enrolled people) and synthetic probes (random gallery: a user's face plus isotropic noise
  at cosine ``--noise-cosine``; LFW-like: another "photo" of a synthetic identity), then ``add_user`` of 3
  new random faces with the service's duplicate guard (the threshold rule of
  ``RecognitionService._refuse_duplicates``), deleted again afterwards;
* recall@1 of the store's search against exact search (numpy brute force, best face per user, float32), and
  how often the verify decision at the service's 1:N threshold (which user, or nobody) is exact search's;
* disk: the ``.npz`` size, or the database, table and HNSW index sizes (``pg_relation_size``);
* ``--service``: the app (``api.main.server_command``) with ``FACE_STORE_URL`` on the largest PostgreSQL
  gallery and on an empty one: ``POST /api/verify`` p50 over HTTP and the server's RSS.

PostgreSQL is a local server (``tools.local_postgres``) in ``reports/bench_store/pgdata``, given
``--shared-buffers`` (PostgreSQL's 128MB when not given), unless ``--store-url`` names a server whose user may
create databases; each gallery gets a database ``bench_store_<users>_f<faces>[...]``. ``--reuse`` keeps a
database or ``.npz`` loaded by an earlier run with the same gallery (its load figures come from that run's
``load.json``). Results: ``reports/bench_store/<--tag>.json`` and ``.md`` (git-ignored); the tables are printed.

    python -m tools.bench_store --sizes 10000                                  # quick run, both backends
    python -m tools.bench_store --service --ef-search 40 100 200 400 --tag random   # 10k, 100k, 1M + the service
    python -m tools.bench_store --sizes 1000000 --backends postgres --reuse --shared-buffers 2GB --warm-up 3000 \
        --ef-search 100 200 400 800 --service --tag random_sb2g
    python -m tools.bench_store --synthetic lfw-like --sizes 100000 1000000 --backends postgres \
        --shared-buffers 2GB --warm-up 3000 --ef-search 40 100 200 --tag lfwlike
    python -m tools.bench_store --sizes 100000 --backends postgres --hnsw-m 32 --hnsw-ef-construction 128 \
        --shared-buffers 2GB --warm-up 3000 --ef-search 100 200 400 --tag random_m32
    python -m tools.bench_store --sizes 100 1000 4000 10000 30000 --backends npz --lfw-users 0 --tag npz_scaling
    python -m tools.bench_store worker JOB.json                                # (internal) the client process
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import numpy as np

from api.config import REPO_ROOT, Settings
from api.store import DEFAULT_COLLECTION, FaceStore, SearchResult, StoredUser, UserRecord, open_store_at
from api.store.base import CollectionInfo
from api.store.copy import copy_store
from tools.common import configured_embedder, embedder_tag, lfw_images, memory_kb

# The short duplicate-check list whose registrations are timed beside the default ones.
SHORT_GUARD_EF_SEARCH = 40
# The configured embedder's descriptor size (FACE_EMBEDDER): 128 for dlib-resnet, 640 for the fused
# dlib-resnet+facenet. bench() sets it once from the embedder, before any gallery or probe is made, and the
# worker process from the probes it is given.
DIM = 128
TOP_K = 5  # what /api/verify asks the store for by default
OUT = REPO_ROOT / "reports" / "bench_store"
MAX_PROBES_PER_PERSON = 5  # George W. Bush alone has 77 photos in LFW View 1
TIE = 1e-5  # two users whose best cosines differ less than this are the same answer for recall


def faces_per_user_for(users: int, override: int | None) -> int:
    return override if override is not None else (3 if users <= 100_000 else 1)


def percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2) if values else float("nan")


def rss_mb(pid: int | None = None) -> float:
    return round(memory_kb(pid or os.getpid())["VmRSS"] / 1024, 1)


def unit_rows(rng: np.random.Generator, rows: int) -> np.ndarray:
    vectors = rng.standard_normal((rows, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


# --- real descriptors (LFW) -----------------------------------------------------------------------------


def lfw_descriptors(cache: Path) -> dict[str, list[np.ndarray]]:
    """Person -> descriptors of their LFW photos (file order, photos without a usable face left out).

    Computed once with the service's engine (largest face, as the API picks it) and cached in ``cache``."""
    paths = lfw_images()
    if not paths:
        print("no LFW images in ../shared/facedata: real-descriptor probes are skipped", flush=True)
        return {}
    keys = [f"{p.parent.name}/{p.name}" for p in paths]
    stored: dict[str, np.ndarray] = {}
    if cache.exists():
        with np.load(cache) as data:
            stored = dict(zip(data["names"].tolist(), data["vectors"], strict=True))
    missing = [(k, p) for k, p in zip(keys, paths, strict=True) if k not in stored]
    if missing:
        from api.errors import FaceServiceError
        from api.services.engine import build_engine
        from api.services.imaging import decode_image

        print(f"computing {len(missing)} LFW descriptors with the service's engine (cached afterwards)", flush=True)
        engine = build_engine(Settings())
        started = time.perf_counter()
        for number, (key, path) in enumerate(missing, 1):
            try:
                stored[key] = engine.represent(decode_image(path.read_bytes()), "largest").embedding
            except FaceServiceError:
                stored[key] = np.full(DIM, np.nan, np.float32)
            if number % 500 == 0:
                print(f"  {number}/{len(missing)} images, {time.perf_counter() - started:.0f} s", flush=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        names = sorted(stored)
        np.savez(cache, names=np.array(names), vectors=np.stack([stored[n] for n in names]).astype(np.float32))
    people: dict[str, list[np.ndarray]] = {}
    for key in keys:
        vector = stored[key]
        if np.isfinite(vector).all():
            people.setdefault(key.split("/")[0], []).append(vector.astype(np.float32))
    return people


# --- the gallery ----------------------------------------------------------------------------------------


@dataclass
class Gallery:
    """Users ``0 .. real_users-1`` are LFW people, the rest synthetic; user ``i`` owns rows
    ``starts[i]:starts[i+1]`` of ``vectors``."""

    users: int
    faces_per_user: int
    vectors: np.ndarray  # (rows, DIM) float32, unit rows
    owner: np.ndarray  # (rows,) int64
    starts: np.ndarray  # (users + 1,) int64
    names: list[str]
    real_users: int
    seed: int
    synthetic: str  # "random" or "lfw-like"
    probe_users: np.ndarray  # synthetic users whose noisy copies are probes
    probe_centres: np.ndarray | None  # lfw-like: those users' identity centres
    within: np.ndarray | None  # lfw-like: Cholesky factor of the within-person covariance

    def user_id(self, index: int) -> str:
        return f"lfw{index:05d}" if index < self.real_users else f"syn{index:07d}"

    @property
    def fingerprint(self) -> dict[str, int | str]:
        return {
            "users": self.users,
            "faces_per_user": self.faces_per_user,
            "rows": int(self.vectors.shape[0]),
            "real_users": self.real_users,
            "seed": self.seed,
            "synthetic": self.synthetic,
        }


@dataclass
class Probes:
    vectors: np.ndarray  # (n, DIM) float32, in the order they are searched
    kind: np.ndarray  # (n,) "real" or "noisy"
    exact_user: np.ndarray  # (n,) int64: exact search's best user
    exact_cosine: np.ndarray  # (n,) float32


@dataclass
class FaceModel:
    """A Gaussian fitted to the LFW descriptors: identity centres ~ N(mean, between), a face of an identity
    = normalise(centre + N(0, within)). On LFW-sized samples it gives genuine cosines of median 0.956 and
    impostor cosines of median 0.845, as the real descriptors do (0.957 and 0.841)."""

    mean: np.ndarray
    between: np.ndarray  # Cholesky factors
    within: np.ndarray

    @classmethod
    def fit(cls, people: dict[str, list[np.ndarray]]) -> FaceModel:
        data = np.concatenate([np.stack(v) for v in people.values()]).astype(np.float64)
        residuals = [np.stack(v) - np.mean(v, axis=0) for v in people.values() if len(v) >= 2]
        dof = sum(len(r) - 1 for r in residuals)
        stacked = np.concatenate(residuals).astype(np.float64)
        within = stacked.T @ stacked / dof
        values, vectors = np.linalg.eigh(np.cov(data.T) - within)
        between = (vectors * np.clip(values, 0.0, None)) @ vectors.T
        eye = 1e-9 * np.eye(DIM)
        return cls(data.mean(axis=0), np.linalg.cholesky(between + eye), np.linalg.cholesky(within + eye))

    def centres(self, rng: np.random.Generator, rows: int) -> np.ndarray:
        return (self.mean + rng.standard_normal((rows, DIM)) @ self.between.T).astype(np.float32)


def photos_of(centres: np.ndarray, within: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    faces = centres + (rng.standard_normal(centres.shape) @ within.T).astype(np.float32)
    faces /= np.linalg.norm(faces, axis=1, keepdims=True)
    return faces


def synthetic_faces(
    users: int, faces: int, model: FaceModel | None, rng: np.random.Generator, keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """``users * faces`` rows, user by user; with ``model``, also the centres of the users in ``keep``."""
    if model is None:
        return unit_rows(rng, users * faces), None
    rows, kept = [], []
    chunk = 100_000
    for first in range(0, users, chunk):
        centres = model.centres(rng, min(chunk, users - first))
        rows.append(photos_of(np.repeat(centres, faces, axis=0), model.within, rng))
        wanted = keep[(keep >= first) & (keep < first + len(centres))] - first
        kept.append(centres[wanted])
    return np.concatenate(rows), np.concatenate(kept)


def build_gallery(
    users: int, faces: int, people: dict[str, list[np.ndarray]], args: argparse.Namespace
) -> tuple[Gallery, list]:
    """The gallery and the LFW probes (other photos of enrolled people) as (vector, user index) pairs."""
    seed = args.seed
    blocks: list[np.ndarray] = []
    counts: list[int] = []
    names: list[str] = []
    real_probes: list[tuple[np.ndarray, int]] = []
    for person in sorted(people):
        if len(names) >= min(users, args.lfw_users):
            break
        photos = people[person]
        enrolled = photos[: min(faces, len(photos) - 1)] if len(photos) >= 2 else photos
        index = len(names)
        real_probes += [(p, index) for p in photos[len(enrolled) :][:MAX_PROBES_PER_PERSON]]
        blocks.append(np.stack(enrolled))
        counts.append(len(enrolled))
        names.append(person.replace("_", " "))
    real_users = len(names)
    synthetic = users - real_users
    rng = np.random.default_rng(seed + users)
    count = min(args.noisy_probes, synthetic)
    probe_users = np.sort(rng.choice(np.arange(real_users, users), size=count, replace=False))
    model = FaceModel.fit(people) if args.synthetic == "lfw-like" else None
    rows, probe_centres = synthetic_faces(synthetic, faces, model, rng, probe_users - real_users)
    blocks.append(rows)
    counts += [faces] * synthetic
    names += [f"synthetic {i}" for i in range(real_users, users)]
    vectors = np.concatenate(blocks).astype(np.float32, copy=False)
    counts_array = np.asarray(counts, np.int64)
    starts = np.concatenate([[0], np.cumsum(counts_array)])
    owner = np.repeat(np.arange(users, dtype=np.int64), counts_array)
    gallery = Gallery(
        users,
        faces,
        vectors,
        owner,
        starts,
        names,
        real_users,
        seed,
        args.synthetic,
        probe_users,
        probe_centres,
        None if model is None else model.within,
    )
    return gallery, real_probes


def build_probes(gallery: Gallery, real: list, noise_cosine: float) -> Probes:
    """LFW probes plus a noisy copy of each of ``gallery.probe_users``, shuffled, with exact answers.

    Random gallery: the user's first face plus isotropic noise, at cosine ``noise_cosine`` to it. LFW-like
    gallery: another "photo" of the user (their centre plus within-person noise), as a real probe would be."""
    rng = np.random.default_rng(gallery.seed + 1)
    chosen = gallery.probe_users
    if gallery.probe_centres is not None and gallery.within is not None:
        noisy_vectors = photos_of(gallery.probe_centres, gallery.within, rng)
    else:
        # A noise vector of norm s (per-dimension sigma s/sqrt(DIM)) turns a unit v into a vector at cosine
        # 1/sqrt(1 + s^2) to v once normalised.
        sigma = float(np.sqrt(1.0 / noise_cosine**2 - 1.0) / np.sqrt(DIM))
        noisy_vectors = gallery.vectors[gallery.starts[chosen]] + sigma * rng.standard_normal((len(chosen), DIM))
        noisy_vectors /= np.linalg.norm(noisy_vectors, axis=1, keepdims=True)
    vectors = np.concatenate([np.stack([v for v, _ in real]) if real else np.zeros((0, DIM)), noisy_vectors])
    kind = np.array(["real"] * len(real) + ["noisy"] * len(chosen))
    order = rng.permutation(len(kind))
    vectors, kind = vectors[order].astype(np.float32), kind[order]
    exact_user, exact_cosine = exact_top1(gallery, vectors)
    return Probes(vectors, kind, exact_user, exact_cosine)


def exact_top1(gallery: Gallery, probes: np.ndarray, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: the user of the best row (best-of-faces) and its cosine, float32 like the stores."""
    users = np.empty(len(probes), np.int64)
    cosines = np.empty(len(probes), np.float32)
    for start in range(0, len(probes), chunk):
        scores = gallery.vectors @ probes[start : start + chunk].T  # (rows, chunk)
        best = scores.argmax(axis=0)
        users[start : start + chunk] = gallery.owner[best]
        cosines[start : start + chunk] = scores[best, np.arange(scores.shape[1])]
    return users, cosines


class GallerySource:
    """The gallery as the read side of a store (``count``, ``export_users``): the source of ``copy_store``."""

    backend = "memory"

    def __init__(self, gallery: Gallery, model: str) -> None:
        self._gallery = gallery
        self._model = model

    def count(self, collection: str | None = None) -> int:
        return self._gallery.users

    def list_collections(self) -> list[CollectionInfo]:
        rows = int(self._gallery.vectors.shape[0])
        return [CollectionInfo(DEFAULT_COLLECTION, self._gallery.users, rows, datetime(2026, 1, 1, tzinfo=UTC))]

    def export_users(self, batch_size: int) -> Iterator[list[StoredUser]]:
        g = self._gallery
        base = datetime(2026, 1, 1, tzinfo=UTC)
        for first in range(0, g.users, batch_size):
            batch = []
            for i in range(first, min(first + batch_size, g.users)):
                created = base + timedelta(microseconds=i)
                faces = g.vectors[g.starts[i] : g.starts[i + 1]]
                record = UserRecord(g.user_id(i), g.names[i], self._model, created, created, int(faces.shape[0]))
                batch.append(StoredUser(record, faces))
            yield batch


# --- loading ---------------------------------------------------------------------------------------------


def load_npz(path: Path, gallery: Gallery, model: str, batch_size: int) -> dict[str, Any]:
    from api.store.npz import NpzFaceStore

    for stale in (path, Path(f"{path}.lock")):
        stale.unlink(missing_ok=True)
    store = NpzFaceStore(path)
    batch_seconds: list[float] = []
    last = [time.perf_counter()]

    def progress(_: int) -> None:
        now = time.perf_counter()
        batch_seconds.append(now - last[0])
        last[0] = now
        if len(batch_seconds) % 20 == 0:
            print(f"    npz: {len(batch_seconds) * batch_size} users loaded", flush=True)

    started = time.perf_counter()
    report = copy_store(cast(FaceStore, GallerySource(gallery, model)), store, batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - started
    return {
        "method": f"copy_store, batches of {batch_size}, each batch one write that rewrites the whole file",
        "load_s": round(seconds, 1),
        "users_per_s": round(report.copied / seconds),
        "last_batch_write_s": round(batch_seconds[-1], 2),
        "first_batch_write_s": round(batch_seconds[0], 3),
    }


def load_postgres(url: str, gallery: Gallery, model: str, args: argparse.Namespace) -> dict[str, Any]:
    import psycopg

    from api.store.postgres import PostgresFaceStore, PostgresOptions

    batch_size, work_mem = args.batch_size, args.maintenance_work_mem
    store = PostgresFaceStore(url, PostgresOptions(hnsw_m=args.hnsw_m, hnsw_ef_construction=args.hnsw_ef_construction))
    started = time.perf_counter()
    dropped = False
    for number, batch in enumerate(GallerySource(gallery, model).export_users(batch_size), 1):
        store.import_users(batch)
        if not dropped:  # the first batch created the model's index; the rest loads without it
            dropped = store.drop_search_index(model)
        if number % 100 == 0:
            rate = number * batch_size / (time.perf_counter() - started)
            print(f"    postgres: {number * batch_size} users loaded, {rate:.0f} users/s", flush=True)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    store.build_search_index(model, work_mem)
    index_s = time.perf_counter() - started
    store.close()
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) face_descriptors")
        conn.execute("VACUUM (ANALYZE) face_users")
        # Write the load's dirty pages out now rather than in the middle of the measurements.
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
            conn.execute("CHECKPOINT")
    vacuum_s = time.perf_counter() - started
    return {
        "method": f"import_users, batches of {batch_size}, HNSW index dropped after the first batch",
        "load_s": round(load_s, 1),
        "users_per_s": round(gallery.users / load_s),
        "index_build_s": round(index_s, 1),
        "maintenance_work_mem": work_mem,
        "vacuum_analyze_checkpoint_s": round(vacuum_s, 1),
        "users_per_s_with_index": round(gallery.users / (load_s + index_s)),
        "hnsw": {"m": args.hnsw_m, "ef_construction": args.hnsw_ef_construction},
    }


def postgres_facts(url: str, model: str) -> dict[str, Any]:
    import psycopg

    from api.store.postgres import _index_name

    with psycopg.connect(url, autocommit=True) as conn:

        def one(query: str, *params: Any) -> Any:
            return conn.execute(query, params).fetchone()[0]

        index = _index_name(model)
        settings = {
            name: one(f"SHOW {name}")
            for name in (
                "server_version",
                "shared_buffers",
                "effective_cache_size",
                "work_mem",
                "max_parallel_maintenance_workers",
                "synchronous_commit",
                "fsync",
                "jit",
            )
        }
        settings["pgvector"] = one("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        mb = 1024 * 1024
        return {
            "database_mb": round(one("SELECT pg_database_size(current_database())") / mb, 1),
            "descriptors_heap_mb": round(one("SELECT pg_relation_size('face_descriptors')") / mb, 1),
            "descriptors_total_mb": round(one("SELECT pg_total_relation_size('face_descriptors')") / mb, 1),
            "users_total_mb": round(one("SELECT pg_total_relation_size('face_users')") / mb, 1),
            "hnsw_index_mb": round((one("SELECT pg_relation_size(to_regclass(%s))", index) or 0) / mb, 1),
            "server": settings,
        }


def server_databases(server_url: str) -> set[str]:
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}


# --- the client process ----------------------------------------------------------------------------------


def run_worker(job_path: Path) -> None:
    """Open the store, search every probe (per ef_search), register, and write the figures as JSON."""
    from api.services.matching import Calibration, similarity_from_cosine

    global DIM
    job = json.loads(job_path.read_text())
    location, model, top_k = job["location"], job["model_id"], job["top_k"]
    probes = np.load(job["probes"])
    DIM = probes.shape[1]  # the gallery's descriptor size: new faces registered here must match it
    settings = Settings()
    calibration = Calibration.load(settings.resources_dir / "calibration.json", model)
    result: dict[str, Any] = {"rss_before_open_mb": rss_mb()}

    started = time.perf_counter()
    store = open_store_at(location, settings)
    users = store.count()  # PostgreSQL connects (and checks the schema) here; the .npz was read above
    result["open_s"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    store.search(model, probes[0], top_k)
    result["first_search_ms"] = round((time.perf_counter() - started) * 1000, 1)
    result["users"] = users
    result["rss_after_open_mb"] = rss_mb()
    rng = np.random.default_rng(job["seed"] + 2)
    for probe in unit_rows(rng, job["warm_up"]):
        store.search(model, probe, top_k)

    passes = []
    for ef in job["ef_search"] if store.backend == "postgresql" else [None]:
        searcher: FaceStore = store
        if ef is not None and ef != settings.store_hnsw_ef_search:
            from api.store.postgres import PostgresFaceStore, PostgresOptions

            options = PostgresOptions(pool_size=1, timeout_s=settings.store_timeout_s, ef_search=ef)
            searcher = PostgresFaceStore(location, options)
            for probe in unit_rows(rng, min(job["warm_up"], 20)):
                searcher.search(model, probe, top_k)
        timings, top_ids, top_cosines = [], [], []
        for probe in probes:
            started = time.perf_counter()
            found = searcher.search(model, probe, top_k)
            timings.append((time.perf_counter() - started) * 1000)
            best = found.matches[0][0] if found.matches[0] else None
            top_ids.append(best.user_id if best else "")
            top_cosines.append(best.cosine if best else float("nan"))
        passes.append(
            {"ef_search": ef or settings.store_hnsw_ef_search, "ms": timings, "ids": top_ids, "cosines": top_cosines}
        )
        if searcher is not store:
            searcher.close()
        print(
            f"    client: {len(probes)} searches, ef_search {ef}, p50 {statistics.median(timings):.2f} ms", flush=True
        )
    result["passes"] = passes
    result["rss_after_search_mb"] = rss_mb()

    def refuse_duplicates(found: SearchResult) -> None:  # RecognitionService._refuse_duplicates, minus the engine
        if found.users == 0:
            return
        # The gallery-size rule on the comparisons the check makes: new faces x stored faces.
        threshold = settings.identify_threshold or calibration.identify_threshold(found.faces * len(found.matches))
        for matches in found.matches:
            for match in matches:
                if float(similarity_from_cosine(match.cosine)) >= threshold:
                    raise RuntimeError(f"duplicate of {match.user_id} at cosine {match.cosine:.4f}")

    # The same registrations with a short duplicate-check list (FACE_STORE_HNSW_GUARD_EF_SEARCH), interleaved
    # with the default ones so that both see the same machine: what that setting would save.
    short_guard: FaceStore | None = None
    if store.backend == "postgresql" and settings.store_hnsw_guard_ef_search != SHORT_GUARD_EF_SEARCH:
        from api.store.postgres import PostgresFaceStore, PostgresOptions

        short_guard = PostgresFaceStore(
            location,
            PostgresOptions(
                pool_size=1, ef_search=settings.store_hnsw_ef_search, guard_ef_search=SHORT_GUARD_EF_SEARCH
            ),
        )
    registered, register_ms, register_short_guard_ms = [], [], []
    for number in range(job["registrations"]):
        for registrar, timings in ((store, register_ms), (short_guard, register_short_guard_ms)):
            if registrar is None:
                continue
            faces = unit_rows(rng, 3)
            started = time.perf_counter()
            record = registrar.add_user(f"bench registration {number}", faces, model, guard=refuse_duplicates)
            timings.append((time.perf_counter() - started) * 1000)
            registered.append(record.id)
    if short_guard is not None:
        short_guard.close()
        result["register_short_guard_ms"] = register_short_guard_ms
        print(
            f"    client: register p50 {statistics.median(register_ms):.2f} ms (default guard), "
            f"{statistics.median(register_short_guard_ms):.2f} ms (guard ef_search {SHORT_GUARD_EF_SEARCH})",
            flush=True,
        )
    result["register_ms"] = register_ms
    result["rss_after_register_mb"] = rss_mb()
    result["peak_rss_mb"] = round(memory_kb(os.getpid())["VmHWM"] / 1024, 1)
    for user_id in registered:  # leave the gallery as loaded (a later --reuse run checks its count)
        store.delete(user_id)
    store.close()
    Path(job["out"]).write_text(json.dumps(result) + "\n")


def measure_client(case_dir: Path, location: str, probes: Probes, args: argparse.Namespace, registrations: int) -> dict:
    probes_path = case_dir / "probes.npy"
    np.save(probes_path, probes.vectors)
    job = {
        "location": location,
        "model_id": args.model_id,
        "probes": str(probes_path),
        "top_k": TOP_K,
        "ef_search": args.ef_search,
        "registrations": registrations,
        "seed": args.seed,
        "warm_up": args.warm_up,
        "out": str(case_dir / "client.json"),
    }
    job_path = case_dir / "job.json"
    job_path.write_text(json.dumps(job, indent=2) + "\n")
    subprocess.run([sys.executable, "-m", "tools.bench_store", "worker", str(job_path)], cwd=REPO_ROOT, check=True)
    return json.loads((case_dir / "client.json").read_text())


def identify_cosine(users: int, model: str) -> float:
    """The service's 1:N threshold for a gallery of ``users`` (similarity = (1 + cosine) / 2), as a cosine."""
    from api.services.matching import Calibration

    settings = Settings()
    calibration = Calibration.load(settings.resources_dir / "calibration.json", model)
    similarity = settings.identify_threshold or calibration.identify_threshold(users)
    return 2.0 * similarity - 1.0


def recall(
    gallery: Gallery, probes: Probes, ids: list[str], cosines: list[float], kind: str, threshold: float
) -> dict[str, Any]:
    """Share of probes whose store answer is exact search's best user (or ties with it within TIE); and, with
    the service's 1:N threshold (a cosine), the share whose verify decision (which user, or nobody) is the one
    exact search gives, and recall@1 over the probes exact search verifies."""
    picked = np.flatnonzero(probes.kind == kind)
    if len(picked) == 0:
        return {"n": 0, "recall_at_1": None}
    hits = agree = verified = verified_hits = 0
    for i in picked:
        exact_cosine = float(probes.exact_cosine[i])
        hit = ids[i] == gallery.user_id(int(probes.exact_user[i])) or abs(cosines[i] - exact_cosine) <= TIE
        hits += hit
        exact_verifies, store_verifies = exact_cosine >= threshold, cosines[i] >= threshold
        agree += (hit and exact_verifies) or (not exact_verifies and not store_verifies)
        verified += exact_verifies
        verified_hits += hit and exact_verifies
    return {
        "n": len(picked),
        "recall_at_1": round(hits / len(picked), 4),
        "misses": int(len(picked) - hits),
        "decision_agreement": round(agree / len(picked), 4),
        "verified_by_exact": int(verified),
        "recall_at_1_verified": round(verified_hits / verified, 4) if verified else None,
    }


# --- the service over HTTP -------------------------------------------------------------------------------


def measure_service(url: str, requests: int) -> dict[str, Any]:
    """The app, served as ``api.main.server_command`` says, on the store at ``url``: start-up, verify p50 and
    the server's RSS after the requests."""
    from tools.load_test import probe_photo, running_service, timed

    result: dict[str, Any] = {}
    with running_service(FACE_STORE_URL=url, FACE_RATE_LIMIT="100000/minute") as (server, client, ready_s):
        result["startup_to_ready_s"] = ready_s
        result["rss_ready_mb"] = rss_mb(server.pid)
        photo = probe_photo()
        verify_ms = []
        for number in range(requests + 3):
            elapsed, response = timed(lambda: client.post("/api/verify", files={"file": ("p.jpg", photo)}))
            response.raise_for_status()
            if number >= 3:  # the first requests pay for lazy model and pool set-up
                verify_ms.append(elapsed)
        body = response.json()
        result["verify_p50_ms"] = round(statistics.median(verify_ms), 1)
        result["verify_p90_ms"] = percentile(verify_ms, 90)
        result["verify_p99_ms"] = percentile(verify_ms, 99)
        result["requests"] = len(verify_ms)
        # The 1:N threshold follows the gallery size (which gallery was searched); the best similarity is
        # there whenever the search found anyone (candidates list only matches above the threshold).
        result["threshold"] = body["threshold"]
        result["best_similarity"] = body["similarity"]
        memory = memory_kb(server.pid)
        result["rss_mb"] = round(memory["VmRSS"] / 1024, 1)
        result["peak_rss_mb"] = round(memory["VmHWM"] / 1024, 1)
    return result


# --- the run ---------------------------------------------------------------------------------------------


def run_case(
    backend: str, gallery: Gallery, probes: Probes, args: argparse.Namespace, server_url: str | None
) -> dict[str, Any]:
    name = f"{backend}_{gallery.users}_f{gallery.faces_per_user}{embedder_tag()}"
    if gallery.synthetic != "random":
        name += "_lfwlike"
    if backend == "postgres" and (args.hnsw_m, args.hnsw_ef_construction) != (16, 64):
        name += f"_m{args.hnsw_m}_efc{args.hnsw_ef_construction}"
    case_dir = args.out / name
    case_dir.mkdir(parents=True, exist_ok=True)
    load_file = case_dir / "load.json"
    previous = json.loads(load_file.read_text()) if load_file.exists() else {}
    reusable = args.reuse and previous.get("gallery") == gallery.fingerprint
    case: dict[str, Any] = {"backend": backend, **gallery.fingerprint}
    if backend == "npz":
        location = str(args.out / f"{name}.npz")
        reusable = reusable and Path(location).exists()
        registrations = max(10, min(args.registrations, 2_000_000 // gallery.users))
    else:
        assert server_url is not None
        from tools.local_postgres import create_database, database_uri

        database = f"bench_store_{name.removeprefix('postgres_')}"
        location = database_uri(server_url, database)
        if reusable and database in server_databases(server_url):
            existing = open_store_at(location)
            reusable = existing.count() == gallery.users
            existing.close()
        else:
            reusable = False
            create_database(server_url, database)
        case["database"] = database
        registrations = args.registrations
    if reusable:
        print(f"  {name}: reusing the gallery loaded on {previous['loaded_at']}", flush=True)
        load = previous["load"]
    else:
        print(f"  {name}: loading {gallery.users} users ({gallery.vectors.shape[0]} descriptors)", flush=True)
        if backend == "npz":
            load = load_npz(Path(location), gallery, args.model_id, args.batch_size)
        else:
            load = load_postgres(location, gallery, args.model_id, args)
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        load_file.write_text(json.dumps({"gallery": gallery.fingerprint, "loaded_at": stamp, "load": load}) + "\n")
    case["load"] = load
    print(f"    load: {load}", flush=True)
    if backend == "npz":
        case["disk"] = {"file_mb": round(Path(location).stat().st_size / 1024 / 1024, 1)}
    else:
        case["disk"] = postgres_facts(location, args.model_id)
    client = measure_client(case_dir, location, probes, args, registrations)
    case["client"] = {k: v for k, v in client.items() if k not in ("passes", "register_ms", "register_short_guard_ms")}
    case["client"]["store_rss_mb"] = round(client["rss_after_search_mb"] - client["rss_before_open_mb"], 1)
    case["search"] = []
    threshold = identify_cosine(gallery.users, args.model_id)
    case["identify_threshold_cosine"] = round(threshold, 4)
    for result in client["passes"]:
        ms = result["ms"]
        real = [m for m, k in zip(ms, probes.kind, strict=True) if k == "real"]
        noisy = [m for m, k in zip(ms, probes.kind, strict=True) if k == "noisy"]
        case["search"].append(
            {
                "ef_search": result["ef_search"] if backend == "postgres" else None,
                "n": len(ms),
                "p50_ms": percentile(ms, 50),
                "p99_ms": percentile(ms, 99),
                "real_p50_ms": percentile(real, 50),
                "noisy_p50_ms": percentile(noisy, 50),
                "recall_real": recall(gallery, probes, result["ids"], result["cosines"], "real", threshold),
                "recall_noisy": recall(gallery, probes, result["ids"], result["cosines"], "noisy", threshold),
            }
        )
    register_ms = client["register_ms"]
    case["register"] = {
        "n": len(register_ms),
        "p50_ms": percentile(register_ms, 50),
        "p99_ms": percentile(register_ms, 99),
    }
    if "register_short_guard_ms" in client:  # the same registrations with a short duplicate-check list
        case["register"][f"guard_ef_{SHORT_GUARD_EF_SEARCH}_p50_ms"] = percentile(client["register_short_guard_ms"], 50)
    (case_dir / "case.json").write_text(json.dumps(case, indent=2) + "\n")
    return case


def code_version() -> dict[str, Any]:
    """The commit measured, and which files of api/store differed from it (other work goes on beside this tool)."""

    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "changed": git("status", "--short", "api/store").splitlines(),
    }


def machine_note() -> dict[str, Any]:
    memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    return {
        "cpus": os.cpu_count(),
        "memory_gb": memory_gb,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(results: dict[str, Any]) -> str:
    cases, start = results["cases"], results["machine_start"]
    lines = [
        f"Command: `python -m tools.bench_store {results['argv']}`",
        "",
        f"Machine: {start['cpus']} CPUs, {start['memory_gb']} GB RAM, load average {start['load_average']} at the "
        f"start, {results['machine_end']['load_average']} at the end; {start['date']}. Code: commit "
        f"{results['code']['commit']}"
        + (
            f", api/store changed: {results['code']['changed']}."
            if results["code"]["changed"]
            else ", api/store as committed."
        ),
        "",
        "| backend | users | faces/user | descriptors | load users/s | index build s | open s | first search ms "
        "| search p50 / p99 ms | recall@1 LFW probes | recall@1 synthetic probes | register p50 / p99 ms (n) "
        "| client RSS MB (store's part) | on disk MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    default_ef = Settings().store_hnsw_ef_search
    for case in cases:
        search = next((s for s in case["search"] if s["ef_search"] in (None, default_ef)), case["search"][0])
        load, client, disk = case["load"], case["client"], case["disk"]
        if case["backend"] == "npz":
            disk_text = f"{fmt(disk['file_mb'])} (file)"
        else:
            disk_text = f"{fmt(disk['database_mb'])} (index {fmt(disk['hnsw_index_mb'])})"
        real, noisy = search["recall_real"], search["recall_noisy"]
        hnsw = load.get("hnsw", {"m": 16, "ef_construction": 64})
        label = case["backend"] + (", LFW-like" if case.get("synthetic") == "lfw-like" else "")
        if search["ef_search"]:
            label += f" (ef_search {search['ef_search']}"
            label += (
                ")"
                if hnsw == {"m": 16, "ef_construction": 64}
                else f", m {hnsw['m']}, ef_construction {hnsw['ef_construction']})"
            )
        lines.append(
            f"| {label} | {fmt(case['users'])} | {case['faces_per_user']} | {fmt(case['rows'])}"
            f" | {fmt(load['users_per_s'])}"
            f" | {fmt(load.get('index_build_s'))} | {fmt(client['open_s'], 2)} | {fmt(client['first_search_ms'])}"
            f" | {fmt(search['p50_ms'], 2)} / {fmt(search['p99_ms'], 2)}"
            f" | {fmt(real['recall_at_1'], 4)} ({fmt(real['n'])}) | {fmt(noisy['recall_at_1'], 4)} ({fmt(noisy['n'])})"
            f" | {fmt(case['register']['p50_ms'])} / {fmt(case['register']['p99_ms'])} ({case['register']['n']})"
            f" | {fmt(client['rss_after_search_mb'], 0)} ({fmt(client['store_rss_mb'], 0)}) | {disk_text} |"
        )
    sweeps = [c for c in cases if c["backend"] == "postgres"]
    if sweeps:

        def decisions(r: dict[str, Any]) -> str:
            if not r["n"]:
                return "-"
            return (
                f"{fmt(r['decision_agreement'], 4)} ({fmt(r['recall_at_1_verified'], 4)} of {r['verified_by_exact']})"
            )

        lines += [
            "",
            "| users | synthetic faces | HNSW m, ef_construction | ef_search | search p50 / p99 ms "
            "| recall@1 LFW / synthetic probes | same decision as exact, LFW (recall@1 of the verified) "
            "| same decision, synthetic (recall@1 of the verified) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for case in sweeps:
            hnsw = case["load"].get("hnsw", {"m": 16, "ef_construction": 64})
            for s in case["search"]:
                lines.append(
                    f"| {fmt(case['users'])} | {case.get('synthetic', 'random')}"
                    f" | {hnsw['m']}, {hnsw['ef_construction']} | {s['ef_search']}"
                    f" | {fmt(s['p50_ms'], 2)} / {fmt(s['p99_ms'], 2)}"
                    f" | {fmt(s['recall_real']['recall_at_1'], 4)} / {fmt(s['recall_noisy']['recall_at_1'], 4)}"
                    f" | {decisions(s['recall_real'])} | {decisions(s['recall_noisy'])} |"
                )
    service = results.get("service")
    if service:
        lines += [
            "",
            "| the service on the PostgreSQL store | verify p50 / p90 ms | start-up to ready s | RSS MB |",
            "|---|---|---|---|",
        ]
        for label, s in service.items():
            lines.append(
                f"| {label} | {fmt(s['verify_p50_ms'])} / {fmt(s['verify_p90_ms'])} | {fmt(s['startup_to_ready_s'], 1)}"
                f" | {fmt(s['rss_mb'], 0)} |"
            )
    pg = [c for c in cases if c["backend"] == "postgres"]
    if pg:
        server = pg[-1]["disk"]["server"]
        lines += ["", "PostgreSQL: " + ", ".join(f"{k} {v}" for k, v in server.items()) + "."]
    return "\n".join(lines) + "\n"


def configure_local_server(data_dir: Path, server_url: str, args: argparse.Namespace) -> str:
    """Give the local server ``--shared-buffers`` (PostgreSQL's default when not given), restarting it if needed."""
    import psycopg

    from tools.local_postgres import start, stop

    with psycopg.connect(server_url, autocommit=True) as conn:
        if args.shared_buffers:
            conn.execute(f"ALTER SYSTEM SET shared_buffers = '{args.shared_buffers}'")
        else:
            conn.execute("ALTER SYSTEM RESET shared_buffers")
        conn.execute("SELECT pg_reload_conf()")
        time.sleep(0.5)
        row = conn.execute("SELECT pending_restart FROM pg_settings WHERE name = 'shared_buffers'").fetchone()
    if row[0]:
        stop(data_dir)
        server_url = start(data_dir, keep_running=args.keep_server)
    return server_url


def bench(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    global DIM
    args.model_id, DIM = configured_embedder()
    results: dict[str, Any] = {
        "argv": " ".join(sys.argv[1:]),
        "machine_start": machine_note(),
        "model_id": args.model_id,
        "code": code_version(),
        "noise_cosine": args.noise_cosine,
        "cases": [],
        "skipped": [],
    }
    # --lfw-users 0: synthetic faces alone, without computing (or loading) the LFW descriptors at all.
    people = lfw_descriptors(args.out / f"lfw_descriptors{embedder_tag()}.npz") if args.lfw_users else {}
    print(f"LFW: {sum(map(len, people.values()))} descriptors of {len(people)} people", flush=True)
    server_url: str | None = args.store_url
    started_server = False
    if "postgres" in args.backends and server_url is None:
        from tools.local_postgres import start

        server_url = start(args.out / "pgdata", keep_running=args.keep_server)
        started_server = True
        server_url = configure_local_server(args.out / "pgdata", server_url, args)
    try:
        for users in sorted(args.sizes):
            faces = faces_per_user_for(users, args.faces_per_user)
            started = time.perf_counter()
            gallery, real = build_gallery(users, faces, people, args)
            probes = build_probes(gallery, real, args.noise_cosine)
            print(
                f"{users} users x {faces} faces ({gallery.real_users} LFW people), {len(probes.kind)} probes, "
                f"exact answers in {time.perf_counter() - started:.1f} s",
                flush=True,
            )
            for backend in args.backends:
                if backend == "npz" and users > args.npz_max_users:
                    reason = (
                        f"npz stops at {args.npz_max_users} users: every write rewrites the whole file and every "
                        "service process holds every descriptor in memory (see the registration figures)"
                    )
                    results["skipped"].append({"backend": "npz", "users": users, "reason": reason})
                    print(f"  npz {users}: skipped ({reason})", flush=True)
                    continue
                results["cases"].append(run_case(backend, gallery, probes, args, server_url))
            del gallery, probes
        if args.service:
            pg = [c for c in results["cases"] if c["backend"] == "postgres"]
            if not pg or server_url is None:
                raise SystemExit("--service needs a PostgreSQL gallery (--backends postgres)")
            from tools.local_postgres import create_database, database_uri

            largest = max(pg, key=lambda c: c["users"])
            empty = create_database(server_url, "bench_store_empty")
            results["service"] = {}
            for label, url in (
                ("empty gallery", empty),
                (f"{largest['users']:,} users", database_uri(server_url, largest["database"])),
            ):
                print(f"service on the {label}", flush=True)
                results["service"][label] = measure_service(url, args.requests)
                print(f"    {results['service'][label]}", flush=True)
    finally:
        if started_server and not args.keep_server:
            from tools.local_postgres import stop

            stop(args.out / "pgdata")
    results["machine_end"] = machine_note()
    (args.out / f"{args.tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out / f"{args.tag}.md").write_text(table)
    print(table)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        run_worker(Path(argv[1]))
        return
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench_store", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="gallery users")
    parser.add_argument("--backends", nargs="+", choices=("npz", "postgres"), default=["npz", "postgres"])
    parser.add_argument("--npz-max-users", type=int, default=100_000, help="larger npz galleries are skipped")
    parser.add_argument("--faces-per-user", type=int, help="default: 3 up to 100k users, 1 above")
    parser.add_argument("--store-url", help="a PostgreSQL server whose user may create databases (default: local)")
    parser.add_argument("--keep-server", action="store_true", help="leave the local PostgreSQL running")
    parser.add_argument("--reuse", action="store_true", help="keep galleries an earlier run loaded (same gallery)")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[100], help="HNSW ef_search values to search with")
    parser.add_argument("--batch-size", type=int, default=1000, help="users per import batch")
    parser.add_argument("--maintenance-work-mem", default="2GB", help="for the HNSW index build")
    parser.add_argument("--hnsw-m", type=int, default=16, help="HNSW build parameter (the store's default: 16)")
    parser.add_argument("--hnsw-ef-construction", type=int, default=64, help="HNSW build parameter (default: 64)")
    parser.add_argument("--noisy-probes", type=int, default=1000)
    parser.add_argument(
        "--noise-cosine", type=float, default=0.8, help="random gallery: noisy probe's cosine to its source"
    )
    parser.add_argument(
        "--synthetic",
        choices=("random", "lfw-like"),
        default="random",
        help="synthetic faces: random unit vectors, or a Gaussian fitted to the LFW descriptors",
    )
    parser.add_argument("--registrations", type=int, default=100, help="timed add_user calls (npz: fewer when large)")
    parser.add_argument("--service", action="store_true", help="also time /api/verify over HTTP (largest gallery)")
    parser.add_argument("--requests", type=int, default=40, help="verify requests per service run")
    parser.add_argument("--lfw-users", type=int, default=10**9, help="at most this many LFW people (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm-up", type=int, default=20, help="random-probe searches before the timed ones")
    parser.add_argument("--shared-buffers", help="local PostgreSQL's shared_buffers (default: PostgreSQL's 128MB)")
    parser.add_argument("--tag", default="results", help="name of the result files in --out")
    parser.add_argument("--out", type=Path, default=OUT)
    bench(parser.parse_args(argv))


if __name__ == "__main__":
    main()
