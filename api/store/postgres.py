"""The scale-out face store: PostgreSQL + pgvector, shared by any number of service nodes.

Every node reads and writes the database directly and caches nothing, so what one node registers or deletes
is what every other node sees at its next request. Only descriptors are stored, never images.

Schema (version :data:`SCHEMA_VERSION`, created and migrated at start-up, recorded in ``face_store_schema``):

``face_models``
    ``model_id`` -> ``dim``: one dimension per embedding model, and the name of its HNSW index.
``face_users``
    ``id``, ``collection``, ``name`` (UTF-8 bytes: names are free text and PostgreSQL ``text`` cannot hold
    NUL), ``model_id``, ``faces``, ``created_at``, ``updated_at``.
``face_descriptors``
    ``(user_id, position)`` -> ``collection``, ``model_id``, ``embedding vector`` (float32, unit length);
    deleted with their user (``ON DELETE CASCADE``).
``face_gallery_counts``
    users per (collection, model), kept in the same transactions as the writes, so the 1:N threshold's
    gallery size costs one index lookup rather than a count over a million rows.

Search: one partial HNSW index per model on ``embedding::halfvec(dim)`` (inner product; half precision
halves the index and its memory traffic), ``hnsw.ef_search`` set per transaction and
``hnsw.iterative_scan = relaxed_order`` so that the collection filter and an excluded user cannot starve
the result. The candidates' users are then scored exactly, in float32, over all their faces, and only
then ranked: the 1:N threshold is applied by the caller after this grouping by user, never to raw rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from api.errors import (
    CollectionExistsError,
    CollectionNotEmptyError,
    CollectionProtectedError,
    ModelMismatchError,
    StoreConfigError,
    StoreSchemaError,
    StoreUnavailableError,
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

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# pgvector 0.8.0 brought iterative index scans; 0.6.0-0.8.1 have CVE-2026-3172 in parallel HNSW builds.
MIN_PGVECTOR = (0, 8, 0)
SAFE_PGVECTOR = (0, 8, 2)
# Advisory-lock class of this store ("FACE"): (class, 0) migrations, (class, 1) models, (class, hash) collections.
_LOCK_CLASS = 0x46414345
_MIGRATION_LOCK, _MODEL_LOCK = 0, 1

_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE face_models (
            model_id text PRIMARY KEY,
            dim integer NOT NULL CHECK (dim > 0),
            index_name text NOT NULL UNIQUE,
            created_at timestamptz NOT NULL DEFAULT now()
        )""",
        # COLLATE "C": ids order by their bytes, as in the .npz store, whatever the database's locale.
        """CREATE TABLE face_users (
            id text COLLATE "C" PRIMARY KEY,
            collection text NOT NULL DEFAULT 'default',
            name bytea NOT NULL,
            model_id text NOT NULL REFERENCES face_models (model_id),
            faces integer NOT NULL CHECK (faces > 0),
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL
        )""",
        "CREATE INDEX face_users_order ON face_users (created_at, id)",
        "CREATE INDEX face_users_gallery ON face_users (collection, model_id)",
        """CREATE TABLE face_descriptors (
            user_id text NOT NULL REFERENCES face_users (id) ON DELETE CASCADE,
            position integer NOT NULL,
            collection text NOT NULL DEFAULT 'default',
            model_id text NOT NULL,
            embedding vector NOT NULL,
            PRIMARY KEY (user_id, position)
        )""",
        """CREATE TABLE face_gallery_counts (
            collection text NOT NULL,
            model_id text NOT NULL,
            users bigint NOT NULL CHECK (users >= 0),
            PRIMARY KEY (collection, model_id)
        )""",
    ],
    # Collections as rows of their own (a collection may be empty), faces counted per gallery (the
    # duplicate check's rule and the choice between exact and index search read it), and a btree to reach
    # one collection's descriptors without the HNSW index.
    2: [
        """CREATE TABLE face_collections (
            name text PRIMARY KEY CHECK (name ~ '^[a-z0-9_-]{1,64}$'),
            created_at timestamptz NOT NULL DEFAULT now()
        )""",
        "INSERT INTO face_collections (name, created_at) SELECT 'default', coalesce(min(created_at), now()) "
        "FROM face_users",
        "INSERT INTO face_collections (name, created_at) SELECT collection, min(created_at) FROM face_users "
        "WHERE collection <> 'default' GROUP BY collection",
        "ALTER TABLE face_users ADD CONSTRAINT face_users_collection_fkey "
        "FOREIGN KEY (collection) REFERENCES face_collections (name)",
        "ALTER TABLE face_gallery_counts ADD COLUMN faces bigint NOT NULL DEFAULT 0 CHECK (faces >= 0)",
        "UPDATE face_gallery_counts c SET faces = coalesce((SELECT sum(u.faces) FROM face_users u "
        "WHERE u.collection = c.collection AND u.model_id = c.model_id), 0)",
        "CREATE INDEX face_descriptors_gallery ON face_descriptors (collection, model_id)",
    ],
}


@dataclass(frozen=True)
class PostgresOptions:
    """Tuning of the PostgreSQL store; the service reads them from ``FACE_STORE_*`` settings."""

    pool_size: int = 8
    timeout_s: float = 5.0  # waiting for a connection, and connecting
    statement_timeout_s: float = 30.0
    ef_search: int = 100
    # The duplicate check of a registration searches each new face for any user above the 1:N threshold, so by
    # default with the same list as identification. A shorter one makes registration cheaper (one HNSW search per
    # new face) but misses more matches in a crowded gallery: at 1M LFW-like faces, ef_search 40 found 68% of
    # the matches above the threshold against 82% at 100 (docs/benchmarks.md). None: ``ef_search``.
    guard_ef_search: int | None = None
    hnsw_m: int = 16
    hnsw_ef_construction: int = 64
    # Index rows read per query before re-ranking: enough for top_k users of several faces each.
    min_candidates: int = 40
    # A gallery (collection x model) of at most this many faces is searched exactly, without the index: a few
    # milliseconds, recall 1, and no starving of a small collection's search by a filter on a shared index.
    exact_search_max_faces: int = 10_000


def safe_location(url: str) -> str:
    """``postgresql://host:port/db`` without user, password or query: what logs and ``GET /`` may show."""
    parts = urlsplit(url)
    host = parts.hostname or "local socket"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path or '/'}"


def check_url(url: str) -> None:
    """A clear start-up error for a URL that is not PostgreSQL's (the URL itself is never echoed)."""
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme not in ("postgresql", "postgres"):
        shown = f"scheme {scheme!r}" if scheme else "no scheme"
        raise StoreConfigError(
            f"FACE_STORE_URL must be a PostgreSQL URL (postgresql://user:password@host:port/database), got {shown}; "
            "leave it unset to use the .npz file at FACE_STORE_PATH."
        )
    try:
        urlsplit(url).port  # noqa: B018 - a port that is not a number in 0-65535 raises ValueError here
    except ValueError:
        # Otherwise the ValueError escapes from safe_location in the constructor, not a StoreConfigError.
        raise StoreConfigError("FACE_STORE_URL has an invalid port (it must be a number from 0 to 65535)") from None


class PostgresFaceStore:
    """:class:`~api.store.base.FaceStore` on PostgreSQL with pgvector.

    Nothing connects in the constructor: a database that is down at start-up makes :meth:`check` (the
    readiness probe) and requests answer ``StoreUnavailableError`` until it is back. The schema is created or
    migrated by the first successful connection; a newer schema than this code knows raises
    ``StoreSchemaError`` instead.
    """

    backend = "postgresql"

    def __init__(self, url: str, options: PostgresOptions | None = None) -> None:
        check_url(url)
        from psycopg_pool import ConnectionPool

        self._url = url
        self._options = options or PostgresOptions()
        # The password as written in the URL and percent-decoded: libpq's messages may quote either form.
        password = urlsplit(url).password
        self._secrets = sorted({password, unquote(password)}, key=len, reverse=True) if password else []
        self.location = safe_location(url)
        self._init_lock = threading.Lock()
        self._ready = False
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=self._options.pool_size,
            open=False,
            timeout=self._options.timeout_s,
            configure=self._configure,
            check=ConnectionPool.check_connection,  # a connection broken by a restart is replaced, not used
            kwargs={"autocommit": True, "connect_timeout": self._connect_timeout},
            # A failed reconnection is retried once, then given up; the pool grows again on the next request,
            # so the first request after the database is back connects at once (no backoff sleep to wait out).
            reconnect_timeout=0,
            name="face-store",
        )

    # --- lifecycle -------------------------------------------------------------------------------------

    def check(self) -> None:
        with self._connection() as conn:
            conn.execute("SELECT 1")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._pool.close()

    def _configure(self, conn: Any) -> None:
        from pgvector.psycopg import register_vector

        register_vector(conn)
        conn.execute("SELECT set_config('statement_timeout', %s, false)", (f"{self._options.statement_timeout_s}s",))

    def _ensure_ready(self) -> None:
        """Migrate the schema and open the pool, once; retried by later calls while the database is away."""
        if self._ready:
            return
        import psycopg

        with self._init_lock:
            if self._ready:
                return
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=self._connect_timeout) as conn:
                    self._migrate(conn)
            except psycopg.Error as exc:
                raise StoreUnavailableError(
                    f"The PostgreSQL store at {self.location} is unavailable: {self._describe(exc)}"
                ) from None
            self._pool.open(wait=False)
            self._ready = True
            logger.info("Face store: PostgreSQL at %s, schema version %d", self.location, SCHEMA_VERSION)

    @property
    def _connect_timeout(self) -> int:
        return max(1, round(self._options.timeout_s))

    def _migrate(self, conn: Any) -> None:
        import psycopg

        conn.execute("SELECT pg_advisory_lock(%s, %s)", (_LOCK_CLASS, _MIGRATION_LOCK))  # nodes starting together
        try:
            self._ensure_pgvector(conn)
            conn.execute(
                """CREATE TABLE IF NOT EXISTS face_store_schema (
                    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
                    version integer NOT NULL,
                    migrated_at timestamptz NOT NULL DEFAULT now()
                )"""
            )
            row = conn.execute("SELECT version FROM face_store_schema").fetchone()
            current = 0 if row is None else int(row[0])
            if current > SCHEMA_VERSION:
                raise StoreSchemaError(
                    f"The PostgreSQL store at {self.location} has schema version {current}, newer than this "
                    f"service's {SCHEMA_VERSION}: upgrade the service (refusing to run on a schema it does not know).",
                    found=current,
                    supported=SCHEMA_VERSION,
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                with conn.transaction():
                    for statement in _MIGRATIONS[version]:
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO face_store_schema (version) VALUES (%s) "
                        "ON CONFLICT (singleton) DO UPDATE SET version = EXCLUDED.version, migrated_at = now()",
                        (version,),
                    )
                logger.info("Face store schema migrated to version %d", version)
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock(%s, %s)", (_LOCK_CLASS, _MIGRATION_LOCK))

    def _ensure_pgvector(self, conn: Any) -> None:
        import psycopg

        row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        if row is None:
            try:
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except psycopg.errors.InsufficientPrivilege:
                raise StoreConfigError(
                    f"The pgvector extension is not enabled in {self.location} and this user may not create it: "
                    "run `CREATE EXTENSION vector` once as a superuser."
                ) from None
            row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        version = tuple(int(p) for p in re.findall(r"\d+", row[0])[:3])
        if version < MIN_PGVECTOR:
            raise StoreConfigError(
                f"pgvector {row[0]} in {self.location} is too old: iterative index scans need >= 0.8.0 "
                "(0.8.2 or newer recommended)."
            )
        if version < SAFE_PGVECTOR:
            logger.warning("pgvector %s has CVE-2026-3172 in parallel HNSW builds: upgrade to >= 0.8.2", row[0])

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        """A pooled connection; losing the database (now or mid-statement) becomes ``StoreUnavailableError``.

        An open transaction is rolled back by psycopg when the block raises, so nothing is half-written.
        """
        import psycopg
        import psycopg_pool

        self._ensure_ready()
        try:
            with self._pool.connection() as conn:
                yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout) as exc:
            raise StoreUnavailableError(
                f"The PostgreSQL store at {self.location} is unavailable: {self._describe(exc)}"
            ) from None

    def _describe(self, exc: BaseException) -> str:
        """The first line of a driver error, with the password (if it ever appears) masked."""
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return re.sub(r"(password\s*=\s*)\S+", r"\1***", text)[:300]

    # --- reads -----------------------------------------------------------------------------------------

    def get(self, user_id: str, *, collection: str = DEFAULT_COLLECTION) -> UserRecord:
        with self._connection() as conn:
            return self._get(conn, user_id, collection)

    def embeddings_of(self, user_id: str, *, collection: str = DEFAULT_COLLECTION) -> np.ndarray:
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT embedding FROM face_descriptors WHERE user_id = %s AND collection = %s ORDER BY position",
                (user_id, collection),
            ).fetchall()
            if not rows:
                self._get(conn, user_id, collection)  # raises USER_NOT_FOUND (or COLLECTION_NOT_FOUND)
        matrix = np.stack([_array(r[0]) for r in rows])
        matrix.setflags(write=False)
        return matrix

    def list_users(
        self, offset: int = 0, limit: int | None = None, *, collection: str = DEFAULT_COLLECTION
    ) -> tuple[list[UserRecord], int]:
        checked_page(offset, limit)
        with self._connection() as conn, conn.transaction():
            self._check_collection(conn, collection)
            rows = conn.execute(
                f"SELECT {_USER_COLUMNS} FROM face_users WHERE collection = %s "
                "ORDER BY created_at, id OFFSET %s LIMIT %s",
                (collection, offset, limit),
            ).fetchall()
            total = self._total(conn, collection)
        return [_record(r) for r in rows], total

    def count(self, collection: str | None = None) -> int:
        with self._connection() as conn, conn.transaction():
            if collection is not None:
                self._check_collection(conn, collection)
            return self._total(conn, collection)

    def search(
        self,
        model_id: str,
        probes: np.ndarray,
        top_k: int,
        exclude_user: str | None = None,
        *,
        collection: str = DEFAULT_COLLECTION,
    ) -> SearchResult:
        probes = checked_probes(probes, top_k)
        with self._connection() as conn, conn.transaction():
            # One snapshot for the gallery size and every probe's matches.
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            self._check_collection(conn, collection)
            return self._search(conn, model_id, collection, probes, top_k, exclude_user)

    def list_collections(self) -> list[CollectionInfo]:
        with self._connection() as conn:
            rows = conn.execute(_COLLECTIONS_QUERY + " GROUP BY c.name, c.created_at ORDER BY c.name").fetchall()
        return [CollectionInfo(r[0], int(r[1]), int(r[2]), r[3].astimezone(UTC)) for r in rows]

    def get_collection(self, name: str) -> CollectionInfo:
        with self._connection() as conn:
            row = conn.execute(
                _COLLECTIONS_QUERY + " WHERE c.name = %s GROUP BY c.name, c.created_at", (name,)
            ).fetchone()
        if row is None:
            raise collection_not_found(name)
        return CollectionInfo(row[0], int(row[1]), int(row[2]), row[3].astimezone(UTC))

    def export_users(self, batch_size: int) -> Iterator[list[StoredUser]]:
        """Keyset pages on (created_at, id): each page is consistent, and a long copy holds no transaction."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        after: tuple[datetime, str] | None = None
        while True:
            with self._connection() as conn, conn.transaction():
                if after is None:
                    rows = conn.execute(
                        f"SELECT {_USER_COLUMNS} FROM face_users ORDER BY created_at, id LIMIT %s", (batch_size,)
                    ).fetchall()
                else:
                    rows = conn.execute(
                        f"SELECT {_USER_COLUMNS} FROM face_users WHERE (created_at, id) > (%s, %s) "
                        "ORDER BY created_at, id LIMIT %s",
                        (*after, batch_size),
                    ).fetchall()
                if not rows:
                    return
                records = [_record(r) for r in rows]
                faces: dict[str, list[np.ndarray]] = {r.id: [] for r in records}
                for user_id, embedding in conn.execute(
                    "SELECT user_id, embedding FROM face_descriptors WHERE user_id = ANY(%s) "
                    "ORDER BY user_id, position",
                    ([r.id for r in records],),
                ):
                    faces[user_id].append(_array(embedding))
            yield [StoredUser(r, np.stack(faces[r.id])) for r in records]
            after = (records[-1].created_at, records[-1].id)

    # --- writes ----------------------------------------------------------------------------------------

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
        with self._connection() as conn, conn.transaction():
            self._check_collection(conn, collection, for_share=True)
            self._ensure_model(conn, model_id, faces.shape[1])
            if guard is not None:
                self._lock_collection(conn, collection)
                guard(self._search(conn, model_id, collection, faces, 1, None, self._options.guard_ef_search))
            now = utc_now()
            record = UserRecord(uuid.uuid4().hex, name, model_id, now, now, int(faces.shape[0]), collection)
            conn.execute(
                "INSERT INTO face_users (id, collection, name, model_id, faces, created_at, updated_at) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (record.id, collection, name.encode("utf-8"), model_id, record.faces, now, now),
            )
            self._insert_descriptors(conn, [(record.id, 0, collection, model_id, faces)])
            self._change_count(conn, collection, model_id, 1, record.faces)
        return record

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
        with self._connection() as conn, conn.transaction():
            current = self._get(conn, user_id, collection, for_update=True)
            if current.model_id != model_id:
                raise ModelMismatchError(
                    f"User {user_id} was registered with model {current.model_id!r}, "
                    f"not {model_id!r}; re-register them to use the new model",
                    user_id=user_id,
                    expected_model=current.model_id,
                    got_model=model_id,
                )
            self._ensure_model(conn, model_id, faces.shape[1])
            if guard is not None:
                self._lock_collection(conn, collection)
                guard(self._search(conn, model_id, collection, faces, 1, user_id, self._options.guard_ef_search))
            self._insert_descriptors(conn, [(user_id, current.faces, collection, model_id, faces)])
            row = conn.execute(
                f"UPDATE face_users SET faces = faces + %s, updated_at = %s WHERE id = %s RETURNING {_USER_COLUMNS}",
                (int(faces.shape[0]), utc_now(), user_id),
            ).fetchone()
            self._change_count(conn, collection, model_id, 0, int(faces.shape[0]))
        return _record(row)

    def rename(self, user_id: str, name: str, *, collection: str = DEFAULT_COLLECTION) -> UserRecord:
        name = checked_text(name, "name", allow_empty=True)
        with self._connection() as conn, conn.transaction():
            row = conn.execute(
                f"UPDATE face_users SET name = %s, updated_at = %s WHERE id = %s AND collection = %s "
                f"RETURNING {_USER_COLUMNS}",
                (name.encode("utf-8"), utc_now(), user_id, collection),
            ).fetchone()
            if row is None:
                self._check_collection(conn, collection)
                raise UserNotFoundError(f"No user with id {user_id!r}", user_id=user_id)
        return _record(row)

    def delete(self, user_id: str, *, collection: str = DEFAULT_COLLECTION) -> None:
        """Removes the user's row and, by the foreign key's cascade, every descriptor row of them."""
        with self._connection() as conn, conn.transaction():
            row = conn.execute(
                "DELETE FROM face_users WHERE id = %s AND collection = %s RETURNING model_id, faces",
                (user_id, collection),
            ).fetchone()
            if row is None:
                self._check_collection(conn, collection)
                raise UserNotFoundError(f"No user with id {user_id!r}", user_id=user_id)
            self._change_count(conn, collection, row[0], -1, -int(row[1]))

    def create_collection(self, name: str) -> CollectionInfo:
        checked_collection_name(name)
        with self._connection() as conn:
            row = conn.execute(
                "INSERT INTO face_collections (name) VALUES (%s) ON CONFLICT (name) DO NOTHING RETURNING created_at",
                (name,),
            ).fetchone()
        if row is None:
            raise CollectionExistsError(f"The collection {name!r} exists already.", collection=name)
        return CollectionInfo(name, 0, 0, row[0].astimezone(UTC))

    def delete_collection(self, name: str, *, force: bool = False) -> int:
        """One transaction: every user row of the collection (and by cascade every descriptor row), its counts
        and the collection row itself. The collection's row lock keeps registrations into it out meanwhile."""
        if name == DEFAULT_COLLECTION:
            raise CollectionProtectedError(f"The {DEFAULT_COLLECTION!r} collection cannot be deleted.")
        with self._connection() as conn, conn.transaction():
            if conn.execute("SELECT 1 FROM face_collections WHERE name = %s FOR UPDATE", (name,)).fetchone() is None:
                raise collection_not_found(name)
            users = self._total(conn, name)
            if users and not force:
                raise CollectionNotEmptyError(
                    f"The collection {name!r} holds {users} users; pass force=true to delete them with it.",
                    collection=name,
                    users=users,
                )
            conn.execute("DELETE FROM face_users WHERE collection = %s", (name,))
            conn.execute("DELETE FROM face_gallery_counts WHERE collection = %s", (name,))
            conn.execute("DELETE FROM face_collections WHERE name = %s", (name,))
        return users

    def import_users(self, users: list[StoredUser]) -> int:
        """One transaction per batch; ids already present are skipped, so a copy can be re-run. Collections the
        users name are created."""
        checked: list[tuple[UserRecord, np.ndarray]] = []
        for user in users:
            faces = checked_embeddings(user.embeddings)
            record = user.record
            if record.faces != faces.shape[0]:
                raise ValueError(f"user {record.id!r}: {record.faces} faces but {faces.shape[0]} descriptors")
            checked_text(record.id, "id", allow_empty=False)
            checked_text(record.name, "name", allow_empty=True)
            checked_collection_name(record.collection)
            checked.append((record, faces))
        if not checked:
            return 0
        with self._connection() as conn, conn.transaction():
            for model_id in dict.fromkeys(r.model_id for r, _ in checked):
                dims = {f.shape[1] for r, f in checked if r.model_id == model_id}
                if len(dims) > 1:
                    raise ModelMismatchError(f"Descriptors of model {model_id!r} have several dimensions: {dims}")
                self._ensure_model(conn, model_id, dims.pop())
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO face_collections (name) VALUES (%s) ON CONFLICT (name) DO NOTHING",
                    [(name,) for name in dict.fromkeys(r.collection for r, _ in checked)],
                )
            inserted: set[str] = set()
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO face_users (id, collection, name, model_id, faces, created_at, updated_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING RETURNING id",
                    [
                        (r.id, r.collection, r.name.encode("utf-8"), r.model_id, r.faces, r.created_at, r.updated_at)
                        for r, _ in checked
                    ],
                    returning=True,
                )
                while True:
                    for row in cur.fetchall():
                        inserted.add(row[0])
                    if not cur.nextset():
                        break
            new = [(r, f) for r, f in checked if r.id in inserted]
            self._insert_descriptors(conn, [(r.id, 0, r.collection, r.model_id, f) for r, f in new])
            galleries: dict[tuple[str, str], list[int]] = {}
            for r, _ in new:
                counts = galleries.setdefault((r.collection, r.model_id), [0, 0])
                counts[0] += 1
                counts[1] += r.faces
            for (collection, model_id), (added_users, added_faces) in galleries.items():
                self._change_count(conn, collection, model_id, added_users, added_faces)
        return len(new)

    # --- bulk loading ----------------------------------------------------------------------------------

    def drop_search_index(self, model_id: str) -> bool:
        """Drop the model's HNSW index before a large import (inserting into it row by row is far slower than
        building it once); search stays correct meanwhile, by exact scan. Returns whether one existed."""
        with self._connection() as conn, conn.transaction():
            row = conn.execute("SELECT index_name FROM face_models WHERE model_id = %s", (model_id,)).fetchone()
            if row is None:
                return False
            from psycopg import sql

            conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(row[0])))
            return True

    def build_search_index(self, model_id: str, maintenance_work_mem: str = "1GB") -> None:
        """(Re)build the model's HNSW index; ``maintenance_work_mem`` should hold the whole graph."""
        with self._connection() as conn, conn.transaction():
            row = conn.execute("SELECT dim FROM face_models WHERE model_id = %s", (model_id,)).fetchone()
            if row is None:
                return
            conn.execute("SELECT set_config('maintenance_work_mem', %s, true)", (maintenance_work_mem,))
            conn.execute("SELECT set_config('statement_timeout', '0', true)")
            self._create_index(conn, model_id, int(row[0]))
        self.refresh_statistics()

    def refresh_statistics(self) -> None:
        """ANALYZE the tables, after a bulk load. Until autovacuum gets to it, the planner believes a freshly
        loaded table is still nearly empty: it then scans and sorts a whole gallery instead of walking the HNSW
        index (23 ms instead of ~2 ms per search at 40,000 faces, right after ``store copy``)."""
        with self._connection() as conn:
            conn.execute("ANALYZE face_users, face_descriptors")

    # --- internals -------------------------------------------------------------------------------------

    @classmethod
    def _get(cls, conn: Any, user_id: str, collection: str, *, for_update: bool = False) -> UserRecord:
        """The user if they are in ``collection``; a user of another collection is as unknown as no user."""
        lock = " FOR UPDATE" if for_update else ""
        row = conn.execute(
            f"SELECT {_USER_COLUMNS} FROM face_users WHERE id = %s AND collection = %s{lock}", (user_id, collection)
        ).fetchone()
        if row is None:
            cls._check_collection(conn, collection)
            raise UserNotFoundError(f"No user with id {user_id!r}", user_id=user_id)
        return _record(row)

    @staticmethod
    def _check_collection(conn: Any, collection: str, *, for_share: bool = False) -> None:
        """``for_share``: lock the collection's row until the transaction ends, so that a concurrent
        delete_collection cannot remove it under a registration (the foreign key would refuse it anyway)."""
        lock = " FOR SHARE" if for_share else ""
        if conn.execute(f"SELECT 1 FROM face_collections WHERE name = %s{lock}", (collection,)).fetchone() is None:
            raise collection_not_found(collection)

    @staticmethod
    def _total(conn: Any, collection: str | None = None) -> int:
        if collection is None:
            row = conn.execute("SELECT coalesce(sum(users), 0) FROM face_gallery_counts").fetchone()
        else:
            row = conn.execute(
                "SELECT coalesce(sum(users), 0) FROM face_gallery_counts WHERE collection = %s", (collection,)
            ).fetchone()
        return int(row[0])

    @staticmethod
    def _lock_collection(conn: Any, collection: str) -> None:
        """Serialises guarded writes of one collection across all nodes until the transaction ends: the
        duplicate check of the second registration then sees the first one's committed faces."""
        conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_CLASS, collection))

    @staticmethod
    def _change_count(conn: Any, collection: str, model_id: str, users: int, faces: int) -> None:
        if users < 0 or faces < 0:  # the row exists: what goes was counted when it came
            conn.execute(
                "UPDATE face_gallery_counts SET users = users + %s, faces = faces + %s "
                "WHERE collection = %s AND model_id = %s",
                (users, faces, collection, model_id),
            )
            return
        conn.execute(
            "INSERT INTO face_gallery_counts (collection, model_id, users, faces) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (collection, model_id) DO UPDATE SET users = face_gallery_counts.users + EXCLUDED.users, "
            "faces = face_gallery_counts.faces + EXCLUDED.faces",
            (collection, model_id, users, faces),
        )

    @staticmethod
    def _model_dim(conn: Any, model_id: str) -> int | None:
        row = conn.execute("SELECT dim FROM face_models WHERE model_id = %s", (model_id,)).fetchone()
        return None if row is None else int(row[0])

    def _ensure_model(self, conn: Any, model_id: str, dim: int) -> None:
        """Check the descriptor dimension of ``model_id``; its first descriptors create its row and index."""
        known = self._model_dim(conn, model_id)
        if known is None:
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, _MODEL_LOCK))
            known = self._model_dim(conn, model_id)
            if known is None:
                conn.execute(
                    "INSERT INTO face_models (model_id, dim, index_name) VALUES (%s, %s, %s)",
                    (model_id, dim, _index_name(model_id)),
                )
                self._create_index(conn, model_id, dim)
                return
        if known != dim:
            raise ModelMismatchError(
                f"Descriptors of model {model_id!r} have {known} dimensions in the store, got {dim}",
                model_id=model_id,
                expected_dim=known,
                got_dim=int(dim),
            )

    def _create_index(self, conn: Any, model_id: str, dim: int) -> None:
        from psycopg import sql

        conn.execute(
            sql.SQL(
                "CREATE INDEX IF NOT EXISTS {name} ON face_descriptors USING hnsw "
                "((embedding::halfvec({dim})) halfvec_ip_ops) WITH (m = {m}, ef_construction = {efc}) "
                "WHERE model_id = {model}"
            ).format(
                name=sql.Identifier(_index_name(model_id)),
                dim=sql.Literal(dim),
                m=sql.Literal(self._options.hnsw_m),
                efc=sql.Literal(self._options.hnsw_ef_construction),
                model=sql.Literal(model_id),
            )
        )

    @staticmethod
    def _insert_descriptors(conn: Any, blocks: list[tuple[str, int, str, str, np.ndarray]]) -> None:
        """Binary COPY of ``(user_id, first position, collection, model_id, faces)`` blocks."""
        if not blocks:
            return
        with (
            conn.cursor() as cur,
            cur.copy(
                "COPY face_descriptors (user_id, position, collection, model_id, embedding) FROM STDIN (FORMAT BINARY)"
            ) as copy,
        ):
            copy.set_types(["text", "int4", "text", "text", "vector"])
            for user_id, first, collection, model_id, faces in blocks:
                for offset, face in enumerate(faces):
                    copy.write_row((user_id, first + offset, collection, model_id, face))

    def _search(
        self,
        conn: Any,
        model_id: str,
        collection: str,
        probes: np.ndarray,
        top_k: int,
        exclude_user: str | None,
        ef_search: int | None = None,
    ) -> SearchResult:
        """``ef_search``: the HNSW candidate list of this search (default: the store's ``ef_search``)."""
        from psycopg import sql

        dim = self._model_dim(conn, model_id)
        # Every model's counts in the collection, in one query: this model's are the 1:N threshold's N, the
        # others tell the service that part of the collection cannot be searched with this model.
        counts = {
            model: (int(users), int(faces))
            for model, users, faces in conn.execute(
                "SELECT model_id, users, faces FROM face_gallery_counts WHERE collection = %s AND users > 0",
                (collection,),
            ).fetchall()
        }
        users, faces = counts.pop(model_id, (0, 0))
        other_models = {model: users for model, (users, _) in counts.items()}
        if dim is None or users == 0 or top_k == 0:
            return SearchResult(users, faces, [[] for _ in probes], other_models)
        if probes.shape[1] != dim:
            raise ModelMismatchError(
                f"Descriptors of model {model_id!r} have {dim} dimensions in the store, got {probes.shape[1]}",
                model_id=model_id,
                expected_dim=dim,
                got_dim=int(probes.shape[1]),
            )
        exclude = sql.SQL("AND user_id <> %(exclude)s") if exclude_user is not None else sql.SQL("")
        if faces <= self._options.exact_search_max_faces:
            return self._search_exactly(
                conn, model_id, collection, probes, top_k, exclude_user, users, faces, other_models
            )
        # set_config(..., true) is SET LOCAL: it lasts until this transaction ends, also on a pooled connection
        # and inside the transaction Citus or a pooler in transaction mode sends to one node.
        conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(ef_search or self._options.ef_search),))
        conn.execute("SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true)")
        # The model and dimension are literals so that the planner matches the model's partial index.
        query = sql.SQL(
            """
            WITH candidates AS MATERIALIZED (
                SELECT user_id FROM face_descriptors
                WHERE model_id = {model} AND collection = %(collection)s {exclude}
                ORDER BY embedding::halfvec({dim}) <#> %(probe)s::halfvec({dim})
                LIMIT %(candidates)s
            )
            SELECT d.user_id, u.name, max(-(d.embedding <#> %(probe)s)) AS cosine,
                (SELECT count(*) FROM candidates) AS scanned
            FROM face_descriptors d
            JOIN (SELECT DISTINCT user_id FROM candidates) c ON c.user_id = d.user_id
            JOIN face_users u ON u.id = d.user_id
            GROUP BY d.user_id, u.name
            ORDER BY cosine DESC, d.user_id
            LIMIT %(top_k)s
            """
        ).format(model=sql.Literal(model_id), dim=sql.Literal(dim), exclude=exclude)
        matches = []
        for probe in probes:
            params = {
                "collection": collection,
                "exclude": exclude_user,
                "probe": probe,
                "candidates": max(self._options.min_candidates, 4 * top_k),
                "top_k": top_k,
            }
            rows = conn.execute(query, params).fetchall()
            # The candidates are index rows, not users: when the nearest rows belong to few users (a person's
            # faces lie close together), they can name fewer than top_k users although the gallery holds more.
            # Widen the candidate set until top_k users are found or the index scan returned fewer rows than
            # asked for (nothing more to find).
            while rows and len(rows) < min(top_k, users) and rows[0][3] >= params["candidates"]:
                params["candidates"] *= 4
                rows = conn.execute(query, params).fetchall()
            matches.append([UserMatch(r[0], bytes(r[1]).decode("utf-8"), float(r[2])) for r in rows])
        return SearchResult(users, faces, matches, other_models)

    @staticmethod
    def _search_exactly(
        conn: Any,
        model_id: str,
        collection: str,
        probes: np.ndarray,
        top_k: int,
        exclude_user: str | None,
        users: int,
        faces: int,
        other_models: dict[str, int],
    ) -> SearchResult:
        """Every face of the gallery scored in float32 (the btree on (collection, model_id) finds them)."""
        from psycopg import sql

        exclude = sql.SQL("AND d.user_id <> %(exclude)s") if exclude_user is not None else sql.SQL("")
        query = sql.SQL(
            """
            SELECT d.user_id, u.name, max(-(d.embedding <#> %(probe)s)) AS cosine
            FROM face_descriptors d JOIN face_users u ON u.id = d.user_id
            WHERE d.model_id = %(model)s AND d.collection = %(collection)s {exclude}
            GROUP BY d.user_id, u.name
            ORDER BY cosine DESC, d.user_id
            LIMIT %(top_k)s
            """
        ).format(exclude=exclude)
        matches = []
        for probe in probes:
            params = {
                "model": model_id,
                "collection": collection,
                "exclude": exclude_user,
                "probe": probe,
                "top_k": top_k,
            }
            rows = conn.execute(query, params).fetchall()
            matches.append([UserMatch(r[0], bytes(r[1]).decode("utf-8"), float(r[2])) for r in rows])
        return SearchResult(users, faces, matches, other_models)


_USER_COLUMNS = "id, name, model_id, created_at, updated_at, faces, collection"
_COLLECTIONS_QUERY = (
    "SELECT c.name, coalesce(sum(g.users), 0), coalesce(sum(g.faces), 0), c.created_at "
    "FROM face_collections c LEFT JOIN face_gallery_counts g ON g.collection = c.name"
)


def _record(row: tuple) -> UserRecord:
    user_id, name, model_id, created_at, updated_at, faces, collection = row
    return UserRecord(
        id=user_id,
        name=bytes(name).decode("utf-8"),
        model_id=model_id,
        created_at=created_at.astimezone(UTC),
        updated_at=updated_at.astimezone(UTC),
        faces=int(faces),
        collection=collection,
    )


def _array(value: Any) -> np.ndarray:
    """A ``vector`` column as float32 (pgvector's adapter gives a ``Vector`` for binary results)."""
    return np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value, dtype=np.float32)


def _index_name(model_id: str) -> str:
    """A stable, valid identifier per model (model ids are free text such as ``deepface:Facenet512``)."""
    return "face_descriptors_hnsw_" + hashlib.sha1(model_id.encode("utf-8")).hexdigest()[:16]
