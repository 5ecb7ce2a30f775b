"""Helpers shared by the store tests: random unit descriptors, store snapshots, the backends under test."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from api.store import FaceStore, UserRecord
from api.store.npz import NpzFaceStore
from api.store.postgres import PostgresFaceStore, PostgresOptions

BACKENDS = ("npz", "postgres")
# float32 inner products: numpy and pgvector sum in different orders.
COSINE_TOLERANCE = 1e-5


# Galleries of up to 10,000 faces are searched exactly on PostgreSQL; these tests' galleries are smaller, and it
# is the HNSW path that must keep the contract, so they always take it (tests/store/test_postgres.py covers
# the exact path).
INDEX_ALWAYS = PostgresOptions(exact_search_max_faces=0)


def open_at(location: str) -> FaceStore:
    """A new store instance on ``location``: a PostgreSQL URL or an ``.npz`` path."""
    if "://" in location:
        return PostgresFaceStore(location, INDEX_ALWAYS)
    return NpzFaceStore(Path(location))


def unit(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    """``n`` random unit vectors of dimension ``d``, float32."""
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def normalized(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def snapshot(store: FaceStore) -> list[tuple[UserRecord, bytes]]:
    """Everything the store holds, comparable with ``==``: every record with its descriptors' bytes."""
    return [(u.record, u.embeddings.astype(np.float32).tobytes()) for batch in store.export_users(7) for u in batch]
