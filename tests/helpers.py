"""Helpers shared by the test modules: the error envelope check, image encoding, media types."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx
    import numpy as np

JPEG = "image/jpeg"
ERROR_KEYS = {"code", "message", "details"}


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The error body, after checking the status, the envelope ``{"error": {"code", "message", "details"}}``
    and the code."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"code", "message"} <= set(error) <= ERROR_KEYS, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error.get("details", {}), dict), error
    return error


def jpeg_bytes(image: np.ndarray, quality: int = 92) -> bytes:
    """``image`` (H, W, 3 uint8 RGB) encoded as JPEG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
