"""The recognition pipeline: detect -> align -> embed, batch-first, with typed errors for unusable faces."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from api.config import Settings
from api.errors import FaceTooSmallError, MultipleFacesError, NoFaceError
from api.metrics import stage
from api.services.detection import DetectedFace, FaceDetector, build_detector
from api.services.embedding import FaceEmbedder, build_embedder
from api.services.imaging import DecodedImage, decode_image, decode_reduced

FaceSelection = Literal["largest", "central", "single"]

# Where YuNet puts the five landmarks inside its own box, as fractions of the box's width and height: the median
# over 600 LFW faces, image-left and image-right points averaged (eyes, nose tip, mouth corners). A face crop
# without a detectable face is aligned with these, taking the whole crop as the box.
BOX_LANDMARK_TEMPLATE = np.array(
    [[0.259, 0.386], [0.741, 0.386], [0.500, 0.592], [0.290, 0.742], [0.710, 0.742]], np.float32
)
# A tight crop leaves the detector no context around the face: it looks at a copy with this much border added.
CROP_BORDER = 0.25
# A face found in a crop must fill a good part of it to be the crop's face (not one in its background).
CROP_FACE_MIN_FRACTION = 0.3


@dataclass(frozen=True)
class EmbeddedFace:
    face: DetectedFace
    embedding: np.ndarray  # (dimension,) float32, unit length


def central_face_index(boxes: Sequence[tuple[float, float, float, float]], image_shape: tuple[int, ...]) -> int:
    """Index of the box whose centre is nearest the image's centre (the first such box on a tie).

    The ``"central"`` selection rule: on LFW the named person is the one in the middle of the crop. Boxes are
    ``(x, y, width, height)`` in pixels of an image of shape ``(height, width, ...)``; at least one is needed.
    """
    if not boxes:
        raise ValueError("central_face_index needs at least one box")
    height, width = image_shape[:2]
    centre = np.array([width / 2.0, height / 2.0])
    distances = [float(np.hypot(*(np.array([x + w / 2, y + h / 2]) - centre))) for x, y, w, h in boxes]
    return int(np.argmin(distances))


class FaceEngine:
    def __init__(
        self, detector: FaceDetector, embedder: FaceEmbedder, min_face_size: int = 40, decode_min_side: int = 0
    ) -> None:
        self.detector = detector
        self.embedder = embedder
        self.aligner = embedder.aligner  # each embedder brings the crop it was trained on
        self.min_face_size = min_face_size
        # Large JPEGs are decoded reduced while their longer side stays at least this (0: always full size).
        self.decode_min_side = decode_min_side

    def decode(self, data: bytes, max_pixels: int, face_crop: bool = False) -> DecodedImage:
        """The photo as detection needs it: large JPEGs at reduced size (never a client's face crop)."""
        with stage("decode"):
            return decode_reduced(data, max_pixels, 0 if face_crop else self.decode_min_side)

    def at_full_size_if_small(
        self, data: bytes, max_pixels: int, decoded: DecodedImage, faces: list[DetectedFace], min_face: int
    ) -> tuple[np.ndarray, list[DetectedFace], float]:
        """The image, the faces in its pixels and its scale: the reduced decode when every face in it measures
        at least ``min_face`` pixels (what the crops of the models need), else the photo decoded at full size
        again with the faces mapped onto it, so that a small face never loses detail to the reduced decode."""
        if decoded.scale < 1.0 and faces and min(face.size for face in faces) < min_face:
            with stage("decode"):
                return decode_image(data, max_pixels), [face.scaled(1.0 / decoded.scale) for face in faces], 1.0
        return decoded.pixels, faces, decoded.scale

    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    def detect(self, image_rgb: np.ndarray) -> list[DetectedFace]:
        return self.detector.detect(image_rgb)

    def align(self, image_rgb: np.ndarray, faces: list[DetectedFace]) -> np.ndarray:
        if not faces:
            return np.zeros((0, *self.embedder.chip_shape), np.uint8)
        return np.stack([self.aligner.align(image_rgb, face) for face in faces])

    def embed(self, image_rgb: np.ndarray, faces: list[DetectedFace]) -> np.ndarray:
        """Descriptors of ``faces`` in one batch: (len(faces), dimension)."""
        return self.embedder.embed(self.align(image_rgb, faces))

    def embed_chips(self, chips: np.ndarray) -> np.ndarray:
        return self.embedder.embed(chips)

    def select_face(
        self,
        image_rgb: np.ndarray,
        faces: list[DetectedFace],
        selection: FaceSelection = "largest",
        scale: float = 1.0,
    ) -> DetectedFace:
        """The face a request is about; raises NO_FACE, FACE_TOO_SMALL or MULTIPLE_FACES. ``scale``: pixels
        of ``image_rgb`` per pixel of the photo (a reduced decode); face sizes are judged in the photo's."""
        if not faces:
            raise NoFaceError("No face was found in the image.")
        usable = [face for face in faces if face.size / scale >= self.min_face_size]
        if not usable:
            size = faces[0].size / scale
            raise FaceTooSmallError(
                f"The face is too small ({size:.0f} px); at least {self.min_face_size} px is needed.",
                face_size=round(size),
                min_face_size=self.min_face_size,
            )
        if selection == "single":
            if len(usable) > 1:
                raise MultipleFacesError(
                    f"The image holds {len(usable)} faces; exactly one is needed.", faces=len(usable)
                )
            return usable[0]
        if selection == "central":
            return usable[central_face_index([face.box for face in usable], image_rgb.shape)]
        return usable[0]  # detectors return faces largest first

    def face_of_crop(self, image_rgb: np.ndarray) -> DetectedFace:
        """The face of an image that a client already cropped to one face (``face_crop=true``): what the
        detector finds in it, looking at a copy with a replicated border; else the whole image with the
        template landmarks. Never NO_FACE or MULTIPLE_FACES; FACE_TOO_SMALL when the crop itself is small."""
        import cv2

        height, width = image_rgb.shape[:2]
        if min(height, width) < self.min_face_size:
            raise FaceTooSmallError(
                f"The face crop is too small ({min(height, width)} px); at least {self.min_face_size} px is needed.",
                face_size=min(height, width),
                min_face_size=self.min_face_size,
            )
        border = round(max(height, width) * CROP_BORDER)
        padded = cv2.copyMakeBorder(image_rgb, border, border, border, border, cv2.BORDER_REPLICATE)
        for face in self.detect(padded):  # largest first
            x, y, w, h = face.box
            centre_x, centre_y = x + w / 2 - border, y + h / 2 - border
            inside = 0 <= centre_x < width and 0 <= centre_y < height
            if inside and face.size >= CROP_FACE_MIN_FRACTION * min(height, width):
                landmarks = None if face.landmarks is None else face.landmarks - np.float32(border)
                return DetectedFace((x - border, y - border, w, h), face.score, landmarks)
        template = BOX_LANDMARK_TEMPLATE * np.array([width, height], np.float32)
        return DetectedFace((0.0, 0.0, float(width), float(height)), 0.0, template)

    def represent(self, image_rgb: np.ndarray, selection: FaceSelection = "largest") -> EmbeddedFace:
        faces = self.detect(image_rgb)
        face = self.select_face(image_rgb, faces, selection)
        return EmbeddedFace(face, self.embed(image_rgb, [face])[0])

    def warm_up(self) -> None:
        """Run every model once so the first request does not pay for tracing and allocation."""
        blank = np.full((480, 640, 3), 128, np.uint8)
        self.detect(blank)
        self.embedder.embed(np.zeros((1, *self.embedder.chip_shape), np.uint8))


def build_engine(settings: Settings) -> FaceEngine:
    detector = build_detector(
        settings.detector,
        settings.detection_confidence,
        settings.detect_max_side,
        settings.detect_min_side,
        settings.detect_first_pass_side,
        settings.detector_runtime,
        settings.detector_model_path,
    )
    embedder = build_embedder(
        settings.embedder,
        settings.embedding_model_path,
        settings.flip_augmentation,
        settings.inference_threads,
        settings.facenet_model_path,
        settings.inference_runtime,
    )
    decode_min_side = settings.detect_max_side if settings.reduced_decoding else 0
    return FaceEngine(detector, embedder, settings.min_face_size, decode_min_side)
