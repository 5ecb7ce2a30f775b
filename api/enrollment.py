"""Bulk enrolment: register everyone in a folder tree, one sub-folder per person, named after them.

    people/
        Ada Lovelace/   ada1.jpg  ada2.png      -> user "Ada Lovelace" with 2 faces
        Alan Turing/    turing.webp             -> user "Alan Turing"

This is the layout of deepface's ``db_path`` and of face_recognition's examples, so existing photo folders can
be enrolled as they are. Every person goes through the checks of ``POST /api/register`` (one usable face per
photo, optional anti-spoofing, consistency of the photos, the duplicate check inside the store's write lock):
:class:`StoreEnroller` calls the service's own steps on the configured store, :class:`HttpEnroller` calls a
running service's API.

Speed on the store: registering people one by one embeds one or two faces per model call and detects one photo
at a time. Here decoding and detection run for several people at once in a thread pool (YuNet and OpenCV
release the GIL) while the main thread embeds the faces of many people in one batch, which costs about half as
much per face. The store writes stay one per person, in folder order, because each duplicate check must see
everyone registered before. Figures: docs/benchmarks.md, "Bulk enrolment".

Resumable: people whose name is already registered in the collection are skipped (``replace`` re-registers
them instead), so an interrupted run is simply started again.
"""

from __future__ import annotations

import contextlib
import json
import mimetypes
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from api.errors import CollectionNotFoundError, FaceServiceError, ImageTooLargeError, UserNotFoundError
from api.store import DEFAULT_COLLECTION, FaceStore, StoredUser, UserRecord

if TYPE_CHECKING:  # the models' modules load TensorFlow (seconds): the HTTP mode never needs them
    from api.services.recognition import FoundFace, RecognitionService

# What register accepts (decode_image recognises the format from the content; the suffix only decides which
# files are read at all).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
# POST /api/register's rule for `name`: a folder name must be a valid name there too.
NAME_MAX_LENGTH = 200
# GET /api/users' largest page.
USERS_PAGE = 1000


class EnrollmentError(FaceServiceError):
    """A problem that stops a whole run before it starts (no such folder, a service that refuses the key)."""

    code = "ENROLLMENT_ERROR"
    status = 400


class ServiceUnreachableError(FaceServiceError):
    code = "SERVICE_UNREACHABLE"
    status = 503


class InvalidNameError(FaceServiceError):
    """The folder's name cannot be a user name (the API's own rule for `name`)."""

    code = "VALIDATION_ERROR"
    status = 422


class UnreadableFileError(FaceServiceError):
    code = "UNREADABLE_FILE"
    status = 422


class NoImagesError(FaceServiceError):
    """A person folder without any image that could be read."""

    code = "NO_IMAGES"
    status = 422


# --- the folder tree -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Person:
    """One sub-folder: the user's name and their image files (paths relative to the enrolled folder)."""

    name: str
    photos: tuple[Path, ...]


@dataclass(frozen=True)
class ReportRow:
    """One entry of the report.

    ``outcome``: ``rejected`` (a photo that was read but not stored; its person may still be registered),
    ``ignored`` (not an image file: never read), ``skipped`` (the person was registered already) or ``failed``
    (the person was not registered). ``file`` is relative to the enrolled folder, empty for a whole person.
    ``code`` is the API's error code (``NO_FACE``, ``DUPLICATE_FACE``, ...) or, on ``ignored`` and ``skipped``
    rows, the reason (``NOT_AN_IMAGE``, ``ALREADY_REGISTERED``, ...).
    """

    person: str
    file: str
    outcome: str
    code: str
    message: str


def scan_people(root: Path) -> tuple[list[Person], list[ReportRow]]:
    """The people under ``root`` (one per sub-folder, by name) and ``ignored`` rows for what is not read: files
    that are not images, files directly in ``root``, nested folders. Hidden entries (``.name``) are passed over
    without a row: photo managers and file browsers leave them everywhere."""
    if not root.is_dir():
        raise EnrollmentError(f"{str(root)!r} is not a folder.", folder=str(root))
    people, ignored = [], []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            message = "Photos must sit in a sub-folder named after the person."
            ignored.append(ReportRow("", entry.name, "ignored", "NOT_IN_PERSON_FOLDER", message))
            continue
        photos = []
        for item in sorted(entry.iterdir(), key=lambda p: p.name):
            relative = f"{entry.name}/{item.name}"
            if item.name.startswith("."):
                continue
            if item.is_dir():
                ignored.append(
                    ReportRow(entry.name, relative, "ignored", "NESTED_FOLDER", "Nested folders are not read.")
                )
            elif item.suffix.lower() in IMAGE_SUFFIXES:
                photos.append(Path(relative))
            else:
                message = "Not a .jpg, .jpeg, .png, .webp or .bmp file."
                ignored.append(ReportRow(entry.name, relative, "ignored", "NOT_AN_IMAGE", message))
        people.append(Person(entry.name, tuple(photos)))
    return people, ignored


# --- what a run produced -------------------------------------------------------------------------------------


@dataclass
class EnrollmentResult:
    """Counts and report rows of a run. ``accepted``: photos whose descriptor was stored; ``rejected``: photos
    that were read but not stored (their own error, or their person failed as a whole). Photos of skipped people
    are not read and count in neither, so photos/s is the rate of the work actually done."""

    registered: int = 0
    replaced: int = 0  # of the registered: people who were registered before and were registered anew
    skipped: int = 0
    failed: int = 0
    accepted: int = 0
    rejected: int = 0
    seconds: float = 0.0
    aborted: str | None = None  # why the run stopped early (the store or the service failed), or None
    rows: list[ReportRow] = field(default_factory=list)

    @property
    def photos_per_second(self) -> float:
        photos = self.accepted + self.rejected
        return photos / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        replaced = f" ({self.replaced} replaced)" if self.replaced else ""
        return (
            f"people: {self.registered} registered{replaced}, {self.skipped} skipped, {self.failed} failed; "
            f"photos: {self.accepted} accepted, {self.rejected} rejected; "
            f"{self.seconds:.1f} s, {self.photos_per_second:.1f} photos/s"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "registered": self.registered,
            "replaced": self.replaced,
            "skipped": self.skipped,
            "failed": self.failed,
            "photos_accepted": self.accepted,
            "photos_rejected": self.rejected,
            "seconds": round(self.seconds, 3),
            "photos_per_second": round(self.photos_per_second, 2),
            "aborted": self.aborted,
        }


REPORT_COLUMNS = ("person", "file", "outcome", "code", "message")


def write_report(path: Path, result: EnrollmentResult) -> None:
    """``.json``: ``{"summary": {...}, "entries": [row, ...]}``; otherwise CSV with ``REPORT_COLUMNS``."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{column: getattr(row, column) for column in REPORT_COLUMNS} for row in result.rows]
    if path.suffix.lower() == ".json":
        text = json.dumps({"summary": result.as_dict(), "entries": rows}, ensure_ascii=False, indent=1)
        path.write_text(text + "\n", encoding="utf-8")
        return
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=REPORT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


@dataclass(frozen=True)
class EnrollOptions:
    collection: str = DEFAULT_COLLECTION
    replace: bool = False  # register anew the people already registered under the same name (else skip them)
    allow_duplicate: bool = False
    refuse_spoofs: bool | None = None  # the anti-spoofing gate; None: the service's FACE_REQUIRE_LIVENESS
    # Threads that read, decode and detect (store), or requests in flight (HTTP: more than 1 gives up folder
    # order between the people in flight, and with it which of two folders with one face is refused).
    workers: int = 2
    batch_size: int = 32  # faces per embedding batch (store)


class Progress(Protocol):
    """What a run reports while it goes (the command line draws a bar with it)."""

    def planned(self, photos: int) -> None:
        """Called once, before the first photo: how many photos this run will read (skipped people left out)."""

    def done(self, photos: int, result: EnrollmentResult) -> None:
        """Called after each person, in folder order: that person's photos, and the result so far."""


@dataclass
class _Outcome:
    """What happened to one person; merged into the result in folder order."""

    person: Person
    registered: bool = False
    replaced: bool = False
    accepted: int = 0
    rows: list[ReportRow] = field(default_factory=list)


def _merge(result: EnrollmentResult, outcome: _Outcome) -> None:
    result.rows.extend(outcome.rows)
    if outcome.registered:
        result.registered += 1
        result.replaced += outcome.replaced
    else:
        result.failed += 1
    result.accepted += outcome.accepted
    result.rejected += len(outcome.person.photos) - outcome.accepted


def _plan(
    people: Sequence[Person], existing: dict[str, int], options: EnrollOptions, result: EnrollmentResult
) -> list[Person]:
    """The people to register now; the others (``existing``: name -> users of that name) get a skipped row."""
    todo = []
    for person in people:
        users = existing.get(person.name, 0)
        if users and not options.replace:
            result.skipped += 1
            message = (
                f"{users} user(s) named {person.name!r} already in collection {options.collection!r}; "
                "--replace registers them anew."
            )
            result.rows.append(ReportRow(person.name, "", "skipped", "ALREADY_REGISTERED", message))
        else:
            todo.append(person)
    return todo


def _check_name(name: str) -> None:
    if not 1 <= len(name) <= NAME_MAX_LENGTH:
        raise InvalidNameError(f"A user name has 1-{NAME_MAX_LENGTH} characters; the folder name has {len(name)}.")


@dataclass(frozen=True)
class Photo:
    """A photo file's name and bytes: what one file field of an upload carries (the service's ``ImageUpload``)."""

    filename: str
    data: bytes


def _read_uploads(root: Path, person: Person, max_image_bytes: int, rows: list[ReportRow]) -> list[Photo]:
    """The person's photos, under the API's per-image size limit; files refused here get a row."""
    uploads = []
    for path in person.photos:
        try:
            size = (root / path).stat().st_size
            if size > max_image_bytes:
                error: FaceServiceError = ImageTooLargeError(
                    f"{path.name!r} is larger than {max_image_bytes} bytes.", file=path.name, limit=max_image_bytes
                )
                rows.append(ReportRow(person.name, path.as_posix(), "rejected", error.code, error.message))
                continue
            uploads.append(Photo(path.name, (root / path).read_bytes()))
        except OSError as exc:
            error = UnreadableFileError(f"{path.name!r} could not be read: {exc.strerror or exc}")
            rows.append(ReportRow(person.name, path.as_posix(), "rejected", error.code, error.message))
    if not uploads:
        if person.photos:
            raise NoImagesError(f"None of the {len(person.photos)} image files could be used.")
        raise NoImagesError("The folder holds no image file.")
    return uploads


def _failure_rows(
    person: Person, error: FaceServiceError, files: dict[str, str], single_file: str | None
) -> list[ReportRow]:
    """Rows for a person who was not registered: each rejected file the error lists (or ``single_file``, the
    only photo, when the error is that photo's), then the person. ``files``: upload name -> report path."""
    rows = [
        ReportRow(
            person.name,
            files.get(str(item.get("file", "")), str(item.get("file", ""))),
            "rejected",
            str(item.get("code", "")),
            str(item.get("message", "")),
        )
        for item in error.details.get("rejected") or []
        if isinstance(item, dict)
    ]
    if not rows and single_file is not None:
        rows.append(ReportRow(person.name, files.get(single_file, single_file), "rejected", error.code, error.message))
    culprit = error.details.get("file")  # INCONSISTENT_FACES and SPOOF_DETECTED name the photo at fault
    culprit_path = files.get(culprit, culprit) if isinstance(culprit, str) else ""
    return [*rows, ReportRow(person.name, culprit_path, "failed", error.code, error.message)]


def _report_paths(person: Person) -> dict[str, str]:
    return {path.name: path.as_posix() for path in person.photos}


_T = TypeVar("_T")
_R = TypeVar("_R")


def _ordered(pool: ThreadPoolExecutor, work: Callable[[_T], _R], items: Iterable[_T], window: int) -> Iterator[_R]:
    """``work(item)`` for every item in the pool, results in order, at most ``window`` items in flight (so a
    folder of thousands of people is never read into memory at once)."""
    queue = iter(items)
    pending: deque[Future[_R]] = deque()
    try:
        while True:
            while len(pending) < window and (item := next(queue, None)) is not None:
                pending.append(pool.submit(work, item))
            if not pending:
                return
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


# --- on the configured store ---------------------------------------------------------------------------------


@dataclass
class _Prepared:
    """One person after reading, decoding, detection and alignment (in a worker thread), before embedding."""

    outcome: _Outcome
    found: list[FoundFace] = field(default_factory=list)
    rejected: list[tuple[str, FaceServiceError]] = field(default_factory=list)
    chips: np.ndarray | None = None
    error: FaceServiceError | None = None
    single_file: str | None = None  # the upload an error is about, when the person had only one


_NO_PIXELS = np.zeros((0, 0, 3), np.uint8)


class StoreEnroller:
    """Enrolment on a store through the service's own steps (``RecognitionService``), batched across people.

    Per person it runs exactly register's steps (``collect_faces``, alignment, embedding, ``register_embedded``:
    consistency check, then ``add_user`` with the duplicate check as the write guard); only the embedding is
    shared between people.
    """

    def __init__(
        self, recognition: RecognitionService, store: FaceStore, options: EnrollOptions, max_image_bytes: int
    ) -> None:
        self.recognition = recognition
        self.store = store
        self.options = options
        self.max_image_bytes = max_image_bytes
        setting = recognition.settings.require_liveness
        self.refuse_spoofs = setting if options.refuse_spoofs is None else options.refuse_spoofs

    def run(self, root: Path, people: Sequence[Person], progress: Progress | None = None) -> EnrollmentResult:
        """Register ``people`` (from :func:`scan_people`), in order. Raises ``COLLECTION_NOT_FOUND`` before any
        work; a store or model failure midway stops the run with ``aborted`` set (what was done stays done)."""
        started = time.monotonic()
        result = EnrollmentResult()
        self.store.get_collection(self.options.collection)  # `default` always exists
        existing = self._existing()
        todo = _plan(people, {name: len(records) for name, records in existing.items()}, self.options, result)
        if progress is not None:
            progress.planned(sum(len(person.photos) for person in todo))
        try:
            for outcome in self._outcomes(root, todo, existing):
                _merge(result, outcome)
                if progress is not None:
                    progress.done(len(outcome.person.photos), result)
        except FaceServiceError as exc:  # everything after would fail the same way; a rerun resumes
            result.aborted = f"{exc.code}: {exc.message}"
        result.seconds = time.monotonic() - started
        return result

    def _existing(self) -> dict[str, list[UserRecord]]:
        existing: dict[str, list[UserRecord]] = {}
        offset = 0
        while True:
            records, total = self.store.list_users(offset, USERS_PAGE, collection=self.options.collection)
            for record in records:
                existing.setdefault(record.name, []).append(record)
            offset += len(records)
            if not records or offset >= total:
                return existing

    def _outcomes(
        self, root: Path, todo: Sequence[Person], existing: dict[str, list[UserRecord]]
    ) -> Iterator[_Outcome]:
        """Outcomes in folder order, from a three-stage pipeline: worker threads prepare people ahead, this
        thread embeds each time ``batch_size`` faces are ready, and one writer thread registers people in
        order. The npz store rewrites its file on every write (tens of ms with thousands of users), so
        writing beside the inference instead of between it keeps both cores busy."""
        batch_size = max(1, self.options.batch_size)
        workers = max(1, self.options.workers)
        written: deque[Future[_Outcome | None]] = deque()
        stopping = threading.Event()  # set by the writer when the store fails: the writes queued after are dropped

        def write(prepared: _Prepared, embeddings: np.ndarray) -> _Outcome | None:
            if stopping.is_set():
                return None
            try:
                return self._register(prepared, embeddings, existing)
            except BaseException:
                stopping.set()
                raise

        def finished(backlog: int) -> Iterator[_Outcome]:
            """Outcomes written so far, in order; waits while more than ``backlog`` are still queued."""
            while written and (len(written) > backlog or written[0].done()):
                outcome = written.popleft().result()
                if outcome is not None:
                    yield outcome

        with (
            ThreadPoolExecutor(workers, thread_name_prefix="enroll") as pool,
            ThreadPoolExecutor(1, thread_name_prefix="enroll-write") as writer,
        ):
            try:
                batch: list[_Prepared] = []  # in folder order, failed preparations included
                faces = 0
                for prepared in _ordered(
                    pool, lambda person: self._prepare(root, person), todo, 2 * batch_size + workers
                ):
                    batch.append(prepared)
                    faces += len(prepared.found)
                    if faces >= batch_size:
                        written.extend(writer.submit(write, *item) for item in self._embed(batch))
                        batch, faces = [], 0
                    yield from finished(4 * batch_size)
                written.extend(writer.submit(write, *item) for item in self._embed(batch))
                yield from finished(0)
            finally:
                stopping.set()  # a no-op after a complete run; else nothing more is written
                for future in written:
                    future.cancel()

    def _embed(self, batch: list[_Prepared]) -> list[tuple[_Prepared, np.ndarray]]:
        """One embedding call for the faces of everyone in ``batch``: each person with their descriptors (none
        for a person whose preparation failed)."""
        chips = [p.chips for p in batch if p.chips is not None and len(p.chips)]
        dimension = self.recognition.engine.embedder.dimension
        embeddings = self.recognition.engine.embed_chips(np.concatenate(chips)) if chips else None
        items, start = [], 0
        for prepared in batch:
            count = len(prepared.found) if prepared.error is None else 0
            items.append(
                (prepared, embeddings[start : start + count] if count else np.zeros((0, dimension), np.float32))
            )
            prepared.chips = None  # embedded: the writer needs the descriptors only
            start += count
        return items

    def _prepare(self, root: Path, person: Person) -> _Prepared:
        """Read, decode, detect and align one person's photos (in a worker thread)."""
        prepared = _Prepared(_Outcome(person))
        try:
            _check_name(person.name)
            uploads = _read_uploads(root, person, self.max_image_bytes, prepared.outcome.rows)
        except FaceServiceError as exc:
            prepared.error = exc
            return prepared
        from api.services.recognition import ImageUpload

        try:
            photos = [ImageUpload(photo.filename, photo.data) for photo in uploads]
            prepared.found, prepared.rejected = self.recognition.collect_faces(photos, self.refuse_spoofs)
        except FaceServiceError as exc:
            prepared.error = exc
            if len(uploads) == 1:
                prepared.single_file = uploads[0].filename
            return prepared
        prepared.chips = self.recognition.face_chips(prepared.found)
        # The pixels are not needed after alignment: dropping them keeps the people in flight small.
        prepared.found = [replace(f, image=_NO_PIXELS, upload=replace(f.upload, data=b"")) for f in prepared.found]
        return prepared

    def _register(self, prepared: _Prepared, embeddings: np.ndarray, existing: dict[str, list[UserRecord]]) -> _Outcome:
        """Register one prepared person (in the writer thread), or report why they cannot be."""
        if prepared.error is not None:
            return self._failed(prepared, prepared.error)
        outcome = prepared.outcome
        previous = existing.get(outcome.person.name, []) if self.options.replace else []
        backups = self._remove(previous)
        try:
            registered = self.recognition.register_embedded(
                self.store,
                outcome.person.name,
                prepared.found,
                prepared.rejected,
                embeddings,
                self.options.allow_duplicate,
                self.options.collection,
            )
        except FaceServiceError as exc:
            if backups:  # a failed re-registration leaves the person as they were (same ids and timestamps)
                self.store.import_users(backups)
            return self._failed(prepared, exc)
        outcome.registered, outcome.replaced, outcome.accepted = True, bool(previous), registered.user.faces
        outcome.rows.extend(self._rejected_rows(prepared))
        return outcome

    def _remove(self, records: list[UserRecord]) -> list[StoredUser]:
        """Delete the people to replace before registering them anew (else the duplicate check would refuse
        their photos as themselves), keeping what restores them."""
        backups = []
        for record in records:
            with contextlib.suppress(UserNotFoundError):  # deleted meanwhile by someone else: nothing to restore
                stored = StoredUser(
                    self.store.get(record.id, collection=record.collection),
                    np.array(self.store.embeddings_of(record.id, collection=record.collection)),
                )
                self.store.delete(record.id, collection=record.collection)
                backups.append(stored)
        return backups

    @staticmethod
    def _rejected_rows(prepared: _Prepared) -> list[ReportRow]:
        person = prepared.outcome.person
        paths = _report_paths(person)
        return [
            ReportRow(person.name, paths.get(upload, upload), "rejected", exc.code, exc.message)
            for upload, exc in prepared.rejected
        ]

    def _failed(self, prepared: _Prepared, error: FaceServiceError) -> _Outcome:
        if error.status >= 500:  # not this person's fault: the store or a model is down
            raise error
        outcome = prepared.outcome
        outcome.rows.extend(self._rejected_rows(prepared))
        outcome.rows.extend(_failure_rows(outcome.person, error, _report_paths(outcome.person), prepared.single_file))
        return outcome


# --- against a running service over HTTP ---------------------------------------------------------------------

# Errors of one photo: when the first request of a person is refused with one of these and photos remain
# (a person with more photos than one request may carry), the next request tries again with the rest.
_PHOTO_ERRORS = frozenset(
    {"NO_FACE", "FACE_TOO_SMALL", "MULTIPLE_FACES", "INVALID_IMAGE", "UNSUPPORTED_MEDIA_TYPE", "IMAGE_TOO_LARGE"}
)


class _ApiError(FaceServiceError):
    """An error answer of the service, as the exception it was on the server (code, status, details)."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None) -> None:
        super().__init__(message, **(details or {}))
        self.code = code
        self.status = status


class ServiceClient:
    """A minimal client of the service's API on the standard library (``requirements.txt`` has no HTTP client):
    multipart uploads, the error envelope, and retries of what did not happen: 429 (after ``Retry-After``), 503
    and refused connections. A ``POST`` whose connection broke, or that timed out (``INFERENCE_TIMEOUT``), may
    have registered someone all the same, so it is not sent again: the run stops, and a rerun skips them."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 120.0, retries: int = 3) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.retries = retries

    def call(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        form: dict[str, str] | None = None,
        files: Sequence[Photo] = (),
    ) -> tuple[int, Any]:
        """``(status, parsed JSON body or None)``; raises ServiceUnreachableError when the service cannot be
        reached even after retries. Error answers are returned, not raised: the caller decides what they mean."""
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        body, content_type = (None, None) if form is None and not files else _multipart(form or {}, files)
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=body, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return response.status, _json_of(response.read())
            except urllib.error.HTTPError as exc:
                status, payload, retry_after = exc.code, _json_of(exc.read()), exc.headers.get("Retry-After")
                exc.close()
                timed_out = self.error_of(status, payload).code == "INFERENCE_TIMEOUT"
                if status not in (429, 503) or (timed_out and method == "POST") or attempt == self.retries:
                    return status, payload
                time.sleep(min(60.0, float(retry_after)) if retry_after and retry_after.isdigit() else 2.0**attempt)
            except (urllib.error.URLError, OSError) as exc:  # refused, reset, timed out
                refused = isinstance(getattr(exc, "reason", exc), ConnectionRefusedError)
                if attempt == self.retries or (method == "POST" and not refused):
                    reason = getattr(exc, "reason", exc)
                    raise ServiceUnreachableError(f"{self.url} cannot be reached: {reason}", url=self.url) from None
                time.sleep(2.0**attempt)
        raise AssertionError("unreachable")

    @staticmethod
    def error_of(status: int, payload: Any) -> _ApiError:
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict):
            return _ApiError(status, str(error.get("code", "")), str(error.get("message", "")), error.get("details"))
        return _ApiError(status, f"HTTP_{status}", f"The service answered HTTP {status}.", None)


def _json_of(data: bytes) -> Any:
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None


def _multipart(form: dict[str, str], files: Sequence[Photo]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in form.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for upload in files:
        filename = "".join("_" if c in '"\\\r\n' else c for c in upload.filename)
        kind = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{filename}"\r\n'
            f"Content-Type: {kind}\r\n\r\n"
        )
        parts += [head.encode(), upload.data, b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class _Abort(Exception):
    def __init__(self, error: FaceServiceError) -> None:
        super().__init__(error.message)
        self.error = error


class HttpEnroller:
    """Enrolment through a running service: ``POST /api/register`` per person, so the service runs every check
    itself, on its own store and models. People already there come from ``GET /api/users``.

    With ``replace``, the old users are deleted (``DELETE /api/users/{id}``) before the new registration: if
    that one is refused, the person is no longer registered (the report says so), because the API offers no
    way to put descriptors back.
    """

    def __init__(
        self,
        client: ServiceClient,
        options: EnrollOptions,
        max_image_bytes: int,
        files_per_request: int,
        bytes_per_request: int,
    ) -> None:
        self.client = client
        self.options = options
        self.max_image_bytes = max_image_bytes
        self.files_per_request = max(1, files_per_request)
        self.bytes_per_request = bytes_per_request
        self._stop = threading.Event()

    def run(self, root: Path, people: Sequence[Person], progress: Progress | None = None) -> EnrollmentResult:
        started = time.monotonic()
        result = EnrollmentResult()
        self._check_collection()
        existing = self._existing()
        todo = _plan(people, {name: len(ids) for name, ids in existing.items()}, self.options, result)
        if progress is not None:
            progress.planned(sum(len(person.photos) for person in todo))
        workers = max(1, self.options.workers)
        with ThreadPoolExecutor(workers, thread_name_prefix="enroll-http") as pool:
            try:
                for outcome in _ordered(pool, lambda p: self._enroll(root, p, existing), todo, 2 * workers):
                    _merge(result, outcome)
                    if progress is not None:
                        progress.done(len(outcome.person.photos), result)
            except (_Abort, FaceServiceError) as exc:  # the service failed or refused the key: a rerun resumes
                self._stop.set()
                error = exc.error if isinstance(exc, _Abort) else exc
                result.aborted = f"{error.code}: {error.message}"
        result.seconds = time.monotonic() - started
        return result

    def _collection_params(self) -> dict[str, str]:
        return {"collection": self.options.collection}

    def _check_collection(self) -> None:
        name = self.options.collection
        status, payload = self.client.call("GET", f"/api/collections/{urllib.parse.quote(name, safe='')}")
        if status == 200:
            return
        error = self.client.error_of(status, payload)
        if error.code == "COLLECTION_NOT_FOUND":
            raise CollectionNotFoundError(error.message, collection=name)
        raise EnrollmentError(f"{self.client.url}: {error.code}: {error.message}", status=status)

    def _existing(self) -> dict[str, list[str]]:
        existing: dict[str, list[str]] = {}
        offset = 0
        while True:
            params = {**self._collection_params(), "offset": str(offset), "limit": str(USERS_PAGE)}
            status, payload = self.client.call("GET", "/api/users", params=params)
            if status != 200:
                error = self.client.error_of(status, payload)
                raise EnrollmentError(f"GET /api/users: {error.code}: {error.message}", status=status)
            items = payload.get("items", [])
            for user in items:
                existing.setdefault(user["name"], []).append(user["id"])
            offset += len(items)
            if not items or offset >= int(payload.get("total", 0)):
                return existing

    def _chunk(self, uploads: list[Photo], limit: int) -> list[Photo]:
        """The next request's photos: at most ``limit`` and about ``bytes_per_request`` (at least one)."""
        chunk, size = [], 0
        for upload in uploads[:limit]:
            if chunk and size + len(upload.data) > self.bytes_per_request:
                break
            chunk.append(upload)
            size += len(upload.data)
        return chunk

    def _enroll(self, root: Path, person: Person, existing: dict[str, list[str]]) -> _Outcome:
        """One person: as many requests as their photos need (register, then add faces), in a worker thread."""
        outcome = _Outcome(person)
        if self._stop.is_set():
            raise _Abort(ServiceUnreachableError("The run was stopped."))
        paths = _report_paths(person)
        try:
            _check_name(person.name)
            pending = _read_uploads(root, person, self.max_image_bytes, outcome.rows)
        except FaceServiceError as exc:
            outcome.rows.extend(_failure_rows(person, exc, paths, None))
            return outcome
        previous = existing.get(person.name, []) if self.options.replace else []
        for user_id in previous:
            status, payload = self.client.call("DELETE", f"/api/users/{user_id}", params=self._collection_params())
            if status not in (204, 404):
                raise _Abort(self.client.error_of(status, payload))
        user_id: str | None = None
        limit = self.files_per_request
        last_error: _ApiError | None = None
        while pending:
            chunk = self._chunk(pending, limit)
            pending = pending[len(chunk) :]
            form = {"allow_duplicate": "true" if self.options.allow_duplicate else "false"}
            if self.options.refuse_spoofs is not None:
                form["liveness"] = "true" if self.options.refuse_spoofs else "false"
            if user_id is None:
                path = "/api/register"
                form["name"] = person.name
            else:
                path = f"/api/users/{user_id}/faces"
            status, payload = self.client.call("POST", path, params=self._collection_params(), form=form, files=chunk)
            if status in (200, 201):
                user_id = payload["user"]["id"]
                outcome.accepted = int(payload["user"]["faces"])
                for item in payload.get("rejected", []):
                    error = item.get("error", {})
                    file = paths.get(item.get("file", ""), item.get("file", ""))
                    outcome.rows.append(
                        ReportRow(person.name, file, "rejected", error.get("code", ""), error.get("message", ""))
                    )
                continue
            error = self.client.error_of(status, payload)
            retry = self._smaller_request(error, chunk, limit)
            if retry is not None:
                limit, again, refused = retry
                pending = again + pending
                if refused is not None:
                    outcome.rows.append(
                        ReportRow(
                            person.name,
                            paths.get(refused.filename, refused.filename),
                            "rejected",
                            error.code,
                            error.message,
                        )
                    )
                continue
            if status >= 500 or status in (401, 403, 429):
                raise _Abort(error)
            single = chunk[0].filename if len(chunk) == 1 else None
            if user_id is None and error.code in _PHOTO_ERRORS and pending:
                outcome.rows.extend(_failure_rows(person, error, paths, single)[:-1])  # their rows; try the rest
                last_error = error
                continue
            if user_id is None:
                outcome.rows.extend(_failure_rows(person, self._noted(error, previous), paths, single))
                return outcome
            # Registered already: the refused photos are rejected, the person stays registered.
            rows = _failure_rows(person, error, paths, single)[:-1]
            listed = {row.file for row in rows}
            for upload in chunk:
                if paths.get(upload.filename, upload.filename) not in listed:
                    rows.append(
                        ReportRow(
                            person.name,
                            paths.get(upload.filename, upload.filename),
                            "rejected",
                            error.code,
                            error.message,
                        )
                    )
            outcome.rows.extend(rows)
        if user_id is None:
            error = self._noted(last_error or NoImagesError("None of the images could be used."), previous)
            outcome.rows.append(ReportRow(person.name, "", "failed", error.code, error.message))
            return outcome
        outcome.registered, outcome.replaced = True, bool(previous)
        return outcome

    @staticmethod
    def _noted(error: FaceServiceError, previous: list[str]) -> FaceServiceError:
        """``error`` as the report shows it: over HTTP a refused replacement leaves nobody registered."""
        if not previous:
            return error
        message = f"{error.message} (the previous registration was deleted by --replace)"
        return _ApiError(error.status, error.code, message, error.details)

    @staticmethod
    def _smaller_request(
        error: _ApiError, chunk: list[Photo], limit: int
    ) -> tuple[int, list[Photo], Photo | None] | None:
        """How to send ``chunk`` again when the service refused the request's size rather than its photos:
        ``(new limit, photos to send again, the photo refused for its own size or None)``; None otherwise."""
        if error.code == "TOO_MANY_FILES":
            allowed = error.details.get("limit")
            if isinstance(allowed, int) and 0 < allowed < len(chunk):
                return allowed, chunk, None
        if error.code == "PAYLOAD_TOO_LARGE" and len(chunk) > 1:
            return max(1, len(chunk) // 2), chunk, None
        if error.code == "IMAGE_TOO_LARGE":
            file = error.details.get("file")
            refused = next((u for u in chunk if u.filename == file), None)
            if refused is not None:
                return limit, [u for u in chunk if u is not refused], refused
        return None
