"""Face alignment: each embedder's input crop of a detected face.

dlib's ResNet was trained on chips made by ``dlib.get_face_chip(..., size=150, padding=0.25)``. Our detector
gives other points than dlib's shape predictor, so the target positions below are where YuNet's points fall
in dlib's chips on average: measured on 1,230 LFW faces by ``python -m tools.derive_chip_template``.
FaceNet takes a 160x160 crop of its own (:func:`facenet_aligner`); a fused embedder gets both crops of a face
stacked in one array (:class:`StackedAligner`).
"""

from __future__ import annotations

from typing import Protocol

import cv2
import numpy as np

from api.services.detection import DetectedFace

CHIP_SIZE = 150

# eye_left, eye_right, nose, mouth_left, mouth_right (image left to right), in chip pixels.
DLIB_CHIP_TEMPLATE = np.array(
    [[45.073, 44.453], [102.273, 44.873], [72.305, 78.470], [48.241, 102.879], [98.380, 103.308]],
    dtype=np.float64,
)

# Below this scale (chip pixels per image pixel) bilinear sampling skips pixels and aliases; the face
# region is first shrunk with area averaging, much as dlib's chip extraction does with its pyramid.
_MIN_DIRECT_SCALE = 0.7


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + translation mapping ``source`` onto ``target`` (2x3).

    The closed form of Umeyama (1991), without reflection: points are (N, 2).
    """
    src = np.asarray(source, np.float64)
    dst = np.asarray(target, np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1.0
    rotation = u @ sign @ vt
    variance = (src_c**2).sum() / len(src)
    scale = float((singular * np.diag(sign)).sum() / variance)
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


class FaceAligner(Protocol):
    def align(self, image_rgb: np.ndarray, face: DetectedFace) -> np.ndarray:
        """A ``(size, size, channels)`` uint8 chip of ``face``: what its embedder takes."""
        ...


class SimilarityAligner:
    """Warps the face so its landmarks land on the dlib chip template (bilinear, border replicated)."""

    def __init__(self, template: np.ndarray = DLIB_CHIP_TEMPLATE, size: int = CHIP_SIZE) -> None:
        self.template = np.asarray(template, np.float64) * (size / CHIP_SIZE)
        self.size = size

    def transform(self, face: DetectedFace) -> np.ndarray:
        """The 2x3 image-to-chip matrix for ``face``."""
        if face.landmarks is None:
            return self._box_transform(face)
        marks = np.asarray(face.landmarks, np.float64)
        known = ~np.isnan(marks).any(axis=1)
        if known.sum() < 2:
            return self._box_transform(face)
        return similarity_transform(marks[known], self.template[known])

    def align(self, image_rgb: np.ndarray, face: DetectedFace) -> np.ndarray:
        matrix = self.transform(face)
        scale = float(np.hypot(matrix[0, 0], matrix[0, 1]))
        if scale < _MIN_DIRECT_SCALE:
            image_rgb, matrix = _shrink_region(image_rgb, matrix, scale, self.size)
        return cv2.warpAffine(
            image_rgb, matrix, (self.size, self.size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )

    def _box_transform(self, face: DetectedFace) -> np.ndarray:
        # Without landmarks: place the box where the template's face sits (eyes to mouth span ~60% of it).
        x, y, w, h = face.box
        side = max(w, h)
        scale = (self.size * 0.62) / side
        centre_box = np.array([x + w / 2, y + h / 2])
        centre_chip = np.array([self.size / 2, self.size * 0.52])
        translation = centre_chip - scale * centre_box
        return np.array([[scale, 0.0, translation[0]], [0.0, scale, translation[1]]])


class BoxAligner(SimilarityAligner):
    """A square crop centred on the detector's box, ``1 + margin`` times its longer side, without rotation.

    FaceNet was trained on crops of this kind (an MTCNN box with a margin, not rotated), so it is the other
    candidate beside a landmark alignment when its crop is chosen (``python -m tools.tune_fusion``).
    """

    def __init__(self, margin: float, size: int, shift_y: float = 0.0) -> None:
        super().__init__(DLIB_CHIP_TEMPLATE, size)  # the template goes unused: the box alone places the crop
        self.margin = margin
        self.shift_y = shift_y  # the crop's centre moves down by this fraction of the box's height

    def transform(self, face: DetectedFace) -> np.ndarray:
        x, y, w, h = face.box
        scale = self.size / (max(w, h) * (1.0 + self.margin))
        centre = np.array([x + w / 2, y + h / 2 + self.shift_y * h])
        translation = np.array([self.size / 2, self.size / 2]) - scale * centre
        return np.array([[scale, 0.0, translation[0]], [0.0, scale, translation[1]]])


def scaled_template(scale: float, shift_y: float = 0.0) -> np.ndarray:
    """dlib's chip template zoomed about the chip's centre by ``scale`` (below 1: more context around the
    face) and moved down by ``shift_y`` chip pixels, still in 150-pixel chip units."""
    centre = CHIP_SIZE / 2
    return (DLIB_CHIP_TEMPLATE - centre) * scale + centre + np.array([0.0, shift_y])


class StackedAligner:
    """Several models' crops of one face in one array, along the channel axis: ``(size, size, 3 * k)``, each
    crop in the top-left corner of its own three channels (zero-padded to the largest crop's size).

    One array per face keeps the engine's batch-first flow (chips of many faces and requests concatenate
    along the first axis) when a fused embedder needs a different crop for each of its models.
    """

    def __init__(self, aligners: list[SimilarityAligner]) -> None:
        self.aligners = aligners
        self.size = max(aligner.size for aligner in aligners)

    def align(self, image_rgb: np.ndarray, face: DetectedFace) -> np.ndarray:
        stacked = np.zeros((self.size, self.size, 3 * len(self.aligners)), np.uint8)
        for index, aligner in enumerate(self.aligners):
            stacked[: aligner.size, : aligner.size, 3 * index : 3 * index + 3] = aligner.align(image_rgb, face)
        return stacked

    def split(self, chips: np.ndarray) -> list[np.ndarray]:
        """The per-model crops of a batch of stacked chips, in the aligners' order."""
        return [
            chips[:, : aligner.size, : aligner.size, 3 * index : 3 * index + 3]
            for index, aligner in enumerate(self.aligners)
        ]


FACENET_CROP_SIZE = 160  # FaceNet's input (api.ml.facenet.INPUT_SIZE; that module loads Keras, this one must not)
# FaceNet's crop, chosen among box crops and landmark alignments on LFW pairsDevTrain alone by
# ``python -m tools.tune_fusion`` (docs/benchmarks.md, "Fused embedder").
FACENET_CROP = {"kind": "box", "margin": 0.1, "shift_y": 0.0}


def facenet_aligner(crop: dict[str, float | str] = FACENET_CROP) -> SimilarityAligner:
    """FaceNet's input crop of a face: a ``box`` crop (``margin``, ``shift_y``) or a landmark alignment on
    dlib's template zoomed by ``scale`` and moved down by ``shift_y`` chip pixels (``landmarks``)."""
    if crop["kind"] == "box":
        return BoxAligner(float(crop["margin"]), FACENET_CROP_SIZE, float(crop["shift_y"]))
    template = scaled_template(float(crop["scale"]), float(crop["shift_y"]))
    return SimilarityAligner(template, FACENET_CROP_SIZE)


def _shrink_region(image: np.ndarray, matrix: np.ndarray, scale: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut the chip's source region out, shrink it with INTER_AREA, and adjust the matrix to match."""
    inverse = cv2.invertAffineTransform(matrix)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64) @ inverse.T
    height, width = image.shape[:2]
    x0 = int(np.clip(np.floor(corners[:, 0].min()) - 2, 0, width - 1))
    y0 = int(np.clip(np.floor(corners[:, 1].min()) - 2, 0, height - 1))
    x1 = int(np.clip(np.ceil(corners[:, 0].max()) + 2, x0 + 1, width))
    y1 = int(np.clip(np.ceil(corners[:, 1].max()) + 2, y0 + 1, height))
    region = image[y0:y1, x0:x1]
    factor = scale / _MIN_DIRECT_SCALE * 1.0
    new_w, new_h = max(1, round((x1 - x0) * factor)), max(1, round((y1 - y0) * factor))
    small = cv2.resize(region, (new_w, new_h), interpolation=cv2.INTER_AREA)
    fx, fy = new_w / (x1 - x0), new_h / (y1 - y0)
    # chip = M @ [x, y, 1] for the shrunken region's pixel (u, v). cv2.resize aligns pixel centres, so
    # x = x0 + (u + 0.5) / fx - 0.5 (not x0 + u / fx, which shifted chips by up to 0.35 chip px).
    ox, oy = x0 + 0.5 / fx - 0.5, y0 + 0.5 / fy - 0.5
    adjusted = np.array(
        [
            [matrix[0, 0] / fx, matrix[0, 1] / fy, matrix[0, 0] * ox + matrix[0, 1] * oy + matrix[0, 2]],
            [matrix[1, 0] / fx, matrix[1, 1] / fy, matrix[1, 0] * ox + matrix[1, 1] * oy + matrix[1, 2]],
        ]
    )
    return small, adjusted
