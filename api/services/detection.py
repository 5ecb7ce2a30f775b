"""Face detectors behind one interface: boxes, scores and five landmarks in original-image pixels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args

import cv2
import numpy as np

from api.config import Settings
from api.errors import ModelUnavailableError
from api.ml.registry import YUNET
from api.ml.yunet import PAD_TO, STRIDES, library_path

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


DetectorRuntime = Literal["onnx", "library"]
DETECTOR_RUNTIMES: tuple[str, ...] = get_args(DetectorRuntime)

# A YuNet backend: an RGB uint8 image and a score floor in; the faces found, after non-maximum suppression,
# as float32 rows (score 0..1, x, y, w, h, then the 5 landmarks as x, y pairs) in that image's pixels.
YuNetBackend = Callable[[np.ndarray, float], np.ndarray]


class YuNetDetector:
    """YuNet (libfacedetection, the library of the ``yuface`` wheel), boxes and five landmarks.

    ``runtime`` "onnx" (the default) runs the library's network in ONNX Runtime (:class:`YuNetOnnx`); "library"
    calls the library itself, which has no AVX2 code and takes about twice as long end to end
    (``python -m tools.bench_engine``). Both give the same faces, with whole-pixel coordinates and scores in
    whole percent.

    Photos are resized so that the longer side lies in [min_side, max_side] before detection: large photos
    are slow and YuNet is trained on faces of moderate size; small photos (LFW's 150 px copies) are upscaled
    so that a 60 px face has landmarks precise enough to align it (the library's are whole pixels).
    """

    name = YUNET.id

    def __init__(
        self,
        confidence: float = 0.6,
        max_side: int = 640,
        min_side: int = 300,
        first_pass_side: int = 320,
        first_pass_min_face: int = 40,
        runtime: DetectorRuntime = "onnx",
        model_path: Path | None = None,
    ) -> None:
        """``model_path``: the ONNX graph (runtime "onnx"); by default the configured one
        (``FACE_DETECTOR_MODEL_PATH``, ``resources/face_detector_yunet.onnx``)."""
        if runtime not in DETECTOR_RUNTIMES:
            raise ValueError(f"the detector runtime must be one of {', '.join(DETECTOR_RUNTIMES)}, not {runtime!r}")
        if runtime == "onnx":
            self._find: YuNetBackend = YuNetOnnx(model_path or Settings().detector_model_path)
        else:
            self._find = _libfacedetection()
        self.runtime = runtime
        self.confidence = confidence
        self.max_side = max_side
        self.min_side = min_side
        self.first_pass_side = first_pass_side
        self.first_pass_min_face = first_pass_min_face

    def detect(self, image_rgb: np.ndarray) -> list[DetectedFace]:
        """Two passes for large photos: a quick look at ``first_pass_side``, and the full ``max_side`` pass
        only when that look finds no face or a face too small to trust its landmarks or to rule out smaller
        faces nearby. YuNet's cost grows with the pixel count (~4x from 320 to 640 px), and most photos sent
        to a recognition API show one face of a good size.
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
        rows = self._find(work, self.confidence)
        rows = rows[rows[:, 0] > self.confidence]
        faces = []
        for score, box, marks in zip(rows[:, 0], rows[:, 1:5], rows[:, 5:15], strict=True):
            x, y, w, h = (float(v) for v in box)
            # Clip the box to the image: YuNet boxes can reach past the border for faces cut by it.
            x0, y0 = max(0.0, x), max(0.0, y)
            x1, y1 = min(float(work.shape[1]), x + w), min(float(work.shape[0]), y + h)
            if x1 - x0 < 2 or y1 - y0 < 2:
                continue
            face = DetectedFace(
                box=(x0, y0, x1 - x0, y1 - y0),
                score=float(score),
                landmarks=np.asarray(marks, dtype=np.float32).reshape(5, 2),
            )
            faces.append(face.scaled(1.0 / factor) if factor != 1.0 else face)
        return faces


# How libfacedetection turns its network's outputs into faces (``detection_output``); YuNetOnnx does the same.
LIBRARY_MIN_SCORE = 0.2  # candidates below this score are dropped before suppression
LIBRARY_NMS_IOU = 0.45  # a candidate overlapping a kept face by more than this is suppressed
LIBRARY_TOP_K = 1000  # candidates considered, best first
LIBRARY_KEEP_TOP_K = 512  # faces returned at most


class YuNetOnnx:
    """libfacedetection's network in ONNX Runtime, from the graph ``make models`` writes (:mod:`api.ml.yunet`),
    decoded as the library decodes it:
    priors on a grid per stride (8, 16, 32), boxes from centre offsets and log sizes, five landmarks as
    offsets, score = sqrt(sigmoid(cls) * sigmoid(obj)), then greedy non-maximum suppression.

    Scores are truncated to whole percent and coordinates to whole pixels, as the library returns them, so that
    the detections, and every accuracy figure and calibration measured with the library, stay the same
    (LFW gives the library's result to the last pair). One intra-op thread: the network is too small to split.
    """

    def __init__(self, path: Path) -> None:
        from api.ml.runtime import OnnxNetwork

        if not Path(path).is_file():
            raise ModelUnavailableError(
                f"{path} is missing: `make models` (python -m tools.fetch_models) writes it from libfacedetection's "
                "weights",
                path=str(path),
            )
        self._network = OnnxNetwork(Path(path), threads=1)

    def __call__(self, image_rgb: np.ndarray, min_score: float) -> np.ndarray:
        height, width = image_rgb.shape[:2]
        padded = np.zeros((1, 3, -(-height // PAD_TO) * PAD_TO, -(-width // PAD_TO) * PAD_TO), np.float32)
        padded[0, :, :height, :width] = image_rgb.transpose(2, 0, 1)
        heads = self._network.outputs(padded)
        floor = max(min_score, LIBRARY_MIN_SCORE)
        rows = np.concatenate([_decode_level(heads, level, stride, floor) for level, stride in enumerate(STRIDES)])
        faces = _suppress(rows)
        faces[:, 0] = np.floor(faces[:, 0] * 100.0) / 100.0
        faces[:, 1:] = np.trunc(faces[:, 1:])
        return faces


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(logits, -88.37, 88.37)))


def _decode_level(heads: dict[str, np.ndarray], level: int, stride: int, min_score: float) -> np.ndarray:
    """The candidates of one stride scoring at least ``min_score``, as backend rows, in grid order."""
    score = np.sqrt(_sigmoid(heads[f"cls{level}"][0, 0]) * _sigmoid(heads[f"obj{level}"][0, 0]))
    ys, xs = np.nonzero(score >= min_score)
    box = heads[f"box{level}"][0][:, ys, xs]  # (4, n): centre offset x, y in strides, log width, log height
    marks = heads[f"landmarks{level}"][0][:, ys, xs]  # (10, n): x, y offsets in strides
    centre_x, centre_y = (box[0] + xs) * stride, (box[1] + ys) * stride
    box_w, box_h = np.exp(box[2]) * stride, np.exp(box[3]) * stride
    marks_x, marks_y = (marks[0::2] + xs) * stride, (marks[1::2] + ys) * stride
    landmarks = np.stack([marks_x, marks_y], axis=1).reshape(10, -1)  # x0, y0, x1, y1, ...
    columns = [score[ys, xs], centre_x - box_w / 2, centre_y - box_h / 2, box_w, box_h, *landmarks]
    return np.stack(columns, axis=1).astype(np.float32)


def _suppress(rows: np.ndarray) -> np.ndarray:
    """Greedy non-maximum suppression, best score first (ties in grid order), as libfacedetection does it."""
    rows = rows[np.argsort(-rows[:, 0], kind="stable")[:LIBRARY_TOP_K]]
    x0, y0 = rows[:, 1], rows[:, 2]
    x1, y1 = x0 + rows[:, 3], y0 + rows[:, 4]
    area = rows[:, 3] * rows[:, 4]
    keep: list[int] = []
    candidates = np.arange(len(rows))
    while candidates.size and len(keep) < LIBRARY_KEEP_TOP_K:
        best, rest = candidates[0], candidates[1:]
        keep.append(int(best))
        overlap_w = np.minimum(x1[best], x1[rest]) - np.maximum(x0[best], x0[rest])
        overlap_h = np.minimum(y1[best], y1[rest]) - np.maximum(y0[best], y0[rest])
        inter = np.where((overlap_w > 0) & (overlap_h > 0), overlap_w * overlap_h, 0.0)
        union = np.maximum(area[best] + area[rest] - inter, np.finfo(np.float32).tiny)
        candidates = rest[inter / union <= LIBRARY_NMS_IOU]
    return rows[keep]


# libfacedetection's result buffer: an int count, then 16 int16 per face (score 0..100, x, y, w, h, 5 x/y
# landmark pairs, padding). Its size is the library's documented DETECT_BUFFER_SIZE.
_RESULT_BUFFER_BYTES = 0x20000
_VALUES_PER_FACE = 16


def _libfacedetection() -> YuNetBackend:
    """YuNet's C entry point, called through ctypes rather than yuface's extension module.

    yuface's extension holds the GIL for the whole detection (~15-140 ms): while one request detected, the
    event loop and every other thread stood still (/health/live took >100 ms under 8 concurrent verifies).
    A ctypes call releases the GIL, so detections run in parallel with each other and with the event loop.
    The library file is the one the ``yuface`` wheel ships.
    """
    import ctypes

    library = ctypes.CDLL(str(library_path()))
    function = library._Z14facedetect_cnnPhS_iii  # facedetect_cnn(uchar* buffer, uchar* bgr, int w, int h, int step)
    function.restype = ctypes.POINTER(ctypes.c_int)
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]

    def detect(image_rgb: np.ndarray, min_score: float) -> np.ndarray:
        bgr = np.ascontiguousarray(image_rgb[:, :, ::-1], dtype=np.uint8)  # the library reads BGR
        buffer = np.zeros(_RESULT_BUFFER_BYTES, np.uint8)  # one per call: concurrent calls share nothing
        result = function(buffer.ctypes.data, bgr.ctypes.data, bgr.shape[1], bgr.shape[0], bgr.strides[0])
        count = int(result[0]) if result else 0
        count = min(count, (_RESULT_BUFFER_BYTES - 4) // (2 * _VALUES_PER_FACE))
        # Signed: a face cut by the image border has a negative x or y.
        values = np.frombuffer(buffer, np.int16, count=_VALUES_PER_FACE * count, offset=4)
        rows = values.reshape(count, _VALUES_PER_FACE)[:, :15].astype(np.float32)
        rows[:, 0] /= 100.0  # whole percent
        return rows[rows[:, 0] >= min_score]

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
    name: str,
    confidence: float,
    max_side: int,
    min_side: int,
    first_pass_side: int = 320,
    runtime: DetectorRuntime = "onnx",
    model_path: Path | None = None,
) -> FaceDetector:
    if name == "yunet":
        return YuNetDetector(
            confidence, max_side, min_side, first_pass_side=first_pass_side, runtime=runtime, model_path=model_path
        )
    return DeepFaceDetector(name, confidence=confidence)
