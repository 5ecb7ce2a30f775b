"""FaceEngine end to end: detect -> select -> align -> embed, with a typed error for every unusable input."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import api  # noqa: F401  (thread pools pinned before numpy, OpenCV or TensorFlow load)
from api.errors import FaceServiceError, FaceTooSmallError, MultipleFacesError, NoFaceError
from api.services.detection import DetectedFace
from api.services.imaging import decode_image
from tests.helpers import deepface_people_similarities

ASTRONAUT_BOX = (178.0, 63.0, 89.0, 112.0)  # YuNet's box on skimage's astronaut (x, y, w, h)


def _encode(array: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _inside(face: DetectedFace, height: int, width: int) -> bool:
    x, y, w, h = face.box
    return min(x, y) >= 0 and x + w <= width + 1e-3 and y + h <= height + 1e-3 and min(w, h) > 0


def _landmarks_in_box(face: DetectedFace, slack: float = 0.0) -> bool:
    x, y, w, h = face.box
    marks = face.landmarks
    return bool(
        ((marks[:, 0] >= x - slack) & (marks[:, 0] <= x + w + slack)).all()
        and ((marks[:, 1] >= y - slack) & (marks[:, 1] <= y + h + slack)).all()
    )


@pytest.fixture(scope="module")
def astronaut_embedding(engine, astronaut) -> np.ndarray:
    return engine.represent(astronaut, "single").embedding


# --- one face, no face, small faces, several faces ----------------------------------------------------------


def test_astronaut_has_exactly_one_face(engine, astronaut, astronaut_embedding) -> None:
    faces = engine.detect(astronaut)
    assert len(faces) == 1
    face = faces[0]
    np.testing.assert_allclose(face.box, ASTRONAUT_BOX, atol=6)
    assert face.landmarks is not None and face.landmarks.shape == (5, 2)
    assert _inside(face, 512, 512) and _landmarks_in_box(face)
    assert face.landmarks[0, 0] < face.landmarks[1, 0]  # eye on the image's left first
    assert astronaut_embedding.shape == (128,) and astronaut_embedding.dtype == np.float32
    assert abs(float(np.linalg.norm(astronaut_embedding)) - 1.0) < 1e-5
    assert engine.model_id.startswith("dlib-resnet-v1")


def test_embedding_is_deterministic(engine, astronaut, astronaut_embedding) -> None:
    again = engine.represent(astronaut.copy(), "largest").embedding
    assert float(again @ astronaut_embedding) > 0.99999


def test_batch_embedding_matches_single(engine, astronaut, astronaut_embedding) -> None:
    face = engine.detect(astronaut)[0]
    batch = engine.embed(astronaut, [face, face])
    assert batch.shape == (2, 128)
    np.testing.assert_allclose(batch, np.stack([astronaut_embedding] * 2), atol=1e-5)
    assert engine.embed(astronaut, []).shape == (0, 128)


@pytest.mark.parametrize("kind", ["coffee", "grey", "noise", "black"])
def test_no_face(engine, kind: str) -> None:
    import skimage.data

    images = {
        "coffee": skimage.data.coffee(),
        "grey": np.full((480, 640, 3), 128, np.uint8),
        "noise": np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8),
        "black": np.zeros((200, 200, 3), np.uint8),
    }
    image = images[kind]
    faces = engine.detect(image)
    assert faces == []
    with pytest.raises(NoFaceError):
        engine.select_face(image, faces, "single")
    with pytest.raises(NoFaceError):
        engine.represent(image)


@pytest.mark.parametrize("on_canvas", [False, True], ids=["alone", "on-640-canvas"])
def test_tiny_face_is_too_small(engine, astronaut, on_canvas: bool) -> None:
    factor = 25 / ASTRONAUT_BOX[2]  # face ~25 px wide
    small = cv2.resize(astronaut, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
    image = small
    if on_canvas:  # no upscaling by the detector: the face is found at its own size
        image = np.full((480, 640, 3), 128, np.uint8)
        image[100 : 100 + small.shape[0], 100 : 100 + small.shape[1]] = small
    faces = engine.detect(image)
    assert len(faces) == 1 and faces[0].size < engine.min_face_size
    with pytest.raises(FaceTooSmallError) as info:
        engine.select_face(image, faces, "largest")
    assert info.value.details["min_face_size"] == engine.min_face_size
    assert info.value.details["face_size"] < engine.min_face_size


def test_small_face_is_ignored_next_to_a_usable_one(engine, astronaut) -> None:
    factor = 25 / ASTRONAUT_BOX[2]
    small = cv2.resize(astronaut, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
    image = np.full((512, 800, 3), 128, np.uint8)
    image[:, :512] = astronaut
    image[200 : 200 + small.shape[0], 600 : 600 + small.shape[1]] = small
    faces = engine.detect(image)
    assert len(faces) == 2
    chosen = engine.select_face(image, faces, "single")  # the tiny face does not count as a second face
    assert chosen.box[0] < 512


@pytest.fixture(scope="module")
def two_astronauts(astronaut) -> np.ndarray:
    """The astronaut at full size on the left and at 3/4 size on the right."""
    right = cv2.resize(astronaut, (384, 384), interpolation=cv2.INTER_AREA)
    return np.concatenate([astronaut, np.pad(right, ((64, 64), (0, 0), (0, 0)))], axis=1)


def test_two_faces_single_vs_largest_vs_central(engine, two_astronauts) -> None:
    faces = engine.detect(two_astronauts)
    assert len(faces) == 2
    with pytest.raises(MultipleFacesError) as info:
        engine.select_face(two_astronauts, faces, "single")
    assert info.value.details == {"faces": 2}
    largest = engine.select_face(two_astronauts, faces, "largest")
    assert largest.box[0] < 512 and largest.area == max(f.area for f in faces)
    central = engine.select_face(two_astronauts, faces, "central")
    distances = [np.hypot(f.box[0] + f.box[2] / 2 - 448, f.box[1] + f.box[3] / 2 - 256) for f in faces]
    assert central is faces[int(np.argmin(distances))]
    assert central.box[0] > 512  # the smaller face is the nearer to the centre (448, 256): 254 vs 261 px


def test_both_astronauts_are_the_same_person(engine, two_astronauts) -> None:
    faces = engine.detect(two_astronauts)
    first, second = engine.embed(two_astronauts, faces)
    assert float(first @ second) > 0.95


@pytest.mark.shared
@pytest.mark.parametrize(
    ("relpath", "minimum"),
    [("robustness/faceapi/bbt4.jpg", 6), ("identity/compreface/011_3.jpg", 3), ("robustness/insightface/t1.jpg", 5)],
)
def test_group_photo(engine, shared_dir: Path, relpath: str, minimum: int) -> None:
    image = decode_image((shared_dir / relpath).read_bytes())
    faces = engine.detect(image)
    assert len(faces) >= minimum
    assert all(_inside(f, *image.shape[:2]) for f in faces)
    assert [f.area for f in faces] == sorted((f.area for f in faces), reverse=True)
    with pytest.raises(MultipleFacesError):
        engine.select_face(image, faces, "single")
    assert engine.select_face(image, faces, "largest") is faces[0]
    assert engine.embed(image, faces).shape == (len(faces), 128)


# --- large, thin, grey, transparent and rotated input --------------------------------------------------------


def test_6000px_photo_is_mapped_back_to_its_pixels(engine, astronaut, astronaut_embedding) -> None:
    image = np.zeros((6000, 6000, 3), np.uint8)
    image[1500:4500, 2000:5000] = cv2.resize(astronaut, (3000, 3000), interpolation=cv2.INTER_LINEAR)
    result = engine.represent(image, "single")
    face = result.face
    assert _inside(face, 6000, 6000)
    assert _landmarks_in_box(face)
    factor = 3000 / 512
    expected = (2000 + ASTRONAUT_BOX[0] * factor, 1500 + ASTRONAUT_BOX[1] * factor, 89 * factor, 112 * factor)
    np.testing.assert_allclose(face.box, expected, atol=0.06 * 3000 / 512 * 112)  # 6% of the face
    assert float(result.embedding @ astronaut_embedding) > 0.98  # measured 0.9967


@pytest.mark.parametrize("shape", [(1, 2000), (2000, 1), (3, 5000), (1, 1), (2, 2), (8, 700)])
def test_degenerate_shapes_give_no_face(engine, shape: tuple[int, int]) -> None:
    """Thin strips used to crash the detector's resize (width 0: cv2.error)."""
    image = np.full((*shape, 3), 100, np.uint8)
    with pytest.raises(NoFaceError):
        engine.represent(image)


def test_grey_photo_through_decode_image(engine, astronaut, astronaut_embedding) -> None:
    grey = np.asarray(Image.fromarray(astronaut).convert("L"))
    image = decode_image(_encode(grey))
    assert image.shape == (512, 512, 3)
    result = engine.represent(image, "single")
    np.testing.assert_allclose(result.face.box, ASTRONAUT_BOX, atol=6)
    assert float(result.embedding @ astronaut_embedding) > 0.97  # measured 0.992


def test_rgba_photo_through_decode_image(engine, astronaut, astronaut_embedding) -> None:
    rgba = np.dstack([astronaut, np.full((512, 512), 255, np.uint8)])
    rgba[:, :100, 3] = 0  # a transparent strip far from the face
    image = decode_image(_encode(rgba))
    assert image.shape == (512, 512, 3)
    result = engine.represent(image, "single")
    assert float(result.embedding @ astronaut_embedding) > 0.999  # measured 1.0 (opaque face, same pixels)


@pytest.mark.parametrize(("orientation", "stored"), [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)])
def test_exif_rotated_photo_gives_the_same_embedding(
    engine, astronaut, orientation: int, stored: Image.Transpose
) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    sideways = Image.fromarray(astronaut).transpose(stored)
    buffer = io.BytesIO()
    sideways.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    decoded = decode_image(buffer.getvalue())
    upright_decoded = decode_image(_encode(astronaut, "JPEG", quality=95))
    assert np.abs(decoded.astype(int) - upright_decoded).mean() < 3  # sideways stored, upright decoded
    assert np.abs(np.asarray(sideways, int) - upright_decoded).mean() > 30
    rotated, upright = engine.represent(decoded, "single"), engine.represent(upright_decoded, "single")
    np.testing.assert_allclose(rotated.face.box, upright.face.box, atol=3)
    assert float(rotated.embedding @ upright.embedding) > 0.99  # measured 0.9999


# --- identity ---------------------------------------------------------------------------------------------


@pytest.mark.shared
def test_same_person_is_more_similar_than_different_people(engine, shared_dir: Path) -> None:
    similarity, same = deepface_people_similarities(engine, shared_dir)
    genuine, impostor = similarity[same], similarity[~same & ~np.eye(len(same), dtype=bool)]
    # measured: genuine min 0.939, impostor max 0.903 (10 photos of 5 people)
    print(f"genuine min {genuine.min():.3f}, impostor max {impostor.max():.3f}")
    assert genuine.min() > impostor.max(), (genuine.round(3), impostor.max())
    for row in range(len(same)):  # each photo's best match is the other photo of the same person
        others = similarity[row].copy()
        others[row] = -1
        assert same[row, int(np.argmax(others))]


# --- anything at all: a typed error or a result ------------------------------------------------------------


@pytest.mark.shared
def test_robustness_photos_give_a_result_or_a_typed_error(engine, shared_dir: Path) -> None:
    folder = shared_dir / "robustness"
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and "lfw_subset_25px" not in p.parts)
    paths += sorted((folder / "skimage" / "lfw_subset_25px").rglob("*.png"))[::20]  # a few 25x25 patches
    outcomes: dict[str, str] = {}
    for path in paths:
        try:
            image = decode_image(path.read_bytes())
            result = engine.represent(image, "largest")
        except FaceServiceError as exc:
            outcomes[str(path.relative_to(folder))] = exc.code
            continue
        assert _inside(result.face, *image.shape[:2]), path
        assert abs(float(np.linalg.norm(result.embedding)) - 1.0) < 1e-4, path
        outcomes[str(path.relative_to(folder))] = "ok"
    assert outcomes["skimage/astronaut.png"] == "ok"
    assert outcomes["skimage/coffee.png"] == "NO_FACE"
    assert outcomes["faceapi/test_white.png"] == "NO_FACE"
    assert outcomes["compreface/einstein.jpeg"] == "ok"
    assert outcomes["compreface/truncated.jpg"] == "INVALID_IMAGE"
    assert outcomes["compreface/einstein.gif"] == "UNSUPPORTED_MEDIA_TYPE"


def test_two_pass_detection_keeps_large_and_small_faces(astronaut: np.ndarray) -> None:
    """The quick 320 px pass answers for a large face; a small face falls through to the 640 px pass."""
    import cv2

    from api.services.detection import YuNetDetector

    two_pass, full = YuNetDetector(first_pass_side=320), YuNetDetector(first_pass_side=0)
    large = cv2.resize(astronaut, (1536, 1536))  # face ~270 px: found by the first pass
    small = np.full((2000, 2000, 3), 120, np.uint8)
    small[700:1212, 900:1412] = astronaut  # face ~90 px: ~14 px at 320, needs the full pass
    for image in (large, small):
        quick, reference = two_pass.detect(image), full.detect(image)
        assert len(quick) == len(reference) == 1
        assert np.allclose(quick[0].box, reference[0].box, atol=0.06 * reference[0].size)
