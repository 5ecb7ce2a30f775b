"""FastAPI dependencies, injected through ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request, Security, UploadFile
from fastapi.security import APIKeyHeader

from api.config import Settings
from api.errors import FaceServiceError, ImageTooLargeError, ModelUnavailableError, TooManyFilesError
from api.security import API_KEY_HEADER, AuditLog, Caller
from api.services.analysis import EmotionAnalyzer, LivenessAnalyzer
from api.services.inference import InferenceRunner
from api.services.recognition import ImageUpload, RecognitionService
from api.state import AppState, Models
from api.store import DEFAULT_COLLECTION, FaceStore
from api.store.base import COLLECTION_NAME_PATTERN


class NotReadyError(FaceServiceError):
    code = "NOT_READY"
    status = 503


def get_state(request: Request) -> AppState:
    return request.app.state.face


StateDep = Annotated[AppState, Depends(get_state)]


def get_settings(state: StateDep) -> Settings:
    return state.settings


def get_store(state: StateDep) -> FaceStore:
    return state.store


def get_runner(state: StateDep) -> InferenceRunner:
    return state.runner


def get_models(state: StateDep) -> Models:
    if state.models is None:
        if state.load_error:
            raise ModelUnavailableError(f"The models failed to load: {state.load_error}")
        raise NotReadyError("The models are still loading; retry in a few seconds (see GET /health/ready).")
    return state.models


ModelsDep = Annotated[Models, Depends(get_models)]


def get_recognition(models: ModelsDep) -> RecognitionService:
    return models.recognition


def get_emotion(state: StateDep, models: ModelsDep) -> EmotionAnalyzer:
    if models.emotion is None:
        raise ModelUnavailableError(state.unavailable.get("emotion", "Emotion analysis is not available."))
    return models.emotion


def get_liveness(state: StateDep, models: ModelsDep) -> LivenessAnalyzer:
    if models.liveness is None:
        raise ModelUnavailableError(state.unavailable.get("liveness", "Anti-spoofing is not available."))
    return models.liveness


# auto_error=False: a missing key is answered by our own 401 in the error envelope, not FastAPI's 403.
api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="API key (see README)")


def get_caller(request: Request, state: StateDep, key: Annotated[str | None, Security(api_key_header)]) -> Caller:
    caller = state.authenticator.identify(key, request.client.host if request.client else None)
    state.rate_limiter.check(caller)
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]


def require_client(state: StateDep, caller: CallerDep) -> Caller:
    state.authenticator.authorise(caller, "client")
    return caller


def require_admin(state: StateDep, caller: CallerDep) -> Caller:
    state.authenticator.authorise(caller, "admin")
    return caller


ClientDep = Annotated[Caller, Depends(require_client)]
AdminDep = Annotated[Caller, Depends(require_admin)]


def get_collection(
    state: StateDep,
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
    state.authenticator.authorise_collection(caller, collection)
    return collection


CollectionDep = Annotated[str, Depends(get_collection)]


def get_audit(state: StateDep) -> AuditLog:
    return state.audit


AuditDep = Annotated[AuditLog, Depends(get_audit)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[FaceStore, Depends(get_store)]
RunnerDep = Annotated[InferenceRunner, Depends(get_runner)]
RecognitionDep = Annotated[RecognitionService, Depends(get_recognition)]
EmotionDep = Annotated[EmotionAnalyzer, Depends(get_emotion)]
LivenessDep = Annotated[LivenessAnalyzer, Depends(get_liveness)]


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
