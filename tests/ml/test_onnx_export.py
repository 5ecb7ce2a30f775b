"""The ONNX exports compute what the Keras models compute, and the service runs them without TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from api.config import REPO_ROOT
from api.ml.runtime import OnnxNetwork, export_onnx, onnx_path_of

RESOURCES = REPO_ROOT / "resources"
ANTI_SPOOF = RESOURCES / "anti_spoof_models"


def assert_same_outputs(keras_path: Path, inputs: np.ndarray, atol: float = 1e-4) -> None:
    import keras

    import api.ml.facenet  # noqa: F401  (FaceNet's custom layer)

    model = keras.saving.load_model(keras_path, compile=False)
    expected = np.asarray(model(inputs, training=False), np.float64).reshape(len(inputs), -1)
    actual = np.asarray(OnnxNetwork(onnx_path_of(keras_path))(inputs), np.float64).reshape(len(inputs), -1)
    cosine = (expected * actual).sum(1) / np.linalg.norm(expected, axis=1) / np.linalg.norm(actual, axis=1)
    assert cosine.min() >= 0.99999, cosine
    np.testing.assert_allclose(actual, expected, atol=atol * max(1.0, float(np.abs(expected).max())))


def test_the_embedders_export_matches_keras_on_face_chips(keras_model_path: Path, engine, astronaut) -> None:
    faces = engine.detect(astronaut)
    chips = engine.align(astronaut, faces).astype(np.float32)
    noise = np.random.default_rng(1).uniform(0, 255, (3, 150, 150, 3)).astype(np.float32)
    assert_same_outputs(keras_model_path, np.concatenate([chips, chips[:, :, ::-1], noise]))


def test_facenets_export_matches_keras(facenet_model_path: Path) -> None:
    crops = np.random.default_rng(2).uniform(0, 255, (4, 160, 160, 3)).astype(np.float32)
    assert_same_outputs(facenet_model_path, crops)


def test_the_emotion_models_export_matches_keras() -> None:
    faces = np.random.default_rng(3).uniform(0, 255, (16, 48, 48, 1)).astype(np.float32)
    assert_same_outputs(RESOURCES / "emotion_model.keras", faces, atol=1e-5)


@pytest.mark.parametrize("stem", ["2.7_80x80_MiniFASNetV2", "4_0_0_80x80_MiniFASNetV1SE"])
def test_the_anti_spoofing_exports_match_keras(stem: str) -> None:
    path = ANTI_SPOOF / f"{stem}.keras"
    if not path.is_file():
        pytest.skip(f"{path} is not built here (its weights come from FACE_MODELS_MIRROR or a download)")
    crops = np.random.default_rng(4).uniform(0, 255, (8, 80, 80, 3)).astype(np.float32)
    assert_same_outputs(path, crops, atol=1e-5)


def test_every_translated_layer_option_matches_keras(tmp_path: Path) -> None:
    """SAME padding with strides on odd sizes (TensorFlow pads after), depthwise multipliers, pooling with
    padding, Dense on feature maps, Concatenate, Reshape and Flatten orders: a small model of each."""
    import keras

    inputs = keras.Input((23, 17, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    a = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    b = keras.layers.DepthwiseConv2D(5, strides=2, padding="same", depth_multiplier=2)(x)
    b = keras.layers.BatchNormalization(epsilon=1e-3)(b)
    b = keras.layers.PReLU(shared_axes=[1, 2])(b)
    y = keras.layers.Concatenate()([a, b])
    y = keras.layers.MaxPooling2D(3, strides=2, padding="same")(y)
    y = keras.layers.AveragePooling2D(2, padding="same")(y)
    gate = keras.layers.GlobalAveragePooling2D(keepdims=True)(y)
    gate = keras.layers.Dense(14, activation="sigmoid")(gate)
    y = keras.layers.Multiply()([y, gate])
    y = keras.layers.ZeroPadding2D(((1, 0), (0, 2)))(y)
    flat = keras.layers.Flatten()(y)
    pooled = keras.layers.GlobalMaxPooling2D()(y)
    shaped = keras.layers.Reshape((-1,))(keras.layers.Reshape((2, 7, -1))(y))
    z = keras.layers.Concatenate()([flat, pooled, shaped])
    z = keras.layers.Dense(10)(z)
    z = keras.layers.UnitNormalization()(z)
    outputs = keras.layers.Softmax()(keras.layers.Dense(4)(z))
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(5)
    for weight in model.weights:  # non-trivial statistics and slopes, not the initial ones
        variance = "variance" in weight.path
        values = rng.uniform(0.5, 1.5, weight.shape) if variance else rng.normal(0.1, 0.3, weight.shape)
        weight.assign(values.astype(np.float32))
    path = tmp_path / "options.keras"
    model.save(path)
    export_onnx(path)
    assert_same_outputs(path, rng.uniform(0, 255, (5, 23, 17, 3)).astype(np.float32), atol=1e-5)


def test_a_layer_without_translation_is_refused() -> None:
    import keras

    from api.ml.onnx_export import UnsupportedLayerError, keras_to_onnx

    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.LayerNormalization()(inputs))
    with pytest.raises(UnsupportedLayerError, match="LayerNormalization"):
        keras_to_onnx(model)


def test_the_service_runs_its_default_models_without_tensorflow(keras_model_path: Path) -> None:
    """A worker loads every default model from its ONNX export: TensorFlow is never imported, and the worker
    stays far below the 600 MB the throughput issue allows (it was ~900 MB with TensorFlow)."""
    script = f"""
import json, os, sys
import api
from api.composition import load_models
from api.config import Settings
from tools.common import memory_kb
models = load_models(Settings(embedding_model_path={str(keras_model_path)!r}))
heavy = sorted(m for m in ("tensorflow", "keras", "deepface", "tf_keras", "torch", "pandas", "matplotlib")
               if m in sys.modules)
print(json.dumps({{"heavy": heavy, "rss_mb": memory_kb(os.getpid())["VmRSS"] / 1024,
                  "names": models.names}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], report
    assert report["rss_mb"] < 400, report
    assert report["names"]["embedder"] == "dlib-resnet-v1+flip"
