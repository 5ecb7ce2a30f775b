"""Face stores: the :class:`FaceStore` protocol and its backends, chosen by settings in :func:`open_store`.

``FACE_STORE_URL=postgresql://...`` selects :class:`~api.store.postgres.PostgresFaceStore` (several service
nodes, galleries of millions); unset, the ``.npz`` file at ``FACE_STORE_PATH`` (:class:`~api.store.npz.NpzFaceStore`,
one machine, the embedded default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from api.store.base import (
    DEFAULT_COLLECTION,
    CollectionInfo,
    FaceStore,
    SearchResult,
    StoredUser,
    UserMatch,
    UserRecord,
    WriteGuard,
)

if TYPE_CHECKING:
    from api.config import Settings

__all__ = [
    "DEFAULT_COLLECTION",
    "CollectionInfo",
    "FaceStore",
    "SearchResult",
    "StoredUser",
    "UserMatch",
    "UserRecord",
    "WriteGuard",
    "open_store",
    "open_store_at",
]


def open_store(settings: Settings) -> FaceStore:
    """The store the settings name. Opening an ``.npz`` reads and validates it (a corrupt file stops start-up
    here, untouched); a PostgreSQL store connects lazily, so a database that is down does not stop start-up."""
    return open_store_at(settings.store_url or str(settings.store_path), settings)


def open_store_at(location: str, settings: Settings | None = None) -> FaceStore:
    """A store at ``location``: a ``postgresql://`` URL or a path to an ``.npz`` file (``store copy`` uses both)."""
    from api.config import Settings

    settings = settings or Settings()
    if "://" in location:
        from api.store.postgres import PostgresFaceStore, PostgresOptions

        options = PostgresOptions(
            pool_size=settings.store_pool_size,
            timeout_s=settings.store_timeout_s,
            ef_search=settings.store_hnsw_ef_search,
            guard_ef_search=settings.store_hnsw_guard_ef_search,
            hnsw_m=settings.store_hnsw_m,
            hnsw_ef_construction=settings.store_hnsw_ef_construction,
        )
        return PostgresFaceStore(location, options)
    from api.store.npz import NpzFaceStore

    return NpzFaceStore(
        location,
        lock_timeout_s=settings.store_lock_timeout_s,
        encryption_key=settings.store_encryption_key,
    )
