"""Anti-spoofing (passive presentation-attack detection) with minivision's two MiniFASNet models.

Each face is cropped twice around its detector box, enlarged 2.7x and 4.0x (context such as a phone bezel
or paper edge is what the wider crop sees), resized to 80x80 and scored by its model. The two softmax
outputs are averaged; class 1 is "real". This reproduces the reference pipeline (Silent-Face-Anti-Spoofing
``test.py``, also deepface's ``Fasnet``) so that its published behaviour carries over; the equivalence
to the PyTorch reference is checked by ``tests/services/test_anti_spoofing.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from api.errors import ModelUnavailableError
from api.ml.minifasnet import ANTI_SPOOF_MODELS, INPUT_SIZE, REAL_CLASS
from api.ml.registry import MINIFASNET
from api.ml.runtime import load_network, onnx_path_of

Box = tuple[float, float, float, float]


def crop_box(image_w: int, image_h: int, box: Box, scale: float) -> tuple[int, int, int, int]:
    """Inclusive pixel corners (x0, y0, x1, y1) of the reference's enlarged crop around ``box`` (x, y, w, h).

    Same arithmetic as the reference (``CropImage._get_new_box``), in the same order, because the
    models were trained on crops made this way and an off-by-one shift changes their scores:

    * the scale is lowered when the enlarged box would exceed the image in either dimension;
    * a crop that crosses the left/top border is shifted inside, then one crossing the right/bottom
      border (measured against the last pixel index, not the size) is shifted back;
    * corners are truncated toward zero (``int()``), and both are inclusive.
    """
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        raise ValueError(f"face box {box} has no area")
    scale = min((image_h - 1) / h, (image_w - 1) / w, scale)
    new_w, new_h = w * scale, h * scale
    center_x, center_y = x + w / 2, y + h / 2
    left, top = center_x - new_w / 2, center_y - new_h / 2
    right, bottom = center_x + new_w / 2, center_y + new_h / 2
    if left < 0:
        right -= left
        left = 0
    if top < 0:
        bottom -= top
        top = 0
    if right > image_w - 1:
        left -= right - image_w + 1
        right = image_w - 1
    if bottom > image_h - 1:
        top -= bottom - image_h + 1
        bottom = image_h - 1
    return int(left), int(top), int(right), int(bottom)


def crop_face(image_rgb: np.ndarray, box: Box, scale: float, size: int = INPUT_SIZE) -> np.ndarray:
    """The model input for one face: a (size, size, 3) uint8 **BGR** crop (the models were trained on BGR)."""
    height, width = image_rgb.shape[:2]
    x0, y0, x1, y1 = crop_box(width, height, box, scale)
    # cv2.resize's default (bilinear) is what the reference uses. Resizing the RGB view first and swapping
    # channels on the 80x80 result gives the same pixels without copying a multi-megapixel region.
    resized = cv2.resize(image_rgb[y0 : y1 + 1, x0 : x1 + 1], (size, size))
    return np.ascontiguousarray(resized[:, :, ::-1])


class MiniFASNetAntiSpoofing:
    """Both MiniFASNet models, loaded once from ``<models_dir>/<stem>.onnx`` (or ``.keras`` with the keras runtime),
    which ``tools/fetch_models.py`` builds from minivision's weights."""

    model_id = MINIFASNET.id

    def __init__(self, models_dir: Path, runtime: str = "onnx", threads: int | None = None) -> None:
        keras_paths = [Path(models_dir) / f"{spec.stem}.keras" for spec in ANTI_SPOOF_MODELS]
        needed = [onnx_path_of(p) if runtime == "onnx" else p for p in keras_paths]
        missing = [p for p in needed if not p.is_file()]
        if missing:
            raise ModelUnavailableError(
                f"Anti-spoofing model(s) missing: {', '.join(str(p) for p in missing)}. Build them with "
                "`make run` or `python -m tools.fetch_models` (tools/fetch_models.py), which downloads minivision's "
                ".pth files (or copies them from the folder in FACE_MODELS_MIRROR when offline) and converts them.",
                missing=[str(p) for p in missing],
            )
        self._networks = [load_network(p, runtime, threads) for p in keras_paths]
        self.scales = tuple(spec.scale for spec in ANTI_SPOOF_MODELS)
        # Scores the crops of a batch of faces; the service replaces it with a DynamicBatcher around
        # itself so that the faces of concurrent requests share one call.
        self.score_crops: Callable[[np.ndarray], np.ndarray] = self.score_crops_now

    def crops(self, image_rgb: np.ndarray, boxes: list[Box]) -> np.ndarray:
        """(N, 2, 80, 80, 3) uint8: per box, the crop of each model (near, wide), BGR."""
        if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image_rgb.shape}")
        return np.stack([np.stack([crop_face(image_rgb, box, scale) for scale in self.scales]) for box in boxes])

    def score_crops_now(self, crops: np.ndarray) -> np.ndarray:
        """(N, 2, 80, 80, 3) crops -> (N, 3) softmax averaged over both models (each sees its own crop)."""
        crops = np.asarray(crops, np.float32)
        near, wide = self._networks
        return (near(crops[:, 0]) + wide(crops[:, 1])) / 2.0

    def probabilities(self, image_rgb: np.ndarray, boxes: list[Box]) -> np.ndarray:
        """(N, 3) softmax averaged over both models, one row per box (x, y, w, h) in ``image_rgb`` pixels."""
        if len(boxes) == 0:
            return np.zeros((0, 3), np.float32)
        return self.score_crops(self.crops(image_rgb, boxes))

    def real_scores(self, image_rgb: np.ndarray, boxes: list[Box]) -> np.ndarray:
        """Per face, the averaged probability of "real" in [0, 1]."""
        return self.probabilities(image_rgb, boxes)[:, REAL_CLASS].astype(np.float32)
