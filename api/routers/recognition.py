"""Register people, identify a face among them (1:N) and compare two faces (1:1)."""

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile, status

from api.deps import (
    AuditedAdminDep,
    AuthenticatorDep,
    ClientDep,
    CollectionDep,
    FaceCropFlag,
    PhotosDep,
    RecognitionDep,
    RegisterOptionsDep,
    RunnerDep,
    SettingsDep,
    SpoofCheckFlag,
    StoreDep,
    read_upload,
    refuse_spoofs,
)
from api.routers._convert import face_box, register_result
from api.schemas.common import error_responses
from api.schemas.recognition import CompareResult, MatchCandidate, UserRef, VerifyResult
from api.schemas.users import RegisterResult

router = APIRouter(prefix="/api", tags=["recognition"])

ThresholdField = Annotated[
    float | None, Form(ge=0.0, le=1.0, description="Similarity threshold in [0, 1]; default: calibrated value")
]


@router.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    response_model=RegisterResult,
    summary="Register a person from one or more photos",
    description="Each photo must hold exactly one usable face, all of the same person. Photos that fail are "
    "listed in `rejected`; if none is usable the request fails with 422. A face that already matches a "
    "registered user of the collection gives 409 DUPLICATE_FACE unless `allow_duplicate=true`. The collection "
    "must exist (404 COLLECTION_NOT_FOUND; `default` always does).",
    responses=error_responses(401, 403, 409, 413, 415, 422, 429, 503),
)
async def register(
    admin: AuditedAdminDep,
    recognition: RecognitionDep,
    store: StoreDep,
    runner: RunnerDep,
    options: RegisterOptionsDep,
    name: Annotated[str, Form(min_length=1, max_length=200, examples=["Ada Lovelace"])],
    photos: PhotosDep,
) -> RegisterResult:
    outcome = await runner.run(recognition.register, store, name, photos, options)
    admin.record("register", outcome.user.id, collection=options.collection, faces=outcome.user.faces)
    return register_result(outcome)


@router.post(
    "/verify",
    response_model=VerifyResult,
    summary="Identify the largest face among the registered users of a collection (1:N)",
    description="1:N identification (the path keeps its historical name): the store searches the faces of every "
    "user of the collection, and only those. An empty gallery answers `verified: false`. The default threshold "
    "grows with the number of users in the collection so that the chance of matching a stranger to someone "
    "stays near 1%.",
    responses=error_responses(401, 403, 413, 415, 422, 429, 503),
)
async def verify(
    caller: ClientDep,
    recognition: RecognitionDep,
    store: StoreDep,
    runner: RunnerDep,
    settings: SettingsDep,
    authenticator: AuthenticatorDep,
    collection: CollectionDep,
    file: Annotated[UploadFile, File(description="A photo with the face to identify")],
    threshold: ThresholdField = None,
    top_k: Annotated[int, Form(ge=1, le=100, description="How many candidates to list at most")] = 5,
    include_below_threshold: Annotated[
        bool,
        Form(
            description="Also list candidates below the threshold (admin scope only): by default only matches "
            "are named, so that a client cannot learn who is registered from arbitrary photos."
        ),
    ] = False,
    spoof_check: SpoofCheckFlag = None,
    face_crop: FaceCropFlag = False,
) -> VerifyResult:
    if include_below_threshold:
        authenticator.authorise(caller, "admin")
    upload = await read_upload(file, settings)
    outcome = await runner.run(
        recognition.verify, store, upload, threshold, top_k, refuse_spoofs(settings, spoof_check), collection, face_crop
    )
    best = outcome.best
    return VerifyResult(
        verified=outcome.verified,
        user=UserRef(id=best.user_id, name=best.name) if best is not None and outcome.verified else None,
        similarity=None if best is None else round(best.similarity, 6),
        distance=None if best is None else round(best.distance, 6),
        threshold=round(outcome.threshold, 6),
        candidates=[
            MatchCandidate(id=c.user_id, name=c.name, similarity=round(c.similarity, 6), distance=round(c.distance, 6))
            for c in outcome.candidates
            if include_below_threshold or c.similarity >= outcome.threshold
        ],
        face=face_box(outcome.face),
    )


@router.post(
    "/compare",
    response_model=CompareResult,
    summary="Compare the largest faces of two photos (1:1)",
    responses=error_responses(401, 403, 413, 415, 422, 429, 503),
)
async def compare(
    _: ClientDep,
    recognition: RecognitionDep,
    runner: RunnerDep,
    settings: SettingsDep,
    image1: Annotated[UploadFile, File()],
    image2: Annotated[UploadFile, File()],
    threshold: ThresholdField = None,
    spoof_check: SpoofCheckFlag = None,
    face_crop: FaceCropFlag = False,
) -> CompareResult:
    first, second = await read_upload(image1, settings, 1), await read_upload(image2, settings, 2)
    outcome = await runner.run(
        recognition.compare, first, second, threshold, refuse_spoofs(settings, spoof_check), face_crop
    )
    return CompareResult(
        verified=outcome.verified,
        similarity=round(outcome.similarity, 6),
        distance=round(outcome.distance, 6),
        threshold=round(outcome.threshold, 6),
    )
