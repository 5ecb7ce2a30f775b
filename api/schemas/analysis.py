"""Emotion and anti-spoofing results."""

from pydantic import BaseModel, Field


class EmotionScores(BaseModel):
    angry: float
    disgust: float
    fear: float
    happy: float
    sad: float
    surprise: float
    neutral: float


class FaceEmotion(BaseModel):
    box: list[int] = Field(description="x, y, width, height")
    dominant_emotion: str = Field(examples=["happy"])
    emotions: EmotionScores = Field(description="Probabilities summing to 1")


class EmotionResult(BaseModel):
    faces: list[FaceEmotion] = Field(description="Every face found, largest first")


class FaceSpoofScore(BaseModel):
    box: list[int]
    is_real: bool
    real_score: float = Field(ge=0.0, le=1.0, description="Probability that the face is live (bona fide)")


class AntiSpoofResult(BaseModel):
    is_real: bool = Field(description="The largest face's verdict")
    faces: list[FaceSpoofScore]
