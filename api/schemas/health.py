"""Service status."""

from pydantic import BaseModel, Field


class ServiceStatus(BaseModel):
    status: str = Field(examples=["ok"])
    version: str
    ready: bool = Field(description="Models are loaded and warmed")
    users: int | None = Field(description="Registered users (None while the store is not open)")
    models: dict[str, str | None]


class Probe(BaseModel):
    status: str = Field(examples=["ok"])
