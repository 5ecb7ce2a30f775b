"""Alignment: the similarity fit, the large-face shrink path, and our chips against dlib's own chips."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

import api  # noqa: F401  (thread pools pinned before numpy, OpenCV or TensorFlow load)
from api.services.alignment import (
    _MIN_DIRECT_SCALE,
    CHIP_SIZE,
    DLIB_CHIP_TEMPLATE,
    SimilarityAligner,
    _shrink_region,
    similarity_transform,
)
from api.services.detection import DetectedFace
from api.services.imaging import decode_image
from tools.common import lfw_images


def _similarity(scale: float, degrees: float, tx: float, ty: float) -> np.ndarray:
    c, s = scale * np.cos(np.radians(degrees)), scale * np.sin(np.radians(degrees))
    return np.array([[c, -s, tx], [s, c, ty]])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.asarray(points, np.float64) @ matrix[:, :2].T + matrix[:, 2]


# --- the similarity fit ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scale", "degrees", "tx", "ty"), [(1.0, 0.0, 0.0, 0.0), (1.7, 23.0, 12.5, -5.0), (0.21, -170.0, 300.0, 42.0)]
)
def test_similarity_transform_recovers_a_known_transform(scale, degrees, tx, ty) -> None:
    rng = np.random.default_rng(0)
    source = rng.uniform(-100, 400, size=(7, 2))
    truth = _similarity(scale, degrees, tx, ty)
    np.testing.assert_allclose(similarity_transform(source, _apply(truth, source)), truth, atol=1e-9)


def test_similarity_transform_from_two_points_is_exact() -> None:
    truth = _similarity(0.8, 37.0, -3.0, 9.0)
    source = np.array([[10.0, 20.0], [55.0, 21.0]])
    np.testing.assert_allclose(similarity_transform(source, _apply(truth, source)), truth, atol=1e-9)


def test_similarity_transform_never_reflects() -> None:
    source = np.random.default_rng(1).uniform(0, 100, size=(5, 2))
    matrix = similarity_transform(source, source * [-1.0, 1.0])  # a mirror image: no similarity fits it
    assert np.linalg.det(matrix[:, :2]) > 0


def test_aligner_puts_landmarks_on_the_template() -> None:
    image_to_chip = _similarity(0.6, -12.0, -40.0, 25.0)
    landmarks = _apply(cv2.invertAffineTransform(image_to_chip), DLIB_CHIP_TEMPLATE).astype(np.float32)
    face = DetectedFace((0.0, 0.0, 300.0, 300.0), 0.9, landmarks)
    matrix = SimilarityAligner().transform(face)
    np.testing.assert_allclose(_apply(matrix, landmarks), DLIB_CHIP_TEMPLATE, atol=1e-3)


def test_aligner_uses_the_eyes_alone_when_the_other_points_are_missing() -> None:
    landmarks = DLIB_CHIP_TEMPLATE.astype(np.float32) * 2 + 10
    landmarks[2:] = np.nan  # deepface backends give the two eyes only
    face = DetectedFace((0.0, 0.0, 300.0, 300.0), 0.9, landmarks)
    matrix = SimilarityAligner().transform(face)
    np.testing.assert_allclose(_apply(matrix, landmarks[:2]), DLIB_CHIP_TEMPLATE[:2], atol=1e-3)


def test_aligner_without_landmarks_centres_the_box() -> None:
    face = DetectedFace((100.0, 50.0, 80.0, 100.0), 0.9, None)
    matrix = SimilarityAligner().transform(face)
    centre = _apply(matrix, [[140.0, 100.0]])[0]
    np.testing.assert_allclose(centre, [CHIP_SIZE / 2, CHIP_SIZE * 0.52], atol=1e-9)


# --- the large-face path (_shrink_region) --------------------------------------------------------------------


def _coordinate_image(size: int) -> np.ndarray:
    """Pixel value = its own (x, y): bilinear sampling and area averaging of a linear ramp are exact."""
    xs = np.tile(np.arange(size, dtype=np.float32), (size, 1))
    return np.dstack([xs, xs.T.copy(), np.zeros_like(xs)])


@pytest.mark.parametrize("scale", [0.6, 0.3, 0.1])
def test_shrink_region_keeps_the_geometry_exactly(scale: float) -> None:
    """Every chip pixel samples the image point that the un-shrunk matrix maps it from.

    Before the fix, the adjusted matrix ignored cv2.resize's pixel-centre alignment and the chip was shifted
    by 0.5 * (0.7 / scale - 1) image pixels: 0.67 px at scale 0.3, 3 px at scale 0.1.
    """
    image = _coordinate_image(2000)
    matrix = _similarity(scale, 11.0, 0.0, 0.0)
    matrix[:, 2] = CHIP_SIZE / 2 - matrix[:, :2] @ [1000.0, 1000.0]
    small, adjusted = _shrink_region(image, matrix, scale, CHIP_SIZE)
    assert small.shape[0] < image.shape[0] * scale / _MIN_DIRECT_SCALE + 5
    chip = cv2.warpAffine(small, adjusted, (CHIP_SIZE, CHIP_SIZE), flags=cv2.INTER_LINEAR)
    rows, cols = np.mgrid[0:CHIP_SIZE, 0:CHIP_SIZE]
    expected = _apply(cv2.invertAffineTransform(matrix), np.stack([cols.ravel(), rows.ravel()], axis=1))
    error = chip[..., :2].reshape(-1, 2) - expected  # image pixels
    inner = ((rows > 5) & (rows < CHIP_SIZE - 6) & (cols > 5) & (cols < CHIP_SIZE - 6)).ravel()
    assert np.abs(error[inner].mean(axis=0)).max() * scale < 0.01  # systematic shift, in chip pixels
    assert np.abs(error[inner]).max() * scale < 0.05


def test_large_face_chip_matches_direct_warping_up_to_blur(astronaut) -> None:
    """A face 4x the size takes the shrink path; its chip is the direct (aliasing) warp, less the aliasing."""
    big = cv2.resize(astronaut, (2048, 2048), interpolation=cv2.INTER_CUBIC)
    # astronaut's YuNet landmarks (fixed here so the test needs no detector), in the 4x image
    landmarks = np.array([[200, 101], [247, 102], [220, 124], [198, 142], [239, 143]], np.float32) * 4 + 1.5
    face = DetectedFace((712.0, 252.0, 356.0, 448.0), 0.93, landmarks)
    aligner = SimilarityAligner()
    matrix = aligner.transform(face)
    assert np.hypot(matrix[0, 0], matrix[0, 1]) < _MIN_DIRECT_SCALE / 2
    shrunk = aligner.align(big, face)
    direct = cv2.warpAffine(
        big, matrix, (CHIP_SIZE, CHIP_SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    assert shrunk.shape == (CHIP_SIZE, CHIP_SIZE, 3) and shrunk.dtype == np.uint8

    def blur(chip: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(chip.astype(np.float32), (0, 0), 1.0)

    # measured (scale 0.33): mean |difference| 0.31 grey levels after a sigma-1 blur (0.77 without), bias -0.01
    difference = blur(shrunk) - blur(direct)
    assert np.abs(difference).mean() < 1.0
    assert abs(difference.mean()) < 0.3
    # and the chip the original 512 px photo gives by direct warping (scale 1.3): measured 0.47
    small_face = DetectedFace((178.0, 63.0, 89.0, 112.0), 0.93, (landmarks - 1.5) / 4)
    reference = aligner.align(astronaut, small_face)
    assert np.abs(blur(shrunk) - blur(reference)).mean() < 1.5


# --- against dlib's chips on real photos ------------------------------------------------------------------------

# Measured on the faces of _dev_photos() (31 faces where HOG and YuNet each find exactly one face):
#   mean displacement of the 4 chip corners (chip px, 150 px chip): median 10.9, max 18.7. The corners lie
#   ~106 px from the chip centre, so this is mostly per-face rotation (std ~4 deg) and scale (std ~5%)
#   disagreement between dlib's eye-corner landmarks and YuNet's eye centres, not a bias:
#   mean corner displacement vector over faces (-0.6, +1.3) px.
#   cosine between descriptors (dlib ResNet, no flip) of dlib's chip and of ours: median 0.9925, min 0.9816.
MAX_MEDIAN_CORNER_ERROR = 14.0
MIN_MEDIAN_COSINE = 0.985
MAX_MEAN_SHIFT = 3.0


def _dev_photos(shared_dir: Path) -> list[Path]:
    # LFW past the first 1,500 images (those were used to derive DLIB_CHIP_TEMPLATE) and deepface photos.
    deepface = sorted((shared_dir / "identity" / "deepface").glob("img*.jpg"))
    return lfw_images(shared_dir.parent)[1500::150] + deepface[::5]


@pytest.mark.shared
def test_chips_match_dlib_geometry_and_descriptors(shared_dir: Path, engine, dlib_landmarks) -> None:
    import dlib

    from tools.derive_chip_template import dlib_chip_to_image_affine

    aligner = SimilarityAligner()
    corners = np.array([[0.0, 0.0], [CHIP_SIZE - 1, 0.0], [0.0, CHIP_SIZE - 1], [CHIP_SIZE - 1, CHIP_SIZE - 1]])
    errors, shifts, pairs, names = [], [], [], []
    for path in _dev_photos(shared_dir):
        image = decode_image(path.read_bytes())
        shape = dlib_landmarks(image)
        faces = engine.detect(image)
        if shape is None or len(faces) != 1:
            continue
        details = dlib.get_face_chip_details(shape, size=CHIP_SIZE, padding=0.25)
        dlib_chip_to_image = dlib_chip_to_image_affine(image.shape[:2], details)
        ours = aligner.transform(faces[0])
        # dlib's chip corners, taken to the image by dlib's mapping and back into our chip frame
        displacement = _apply(ours, _apply(dlib_chip_to_image, corners)) - corners
        errors.append(np.linalg.norm(displacement, axis=1).mean())
        shifts.append(displacement.mean(axis=0))
        pairs.append((np.asarray(dlib.extract_image_chip(image, details)), aligner.align(image, faces[0])))
        names.append(path.name)
    assert len(pairs) >= 20, f"only {len(pairs)} photos had exactly one face for both detectors"
    descriptors = engine.embedder.raw_descriptors(np.stack([chip for pair in pairs for chip in pair]))
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    cosine = (descriptors[0::2] * descriptors[1::2]).sum(axis=1)
    errors, mean_shift = np.array(errors), np.mean(shifts, axis=0)
    summary = (
        f"{len(pairs)} faces; corner error median {np.median(errors):.2f} max {errors.max():.2f} "
        f"({names[int(np.argmax(errors))]}); cosine median {np.median(cosine):.4f} min {cosine.min():.4f} "
        f"({names[int(np.argmin(cosine))]}); mean shift {mean_shift.round(2)}"
    )
    print(summary)
    assert np.median(errors) <= MAX_MEDIAN_CORNER_ERROR, summary
    assert np.median(cosine) >= MIN_MEDIAN_COSINE, summary
    assert np.abs(mean_shift).max() <= MAX_MEAN_SHIFT, summary
