"""What every face store offers: the :class:`FaceStore` protocol, its records and the input checks they share.

A store keeps users (id, name, model id, timestamps, face count) and their face descriptors (unit vectors,
never images) and performs the 1:N search itself, so the service never loads a whole gallery. Two backends
implement it: :class:`api.store.npz.NpzFaceStore` (one file, the embedded default) and
:class:`api.store.postgres.PostgresFaceStore` (PostgreSQL + pgvector, shared by several service nodes).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import numpy as np

from api.config import COLLECTION_NAME_PATTERN
from api.errors import CollectionNotFoundError, InvalidCollectionNameError

# Every user belongs to exactly one collection: a gallery that never sees the others. This one always exists.
DEFAULT_COLLECTION = "default"
_COLLECTION_NAME = re.compile(COLLECTION_NAME_PATTERN)


@dataclass(frozen=True)
class UserRecord:
    """One registered person. ``faces`` is the number of descriptors stored for them."""

    id: str
    name: str
    model_id: str
    created_at: datetime
    updated_at: datetime
    faces: int
    collection: str = DEFAULT_COLLECTION


@dataclass(frozen=True)
class CollectionInfo:
    """A collection and what it holds now."""

    name: str
    users: int
    faces: int
    created_at: datetime


@dataclass(frozen=True)
class StoredUser:
    """A user with their descriptors, as ``store copy`` moves them between backends."""

    record: UserRecord
    embeddings: np.ndarray  # (faces, dim) float32


@dataclass(frozen=True)
class UserMatch:
    """A user's score for one probe: the best inner product over the user's stored faces (cosine of unit
    vectors). Best-of-faces measured better than a mean template on LFW (README)."""

    user_id: str
    name: str
    cosine: float


@dataclass(frozen=True)
class SearchResult:
    """``matches[i]``: the best users for probe ``i``, best first, at most ``top_k``.

    ``users`` and ``faces`` are what the searched gallery (one collection, one model; the excluded user
    included) holds: the ``N`` of the 1:N threshold rules, read in the same snapshot as the matches.
    ``other_models``: users of the same collection whose descriptors come from another model (model id ->
    users). A search never sees them, so the service refuses to answer as if they were not there.
    """

    users: int
    faces: int
    matches: list[list[UserMatch]]
    other_models: dict[str, int] = field(default_factory=dict)


# Called by a write inside its critical section (the file lock; the PostgreSQL transaction holding the
# collection's advisory lock) with the search of the new faces against everyone else; raising aborts the
# write. This makes the duplicate check and the write one atomic step, also across service nodes.
WriteGuard = Callable[[SearchResult], None]


class FaceStore(Protocol):
    """What services and routers may use.

    Every user lives in one collection, and every method that names a user or searches takes the collection
    (default ``"default"``): a user id of another collection is ``UserNotFoundError``, exactly like an unknown
    id, and a search sees only its collection. An unknown collection raises ``CollectionNotFoundError``.
    Unknown ids raise ``UserNotFoundError``; descriptors of another model or dimension than the user's (or
    than the store holds for that model) ``ModelMismatchError``; a store that cannot be reached
    ``StoreUnavailableError``. Descriptors passed in must be unit vectors for search to be meaningful.
    """

    #: ``"npz"`` or ``"postgresql"``: what ``GET /`` names (never a path or credentials).
    backend: str

    def add_user(
        self,
        name: str,
        embeddings: np.ndarray,
        model_id: str,
        *,
        collection: str = DEFAULT_COLLECTION,
        guard: WriteGuard | None = None,
    ) -> UserRecord: ...

    def add_faces(
        self,
        user_id: str,
        embeddings: np.ndarray,
        model_id: str,
        *,
        collection: str = DEFAULT_COLLECTION,
        guard: WriteGuard | None = None,
    ) -> UserRecord: ...

    def rename(self, user_id: str, name: str, *, collection: str = DEFAULT_COLLECTION) -> UserRecord: ...

    def delete(self, user_id: str, *, collection: str = DEFAULT_COLLECTION) -> None: ...

    def get(self, user_id: str, *, collection: str = DEFAULT_COLLECTION) -> UserRecord: ...

    def list_users(
        self, offset: int = 0, limit: int | None = None, *, collection: str = DEFAULT_COLLECTION
    ) -> tuple[list[UserRecord], int]: ...

    def count(self, collection: str | None = None) -> int:
        """Users of ``collection``, or of every collection when None."""
        ...

    def embeddings_of(self, user_id: str, *, collection: str = DEFAULT_COLLECTION) -> np.ndarray: ...

    def search(
        self,
        model_id: str,
        probes: np.ndarray,
        top_k: int,
        exclude_user: str | None = None,
        *,
        collection: str = DEFAULT_COLLECTION,
    ) -> SearchResult: ...

    def list_collections(self) -> list[CollectionInfo]: ...

    def get_collection(self, name: str) -> CollectionInfo: ...

    def create_collection(self, name: str) -> CollectionInfo:
        """``CollectionExistsError`` if it exists already."""
        ...

    def delete_collection(self, name: str, *, force: bool = False) -> int:
        """Remove the collection with every user and descriptor of it; returns how many users went.
        ``CollectionNotEmptyError`` unless empty or ``force``; ``default`` cannot be deleted."""
        ...

    def export_users(self, batch_size: int) -> Iterator[list[StoredUser]]:
        """Every user of every collection with their descriptors, in (created_at, id) order, ``batch_size`` at a
        time."""
        ...

    def import_users(self, users: list[StoredUser]) -> int:
        """Add users keeping their ids, collections and timestamps (missing collections are created); ids
        already present are skipped (so a copy can be re-run). Returns how many were added."""
        ...

    def check(self) -> None:
        """Raise ``StoreUnavailableError`` (with the reason) when the store cannot serve requests now."""
        ...

    def close(self) -> None: ...


# --- input checks shared by the backends -------------------------------------------------------------------


def checked_embeddings(embeddings: np.ndarray) -> np.ndarray:
    """A private, read-only float32 (n >= 1, d >= 1) copy; anything else is a ``ValueError`` (a caller bug)."""
    array = np.asarray(embeddings)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"embeddings must have shape (n >= 1, d >= 1), got {array.shape}")
    if array.dtype.kind not in "fiu":
        raise ValueError(f"embeddings must be numeric, got dtype {array.dtype}")
    # A private copy: the caller may reuse its buffer, and the store hands out read-only views of this one.
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are refused just below
        copy = np.array(array, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(copy).all():
        raise ValueError("embeddings contain NaN or infinite values (or values beyond float32)")
    copy.setflags(write=False)
    return copy


def checked_probes(probes: np.ndarray, top_k: int) -> np.ndarray:
    if top_k < 0:
        raise ValueError("top_k must be >= 0")
    array = np.asarray(probes, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] < 1 or not np.isfinite(array).all():
        raise ValueError(f"probes must be finite (n, d) descriptors, got shape {array.shape}")
    return array


def checked_text(value: str, what: str, *, allow_empty: bool) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not value and not allow_empty:
        raise ValueError(f"{what} must not be empty")
    try:
        value.encode("utf-8")  # lone surrogates would only fail later, at serialisation
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode text") from exc
    return value


def checked_collection_name(name: str) -> str:
    """1-64 characters of ``a-z 0-9 _ -``: safe in URLs, file formats and SQL identifiers alike."""
    if not isinstance(name, str) or not _COLLECTION_NAME.match(name):
        raise InvalidCollectionNameError(
            f"Invalid collection name {str(name)[:80]!r}: use 1-64 characters of a-z, 0-9, _ and -.",
            collection=str(name)[:80],
        )
    return name


def collection_not_found(name: str) -> CollectionNotFoundError:
    return CollectionNotFoundError(
        f"No collection named {name!r}; create it with POST /api/collections.", collection=name
    )


def checked_page(offset: int, limit: int | None) -> None:
    if offset < 0 or (limit is not None and limit < 0):
        raise ValueError("offset and limit must be >= 0")


def utc_now() -> datetime:
    return datetime.now(UTC)
