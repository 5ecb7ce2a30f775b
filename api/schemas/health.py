"""Service status."""

from pydantic import BaseModel, Field


class ServiceStatus(BaseModel):
    status: str = Field(examples=["ok"])
    version: str
    ready: bool = Field(description="Models are loaded and warmed")
    users: int | None = Field(description="Registered users (None while the store is unavailable)")
    store: str = Field(description="The store backend in use: npz or postgresql", examples=["npz"])
    models: dict[str, str | None]


class Probe(BaseModel):
    status: str = Field(examples=["ok"])
    reason: str | None = Field(None, description="Why the service is not ready (never credentials)")
