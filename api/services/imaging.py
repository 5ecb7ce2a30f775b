"""Turning uploaded bytes into an RGB array: format by content, pixel limits before decoding, EXIF rotation."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from api.errors import ImageTooLargeError, InvalidImageError, UnsupportedMediaTypeError

# Formats recognised from the bytes themselves (PIL's own sniffing), never from a file name or header.
# MPO is how PIL names a JPEG carrying a multi-picture (APP2 MPF) segment, as many phone cameras write:
# a plain JPEG to every other reader, decoded here as its first (main) picture.
ACCEPTED_FORMATS = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
}

# Leading bytes of the accepted formats: a file that starts like one of them but that PIL cannot open is a
# corrupt or truncated image of an accepted format (422), not a file of an unsupported type (415).
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # and RIFF....WEBP; BMP's "BM" is too short

# PIL warns, then raises, past its own pixel limit; we check our configured limit before decoding instead.
Image.MAX_IMAGE_PIXELS = None

# A JPEG that does not end with its end-of-image marker was cut short: PIL refuses it, libjpeg in OpenCV would
# pad it with grey. Such a file (or one with bytes after the marker) is left to PIL.
_JPEG_END = b"\xff\xd9"
_OPENCV_REDUCED = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


def sniff_format(data: bytes) -> str | None:
    """The image format PIL recognises in ``data`` (e.g. 'JPEG'), or None."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format
    except (UnidentifiedImageError, OSError, ValueError):
        return None


@dataclass(frozen=True)
class DecodedImage:
    """An upright RGB array and its size relative to the photo: ``scale`` pixels per pixel of the photo (1.0,
    or 1/2, 1/4, 1/8 for a JPEG decoded at reduced size)."""

    pixels: np.ndarray
    scale: float = 1.0


def decode_image(data: bytes, max_pixels: int = 40_000_000) -> np.ndarray:
    """Decode to a contiguous (H, W, 3) uint8 RGB array, upright per EXIF orientation.

    Raises InvalidImageError (empty, corrupt or truncated data), UnsupportedMediaTypeError (a real image
    in a format we do not accept, or not an image at all) and ImageTooLargeError (pixel count over
    ``max_pixels``, judged from the header before any pixel is decoded).
    """
    return decode_reduced(data, max_pixels, 0).pixels


def decode_reduced(data: bytes, max_pixels: int = 40_000_000, min_side: int = 0) -> DecodedImage:
    """:func:`decode_image`, but a JPEG whose longer side is at least twice ``min_side`` is decoded at the
    smallest of libjpeg's reduced sizes (1/2, 1/4, 1/8) whose longer side is still ``min_side`` or more.

    libjpeg reduces in the frequency domain, while decoding: a 12-megapixel phone photo decodes ~10x faster
    at 1/4, and detection (which looks at no more than ``detect_max_side`` pixels) and the later resizes work
    on a quarter of the pixels. ``min_side`` 0 decodes at full size. Other formats are always full size.
    """
    if not data:
        raise InvalidImageError("The file is empty.")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            raise InvalidImageError("The image is corrupt or truncated.") from None
        raise UnsupportedMediaTypeError(
            "The file is not an image in a supported format (JPEG, PNG, WebP or BMP)."
        ) from None
    except (OSError, ValueError) as exc:
        raise InvalidImageError(f"The image could not be read: {exc}") from None
    with image:
        if image.format not in ACCEPTED_FORMATS:
            raise UnsupportedMediaTypeError(
                f"Image format {image.format} is not accepted; use JPEG, PNG, WebP or BMP.",
                format=image.format,
            )
        width, height = image.size
        if width <= 0 or height <= 0:
            raise InvalidImageError("The image has no pixels.")
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"The image has {width}x{height} pixels; at most {max_pixels} pixels are accepted.",
                width=width,
                height=height,
            )
        reduction = _draft_reduction(width, height, min_side) if image.format in ("JPEG", "MPO") else 1
        if image.format == "JPEG" and image.mode == "RGB" and data.endswith(_JPEG_END):
            pixels = _decode_jpeg_with_opencv(data, image, reduction)
            if pixels is not None:
                return DecodedImage(pixels, math.ceil(width / reduction) / width)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if reduction > 1:
                    factor = min_side / max(width, height)  # draft picks the smallest size at least this large
                    image.draft("RGB", (math.ceil(width * factor), math.ceil(height * factor)))
                image.load()
                scale = image.size[0] / width
                upright = ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise InvalidImageError(f"The image is corrupt or truncated: {exc}") from None
        rgb = _to_rgb(upright)
        pixels = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    return DecodedImage(pixels, scale)


def _draft_reduction(width: int, height: int, min_side: int) -> int:
    """The factor (1, 2, 4 or 8) by which PIL's ``draft`` reduces a JPEG asked for at least ``min_side`` px on
    its longer side: the largest one that keeps both sides at or above the asked size."""
    if not min_side or max(width, height) < 2 * min_side:
        return 1
    factor = min_side / max(width, height)
    fits = min(width // math.ceil(width * factor), height // math.ceil(height * factor))
    return next(reduction for reduction in (8, 4, 2, 1) if fits >= reduction)


def _decode_jpeg_with_opencv(data: bytes, image: Image.Image, reduction: int) -> np.ndarray | None:
    """A colour JPEG decoded by OpenCV's libjpeg-turbo at 1/``reduction`` size, upright: the same pixels as
    PIL's decoding (draft, then EXIF transpose; bit for bit on the 5,117 colour JPEGs of ../shared and on
    all eight orientations, ``tests/services/test_imaging.py``) in about two thirds of the time, and without
    PIL's copies. None when the file is one to leave to PIL: an EXIF orientation outside 1..8, or a decode
    that fails."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # a malformed EXIF block: PIL's path decides what to do with it
        return None
    if orientation not in range(1, 9):
        return None
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), _OPENCV_REDUCED[reduction])
    if decoded is None:
        return None
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels become white rather than whatever colour they happen to store.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit samples (PNG): scale the full 0..65535 range to 0..255, as an 8-bit export of the same
        # picture would have it (not by the image's own peak, which brightened dark pictures).
        array = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(array / 257.0), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        return Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")
