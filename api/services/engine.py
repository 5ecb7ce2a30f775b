"""The recognition pipeline: detect -> align -> embed, batch-first, with typed errors for unusable faces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from api.config import Settings
from api.errors import FaceTooSmallError, MultipleFacesError, NoFaceError
from api.services.alignment import FaceAligner, SimilarityAligner
from api.services.detection import DetectedFace, FaceDetector, build_detector
from api.services.embedding import FaceEmbedder, build_embedder

FaceSelection = Literal["largest", "central", "single"]


@dataclass(frozen=True)
class EmbeddedFace:
    face: DetectedFace
    embedding: np.ndarray  # (dimension,) float32, unit length


class FaceEngine:
    def __init__(
        self, detector: FaceDetector, aligner: FaceAligner, embedder: FaceEmbedder, min_face_size: int = 40
    ) -> None:
        self.detector = detector
        self.aligner = aligner
        self.embedder = embedder
        self.min_face_size = min_face_size

    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    def detect(self, image_rgb: np.ndarray) -> list[DetectedFace]:
        return self.detector.detect(image_rgb)

    def align(self, image_rgb: np.ndarray, faces: list[DetectedFace]) -> np.ndarray:
        if not faces:
            size = self.embedder.chip_size
            return np.zeros((0, size, size, 3), np.uint8)
        return np.stack([self.aligner.align(image_rgb, face) for face in faces])

    def embed(self, image_rgb: np.ndarray, faces: list[DetectedFace]) -> np.ndarray:
        """Descriptors of ``faces`` in one batch: (len(faces), dimension)."""
        return self.embedder.embed(self.align(image_rgb, faces))

    def embed_chips(self, chips: np.ndarray) -> np.ndarray:
        return self.embedder.embed(chips)

    def select_face(
        self, image_rgb: np.ndarray, faces: list[DetectedFace], selection: FaceSelection = "largest"
    ) -> DetectedFace:
        """The face a request is about; raises NO_FACE, FACE_TOO_SMALL or MULTIPLE_FACES."""
        if not faces:
            raise NoFaceError("No face was found in the image.")
        usable = [face for face in faces if face.size >= self.min_face_size]
        if not usable:
            raise FaceTooSmallError(
                f"The face is too small ({faces[0].size:.0f} px); at least {self.min_face_size} px is needed.",
                face_size=round(faces[0].size),
                min_face_size=self.min_face_size,
            )
        if selection == "single":
            if len(usable) > 1:
                raise MultipleFacesError(
                    f"The image holds {len(usable)} faces; exactly one is needed.", faces=len(usable)
                )
            return usable[0]
        if selection == "central":
            height, width = image_rgb.shape[:2]
            centre = np.array([width / 2.0, height / 2.0])
            return min(
                usable,
                key=lambda f: float(np.hypot(*(np.array([f.box[0] + f.box[2] / 2, f.box[1] + f.box[3] / 2]) - centre))),
            )
        return usable[0]  # detectors return faces largest first

    def represent(self, image_rgb: np.ndarray, selection: FaceSelection = "largest") -> EmbeddedFace:
        faces = self.detect(image_rgb)
        face = self.select_face(image_rgb, faces, selection)
        return EmbeddedFace(face, self.embed(image_rgb, [face])[0])

    def warm_up(self) -> None:
        """Run every model once so the first request does not pay for tracing and allocation."""
        blank = np.full((480, 640, 3), 128, np.uint8)
        self.detect(blank)
        self.embedder.embed(np.zeros((1, self.embedder.chip_size, self.embedder.chip_size, 3), np.uint8))


def build_engine(settings: Settings) -> FaceEngine:
    detector = build_detector(
        settings.detector,
        settings.detection_confidence,
        settings.detect_max_side,
        settings.detect_min_side,
        settings.detect_first_pass_side,
    )
    embedder = build_embedder(
        settings.embedder,
        settings.embedding_model_path,
        settings.flip_augmentation,
        settings.inference_threads,
    )
    return FaceEngine(detector, SimilarityAligner(), embedder, settings.min_face_size)
