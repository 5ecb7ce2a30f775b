"""Shapes shared by several endpoints: the error envelope and a detected face."""

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    code: str = Field(examples=["NO_FACE"], description="Stable machine-readable error code")
    message: str = Field(examples=["No face was found in the image."])
    details: dict[str, Any] | None = Field(None, description="Extra facts about the error, when useful")


class ErrorResponse(BaseModel):
    """Every error answers with this envelope, whatever the endpoint."""

    error: ErrorBody


class FaceBox(BaseModel):
    box: list[int] = Field(
        description="x, y, width, height in pixels of the upright image", examples=[[120, 80, 96, 118]]
    )
    score: float = Field(ge=0.0, le=1.0, description="Detector confidence")


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI documentation of the error envelope for the given HTTP statuses."""
    descriptions = {
        400: "Malformed request",
        401: "Missing or unknown API key",
        403: "The API key's scope does not allow this endpoint",
        404: "Unknown user (USER_NOT_FOUND; also a user of another collection) or collection (COLLECTION_NOT_FOUND)",
        409: "DUPLICATE_FACE, MODEL_MISMATCH, COLLECTION_EXISTS, COLLECTION_NOT_EMPTY or COLLECTION_PROTECTED",
        413: "Upload or image too large (PAYLOAD_TOO_LARGE, IMAGE_TOO_LARGE)",
        415: "Not an accepted image format (UNSUPPORTED_MEDIA_TYPE)",
        422: "Unusable input: INVALID_IMAGE, NO_FACE, FACE_TOO_SMALL, MULTIPLE_FACES, INCONSISTENT_FACES, "
        "SPOOF_DETECTED, TOO_MANY_FILES, VALIDATION_ERROR",
        429: "Rate limit exceeded (RATE_LIMITED); see Retry-After",
        503: "Models still loading (NOT_READY), a model is unavailable, inference timed out, the worker is "
        "overloaded (OVERLOADED; see Retry-After), or the store is unavailable (STORE_UNAVAILABLE)",
    }
    return {status: {"model": ErrorResponse, "description": descriptions[status]} for status in statuses}
