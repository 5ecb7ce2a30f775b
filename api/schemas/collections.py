"""Collections: separate galleries in one service."""

from datetime import datetime

from pydantic import BaseModel, Field

from api.store.base import COLLECTION_NAME_PATTERN


class Collection(BaseModel):
    name: str = Field(examples=["site-berlin"])
    users: int = Field(description="Registered users in this collection")
    faces: int = Field(description="Face descriptors stored for them")
    created_at: datetime


class CollectionCreate(BaseModel):
    name: str = Field(pattern=COLLECTION_NAME_PATTERN, description="1-64 of a-z 0-9 _ -", examples=["site-berlin"])


class CollectionDeleted(BaseModel):
    name: str
    users_deleted: int = Field(description="Users removed with the collection, with every descriptor of them")
