"""What only the PostgreSQL store has: its schema and migrations, configuration errors, a database that is
down or goes away, atomic guarded writes across processes, and the HNSW index behind search.

Everything runs against the real PostgreSQL + pgvector server of ``tests/store/conftest.py`` (one per
session, a fresh database per test) and real child processes; nothing is mocked. The behaviour both
backends share is in ``test_contract.py``.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import psycopg
import pytest

from api.errors import (
    FaceServiceError,
    StoreConfigError,
    StoreSchemaError,
    StoreUnavailableError,
)
from api.store import SearchResult, StoredUser, UserRecord, open_store_at
from api.store.postgres import SCHEMA_VERSION, PostgresFaceStore, PostgresOptions

if TYPE_CHECKING:  # type only: importing a conftest as a module would load it a second time
    from tests.store.conftest import LocalPostgres

REPO_ROOT = Path(__file__).resolve().parents[2]
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONIOENCODING": "utf-8"}
TABLES = ("face_store_schema", "face_models", "face_users", "face_descriptors", "face_gallery_counts")
# Short waits for a connection, so that "database down" answers come in about a second, not five.
FAST = PostgresOptions(timeout_s=1.0)


def unit(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresFaceStore]:
    s = PostgresFaceStore(postgres_url, FAST)
    yield s
    s.close()


def query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of one statement (none for a command) on a connection of our own, not the store's."""
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql, params)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description is not None else []


def row_counts(url: str) -> dict[str, int]:
    """Rows per store table, and the HNSW indexes there are: what a write that was undone must not change."""
    with psycopg.connect(url, autocommit=True) as conn:
        counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}  # type: ignore[index]
        indexes = conn.execute("SELECT count(*) FROM pg_indexes WHERE indexname LIKE 'face_descriptors_hnsw_%'")
        counts["hnsw indexes"] = indexes.fetchone()[0]  # type: ignore[index]
        return counts


# --- schema -----------------------------------------------------------------------------------------------


def test_schema_is_created_on_first_use_at_the_current_version(postgres_url: str) -> None:
    """Constructing the store touches nothing (it connects lazily); the first call creates every table and
    records the current schema version."""
    store = PostgresFaceStore(postgres_url, FAST)
    try:
        assert query(postgres_url, "SELECT to_regclass('face_store_schema')") == [(None,)]
        assert store.count() == 0
        tables = {r[0] for r in query(postgres_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert set(TABLES) <= tables
        assert query(postgres_url, "SELECT version FROM face_store_schema") == [(SCHEMA_VERSION,)]
        user = store.add_user("a", unit(np.random.default_rng(0), 1), "m")
        assert store.get(user.id) == user
    finally:
        store.close()


def test_a_second_instance_does_not_migrate_again(postgres_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A second node on a migrated database finds the current version and leaves the schema (and data) alone."""
    first = PostgresFaceStore(postgres_url, FAST)
    second = PostgresFaceStore(postgres_url, FAST)
    try:
        user = first.add_user("a", unit(np.random.default_rng(0), 1), "m")
        recorded = query(postgres_url, "SELECT version, migrated_at FROM face_store_schema")
        assert [r[0] for r in recorded] == [SCHEMA_VERSION]
        caplog.clear()
        with caplog.at_level("INFO", logger="api.store.postgres"):
            assert second.get(user.id) == user
        assert not [r for r in caplog.records if "migrated" in r.getMessage()]
        assert query(postgres_url, "SELECT version, migrated_at FROM face_store_schema") == recorded
    finally:
        first.close()
        second.close()


def test_a_newer_schema_is_refused(postgres_url: str) -> None:
    """A database migrated by a newer service (higher ``face_store_schema.version``) makes ``check()`` and
    every call raise ``StoreSchemaError`` naming both versions, and nothing is changed."""
    PostgresFaceStore(postgres_url, FAST).check()  # creates version 1
    query(postgres_url, "UPDATE face_store_schema SET version = %s", (SCHEMA_VERSION + 1,))
    before = row_counts(postgres_url)
    store = PostgresFaceStore(postgres_url, FAST)
    try:
        with pytest.raises(StoreSchemaError) as info:
            store.check()
        assert f"schema version {SCHEMA_VERSION + 1}" in info.value.message
        assert f"service's {SCHEMA_VERSION}" in info.value.message
        assert info.value.details == {"found": SCHEMA_VERSION + 1, "supported": SCHEMA_VERSION}
        assert info.value.code == "STORE_SCHEMA_UNSUPPORTED"
        with pytest.raises(StoreSchemaError):
            store.add_user("a", unit(np.random.default_rng(0), 1), "m")
    finally:
        store.close()
    assert query(postgres_url, "SELECT version FROM face_store_schema") == [(SCHEMA_VERSION + 1,)]
    assert row_counts(postgres_url) == before


# --- configuration and connection errors -------------------------------------------------------------------


def assert_hidden(error: FaceServiceError, secret: str) -> None:
    """``secret`` appears nowhere the error can be shown: message, details, logged traceback."""
    shown = [str(error), error.message, repr(error.details), "".join(traceback.format_exception(error))]
    assert not [text for text in shown if secret in text], shown


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u:secret@h/db",
        "sqlite:///secret.db",
        "u:secret@h/db",  # no scheme at all
        "postgresql://u:secret@h:99999/db",  # port out of range
        "postgresql://u:secret@h:port/db",  # port not a number
    ],
)
def test_an_unusable_url_is_a_config_error_that_hides_credentials(url: str) -> None:
    """A URL that is not PostgreSQL's, or not a valid one, stops start-up with ``StoreConfigError`` (never a
    bare ``ValueError``), and the message never echoes the URL's password."""
    if "://" not in url:
        with pytest.raises(StoreConfigError) as info:
            PostgresFaceStore(url)
    else:
        with pytest.raises(StoreConfigError) as info:
            open_store_at(url)
    assert info.value.code == "STORE_CONFIG_INVALID"
    assert_hidden(info.value, "secret")


@pytest.mark.parametrize(
    ("password", "url_template"),
    [
        ("s3cr3t-pw", "postgresql://postgres:{pw}@/postgres?host=/nonexistent/socket/dir"),
        # libpq's message quotes the socket path, here holding the (percent-decoded) password.
        ("top/s3cret", "postgresql://postgres:{pw}@/postgres?host=/tmp/top/s3cret/missing"),
        # libpq quotes an invalid percent-encoded password back as written.
        ("s3cret%zz", "postgresql://postgres:{pw}@/postgres?host=/nonexistent"),
    ],
)
def test_an_unreachable_database_error_never_shows_the_password(password: str, url_template: str) -> None:
    """A URL with a password that cannot connect gives ``StoreUnavailableError`` (503) naming the location,
    with the password masked wherever the driver's message would quote it."""
    written = password.replace("/", "%2F")
    store = open_store_at(url_template.format(pw=written))
    assert isinstance(store, PostgresFaceStore)
    try:
        assert password not in store.location and written not in store.location
        for call in (store.check, store.count):
            with pytest.raises(StoreUnavailableError) as info:
                call()
            assert info.value.status == 503 and "postgresql://local socket/postgres" in info.value.message
            assert_hidden(info.value, password)
            assert_hidden(info.value, written)
            assert_hidden(info.value, "s3cr")
    finally:
        store.close()


# --- the database down, and back ---------------------------------------------------------------------------


def test_database_down_at_start_then_up(postgres_server: LocalPostgres, postgres_url: str) -> None:
    """A store built while the database is down builds fine (start-up does not fail), answers
    ``StoreUnavailableError`` until the database is there, then works without a new store object."""
    postgres_server.stop()
    store = PostgresFaceStore(postgres_url, FAST)
    try:
        for call in (store.check, store.count, lambda: store.add_user("a", unit(np.random.default_rng(0), 1), "m")):
            with pytest.raises(StoreUnavailableError):
                call()
        postgres_server.start()
        store.check()
        user = store.add_user("a", unit(np.random.default_rng(0), 1), "m")
        assert store.list_users() == ([user], 1)
        assert query(postgres_url, "SELECT version FROM face_store_schema") == [(SCHEMA_VERSION,)]
    finally:
        store.close()


def test_database_lost_between_requests_then_back(postgres_server: LocalPostgres, store: PostgresFaceStore) -> None:
    """While the database is away every call raises ``StoreUnavailableError`` (not a driver error); when it is
    back, the same store object works again (the pool replaces its broken connections), data intact."""
    rng = np.random.default_rng(1)
    faces = unit(rng, 2)
    user = store.add_user("a", faces, "m")
    assert store.search("m", faces[0], 1).matches[0][0].user_id == user.id

    postgres_server.stop()
    calls = [
        store.check,
        lambda: store.get(user.id),
        lambda: store.search("m", faces[0], 1),
        lambda: store.add_user("b", unit(rng, 1), "m"),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as info:
            call()
        assert not isinstance(info.value, psycopg.Error) and info.value.__cause__ is None
        assert time.monotonic() - started < 10, "a request must not hang while the database is away"

    postgres_server.start()
    store.check()
    assert store.get(user.id) == user
    second = store.add_user("b", unit(rng, 1), "m")
    assert store.count() == 2 and store.get(second.id) == second
    assert store.search("m", faces[0], 1).matches[0][0].user_id == user.id


# --- atomic writes -------------------------------------------------------------------------------------------


def test_a_registration_refused_by_its_guard_leaves_no_rows(store: PostgresFaceStore, postgres_url: str) -> None:
    """A guard that raises after the search undoes the whole write: no user, descriptor, count, model row
    or HNSW index of a new model remains; the same holds for ``add_faces``."""
    rng = np.random.default_rng(2)
    store.check()
    empty = row_counts(postgres_url)

    def refuse(found: SearchResult) -> None:
        raise RuntimeError(f"refused after searching {found.users} users")

    with pytest.raises(RuntimeError, match="0 users"):
        store.add_user("new model", unit(rng, 3), "m", guard=refuse)
    assert row_counts(postgres_url) == empty

    user = store.add_user("kept", unit(rng, 1), "m")
    before = row_counts(postgres_url)
    stored = query(postgres_url, "SELECT faces, updated_at FROM face_users")
    with pytest.raises(RuntimeError, match="1 users"):
        store.add_user("second", unit(rng, 2), "m", guard=refuse)
    with pytest.raises(RuntimeError, match="1 users"):
        store.add_faces(user.id, unit(rng, 2), "m", guard=refuse)
    assert row_counts(postgres_url) == before
    assert query(postgres_url, "SELECT faces, updated_at FROM face_users") == stored
    one = {"face_models": 1, "face_users": 1, "face_descriptors": 1, "face_gallery_counts": 1, "hnsw indexes": 1}
    assert before == {**empty, **one}


# A registration worker: registers the face of each line read on stdin with a duplicate guard like
# api/services/recognition.py's _refuse_duplicates (refuse at cosine >= 0.9), answering "ok <id>" or
# "duplicate". The guard sleeps before deciding, so that without the store's lock both workers would search
# before either inserts.
REGISTER_WORKER = r"""
import json, sys, time
import numpy as np
from api.errors import DuplicateFaceError
from api.store.postgres import PostgresFaceStore

store = PostgresFaceStore(sys.argv[1])
store.check()

def refuse_duplicates(found):
    time.sleep(0.2)
    for matches in found.matches:
        for match in matches:
            if match.cosine >= 0.9:
                raise DuplicateFaceError(f"already registered as {match.name!r}")

print("READY", flush=True)
for line in sys.stdin:
    face = np.array(json.loads(line), dtype=np.float32)[None, :]
    try:
        user = store.add_user(sys.argv[2], face, "m", guard=refuse_duplicates)
    except DuplicateFaceError:
        print("duplicate", flush=True)
    else:
        print("ok " + user.id, flush=True)
store.close()
"""


def read_line(stream: IO[bytes], timeout_s: float = 30.0) -> str:
    """One line from a child, failing (rather than hanging) if none comes in time."""
    ready, _, _ = select.select([stream], [], [], timeout_s)
    assert ready, f"no answer from the child process within {timeout_s} s"
    line = stream.readline()
    assert line, "child process ended early"
    return line.decode("utf-8").rstrip("\n")


def test_two_processes_registering_the_same_face_at_once(postgres_url: str) -> None:
    """Two processes (two service nodes) registering the same new face at the same moment with a duplicate
    guard: exactly one succeeds in every round, as the guard runs under the collection's advisory lock.
    The first round also races to create the model and its index."""
    rounds = 5
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", REGISTER_WORKER, postgres_url, tag],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO_ROOT,
            env=SUBPROCESS_ENV,
        )
        for tag in ("p", "q")
    ]
    rng = np.random.default_rng(3)
    winners: list[str] = []
    try:
        for proc in procs:
            assert proc.stdout is not None and read_line(proc.stdout) == "READY"
        for _ in range(rounds):
            line = (json.dumps(unit(rng, 1, d=32)[0].tolist()) + "\n").encode()
            for proc in procs:  # both at once
                assert proc.stdin is not None
                proc.stdin.write(line)
                proc.stdin.flush()
            answers = []
            for proc in procs:
                assert proc.stdout is not None
                answers.append(read_line(proc.stdout))
            assert sorted(a.split()[0] for a in answers) == ["duplicate", "ok"], answers
            winners.append(next(a.split()[1] for a in answers if a.startswith("ok")))
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
            assert proc.wait(timeout=30) == 0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()

    store = PostgresFaceStore(postgres_url, FAST)
    try:
        assert sorted(u.id for u in store.list_users()[0]) == sorted(winners)
        assert store.count() == rounds
    finally:
        store.close()
    assert query(postgres_url, "SELECT count(*) FROM face_descriptors") == [(rounds,)]
    assert query(postgres_url, "SELECT users FROM face_gallery_counts") == [(rounds,)]


# --- the HNSW index ------------------------------------------------------------------------------------------

# The candidate query of PostgresFaceStore._search (model and dimension as literals, so that the planner
# can match the model's partial index); test_search_uses_the_hnsw_index checks the store's own query too.
CANDIDATES_SQL = """
    SELECT user_id FROM face_descriptors
    WHERE model_id = 'm' AND collection = %(collection)s {exclude}
    ORDER BY embedding::halfvec(64) <#> %(probe)s::halfvec(64)
    LIMIT %(candidates)s
"""


def hnsw_scans(url: str, index_name: str) -> int:
    return int(query(url, "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = %s", (index_name,))[0][0])


def test_search_uses_the_hnsw_index(postgres_url: str) -> None:
    """With 5,100 descriptors and fresh statistics, the candidate query is an index scan of the model's HNSW
    index (with and without an excluded user, also as a generic plan of a prepared statement), and the
    store's own searches do scan that index. Also covers the bulk-load path: drop the index, import,
    rebuild it."""
    rng = np.random.default_rng(4)
    users, faces_per_user, dim = 1700, 3, 64
    # Galleries this small are searched exactly by default; the index path is what this test is about.
    store = PostgresFaceStore(postgres_url, replace(FAST, exact_search_max_faces=0))
    try:
        moment = datetime(2024, 1, 1, tzinfo=UTC)
        batch = [
            StoredUser(
                UserRecord(f"{i:032x}", f"u{i}", "m", moment + timedelta(seconds=i), moment, faces_per_user),
                unit(rng, faces_per_user, dim),
            )
            for i in range(users)
        ]
        assert store.import_users(batch[:1]) == 1
        (index_name,) = query(postgres_url, "SELECT index_name FROM face_models WHERE model_id = 'm'")[0]
        assert index_name.startswith("face_descriptors_hnsw_")
        assert store.drop_search_index("m") is True
        assert store.import_users(batch[1:]) == users - 1
        store.build_search_index("m")
        assert query(postgres_url, "SELECT count(*) FROM pg_indexes WHERE indexname = %s", (index_name,)) == [(1,)]
        query(postgres_url, "ANALYZE")

        probe = batch[7].embeddings[0]
        from pgvector.psycopg import register_vector

        with psycopg.connect(postgres_url) as conn:
            register_vector(conn)
            conn.execute("SET hnsw.iterative_scan = relaxed_order")
            for exclude in ("", "AND user_id <> %(exclude)s"):
                params = {"collection": "default", "probe": probe, "candidates": 40, "exclude": batch[7].record.id}
                plan = "\n".join(
                    r[0] for r in conn.execute("EXPLAIN " + CANDIDATES_SQL.format(exclude=exclude), params)
                )
                assert f"Index Scan using {index_name}" in plan, plan
            generic = "\n".join(
                r[0]
                for r in conn.execute(
                    "EXPLAIN (GENERIC_PLAN) SELECT user_id FROM face_descriptors "
                    "WHERE model_id = 'm' AND collection = $1::text AND user_id <> $2::text "
                    "ORDER BY embedding::halfvec(64) <#> $3::vector::halfvec(64) LIMIT $4::bigint"
                )
            )
            assert f"Index Scan using {index_name}" in generic, generic

        # The store's own query: more than 5 searches, so that psycopg also runs it as a prepared statement.
        scans_before = hnsw_scans(postgres_url, index_name)
        for n in range(8):
            found = store.search("m", batch[n].embeddings[1], 3, exclude_user=batch[n + 1].record.id)
            assert found.users == users and found.matches[0][0].user_id == batch[n].record.id
    finally:
        store.close()  # the backends exit, which flushes their statistics
    deadline = time.monotonic() + 10
    while hnsw_scans(postgres_url, index_name) < scans_before + 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert hnsw_scans(postgres_url, index_name) >= scans_before + 8


def test_the_hnsw_settings_reach_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """FACE_STORE_HNSW_* choose the search lists and how a new index is built; nothing connects yet."""
    from api.config import Settings

    for name, value in (("EF_SEARCH", "120"), ("GUARD_EF_SEARCH", "30"), ("M", "32"), ("EF_CONSTRUCTION", "128")):
        monkeypatch.setenv(f"FACE_STORE_HNSW_{name}", value)
    store = open_store_at("postgresql://nobody@127.0.0.1:1/none", Settings(_env_file=None))
    try:
        options = store._options  # type: ignore[attr-defined]
        assert (options.ef_search, options.guard_ef_search, options.hnsw_m, options.hnsw_ef_construction) == (
            120,
            30,
            32,
            128,
        )
    finally:
        store.close()
    monkeypatch.delenv("FACE_STORE_HNSW_GUARD_EF_SEARCH")
    default = open_store_at("postgresql://nobody@127.0.0.1:1/none", Settings(_env_file=None))
    try:
        assert default._options.guard_ef_search is None  # type: ignore[attr-defined]  # the search's own list
    finally:
        default.close()


def test_a_copy_leaves_the_planner_knowing_the_new_rows(postgres_url: str, tmp_path: Path) -> None:
    """After ``store copy`` the tables are analysed: the planner's row estimate is the copied faces, not the
    near-empty table it saw before (with which it scanned a whole gallery instead of the HNSW index)."""
    from api.store.copy import copy_store
    from api.store.npz import NpzFaceStore

    source = NpzFaceStore(tmp_path / "source.npz")
    rng = np.random.default_rng(3)
    for number in range(300):
        faces = rng.normal(size=(2, 128)).astype(np.float32)
        source.add_user(f"person {number}", faces / np.linalg.norm(faces, axis=1, keepdims=True), "model")
    destination = PostgresFaceStore(postgres_url)
    try:
        copy_store(source, destination)
        with psycopg.connect(postgres_url) as conn:
            (estimate,) = conn.execute("SELECT reltuples FROM pg_class WHERE relname = 'face_descriptors'").fetchone()
        assert estimate == 600
    finally:
        destination.close()
