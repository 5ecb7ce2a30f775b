"""FastAPI dependencies, injected through ``Annotated`` aliases; tests replace them with
``app.dependency_overrides``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, File, Form, Query, Request, Security, UploadFile
from fastapi.security import APIKeyHeader

from api.composition import Models
from api.config import Settings
from api.errors import (
    AuthenticationError,
    FaceServiceError,
    ImageTooLargeError,
    ModelUnavailableError,
    TooManyFilesError,
)
from api.security import API_KEY_HEADER, AuditLog, Authenticator, Caller, RateLimiter
from api.services.analysis import AntiSpoofingAnalyzer, EmotionAnalyzer
from api.services.inference import InferenceRunner
from api.services.recognition import ImageUpload, RecognitionService, RegisterOptions
from api.state import AppState, ModelLoading
from api.store import DEFAULT_COLLECTION, FaceStore
from api.store.base import COLLECTION_NAME_PATTERN


class NotReadyError(FaceServiceError):
    code = "NOT_READY"
    status = 503


def get_state(request: Request) -> AppState:
    return request.app.state.face


StateDep = Annotated[AppState, Depends(get_state)]


def get_settings(state: StateDep) -> Settings:
    """The one settings dependency: the settings the app was built with."""
    return state.settings


def state_part(attribute: str) -> Callable[[AppState], Any]:
    """A dependency that answers one part of the app's state; one function per part, so that a test can override
    each part alone (``app.dependency_overrides[get_store] = ...``)."""

    def dependency(state: StateDep) -> Any:
        return getattr(state, attribute)

    dependency.__name__ = dependency.__qualname__ = f"get_{attribute}"
    return dependency


get_store = state_part("store")
get_runner = state_part("runner")
get_authenticator = state_part("authenticator")
get_rate_limiter = state_part("rate_limiter")
get_audit = state_part("audit")
get_loading = state_part("loading")


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[FaceStore, Depends(get_store)]
RunnerDep = Annotated[InferenceRunner, Depends(get_runner)]
AuthenticatorDep = Annotated[Authenticator, Depends(get_authenticator)]
AuditDep = Annotated[AuditLog, Depends(get_audit)]
LoadingDep = Annotated[ModelLoading, Depends(get_loading)]


def get_models(loading: LoadingDep) -> Models:
    if loading.models is None:
        if loading.error:
            raise ModelUnavailableError(f"The models failed to load: {loading.error}")
        raise NotReadyError("The models are still loading; retry in a few seconds (see GET /health/ready).")
    return loading.models


ModelsDep = Annotated[Models, Depends(get_models)]


def get_recognition(models: ModelsDep) -> RecognitionService:
    return models.recognition


def get_emotion(models: ModelsDep) -> EmotionAnalyzer:
    if models.emotion is None:
        raise ModelUnavailableError(models.unavailable.get("emotion", "Emotion analysis is not available."))
    return models.emotion


def get_anti_spoofing(models: ModelsDep) -> AntiSpoofingAnalyzer:
    if models.anti_spoofing is None:
        raise ModelUnavailableError(models.unavailable.get("anti_spoofing", "Anti-spoofing is not available."))
    return models.anti_spoofing


RecognitionDep = Annotated[RecognitionService, Depends(get_recognition)]
EmotionDep = Annotated[EmotionAnalyzer, Depends(get_emotion)]
AntiSpoofingDep = Annotated[AntiSpoofingAnalyzer, Depends(get_anti_spoofing)]

# auto_error=False: a missing key is answered by our own 401 in the error envelope, not FastAPI's 403.
api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="API key (see README)")


def get_caller(
    request: Request,
    authenticator: AuthenticatorDep,
    rate_limiter: Annotated[RateLimiter, Depends(get_rate_limiter)],
    key: Annotated[str | None, Security(api_key_header)],
) -> Caller:
    host = request.client.host if request.client else None
    rate_limiter.refuse_blocked_address(host)
    try:
        caller = authenticator.identify(key, host)
    except AuthenticationError:
        rate_limiter.record_auth_failure(host)
        raise
    rate_limiter.check(caller)
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]


def require_client(authenticator: AuthenticatorDep, caller: CallerDep) -> Caller:
    authenticator.authorise(caller, "client")
    return caller


def require_admin(authenticator: AuthenticatorDep, caller: CallerDep) -> Caller:
    authenticator.authorise(caller, "admin")
    return caller


ClientDep = Annotated[Caller, Depends(require_client)]
AdminDep = Annotated[Caller, Depends(require_admin)]


@dataclass(frozen=True)
class AuditedAdmin:
    """An admin caller bound to the audit log: every change it records names who made it."""

    caller: Caller
    audit: AuditLog

    def record(self, action: str, user_id: str | None, **facts: str | int) -> None:
        self.audit.record(self.caller, action, user_id, **facts)


def get_audited_admin(caller: AdminDep, audit: AuditDep) -> AuditedAdmin:
    return AuditedAdmin(caller, audit)


AuditedAdminDep = Annotated[AuditedAdmin, Depends(get_audited_admin)]


def get_collection(
    authenticator: AuthenticatorDep,
    caller: CallerDep,
    collection: Annotated[
        str,
        Query(
            pattern=COLLECTION_NAME_PATTERN,
            description="The collection (a separate gallery) to work in; `default` always exists.",
        ),
    ] = DEFAULT_COLLECTION,
) -> str:
    """The request's collection, if the caller's key may use it (403 otherwise); existence is the store's."""
    authenticator.authorise_collection(caller, collection)
    return collection


CollectionDep = Annotated[str, Depends(get_collection)]


# The form field keeps its published name `liveness`; what it asks for is the anti-spoofing gate.
SpoofCheckFlag = Annotated[
    bool | None,
    Form(
        alias="liveness",
        description="Reject photos and screen replays (422 SPOOF_DETECTED); default: FACE_REQUIRE_LIVENESS",
    ),
]


FaceCropFlag = Annotated[
    bool,
    Form(
        description="The image is already cropped to one face (by the client's own detector): detection only "
        "looks inside it and the whole image is that face; never NO_FACE or MULTIPLE_FACES."
    ),
]


def refuse_spoofs(settings: Settings, flag: bool | None) -> bool:
    """Whether this request runs the anti-spoofing gate: its own ``liveness`` field, else the setting."""
    return settings.require_liveness if flag is None else flag


def get_register_options(
    settings: SettingsDep,
    collection: CollectionDep,
    allow_duplicate: Annotated[bool, Form()] = False,
    spoof_check: SpoofCheckFlag = None,
    face_crop: FaceCropFlag = False,
) -> RegisterOptions:
    """The form fields that register and add-faces share, as one value."""
    return RegisterOptions(allow_duplicate, refuse_spoofs(settings, spoof_check), collection, face_crop)


RegisterOptionsDep = Annotated[RegisterOptions, Depends(get_register_options)]


async def read_upload(upload: UploadFile, settings: Settings, position: int = 0) -> ImageUpload:
    """The file's bytes, refusing more than the per-image limit without reading the rest."""
    data = await upload.read(settings.max_image_bytes + 1)
    name = upload.filename or f"file{position}"
    if len(data) > settings.max_image_bytes:
        raise ImageTooLargeError(
            f"{name!r} is larger than {settings.max_image_bytes} bytes.", file=name, limit=settings.max_image_bytes
        )
    return ImageUpload(name, data)


async def read_uploads(uploads: list[UploadFile], settings: Settings) -> list[ImageUpload]:
    if len(uploads) > settings.max_files_per_request:
        raise TooManyFilesError(
            f"{len(uploads)} files were sent; at most {settings.max_files_per_request} are accepted per request.",
            limit=settings.max_files_per_request,
        )
    return [await read_upload(upload, settings, i) for i, upload in enumerate(uploads)]


async def get_photos(
    files: Annotated[list[UploadFile], File(description="One or more face photos (repeat the field)")],
    settings: SettingsDep,
) -> list[ImageUpload]:
    """The photos of a registration or face addition (form field ``files``), within the per-request limits."""
    return await read_uploads(files, settings)


PhotosDep = Annotated[list[ImageUpload], Depends(get_photos)]


async def get_image(file: Annotated[UploadFile, File(description="A photo")], settings: SettingsDep) -> ImageUpload:
    """The one photo of an analysis request (form field ``file``), read within the per-image limit."""
    return await read_upload(file, settings)


ImageDep = Annotated[ImageUpload, Depends(get_image)]
