"""Emotion of every face, and anti-spoofing (live face or photo / screen replay) of every face."""

from typing import Annotated

from fastapi import APIRouter, Form

from api.deps import AntiSpoofingDep, ClientDep, EmotionDep, FaceCropFlag, ImageDep, RunnerDep
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
    image: ImageDep,
    all_faces: Annotated[bool, Form(description="false: only the largest face")] = True,
    face_crop: FaceCropFlag = False,
) -> EmotionResult:
    outcomes = await runner.run(analyzer.analyze, image.data, all_faces, face_crop)
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
    image: ImageDep,
    face_crop: FaceCropFlag = False,
) -> AntiSpoofResult:
    outcomes = await runner.run(analyzer.analyze, image.data, face_crop)
    faces = [FaceSpoofScore(box=box_of(o.face), is_real=o.is_real, real_score=round(o.real_score, 6)) for o in outcomes]
    return AntiSpoofResult(is_real=faces[0].is_real, faces=faces)
