"""Send every class of bad input to the service and tabulate the answers (docs/reliability.md).

    python -m tools.bad_inputs_table                       # in-process app with the models loaded, temp store
    python -m tools.bad_inputs_table --out reports/bad_inputs.md
    python -m tools.bad_inputs_table --url http://127.0.0.1:8000 --api-key KEY   # a running server (admin key)

Each row is one input class sent to one endpoint, with the status and error code it got and those expected;
the exit status is 1 when any row differs from its expectation or answers a 5xx. ``tests/test_fuzz.py``
runs the same cases against the session app.

The cases are data: ``CASES`` holds one ``Case`` per row, each naming its request declaratively (a ``Send``:
method, url, which input goes in which file field, form fields, or a raw body with its headers); the payloads
are named builders in ``INPUTS``, made on first use. ``Case.request()`` turns a case into httpx keyword arguments.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

JPEG = "image/jpeg"
USER = "{user_id}"  # replaced by a registered user's id when the case runs


# --- inputs ----------------------------------------------------------------------------------------------


def _encode(image: Any, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@cache
def astronaut_jpeg() -> bytes:
    import skimage.data
    from PIL import Image

    return _encode(Image.fromarray(skimage.data.astronaut()), "JPEG", quality=92)


@cache
def exif_rotated_jpeg(with_tag: bool = True) -> bytes:
    """The astronaut stored lying on its side, with (or without) the EXIF tag that says to turn it upright.

    The detector finds a face either way; tests/services/test_imaging.py checks the pixels are turned upright.
    """
    import skimage.data
    from PIL import Image

    sideways = Image.fromarray(np.ascontiguousarray(np.rot90(skimage.data.astronaut())))  # 90° counter-clockwise
    if not with_tag:
        return _encode(sideways, "JPEG", quality=92)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: turn 90° clockwise to display
    return _encode(sideways, "JPEG", quality=92, exif=exif)


@cache
def png_of_astronaut() -> bytes:
    import skimage.data
    from PIL import Image

    return _encode(Image.fromarray(skimage.data.astronaut()), "PNG")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


@cache
def png_bomb(side: int = 20_000) -> bytes:
    """A valid 1-bit PNG of side x side black pixels: ~50 kB that would decode to side² RGB pixels (1.2 GB)."""
    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # 1-bit greyscale, no interlace
    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    compressed = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", compressed) + _png_chunk(b"IEND", b"")
    )


@cache
def huge_jpeg(side: int = 8000) -> bytes:
    from PIL import Image

    return _encode(Image.new("RGB", (side, side), (128, 110, 90)), "JPEG", quality=70)


@cache
def other_format(fmt: str) -> bytes:
    from PIL import Image

    return _encode(Image.new("RGB", (64, 64), (10, 200, 30)), fmt)


def _streamed(size: int) -> Iterator[bytes]:
    chunk = b"--x\r\n" + bytes((1 << 20) - 5)
    sent = 0
    while sent < size:
        yield chunk
        sent += len(chunk)


MIB = 1024 * 1024

# Every payload a case sends, by name. Each is built on first use and kept (the big ones: the 20,000 px PNG
# bomb, the 8000 px JPEG, the padded 10 MB and 11 MB photos), except the streamed body, which sending uses up,
# so it is a fresh generator each time (it makes its 21 MB a chunk at a time).
_BYTES: dict[str, Callable[[], bytes]] = {
    "astronaut_jpeg": astronaut_jpeg,
    "truncated_half": lambda: astronaut_jpeg()[: len(astronaut_jpeg()) // 2],
    "truncated_200_bytes": lambda: astronaut_jpeg()[:200],
    "empty": lambda: b"",
    "random_bytes": lambda: bytes(range(256)) * 8,
    "gif": lambda: other_format("GIF"),
    "tiff": lambda: other_format("TIFF"),
    "csv": lambda: b"name,face\nada,1\n",
    "pdf": lambda: b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
    "astronaut_png": png_of_astronaut,
    "exif_rotated_jpeg": exif_rotated_jpeg,
    "png_bomb_20000": png_bomb,
    "jpeg_8000": huge_jpeg,
    "jpeg_6000": lambda: huge_jpeg(6000),
    "jpeg_plus_10_mib": lambda: astronaut_jpeg() + bytes(10 * MIB),
    "jpeg_plus_11_mib": lambda: astronaut_jpeg() + bytes(11 * MIB),
    "garbage": lambda: b"garbage",
    "urlencoded_name": lambda: b"name=x",
    "json_lone_surrogate": lambda: b'{"name": "a\\ud800b"}',
}
INPUTS: dict[str, Callable[[], bytes | Iterator[bytes]]] = {
    **{name: cache(build) for name, build in _BYTES.items()},
    "chunked_21_mib": lambda: _streamed(21 * MIB),
}


# --- the cases -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """One file part: the input named ``input`` (a key of INPUTS) in form field ``field``."""

    field: str
    input: str
    filename: str = "photo.jpg"
    media_type: str = JPEG


@dataclass(frozen=True)
class Send:
    """A request, declaratively; ``url`` may hold ``{user_id}``. ``form=None`` sends no form fields at all."""

    method: str
    url: str
    files: tuple[Upload, ...] = ()
    form: Mapping[str, str] | None = None
    json: Any = None
    body: str | None = None  # a raw body: a key of INPUTS
    headers: Mapping[str, str] | None = None


def request_kwargs(send: Send) -> dict[str, Any]:
    """The keyword arguments for httpx.Client.request (the url's ``{user_id}`` is left for run_case)."""
    kwargs: dict[str, Any] = {"method": send.method, "url": send.url}
    if send.files:
        kwargs["files"] = [(u.field, (u.filename, INPUTS[u.input](), u.media_type)) for u in send.files]
    if send.form is not None:
        kwargs["data"] = dict(send.form)
    if send.json is not None:
        kwargs["json"] = send.json
    if send.body is not None:
        kwargs["content"] = INPUTS[send.body]()
    if send.headers:
        kwargs["headers"] = dict(send.headers)
    return kwargs


@dataclass(frozen=True)
class Case:
    kind: str  # the input class
    endpoint: str
    send: Send
    expected: tuple[int, str | None]  # status, error code (None: success)

    def request(self) -> dict[str, Any]:
        """Keyword arguments for httpx.Client.request."""
        return request_kwargs(self.send)

    @property
    def optional_model(self) -> bool:
        """Emotion and anti-spoofing answer 503 MODEL_UNAVAILABLE, before reading the file, when their model is off."""
        return self.endpoint in ("POST /api/emotion", "POST /api/anti-spoof")


# Shorthands for the common request shapes.


def _numbered(inputs: tuple[str, ...]) -> tuple[Upload, ...]:
    return tuple(Upload("files", name, f"f{i}.jpg") for i, name in enumerate(inputs))


def verify(payload: str, filename: str = "photo.jpg", media_type: str = JPEG, **form: str) -> Send:
    return Send("POST", "/api/verify", files=(Upload("file", payload, filename, media_type),), form=form)


def register(*inputs: str, name: str = "Bad Input", **form: str) -> Send:
    return Send(
        "POST", "/api/register", files=_numbered(inputs), form={"name": name, "allow_duplicate": "true", **form}
    )


def compare(first: str, second: Upload, **form: str) -> Send:
    return Send("POST", "/api/compare", files=(Upload("image1", first), second), form=form or None)


def upload(url: str, payload: str) -> Send:
    return Send("POST", url, files=(Upload("file", payload),))


PHOTO = "astronaut_jpeg"
VERIFY, REGISTER, COMPARE = "POST /api/verify", "POST /api/register", "POST /api/compare"
RENAME = "PATCH /api/users/{id}"
INVALID_IMAGE, UNSUPPORTED = (422, "INVALID_IMAGE"), (415, "UNSUPPORTED_MEDIA_TYPE")
TOO_LARGE, PAYLOAD_TOO_LARGE = (413, "IMAGE_TOO_LARGE"), (413, "PAYLOAD_TOO_LARGE")
INVALID, BAD_REQUEST, TOO_MANY_FILES = (422, "VALIDATION_ERROR"), (400, "BAD_REQUEST"), (422, "TOO_MANY_FILES")
OK, CREATED = (200, None), (201, None)

CASES: tuple[Case, ...] = (
    # Broken image files.
    Case("truncated JPEG (first half)", VERIFY, verify("truncated_half"), INVALID_IMAGE),
    Case("truncated JPEG (first 200 bytes)", REGISTER, register("truncated_200_bytes"), INVALID_IMAGE),
    Case("zero-byte file", VERIFY, verify("empty"), INVALID_IMAGE),
    Case("zero-byte file", REGISTER, register("empty"), INVALID_IMAGE),
    Case("zero-byte file", "POST /api/emotion", upload("/api/emotion", "empty"), INVALID_IMAGE),
    Case("random bytes", "POST /api/anti-spoof", upload("/api/anti-spoof", "random_bytes"), UNSUPPORTED),
    # Wrong types: judged by content, never by name or declared type.
    Case("wrong type: GIF", VERIFY, verify("gif", "a.gif", "image/gif"), UNSUPPORTED),
    Case("wrong type: TIFF named .jpg", VERIFY, verify("tiff"), UNSUPPORTED),
    Case("wrong type: text/CSV", COMPARE, compare(PHOTO, Upload("image2", "csv", "a.csv", "text/csv")), UNSUPPORTED),
    Case("wrong type: PDF", REGISTER, register("pdf"), UNSUPPORTED),
    Case("PNG sent as image/jpeg named .jpg (accepted by content)", VERIFY, verify("astronaut_png"), OK),
    Case("EXIF orientation 6 (stored sideways)", VERIFY, verify("exif_rotated_jpeg"), OK),
    # Size limits.
    Case("decompression bomb: 20000x20000 PNG (~50 kB)", VERIFY, verify("png_bomb_20000"), TOO_LARGE),
    Case("decompression bomb: 20000x20000 PNG (~50 kB)", REGISTER, register("png_bomb_20000"), TOO_LARGE),
    Case("8000x8000 JPEG (64 MP > 40 MP)", VERIFY, verify("jpeg_8000"), TOO_LARGE),
    Case("8000x8000 JPEG (64 MP > 40 MP)", "POST /api/emotion", upload("/api/emotion", "jpeg_8000"), TOO_LARGE),
    Case("8000x8000 JPEG (64 MP > 40 MP)", "POST /api/anti-spoof", upload("/api/anti-spoof", "jpeg_8000"), TOO_LARGE),
    Case("6000x6000 JPEG (36 MP: decoded)", VERIFY, verify("jpeg_6000"), (422, "NO_FACE")),
    Case("file over 10 MB (image byte limit)", VERIFY, verify("jpeg_plus_10_mib"), TOO_LARGE),
    Case("body over 20 MB (declared length)", REGISTER, register(*["jpeg_plus_11_mib"] * 2), PAYLOAD_TOO_LARGE),
    Case(
        "body over 20 MB (chunked, no length)",
        VERIFY,
        Send("POST", "/api/verify", body="chunked_21_mib", headers={"content-type": "multipart/form-data; boundary=x"}),
        PAYLOAD_TOO_LARGE,
    ),
    Case("50 files in one registration", REGISTER, register(*[PHOTO] * 50), TOO_MANY_FILES),
    Case(
        "50 files added to a user",
        "POST /api/users/{id}/faces",
        Send("POST", f"/api/users/{USER}/faces", files=_numbered((PHOTO,) * 50)),
        TOO_MANY_FILES,
    ),
    Case("huge form field: 2 MB name", REGISTER, register(PHOTO, name="x" * (2 << 20)), BAD_REQUEST),
    Case(
        "1,001 form fields",
        VERIFY,
        Send("POST", "/api/verify", files=(Upload("file", PHOTO),), form={f"f{i}": "1" for i in range(1001)}),
        BAD_REQUEST,
    ),
    # Names.
    Case("unicode name (accents, CJK, RTL, emoji)", REGISTER, register(PHOTO, name="Zoë 测试 مرحبا 🙂"), CREATED),
    Case("10 kB name", REGISTER, register(PHOTO, name="é" * 5000), INVALID),
    Case("10 kB name", RENAME, Send("PATCH", f"/api/users/{USER}", json={"name": "n" * 10_000}), INVALID),
    Case("name with NUL and control characters", REGISTER, register(PHOTO, name="a\x00b\x1b[31mc\u202e"), CREATED),
    Case(
        "10 kB file name",
        REGISTER,
        Send(
            "POST",
            "/api/register",
            files=(Upload("files", PHOTO, "n" * 10_000 + ".jpg"),),
            form={"name": "Long file name", "allow_duplicate": "true"},
        ),
        BAD_REQUEST,  # the multipart parser's limit on a part's headers
    ),
    Case("empty name", REGISTER, register(PHOTO, name=""), INVALID),
    Case(
        "lone surrogate in a JSON name",
        RENAME,
        Send("PATCH", f"/api/users/{USER}", body="json_lone_surrogate", headers={"content-type": "application/json"}),
        INVALID,
    ),
    Case("10 kB user id", "GET /api/users/{id}", Send("GET", "/api/users/" + "a" * 10_000), INVALID),
    # Numbers out of range.
    *(
        Case(f"top_k={value}", VERIFY, verify(PHOTO, top_k=value), INVALID)
        for value in ("-1", "0", "101", "1000000000", "1e100", "many")
    ),
    *(
        Case(f"threshold={value}", VERIFY, verify(PHOTO, threshold=value), INVALID)
        for value in ("-0.1", "1.5", "nan", "inf", "1e309")
    ),
    Case(
        "threshold=2",
        COMPARE,
        compare(PHOTO, Upload("image2", PHOTO), threshold="2"),
        INVALID,
    ),
    Case("offset=-1, limit=0", "GET /api/users", Send("GET", "/api/users?offset=-1&limit=0"), INVALID),
    # Malformed requests.
    Case("no file part", VERIFY, Send("POST", "/api/verify"), INVALID),
    Case(
        "JSON body instead of multipart",
        REGISTER,
        Send("POST", "/api/register", json={"name": "x", "files": ["aGk="]}),
        INVALID,
    ),
    Case(
        "multipart without boundary",
        VERIFY,
        Send("POST", "/api/verify", body="garbage", headers={"content-type": "multipart/form-data"}),
        BAD_REQUEST,
    ),
    Case(
        "rename with a non-JSON body",
        RENAME,
        Send(
            "PATCH",
            f"/api/users/{USER}",
            body="urlencoded_name",
            headers={"content-type": "application/x-www-form-urlencoded"},
        ),
        INVALID,
    ),
)


def cases() -> list[Case]:
    """Every input class (the inputs are built when a case's request is made)."""
    return list(CASES)


# --- running ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    case: Case
    status: int
    code: str | None
    seconds: float

    @property
    def model_off(self) -> bool:
        return self.case.optional_model and (self.status, self.code) == (503, "MODEL_UNAVAILABLE")

    @property
    def ok(self) -> bool:
        return (self.status, self.code) == self.case.expected or self.model_off


def run_case(client: Any, case: Case, user_id: str, headers: dict[str, str] | None = None) -> Row:
    request = case.request()
    request["url"] = request["url"].replace(USER, user_id)
    if headers:
        request["headers"] = {**request.get("headers", {}), **headers}
    started = time.monotonic()
    response = client.request(**request)
    seconds = time.monotonic() - started
    code = None
    if response.status_code >= 400:
        try:
            code = response.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = f"(no envelope: {response.text[:60]!r})"
    return Row(case, response.status_code, code, seconds)


def registered_user(client: Any, headers: dict[str, str] | None = None) -> str:
    """A user for the cases that need one (rename, add faces)."""
    response = client.post(
        "/api/register",
        data={"name": "Bad-input target", "allow_duplicate": "true"},
        files=[("files", ("a.jpg", astronaut_jpeg(), JPEG))],
        headers=headers or {},
    )
    if response.status_code != 201:
        raise SystemExit(f"could not register the target user: {response.status_code} {response.text[:300]}")
    return response.json()["user"]["id"]


def markdown(rows: list[Row]) -> str:
    lines = [
        "| input class | endpoint | status | error code | as expected |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        code = f"`{row.code}`" if row.code else "—"
        expected = f"{row.case.expected[0]} {row.case.expected[1] or ''}".strip()
        mark = "yes" if row.ok else f"**no** (expected {expected})"
        if row.model_off:
            mark = f"model off here (expected {expected} with it)"
        lines.append(f"| {row.case.kind} | `{row.case.endpoint}` | {row.status} | {code} | {mark} |")
    return "\n".join(lines) + "\n"


def in_process_client() -> Iterator[Any]:
    """A TestClient of a fresh app (temporary store, no keys, loopback caller) once its models are loaded."""
    from fastapi.testclient import TestClient

    from api.config import Settings
    from api.main import create_app

    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(
            store_path=Path(folder) / "face_database.npz",
            audit_log_path=Path(folder) / "audit.log",
            api_keys=[],
            rate_limit="1000000/minute",
            store_encryption_key=None,
        )
        with TestClient(create_app(settings), client=("127.0.0.1", 50000)) as client:
            deadline = time.monotonic() + 300
            while (ready := client.get("/health/ready")).status_code != 200:
                if time.monotonic() > deadline or ready.json().get("status") == "failed":
                    raise SystemExit(f"the models did not load: {ready.json()}")
                time.sleep(0.2)
            yield client


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bad_inputs_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: an in-process app with a temporary store)")
    parser.add_argument("--api-key", help="an admin key for --url, when the server has keys")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    headers = {"X-API-Key": args.api_key} if args.api_key else None
    if args.url:
        import httpx

        def clients() -> Iterator[Any]:
            with httpx.Client(base_url=args.url, timeout=300) as client:
                yield client

        source = clients()
    else:
        source = in_process_client()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    client = next(source)
    try:
        user_id = registered_user(client, headers)
        rows = [run_case(client, case, user_id, headers) for case in cases()]
    finally:
        source.close()

    table = markdown(rows)
    print(table)
    bad = [r for r in rows if not r.ok]
    fivexx = sum(r.status >= 500 and not r.model_off for r in rows)
    print(f"{len(rows)} cases, {fivexx} 5xx (besides a model that is off), {len(bad)} not as expected", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table, encoding="utf-8")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                [
                    {
                        "class": r.case.kind,
                        "endpoint": r.case.endpoint,
                        "status": r.status,
                        "code": r.code,
                        "expected": list(r.case.expected),
                        "seconds": round(r.seconds, 3),
                    }
                    for r in rows
                ],
                indent=1,
                ensure_ascii=False,
            ),
            encoding="utf-8",
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
