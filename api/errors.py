"""Domain errors with stable codes. Services raise these; ``api.main`` maps them to HTTP in one place."""

from typing import Any

from fastapi.responses import JSONResponse


class FaceServiceError(Exception):
    """Base class: ``code`` is a stable machine-readable string, ``status`` the HTTP status it maps to."""

    code = "INTERNAL_ERROR"
    status = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers: dict[str, str] = {}


class InvalidImageError(FaceServiceError):
    code = "INVALID_IMAGE"
    status = 422


class UnsupportedMediaTypeError(FaceServiceError):
    code = "UNSUPPORTED_MEDIA_TYPE"
    status = 415


class ImageTooLargeError(FaceServiceError):
    code = "IMAGE_TOO_LARGE"
    status = 413


class PayloadTooLargeError(FaceServiceError):
    code = "PAYLOAD_TOO_LARGE"
    status = 413


class TooManyFilesError(FaceServiceError):
    code = "TOO_MANY_FILES"
    status = 422


class NoFaceError(FaceServiceError):
    code = "NO_FACE"
    status = 422


class MultipleFacesError(FaceServiceError):
    code = "MULTIPLE_FACES"
    status = 422


class FaceTooSmallError(FaceServiceError):
    code = "FACE_TOO_SMALL"
    status = 422


class InconsistentFacesError(FaceServiceError):
    code = "INCONSISTENT_FACES"
    status = 422


class DuplicateFaceError(FaceServiceError):
    code = "DUPLICATE_FACE"
    status = 409


class SpoofDetectedError(FaceServiceError):
    code = "SPOOF_DETECTED"
    status = 422


class UserNotFoundError(FaceServiceError):
    code = "USER_NOT_FOUND"
    status = 404


class CollectionNotFoundError(FaceServiceError):
    code = "COLLECTION_NOT_FOUND"
    status = 404


class CollectionExistsError(FaceServiceError):
    code = "COLLECTION_EXISTS"
    status = 409


class CollectionNotEmptyError(FaceServiceError):
    """Deleting a collection that still holds users needs ``force=true``."""

    code = "COLLECTION_NOT_EMPTY"
    status = 409


class CollectionProtectedError(FaceServiceError):
    """The ``default`` collection always exists."""

    code = "COLLECTION_PROTECTED"
    status = 409


class InvalidCollectionNameError(FaceServiceError):
    code = "VALIDATION_ERROR"
    status = 422


class ModelMismatchError(FaceServiceError):
    """The store holds descriptors of another embedding model than the one configured."""

    code = "MODEL_MISMATCH"
    status = 409


class StoreCorruptError(FaceServiceError):
    code = "STORE_CORRUPT"
    status = 500


class StoreKeyError(FaceServiceError):
    """The store is encrypted and no key, or the wrong key, was configured."""

    code = "STORE_KEY_INVALID"
    status = 500


class StoreLockTimeoutError(FaceServiceError):
    code = "STORE_BUSY"
    status = 503


class StoreUnavailableError(FaceServiceError):
    """The database behind the store cannot be reached (or failed mid-request); nothing was half-written."""

    code = "STORE_UNAVAILABLE"
    status = 503


class StoreSchemaError(FaceServiceError):
    """The database holds a schema this code cannot use (a newer version); refusing beats guessing."""

    code = "STORE_SCHEMA_UNSUPPORTED"
    status = 500


class StoreConfigError(FaceServiceError):
    """FACE_STORE_URL (or another store setting) is not usable; raised at start-up."""

    code = "STORE_CONFIG_INVALID"
    status = 500


class ModelUnavailableError(FaceServiceError):
    """A configured model file is missing or cannot be loaded."""

    code = "MODEL_UNAVAILABLE"
    status = 503


class InferenceTimeoutError(FaceServiceError):
    code = "INFERENCE_TIMEOUT"
    status = 503


class RetryLaterError(FaceServiceError):
    """An error the client cures by waiting: the answer carries ``Retry-After`` (seconds)."""

    def __init__(self, message: str, retry_after_s: int, **details: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **details)
        self.headers["Retry-After"] = str(retry_after_s)


class OverloadedError(RetryLaterError):
    """More inference requests are waiting than the worker's queue holds."""

    code = "OVERLOADED"
    status = 503


class AuthenticationError(FaceServiceError):
    code = "UNAUTHORIZED"
    status = 401


class ForbiddenError(FaceServiceError):
    code = "FORBIDDEN"
    status = 403


class RateLimitedError(RetryLaterError):
    code = "RATE_LIMITED"
    status = 429


def error_response(status: int, code: str, message: str, details: dict | None = None) -> JSONResponse:
    """The one error envelope: ``{"error": {"code", "message", "details"}}``."""
    body: dict = {"code": code, "message": message}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status)
