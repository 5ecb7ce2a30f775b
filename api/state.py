"""What the app holds between requests: the store, the request-side helpers, and the models once loaded."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from api.composition import Models
from api.config import Settings
from api.security import AuditLog, Authenticator, RateLimiter
from api.services.inference import InferenceRunner
from api.store import FaceStore


@dataclass
class ModelLoading:
    """Where loading the models stands: still running, done (``models``) or failed (``error``)."""

    models: Models | None = None
    error: str | None = None
    started_at: float = field(default_factory=time.monotonic)
    ready_after_s: float | None = None

    @property
    def ready(self) -> bool:
        return self.models is not None


@dataclass
class AppState:
    settings: Settings
    store: FaceStore  # the only holder of the store: services receive it per call
    runner: InferenceRunner
    authenticator: Authenticator
    rate_limiter: RateLimiter
    audit: AuditLog
    loading: ModelLoading = field(default_factory=ModelLoading)
