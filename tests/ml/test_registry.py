"""The model registry: one entry per model with its id, files, sources (sha256, URL) and licence."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from api.config import REPO_ROOT
from api.ml.registry import DLIB_RESNET, MINIFASNET, MODELS


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_component_says_what_it_is_where_it_comes_from_and_its_licence() -> None:
    assert {m.role for m in MODELS.values()} == {"detector", "embedder", "emotion", "anti_spoofing"}
    for component in MODELS.values():
        assert component.id and component.description and component.licence
        for source in component.sources:
            assert source.url.startswith("http"), source
            assert source.package or len(source.sha256) == 64, source  # downloaded files are checked


def test_the_files_the_service_loads_exist_after_set_up() -> None:
    missing = [f for m in MODELS.values() for f in m.files if not (REPO_ROOT / f).is_file()]
    if missing:
        pytest.skip(f"model files not built yet (make models): {missing}")


def test_the_packaged_dlib_weights_have_the_registered_sha256() -> None:
    from api.ml.dlib_resnet import default_weights_path

    (source,) = DLIB_RESNET.sources
    path = default_weights_path()
    assert path.name == source.name and sha256_of(path) == source.sha256


def test_fetched_anti_spoofing_weights_have_the_registered_sha256() -> None:
    folder = REPO_ROOT / "resources" / "anti_spoof_models"
    present = [s for s in MINIFASNET.sources if (folder / s.name).is_file()]
    if not present:
        pytest.skip("the MiniFASNet .pth files are not fetched (make models with FACE_MODELS_MIRROR or network)")
    for source in present:
        assert sha256_of(folder / source.name) == source.sha256


def test_the_service_reports_the_registered_ids(client) -> None:
    models = client.get("/").json()["models"]
    assert models["detector"] == MODELS["yunet"].id
    assert models["embedder"].split("+")[0] == DLIB_RESNET.id  # "+flip": the flip-averaged variant
    assert models["liveness"] in (None, MINIFASNET.id)
    assert models["emotion"] == MODELS["ours"].id
