"""Emotion of every face, and anti-spoofing (live face or photo / screen replay) of every face."""

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from api.deps import AntiSpoofingDep, ClientDep, EmotionDep, FaceCropFlag, RunnerDep, SettingsDep, read_upload
from api.routers._convert import box_of
from api.schemas.analysis import AntiSpoofResult, EmotionResult, EmotionScores, FaceEmotion, FaceSpoofScore
from api.schemas.common import error_responses

router = APIRouter(prefix="/api", tags=["analysis"])


@router.post(
    "/emotion",
    response_model=EmotionResult,
    summary="Dominant emotion of every face, largest first",
    responses=error_responses(401, 403, 413, 415, 422, 429, 503),
)
async def emotion(
    _: ClientDep,
    analyzer: EmotionDep,
    runner: RunnerDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File()],
    all_faces: Annotated[bool, Form(description="false: only the largest face")] = True,
    face_crop: FaceCropFlag = False,
) -> EmotionResult:
    upload = await read_upload(file, settings)
    outcomes = await runner.run(analyzer.analyze, upload.data, all_faces, face_crop)
    return EmotionResult(
        faces=[
            FaceEmotion(
                box=box_of(o.face),
                dominant_emotion=o.dominant,
                emotions=EmotionScores(**{k: round(v, 6) for k, v in o.probabilities.items()}),
            )
            for o in outcomes
        ]
    )


@router.post(
    "/anti-spoof",
    response_model=AntiSpoofResult,
    summary="Tell live faces from photos and screen replays",
    responses=error_responses(401, 403, 413, 415, 422, 429, 503),
)
async def anti_spoof(
    _: ClientDep,
    analyzer: AntiSpoofingDep,
    runner: RunnerDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File()],
    face_crop: FaceCropFlag = False,
) -> AntiSpoofResult:
    upload = await read_upload(file, settings)
    outcomes = await runner.run(analyzer.analyze, upload.data, face_crop)
    faces = [FaceSpoofScore(box=box_of(o.face), is_real=o.is_real, real_score=round(o.real_score, 6)) for o in outcomes]
    return AntiSpoofResult(is_real=faces[0].is_real, faces=faces)
