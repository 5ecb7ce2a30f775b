"""YuNet rebuilt from libfacedetection's weights: the ONNX graph finds what the library finds, where it finds it."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from api.errors import ModelUnavailableError
from api.ml.yunet import LAYER_COUNT, LibraryFormatError, _check_shapes, read_layers, write_onnx
from api.services.detection import YuNetDetector, YuNetOnnx, _libfacedetection


@pytest.fixture(scope="module")
def library():
    return _libfacedetection()


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> YuNetOnnx:
    """A graph written here and now from the installed library (not the one `make models` left in resources/)."""
    return YuNetOnnx(write_onnx(tmp_path_factory.mktemp("yunet") / "face_detector_yunet.onnx"))


def at_longer_side(image: np.ndarray, side: int) -> np.ndarray:
    factor = side / max(image.shape[:2])
    size = (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)


def assert_same_faces(library, rebuilt: YuNetOnnx, image: np.ndarray) -> int:
    """Same faces in the same order, with the same whole-percent scores and whole-pixel coordinates. Float
    rounding may put a value that lies on a whole number on the other side of it: at most one unit apart."""
    theirs, ours = library(image, 0.2), rebuilt(image, 0.2)
    assert len(ours) == len(theirs), (ours[:, :5], theirs[:, :5])
    if len(ours):
        scores = np.rint(100 * ours[:, 0]) - np.rint(100 * theirs[:, 0])
        assert np.abs(scores).max() <= 1 and np.abs(ours[:, 1:] - theirs[:, 1:]).max() <= 1
        assert np.mean(ours[:, 1:] == theirs[:, 1:]) > 0.9, np.mean(ours[:, 1:] == theirs[:, 1:])
    return len(ours)


def test_the_library_holds_the_layers_the_rebuild_expects() -> None:
    layers = read_layers()
    assert len(layers) == LAYER_COUNT
    assert (layers[0].channels, layers[0].filters, layers[0].depthwise) == (32, 16, False)
    assert all(layer.depthwise for layer in layers[2:29:2]), "every unit is a pointwise layer and a depthwise one"
    assert np.isfinite(np.concatenate([layer.weights.ravel() for layer in layers])).all()


def test_another_layer_table_is_refused() -> None:
    layers = read_layers()
    changed = [*layers[:29], layers[30], layers[29], *layers[31:]]  # a head's depthwise and pointwise swapped
    with pytest.raises(LibraryFormatError):
        _check_shapes(changed)


def test_the_astronaut_at_the_detection_sizes(library, rebuilt: YuNetOnnx, astronaut: np.ndarray) -> None:
    for side in (320, 640, 300):
        assert assert_same_faces(library, rebuilt, at_longer_side(astronaut, side)) >= 1


@pytest.mark.shared
def test_photos_of_several_sizes_and_faces(library, rebuilt: YuNetOnnx, shared_dir: Path) -> None:
    photos = sorted((shared_dir / "identity" / "deepface").glob("*.jpg"))
    photos += sorted((shared_dir / "identity" / "lfw" / "images").rglob("*.jpg"))[::97][:40]
    assert len(photos) > 40
    found = 0
    for path in photos:
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        for side in (300, 320, 640):  # LFW's 250 px photos are upscaled to 300 px, larger photos shrunk
            found += assert_same_faces(library, rebuilt, at_longer_side(image, side))
    assert found >= 3 * len(photos)


def test_images_the_network_must_pad(library, rebuilt: YuNetOnnx, astronaut: np.ndarray) -> None:
    """Sizes that are not multiples of 32, a strip, and a face cut by the border."""
    rng = np.random.default_rng(3)
    images = [
        astronaut[:301, :257],
        astronaut[40:250, 150:420],  # the face reaches the left border
        rng.integers(0, 256, (33, 700, 3), dtype=np.uint8),
        np.full((1, 64, 3), 128, np.uint8),
    ]
    for image in images:
        assert_same_faces(library, rebuilt, np.ascontiguousarray(image))


def test_a_missing_or_broken_graph_file_is_reported_with_the_command_that_builds_it(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="make models"):
        YuNetDetector(model_path=tmp_path / "absent.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a graph")
    with pytest.raises(ModelUnavailableError, match="make models"):
        YuNetDetector(model_path=broken)
    assert not list(tmp_path.glob("*.partial"))


def test_the_library_runtime_needs_no_graph_file(tmp_path: Path) -> None:
    detector = YuNetDetector(runtime="library", model_path=tmp_path / "absent.onnx")
    assert detector.runtime == "library"
    with pytest.raises(ValueError, match="runtime"):
        YuNetDetector(runtime="tensorflow")  # type: ignore[arg-type]


def test_set_up_writes_the_graph_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tools.fetch_models import FetchContext, build_detector_graph

    context = FetchContext(tmp_path / "resources", mirror=None, timeout_s=1.0, download=False)
    build_detector_graph(context)
    built = tmp_path / "resources" / "face_detector_yunet.onnx"
    assert built.is_file() and "built face_detector_yunet.onnx" in capsys.readouterr().out
    build_detector_graph(context)
    assert "is up to date" in capsys.readouterr().out
    assert YuNetDetector(model_path=built).detect(np.full((240, 320, 3), 128, np.uint8)) == []
