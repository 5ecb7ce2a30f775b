"""decode_image: every kind of bad upload gives a typed error; every accepted image an upright (H, W, 3) uint8."""

from __future__ import annotations

import io
import math
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import api  # noqa: F401  (thread pools pinned before numpy, OpenCV or TensorFlow load)
from api.errors import (
    FaceServiceError,
    ImageTooLargeError,
    InvalidImageError,
    UnsupportedMediaTypeError,
)
from api.services.imaging import _draft_reduction, decode_image, decode_reduced, sniff_format


@pytest.fixture(scope="module")
def photo(astronaut) -> Image.Image:
    """A non-square RGB photo (so a rotation shows in the shape): the astronaut's upper 320x256 part."""
    return Image.fromarray(astronaut[:256, 96:416])


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _check_rgb(array: np.ndarray, shape: tuple[int, int]) -> None:
    assert isinstance(array, np.ndarray)
    assert array.shape == (*shape, 3) and array.dtype == np.uint8 and array.flags.c_contiguous


# --- bad input -------------------------------------------------------------------------------------------------


def test_empty_bytes() -> None:
    with pytest.raises(InvalidImageError):
        decode_image(b"")


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes(seed: int) -> None:
    data = random.Random(seed).randbytes(1000 * (seed + 1))
    with pytest.raises(UnsupportedMediaTypeError) as info:
        decode_image(data)
    assert info.value.status == 415


@pytest.mark.parametrize(
    "text", [b"hello, world\n", b"<html><body>not an image</body></html>", b'{"image": "base64..."}', b"test\n"]
)
def test_text_file(text: bytes) -> None:
    with pytest.raises(UnsupportedMediaTypeError):
        decode_image(text)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
@pytest.mark.parametrize("keep", [12, 30, 0.02, 0.5, 0.95])
def test_truncated_file(photo: Image.Image, fmt: str, keep: float) -> None:
    """A cut-off upload is a corrupt image (422), not an unsupported type, once its signature is there."""
    data = _encode(photo, fmt)
    cut = data[:keep] if isinstance(keep, int) else data[: int(len(data) * keep)]
    with pytest.raises((InvalidImageError, UnsupportedMediaTypeError)) as info:
        decode_image(cut)
    if fmt != "BMP":  # BMP's 2-byte "BM" is too weak a signature to tell a broken BMP from other data
        assert isinstance(info.value, InvalidImageError)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "ICO", "PPM", "TGA"])
def test_unsupported_formats(photo: Image.Image, fmt: str) -> None:
    with pytest.raises(UnsupportedMediaTypeError) as info:
        decode_image(_encode(photo.resize((128, 100)), fmt))
    assert info.value.status == 415


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, followed by a few bytes of pixel data only."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(1000))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def test_decompression_bomb_header_is_refused_before_decoding() -> None:
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(_png_header_only(100_000, 100_000))
    assert info.value.status == 413
    assert info.value.details == {"width": 100_000, "height": 100_000}


def test_real_image_over_a_low_pixel_limit(photo: Image.Image) -> None:
    data = _encode(photo, "PNG")
    with pytest.raises(ImageTooLargeError):
        decode_image(data, max_pixels=320 * 256 - 1)
    _check_rgb(decode_image(data, max_pixels=320 * 256), (256, 320))


def test_highly_compressible_bomb_is_refused() -> None:
    """A complete, valid 8000x8000 grey PNG of zeros: ~60 kB that would decode to 64 MP (192 MB as RGB)."""
    side = 8000
    compressor = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + one row of black pixels
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    assert len(data) < 200_000
    with pytest.raises(ImageTooLargeError):
        decode_image(data)


def test_corrupted_pixel_data(photo: Image.Image) -> None:
    data = bytearray(_encode(photo, "PNG"))
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # breaks the IDAT CRC / zlib stream
    with pytest.raises(InvalidImageError):
        decode_image(bytes(data))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_mutated_files_never_raise_untyped_errors(photo: Image.Image, fmt: str) -> None:
    data = _encode(photo.resize((96, 80)), fmt)
    rng = random.Random(fmt)
    for _ in range(60):
        mutated = bytearray(data)
        for _ in range(rng.randrange(1, 8)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        try:
            array = decode_image(bytes(mutated))
        except FaceServiceError:
            continue
        assert array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8


# --- pixel formats ------------------------------------------------------------------------------------------


def test_rgb_png_is_lossless(photo: Image.Image) -> None:
    np.testing.assert_array_equal(decode_image(_encode(photo, "PNG")), np.asarray(photo))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
def test_accepted_formats(photo: Image.Image, fmt: str) -> None:
    data = _encode(photo, fmt)
    assert sniff_format(data) == fmt
    array = decode_image(data)
    _check_rgb(array, (256, 320))
    assert np.abs(array.astype(int) - np.asarray(photo, int)).mean() < 4  # JPEG/WebP are lossy


def test_grey(photo: Image.Image) -> None:
    grey = photo.convert("L")
    array = decode_image(_encode(grey, "PNG"))
    _check_rgb(array, (256, 320))
    for channel in range(3):
        np.testing.assert_array_equal(array[..., channel], np.asarray(grey))


def test_rgba_transparent_pixels_become_white(photo: Image.Image) -> None:
    rgba = photo.convert("RGBA")
    alpha = np.full((256, 320), 255, np.uint8)
    alpha[:, :100] = 0
    rgba.putalpha(Image.fromarray(alpha))
    array = decode_image(_encode(rgba, "PNG"))
    _check_rgb(array, (256, 320))
    assert (array[:, :100] == 255).all()
    np.testing.assert_array_equal(array[:, 100:], np.asarray(photo)[:, 100:])


def test_palette(photo: Image.Image) -> None:
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    array = decode_image(_encode(palette, "PNG"))
    _check_rgb(array, (256, 320))
    np.testing.assert_array_equal(array, np.asarray(palette.convert("RGB")))


def test_palette_with_transparency(photo: Image.Image) -> None:
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    _check_rgb(decode_image(_encode(palette, "PNG", transparency=0)), (256, 320))


def test_sixteen_bit_grey_png_keeps_its_brightness(photo: Image.Image) -> None:
    """A 16-bit export of an 8-bit picture (value * 257) decodes to the 8-bit picture, dark or not."""
    grey = np.asarray(photo.convert("L")) // 4  # a dark picture: 0..63
    data = _encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode.startswith("I")
    array = decode_image(data)
    _check_rgb(array, (256, 320))
    np.testing.assert_array_equal(array[..., 0], grey)


def test_one_bit_and_cmyk(photo: Image.Image) -> None:
    _check_rgb(decode_image(_encode(photo.convert("1"), "PNG")), (256, 320))
    _check_rgb(decode_image(_encode(photo.convert("CMYK"), "JPEG")), (256, 320))


def test_mpo_jpeg_from_a_phone_is_accepted(photo: Image.Image) -> None:
    """JPEGs with a multi-picture (MPF) segment, as many phone cameras write, open in PIL as 'MPO'."""
    data = _encode(photo, "MPO", save_all=True, append_images=[photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    assert sniff_format(data) == "MPO"
    array = decode_image(data)
    _check_rgb(array, (256, 320))
    assert np.abs(array.astype(int) - np.asarray(photo, int)).mean() < 4  # the first picture


def test_huge_jpeg_is_decoded_at_full_size() -> None:
    """Boxes are reported in the uploaded image's pixels, so large photos are never decoded at reduced scale."""
    side = 4600
    data = _encode(Image.new("RGB", (side, side // 2), (90, 120, 150)), "JPEG", quality=50)
    array = decode_image(data)
    assert array.shape == (side // 2, side, 3)
    assert np.abs(array.astype(int) - [90, 120, 150]).max() <= 3


# --- EXIF orientation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "stored"),
    [
        (6, Image.Transpose.ROTATE_90),  # displayed after a 90 degree clockwise turn: stored turned CCW
        (8, Image.Transpose.ROTATE_270),
        (3, Image.Transpose.ROTATE_180),
        (2, Image.Transpose.FLIP_LEFT_RIGHT),
    ],
)
def test_exif_orientation_is_applied(photo: Image.Image, orientation: int, stored: Image.Transpose) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(photo.transpose(stored), "JPEG", quality=95, exif=exif.tobytes())
    upright = decode_image(data)
    _check_rgb(upright, (256, 320))
    reference = decode_image(_encode(photo, "JPEG", quality=95))
    assert np.abs(upright.astype(int) - reference.astype(int)).mean() < 3


# --- OpenCV's decoding of colour JPEGs: PIL's pixels, faster ----------------------------------------------


def _pil_draft(image: Image.Image, min_side: int) -> None:
    """PIL's reduced decoding of a JPEG asked for a longer side of at least ``min_side`` (0: full size)."""
    width, height = image.size
    if min_side and max(width, height) >= 2 * min_side:
        factor = min_side / max(width, height)
        image.draft("RGB", (math.ceil(width * factor), math.ceil(height * factor)))


def _decoded_by_pil(data: bytes, min_side: int) -> tuple[np.ndarray, float]:
    """What PIL alone makes of a JPEG: draft to the reduced size, decode, EXIF transpose."""
    from PIL import ImageOps

    with Image.open(io.BytesIO(data)) as image:
        width = image.size[0]
        _pil_draft(image, min_side)
        image.load()
        scale = image.size[0] / width
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB")), scale


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("min_side", [0, 640, 300, 100])
def test_colour_jpegs_decode_to_pils_pixels_bit_for_bit(photo: Image.Image, orientation: int, min_side: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(photo.resize((1184, 1600)), "JPEG", quality=90, exif=exif.tobytes())
    decoded = decode_reduced(data, min_side=min_side)
    expected, scale = _decoded_by_pil(data, min_side)
    assert decoded.pixels.shape == expected.shape and decoded.scale == scale
    assert np.array_equal(decoded.pixels, expected)


@pytest.mark.parametrize(
    "encoding", [{"progressive": True}, {"subsampling": 0}, {"subsampling": 1}, {"optimize": True, "quality": 60}]
)
def test_progressive_and_other_encodings_decode_to_pils_pixels(photo: Image.Image, encoding: dict) -> None:
    data = _encode(photo.resize((1184, 1600)), "JPEG", **encoding)
    for min_side in (0, 640, 300):
        decoded = decode_reduced(data, min_side=min_side)
        expected, scale = _decoded_by_pil(data, min_side)
        assert decoded.scale == scale and np.array_equal(decoded.pixels, expected), min_side


@pytest.mark.parametrize("size", [(1184, 1600), (1600, 1184), (1281, 640), (5000, 3000), (641, 2000), (1279, 1279)])
def test_the_reduction_is_the_one_pils_draft_picks(size: tuple[int, int]) -> None:
    data = _encode(Image.new("RGB", size, (90, 120, 150)), "JPEG")
    width, height = size
    for min_side in (0, 100, 300, 640):
        with Image.open(io.BytesIO(data)) as image:
            _pil_draft(image, min_side)
            reduction = _draft_reduction(width, height, min_side)
            assert image.size == (-(-width // reduction), -(-height // reduction))


def test_jpegs_left_to_pil_and_damaged_jpegs_decode_as_pil_decodes_them(photo: Image.Image) -> None:
    """Grey JPEGs and JPEGs with bytes after their end marker take PIL's path; a cut JPEG (no end marker) is
    refused; a cut one with an end marker after the cut decodes, grey below the cut, in both libraries."""
    grey = decode_image(_encode(photo.convert("L"), "JPEG"))
    _check_rgb(grey, (256, 320))
    assert (grey[..., 0] == grey[..., 1]).all()
    data = _encode(photo, "JPEG")
    assert np.array_equal(decode_image(data + b"\x00" * 16), decode_image(data))
    with pytest.raises(InvalidImageError):
        decode_image(data[:-200])
    mended = data[:-200] + b"\xff\xd9"
    assert np.array_equal(decode_image(mended), _decoded_by_pil(mended, 0)[0])


@pytest.mark.shared
def test_every_colour_jpeg_of_shared_decodes_to_pils_pixels(shared_dir: Path) -> None:
    """All of identity/ and robustness/ (LFW, deepface, face_recognition, CompreFace photos), full size and at
    the reduced size the engine asks for."""
    compared = 0
    for path in sorted([*(shared_dir / "identity").rglob("*.jp*g"), *(shared_dir / "robustness").rglob("*.jp*g")]):
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG" or image.mode != "RGB":
                continue
        try:
            full_size = _decoded_by_pil(data, 0)
        except OSError:
            continue  # a cut file: refused by both paths (test_jpegs_left_to_pil_...)
        for min_side in (0, 640):
            decoded = decode_reduced(data, min_side=min_side)
            expected, scale = full_size if min_side == 0 else _decoded_by_pil(data, min_side)
            assert decoded.scale == scale and np.array_equal(decoded.pixels, expected), (path, min_side)
        compared += 1
    assert compared > 5000, compared


# --- the real files of ../shared/facedata/robustness -------------------------------------------------------


def _robustness_files(shared_dir: Path) -> list[Path]:
    return sorted(p for p in (shared_dir / "robustness").rglob("*") if p.is_file())


@pytest.mark.shared
def test_every_robustness_file_decodes_or_fails_typed(shared_dir: Path) -> None:
    outcomes: dict[str, str] = {}
    for path in _robustness_files(shared_dir):
        try:
            array = decode_image(path.read_bytes())
        except FaceServiceError as exc:
            outcomes[path.name] = exc.code
            continue
        # anything else propagates and fails the test: never an untyped exception
        assert array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8, path
        outcomes[path.name] = "ok"
    assert len(outcomes) >= 230
    expected = {
        "empty.png": "UNSUPPORTED_MEDIA_TYPE",  # 5 bytes of text
        "corrupted.png": "INVALID_IMAGE",  # a PNG signature with a broken IHDR chunk
        "truncated.jpg": "INVALID_IMAGE",
        "einstein.gif": "UNSUPPORTED_MEDIA_TYPE",
        "einstein.ico": "UNSUPPORTED_MEDIA_TYPE",
        "einstein.tiff": "UNSUPPORTED_MEDIA_TYPE",
        "einstein.bmp": "ok",  # 32-bit BMP with an alpha channel
        "einstein.jpeg": "ok",
        "einstein.png": "ok",  # palette
        "einstein.webp": "ok",
        "camera.png": "ok",  # grey
        "logo.png": "ok",  # RGBA
        "horse.png": "ok",
        "loadtest_verify_FACE_2.jpg": "ok",  # 2304 px, EXIF orientation 1
    }
    assert {name: outcomes[name] for name in expected} == expected


@pytest.mark.shared
def test_einstein_decodes_alike_in_every_accepted_format(shared_dir: Path) -> None:
    folder = shared_dir / "robustness" / "compreface"
    reference = decode_image((folder / "einstein.png").read_bytes()).astype(int)
    for name in ("einstein.bmp", "einstein.jpeg", "einstein.webp"):
        array = decode_image((folder / name).read_bytes())
        assert array.shape == reference.shape
        assert np.abs(array.astype(int) - reference).mean() < 12, name
