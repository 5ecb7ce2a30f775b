"""Bulk enrolment (``face-service enroll DIR``): folders to users through the service's own checks, with the
real models.

People are built from skimage's astronaut (flipped and rescaled copies are the same person), a photo without a
face (skimage's coffee) and a two-face photo; with ../shared, from face_recognition's example folders and LFW.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from api.cli import main
from api.config import Settings
from api.enrollment import (
    EnrollmentResult,
    EnrollOptions,
    HttpEnroller,
    ServiceClient,
    StoreEnroller,
    scan_people,
    write_report,
)
from api.services.recognition import ImageUpload, RecognitionService, RegisterOptions
from api.store.npz import NpzFaceStore

Photos = dict[str, dict[str, bytes | str]]  # person folder -> file name -> content


@pytest.fixture(scope="module")
def recognition(tmp_path_factory: pytest.TempPathFactory, keras_model_path: Path) -> RecognitionService:
    """The service's recognition models, loaded once for this module through the composition root."""
    from api.composition import load_models

    settings = Settings(
        store_path=tmp_path_factory.mktemp("unused") / "x.npz", store_url=None, embedding_model_path=keras_model_path
    )
    return load_models(settings).recognition


@pytest.fixture(scope="module")
def photos(astronaut: np.ndarray) -> dict[str, bytes]:
    """Encoded test photos: three of the astronaut (one person), one without a face, one with two faces."""
    import io

    import skimage.data

    def encoded(image: np.ndarray, fmt: str) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format=fmt)
        return buffer.getvalue()

    rescaled = np.asarray(Image.fromarray(astronaut).resize((400, 400), Image.Resampling.LANCZOS))
    return {
        "astronaut.jpg": encoded(astronaut, "JPEG"),
        "mirrored.png": encoded(astronaut[:, ::-1], "PNG"),
        "rescaled.webp": encoded(rescaled, "WEBP"),
        "coffee.jpg": encoded(skimage.data.coffee(), "JPEG"),
        "two.jpg": encoded(np.concatenate([astronaut, astronaut], axis=1), "JPEG"),
    }


def make_people(root: Path, people: Photos) -> Path:
    for person, files in people.items():
        folder = root / person
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            target = folder / name
            target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    return root


def enroll(recognition: RecognitionService, store: NpzFaceStore, root: Path, **options) -> EnrollmentResult:
    people, ignored = scan_people(root)
    result = StoreEnroller(recognition, store, EnrollOptions(**options), 10 * 1024 * 1024).run(root, people)
    result.rows[:0] = ignored
    return result


def rows(result: EnrollmentResult, outcome: str) -> set[tuple[str, str, str]]:
    return {(r.person, r.file, r.code) for r in result.rows if r.outcome == outcome}


def names(store: NpzFaceStore, collection: str = "default") -> dict[str, int]:
    return {u.name: u.faces for u in store.list_users(collection=collection)[0]}


def test_every_person_named_after_their_folder_and_every_rejected_file_reported(
    recognition: RecognitionService, photos: dict[str, bytes], tmp_path: Path
) -> None:
    root = make_people(
        tmp_path / "people",
        {
            "Eileen Collins": {
                name: photos[name] for name in ("astronaut.jpg", "mirrored.png", "rescaled.webp", "coffee.jpg")
            }
            | {"two.jpg": photos["two.jpg"], "notes.txt": "not a photo"},
            "Coffee Cup": {"coffee.jpg": photos["coffee.jpg"]},
            "Nobody": {},
        },
    )
    store = NpzFaceStore(tmp_path / "x.npz")
    result = enroll(recognition, store, root)

    assert names(store) == {"Eileen Collins": 3}
    assert (result.registered, result.skipped, result.failed) == (1, 0, 2)
    assert (result.accepted, result.rejected) == (3, 3)  # Eileen's coffee and two-face photos, the cup
    assert rows(result, "rejected") == {
        ("Eileen Collins", "Eileen Collins/coffee.jpg", "NO_FACE"),
        ("Eileen Collins", "Eileen Collins/two.jpg", "MULTIPLE_FACES"),
        ("Coffee Cup", "Coffee Cup/coffee.jpg", "NO_FACE"),
    }
    assert rows(result, "failed") == {("Coffee Cup", "", "NO_FACE"), ("Nobody", "", "NO_IMAGES")}
    assert rows(result, "ignored") == {("Eileen Collins", "Eileen Collins/notes.txt", "NOT_AN_IMAGE")}
    assert "1 registered, 0 skipped, 2 failed" in result.summary() and "photos/s" in result.summary()

    # The descriptors are those POST /api/register stores for the same photos (embedded in one batch or not).
    reference = NpzFaceStore(tmp_path / "reference.npz")
    uploads = [ImageUpload(n, photos[n]) for n in ("astronaut.jpg", "mirrored.png", "rescaled.webp")]
    registered = recognition.register(reference, "Eileen Collins", uploads).user
    ours = store.list_users()[0][0]
    np.testing.assert_allclose(store.embeddings_of(ours.id), reference.embeddings_of(registered.id), atol=1e-5)

    for suffix in (".csv", ".json"):
        write_report(tmp_path / f"report{suffix}", result)
    entries = json.loads((tmp_path / "report.json").read_text())["entries"]
    assert {"person": "Eileen Collins", "file": "Eileen Collins/two.jpg", "outcome": "rejected"}.items() <= next(
        e for e in entries if e["code"] == "MULTIPLE_FACES"
    ).items()
    csv_text = (tmp_path / "report.csv").read_text()
    assert csv_text.startswith("person,file,outcome,code,message")
    assert "Coffee Cup,Coffee Cup/coffee.jpg,rejected,NO_FACE," in csv_text


def test_a_second_run_skips_everyone_and_replace_registers_them_anew(
    recognition: RecognitionService, photos: dict[str, bytes], tmp_path: Path
) -> None:
    root = make_people(tmp_path / "people", {"Eileen Collins": {"a.jpg": photos["astronaut.jpg"]}})
    store = NpzFaceStore(tmp_path / "x.npz")
    assert enroll(recognition, store, root).registered == 1
    first = store.list_users()[0][0]

    again = enroll(recognition, store, root)
    assert (again.registered, again.skipped, again.failed, again.accepted + again.rejected) == (0, 1, 0, 0)
    assert rows(again, "skipped") == {("Eileen Collins", "", "ALREADY_REGISTERED")}
    assert store.list_users() == ([first], 1)

    (root / "Eileen Collins" / "b.png").write_bytes(photos["mirrored.png"])
    replaced = enroll(recognition, store, root, replace=True)
    assert (replaced.registered, replaced.replaced, replaced.skipped) == (1, 1, 0)
    assert "(1 replaced)" in replaced.summary()
    [user], total = store.list_users()
    assert total == 1 and user.id != first.id and user.faces == 2


def test_the_same_face_under_a_second_name_is_refused_unless_duplicates_are_allowed(
    recognition: RecognitionService, photos: dict[str, bytes], tmp_path: Path
) -> None:
    root = make_people(
        tmp_path / "people",
        {"Eileen Collins": {"a.jpg": photos["astronaut.jpg"]}, "Eileen Copy": {"b.png": photos["mirrored.png"]}},
    )
    store = NpzFaceStore(tmp_path / "x.npz")
    result = enroll(recognition, store, root)
    assert names(store) == {"Eileen Collins": 1}
    assert rows(result, "failed") == {("Eileen Copy", "", "DUPLICATE_FACE")}

    allowed = enroll(recognition, store, root, allow_duplicate=True)
    assert (allowed.registered, allowed.skipped) == (1, 1)
    assert names(store) == {"Eileen Collins": 1, "Eileen Copy": 1}


def test_a_refused_replacement_keeps_the_previous_registration(
    recognition: RecognitionService, photos: dict[str, bytes], tmp_path: Path
) -> None:
    store = NpzFaceStore(tmp_path / "x.npz")
    # "Ada" and "Eileen Collins" are the same face (allowed as a duplicate) ...
    before = recognition.register(store, "Ada", [ImageUpload("a.jpg", photos["astronaut.jpg"])]).user
    recognition.register(
        store, "Eileen Collins", [ImageUpload("b.png", photos["mirrored.png"])], RegisterOptions(allow_duplicate=True)
    )
    # ... then replaced by photos that duplicate Eileen: refused, and Ada stays as she was (same id).
    root = make_people(tmp_path / "people", {"Ada": {"c.webp": photos["rescaled.webp"]}})
    result = enroll(recognition, store, root, replace=True)
    assert rows(result, "failed") == {("Ada", "", "DUPLICATE_FACE")}
    assert before in store.list_users()[0] and store.count() == 2


def test_collections(recognition: RecognitionService, photos: dict[str, bytes], tmp_path: Path) -> None:
    root = make_people(tmp_path / "people", {"Eileen Collins": {"a.jpg": photos["astronaut.jpg"]}})
    store = NpzFaceStore(tmp_path / "x.npz")
    store.create_collection("crew")
    assert enroll(recognition, store, root, collection="crew").registered == 1
    assert names(store, "crew") == {"Eileen Collins": 1} and names(store) == {}
    # Another collection is another gallery: no duplicate there, and resumability looks at it alone.
    assert enroll(recognition, store, root).registered == 1


def test_command_line_on_the_configured_store(
    photos: dict[str, bytes],
    tmp_path: Path,
    keras_model_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = make_people(
        tmp_path / "people",
        {"Eileen Collins": {"a.jpg": photos["astronaut.jpg"], "coffee.jpg": photos["coffee.jpg"]}},
    )
    for variable, value in {
        "FACE_STORE_PATH": str(tmp_path / "x.npz"),
        "FACE_STORE_URL": "",
        "FACE_STORE_ENCRYPTION_KEY": "",
        "FACE_EMBEDDING_MODEL_PATH": str(keras_model_path),
        "FACE_AUDIT_LOG_PATH": str(tmp_path / "audit.log"),
    }.items():
        monkeypatch.setenv(variable, value)

    # An unknown collection stops the run at once, before the models load.
    assert main(["enroll", str(root), "--collection", "nowhere", "--no-progress"]) == 2
    assert "No collection named 'nowhere'" in capsys.readouterr().err

    report = tmp_path / "out" / "report.json"
    assert main(["enroll", str(root), "--report", str(report), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "people: 1 registered, 0 skipped, 0 failed; photos: 1 accepted, 1 rejected" in out
    document = json.loads(report.read_text())
    assert document["summary"]["registered"] == 1
    assert [(e["file"], e["code"]) for e in document["entries"]] == [("Eileen Collins/coffee.jpg", "NO_FACE")]
    assert names(NpzFaceStore(tmp_path / "x.npz")) == {"Eileen Collins": 1}

    with pytest.raises(SystemExit):
        main(["enroll", str(root), "--report", str(tmp_path / "report.txt")])  # .csv or .json only
    assert main(["enroll", str(tmp_path / "absent"), "--no-progress"]) == 2


def test_url_mode_against_a_running_service(
    live_server: Callable, photos: dict[str, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import httpx

    server = live_server()
    root = make_people(
        tmp_path / "people",
        {
            "Eileen Collins": {"a.jpg": photos["astronaut.jpg"], "coffee.jpg": photos["coffee.jpg"]},
            "Eileen Çopy": {"b.png": photos["mirrored.png"]},  # after "Eileen Collins"; a name beyond ASCII
            "Twins": {"two.jpg": photos["two.jpg"]},
        },
    )
    report = tmp_path / "report.csv"
    command = ["enroll", str(root), "--url", server.url, "--no-progress", "--report", str(report)]
    assert main(command) == 1  # Eileen Çopy (a duplicate) and Twins fail
    assert "people: 1 registered, 0 skipped, 2 failed" in capsys.readouterr().out
    text = report.read_text()
    assert "Eileen Collins,Eileen Collins/coffee.jpg,rejected,NO_FACE," in text
    assert "Eileen Çopy,,failed,DUPLICATE_FACE," in text
    assert "Twins,Twins/two.jpg,rejected,MULTIPLE_FACES," in text

    users = httpx.get(server.url + "/api/users").json()
    assert [(u["name"], u["faces"]) for u in users["items"]] == [("Eileen Collins", 1)]

    assert main([*command, "--allow-duplicate"]) == 1  # resumes: Eileen skipped, Çopy registered, Twins fails
    assert "people: 1 registered, 1 skipped, 1 failed" in capsys.readouterr().out
    assert main([*command, "--replace", "--allow-duplicate"]) == 1
    assert "people: 2 registered (2 replaced), 0 skipped, 1 failed" in capsys.readouterr().out
    listed = httpx.get(server.url + "/api/users").json()
    assert sorted(u["name"] for u in listed["items"]) == ["Eileen Collins", "Eileen Çopy"]

    assert main([*command, "--collection", "nowhere"]) == 2
    assert "nowhere" in capsys.readouterr().err

    # One photo per request: the first registers, the next ones are added to the user (the service's
    # per-request file limit works the same way); a collection of its own starts empty.
    assert httpx.post(server.url + "/api/collections", json={"name": "crew"}).status_code == 201
    people, _ = scan_people(root)
    enroller = HttpEnroller(ServiceClient(server.url), EnrollOptions(collection="crew", workers=1), 1 << 20, 1, 1 << 20)
    result = enroller.run(root, people)
    assert (result.registered, result.failed, result.accepted) == (1, 2, 1)
    assert ("Eileen Collins", "Eileen Collins/coffee.jpg", "NO_FACE") in rows(result, "rejected")
    crew = httpx.get(server.url + "/api/users", params={"collection": "crew"}).json()["items"]
    assert [(u["name"], u["faces"]) for u in crew] == [("Eileen Collins", 1)]


@pytest.mark.shared
def test_shared_photos_face_recognition_layout(
    recognition: RecognitionService, shared_dir: Path, tmp_path: Path
) -> None:
    """face_recognition's knn example (train/<person>/...) and a few LFW people, as symlinks."""
    examples = shared_dir / "identity" / "face_recognition"
    train = {
        "Kit Harington": [
            "knn_examples__train__kit_harington__john1.jpeg",
            "knn_examples__train__kit_harington__john2.jpeg",
        ],
        "Rose Leslie": ["knn_examples__train__rose_leslie__img1.jpg", "knn_examples__train__rose_leslie__img2.jpg"],
        "Joe Biden": ["biden.jpg", "knn_examples__train__biden__biden2.jpg"],
    }
    root = tmp_path / "people"
    for person, files in train.items():
        (root / person).mkdir(parents=True)
        for file in files:
            (root / person / file).symlink_to(examples / file)
    lfw = sorted(p for p in (shared_dir / "identity" / "lfw" / "images").iterdir() if len(list(p.iterdir())) >= 2)
    for folder in lfw[:8]:
        (root / folder.name).symlink_to(folder, target_is_directory=True)

    store = NpzFaceStore(tmp_path / "x.npz")
    result = enroll(recognition, store, root)
    assert (result.registered, result.failed) == (len(train) + 8, 0), result.rows
    assert {names(store)[p] for p in train} == {2}

    probe = ImageUpload("test.jpg", (examples / "knn_examples__test__johnsnow_test1.jpg").read_bytes())
    found = recognition.verify(store, probe, None, 1, False)
    assert found.verified and found.best is not None and found.best.name == "Kit Harington"
