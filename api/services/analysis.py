"""Per-face analyses of a whole photo: emotion of every face, anti-spoofing of every face."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from api.errors import NoFaceError
from api.metrics import stage
from api.services.anti_spoofing import MiniFASNetAntiSpoofing
from api.services.batching import expecting
from api.services.detection import DetectedFace
from api.services.emotion import EMOTION_LABELS, EmotionClassifier, crop_face_for_emotion
from api.services.engine import FaceEngine


@dataclass(frozen=True)
class FaceEmotionOutcome:
    face: DetectedFace
    probabilities: dict[str, float]

    @property
    def dominant(self) -> str:
        return max(self.probabilities, key=self.probabilities.__getitem__)


@dataclass(frozen=True)
class FaceSpoofOutcome:
    face: DetectedFace
    real_score: float
    is_real: bool


# The smallest face box (pixels) analysed in a reduced decode of a large JPEG: the emotion crop is 48 px and
# the anti-spoofing crops are 80 px of 2.7 and 4 times the box. Smaller faces come from the full-size photo.
ANALYSIS_FACE = 64


def _faces_of(
    engine: FaceEngine, data: bytes, max_pixels: int, all_faces: bool, face_crop: bool = False
) -> tuple[np.ndarray, list[DetectedFace], float]:
    """The image, its faces (largest first, in the image's pixels) and the image's scale to the photo."""
    decoded = engine.decode(data, max_pixels, face_crop)
    with stage("detect"):
        if face_crop:  # the client cropped one face already: the whole image is that face
            return decoded.pixels, [engine.face_of_crop(decoded.pixels)], 1.0
        faces = engine.detect(decoded.pixels)  # largest first
    if not faces:
        raise NoFaceError("No face was found in the image.")
    return engine.at_full_size_if_small(data, max_pixels, decoded, faces if all_faces else faces[:1], ANALYSIS_FACE)


class EmotionAnalyzer:
    def __init__(self, engine: FaceEngine, classifier: EmotionClassifier, max_pixels: int) -> None:
        self.engine = engine
        self.classifier = classifier
        self.max_pixels = max_pixels

    def analyze(self, data: bytes, all_faces: bool = True, face_crop: bool = False) -> list[FaceEmotionOutcome]:
        with expecting(self.classifier):
            image, faces, scale = _faces_of(self.engine, data, self.max_pixels, all_faces, face_crop)
            with stage("emotion"):
                crops = np.stack([crop_face_for_emotion(image, f.box, f.landmarks) for f in faces])
                probabilities = self.classifier.predict(crops)
        return [
            FaceEmotionOutcome(
                face.scaled(1.0 / scale), {label: float(p) for label, p in zip(EMOTION_LABELS, row, strict=True)}
            )
            for face, row in zip(faces, probabilities, strict=True)
        ]


class AntiSpoofingAnalyzer:
    def __init__(self, engine: FaceEngine, model: MiniFASNetAntiSpoofing, threshold: float, max_pixels: int) -> None:
        self.engine = engine
        self.model = model
        self.threshold = threshold
        self.max_pixels = max_pixels

    def analyze(self, data: bytes, face_crop: bool = False) -> list[FaceSpoofOutcome]:
        with expecting(self.model.score_crops):
            image, faces, scale = _faces_of(self.engine, data, self.max_pixels, True, face_crop)
            with stage("anti_spoofing"):
                scores = self.model.real_scores(image, [f.box for f in faces])
        return [
            FaceSpoofOutcome(face.scaled(1.0 / scale), float(s), bool(s >= self.threshold))
            for face, s in zip(faces, scores, strict=True)
        ]
