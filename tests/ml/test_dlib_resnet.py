"""dlib's ResNet rebuilt in Keras: strict parsing of the ``.dat`` file and equivalence to dlib itself.

The equivalence tests feed the very same chips (dlib's HOG detector + 5-point predictor +
``dlib.get_face_chip(size=150, padding=0.25)``) to ``dlib.face_recognition_model_v1`` and to the saved
Keras model, so only the network is compared, never the alignment.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import api  # noqa: F401  (thread pools pinned before TensorFlow loads)
from api.ml.dlib_resnet import (
    CHIP_SIZE,
    DESCRIPTOR_SIZE,
    AffineLayer,
    ConvLayer,
    DlibFormatError,
    PoolLayer,
    default_weights_path,
    read_dlib_resnet,
)
from api.services.imaging import decode_image
from tools.common import lfw_images

MIN_COSINE = 0.9999  # measured: >= 0.99999995 on every face (oneDNN float32 vs dlib's own float32 code)
MAX_ABS_DIFF = 1e-4  # measured: <= 4e-7 (descriptor elements are ~0.1, norms ~1.5)


@pytest.fixture(scope="module")
def dat_bytes() -> bytes:
    return default_weights_path().read_bytes()


@pytest.fixture(scope="module")
def weights():
    return read_dlib_resnet(default_weights_path())


@pytest.fixture(scope="module")
def keras_model(keras_model_path: Path):
    import keras

    return keras.saving.load_model(keras_model_path, compile=False)


@pytest.fixture(scope="module")
def dlib_recogniser():
    import dlib
    import face_recognition_models

    return dlib.face_recognition_model_v1(face_recognition_models.face_recognition_model_location())


# --- parsing -----------------------------------------------------------------------------------------------


def test_layer_counts(weights) -> None:
    kinds = Counter(layer if isinstance(layer, str) else type(layer).__name__ for layer in weights.layers)
    assert kinds[ConvLayer.__name__] == 29
    assert kinds[AffineLayer.__name__] == 29
    assert kinds["relu"] == 29
    assert kinds["add"] == 14  # one per residual block
    assert kinds[PoolLayer.__name__] == 6  # stem max pool, 4 skip-branch avg pools, global avg pool
    assert weights.fc_kernel is not None and weights.fc_kernel.shape == (256, DESCRIPTOR_SIZE)  # the 1 fc


def test_channel_means(weights) -> None:
    np.testing.assert_allclose(weights.channel_means, (122.782, 117.001, 104.298), atol=1e-3)


def test_first_conv_geometry(weights) -> None:
    stem = weights.layers[0]
    assert isinstance(stem, ConvLayer)
    assert stem.kernel.shape == (7, 7, 3, 32) and stem.stride == 2


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "altered.dat"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "keep",
    [
        pytest.param(10, id="inside-header"),
        pytest.param(100, id="inside-wrapper-list"),
        pytest.param(1_000, id="inside-first-conv-tensor"),
        pytest.param(0.5, id="half"),
        pytest.param(-1, id="last-byte-missing"),
    ],
)
def test_truncated_file_is_rejected(tmp_path: Path, dat_bytes: bytes, keep: float) -> None:
    cut = int(len(dat_bytes) * keep) if isinstance(keep, float) else keep % len(dat_bytes)
    with pytest.raises(DlibFormatError):
        read_dlib_resnet(_write(tmp_path, dat_bytes[:cut]))


def _replace_once(data: bytes, old: bytes, new: bytes, after: bytes = b"") -> bytes:
    start = data.index(after) if after else 0
    at = data.index(old, start)
    return data[:at] + new + data[at + len(old) :]


@pytest.mark.parametrize(
    "alter",
    [
        pytest.param(lambda d: _replace_once(d, b"loss_metric_2", b"loss_metric_3"), id="other-loss"),
        pytest.param(lambda d: _replace_once(d, b"input_rgb_image_sized", b"input_rgb_image_sizex"), id="input"),
        # The chip size record (150, 150) right after the three channel means.
        pytest.param(
            lambda d: _replace_once(d, b"\x01\x96\x01\x96", b"\x01\x97\x01\x96", after=b"input_rgb"),
            id="chip-size",
        ),
        pytest.param(lambda d: _replace_once(d, b"con_4", b"con_5"), id="unknown-layer"),
        pytest.param(lambda d: _replace_once(d, b"fc_2", b"fc_3"), id="unknown-head"),
        pytest.param(lambda d: d + b"\x00", id="trailing-byte"),
        pytest.param(
            lambda d: _replace_once(d, b"loss_metric_2", b"loss_metric_\xff"),
            id="non-ascii-name",
        ),
    ],
)
def test_altered_file_is_rejected(tmp_path: Path, dat_bytes: bytes, alter) -> None:
    altered = alter(dat_bytes)
    assert altered != dat_bytes
    with pytest.raises(DlibFormatError):
        read_dlib_resnet(_write(tmp_path, altered))


def test_saved_model_interface(keras_model) -> None:
    assert tuple(keras_model.input_shape) == (None, CHIP_SIZE, CHIP_SIZE, 3)
    assert tuple(keras_model.output_shape) == (None, DESCRIPTOR_SIZE)


# --- equivalence with dlib ------------------------------------------------------------------------------------


def _dlib_chip(image_rgb: np.ndarray, dlib_landmarks) -> np.ndarray | None:
    import dlib

    shape = dlib_landmarks(image_rgb)
    if shape is None:
        return None
    return np.asarray(dlib.get_face_chip(image_rgb, shape, size=CHIP_SIZE, padding=0.25))


def _compare(chips: list[np.ndarray], dlib_recogniser, keras_model) -> tuple[np.ndarray, np.ndarray]:
    reference = np.asarray(dlib_recogniser.compute_face_descriptor(chips), np.float64)
    ours = np.asarray(keras_model(np.stack(chips).astype(np.float32), training=False), np.float64)
    cosine = (reference * ours).sum(1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(ours, axis=1)
    return cosine, np.abs(reference - ours).max(axis=1)


def test_equivalent_to_dlib_on_astronaut(astronaut, dlib_landmarks, dlib_recogniser, keras_model) -> None:
    """Needs no ../shared data: a fresh clone checks the conversion too."""
    chip = _dlib_chip(astronaut, dlib_landmarks)
    assert chip is not None and chip.shape == (CHIP_SIZE, CHIP_SIZE, 3)
    cosine, diff = _compare([chip, chip[:, ::-1].copy()], dlib_recogniser, keras_model)
    assert cosine.min() >= MIN_COSINE
    assert diff.max() <= MAX_ABS_DIFF


@pytest.mark.shared
def test_equivalent_to_dlib_on_real_faces(shared_dir: Path, dlib_landmarks, dlib_recogniser, keras_model) -> None:
    paths = lfw_images(shared_dir.parent)[::250]  # 20 people spread over the alphabet
    paths += [shared_dir / "identity" / "deepface" / f"img{i}.jpg" for i in (1, 3, 16)]  # 3 larger photos
    chips, names = [], []
    for path in paths:
        chip = _dlib_chip(decode_image(path.read_bytes()), dlib_landmarks)
        if chip is not None:
            chips.append(chip)
            names.append(path.name)
    assert len(chips) >= 20, f"dlib found a single face in only {len(chips)} of {len(paths)} photos"
    cosine, diff = _compare(chips, dlib_recogniser, keras_model)
    worst = int(np.argmin(cosine))
    assert cosine.min() >= MIN_COSINE, f"{names[worst]}: cosine {cosine[worst]:.9f}"
    assert diff.max() <= MAX_ABS_DIFF, f"{names[int(np.argmax(diff))]}: max abs diff {diff.max():.2e}"
