"""Command-line interface of the face service: ``python -m api.cli COMMAND ...``.

python -m api.cli store copy SRC DST     copy users and descriptors between stores (.npz path or postgresql:// URL)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from api.errors import FaceServiceError


def _store_copy(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from api.store import open_store_at
    from api.store.copy import CopyCheckError, copy_store

    source = open_store_at(args.source)
    destination = open_store_at(args.destination)
    try:
        names = {"source": _shown(args.source), "destination": _shown(args.destination)}
        total = source.count()
        print(f"copying {total} users from {names['source']} to {names['destination']}", file=sys.stderr)
        started = time.monotonic()
        with tqdm(total=total, unit="users", disable=args.no_progress or None, file=sys.stderr) as bar:
            report = copy_store(source, destination, batch_size=args.batch_size, progress=bar.update)
        seconds = time.monotonic() - started
    except CopyCheckError as exc:
        print(f"store copy: check failed: {exc}", file=sys.stderr)
        return 1
    finally:
        source.close()
        destination.close()
    rate = report.source_users / seconds if seconds > 0 else 0.0
    print(
        f"copied {report.copied} users, skipped {report.skipped} already there; destination holds "
        f"{report.destination_users} users (source {report.source_users}); {seconds:.1f} s, {rate:.0f} users/s"
        + ("; search index rebuilt" if report.index_rebuilt else "")
    )
    return 0


def _shown(location: str) -> str:
    """A location as it may be printed: URLs without credentials."""
    if "://" in location:
        from api.store.postgres import safe_location

        return safe_location(location)
    return location


def build_parser() -> argparse.ArgumentParser:
    # `face-service ...` (the console script) or `python -m api.cli ...`: the same commands.
    prog = "python -m api.cli" if sys.argv[0].endswith(".py") else Path(sys.argv[0]).name
    parser = argparse.ArgumentParser(prog=prog, description="Face service command line.")
    commands = parser.add_subparsers(dest="command", required=True)
    store = commands.add_parser("store", help="work with face stores").add_subparsers(
        dest="store_command", required=True
    )
    copy = store.add_parser(
        "copy",
        help="copy every user and descriptor from SRC to DST",
        description="Copy users and descriptors between stores, in either direction. SRC and DST are each an "
        ".npz path or a postgresql:// URL. Users already in DST (same id) are skipped, so an interrupted copy "
        "can be run again; the counts are checked at the end. An encrypted .npz needs FACE_STORE_ENCRYPTION_KEY.",
    )
    copy.add_argument("source", metavar="SRC")
    copy.add_argument("destination", metavar="DST")
    copy.add_argument("--batch-size", type=int, default=1000, help="users per batch (default 1000)")
    copy.add_argument("--no-progress", action="store_true", help="no progress bar")
    copy.set_defaults(run=_store_copy)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except FaceServiceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
