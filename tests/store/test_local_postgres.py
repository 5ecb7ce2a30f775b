"""The local PostgreSQL that the store tests and ``make run-postgres`` rely on, checked against a real server.

No mocks: if these fail, the PostgreSQL store tests would fail for reasons unrelated to the store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg
import pytest

from tools import local_postgres

if TYPE_CHECKING:  # type only: importing a conftest as a module would load it a second time
    from tests.store.conftest import LocalPostgres

# The store relies on pgvector >= 0.8.2 (iterative index scans, fixed HNSW bugs); the wheel bundles 0.8.5.
MIN_PGVECTOR = (0, 8, 2)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_server_starts_with_pgvector(postgres_server: LocalPostgres) -> None:
    assert postgres_server.is_running()
    with psycopg.connect(postgres_server.uri) as conn:
        row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        assert row is not None, "vector extension not enabled in database postgres"
        assert _version(row[0]) >= MIN_PGVECTOR
        server_version = conn.execute("SHOW server_version_num").fetchone()
        assert server_version is not None and int(server_version[0]) >= 160000


def test_start_again_reuses_the_running_server(postgres_server: LocalPostgres) -> None:
    with psycopg.connect(postgres_server.uri) as conn:
        started_before = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
    assert local_postgres.start(postgres_server.data_dir, keep_running=False) == postgres_server.uri
    with psycopg.connect(postgres_server.uri) as conn:
        assert conn.execute("SELECT pg_postmaster_start_time()").fetchone() == started_before


def test_fresh_database_has_vector_and_keeps_query(postgres_url: str, postgres_server: LocalPostgres) -> None:
    assert postgres_url.split("?", 1)[1] == postgres_server.uri.split("?", 1)[1]  # same socket host
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT current_database()").fetchone() != ("postgres",)
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, embedding vector(3))")
        conn.execute("INSERT INTO t VALUES (1, '[1,0,0]'), (2, '[0,1,0]')")
        nearest = conn.execute("SELECT id FROM t ORDER BY embedding <=> '[0.9,0.1,0]' LIMIT 1").fetchone()
        assert nearest == (1,)


def test_two_fresh_databases_are_isolated(postgres_server: LocalPostgres) -> None:
    names = ["t_isolated_a", "t_isolated_b"]
    try:
        first, second = (local_postgres.create_database(postgres_server.uri, name) for name in names)
        with psycopg.connect(first) as conn:
            conn.execute("CREATE TABLE faces (id int)")
            conn.execute("INSERT INTO faces VALUES (1)")
        with psycopg.connect(second) as conn:
            assert conn.execute("SELECT to_regclass('faces')").fetchone() == (None,)
        # Creating it again starts from empty, even while a connection to the old one is open.
        with psycopg.connect(first) as stale:
            again = local_postgres.create_database(postgres_server.uri, names[0])
            assert again == first
            with pytest.raises(psycopg.OperationalError):
                stale.execute("SELECT 1")
        with psycopg.connect(again) as conn:
            assert conn.execute("SELECT to_regclass('faces')").fetchone() == (None,)
    finally:
        for name in names:
            local_postgres.drop_database(postgres_server.uri, name)


def test_stop_makes_connections_fail_and_start_brings_the_same_uri_back(
    postgres_server: LocalPostgres, postgres_url: str
) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (id int)")
        conn.execute("INSERT INTO kept VALUES (7)")
    open_conn = psycopg.connect(postgres_url, autocommit=True)
    try:
        postgres_server.stop()
        assert not postgres_server.is_running()
        assert local_postgres.stop(postgres_server.data_dir) is False  # nothing left to stop
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(postgres_url, connect_timeout=2)
        with pytest.raises(psycopg.OperationalError):
            open_conn.execute("SELECT 1")  # fast shutdown cut it
    finally:
        open_conn.close()
        uri = postgres_server.start()
    assert uri == postgres_server.uri
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT id FROM kept").fetchall() == [(7,)]


def test_database_uri_replaces_only_the_database() -> None:
    uri = "postgresql://postgres:@/postgres?host=/tmp/abc"
    assert local_postgres.database_uri(uri, "faces") == "postgresql://postgres:@/faces?host=/tmp/abc"
