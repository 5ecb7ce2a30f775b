"""Send every class of bad input to the service and tabulate the answers (docs/reliability.md).

    python -m tools.bad_inputs_table                       # in-process app with the models loaded, temp store
    python -m tools.bad_inputs_table --out reports/bad_inputs.md
    python -m tools.bad_inputs_table --url http://127.0.0.1:8000 --api-key KEY   # a running server (admin key)

Each row is one input class sent to one endpoint, with the status and error code it got and those expected;
the exit status is 1 when any row differs from its expectation or answers a 5xx. ``tests/test_fuzz.py``
runs the same cases against the session app.
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
from collections.abc import Callable, Iterator
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


# --- the cases -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    kind: str  # the input class
    endpoint: str
    request: Callable[[], dict[str, Any]]  # keyword arguments for httpx.Client.request
    expected: tuple[int, str | None]  # status, error code (None: success)

    @property
    def optional_model(self) -> bool:
        """Emotion and anti-spoofing answer 503 MODEL_UNAVAILABLE, before reading the file, when their model is off."""
        return self.endpoint in ("POST /api/emotion", "POST /api/anti-spoof")


def _files(field: str, data: bytes, name: str = "photo.jpg", media_type: str = JPEG) -> list[tuple]:
    return [(field, (name, data, media_type))]


def verify_with(data: bytes, name: str = "photo.jpg", media_type: str = JPEG, **form: str) -> Callable[[], dict]:
    return lambda: {
        "method": "POST",
        "url": "/api/verify",
        "files": _files("file", data, name, media_type),
        "data": form,
    }


def register_with(data: bytes | list[bytes], name: str = "Bad Input", **form: str) -> Callable[[], dict]:
    datas = data if isinstance(data, list) else [data]
    return lambda: {
        "method": "POST",
        "url": "/api/register",
        "data": {"name": name, "allow_duplicate": "true", **form},
        "files": [("files", (f"f{i}.jpg", d, JPEG)) for i, d in enumerate(datas)],
    }


def _streamed(size: int) -> Iterator[bytes]:
    chunk = b"--x\r\n" + bytes((1 << 20) - 5)
    sent = 0
    while sent < size:
        yield chunk
        sent += len(chunk)


def cases() -> list[Case]:
    """Every input class, lazily built (the big inputs are made when a case runs)."""
    photo = astronaut_jpeg
    c: list[Case] = []

    def add(kind: str, endpoint: str, request: Callable[[], dict], status: int, code: str | None) -> None:
        c.append(Case(kind, endpoint, request, (status, code)))

    # Broken image files.
    add(
        "truncated JPEG (first half)",
        "POST /api/verify",
        lambda: verify_with(photo()[: len(photo()) // 2])(),
        422,
        "INVALID_IMAGE",
    )
    add(
        "truncated JPEG (first 200 bytes)",
        "POST /api/register",
        lambda: register_with(photo()[:200])(),
        422,
        "INVALID_IMAGE",
    )
    add("zero-byte file", "POST /api/verify", verify_with(b""), 422, "INVALID_IMAGE")
    add("zero-byte file", "POST /api/register", register_with(b""), 422, "INVALID_IMAGE")
    add(
        "zero-byte file",
        "POST /api/emotion",
        lambda: {"method": "POST", "url": "/api/emotion", "files": _files("file", b"")},
        422,
        "INVALID_IMAGE",
    )
    add(
        "random bytes",
        "POST /api/anti-spoof",
        lambda: {"method": "POST", "url": "/api/anti-spoof", "files": _files("file", bytes(range(256)) * 8)},
        415,
        "UNSUPPORTED_MEDIA_TYPE",
    )
    # Wrong types: judged by content, never by name or declared type.
    add(
        "wrong type: GIF",
        "POST /api/verify",
        lambda: verify_with(other_format("GIF"), "a.gif", "image/gif")(),
        415,
        "UNSUPPORTED_MEDIA_TYPE",
    )
    add(
        "wrong type: TIFF named .jpg",
        "POST /api/verify",
        lambda: verify_with(other_format("TIFF"))(),
        415,
        "UNSUPPORTED_MEDIA_TYPE",
    )
    add(
        "wrong type: text/CSV",
        "POST /api/compare",
        lambda: {
            "method": "POST",
            "url": "/api/compare",
            "files": _files("image1", photo()) + _files("image2", b"name,face\nada,1\n", "a.csv", "text/csv"),
        },
        415,
        "UNSUPPORTED_MEDIA_TYPE",
    )
    add(
        "wrong type: PDF",
        "POST /api/register",
        register_with(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n"),
        415,
        "UNSUPPORTED_MEDIA_TYPE",
    )
    add(
        "PNG sent as image/jpeg named .jpg (accepted by content)",
        "POST /api/verify",
        lambda: verify_with(png_of_astronaut())(),
        200,
        None,
    )
    add(
        "EXIF orientation 6 (stored sideways)",
        "POST /api/verify",
        lambda: verify_with(exif_rotated_jpeg(True))(),
        200,
        None,
    )
    # Size limits.
    add(
        "decompression bomb: 20000x20000 PNG (~50 kB)",
        "POST /api/verify",
        lambda: verify_with(png_bomb())(),
        413,
        "IMAGE_TOO_LARGE",
    )
    add(
        "decompression bomb: 20000x20000 PNG (~50 kB)",
        "POST /api/register",
        lambda: register_with(png_bomb())(),
        413,
        "IMAGE_TOO_LARGE",
    )
    add(
        "8000x8000 JPEG (64 MP > 40 MP)", "POST /api/verify", lambda: verify_with(huge_jpeg())(), 413, "IMAGE_TOO_LARGE"
    )
    add(
        "8000x8000 JPEG (64 MP > 40 MP)",
        "POST /api/emotion",
        lambda: {"method": "POST", "url": "/api/emotion", "files": _files("file", huge_jpeg())},
        413,
        "IMAGE_TOO_LARGE",
    )
    add(
        "8000x8000 JPEG (64 MP > 40 MP)",
        "POST /api/anti-spoof",
        lambda: {"method": "POST", "url": "/api/anti-spoof", "files": _files("file", huge_jpeg())},
        413,
        "IMAGE_TOO_LARGE",
    )
    add("6000x6000 JPEG (36 MP: decoded)", "POST /api/verify", lambda: verify_with(huge_jpeg(6000))(), 422, "NO_FACE")
    add(
        "file over 10 MB (image byte limit)",
        "POST /api/verify",
        lambda: verify_with(photo() + bytes(10 * 1024 * 1024))(),
        413,
        "IMAGE_TOO_LARGE",
    )
    add(
        "body over 20 MB (declared length)",
        "POST /api/register",
        lambda: register_with([photo() + bytes(11 * 1024 * 1024)] * 2)(),
        413,
        "PAYLOAD_TOO_LARGE",
    )
    add(
        "body over 20 MB (chunked, no length)",
        "POST /api/verify",
        lambda: {
            "method": "POST",
            "url": "/api/verify",
            "content": _streamed(21 * 1024 * 1024),
            "headers": {"content-type": "multipart/form-data; boundary=x"},
        },
        413,
        "PAYLOAD_TOO_LARGE",
    )
    add(
        "50 files in one registration",
        "POST /api/register",
        lambda: register_with([photo()] * 50)(),
        422,
        "TOO_MANY_FILES",
    )
    add(
        "50 files added to a user",
        "POST /api/users/{id}/faces",
        lambda: {
            "method": "POST",
            "url": f"/api/users/{USER}/faces",
            "files": [("files", (f"f{i}.jpg", photo(), JPEG)) for i in range(50)],
        },
        422,
        "TOO_MANY_FILES",
    )
    add(
        "huge form field: 2 MB name",
        "POST /api/register",
        lambda: register_with(photo(), name="x" * (2 << 20))(),
        400,
        "BAD_REQUEST",
    )
    add(
        "1,001 form fields",
        "POST /api/verify",
        lambda: {
            "method": "POST",
            "url": "/api/verify",
            "files": _files("file", photo()),
            "data": {f"f{i}": "1" for i in range(1001)},
        },
        400,
        "BAD_REQUEST",
    )
    # Names.
    add(
        "unicode name (accents, CJK, RTL, emoji)",
        "POST /api/register",
        lambda: register_with(photo(), name="Zoë 测试 مرحبا 🙂")(),
        201,
        None,
    )
    add("10 kB name", "POST /api/register", lambda: register_with(photo(), name="é" * 5000)(), 422, "VALIDATION_ERROR")
    add(
        "10 kB name",
        "PATCH /api/users/{id}",
        lambda: {"method": "PATCH", "url": f"/api/users/{USER}", "json": {"name": "n" * 10_000}},
        422,
        "VALIDATION_ERROR",
    )
    add(
        "name with NUL and control characters",
        "POST /api/register",
        lambda: register_with(photo(), name="a\x00b\x1b[31mc\u202e")(),
        201,
        None,
    )
    add(
        "10 kB file name",
        "POST /api/register",
        lambda: {
            "method": "POST",
            "url": "/api/register",
            "data": {"name": "Long file name", "allow_duplicate": "true"},
            "files": [("files", ("n" * 10_000 + ".jpg", photo(), JPEG))],
        },
        400,  # the multipart parser's limit on a part's headers
        "BAD_REQUEST",
    )
    add("empty name", "POST /api/register", lambda: register_with(photo(), name="")(), 422, "VALIDATION_ERROR")
    add(
        "lone surrogate in a JSON name",
        "PATCH /api/users/{id}",
        lambda: {
            "method": "PATCH",
            "url": f"/api/users/{USER}",
            "content": b'{"name": "a\\ud800b"}',
            "headers": {"content-type": "application/json"},
        },
        422,
        "VALIDATION_ERROR",
    )
    add(
        "10 kB user id",
        "GET /api/users/{id}",
        lambda: {"method": "GET", "url": "/api/users/" + "a" * 10_000},
        422,
        "VALIDATION_ERROR",
    )
    # Numbers out of range.
    for value in ("-1", "0", "101", "1000000000", "1e100", "many"):
        add(
            f"top_k={value}",
            "POST /api/verify",
            lambda v=value: verify_with(photo(), top_k=v)(),
            422,
            "VALIDATION_ERROR",
        )
    for value in ("-0.1", "1.5", "nan", "inf", "1e309"):
        add(
            f"threshold={value}",
            "POST /api/verify",
            lambda v=value: verify_with(photo(), threshold=v)(),
            422,
            "VALIDATION_ERROR",
        )
    add(
        "threshold=2",
        "POST /api/compare",
        lambda: {
            "method": "POST",
            "url": "/api/compare",
            "data": {"threshold": "2"},
            "files": _files("image1", photo()) + _files("image2", photo()),
        },
        422,
        "VALIDATION_ERROR",
    )
    add(
        "offset=-1, limit=0",
        "GET /api/users",
        lambda: {"method": "GET", "url": "/api/users?offset=-1&limit=0"},
        422,
        "VALIDATION_ERROR",
    )
    # Malformed requests.
    add("no file part", "POST /api/verify", lambda: {"method": "POST", "url": "/api/verify"}, 422, "VALIDATION_ERROR")
    add(
        "JSON body instead of multipart",
        "POST /api/register",
        lambda: {"method": "POST", "url": "/api/register", "json": {"name": "x", "files": ["aGk="]}},
        422,
        "VALIDATION_ERROR",
    )
    add(
        "multipart without boundary",
        "POST /api/verify",
        lambda: {
            "method": "POST",
            "url": "/api/verify",
            "content": b"garbage",
            "headers": {"content-type": "multipart/form-data"},
        },
        400,
        "BAD_REQUEST",
    )
    add(
        "rename with a non-JSON body",
        "PATCH /api/users/{id}",
        lambda: {
            "method": "PATCH",
            "url": f"/api/users/{USER}",
            "content": b"name=x",
            "headers": {"content-type": "application/x-www-form-urlencoded"},
        },
        422,
        "VALIDATION_ERROR",
    )
    return c


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
