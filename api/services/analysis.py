"""Per-face analyses of a whole photo: emotion of every face, anti-spoofing of every face."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from api.errors import NoFaceError
from api.metrics import stage
from api.services.anti_spoofing import MiniFASNetAntiSpoofing
from api.services.detection import DetectedFace
from api.services.emotion import EMOTION_LABELS, EmotionClassifier, crop_face_for_emotion
from api.services.engine import FaceEngine
from api.services.imaging import decode_image


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


def _faces_of(
    engine: FaceEngine, data: bytes, max_pixels: int, all_faces: bool, face_crop: bool = False
) -> tuple[np.ndarray, list]:
    with stage("decode"):
        image = decode_image(data, max_pixels)
    with stage("detect"):
        if face_crop:  # the client cropped one face already: the whole image is that face
            return image, [engine.face_of_crop(image)]
        faces = engine.detect(image)  # largest first
    if not faces:
        raise NoFaceError("No face was found in the image.")
    return image, faces if all_faces else faces[:1]


class EmotionAnalyzer:
    def __init__(self, engine: FaceEngine, classifier: EmotionClassifier, max_pixels: int) -> None:
        self.engine = engine
        self.classifier = classifier
        self.max_pixels = max_pixels

    def analyze(self, data: bytes, all_faces: bool = True, face_crop: bool = False) -> list[FaceEmotionOutcome]:
        image, faces = _faces_of(self.engine, data, self.max_pixels, all_faces, face_crop)
        with stage("emotion"):
            crops = np.stack([crop_face_for_emotion(image, f.box, f.landmarks) for f in faces])
            probabilities = self.classifier.predict(crops)
        return [
            FaceEmotionOutcome(face, {label: float(p) for label, p in zip(EMOTION_LABELS, row, strict=True)})
            for face, row in zip(faces, probabilities, strict=True)
        ]


class AntiSpoofingAnalyzer:
    def __init__(self, engine: FaceEngine, model: MiniFASNetAntiSpoofing, threshold: float, max_pixels: int) -> None:
        self.engine = engine
        self.model = model
        self.threshold = threshold
        self.max_pixels = max_pixels

    def analyze(self, data: bytes, face_crop: bool = False) -> list[FaceSpoofOutcome]:
        image, faces = _faces_of(self.engine, data, self.max_pixels, all_faces=True, face_crop=face_crop)
        with stage("anti_spoofing"):
            scores = self.model.real_scores(image, [f.box for f in faces])
        return [
            FaceSpoofOutcome(face, float(s), bool(s >= self.threshold)) for face, s in zip(faces, scores, strict=True)
        ]
