"""How the service runs a network: ONNX Runtime on the file exported from the Keras model (the default), or Keras.

Every network we ship is defined, built and tested in Keras (``<name>.keras``); ``make models`` exports each to
``<name>.onnx`` beside it (``api.ml.onnx_export``, checked against Keras before it is saved). The service runs
the ONNX file: a worker then never imports TensorFlow (~640 MB resident by itself), and ONNX Runtime runs
these networks 2-3x faster at the batch sizes requests have (``python -m tools.bench_engine --runtimes``).
``FACE_INFERENCE_RUNTIME=keras`` runs the Keras files instead (e.g. for bfloat16 on CPUs with native support).

A network is a callable: a float32 batch (N, H, W, C) in, a float32 array (N, ...) out.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from api.errors import ModelUnavailableError

Runtime = Literal["onnx", "keras"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)
Network = Callable[[np.ndarray], np.ndarray]


def onnx_path_of(keras_path: Path) -> Path:
    return Path(keras_path).with_suffix(".onnx")


def onnx_session(path: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime session on the CPU for a model file, with pinned thread pools."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle pool threads spin for a while by default: on 2 shared cores that spinning takes the CPU from
    # the threads that decode and detect the next requests.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxNetwork:
    """One ``.onnx`` file in an ONNX Runtime session (:func:`onnx_session`). Called, it answers the first
    output; :meth:`outputs` answers all of them by name (a detector's several heads)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        try:
            self._session = onnx_session(path, threads)
        except Exception as error:  # a truncated or foreign file: unavailable, never a 500 later
            raise ModelUnavailableError(f"cannot load {path}: {error}; run `make models` again") from error
        self._input = self._session.get_inputs()[0].name
        self._output_names = [output.name for output in self._session.get_outputs()]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(self._output_names[:1], {self._input: np.ascontiguousarray(batch, np.float32)})[0]

    def outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        values = self._session.run(self._output_names, {self._input: np.ascontiguousarray(batch, np.float32)})
        return dict(zip(self._output_names, values, strict=True))


class KerasNetwork:
    """A ``.keras`` file run by TensorFlow inside one traced ``tf.function`` (any batch size). ``transform``
    turns the loaded model into the one to run (e.g. a bfloat16 copy)."""

    def __init__(self, path: Path, threads: int | None = None, transform: Callable[[Any], Any] | None = None) -> None:
        import tensorflow as tf

        configure_tensorflow_threads(threads)
        import keras

        try:
            model = keras.saving.load_model(path, compile=False)
        except Exception as error:  # a truncated or foreign file: unavailable, never a 500 later
            raise ModelUnavailableError(f"cannot load {path}: {error}; run `make models` again") from error
        network = transform(model) if transform is not None else model
        spec = tf.TensorSpec([None, *network.inputs[0].shape[1:]], tf.float32)  # type: ignore[attr-defined]

        @tf.function(input_signature=[spec])
        def forward(batch: tf.Tensor) -> tf.Tensor:
            return tf.cast(network(batch, training=False), tf.float32)  # type: ignore[operator]

        self._forward = forward

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._forward(np.asarray(batch, np.float32)).numpy()


def load_network(
    keras_path: Path,
    runtime: str = "onnx",
    threads: int | None = None,
    hint: str = "",
    transform: Callable[[Any], Any] | None = None,
) -> Network:
    """The network of ``keras_path`` run by ``runtime``; ModelUnavailableError (with ``hint``: how to build it)
    when its file is missing, or when it cannot be loaded. ``transform``: see :class:`KerasNetwork` (keras only)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    path = onnx_path_of(keras_path) if runtime == "onnx" else Path(keras_path)
    if not path.is_file():
        built_by = "`make models` (python -m tools.fetch_models) exports it from the .keras file"
        raise ModelUnavailableError(f"{path} is missing. {hint or built_by}", path=str(path))
    if runtime == "onnx":
        return OnnxNetwork(path, threads)
    return KerasNetwork(path, threads, transform)


def configure_tensorflow_threads(threads: int | None) -> None:
    """Size TensorFlow's pools once, before its first op: on 2 shared cores its defaults oversubscribe."""
    import tensorflow as tf

    if threads is None:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # already initialised by an earlier model: the first setting stays


def export_onnx(keras_path: Path, samples: int = 4, min_cosine: float = 0.99999) -> Path:
    """Export ``keras_path`` to ``<name>.onnx`` beside it, only if both give the same outputs on random inputs
    (row cosine >= ``min_cosine``): a file under that name must compute what the Keras model computes."""
    import keras

    import api.ml.facenet  # noqa: F401  (registers FaceNet's custom layer before any model loads)
    from api.ml.onnx_export import keras_to_onnx

    model = keras.saving.load_model(keras_path, compile=False)
    target = onnx_path_of(keras_path)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(keras_to_onnx(model).SerializeToString())
    shape = tuple(model.inputs[0].shape[1:])
    inputs = np.random.default_rng(0).uniform(0, 255, size=(samples, *shape)).astype(np.float32)
    theirs = np.asarray(model(inputs, training=False), np.float64).reshape(samples, -1)
    ours = np.asarray(OnnxNetwork(partial)(inputs), np.float64).reshape(samples, -1)
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    if cosine.min() < min_cosine:
        partial.unlink()
        raise ValueError(f"the ONNX export of {keras_path.name} differs from Keras (cosine {cosine.min():.7f})")
    os.replace(partial, target)
    return target
