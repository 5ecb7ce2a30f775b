"""Identification (1:N) and comparison (1:1)."""

from pydantic import BaseModel, Field

from api.schemas.common import FaceBox


class UserRef(BaseModel):
    id: str
    name: str


class MatchCandidate(BaseModel):
    id: str
    name: str
    similarity: float = Field(ge=0.0, le=1.0)
    distance: float = Field(ge=0.0)


class VerifyResult(BaseModel):
    verified: bool = Field(description="True when the best candidate's similarity reaches the threshold")
    user: UserRef | None
    similarity: float | None = Field(None, description="Best candidate's similarity in [0, 1] (higher = more alike)")
    distance: float | None = Field(None, description="Euclidean distance of unit descriptors, monotone in similarity")
    threshold: float = Field(description="The threshold applied, in similarity units")
    candidates: list[MatchCandidate] = Field(
        description="Up to top_k users at or above the threshold, best first (below it too when "
        "include_below_threshold=true)"
    )
    face: FaceBox


class CompareResult(BaseModel):
    verified: bool
    similarity: float = Field(ge=0.0, le=1.0)
    distance: float = Field(ge=0.0)
    threshold: float
