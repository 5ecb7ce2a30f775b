"""Command-line interface of the face service: ``face-service COMMAND ...`` (= ``python -m api.cli COMMAND ...``).

face-service store copy SRC DST     copy users and descriptors between stores (.npz path or postgresql:// URL)
face-service enroll DIR             register everyone in DIR, one sub-folder per person (see api.enrollment)
"""

from __future__ import annotations

import argparse
import logging
import os
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


def _enroll(args: argparse.Namespace) -> int:
    """``enroll DIR``: exit 0 when everyone was registered (or skipped), 1 when someone failed (see the report),
    2 when the run could not start or stopped midway (a rerun resumes where it stopped)."""
    from api.config import Settings
    from api.enrollment import EnrollOptions, scan_people, write_report

    people, ignored = scan_people(args.folder)
    options = EnrollOptions(
        collection=args.collection,
        replace=args.replace,
        allow_duplicate=args.allow_duplicate,
        refuse_spoofs=args.liveness,
        workers=args.workers or (1 if args.url else 2),
        batch_size=args.batch_size,
    )
    settings = Settings()
    photos = sum(len(person.photos) for person in people)
    where = _shown(args.url) if args.url else _shown(settings.store_url or str(settings.store_path))
    print(
        f"enrolling {len(people)} people ({photos} photos) from {args.folder} into collection "
        f"{args.collection!r} of {where}",
        file=sys.stderr,
    )
    progress = _EnrollProgress(disable=args.no_progress)
    try:
        if args.url:
            from api.enrollment import HttpEnroller, ServiceClient

            client = ServiceClient(args.url, args.api_key or os.environ.get("FACE_API_KEY") or None)
            enroller = HttpEnroller(
                client,
                options,
                settings.max_image_bytes,
                settings.max_files_per_request,
                settings.max_upload_bytes // 2,
            )
            result = enroller.run(args.folder, people, progress)
        else:
            from api.composition import build_service
            from api.enrollment import StoreEnroller
            from api.store import open_store

            store = open_store(settings)  # a wrong collection or store fails now, not after the models load
            try:
                store.get_collection(args.collection)
            finally:
                store.close()
            service = build_service(settings)
            try:
                enroller = StoreEnroller(service.models.recognition, service.store, options, settings.max_image_bytes)
                result = enroller.run(args.folder, people, progress)
            finally:
                service.close()
    except KeyboardInterrupt:
        progress.close()
        print("\nenroll: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        progress.close()
    result.rows[:0] = ignored
    if args.report is not None:
        write_report(args.report, result)
    print(result.summary())
    if result.aborted:
        print(f"enroll: stopped early: {result.aborted}; run it again to resume", file=sys.stderr)
        return 2
    return 1 if result.failed else 0


class _EnrollProgress:
    """The tqdm bar of ``enroll`` (stderr), opened once the run knows how many photos it will read: after the
    models have loaded and the people already registered have been left out."""

    def __init__(self, disable: bool) -> None:
        self.disable = disable
        self.bar = None

    def planned(self, photos: int) -> None:
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal (logs of scheduled runs stay readable).
        self.bar = tqdm(total=photos, unit="photos", disable=self.disable or None, file=sys.stderr)

    def done(self, photos: int, result) -> None:  # result: api.enrollment.EnrollmentResult
        if self.bar is not None:
            self.bar.update(photos)
            self.bar.set_postfix(registered=result.registered, failed=result.failed, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: must be at least 1")
    return number


def _report_path(value: str) -> Path:
    path = Path(value)
    if path.suffix.lower() not in (".csv", ".json"):
        raise argparse.ArgumentTypeError(f"{value!r}: the report is a .csv or a .json file")
    return path


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
        "can be run again; the counts are checked at the end. An encrypted .npz needs FACE_STORE_ENCRYPTION_KEY. "
        "Descriptors are copied as they are, with the id of the model that made them: no command converts them to "
        "another embedder. Changing FACE_EMBEDDER means computing every descriptor again from the people's photos "
        "(the service never stores photos), e.g. `face-service enroll DIR --replace` into the new store.",
    )
    copy.add_argument("source", metavar="SRC")
    copy.add_argument("destination", metavar="DST")
    copy.add_argument("--batch-size", type=int, default=1000, help="users per batch (default 1000)")
    copy.add_argument("--no-progress", action="store_true", help="no progress bar")
    copy.set_defaults(run=_store_copy)

    enroll = commands.add_parser(
        "enroll",
        help="register everyone in DIR: one sub-folder per person, named after them",
        description="Register everyone in DIR, one sub-folder per person: the folder's name becomes the user's "
        "name and its .jpg/.jpeg/.png/.webp/.bmp files their photos (other files are ignored and reported). Every "
        "person gets the checks of POST /api/register: one usable face per photo, optional liveness, photos of "
        "one person, no face already registered as someone else. By default it works on the configured store "
        "(FACE_STORE_PATH or FACE_STORE_URL); with --url, through a running service. People already registered "
        "under the same name are skipped, so an interrupted run resumes when started again. Exit status: 0 all "
        "registered or skipped, 1 someone failed (see --report), 2 the run could not start or stopped midway.",
    )
    enroll.add_argument("folder", metavar="DIR", type=Path)
    enroll.add_argument("--collection", default="default", help="collection to register into; it must exist")
    enroll.add_argument(
        "--replace",
        action="store_true",
        help="re-register people already registered under the same name (on the store, a refused "
        "re-registration keeps the old one; with --url the old one is deleted first)",
    )
    enroll.add_argument(
        "--allow-duplicate", action="store_true", help="register faces that match someone already registered"
    )
    enroll.add_argument(
        "--liveness",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="refuse photos and screen replays (default: FACE_REQUIRE_LIVENESS / the service's setting)",
    )
    enroll.add_argument(
        "--report",
        type=_report_path,
        metavar="FILE",
        help="write every rejected file and every skipped or failed "
        "person (person, file, outcome, code, message) to FILE (.csv or .json)",
    )
    enroll.add_argument("--url", help="work through the service at URL (e.g. http://127.0.0.1:8000)")
    enroll.add_argument("--api-key", help="admin API key for --url (default: $FACE_API_KEY)")
    enroll.add_argument(
        "--workers",
        type=_positive,
        default=None,
        help="threads decoding and detecting photos (default 2); with --url, requests in flight (default 1: people "
        "are then registered in folder order, so of two folders with the same face the second is the one refused)",
    )
    enroll.add_argument("--batch-size", type=_positive, default=32, help="faces per embedding batch (default 32)")
    enroll.add_argument("--no-progress", action="store_true", help="no progress bar")
    enroll.set_defaults(run=_enroll)
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
