"""Face detectors behind one interface: boxes, scores and five landmarks in original-image pixels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from api.ml.registry import YUNET

# Landmark order used everywhere in the project (image left to right, as YuNet emits them):
# eye on the image's left, eye on the image's right, nose tip, mouth corner left, mouth corner right.
LANDMARK_NAMES = ("eye_left", "eye_right", "nose", "mouth_left", "mouth_right")


@dataclass(frozen=True)
class DetectedFace:
    """One face. ``box`` is (x, y, w, h) in pixels of the image given to the detector."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray | None  # (5, 2) float32, same pixel frame as ``box``; None if the backend has none

    @property
    def size(self) -> float:
        """The shorter side of the box: what 'too small' is judged on."""
        return float(min(self.box[2], self.box[3]))

    @property
    def area(self) -> float:
        return float(self.box[2] * self.box[3])

    def scaled(self, factor: float) -> DetectedFace:
        if factor == 1.0:
            return self
        landmarks = None if self.landmarks is None else (self.landmarks * factor).astype(np.float32)
        return DetectedFace(tuple(float(v) * factor for v in self.box), self.score, landmarks)  # type: ignore[arg-type]


class FaceDetector(Protocol):
    name: str

    def detect(self, image_rgb: np.ndarray) -> list[DetectedFace]:
        """All faces in an RGB uint8 image, largest first."""
        ...


def _resize_factor(height: int, width: int, max_side: int, min_side: int) -> float:
    longest = max(height, width)
    if longest > max_side:
        return max_side / longest
    if longest < min_side:
        return min_side / longest
    return 1.0


class YuNetDetector:
    """YuNet (libfacedetection, the library of the ``yuface`` wheel): ~35-42 ms at 640 px on one core here.

    Photos are resized so that the longer side lies in [min_side, max_side] before detection: large photos
    are slow and YuNet is trained on faces of moderate size; small photos (LFW's 150 px copies) are upscaled
    because YuNet returns integer landmark coordinates, which on a 60 px face is a coarse grid.
    """

    name = YUNET.id

    def __init__(
        self,
        confidence: float = 0.6,
        max_side: int = 640,
        min_side: int = 300,
        first_pass_side: int = 320,
        first_pass_min_face: int = 40,
    ) -> None:
        self._detect_raw = _libfacedetection()
        self.confidence = confidence
        self.max_side = max_side
        self.min_side = min_side
        self.first_pass_side = first_pass_side
        self.first_pass_min_face = first_pass_min_face

    def detect(self, image_rgb: np.ndarray) -> list[DetectedFace]:
        """Two passes for large photos: a quick look at ``first_pass_side``, and the full ``max_side`` pass
        only when that look finds no face or a face too small to trust its landmarks or to rule out smaller
        faces nearby. YuNet's cost grows with the pixel count (~42 ms at 640x512, ~12 ms at 320x256 here),
        and most photos sent to a recognition API show one face of a good size.
        """
        height, width = image_rgb.shape[:2]
        if 0 < self.first_pass_side < min(self.max_side, max(height, width)):
            factor = _resize_factor(height, width, self.first_pass_side, self.min_side)
            faces = self._detect_at(image_rgb, factor)
            if faces and min(f.size for f in faces) * factor >= self.first_pass_min_face:
                faces.sort(key=lambda f: f.area, reverse=True)
                return faces
        faces = self._detect_at(image_rgb, _resize_factor(height, width, self.max_side, self.min_side))
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def _detect_at(self, image_rgb: np.ndarray, factor: float) -> list[DetectedFace]:
        """Faces in ``image_rgb`` resized by ``factor``, mapped back to ``image_rgb``'s pixels."""
        height, width = image_rgb.shape[:2]
        work = image_rgb
        if factor != 1.0:
            interpolation = cv2.INTER_AREA if factor < 1.0 else cv2.INTER_LINEAR
            work = cv2.resize(
                image_rgb,
                # at least 1 px: a 1x2000 strip would otherwise be resized to width 0 (cv2.error)
                (max(1, round(width * factor)), max(1, round(height * factor))),
                interpolation=interpolation,
            )
        bgr = np.ascontiguousarray(work[:, :, ::-1])
        rows = self._detect_raw(bgr)
        rows = rows[rows[:, 0] > self.confidence * 100]
        faces = []
        for conf, box, marks in zip(rows[:, 0], rows[:, 1:5], rows[:, 5:15], strict=True):
            x, y, w, h = (float(v) for v in box)
            # Clip the box to the image: YuNet boxes can reach past the border for faces cut by it.
            x0, y0 = max(0.0, x), max(0.0, y)
            x1, y1 = min(float(work.shape[1]), x + w), min(float(work.shape[0]), y + h)
            if x1 - x0 < 2 or y1 - y0 < 2:
                continue
            face = DetectedFace(
                box=(x0, y0, x1 - x0, y1 - y0),
                score=float(conf) / 100.0,
                landmarks=np.asarray(marks, dtype=np.float32).reshape(5, 2),
            )
            faces.append(face.scaled(1.0 / factor) if factor != 1.0 else face)
        return faces


# libfacedetection's result buffer: an int count, then 16 int16 per face (score 0..100, x, y, w, h, 5 x/y
# landmark pairs, padding). Its size is the library's documented DETECT_BUFFER_SIZE.
_RESULT_BUFFER_BYTES = 0x20000
_VALUES_PER_FACE = 16


def _libfacedetection() -> Callable[[np.ndarray], np.ndarray]:
    """YuNet's C entry point, called through ctypes rather than yuface's extension module.

    yuface's extension holds the GIL for the whole detection (~15-140 ms): while one request detected, the
    event loop and every other thread stood still (/health/live took >100 ms under 8 concurrent verifies).
    A ctypes call releases the GIL, so detections run in parallel with each other and with the event loop.
    The library file is the one the ``yuface`` wheel ships.
    """
    import ctypes

    import yuface

    library = ctypes.CDLL(str(Path(yuface.__file__).parent / "libfacedetection.so"))
    function = library._Z14facedetect_cnnPhS_iii  # facedetect_cnn(uchar* buffer, uchar* bgr, int w, int h, int step)
    function.restype = ctypes.POINTER(ctypes.c_int)
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]

    def detect(bgr: np.ndarray) -> np.ndarray:
        bgr = np.ascontiguousarray(bgr, dtype=np.uint8)
        buffer = np.zeros(_RESULT_BUFFER_BYTES, np.uint8)  # one per call: concurrent calls share nothing
        result = function(buffer.ctypes.data, bgr.ctypes.data, bgr.shape[1], bgr.shape[0], bgr.strides[0])
        count = int(result[0]) if result else 0
        count = min(count, (_RESULT_BUFFER_BYTES - 4) // (2 * _VALUES_PER_FACE))
        # Signed: a face cut by the image border has a negative x or y.
        values = np.frombuffer(buffer, np.int16, count=_VALUES_PER_FACE * count, offset=4)
        return values.reshape(count, _VALUES_PER_FACE).copy()

    return detect


class DeepFaceDetector:
    """Any of deepface's detector backends (opencv, mtcnn, dlib, ssd, ...) as an alternative to YuNet.

    deepface reports only the two eye centres; nose and mouth are left out, so the aligner falls back to an
    eye-based similarity transform for these backends.
    """

    def __init__(self, backend: str, confidence: float = 0.6) -> None:
        from deepface.modules import modeling

        self.name = backend
        self.confidence = confidence
        self._model = modeling.build_model(task="face_detector", model_name=backend)

    def detect(self, image_rgb: np.ndarray) -> list[DetectedFace]:
        bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
        faces = []
        for region in self._model.detect_faces(bgr):
            score = float(region.confidence or 0.0)
            if score and score < self.confidence:
                continue
            landmarks = None
            if region.left_eye is not None and region.right_eye is not None:
                # deepface names eyes from the subject's view: its right_eye is on the image's left.
                left, right = (
                    np.asarray(region.right_eye, np.float32),
                    np.asarray(region.left_eye, np.float32),
                )
                landmarks = np.stack([left, right, *([np.full(2, np.nan, np.float32)] * 3)])
            faces.append(DetectedFace((region.x, region.y, region.w, region.h), score or 1.0, landmarks))
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces


def build_detector(
    name: str, confidence: float, max_side: int, min_side: int, first_pass_side: int = 320
) -> FaceDetector:
    if name == "yunet":
        return YuNetDetector(confidence, max_side, min_side, first_pass_side=first_pass_side)
    return DeepFaceDetector(name, confidence=confidence)
