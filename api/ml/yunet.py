"""YuNet, the detector compiled into libfacedetection, rebuilt as an ONNX graph from the library's own weights.

Why: the library in the ``yuface`` wheel is built without AVX2 and runs its convolutions as plain loops; the
same network run by ONNX Runtime, whose kernels use the CPU's vector units, detects in half the time, resize
included (``python -m tools.bench_engine``: 6.2 against 12.6 ms on a 1000x800 photo). Detection was the largest
single cost of a verify.

What the library holds (``libfacedetection.so`` of the ``yuface`` wheel, libfacedetection v0.0.3):
``param_pConvInfo``, a table of 53 convolutions (``ConvInfoStruct``: input channels, filters, depthwise or
pointwise, ReLU flag, pointers to the weights and biases). A pointwise layer's weights are
[filters][channels]; a depthwise 3x3 layer's are [9 taps, row-major][channels]. Layer 0 is the stem: a 3x3
stride-2 convolution of the BGR image (0..255, no normalisation), stored as a pointwise layer over the 27
values of each 3x3x3 patch (tap-major, then B, G, R; padded to 32 channels).

The network (``objectdetect_cnn`` in the library's sources), ``dp`` being a pointwise convolution followed by a
depthwise 3x3 one (ReLU after the depthwise one only), and a unit being two ``dp``:

    stem (0) + ReLU, dp(1, 2), maxpool 2x2          -> stride 4
    unit(3..6), unit(7..10)
    maxpool, unit(11..14) = C3 (stride 8); maxpool, unit(15..18) = C4 (16); maxpool, unit(19..22) = C5 (32)
    P5 = dp(27, 28)(C5);  P4 = dp(25, 26)(up2(P5) + C4);  P3 = dp(23, 24)(up2(P4) + C3)
    heads per level l of (P3, P4, P5), without ReLU: cls dp(29+2l), box dp(35+2l), obj dp(41+2l),
    landmarks dp(47+2l)

The image is zero-padded to a multiple of 32 on the bottom and right first, as the library does. Decoding the
heads (priors, boxes, scores, non-maximum suppression) is :class:`api.services.detection.YuNetOnnx`'s work.

This module reads the weights through ctypes (the library is loaded, never run) and builds the graph with the
``onnx`` package. ``make models`` writes it to ``resources/face_detector_yunet.onnx`` (:func:`write_onnx`), which
the service loads: a worker never imports ``onnx``. ``tests/ml/test_yunet.py`` checks the graph against the
library on real photos: the same faces, scores and coordinates.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LAYER_COUNT = 53
STRIDES = (8, 16, 32)
HEAD_WIDTHS = {"cls": 1, "box": 4, "obj": 1, "landmarks": 10}  # output channels of each head
HEADS = tuple(HEAD_WIDTHS)
_HEAD_FIRST_LAYER = {"cls": 29, "box": 35, "obj": 41, "landmarks": 47}
PAD_TO = 32  # the image is padded to a multiple of the coarsest stride
OPSET = 17


class _ConvInfo(ctypes.Structure):
    """libfacedetection's ``ConvInfoStruct``."""

    _fields_ = [
        ("channels", ctypes.c_int),
        ("num_filters", ctypes.c_int),
        ("is_depthwise", ctypes.c_bool),
        ("is_pointwise", ctypes.c_bool),
        ("with_relu", ctypes.c_bool),
        ("weights", ctypes.POINTER(ctypes.c_float)),
        ("biases", ctypes.POINTER(ctypes.c_float)),
    ]


@dataclass(frozen=True)
class ConvLayer:
    channels: int
    filters: int
    depthwise: bool  # 3x3, one filter per channel; else pointwise (1x1)
    weights: np.ndarray  # float32, as the library stores them: (filters, channels) or (9, channels)
    biases: np.ndarray  # float32 (filters,)


class LibraryFormatError(ValueError):
    """The library's layer table is not the one this module knows how to rebuild."""


def library_path() -> Path:
    """``libfacedetection.so`` as the ``yuface`` wheel installs it."""
    import yuface

    return Path(yuface.__file__).parent / "libfacedetection.so"


def read_layers(path: Path | None = None) -> list[ConvLayer]:
    """The 53 convolution layers of the library's table, copied out of the loaded library."""
    library = ctypes.CDLL(str(path or library_path()))
    table = (_ConvInfo * LAYER_COUNT).in_dll(library, "param_pConvInfo")
    layers = []
    for index, info in enumerate(table):
        if info.is_depthwise == info.is_pointwise:
            raise LibraryFormatError(f"layer {index} is neither only depthwise nor only pointwise")
        rows = 9 if info.is_depthwise else info.num_filters
        if info.is_depthwise and info.channels != info.num_filters:
            raise LibraryFormatError(f"depthwise layer {index} maps {info.channels} channels to {info.num_filters}")
        weights = np.ctypeslib.as_array(info.weights, shape=(rows * info.channels,)).reshape(rows, info.channels)
        biases = np.ctypeslib.as_array(info.biases, shape=(info.num_filters,))
        layers.append(
            ConvLayer(info.channels, info.num_filters, bool(info.is_depthwise), weights.copy(), biases.copy())
        )
    _check_shapes(layers)
    return layers


def _check_shapes(layers: list[ConvLayer]) -> None:
    """The layer widths the network above implies; anything else is another model than the one described."""
    stem = layers[0]
    if stem.depthwise or stem.channels != 32 or stem.filters != 16:
        raise LibraryFormatError(f"the stem is {stem.channels}->{stem.filters}, not the 27(32)->16 patch layer")
    for head, first in _HEAD_FIRST_LAYER.items():
        width = HEAD_WIDTHS[head]
        for level in range(len(STRIDES)):
            pointwise, depthwise = layers[first + 2 * level], layers[first + 2 * level + 1]
            if pointwise.depthwise or not depthwise.depthwise or pointwise.filters != width:
                raise LibraryFormatError(f"the {head} head of level {level} does not have {width} outputs")


def build_onnx(layers: list[ConvLayer]) -> bytes:
    """The network as a serialized ONNX model.

    Input ``image``: float32 (N, 3, H, W), **RGB** 0..255, H and W multiples of 32 (zero-padded). The stem's
    weights are reordered from the library's BGR so callers need not swap channels. Outputs ``<head><level>``
    (e.g. ``cls0``, ``landmarks2``): (N, C, H / stride, W / stride), before any sigmoid or decoding.
    """
    from onnx import TensorProto, checker, helper, numpy_helper

    nodes: list = []
    initializers: list = []
    count = 0

    def fresh(hint: str) -> str:
        nonlocal count
        count += 1
        return f"{hint}_{count}"

    def constant(hint: str, value: np.ndarray | list[float]) -> str:
        name = fresh(hint)
        initializers.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def node(op: str, inputs: list[str], hint: str, **attributes: object) -> str:
        output = fresh(hint)
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def conv(x: str, index: int, relu: bool) -> str:
        layer = layers[index]
        bias = constant(f"b{index}", layer.biases)
        if layer.depthwise:  # (9, C) taps -> (C, 1, 3, 3)
            kernel = layer.weights.reshape(3, 3, layer.channels).transpose(2, 0, 1)[:, None]
            y = node("Conv", [x, constant(f"w{index}", kernel), bias], f"dw{index}", group=layer.channels, pads=[1] * 4)
        else:
            kernel = layer.weights.reshape(layer.filters, layer.channels, 1, 1)
            y = node("Conv", [x, constant(f"w{index}", kernel), bias], f"pw{index}")
        return node("Relu", [y], f"relu{index}") if relu else y

    def dp(x: str, first: int, relu: bool = True) -> str:
        return conv(conv(x, first, relu=False), first + 1, relu)

    def unit(x: str, first: int) -> str:
        return dp(dp(x, first), first + 2)

    def pool(x: str) -> str:
        return node("MaxPool", [x], "pool", kernel_shape=[2, 2], strides=[2, 2])

    def upsample(x: str) -> str:
        return node("Resize", [x, "", constant("scales", [1.0, 1.0, 2.0, 2.0])], "up", mode="nearest")

    # The stem: 27 patch values per filter, (tap row, tap column, B G R) -> (filter, R G B, row, column).
    stem = layers[0]
    patch = stem.weights[:, :27].reshape(stem.filters, 3, 3, 3)[..., ::-1].transpose(0, 3, 1, 2)
    x = node(
        "Conv",
        ["image", constant("w0", np.ascontiguousarray(patch)), constant("b0", stem.biases)],
        "stem",
        strides=[2, 2],
        pads=[1] * 4,
    )
    x = pool(dp(node("Relu", [x], "relu0"), 1))
    x = unit(unit(x, 3), 7)
    c3 = unit(pool(x), 11)
    c4 = unit(pool(c3), 15)
    c5 = unit(pool(c4), 19)
    p5 = dp(c5, 27)
    p4 = dp(node("Add", [upsample(p5), c4], "add4"), 25)
    p3 = dp(node("Add", [upsample(p4), c3], "add3"), 23)

    outputs = []
    for level, features in enumerate((p3, p4, p5)):
        for head in HEADS:
            name = f"{head}{level}"
            last = dp(features, _HEAD_FIRST_LAYER[head] + 2 * level, relu=False)
            nodes.append(helper.make_node("Identity", [last], [name], name=name))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", None, None, None]))
    graph = helper.make_graph(
        nodes,
        "yunet_libfacedetection",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, None, None])],
        outputs,
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="api.ml.yunet")
    checker.check_model(model)
    return model.SerializeToString()


def write_onnx(target: Path, library: Path | None = None) -> Path:
    """The graph of the library's network saved at ``target``, once ONNX Runtime has loaded it and given the
    output shapes the decoding expects on a blank 64x96 image (a partial file is never left under that name)."""
    from api.ml.runtime import onnx_session

    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(build_onnx(read_layers(library)))
    try:
        session = onnx_session(partial)
        names = [output.name for output in session.get_outputs()]
        outputs = session.run(names, {"image": np.zeros((1, 3, 64, 96), np.float32)})
        shapes = {name: output.shape for name, output in zip(names, outputs, strict=True)}
        for level, stride in enumerate(STRIDES):
            for head, width in HEAD_WIDTHS.items():
                expected = (1, width, 64 // stride, 96 // stride)
                if shapes.get(f"{head}{level}") != expected:
                    raise LibraryFormatError(f"{head}{level} has shape {shapes.get(f'{head}{level}')}, not {expected}")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    return target
