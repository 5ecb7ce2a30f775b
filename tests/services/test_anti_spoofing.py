"""Liveness service: the reference crop geometry (pure numbers) and end-to-end scores of both models."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps

import api  # noqa: F401  (thread pools pinned before TensorFlow loads)
from api.errors import ModelUnavailableError
from api.services.anti_spoofing import MiniFASNetAntiSpoofing, crop_box, crop_face
from api.services.imaging import decode_image

REPO = Path(__file__).resolve().parents[2]
FACEDATA = REPO / ".." / "shared" / "facedata"
MODELS_DIR = REPO / "resources" / "anti_spoof_models"
REFERENCE = json.loads((REPO / "tests" / "fixtures" / "minifasnet_reference.json").read_text())


# --- crop geometry ---------------------------------------------------------------------------------------


def test_crop_inside_the_image_is_centred_and_truncated() -> None:
    # 50 px box, scale 2.7 -> 135 px around centre (125, 125): 57.5 .. 192.5, truncated by int().
    assert crop_box(640, 480, (100, 100, 50, 50), 2.7) == (57, 57, 192, 192)


def test_crop_crossing_left_top_is_shifted_inside() -> None:
    assert crop_box(640, 480, (0, 0, 50, 50), 2.7) == (0, 0, 135, 135)


def test_crop_crossing_right_bottom_is_shifted_back_to_the_last_pixel() -> None:
    # Centre (185, 85), 81 px: 144.5 .. 225.5 horizontally; the right edge is clamped to index 199.
    assert crop_box(200, 100, (170, 70, 30, 30), 2.7) == (118, 18, 199, 99)


def test_scale_is_lowered_when_the_crop_cannot_fit() -> None:
    # 4x of an 80 px box cannot fit in 100 px: scale becomes 99/80 and the crop spans the whole image.
    assert crop_box(100, 100, (10, 10, 80, 80), 4.0) == (0, 0, 99, 99)
    # Limited by the narrow side only: 59/40 horizontally, the vertical extent follows the same scale.
    assert crop_box(60, 400, (10, 100, 40, 40), 4.0) == (0, 90, 59, 149)


def test_crop_of_a_box_wider_than_the_image() -> None:
    # A detector box may be as wide as the image; the scale goes below 1 and the crop stays inside.
    x0, y0, x1, y1 = crop_box(87, 120, (0.0, 11.2, 87.2, 108.8), 2.7)
    assert 0 <= x0 <= x1 <= 86 and 0 <= y0 <= y1 <= 119


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda c: Path(c["image"]).name)
def test_crop_matches_the_reference_on_recorded_boxes(case: dict[str, Any]) -> None:
    height, width = case["shape"][:2]
    for stem, model in REFERENCE["models"].items():
        assert list(crop_box(width, height, tuple(case["box"]), model["scale"])) == case["crop"][stem]


def test_crop_face_is_bgr_80x80() -> None:
    image = np.zeros((120, 90, 3), np.uint8)
    image[..., 0] = 255  # pure red in RGB
    crop = crop_face(image, (20, 30, 40, 50), 2.7)
    assert crop.shape == (80, 80, 3) and crop.dtype == np.uint8
    assert (crop[..., 2] == 255).all() and (crop[..., :2] == 0).all()


# --- the service ---------------------------------------------------------------------------------------


def test_missing_models_give_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError) as info:
        MiniFASNetAntiSpoofing(tmp_path)
    assert "fetch_models.py" in info.value.message and "FACE_MODELS_MIRROR" in info.value.message


@pytest.fixture(scope="module")
def anti_spoofing() -> MiniFASNetAntiSpoofing:
    if not all((MODELS_DIR / f"{stem}.keras").is_file() for stem in REFERENCE["models"]):
        pytest.skip(f"no converted models in {MODELS_DIR}: run `python -m tools.fetch_models` first")
    return MiniFASNetAntiSpoofing(MODELS_DIR)


def _image(relpath: str) -> np.ndarray:
    if not FACEDATA.is_dir():
        pytest.skip(f"{FACEDATA.resolve()} absent: these checks use development images")
    return decode_image((FACEDATA / relpath).read_bytes())


def _case_image(case: dict[str, Any]) -> np.ndarray:
    """A recorded image decoded as the recorder did (PIL, EXIF applied), checked against its checksum."""
    if not FACEDATA.is_dir():
        pytest.skip(f"{FACEDATA.resolve()} absent: these checks use development images")
    with Image.open(FACEDATA / case["image"]) as image:
        rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8)
    assert hashlib.sha256(rgb.tobytes()).hexdigest() == case["pixels_sha256"], (
        f"{case['image']} decodes to other pixels than when recorded; rerun tools/record_minifasnet_reference.py"
    )
    return rgb


def test_no_boxes_give_no_scores(anti_spoofing: MiniFASNetAntiSpoofing) -> None:
    assert anti_spoofing.real_scores(np.zeros((50, 50, 3), np.uint8), []).shape == (0,)


@pytest.mark.shared
def test_scores_match_the_recorded_reference(anti_spoofing: MiniFASNetAntiSpoofing) -> None:
    for case in REFERENCE["cases"]:
        image = _case_image(case)
        expected = np.mean([case["softmax"][stem] for stem in REFERENCE["models"]], axis=0)
        got = anti_spoofing.probabilities(image, [tuple(case["box"])])[0]
        assert np.abs(got - expected).max() <= 1e-4, case["image"]
        assert anti_spoofing.real_scores(image, [tuple(case["box"])])[0] == pytest.approx(expected[1], abs=1e-4)


@pytest.mark.shared
def test_faces_of_one_image_are_scored_together_like_alone(anti_spoofing: MiniFASNetAntiSpoofing) -> None:
    from api.services.detection import YuNetDetector

    image = _image("identity/compreface/011_3.jpg")
    boxes = [face.box for face in YuNetDetector().detect(image)]
    assert len(boxes) >= 2
    together = anti_spoofing.real_scores(image, boxes)
    alone = np.array([anti_spoofing.real_scores(image, [box])[0] for box in boxes])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert ((together >= 0) & (together <= 1)).all()


@pytest.mark.shared
def test_reference_samples_get_the_published_decision(anti_spoofing: MiniFASNetAntiSpoofing) -> None:
    from api.services.detection import YuNetDetector

    detector = YuNetDetector()
    scores = {}
    for name in ("image_T1.jpg", "image_F2.jpg"):
        image = _image(f"antispoof/silent_face/{name}")
        scores[name] = float(anti_spoofing.real_scores(image, [detector.detect(image)[0].box])[0])
    assert scores["image_T1.jpg"] > 0.5 > scores["image_F2.jpg"], scores
