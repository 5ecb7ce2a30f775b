"""MiniFASNet (minivision Silent-Face-Anti-Spoofing) as Keras 3 models, loaded from the published ``.pth``.

The network is a MobileFaceNet-style stack of inverted residual units (1x1 expand + PReLU, 3x3 depthwise
+ PReLU, 1x1 linear projection) whose expansion widths were pruned per unit; the two published models
differ only in those widths and in squeeze-and-excitation on the last unit of each residual stage
(MiniFASNetV1SE). Each model sees an 80x80 crop of the face box enlarged by its own scale (2.7 and 4.0)
and predicts 3 classes, index 1 meaning "real".

The Keras graph is channels-last and inference-only: every BatchNorm is folded into the convolution or
dense layer before it (BN runs after the conv with running statistics, so the fold is exact up to float
rounding) and dropout is left out. Input: a batch of (80, 80, 3) **BGR** crops as float32 in 0..255,
exactly what the reference feeds (OpenCV images; its ``ToTensor`` keeps the 0..255 range, no
normalisation). Output: the softmax over the 3 classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # Keras is imported where a model is built: the service only reads the constants here
    import keras

INPUT_SIZE = 80
NUM_CLASSES = 3
REAL_CLASS = 1
_BN_EPS = 1e-5  # PyTorch's BatchNorm default, which the published models were trained with
_STEM_WIDTH = 32
_EMBEDDING = 128
_SE_REDUCTION = 4


@dataclass(frozen=True)
class _Stage:
    name: str  # the PyTorch attribute name, used for the state-dict keys
    out_width: int
    downsample: bool  # a single strided unit without shortcut, else a stack of residual units


# Outer widths are shared by both models; only the expansion width inside each unit was pruned.
_STAGES = (
    _Stage("conv_23", 64, True),
    _Stage("conv_3", 64, False),
    _Stage("conv_34", 128, True),
    _Stage("conv_4", 128, False),
    _Stage("conv_45", 128, True),
    _Stage("conv_5", 128, False),
)

# Expansion width of every unit, stage by stage (from the published weight shapes).
_EXPANSIONS: dict[str, dict[str, tuple[int, ...]]] = {
    "MiniFASNetV2": {
        "conv_23": (103,),
        "conv_3": (13, 13, 13, 13),
        "conv_34": (231,),
        "conv_4": (231, 52, 26, 77, 26, 26),
        "conv_45": (308,),
        "conv_5": (26, 26),
    },
    "MiniFASNetV1SE": {
        "conv_23": (103,),
        "conv_3": (13, 26, 13, 52),
        "conv_34": (231,),
        "conv_4": (154, 52, 26, 52, 26, 26),
        "conv_45": (308,),
        "conv_5": (26, 26),
    },
}
_WITH_SE = {"MiniFASNetV2": False, "MiniFASNetV1SE": True}
VARIANTS = tuple(_EXPANSIONS)


@dataclass(frozen=True)
class AntiSpoofModel:
    """One of the two published models: file stem (as upstream names it), architecture and crop scale."""

    stem: str
    variant: str
    scale: float


ANTI_SPOOF_MODELS = (
    AntiSpoofModel("2.7_80x80_MiniFASNetV2", "MiniFASNetV2", 2.7),
    AntiSpoofModel("4_0_0_80x80_MiniFASNetV1SE", "MiniFASNetV1SE", 4.0),
)


@dataclass(frozen=True)
class _Fold:
    """How one Keras layer gets its weights: the PyTorch weight key and the BatchNorm folded into it."""

    layer: str
    weight: str
    bn: str | None
    kind: str  # "conv", "depthwise" or "dense"


class _Builder:
    def __init__(self) -> None:
        self.folds: list[_Fold] = []

    def conv(
        self,
        x: keras.KerasTensor,
        prefix: str,
        width: int,
        kernel: int = 1,
        stride: int = 1,
        depthwise: bool = False,
        prelu: bool = True,
    ) -> keras.KerasTensor:
        """Conv (+ folded BN) (+ PReLU), the reference's Conv_block / Linear_block at ``prefix``."""
        import keras

        if kernel > 1 and stride > 1:
            # PyTorch pads 1 pixel on every side; Keras "same" with stride 2 on an even size pads only the
            # bottom/right, which shifts the sampling grid. Pad explicitly to keep the reference's grid.
            x = keras.layers.ZeroPadding2D(kernel // 2, name=f"{prefix}.pad")(x)
            padding = "valid"
        else:
            padding = "same"
        if depthwise:
            x = keras.layers.DepthwiseConv2D(kernel, stride, padding=padding, name=prefix)(x)
        else:
            x = keras.layers.Conv2D(width, kernel, stride, padding=padding, name=prefix)(x)
        kind = "depthwise" if depthwise else "conv"
        self.folds.append(_Fold(prefix, f"{prefix}.conv.weight", f"{prefix}.bn", kind))
        if prelu:
            # One slope per channel, shared over the spatial axes as nn.PReLU(channels) does.
            x = keras.layers.PReLU(shared_axes=[1, 2], name=f"{prefix}.prelu")(x)
        return x

    def squeeze_excite(self, x: keras.KerasTensor, prefix: str, width: int) -> keras.KerasTensor:
        import keras

        gate = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{prefix}.pool")(x)
        # The reference's 1x1 convolutions on a 1x1 map are dense layers on the channel vector.
        gate = keras.layers.Dense(width // _SE_REDUCTION, activation="relu", name=f"{prefix}.fc1")(gate)
        self.folds.append(_Fold(f"{prefix}.fc1", f"{prefix}.fc1.weight", f"{prefix}.bn1", "dense"))
        gate = keras.layers.Dense(width, activation="sigmoid", name=f"{prefix}.fc2")(gate)
        self.folds.append(_Fold(f"{prefix}.fc2", f"{prefix}.fc2.weight", f"{prefix}.bn2", "dense"))
        return keras.layers.Multiply(name=f"{prefix}.scale")([x, gate])

    def unit(
        self,
        x: keras.KerasTensor,
        prefix: str,
        expansion: int,
        out_width: int,
        stride: int,
        residual: bool,
        se: bool,
    ) -> keras.KerasTensor:
        import keras

        shortcut = x
        y = self.conv(x, f"{prefix}.conv", expansion)
        y = self.conv(y, f"{prefix}.conv_dw", expansion, kernel=3, stride=stride, depthwise=True)
        y = self.conv(y, f"{prefix}.project", out_width, prelu=False)
        if se:
            y = self.squeeze_excite(y, f"{prefix}.se_module", out_width)
        if residual:
            y = keras.layers.Add(name=f"{prefix}.add")([shortcut, y])
        return y


def _build(variant: str, input_size: int) -> tuple[keras.Model, list[_Fold]]:
    import keras

    if variant not in _EXPANSIONS:
        raise ValueError(f"unknown MiniFASNet variant {variant!r}; known: {', '.join(VARIANTS)}")
    if input_size % 16:
        raise ValueError("the input size must be a multiple of 16 (four stride-2 stages)")
    b = _Builder()
    inputs = keras.Input((input_size, input_size, 3), dtype="float32", name="bgr_0_255")
    x = b.conv(inputs, "conv1", _STEM_WIDTH, kernel=3, stride=2)
    x = b.conv(x, "conv2_dw", _STEM_WIDTH, kernel=3, depthwise=True)
    for stage in _STAGES:
        expansions = _EXPANSIONS[variant][stage.name]
        if stage.downsample:
            x = b.unit(x, stage.name, expansions[0], stage.out_width, 2, residual=False, se=False)
            continue
        for i, expansion in enumerate(expansions):
            # V1SE puts squeeze-and-excitation on the last unit of each residual stage only.
            se = _WITH_SE[variant] and i == len(expansions) - 1
            x = b.unit(x, f"{stage.name}.model.{i}", expansion, stage.out_width, 1, residual=True, se=se)
    x = b.conv(x, "conv_6_sep", 512)
    # A depthwise kernel as large as the remaining map (5x5 for 80 px): a learned weighted global pool.
    x = keras.layers.DepthwiseConv2D(input_size // 16, padding="valid", name="conv_6_dw")(x)
    b.folds.append(_Fold("conv_6_dw", "conv_6_dw.conv.weight", "conv_6_dw.bn", "depthwise"))
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(_EMBEDDING, name="linear")(x)
    b.folds.append(_Fold("linear", "linear.weight", "bn", "dense"))
    x = keras.layers.Dense(NUM_CLASSES, use_bias=False, name="prob")(x)
    b.folds.append(_Fold("prob", "prob.weight", None, "dense"))
    outputs = keras.layers.Softmax(name="softmax")(x)
    return keras.Model(inputs, outputs, name=variant), b.folds


def build_minifasnet(variant: str, input_size: int = INPUT_SIZE) -> keras.Model:
    """An untrained inference graph of ``variant`` ("MiniFASNetV2" or "MiniFASNetV1SE")."""
    return _build(variant, input_size)[0]


def _strip_prefix(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Models trained under nn.DataParallel save every key as "module.<name>".
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _take(state: dict[str, np.ndarray], used: set[str], key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if key not in state:
        raise ValueError(f"state dict has no {key!r}: not the expected MiniFASNet variant")
    value = state[key].astype(np.float64)
    if shape is not None and value.shape != shape:
        raise ValueError(f"{key} has shape {value.shape}, the architecture expects {shape}")
    used.add(key)
    return value


def _folded(state: dict[str, np.ndarray], used: set[str], fold: _Fold) -> tuple[np.ndarray, np.ndarray | None]:
    weight = _take(state, used, fold.weight)
    if fold.kind == "conv":
        kernel = weight.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
    elif fold.kind == "depthwise":
        kernel = weight.transpose(2, 3, 0, 1)  # (channels, 1, kh, kw) -> (kh, kw, channels, 1)
    else:
        kernel = weight.reshape(weight.shape[0], -1).T  # (out, in[, 1, 1]) -> (in, out)
    if fold.bn is None:
        return kernel, None
    channels = weight.shape[0]
    gamma = _take(state, used, f"{fold.bn}.weight", (channels,))
    beta = _take(state, used, f"{fold.bn}.bias", (channels,))
    mean = _take(state, used, f"{fold.bn}.running_mean", (channels,))
    var = _take(state, used, f"{fold.bn}.running_var", (channels,))
    used.add(f"{fold.bn}.num_batches_tracked")
    factor = gamma / np.sqrt(var + _BN_EPS)
    # The output channel is the last kernel axis for conv and dense, the third for depthwise.
    kernel = kernel * (factor[:, None] if fold.kind == "depthwise" else factor)
    return kernel, beta - mean * factor


def load_state_dict_into(model: keras.Model, folds: list[_Fold], state_dict: dict[str, np.ndarray]) -> None:
    import keras

    state = _strip_prefix(state_dict)
    used: set[str] = set()
    for fold in folds:
        layer = model.get_layer(fold.layer)
        kernel, bias = _folded(state, used, fold)
        expected = tuple(layer.weights[0].shape)
        if kernel.shape != expected:
            raise ValueError(f"{fold.weight} gives a kernel of shape {kernel.shape}, layer has {expected}")
        layer.set_weights([kernel.astype(np.float32)] + ([] if bias is None else [bias.astype(np.float32)]))
    for layer in model.layers:
        if isinstance(layer, keras.layers.PReLU):
            slopes = _take(state, used, f"{layer.name}.weight")
            layer.set_weights([slopes.reshape(tuple(layer.weights[0].shape)).astype(np.float32)])
    unused = sorted(k for k in state if k not in used)
    if unused:
        raise ValueError(f"state dict entries the architecture does not use ({len(unused)}): {unused[:5]}")


def minifasnet_from_state_dict(variant: str, state_dict: dict[str, np.ndarray]) -> keras.Model:
    """``variant`` with the weights of a MiniFASNet state dict (strict: every tensor must be used)."""
    model, folds = _build(variant, INPUT_SIZE)
    load_state_dict_into(model, folds, state_dict)
    return model


def variant_from_filename(name: str) -> str:
    """The architecture named in an upstream file name, e.g. ``4_0_0_80x80_MiniFASNetV1SE.pth``."""
    stem = Path(name).stem
    matches = [v for v in VARIANTS if stem.endswith(v)]
    if len(matches) != 1:
        raise ValueError(f"cannot tell the MiniFASNet variant from the file name {name!r}")
    return matches[0]


def convert_pth_to_keras(pth_path: Path, keras_path: Path, variant: str | None = None) -> Path:
    """Convert one published ``.pth`` into a self-contained ``.keras`` file (written atomically)."""
    from api.ml.torch_state_dict import load_state_dict

    variant = variant or variant_from_filename(pth_path.name)
    model = minifasnet_from_state_dict(variant, load_state_dict(pth_path))
    keras_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = keras_path.with_name(f".{keras_path.stem}.tmp.keras")
    model.save(tmp)
    tmp.replace(keras_path)
    return keras_path
