"""The Keras MiniFASNet rebuild: architecture, strict weight loading, and equivalence to PyTorch.

Equivalence is checked against softmax outputs of the PyTorch reference recorded once on real crops
(``tests/fixtures/minifasnet_reference.json``, written by ``tools/record_minifasnet_reference.py``) and,
when ``torch`` happens to be importable, against the reference network directly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps

import api  # noqa: F401  (thread pools pinned before TensorFlow loads)
from api.ml.minifasnet import (
    ANTI_SPOOF_MODELS,
    VARIANTS,
    build_minifasnet,
    convert_pth_to_keras,
    minifasnet_from_state_dict,
    variant_from_filename,
)
from api.ml.torch_state_dict import load_state_dict
from api.services.anti_spoofing import crop_face

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO / ".." / "shared"
REFERENCE = REPO / "tests" / "fixtures" / "minifasnet_reference.json"
TOLERANCE = 1e-4


def _pth(stem: str) -> Path:
    for folder in (REPO / "resources" / "anti_spoof_models", SHARED / "models" / "anti_spoof"):
        if (folder / f"{stem}.pth").is_file():
            return folder / f"{stem}.pth"
    pytest.skip(f"{stem}.pth absent: run `python -m tools.fetch_models` (or set FACE_MODELS_MIRROR) first")


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    return {m.stem: minifasnet_from_state_dict(m.variant, load_state_dict(_pth(m.stem))) for m in ANTI_SPOOF_MODELS}


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return json.loads(REFERENCE.read_text())


def load_case_rgb(facedata: Path, case: dict[str, Any]) -> np.ndarray:
    """The recorded image decoded as the recorder did (PIL, EXIF applied), checked against its checksum."""
    with Image.open(facedata / case["image"]) as image:
        rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8)
    # A different decoder build would change the pixels, and then the outputs, without any model error.
    assert hashlib.sha256(rgb.tobytes()).hexdigest() == case["pixels_sha256"], (
        f"{case['image']} decodes to other pixels than when recorded; rerun tools/record_minifasnet_reference.py"
    )
    return rgb


def _reference_crops(reference: dict[str, Any], stem: str) -> tuple[np.ndarray, np.ndarray]:
    """Our 80x80 BGR crops of the recorded cases and the recorded PyTorch softmax for model ``stem``."""
    facedata = SHARED / "facedata"
    if not facedata.is_dir():
        pytest.skip(f"{facedata.resolve()} absent: the equivalence images are development data")
    scale = reference["models"][stem]["scale"]
    crops = [crop_face(load_case_rgb(facedata, c), tuple(c["box"]), scale) for c in reference["cases"]]
    return np.stack(crops).astype(np.float32), np.array([c["softmax"][stem] for c in reference["cases"]])


@pytest.mark.parametrize("variant", VARIANTS)
def test_builder_shapes(variant: str) -> None:
    model = build_minifasnet(variant)
    assert tuple(model.input_shape) == (None, 80, 80, 3)
    assert tuple(model.output_shape) == (None, 3)
    se_units = [layer.name for layer in model.layers if layer.name.endswith("se_module.fc1")]
    # V1SE: squeeze-and-excitation on the last unit of conv_3, conv_4 and conv_5; V2 has none.
    assert se_units == (
        ["conv_3.model.3.se_module.fc1", "conv_4.model.5.se_module.fc1", "conv_5.model.1.se_module.fc1"]
        if variant == "MiniFASNetV1SE"
        else []
    )
    out = model(np.zeros((2, 80, 80, 3), np.float32)).numpy()
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-6)


def test_variant_from_filename() -> None:
    assert variant_from_filename("2.7_80x80_MiniFASNetV2.pth") == "MiniFASNetV2"
    assert variant_from_filename("/x/4_0_0_80x80_MiniFASNetV1SE.pth") == "MiniFASNetV1SE"
    with pytest.raises(ValueError):
        variant_from_filename("model.pth")


def test_loading_is_strict() -> None:
    v2 = load_state_dict(_pth("2.7_80x80_MiniFASNetV2"))
    with pytest.raises(ValueError, match="shape"):
        minifasnet_from_state_dict("MiniFASNetV1SE", v2)  # same keys up to SE, other widths
    extra = dict(v2, **{"module.unexpected": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match="does not use"):
        minifasnet_from_state_dict("MiniFASNetV2", extra)


@pytest.mark.shared
@pytest.mark.parametrize("stem", [m.stem for m in ANTI_SPOOF_MODELS])
def test_matches_recorded_pytorch_outputs(models: dict[str, Any], reference: dict[str, Any], stem: str) -> None:
    crops, expected = _reference_crops(reference, stem)
    got = models[stem](crops).numpy()
    assert np.abs(got - expected).max() <= TOLERANCE
    # The set spans both decisions, so agreement is not just "everything real".
    assert len(set(np.argmax(expected, axis=1))) >= 2


def test_saved_keras_file_gives_the_same_outputs(models: dict[str, Any], tmp_path: Path) -> None:
    import keras

    stem = ANTI_SPOOF_MODELS[1].stem
    path = convert_pth_to_keras(_pth(stem), tmp_path / f"{stem}.keras")
    restored = keras.saving.load_model(path, compile=False)
    batch = np.random.default_rng(0).uniform(0, 255, (3, 80, 80, 3)).astype(np.float32)
    np.testing.assert_allclose(restored(batch).numpy(), models[stem](batch).numpy(), atol=1e-7)


def _torch_reference_backbone() -> ModuleType:
    # deepface ships the reference network; loading its file directly avoids importing deepface itself.
    spec = importlib.util.find_spec("deepface")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("deepface is not installed")
    package = Path(next(iter(spec.submodule_search_locations)))
    path = package / "models" / "spoofing" / "pytorch" / "FasNetBackbone.py"
    module_spec = importlib.util.spec_from_file_location("reference_fasnet_backbone", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model", ANTI_SPOOF_MODELS, ids=lambda m: m.variant)
def test_matches_pytorch_directly(models: dict[str, Any], reference: dict[str, Any], model: Any) -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed (recorded outputs are used instead)")
    net = getattr(_torch_reference_backbone(), model.variant)(conv6_kernel=(5, 5))
    state = torch.load(_pth(model.stem), map_location="cpu", weights_only=True)
    net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    net.eval()
    rng = np.random.default_rng(1)
    batch = rng.uniform(0, 255, (4, 80, 80, 3)).astype(np.float32)
    if (SHARED / "facedata").is_dir():
        batch = np.concatenate([batch, _reference_crops(reference, model.stem)[0]])
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy(batch.transpose(0, 3, 1, 2).copy())), dim=1).numpy()
    assert np.abs(models[model.stem](batch).numpy() - expected).max() <= TOLERANCE
