"""A small collection beside a large one on one PostgreSQL: search speed and recall in both.

    python -m tools.bench_collections                      # 1,000-user collection beside a 1,000,000-face one
    python -m tools.bench_collections --big-faces 100000   # a quicker run

One database (a local PostgreSQL started in ``reports/bench_collections/pgdata``, or ``--store-url``) holds:

* ``big``: ``--big-faces`` random unit descriptors (one face per user) plus the enrolled LFW people;
* ``small``: ``--small-users`` users, the enrolled LFW people first (their first photo), random ones after.

The enrolled LFW people (real descriptors of the service's engine, cached by ``tools.bench_store``) are probed
with their other photos in both collections: recall@1 compares the store's best user with an exact numpy
search over the same collection, search time is one ``store.search`` call with top_k=5 (what /api/verify
does). The small collection is searched exactly (it holds at most 10,000 faces), the big one through the
model's HNSW index with the collection filter. Results: ``reports/bench_collections/results.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np

from api.config import REPO_ROOT
from api.store import StoredUser, UserRecord
from api.store.postgres import PostgresFaceStore
from tools.bench_store import lfw_descriptors, model_id, percentile, unit_rows

OUT = REPO_ROOT / "reports" / "bench_collections"
TOP_K = 5
BATCH = 5000


@dataclass
class Collection:
    name: str
    ids: list[str]
    vectors: np.ndarray  # (users, 128): one face per user
    lfw_index: dict[str, int]  # LFW person -> row


def users_of(collection: Collection, model: str, start: datetime) -> list[StoredUser]:
    return [
        StoredUser(
            UserRecord(user_id, f"user {n}", model, start + timedelta(microseconds=n), start, 1, collection.name),
            collection.vectors[n : n + 1],
        )
        for n, user_id in enumerate(collection.ids)
    ]


def build(name: str, people: dict[str, list[np.ndarray]], enrolled: list[str], size: int, seed: int) -> Collection:
    real = np.stack([people[p][0] for p in enrolled]).astype(np.float32)
    filler = unit_rows(np.random.default_rng(seed), max(0, size - len(enrolled)))
    vectors = np.concatenate([real, filler]).astype(np.float32)
    ids = [uuid.uuid4().hex for _ in range(len(vectors))]
    return Collection(name, ids, vectors, {p: i for i, p in enumerate(enrolled)})


def load(store: PostgresFaceStore, collection: Collection, model: str) -> float:
    started = time.perf_counter()
    users = users_of(collection, model, datetime(2026, 1, 1, tzinfo=UTC))
    store.create_collection(collection.name)
    for first in range(0, len(users), BATCH):
        store.import_users(users[first : first + BATCH])
        if first == 0 and len(users) > BATCH:
            store.drop_search_index(model)  # built once at the end: far faster than row by row
    return time.perf_counter() - started


def measure(store: PostgresFaceStore, collection: Collection, people, model: str) -> dict:
    probes = [v for p in collection.lfw_index for v in people[p][1:4]]
    times, hits = [], 0
    for probe in probes:
        exact = collection.ids[int(np.argmax(collection.vectors @ probe))]
        started = time.perf_counter()
        found = store.search(model, probe, TOP_K, collection=collection.name)
        times.append((time.perf_counter() - started) * 1000)
        best = found.matches[0][0].user_id if found.matches[0] else None
        hits += best == exact
    return {
        "collection": collection.name,
        "users": len(collection.ids),
        "probes": len(probes),
        "search_p50_ms": percentile(times, 50),
        "search_p99_ms": percentile(times, 99),
        "recall_at_1": round(hits / max(1, len(probes)), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_collections", description=__doc__.split("\n\n")[0])
    parser.add_argument("--big-faces", type=int, default=1_000_000)
    parser.add_argument("--small-users", type=int, default=1000)
    parser.add_argument("--store-url", help="an empty database (default: a local PostgreSQL under reports/)")
    args = parser.parse_args(argv)

    people = lfw_descriptors(REPO_ROOT / "reports" / "bench_store" / "lfw_descriptors.npz")
    enrolled = sorted(p for p, v in people.items() if len(v) >= 2)[: args.small_users]
    if not enrolled:
        raise SystemExit("no LFW people with two photos or more in ../shared/facedata: nothing to probe")
    url = args.store_url
    if url is None:
        from tools import local_postgres

        server = local_postgres.start(OUT / "pgdata", keep_running=False)
        url = local_postgres.create_database(server, "bench_collections")
    model = model_id()
    store = PostgresFaceStore(url)
    try:
        big = build("big", people, enrolled, args.big_faces + len(enrolled), seed=1)
        small = build("small", people, enrolled, args.small_users, seed=2)
        print(f"loading {len(big.ids)} users into 'big' and {len(small.ids)} into 'small'", flush=True)
        load_s = load(store, big, model) + load(store, small, model)
        started = time.perf_counter()
        store.build_search_index(model, maintenance_work_mem="2GB")
        index_s = time.perf_counter() - started
        rows = [measure(store, small, people, model), measure(store, big, people, model)]
    finally:
        store.close()
    results = {"load_s": round(load_s, 1), "index_build_s": round(index_s, 1), "rows": rows}
    command = "python -m tools.bench_collections"
    if args.big_faces != 1_000_000:
        command += f" --big-faces {args.big_faces}"
    lines = [
        f"Command: `{command}`",
        "",
        "| collection | users | probes (LFW) | search p50 / p99 ms | recall@1 vs exact |",
        "|---|---|---|---|---|",
        *[
            f"| {r['collection']} | {r['users']:,} | {r['probes']} | {r['search_p50_ms']} / {r['search_p99_ms']} | "
            f"{r['recall_at_1']:.4f} |"
            for r in rows
        ],
        "",
        f"Load {results['load_s']} s, HNSW build {results['index_build_s']} s.",
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
