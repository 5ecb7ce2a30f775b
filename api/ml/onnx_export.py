"""Our Keras models as ONNX graphs, so that the service runs them with ONNX Runtime instead of TensorFlow.

Why: importing TensorFlow alone makes a worker ~640 MB resident before any model loads, which put one worker
at ~900 MB; ONNX Runtime needs a few tens of MB and runs these small convolutional networks at least as
fast on a CPU. The Keras files stay the source of truth (built, trained and tested as before); ``make
models`` exports each to ONNX once (``tools.fetch_models``) and checks that both give the same outputs.

The converter walks the functional graph layer by layer and knows exactly the layers our models use (the
dlib ResNet, FaceNet, the emotion CNN, both MiniFASNets); any other layer raises
:class:`UnsupportedLayerError` instead of exporting something that computes differently. Inside the graph,
4-D tensors are kept channels-first (ONNX's convolution layout): the input is transposed once, and a tensor
goes back to channels-last only where Keras' meaning depends on it (Flatten, Reshape).

Imports ``onnx`` (a set-up dependency) and reads Keras layers; the service itself never imports this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

OPSET = 17
NCHW = [0, 3, 1, 2]
NHWC = [0, 2, 3, 1]


class UnsupportedLayerError(ValueError):
    """The model holds a layer (or a layer option) this converter does not translate."""


@dataclass
class _Tensor:
    name: str
    rank: int  # Keras rank; 4-D tensors are held channels-first in the graph
    shape: tuple[int | None, ...]  # Keras (channels-last) shape


class _Graph:
    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self.helper = helper
        self.numpy_helper = numpy_helper
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._names: set[str] = set()

    def name(self, hint: str) -> str:
        base = hint.replace("/", "_") or "t"
        name, number = base, 1
        while name in self._names:
            number += 1
            name = f"{base}_{number}"
        self._names.add(name)
        return name

    def constant(self, hint: str, value: np.ndarray | float | list[int], dtype: Any = np.float32) -> str:
        name = self.name(hint)
        self.initializers.append(self.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str, **attributes: Any) -> str:
        output = self.name(hint)
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=output, **attributes))
        return output


def _same_pads(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's SAME padding along one axis: the extra pixel, if any, goes after (bottom/right)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _spatial_pads(config: dict, shape: tuple[int | None, ...], kernel: tuple[int, int]) -> list[int]:
    if config.get("padding", "valid") == "valid":
        return [0, 0, 0, 0]
    strides = tuple(config.get("strides", (1, 1)))
    dilation = tuple(config.get("dilation_rate", (1, 1)))
    height, width = shape[1], shape[2]
    if height is None or width is None:
        raise UnsupportedLayerError("SAME padding needs a known input height and width")
    top, bottom = _same_pads(height, kernel[0], strides[0], dilation[0])
    left, right = _same_pads(width, kernel[1], strides[1], dilation[1])
    return [top, left, bottom, right]


class KerasToOnnx:
    """Translate one functional Keras model; :meth:`convert` returns the ONNX model (``onnx.ModelProto``)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.graph = _Graph()
        self.tensors: dict[int, _Tensor] = {}

    # --- walking the model ------------------------------------------------------------------------
    def convert(self) -> Any:
        helper = self.graph.helper
        from onnx import TensorProto, checker

        inputs = []
        for keras_input in self.model.inputs:
            name = self.graph.name(keras_input.name)
            shape = tuple(keras_input.shape)
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *shape[1:]]))
            tensor = _Tensor(name, len(shape), shape)
            if tensor.rank == 4:
                tensor = _Tensor(self.graph.node("Transpose", [name], f"{name}_nchw", perm=NCHW), 4, shape)
            self.tensors[id(keras_input)] = tensor
        for layer in self.model.operations:
            if type(layer).__name__ == "InputLayer":
                continue
            if len(layer._inbound_nodes) != 1:
                raise UnsupportedLayerError(f"layer {layer.name} is used {len(layer._inbound_nodes)} times")
            node = layer._inbound_nodes[0]
            arguments = [self.tensors[id(t)] for t in node.input_tensors]
            (output,) = node.output_tensors
            result = self._layer(layer, arguments, tuple(output.shape))
            self.tensors[id(output)] = result
        outputs = []
        for keras_output in self.model.outputs:
            tensor = self.tensors[id(keras_output)]
            name = tensor.name
            if tensor.rank == 4:
                name = self.graph.node("Transpose", [name], "output_nhwc", perm=NHWC)
            final = self.graph.node("Identity", [name], "output")
            outputs.append(
                helper.make_tensor_value_info(final, TensorProto.FLOAT, ["batch", *tuple(keras_output.shape)[1:]])
            )
        onnx_graph = helper.make_graph(
            self.graph.nodes, self.model.name or "model", inputs, outputs, self.graph.initializers
        )
        onnx_model = helper.make_model(
            onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="face-service"
        )
        onnx_model.ir_version = 8  # readable by every ONNX Runtime since 1.14
        checker.check_model(onnx_model)
        return onnx_model

    def _layer(self, layer: Any, arguments: list[_Tensor], shape: tuple[int | None, ...]) -> _Tensor:
        kind = type(layer).__name__
        handler = getattr(self, f"_{kind}", None)
        if handler is None:
            raise UnsupportedLayerError(f"layer {layer.name} of type {kind} has no ONNX translation")
        name = handler(layer, layer.get_config(), arguments, shape)
        return _Tensor(name, len(shape), shape)

    def _weights(self, layer: Any) -> list[np.ndarray]:
        return [np.asarray(w, np.float32) for w in layer.get_weights()]

    def _activation(self, name: str, activation: str | None, hint: str, rank: int = 2) -> str:
        graph = self.graph
        if activation in (None, "linear"):
            return name
        if activation == "relu":
            return graph.node("Relu", [name], hint)
        if activation == "sigmoid":
            return graph.node("Sigmoid", [name], hint)
        if activation == "tanh":
            return graph.node("Tanh", [name], hint)
        if activation == "softmax":
            return graph.node("Softmax", [name], hint, axis=1 if rank == 4 else -1)
        raise UnsupportedLayerError(f"activation {activation!r} has no ONNX translation")

    @staticmethod
    def _axis(axis: int, rank: int) -> int:
        """A Keras axis of a tensor held channels-first when it is 4-D."""
        axis = axis % rank
        if rank != 4:
            return axis
        return {0: 0, 1: 2, 2: 3, 3: 1}[axis]

    # --- layers ---------------------------------------------------------------------------------------
    def _convolution(self, layer: Any, config: dict, x: _Tensor, onnx_kernel: np.ndarray, group: int) -> str:
        """An ONNX Conv of ``onnx_kernel`` (out, in / group, kh, kw) with the layer's bias, strides, dilation,
        padding and activation."""
        kernel_size = tuple(onnx_kernel.shape[2:])
        inputs = [x.name, self.graph.constant(f"{layer.name}_w", onnx_kernel)]
        if config.get("use_bias", True):
            inputs.append(self.graph.constant(f"{layer.name}_b", self._weights(layer)[1]))
        out = self.graph.node(
            "Conv",
            inputs,
            layer.name,
            kernel_shape=list(kernel_size),
            strides=list(config.get("strides", (1, 1))),
            dilations=list(config.get("dilation_rate", (1, 1))),
            pads=_spatial_pads(config, x.shape, kernel_size),
            group=group,
        )
        return self._activation(out, config.get("activation"), f"{layer.name}_act", 4)

    def _Conv2D(self, layer: Any, config: dict, args: list[_Tensor], shape: tuple) -> str:
        kernel = self._weights(layer)[0]  # (kh, kw, cin / groups, cout)
        return self._convolution(layer, config, args[0], kernel.transpose(3, 2, 0, 1), int(config.get("groups", 1)))

    def _DepthwiseConv2D(self, layer: Any, config: dict, args: list[_Tensor], shape: tuple) -> str:
        kernel = self._weights(layer)[0]  # (kh, kw, cin, multiplier); output channel c * multiplier + m
        kh, kw, channels, multiplier = kernel.shape
        onnx_kernel = kernel.transpose(2, 3, 0, 1).reshape(channels * multiplier, 1, kh, kw)
        return self._convolution(layer, config, args[0], onnx_kernel, channels)

    def _Dense(self, layer: Any, config: dict, args: list[_Tensor], shape: tuple) -> str:
        (x,) = args
        weights = self._weights(layer)
        kernel = weights[0]  # (in, out)
        graph = self.graph
        if x.rank == 4:  # along the channels of every pixel: a 1x1 convolution
            inputs = [x.name, graph.constant(f"{layer.name}_w", kernel.T[:, :, None, None])]
            if config.get("use_bias", True):
                inputs.append(graph.constant(f"{layer.name}_b", weights[1]))
            out = graph.node("Conv", inputs, layer.name, kernel_shape=[1, 1])
        elif x.rank == 2:
            out = graph.node("MatMul", [x.name, graph.constant(f"{layer.name}_w", kernel)], layer.name)
            if config.get("use_bias", True):
                out = graph.node("Add", [out, graph.constant(f"{layer.name}_b", weights[1])], f"{layer.name}_bias")
        else:
            raise UnsupportedLayerError(f"Dense layer {layer.name} on a {x.rank}-D input")
        return self._activation(out, config.get("activation"), f"{layer.name}_act", x.rank)

    def _BatchNormalization(self, layer: Any, config: dict, args: list[_Tensor], shape: tuple) -> str:
        (x,) = args
        if (
            self._axis(
                config.get("axis", -1) if not isinstance(config.get("axis"), list) else config["axis"][0], x.rank
            )
            != 1
        ):
            raise UnsupportedLayerError(f"BatchNormalization {layer.name} is not over the channels")
        weights = iter(self._weights(layer))
        channels = shape[-1]
        gamma = next(weights) if config.get("scale", True) else np.ones(channels, np.float32)
        beta = next(weights) if config.get("center", True) else np.zeros(channels, np.float32)
        mean, variance = next(weights), next(weights)
        graph = self.graph
        inputs = [x.name] + [
            graph.constant(f"{layer.name}_{part}", value)
            for part, value in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", variance))
        ]
        return graph.node("BatchNormalization", inputs, layer.name, epsilon=float(config.get("epsilon", 1e-3)))

    def _ReLU(self, layer: Any, config: dict, args: list[_Tensor], shape: tuple) -> str:
        (x,) = args
        if config.get("negative_slope", 0.0) or config.get("threshold", 0.0):
            raise UnsupportedLayerError(f"ReLU {layer.name} with a slope or threshold")
        out = self.graph.node("Relu", [x.name], layer.name)
        if config.get("max_value") is not None:
            out = self.graph.node(
                "Min", [out, self.graph.constant(f"{layer.name}_max", float(config["max_value"]))], f"{layer.name}_cap"
            )
        return out

    def _PReLU(self, layer: Any, config: dict, args: list[_Tensor], shape: tuple) -> str:
        (x,) = args
        (alpha,) = self._weights(layer)  # Keras shape (H or 1, W or 1, C)
        slope = alpha.transpose(2, 0, 1) if x.rank == 4 else alpha
        return self.graph.node("PRelu", [x.name, self.graph.constant(f"{layer.name}_slope", slope)], layer.name)

    def _Activation(self, layer: Any, config: dict, args: list[_Tensor], shape: tuple) -> str:
        (x,) = args
        out = self._activation(x.name, config["activation"], layer.name, x.rank)
        return out if out != x.name else self.graph.node("Identity", [x.name], layer.name)

    def _Softmax(self, layer: Any, config: dict, args: list[_Tensor], shape: tuple) -> str:
        (x,) = args
        axis = config.get("axis", -1)
        return self.graph.node("Softmax", [x.name], layer.name, axis=self._axis(axis, x.rank))

    def _pool(self, op: str, layer: Any, config: dict, x: _Tensor) -> str:
        size = tuple(config["pool_size"])
        strides = tuple(config.get("strides") or size)
        attributes: dict[str, Any] = {"kernel_shape": list(size), "strides": list(strides)}
        attributes["pads"] = _spatial_pads({"padding": config.get("padding"), "strides": strides}, x.shape, size)
        if op == "AveragePool":
            attributes["count_include_pad"] = 0  # TensorFlow averages over the pixels inside the image only
        return self.graph.node(op, [x.name], layer.name, **attributes)

    def _MaxPooling2D(self, layer: Any, config: dict, args: list[_Tensor], shape: tuple) -> str:
        return self._pool("MaxPool", layer, config, args[0])

    def _AveragePooling2D(self, layer: Any, config: dict, args: list[_Tensor], shape: tuple) -> str:
        return self._pool("AveragePool", layer, config, args[0])

    def _global_pool(self, op: str, layer: Any, config: dict, x: _Tensor) -> str:
        pooled = self.graph.node(op, [x.name], layer.name)  # (N, C, 1, 1)
        if config.get("keepdims", False):
            return pooled
        return self.graph.node("Flatten", [pooled], f"{layer.name}_flat", axis=1)

    def _GlobalAveragePooling2D(self, layer: Any, config: dict, args: list[_Tensor], shape: tuple) -> str:
        return self._global_pool("GlobalAveragePool", layer, config, args[0])

    def _GlobalMaxPooling2D(self, layer: Any, config: dict, args: list[_Tensor], shape: tuple) -> str:
        return self._global_pool("GlobalMaxPool", layer, config, args[0])

    def _ZeroPadding2D(self, layer: Any, config: dict, args: list[_Tensor], shape: tuple) -> str:
        (x,) = args
        (top, bottom), (left, right) = config["padding"]
        pads = self.graph.constant(f"{layer.name}_pads", [0, 0, top, left, 0, 0, bottom, right], np.int64)
        return self.graph.node("Pad", [x.name, pads], layer.name, mode="constant")

    def _elementwise(self, op: str, layer: Any, args: list[_Tensor]) -> str:
        if len({a.rank for a in args}) != 1:
            raise UnsupportedLayerError(f"{layer.name} combines tensors of different ranks")
        out = args[0].name
        for number, other in enumerate(args[1:], start=1):
            out = self.graph.node(op, [out, other.name], layer.name if number == len(args) - 1 else f"{layer.name}_p")
        return out

    def _Add(self, layer: Any, config: dict, args: list[_Tensor], shape: tuple) -> str:
        return self._elementwise("Add", layer, args)

    def _Multiply(self, layer: Any, config: dict, args: list[_Tensor], shape: tuple) -> str:
        return self._elementwise("Mul", layer, args)

    def _Concatenate(self, layer: Any, config: dict, args: list[_Tensor], shape: tuple) -> str:
        axis = self._axis(config.get("axis", -1), args[0].rank)
        return self.graph.node("Concat", [a.name for a in args], layer.name, axis=axis)

    def _to_channels_last(self, x: _Tensor, hint: str) -> str:
        return self.graph.node("Transpose", [x.name], hint, perm=NHWC) if x.rank == 4 else x.name

    def _Flatten(self, layer: Any, config: dict, args: list[_Tensor], shape: tuple) -> str:
        (x,) = args
        return self.graph.node("Flatten", [self._to_channels_last(x, f"{layer.name}_nhwc")], layer.name, axis=1)

    def _Reshape(self, layer: Any, config: dict, args: list[_Tensor], shape: tuple) -> str:
        (x,) = args
        if any(d is None for d in shape[1:]):
            raise UnsupportedLayerError(f"Reshape {layer.name} to an unknown shape {shape}")
        target = self.graph.constant(f"{layer.name}_shape", [-1, *shape[1:]], np.int64)  # Keras' resolved shape
        out = self.graph.node("Reshape", [self._to_channels_last(x, f"{layer.name}_nhwc"), target], layer.name)
        if len(shape) == 4:
            out = self.graph.node("Transpose", [out], f"{layer.name}_nchw", perm=NCHW)
        return out

    def _identity(self, layer: Any, config: dict, args: list[_Tensor], shape: tuple) -> str:
        return self.graph.node("Identity", [args[0].name], layer.name)

    _Dropout = _SpatialDropout2D = _identity  # inference: no dropout

    def _channel_constant(self, hint: str, value: np.ndarray, rank: int) -> str:
        """A per-channel (or scalar) constant that broadcasts against a tensor held channels-first if 4-D."""
        value = np.asarray(value, np.float32)
        if rank == 4 and value.size > 1:
            value = value.reshape(-1)[:, None, None]
        return self.graph.constant(hint, value)

    def _Rescaling(self, layer: Any, config: dict, args: list[_Tensor], shape: tuple) -> str:
        (x,) = args
        scale = self._channel_constant(f"{layer.name}_scale", config["scale"], x.rank)
        out = self.graph.node("Mul", [x.name, scale], layer.name)
        if np.any(np.asarray(config.get("offset", 0.0)) != 0):
            offset = self._channel_constant(f"{layer.name}_offset", config["offset"], x.rank)
            out = self.graph.node("Add", [out, offset], f"{layer.name}_offset")
        return out

    def _Normalization(self, layer: Any, config: dict, args: list[_Tensor], shape: tuple) -> str:
        (x,) = args
        if config.get("invert", False):
            raise UnsupportedLayerError(f"Normalization {layer.name} is inverted")
        mean, variance = (np.asarray(v, np.float64) for v in (layer.mean, layer.variance))
        import keras

        std = np.maximum(np.sqrt(variance), keras.backend.epsilon())
        centred = self.graph.node(
            "Sub", [x.name, self._channel_constant(f"{layer.name}_mean", mean, x.rank)], f"{layer.name}_centred"
        )
        return self.graph.node("Div", [centred, self._channel_constant(f"{layer.name}_std", std, x.rank)], layer.name)

    def _UnitNormalization(self, layer: Any, config: dict, args: list[_Tensor], shape: tuple) -> str:
        (x,) = args
        axis = config.get("axis", -1)
        axes = [self._axis(a, x.rank) for a in (axis if isinstance(axis, list) else [axis])]
        graph = self.graph
        squares = graph.node("Mul", [x.name, x.name], f"{layer.name}_sq")
        axes_name = graph.constant(f"{layer.name}_axes", axes, np.int64)
        total = graph.node("ReduceSum", [squares, axes_name], f"{layer.name}_sum", keepdims=1)
        # x * min(rsqrt(sum), 1 / eps), as keras.ops.normalize computes it
        inverse = graph.node("Reciprocal", [graph.node("Sqrt", [total], f"{layer.name}_norm")], f"{layer.name}_inv")
        capped = graph.node("Min", [inverse, graph.constant(f"{layer.name}_cap", 1e12)], f"{layer.name}_capped")
        return graph.node("Mul", [x.name, capped], layer.name)

    def _Prewhiten(self, layer: Any, config: dict, args: list[_Tensor], shape: tuple) -> str:
        """FaceNet's per-image standardisation (api.ml.facenet.Prewhiten)."""
        (x,) = args
        graph = self.graph
        axes = list(range(1, x.rank))
        size = math.prod(int(d) for d in x.shape[1:])

        def mean_of(name: str, hint: str) -> str:
            return graph.node("ReduceMean", [name], hint, axes=axes, keepdims=1)

        mean = mean_of(x.name, f"{layer.name}_mean")
        centred = graph.node("Sub", [x.name, mean], f"{layer.name}_centred")
        variance = mean_of(graph.node("Mul", [centred, centred], f"{layer.name}_sq"), f"{layer.name}_var")
        std = graph.node("Sqrt", [variance], f"{layer.name}_std")
        floor = graph.constant(f"{layer.name}_floor", 1.0 / math.sqrt(size))
        return graph.node("Div", [centred, graph.node("Max", [std, floor], f"{layer.name}_adj")], layer.name)


def keras_to_onnx(model: Any) -> Any:
    """The ONNX model (``onnx.ModelProto``) of a functional Keras model built from the supported layers."""
    return KerasToOnnx(model).convert()
