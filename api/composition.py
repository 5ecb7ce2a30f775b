"""The composition root: one place that builds the whole service from settings.

The app's lifespan, the command line (``python -m api.cli``) and the tools all build what they need here, so
the models, the store and the checks around them are wired the same way everywhere:

    service = build_service(Settings())          # store + models (seconds: the models load and warm up)
    service.models.recognition.verify(service.store, upload, None, 5, False)

The app builds the two halves separately (:func:`open_store` at once, :func:`load_models` in the background)
so that ``/health/live`` answers while the models load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from api.config import Settings
from api.errors import FaceServiceError
from api.services.analysis import AntiSpoofingAnalyzer, EmotionAnalyzer
from api.services.batching import BatchedComponent, BatchFunction, DynamicBatcher
from api.services.recognition import RecognitionService
from api.store import FaceStore, open_store

if TYPE_CHECKING:
    from api.services.anti_spoofing import MiniFASNetAntiSpoofing
    from api.services.engine import FaceEngine

logger = logging.getLogger(__name__)


@dataclass
class Models:
    """Every model, loaded and warmed once. Optional features that could not load are None, with the reason."""

    recognition: RecognitionService
    emotion: EmotionAnalyzer | None
    anti_spoofing: AntiSpoofingAnalyzer | None
    names: dict[str, str | None]  # what GET / reports: the id of each loaded model
    unavailable: dict[str, str] = field(default_factory=dict)  # optional feature -> why it is off


@dataclass
class FaceService:
    """What the service is made of, outside any request."""

    settings: Settings
    store: FaceStore
    models: Models

    def close(self) -> None:
        self.store.close()


def build_service(settings: Settings | None = None) -> FaceService:
    """The store and every model, from ``settings`` (the environment when None)."""
    settings = settings or Settings()
    store = open_store(settings)
    try:
        return FaceService(settings, store, load_models(settings))
    except BaseException:
        store.close()
        raise


def load_models(settings: Settings) -> Models:
    """Load and warm every model once (slow: seconds). Optional features that cannot load are switched off."""
    from api.services.anti_spoofing import MiniFASNetAntiSpoofing
    from api.services.emotion import build_emotion_classifier
    from api.services.engine import build_engine
    from api.services.matching import Calibration

    unavailable: dict[str, str] = {}
    engine = build_engine(settings)
    engine.warm_up()
    calibration = Calibration.load(settings.resources_dir / "calibration.json", engine.model_id)

    anti_spoofing_model = None
    try:
        anti_spoofing_model = MiniFASNetAntiSpoofing(
            settings.resources_dir / "anti_spoof_models", settings.inference_runtime, settings.inference_threads
        )
    except FaceServiceError as exc:
        unavailable["anti_spoofing"] = exc.message
        logger.warning("Anti-spoofing is off: %s", exc.message)

    emotion = None
    try:
        classifier = build_emotion_classifier(
            settings.emotion_model,
            settings.resources_dir,
            settings.emotion_tta,
            settings.inference_runtime,
            settings.inference_threads,
        )
        emotion = EmotionAnalyzer(engine, classifier, settings.max_image_pixels)
    except FaceServiceError as exc:
        unavailable["emotion"] = exc.message
        logger.warning("Emotion analysis is off: %s", exc.message)

    # Each model runs once here so that tracing and buffer allocation happen before /health/ready says yes.
    anti_spoofing = None
    if anti_spoofing_model is not None:
        anti_spoofing = AntiSpoofingAnalyzer(
            engine, anti_spoofing_model, settings.liveness_threshold, settings.max_image_pixels
        )
        anti_spoofing_model.real_scores(np.full((240, 320, 3), 128, np.uint8), [(100.0, 60.0, 120.0, 120.0)])
    if emotion is not None:
        emotion.classifier.predict(np.zeros((1, 48, 48), np.uint8))

    _batch_across_requests(settings, engine, emotion, anti_spoofing_model)
    recognition = RecognitionService(engine, calibration, settings, anti_spoofing_model)
    names = {
        "detector": engine.detector.name,
        "embedder": engine.model_id,
        "emotion": None if emotion is None else getattr(emotion.classifier, "name", settings.emotion_model),
        # The key keeps its published name; the value is the anti-spoofing model's id.
        "liveness": None if anti_spoofing_model is None else anti_spoofing_model.model_id,
    }
    return Models(recognition, emotion, anti_spoofing, names, unavailable)


def _batch_across_requests(
    settings: Settings,
    engine: FaceEngine,
    emotion: EmotionAnalyzer | None,
    anti_spoofing: MiniFASNetAntiSpoofing | None,
) -> None:
    """Route every model's batch call through a DynamicBatcher, so that the faces of concurrent requests share
    one call (``FACE_BATCH_MAX_FACES=1`` turns it off). Done after warm-up, so that warm-up runs unbatched."""
    if settings.batch_max_faces <= 1:
        return
    wait_s = settings.batch_max_wait_ms / 1000.0

    def batcher(function: BatchFunction, name: str) -> DynamicBatcher:
        return DynamicBatcher(function, name, settings.batch_max_faces, wait_s)

    engine.embedder = BatchedComponent(  # type: ignore[assignment]
        engine.embedder, "embed", batcher(engine.embedder.embed, "embedder")
    )
    if emotion is not None:
        emotion.classifier = BatchedComponent(  # type: ignore[assignment]
            emotion.classifier, "predict", batcher(emotion.classifier.predict, "emotion")
        )
    if anti_spoofing is not None:
        anti_spoofing.score_crops = batcher(anti_spoofing.score_crops_now, "anti_spoofing")
