"""Registered people."""

from datetime import datetime

from pydantic import BaseModel, Field

from api.schemas.common import ErrorBody


class User(BaseModel):
    id: str = Field(examples=["3f2b8c0e9d6a4b1f8e7d6c5b4a392817"])
    name: str = Field(examples=["Ada Lovelace"])
    faces: int = Field(description="Number of face descriptors stored for this user")
    collection: str = Field("default", description="The collection the user belongs to", examples=["default"])
    created_at: datetime
    updated_at: datetime


class UserPage(BaseModel):
    items: list[User]
    total: int


class UserRename(BaseModel):
    name: str = Field(min_length=1, max_length=200, examples=["Ada King"])


class RejectedFile(BaseModel):
    file: str = Field(description="The uploaded file name (or its position when it has none)")
    error: ErrorBody


class RegisterResult(BaseModel):
    user: User
    rejected: list[RejectedFile] = Field(default_factory=list)
