"""What the app holds between requests: settings, the store, and the models once they are loaded."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from api.config import Settings
from api.errors import FaceServiceError
from api.security import AuditLog, Authenticator, RateLimiter
from api.services.analysis import EmotionAnalyzer, LivenessAnalyzer
from api.services.inference import InferenceRunner
from api.services.matching import Calibration
from api.services.recognition import RecognitionService
from api.store import FaceStore

logger = logging.getLogger(__name__)


@dataclass
class Models:
    recognition: RecognitionService
    emotion: EmotionAnalyzer | None
    liveness: LivenessAnalyzer | None
    names: dict[str, str | None]


@dataclass
class AppState:
    settings: Settings
    store: FaceStore  # the only holder of the store: services receive it per call
    runner: InferenceRunner
    authenticator: Authenticator
    rate_limiter: RateLimiter
    audit: AuditLog
    models: Models | None = None
    load_error: str | None = None
    unavailable: dict[str, str] = field(default_factory=dict)  # optional feature -> why it is off
    started_at: float = field(default_factory=time.monotonic)
    ready_after_s: float | None = None

    @property
    def ready(self) -> bool:
        return self.models is not None


def load_models(state: AppState) -> Models:
    """Load and warm every model once (slow: seconds). Optional features that cannot load are switched off."""
    from api.services.emotion import build_emotion_classifier
    from api.services.engine import build_engine
    from api.services.liveness import MiniFASNetLiveness

    settings = state.settings
    engine = build_engine(settings)
    engine.warm_up()
    calibration = Calibration.load(settings.resources_dir / "calibration.json")

    liveness_model = None
    try:
        liveness_model = MiniFASNetLiveness(settings.resources_dir / "anti_spoof_models")
    except FaceServiceError as exc:
        state.unavailable["liveness"] = exc.message
        logger.warning("Anti-spoofing is off: %s", exc.message)

    emotion = None
    try:
        classifier = build_emotion_classifier(settings.emotion_model, settings.resources_dir, settings.emotion_tta)
        emotion = EmotionAnalyzer(engine, classifier, settings.max_image_pixels)
    except FaceServiceError as exc:
        state.unavailable["emotion"] = exc.message
        logger.warning("Emotion analysis is off: %s", exc.message)

    # Each model runs once here so that tracing and buffer allocation happen before /health/ready says yes.
    liveness = None
    if liveness_model is not None:
        liveness = LivenessAnalyzer(engine, liveness_model, settings.liveness_threshold, settings.max_image_pixels)
        liveness_model.real_scores(np.full((240, 320, 3), 128, np.uint8), [(100.0, 60.0, 120.0, 120.0)])
    if emotion is not None:
        emotion.classifier.predict(np.zeros((1, 48, 48), np.uint8))

    recognition = RecognitionService(engine, calibration, settings, liveness_model)
    names = {
        "detector": engine.detector.name,
        "embedder": engine.model_id,
        "emotion": None if emotion is None else getattr(emotion.classifier, "name", settings.emotion_model),
        "liveness": None if liveness is None else "minifasnet-v2+v1se",
    }
    return Models(recognition, emotion, liveness, names)
