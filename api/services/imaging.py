"""Turning uploaded bytes into an RGB array: format by content, pixel limits before decoding, EXIF rotation."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from api.errors import ImageTooLargeError, InvalidImageError, UnsupportedMediaTypeError

# Formats recognised from the bytes themselves (PIL's own sniffing), never from a file name or header.
ACCEPTED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp"}

# JPEG photos larger than this on their longer side are decoded at 1/2, 1/4 or 1/8 scale by the JPEG
# decoder itself (DCT scaling): faster and lighter, and detection works on a 640 px copy anyway.
DECODE_TARGET_SIDE = 2048

# PIL warns, then raises, past its own pixel limit; we check our configured limit before decoding instead.
Image.MAX_IMAGE_PIXELS = None


def sniff_format(data: bytes) -> str | None:
    """The image format PIL recognises in ``data`` (e.g. 'JPEG'), or None."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def decode_image(data: bytes, max_pixels: int = 40_000_000) -> np.ndarray:
    """Decode to a contiguous (H, W, 3) uint8 RGB array, upright per EXIF orientation.

    Raises InvalidImageError (empty, corrupt or truncated data), UnsupportedMediaTypeError (a real image
    in a format we do not accept, or not an image at all) and ImageTooLargeError (pixel count over
    ``max_pixels``, judged from the header before any pixel is decoded).
    """
    if not data:
        raise InvalidImageError("The file is empty.")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
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
        if image.format == "JPEG" and max(width, height) > 2 * DECODE_TARGET_SIDE:
            scale = DECODE_TARGET_SIDE / max(width, height)
            image.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image.load()
                upright = ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise InvalidImageError(f"The image is corrupt or truncated: {exc}") from None
        rgb = _to_rgb(upright)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels become white rather than whatever colour they happen to store.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        return Image.fromarray((array / peak * 255.0).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")
