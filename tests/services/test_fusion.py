"""The fused embedder (FACE_EMBEDDER=dlib-resnet+facenet): FaceNet's own crop, both crops of a face in one
stacked chip, and one descriptor whose inner product is the weighted sum of the two models' cosines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import api  # noqa: F401  (thread pools pinned before numpy, OpenCV or TensorFlow load)
from api.config import Settings
from api.errors import ModelUnavailableError
from api.services.alignment import BoxAligner, SimilarityAligner, StackedAligner, facenet_aligner
from api.services.detection import DetectedFace
from api.services.embedding import FUSED_DLIB_WEIGHT, FusedEmbedder, build_embedder
from api.services.engine import FaceEngine, build_engine
from tests.helpers import deepface_people_similarities


@pytest.fixture(scope="module")
def fused_engine(keras_model_path: Path, facenet_model_path: Path) -> FaceEngine:
    settings = Settings(
        embedder="dlib-resnet+facenet", embedding_model_path=keras_model_path, facenet_model_path=facenet_model_path
    )
    return build_engine(settings)


def test_box_crop_centres_the_box_and_adds_the_margin() -> None:
    face = DetectedFace((100.0, 60.0, 80.0, 100.0), 0.9, None)
    matrix = BoxAligner(margin=0.25, size=160).transform(face)
    centre = matrix @ np.array([140.0, 110.0, 1.0])
    np.testing.assert_allclose(centre, [80.0, 80.0])
    assert matrix[0, 0] == pytest.approx(160 / (100 * 1.25)) and matrix[0, 1] == 0.0  # the longer side, no turn


def test_stacked_chip_holds_each_models_own_crop(astronaut: np.ndarray, engine: FaceEngine) -> None:
    face = engine.select_face(astronaut, engine.detect(astronaut))
    dlib_crop, facenet_crop = SimilarityAligner(), facenet_aligner()
    stacked = StackedAligner([dlib_crop, facenet_crop])
    chip = stacked.align(astronaut, face)
    assert chip.shape == (160, 160, 6) and chip.dtype == np.uint8
    first, second = stacked.split(chip[None])
    np.testing.assert_array_equal(first[0], dlib_crop.align(astronaut, face))
    np.testing.assert_array_equal(second[0], facenet_crop.align(astronaut, face))
    assert not chip[150:, :, :3].any() and not chip[:, 150:, :3].any()  # the padding around dlib's 150 px chip


def test_fused_descriptor_is_the_weighted_sum_of_both_cosines(
    fused_engine: FaceEngine, engine: FaceEngine, astronaut: np.ndarray
) -> None:
    embedder = fused_engine.embedder
    assert isinstance(embedder, FusedEmbedder) and embedder.dimension == 128 + 512
    dlib, facenet = embedder.models
    assert embedder.weights == pytest.approx((FUSED_DLIB_WEIGHT, 1 - FUSED_DLIB_WEIGHT))
    assert dlib.model_id in embedder.model_id and facenet.model_id in embedder.model_id
    # Two different views of one face: the original and a shrunken, shifted copy on a grey canvas.
    canvas = np.full_like(astronaut, 128)
    small = astronaut[::2, ::2]
    canvas[100 : 100 + small.shape[0], 60 : 60 + small.shape[1]] = small
    views = [astronaut, canvas]
    faces = [fused_engine.select_face(v, fused_engine.detect(v)) for v in views]
    chips = np.concatenate([fused_engine.align(v, [f]) for v, f in zip(views, faces, strict=True)])
    fused = fused_engine.embed_chips(chips)
    np.testing.assert_allclose(np.linalg.norm(fused, axis=1), 1.0, atol=1e-5)
    dlib_part, facenet_part = embedder.aligner.split(chips)
    d, f = dlib.embed(dlib_part), facenet.embed(facenet_part)
    expected = FUSED_DLIB_WEIGHT * float(d[0] @ d[1]) + (1 - FUSED_DLIB_WEIGHT) * float(f[0] @ f[1])
    assert float(fused[0] @ fused[1]) == pytest.approx(expected, abs=1e-5)
    # dlib's half is exactly the dlib-only service's descriptor, scaled.
    np.testing.assert_allclose(
        fused[0, :128] / np.sqrt(FUSED_DLIB_WEIGHT), engine.represent(astronaut).embedding, atol=1e-5
    )


def test_fused_engine_batches_and_handles_no_faces(fused_engine: FaceEngine, astronaut: np.ndarray) -> None:
    assert fused_engine.align(astronaut, []).shape == (0, 160, 160, 6)
    assert fused_engine.embed_chips(fused_engine.align(astronaut, [])).shape == (0, 640)
    face = fused_engine.represent(astronaut).face
    one = fused_engine.embed(astronaut, [face])
    three = fused_engine.embed(astronaut, [face, face, face])
    np.testing.assert_allclose(three, np.repeat(one, 3, axis=0), atol=1e-5)


def test_a_missing_facenet_file_says_how_to_build_it(keras_model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="make models"):
        build_embedder("dlib-resnet+facenet", keras_model_path, True, facenet_model_path=tmp_path / "none.keras")
    with pytest.raises(ModelUnavailableError, match="dlib-resnet\\+facenet"):
        build_embedder("dlib+facenet", keras_model_path, True)


@pytest.mark.shared
def test_fused_model_separates_people(fused_engine: FaceEngine, shared_dir: Path) -> None:
    similarity, same = deepface_people_similarities(fused_engine, shared_dir)
    impostor = similarity[~same & ~np.eye(len(same), dtype=bool)]
    assert similarity[same].min() > impostor.max(), (similarity[same].round(3), impostor.max())
