"""The embedded face store: users and their face descriptors in one ``.npz`` file shared by several processes.

The right choice for one machine and a gallery of up to some ten thousand users (README, "Choosing a
store"): every write rewrites the whole file and every process keeps all descriptors in memory. Search is
one matrix product over the model's descriptors, exact.

File layout (``numpy.savez``, uncompressed, always read with ``allow_pickle=False``):

``format_version``
    int64 scalar: 1 or 2 (:data:`FORMAT_VERSIONS`). Files of another format version are refused, not guessed at.
``version``
    int64 scalar, the store's counter; every write stores the previous value + 1.
``meta``
    uint8 array holding UTF-8 JSON: ``{"models": [{"id", "dim"}, ...], "users": [{"id", "name",
    "model_id", "created_at", "updated_at", "faces"}, ...]}``, users in (created_at, id) order,
    timestamps ISO 8601 in UTC. JSON in bytes rather than numpy unicode arrays because numpy strips
    trailing NUL characters from ``<U`` strings and names are free text. Version 2 adds
    ``"collections": [{"name", "created_at"}, ...]`` and a ``"collection"`` per user; version 1 files hold
    only the ``default`` collection. A store that holds nothing but ``default`` is written as version 1, so
    tools that read version 1 keep working until collections are used.
``emb_<i>``
    float32 (rows, dim) for ``models[i]``: the descriptors of that model's users, user after user in
    ``users`` order, ``faces`` rows each.

Concurrency: every write is a read-modify-write under an exclusive ``<file>.lock`` (``filelock``) and
replaces the file atomically (temporary file in the same folder, fsync, ``os.replace``, fsync of the
folder), so readers never see a partial file and a killed writer leaves the previous file intact.
Reads are served from memory after an ``os.stat`` that notices when another process replaced the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import threading
import time
import uuid
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import filelock
import numpy as np

from api.errors import (
    CollectionExistsError,
    CollectionNotEmptyError,
    CollectionProtectedError,
    InvalidCollectionNameError,
    ModelMismatchError,
    StoreCorruptError,
    StoreKeyError,
    StoreLockTimeoutError,
    UserNotFoundError,
)
from api.store.base import (
    DEFAULT_COLLECTION,
    CollectionInfo,
    SearchResult,
    StoredUser,
    UserMatch,
    UserRecord,
    WriteGuard,
    checked_collection_name,
    checked_embeddings,
    checked_page,
    checked_probes,
    checked_text,
    collection_not_found,
    utc_now,
)

FORMAT_VERSION = 2  # the newest this code writes
FORMAT_VERSIONS = (1, 2)  # what it reads
DEFAULT_STORE_NAME = "face_database.npz"

_T = TypeVar("_T")
_TMP_SUFFIX = ".tmp"
_USER_KEYS = frozenset({"id", "name", "model_id", "created_at", "updated_at", "faces"})
_USER_KEYS_V2 = _USER_KEYS | {"collection"}
_COLLECTION_KEYS = frozenset({"name", "created_at"})
_MODEL_KEYS = frozenset({"id", "dim"})
# A zip archive starts with a local file header, or with the end-of-directory record when empty.
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
# An encrypted store is this marker followed by a Fernet token (AES-128-CBC + HMAC-SHA256) of the .npz bytes.
ENCRYPTED_MAGIC = b"FACESTORE-FERNET1\n"


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy fields with == is ambiguous
class _Gallery:
    """All descriptors of one model, stacked for a single matrix product.

    Row ``r`` of ``embeddings`` belongs to user ``user_ids[owner[r]]`` called ``names[owner[r]]``.
    Read-only and never changed: a write makes the store build a new one, so a search holding one keeps a
    consistent view. An empty gallery has ``embeddings`` of shape (0, 0).
    """

    embeddings: np.ndarray  # (N, d) float32
    owner: np.ndarray  # (N,) int32, index into user_ids / names
    user_ids: tuple[str, ...]
    names: tuple[str, ...]
    other_models: dict[str, int]  # the collection's users of other models (not in this gallery)

    def search(self, probe: np.ndarray, top_k: int, exclude_user: str | None) -> list[UserMatch]:
        """The ``top_k`` best users by their best face (one matrix product, exact)."""
        n_users = len(self.user_ids)
        if n_users == 0 or top_k == 0:
            return []
        cosines = self.embeddings @ probe
        best = np.full(n_users, -np.inf, np.float32)
        np.maximum.at(best, self.owner, cosines)
        if exclude_user is not None:
            with contextlib.suppress(ValueError):
                best[self.user_ids.index(exclude_user)] = -np.inf
        k = min(top_k, n_users)
        top = np.argpartition(-best, k - 1)[:k]
        top = top[np.lexsort((top, -best[top]))]  # best first; ties in gallery order
        return [UserMatch(self.user_ids[i], self.names[i], float(best[i])) for i in top if np.isfinite(best[i])]


# --- in-memory state ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    record: UserRecord
    embeddings: np.ndarray  # (faces, dim) float32, read-only

    @cached_property
    def meta_json(self) -> str:
        """This user's entry in the file's ``meta.users``. Cached because every write serialises every user
        and formatting thousands of timestamps would otherwise dominate the cost of a write."""
        r = self.record
        fields = {
            "id": r.id,
            "name": r.name,
            "model_id": r.model_id,
            "created_at": r.created_at.isoformat(),
            "updated_at": r.updated_at.isoformat(),
            "faces": r.faces,
        }
        return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))

    @cached_property
    def meta_json_v2(self) -> str:
        return f'{self.meta_json[:-1]},"collection":{json.dumps(self.record.collection)}}}'


@dataclass(frozen=True)
class _State:
    """Immutable: a write builds a new state, so readers holding the old one are never disturbed."""

    version: int
    users: Mapping[str, _Entry]  # insertion order == (created_at, id) order
    records: tuple[UserRecord, ...]  # the same order, for paging without re-sorting
    dims: Mapping[str, int]  # model id -> descriptor dimension
    collections: Mapping[str, datetime]  # name -> created_at; always holds DEFAULT_COLLECTION

    @staticmethod
    def build(version: int, entries: Iterable[_Entry], collections: Mapping[str, datetime] | None = None) -> _State:
        # Sorting on every write is linear in practice: Timsort on an already sorted list plus one item.
        ordered = sorted(entries, key=lambda e: (e.record.created_at, e.record.id))
        dims: dict[str, int] = {}
        for entry in ordered:
            dims.setdefault(entry.record.model_id, int(entry.embeddings.shape[1]))
        known = dict(collections or {})
        if DEFAULT_COLLECTION not in known:
            # A version 1 file does not record when `default` began: its first user did, or the store's opening.
            known[DEFAULT_COLLECTION] = ordered[0].record.created_at if ordered else _OPENED_AT
        return _State(
            version=version,
            users={e.record.id: e for e in ordered},
            records=tuple(e.record for e in ordered),
            dims=dims,
            collections=known,
        )

    def with_entries(self, entries: Iterable[_Entry]) -> _State:
        """The next state: these users, the same collections."""
        return _State.build(self.version + 1, entries, self.collections)

    @cached_property
    def records_by_collection(self) -> Mapping[str, tuple[UserRecord, ...]]:
        grouped: dict[str, list[UserRecord]] = {name: [] for name in self.collections}
        for record in self.records:
            grouped[record.collection].append(record)
        return {name: tuple(records) for name, records in grouped.items()}

    @property
    def only_default(self) -> bool:
        """Nothing a version 1 file cannot hold."""
        return list(self.collections) == [DEFAULT_COLLECTION]


_OPENED_AT = datetime.now(UTC)
_EMPTY = _State.build(0, ())


class _Sig(NamedTuple):
    """What ``os.stat`` tells about the file: a replacement changes the inode, and our writers also force
    the mtime strictly forward, so a changed file gives a changed signature."""

    dev: int
    ino: int
    size: int
    mtime_ns: int


def _sig_of(st: os.stat_result) -> _Sig:
    return _Sig(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


# --- (de)serialisation: the only place that sees the file's bytes -----------------------------------------


class _FormatError(Exception):
    """The bytes are not a store of this format; the caller turns it into ``StoreCorruptError``."""


def _serialize(state: _State) -> bytes:
    """State -> file bytes. An encryption-at-rest layer wraps this and :func:`_deserialize`, nothing else."""
    models = sorted(state.dims)
    model_json = json.dumps(
        [{"id": m, "dim": state.dims[m]} for m in models], ensure_ascii=False, separators=(",", ":")
    )
    if state.only_default:
        format_version = 1
        users_json = ",".join(e.meta_json for e in state.users.values())
        text = f'{{"models":{model_json},"users":[{users_json}]}}'
    else:
        format_version = FORMAT_VERSION
        users_json = ",".join(e.meta_json_v2 for e in state.users.values())
        collections_json = json.dumps(
            [{"name": n, "created_at": t.isoformat()} for n, t in sorted(state.collections.items())],
            separators=(",", ":"),
        )
        text = f'{{"collections":{collections_json},"models":{model_json},"users":[{users_json}]}}'
    arrays: dict[str, np.ndarray] = {
        "format_version": np.array(format_version, dtype=np.int64),
        "version": np.array(state.version, dtype=np.int64),
        "meta": np.frombuffer(text.encode("utf-8"), dtype=np.uint8),
    }
    for i, model_id in enumerate(models):
        blocks = [e.embeddings for e in state.users.values() if e.record.model_id == model_id]
        arrays[f"emb_{i}"] = np.concatenate(blocks, axis=0).astype(np.float32, copy=False)
    buffer = io.BytesIO()
    # Uncompressed: faster, and a deleted user's descriptors could not hide in a compressed stream anyway
    # since the whole file is rewritten. allow_pickle=False makes an object array a bug, not a pickle.
    np.savez(buffer, allow_pickle=False, **arrays)
    return buffer.getvalue()


def _deserialize(data: bytes) -> _State:
    """File bytes -> state, checking everything: any inconsistency raises ``_FormatError``."""
    if not data:
        raise _FormatError("the file is empty")
    if not data.startswith(_ZIP_MAGICS):
        raise _FormatError("not an .npz (zip) archive")
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise _FormatError("not an .npz archive")
        with loaded:
            arrays = {key: loaded[key] for key in loaded.files}
    except _FormatError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        # Truncated archives, bad CRCs, pickled object arrays (refused by allow_pickle=False), ...
        raise _FormatError(f"unreadable archive: {exc}") from exc
    return _state_from_arrays(arrays)


def _state_from_arrays(arrays: Mapping[str, np.ndarray]) -> _State:
    # The format version is checked before anything else so that a newer file gets the right message.
    if "format_version" not in arrays:
        raise _FormatError("no 'format_version' array")
    format_version = _int_scalar(arrays, "format_version")
    if format_version not in FORMAT_VERSIONS:
        raise _FormatError(
            f"format version {format_version} is not supported (this code reads versions {FORMAT_VERSIONS})"
        )
    for key in ("version", "meta"):
        if key not in arrays:
            raise _FormatError(f"no {key!r} array")
    version = _int_scalar(arrays, "version")
    if version < 0:
        raise _FormatError(f"negative version {version}")

    meta_array = arrays["meta"]
    if meta_array.dtype != np.uint8 or meta_array.ndim != 1:
        raise _FormatError("'meta' must be a 1-D uint8 array")
    try:
        meta = json.loads(meta_array.tobytes().decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _FormatError(f"'meta' is not UTF-8 JSON: {exc}") from exc
    meta_keys = {"models", "users"} if format_version == 1 else {"collections", "models", "users"}
    if not isinstance(meta, dict) or set(meta) != meta_keys:
        raise _FormatError(f"'meta' must be an object with exactly {sorted(meta_keys)}")
    if any(not isinstance(meta[key], list) for key in meta_keys):
        raise _FormatError(f"{sorted(meta_keys)} of 'meta' must be lists")
    collections = _collections_from_json(meta.get("collections", []))

    dims: dict[str, int] = {}
    for model in meta["models"]:
        if not isinstance(model, dict) or set(model) != _MODEL_KEYS:
            raise _FormatError(f"malformed model entry {model!r}")
        model_id, dim = model["id"], model["dim"]
        if not isinstance(model_id, str) or not model_id or model_id in dims:
            raise _FormatError(f"bad or duplicate model id {model_id!r}")
        if not _is_int(dim) or dim < 1:
            raise _FormatError(f"bad dimension {dim!r} for model {model_id!r}")
        dims[model_id] = dim
    model_index = {m: i for i, m in enumerate(dims)}

    expected = {"format_version", "version", "meta"} | {f"emb_{i}" for i in range(len(dims))}
    if set(arrays) != expected:
        missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        raise _FormatError(f"arrays do not match 'meta' (missing {missing}, unexpected {extra})")

    matrices: list[np.ndarray] = []
    for i, (model_id, dim) in enumerate(dims.items()):
        matrix = arrays[f"emb_{i}"]
        if matrix.dtype != np.float32 or matrix.ndim != 2 or matrix.shape[1] != dim:
            raise _FormatError(f"'emb_{i}' must be float32 (rows, {dim}) for model {model_id!r}")
        if not np.isfinite(matrix).all():
            raise _FormatError(f"'emb_{i}' holds NaN or infinite values")
        matrix.setflags(write=False)  # entries are views into it; nobody may write through them
        matrices.append(matrix)

    offsets = [0] * len(dims)
    seen: set[str] = set()
    entries: list[_Entry] = []
    for user in meta["users"]:
        record = _record_from_json(user, dims, collections if format_version > 1 else None)
        if record.id in seen:
            raise _FormatError(f"duplicate user id {record.id!r}")
        seen.add(record.id)
        i = model_index[record.model_id]
        start, stop = offsets[i], offsets[i] + record.faces
        if stop > matrices[i].shape[0]:
            raise _FormatError(f"'emb_{i}' has fewer rows than its users' face counts")
        offsets[i] = stop
        entries.append(_Entry(record, matrices[i][start:stop]))
    for i, (model_id, matrix) in enumerate(zip(dims, matrices, strict=True)):
        if offsets[i] != matrix.shape[0]:
            raise _FormatError(f"'emb_{i}' has {matrix.shape[0]} rows, its users {offsets[i]} faces")
        if offsets[i] == 0:
            raise _FormatError(f"model {model_id!r} has no users")
    return _State.build(version, entries, collections)


def _collections_from_json(items: list[Any]) -> dict[str, datetime]:
    collections: dict[str, datetime] = {}
    for item in items:
        if not isinstance(item, dict) or set(item) != _COLLECTION_KEYS:
            raise _FormatError(f"malformed collection entry {str(item)[:200]}")
        name = item["name"]
        try:
            checked_collection_name(name)
        except InvalidCollectionNameError:
            raise _FormatError(f"bad collection name {str(name)[:80]!r}") from None
        if name in collections:
            raise _FormatError(f"duplicate collection {name!r}")
        collections[name] = _parse_time(item["created_at"], f"collection {name}")
    if items and DEFAULT_COLLECTION not in collections:
        raise _FormatError(f"the {DEFAULT_COLLECTION!r} collection is missing")
    return collections


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_scalar(arrays: Mapping[str, np.ndarray], key: str) -> int:
    value = arrays[key]
    if value.shape != () or value.dtype.kind not in "iu":
        raise _FormatError(f"{key!r} must be an integer scalar")
    return int(value)


def _record_from_json(user: Any, dims: Mapping[str, int], collections: Mapping[str, datetime] | None) -> UserRecord:
    """``collections``: those of a version 2 file (every user names one of them); None for version 1."""
    if not isinstance(user, dict) or set(user) != (_USER_KEYS if collections is None else _USER_KEYS_V2):
        raise _FormatError(f"malformed user entry {str(user)[:200]}")
    collection = DEFAULT_COLLECTION if collections is None else user["collection"]
    if collections is not None and collection not in collections:
        raise _FormatError(f"user {str(user['id'])[:80]!r} is in unknown collection {str(collection)[:80]!r}")
    user_id, name, model_id, faces = user["id"], user["name"], user["model_id"], user["faces"]
    if not isinstance(user_id, str) or not user_id:
        raise _FormatError(f"bad user id {user_id!r}")
    if not isinstance(name, str):
        raise _FormatError(f"bad name for user {user_id!r}")
    if model_id not in dims:
        raise _FormatError(f"user {user_id!r} has unknown model {model_id!r}")
    if not _is_int(faces) or faces < 1:
        raise _FormatError(f"bad face count {faces!r} for user {user_id!r}")
    return UserRecord(
        id=user_id,
        name=name,
        model_id=model_id,
        created_at=_parse_time(user["created_at"], f"user {user_id!r}"),
        updated_at=_parse_time(user["updated_at"], f"user {user_id!r}"),
        faces=faces,
        collection=collection,
    )


def _parse_time(value: object, owner: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.utcoffset() is None:
        raise _FormatError(f"bad timestamp {value!r} for {owner}")
    return parsed.astimezone(UTC)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable. Some filesystems cannot fsync a folder; the data file is already
    # synced then and there is nothing better to do.
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


# --- the file-backed store -------------------------------------------------------------------------------


def _cipher(key: str | None):  # -> cryptography.fernet.Fernet | None
    if not key:
        return None
    from cryptography.fernet import Fernet

    try:
        return Fernet(key.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise StoreKeyError(
            "FACE_STORE_ENCRYPTION_KEY is not a valid key; create one with `python -m api.keys store-key`."
        ) from None


class NpzFaceStore:
    """:class:`~api.store.base.FaceStore` in one ``.npz`` file, safe for several threads and processes.

    A missing file is an empty store, created by the first write. A corrupt file raises
    ``StoreCorruptError`` here, in the constructor, and is never written over. Deleting a user rewrites
    the whole file without them; the old file's disk blocks are released to the filesystem, not scrubbed
    (encryption at rest is the remedy for that, see :func:`_serialize`).
    """

    backend = "npz"

    def __init__(self, path: Path, lock_timeout_s: float = 30.0, encryption_key: str | None = None) -> None:
        if lock_timeout_s < 0:
            raise ValueError("lock_timeout_s must be >= 0")
        self._cipher = _cipher(encryption_key)
        self._path = Path(path)
        self._lock_timeout_s = float(lock_timeout_s)
        self._lock_pid = os.getpid()
        self._file_lock = self._new_file_lock()
        # Serialises this process's writers before they queue on the file lock, so that readers, which
        # take only _cache_lock, never wait behind another process's lock.
        self._write_mutex = threading.Lock()
        self._cache_lock = threading.RLock()
        self._state: _State = _EMPTY
        self._sig: _Sig | None = None
        self._digest: bytes | None = None
        self._galleries: dict[tuple[str, str], _Gallery] = {}  # per (collection, model), for self._state only
        with self._cache_lock:
            self._reload_locked()
        self._remove_leftover_temp_files()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def version(self) -> int:
        """The file's write counter (``version`` array): every write stores the previous value + 1."""
        return self._current().version

    # --- reads ------------------------------------------------------------------------------------------

    def get(self, user_id: str, *, collection: str = DEFAULT_COLLECTION) -> UserRecord:
        return self._entry(self._current(), user_id, collection).record

    def embeddings_of(self, user_id: str, *, collection: str = DEFAULT_COLLECTION) -> np.ndarray:
        """The user's descriptors, (faces, d) float32, read-only."""
        return self._entry(self._current(), user_id, collection).embeddings

    def list_users(
        self, offset: int = 0, limit: int | None = None, *, collection: str = DEFAULT_COLLECTION
    ) -> tuple[list[UserRecord], int]:
        """A page of the collection's users in (created_at, id) order, and how many it holds."""
        checked_page(offset, limit)
        state = self._current()
        records = state.records_by_collection.get(collection)
        if records is None:
            raise collection_not_found(collection)
        stop = len(records) if limit is None else offset + limit
        return list(records[offset:stop]), len(records)

    def count(self, collection: str | None = None) -> int:
        state = self._current()
        if collection is None:
            return len(state.users)
        records = state.records_by_collection.get(collection)
        if records is None:
            raise collection_not_found(collection)
        return len(records)

    def search(
        self,
        model_id: str,
        probes: np.ndarray,
        top_k: int,
        exclude_user: str | None = None,
        *,
        collection: str = DEFAULT_COLLECTION,
    ) -> SearchResult:
        """Exact best-of-faces search over the collection's descriptors of ``model_id`` (one matrix product)."""
        probes = checked_probes(probes, top_k)
        state = self._current()
        return self._search_in(state, collection, model_id, probes, top_k, exclude_user)

    def list_collections(self) -> list[CollectionInfo]:
        state = self._current()
        return [self._collection_info(state, name) for name in sorted(state.collections)]

    def get_collection(self, name: str) -> CollectionInfo:
        state = self._current()
        if name not in state.collections:
            raise collection_not_found(name)
        return self._collection_info(state, name)

    def export_users(self, batch_size: int) -> Iterator[list[StoredUser]]:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        entries = list(self._current().users.values())  # one snapshot: a concurrent write cannot tear it
        for start in range(0, len(entries), batch_size):
            yield [StoredUser(e.record, e.embeddings) for e in entries[start : start + batch_size]]

    def check(self) -> None:
        """A file store is always available once opened (a corrupt file already failed the constructor)."""

    def close(self) -> None:
        """Nothing to release: the file lock is held only during a write."""

    # --- writes -----------------------------------------------------------------------------------------

    def add_user(
        self,
        name: str,
        embeddings: np.ndarray,
        model_id: str,
        *,
        collection: str = DEFAULT_COLLECTION,
        guard: WriteGuard | None = None,
    ) -> UserRecord:
        name = checked_text(name, "name", allow_empty=True)
        model_id = checked_text(model_id, "model_id", allow_empty=False)
        faces = checked_embeddings(embeddings)

        def apply(state: _State) -> tuple[_State, UserRecord]:
            self._check_collection(state, collection)
            self._check_dimension(state, model_id, faces.shape[1])
            if guard is not None:
                guard(self._search_in(state, collection, model_id, faces, 1, None))
            user_id = uuid.uuid4().hex
            while user_id in state.users:  # practically never; ids must be unique all the same
                user_id = uuid.uuid4().hex
            now = utc_now()
            record = UserRecord(user_id, name, model_id, now, now, int(faces.shape[0]), collection)
            return state.with_entries([*state.users.values(), _Entry(record, faces)]), record

        return self._write(apply)

    def add_faces(
        self,
        user_id: str,
        embeddings: np.ndarray,
        model_id: str,
        *,
        collection: str = DEFAULT_COLLECTION,
        guard: WriteGuard | None = None,
    ) -> UserRecord:
        model_id = checked_text(model_id, "model_id", allow_empty=False)
        faces = checked_embeddings(embeddings)

        def apply(state: _State) -> tuple[_State, UserRecord]:
            entry = self._entry(state, user_id, collection)
            if entry.record.model_id != model_id:
                raise ModelMismatchError(
                    f"User {user_id} was registered with model {entry.record.model_id!r}, "
                    f"not {model_id!r}; re-register them to use the new model",
                    user_id=user_id,
                    expected_model=entry.record.model_id,
                    got_model=model_id,
                )
            self._check_dimension(state, model_id, faces.shape[1])
            if guard is not None:
                guard(self._search_in(state, collection, model_id, faces, 1, user_id))
            stacked = np.concatenate([entry.embeddings, faces], axis=0)
            stacked.setflags(write=False)
            record = replace(entry.record, faces=int(stacked.shape[0]), updated_at=utc_now())
            return self._replaced(state, _Entry(record, stacked)), record

        return self._write(apply)

    def rename(self, user_id: str, name: str, *, collection: str = DEFAULT_COLLECTION) -> UserRecord:
        name = checked_text(name, "name", allow_empty=True)

        def apply(state: _State) -> tuple[_State, UserRecord]:
            entry = self._entry(state, user_id, collection)
            record = replace(entry.record, name=name, updated_at=utc_now())
            return self._replaced(state, _Entry(record, entry.embeddings)), record

        return self._write(apply)

    def delete(self, user_id: str, *, collection: str = DEFAULT_COLLECTION) -> None:
        def apply(state: _State) -> tuple[_State, None]:
            self._entry(state, user_id, collection)
            return state.with_entries(e for uid, e in state.users.items() if uid != user_id), None

        self._write(apply)

    def create_collection(self, name: str) -> CollectionInfo:
        checked_collection_name(name)

        def apply(state: _State) -> tuple[_State, CollectionInfo]:
            if name in state.collections:
                raise CollectionExistsError(f"The collection {name!r} exists already.", collection=name)
            new = _State.build(state.version + 1, state.users.values(), {**state.collections, name: utc_now()})
            return new, self._collection_info(new, name)

        return self._write(apply)

    def delete_collection(self, name: str, *, force: bool = False) -> int:
        """Rewrites the file without the collection's users: none of their descriptors remains in it."""

        def apply(state: _State) -> tuple[_State, int]:
            if name == DEFAULT_COLLECTION:
                raise CollectionProtectedError(f"The {DEFAULT_COLLECTION!r} collection cannot be deleted.")
            if name not in state.collections:
                raise collection_not_found(name)
            doomed = len(state.records_by_collection[name])
            if doomed and not force:
                raise CollectionNotEmptyError(
                    f"The collection {name!r} holds {doomed} users; pass force=true to delete them with it.",
                    collection=name,
                    users=doomed,
                )
            kept = [e for e in state.users.values() if e.record.collection != name]
            collections = {n: t for n, t in state.collections.items() if n != name}
            return _State.build(state.version + 1, kept, collections), doomed

        return self._write(apply)

    def import_users(self, users: list[StoredUser]) -> int:
        """One write for the whole batch; ids already in the file are skipped, so a copy can be re-run.
        Collections the users name are created."""
        incoming = [
            _Entry(
                replace(
                    u.record,
                    id=checked_text(u.record.id, "id", allow_empty=False),
                    name=checked_text(u.record.name, "name", allow_empty=True),
                    model_id=checked_text(u.record.model_id, "model_id", allow_empty=False),
                    collection=checked_collection_name(u.record.collection),
                ),
                checked_embeddings(u.embeddings),
            )
            for u in users
        ]
        for entry in incoming:
            if entry.record.faces != entry.embeddings.shape[0]:
                rows = entry.embeddings.shape[0]
                raise ValueError(f"user {entry.record.id!r}: {entry.record.faces} faces but {rows} descriptors")

        def apply(state: _State) -> tuple[_State, int]:
            new = [e for e in incoming if e.record.id not in state.users]
            if not new:
                return state, 0
            for entry in new:
                self._check_dimension(state, entry.record.model_id, entry.embeddings.shape[1])
            collections = dict(state.collections)
            for entry in new:
                collections.setdefault(entry.record.collection, utc_now())
            merged = _State.build(state.version + 1, [*state.users.values(), *new], collections)
            # Two users of one model in the same batch must agree on the dimension too.
            for entry in new:
                self._check_dimension(merged, entry.record.model_id, entry.embeddings.shape[1])
            return merged, len(new)

        return self._write(apply)

    # --- internals --------------------------------------------------------------------------------------

    @staticmethod
    def _entry(state: _State, user_id: str, collection: str) -> _Entry:
        """The user, if they are in ``collection``: a user of another collection is as unknown as no user."""
        entry = state.users.get(user_id)
        if entry is None or entry.record.collection != collection:
            NpzFaceStore._check_collection(state, collection)
            raise UserNotFoundError(f"No user with id {user_id!r}", user_id=user_id)
        return entry

    @staticmethod
    def _check_collection(state: _State, collection: str) -> None:
        if collection not in state.collections:
            raise collection_not_found(collection)

    @staticmethod
    def _collection_info(state: _State, name: str) -> CollectionInfo:
        records = state.records_by_collection[name]
        return CollectionInfo(name, len(records), sum(r.faces for r in records), state.collections[name])

    @staticmethod
    def _replaced(state: _State, entry: _Entry) -> _State:
        users = dict(state.users)
        users[entry.record.id] = entry
        return state.with_entries(users.values())

    @staticmethod
    def _check_dimension(state: _State, model_id: str, dim: int) -> None:
        # One model, one dimension: the gallery of a model is a single (N, d) matrix.
        expected = state.dims.get(model_id)
        if expected is not None and expected != dim:
            raise ModelMismatchError(
                f"Descriptors of model {model_id!r} have {expected} dimensions in the store, got {dim}",
                model_id=model_id,
                expected_dim=expected,
                got_dim=int(dim),
            )

    def _gallery_of(self, state: _State, collection: str, model_id: str) -> _Gallery:
        """The collection's gallery of the model in ``state``, cached while ``state`` is the installed one."""
        with self._cache_lock:
            if state is not self._state:
                return self._build_gallery(state, collection, model_id)
            gallery = self._galleries.get((collection, model_id))
            if gallery is None:
                gallery = self._galleries[(collection, model_id)] = self._build_gallery(state, collection, model_id)
            return gallery

    def _search_in(
        self,
        state: _State,
        collection: str,
        model_id: str,
        probes: np.ndarray,
        top_k: int,
        exclude_user: str | None,
    ) -> SearchResult:
        self._check_collection(state, collection)
        dim = state.dims.get(model_id)
        if dim is not None and probes.shape[1] != dim:
            raise ModelMismatchError(
                f"Descriptors of model {model_id!r} have {dim} dimensions in the store, got {probes.shape[1]}",
                model_id=model_id,
                expected_dim=dim,
                got_dim=int(probes.shape[1]),
            )
        gallery = self._gallery_of(state, collection, model_id)
        matches = [gallery.search(probe, top_k, exclude_user) for probe in probes]
        return SearchResult(
            users=len(gallery.user_ids),
            faces=len(gallery.embeddings),
            matches=matches,
            other_models=dict(gallery.other_models),
        )

    @staticmethod
    def _build_gallery(state: _State, collection: str, model_id: str) -> _Gallery:
        in_collection = [e for e in state.users.values() if e.record.collection == collection]
        entries = [e for e in in_collection if e.record.model_id == model_id]
        other_models = Counter(e.record.model_id for e in in_collection if e.record.model_id != model_id)
        if entries:
            embeddings = np.concatenate([e.embeddings for e in entries], axis=0)
            counts = [e.record.faces for e in entries]
            owner = np.repeat(np.arange(len(entries), dtype=np.int32), counts)
        else:
            embeddings = np.zeros((0, 0), dtype=np.float32)
            owner = np.zeros(0, dtype=np.int32)
        embeddings.setflags(write=False)
        owner.setflags(write=False)
        return _Gallery(
            embeddings=embeddings,
            owner=owner,
            user_ids=tuple(e.record.id for e in entries),
            names=tuple(e.record.name for e in entries),
            other_models=dict(other_models),
        )

    def _current(self) -> _State:
        """The cached state, reloaded first if another process replaced the file (one ``os.stat``)."""
        with self._cache_lock:
            try:
                sig: _Sig | None = _sig_of(os.stat(self._path))
            except FileNotFoundError:
                sig = None
            if sig != self._sig:
                self._reload_locked()
            return self._state

    def _reload_locked(self) -> None:
        """Read the whole file and install it unless its bytes are the ones cached. Caller holds _cache_lock.

        Signature and bytes come from the same open file, so a concurrent replacement cannot pair the
        signature of one file with the content of another.
        """
        try:
            with open(self._path, "rb") as handle:
                sig: _Sig | None = _sig_of(os.fstat(handle.fileno()))
                data: bytes | None = handle.read()
        except FileNotFoundError:
            sig, data = None, None
        if data is None:
            self._install(_EMPTY, None, None)
            return
        digest = _digest(data)
        if digest == self._digest:
            self._sig = sig  # same content under a new signature (e.g. touched): keep caches
            return
        try:
            state = _deserialize(self._decrypt(data))
        except _FormatError as exc:
            raise StoreCorruptError(
                f"Face store {self._path} is corrupt or unreadable: {exc}. It was left untouched; restore "
                f"it from a backup, or move it away to start with an empty store.",
                path=str(self._path),
            ) from exc
        self._install(state, sig, digest)

    def _encrypt(self, plain: bytes) -> bytes:
        return plain if self._cipher is None else ENCRYPTED_MAGIC + self._cipher.encrypt(plain)

    def _decrypt(self, data: bytes) -> bytes:
        """The .npz bytes of the file; a plain file is read as is (the next write encrypts it)."""
        if not data.startswith(ENCRYPTED_MAGIC):
            return data
        if self._cipher is None:
            raise StoreKeyError(
                f"Face store {self._path} is encrypted; set FACE_STORE_ENCRYPTION_KEY to the key it was written with.",
                path=str(self._path),
            )
        from cryptography.fernet import InvalidToken

        try:
            return self._cipher.decrypt(data[len(ENCRYPTED_MAGIC) :])
        except InvalidToken:
            raise StoreKeyError(
                f"Face store {self._path} cannot be decrypted: FACE_STORE_ENCRYPTION_KEY is not the key it was "
                "written with, or the file was altered. It was left untouched.",
                path=str(self._path),
            ) from None

    def _install(self, state: _State, sig: _Sig | None, digest: bytes | None) -> None:
        self._state, self._sig, self._digest = state, sig, digest
        self._galleries = {}

    def _write(self, apply: Callable[[_State], tuple[_State, _T]]) -> _T:
        """Read-modify-write under the file lock; the cache changes only after the file is replaced."""
        deadline = time.monotonic() + self._lock_timeout_s
        if not self._write_mutex.acquire(timeout=self._lock_timeout_s):
            raise self._lock_timeout()
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            file_lock = self._lock_of_this_process()
            try:
                file_lock.acquire(timeout=max(0.0, deadline - time.monotonic()))
            except filelock.Timeout as exc:
                raise self._lock_timeout() from exc
            try:
                with self._cache_lock:
                    # Always the full file, not just os.stat: a write based on a stale state would silently
                    # undo another process's write, and stat can miss a change on filesystems with coarse
                    # timestamps that also reuse inode numbers. Reading is cheap next to rewriting the file.
                    self._reload_locked()
                    state, previous = self._state, self._sig
                new_state, result = apply(state)
                data = self._encrypt(_serialize(new_state))
                sig = self._replace_file(data, previous)
                with self._cache_lock:
                    self._install(new_state, sig, _digest(data))
                return result
            finally:
                file_lock.release()
        finally:
            self._write_mutex.release()

    def _new_file_lock(self) -> filelock.BaseFileLock:
        self._lock_pid = os.getpid()
        # filelock polls a non-blocking flock; its default 50 ms interval lets a process that writes often
        # win nearly every round against a waiting one, 5 ms keeps waits short at a negligible cost.
        return filelock.FileLock(f"{self._path}.lock", poll_interval=0.005)

    def _lock_of_this_process(self) -> filelock.BaseFileLock:
        # filelock refuses a lock object inherited across fork (a pre-forking server that built the store
        # before forking its workers); each process gets its own.
        if self._lock_pid != os.getpid():
            self._file_lock = self._new_file_lock()
        return self._file_lock

    def _lock_timeout(self) -> StoreLockTimeoutError:
        return StoreLockTimeoutError(
            f"Face store {self._path} is busy: no write lock within {self._lock_timeout_s:g} s",
            path=str(self._path),
        )

    def _replace_file(self, data: bytes, previous: _Sig | None) -> _Sig:
        """Atomically make ``data`` the file's content. Caller holds the file lock."""
        directory = self._path.parent
        # mkstemp creates the file with mode 0600: descriptors are biometric data.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{self._path.name}.", suffix=_TMP_SUFFIX, dir=directory)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            # Readers detect a replacement by (dev, inode, size, mtime_ns). Inode numbers are reused and
            # clocks tick coarsely, so push the mtime strictly past the previous file's.
            mtime_ns = time.time_ns()
            if previous is not None:
                mtime_ns = max(mtime_ns, previous.mtime_ns + 1)
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
            os.replace(tmp, self._path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_directory(directory)
        return _sig_of(os.stat(self._path))

    def _remove_leftover_temp_files(self) -> None:
        """Delete temporary files of writers that died mid-write. Only under the file lock, because a live
        writer's temporary file exists only while it holds the lock; when the lock is busy (or cannot be
        created on a read-only folder) they are left for the next start: nothing ever reads them."""
        file_lock = self._lock_of_this_process()
        try:
            file_lock.acquire(timeout=0)
        except (filelock.Timeout, OSError):
            return
        try:
            prefix = f".{self._path.name}."
            with os.scandir(self._path.parent) as entries:
                for entry in entries:
                    if (
                        entry.name.startswith(prefix)
                        and entry.name.endswith(_TMP_SUFFIX)
                        and entry.is_file(follow_symlinks=False)
                    ):
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)
        except OSError:
            pass
        finally:
            file_lock.release()
