"""Collections in the store, on both backends: separate galleries that never see each other's users.

Each test runs as ``[npz]`` and ``[postgres]`` (the ``store`` fixture of tests/store/conftest.py). Format
migration of ``.npz`` files and of the PostgreSQL schema is tested at the end, per backend.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from api.errors import (
    CollectionExistsError,
    CollectionNotEmptyError,
    CollectionNotFoundError,
    CollectionProtectedError,
    InvalidCollectionNameError,
    UserNotFoundError,
)
from api.store import DEFAULT_COLLECTION, FaceStore, SearchResult, StoredUser
from tests.store.helpers import snapshot, unit


def test_default_always_exists_and_others_are_created_once(store: FaceStore) -> None:
    assert [c.name for c in store.list_collections()] == [DEFAULT_COLLECTION]
    created = store.create_collection("team-a")
    assert (created.name, created.users, created.faces) == ("team-a", 0, 0)
    assert created.created_at.utcoffset() is not None
    with pytest.raises(CollectionExistsError):
        store.create_collection("team-a")
    with pytest.raises(CollectionExistsError):
        store.create_collection(DEFAULT_COLLECTION)
    assert [c.name for c in store.list_collections()] == ["default", "team-a"]
    assert store.get_collection("team-a") == created


@pytest.mark.parametrize("name", ["", "A", "has space", "x" * 65, "ünï", "a/b", "a.b", "a\x00"])
def test_invalid_names_are_refused_and_create_nothing(store: FaceStore, name: str) -> None:
    with pytest.raises(InvalidCollectionNameError):
        store.create_collection(name)
    assert [c.name for c in store.list_collections()] == [DEFAULT_COLLECTION]


def test_the_same_face_in_two_collections_never_crosses(store: FaceStore) -> None:
    """Registered in both with a duplicate guard: both succeed (the guard sees only its collection); every
    read and search stays inside its collection; an id from another collection is an unknown id."""
    rng = np.random.default_rng(1)
    face = unit(rng, 2)
    store.create_collection("team-a")
    store.create_collection("team-b")
    seen: dict[str, SearchResult] = {}

    def refuse_in(collection: str):
        def guard(found: SearchResult) -> None:
            seen[collection] = found
            if any(m and m[0].cosine > 0.99 for m in found.matches):
                raise AssertionError("the guard saw the face of another collection")

        return guard

    a = store.add_user("Ann", face, "m", collection="team-a", guard=refuse_in("team-a"))
    b = store.add_user("Ann", face, "m", collection="team-b", guard=refuse_in("team-b"))
    assert seen["team-b"].users == 0 and seen["team-b"].matches == [[], []]
    assert (a.collection, b.collection) == ("team-a", "team-b")

    found_a = store.search("m", face[0], 5, collection="team-a")
    assert [m.user_id for m in found_a.matches[0]] == [a.id] and found_a.users == 1 and found_a.faces == 2
    assert [m.user_id for m in store.search("m", face[0], 5, collection="team-b").matches[0]] == [b.id]
    assert store.search("m", face[0], 5).matches == [[]]  # default holds nobody

    for read in (
        lambda: store.get(b.id, collection="team-a"),
        lambda: store.embeddings_of(b.id, collection="team-a"),
        lambda: store.rename(b.id, "x", collection="team-a"),
        lambda: store.add_faces(b.id, unit(rng, 1), "m", collection="team-a"),
        lambda: store.delete(b.id, collection="team-a"),
        lambda: store.get(b.id),
    ):
        with pytest.raises(UserNotFoundError):
            read()
    assert store.get(b.id, collection="team-b").name == "Ann"
    assert store.list_users(collection="team-a") == ([store.get(a.id, collection="team-a")], 1)
    assert store.list_users() == ([], 0)
    assert (store.count(), store.count("team-a"), store.count("team-b"), store.count("default")) == (2, 1, 1, 0)
    assert {c.name: (c.users, c.faces) for c in store.list_collections()} == {
        "default": (0, 0),
        "team-a": (1, 2),
        "team-b": (1, 2),
    }


def test_unknown_collections_are_not_found_and_nothing_changes(store: FaceStore) -> None:
    rng = np.random.default_rng(2)
    user = store.add_user("u", unit(rng, 1), "m")
    before = snapshot(store)
    for call in (
        lambda: store.add_user("x", unit(rng, 1), "m", collection="nope"),
        lambda: store.search("m", unit(rng, 1), 3, collection="nope"),
        lambda: store.list_users(collection="nope"),
        lambda: store.count("nope"),
        lambda: store.get(user.id, collection="nope"),
        lambda: store.get_collection("nope"),
        lambda: store.delete_collection("nope"),
    ):
        with pytest.raises(CollectionNotFoundError):
            call()
    assert snapshot(store) == before
    assert [c.name for c in store.list_collections()] == [DEFAULT_COLLECTION]


def test_deleting_a_collection_removes_every_user_and_descriptor_of_it(store: FaceStore, location: str, reopen) -> None:
    rng = np.random.default_rng(3)
    store.create_collection("gone")
    kept = store.add_user("kept", unit(rng, 2), "m")
    doomed = [store.add_user(f"d{i}", unit(rng, 3), "m", collection="gone") for i in range(3)]
    with pytest.raises(CollectionNotEmptyError):
        store.delete_collection("gone")
    assert store.count("gone") == 3
    with pytest.raises(CollectionProtectedError):
        store.delete_collection(DEFAULT_COLLECTION, force=True)

    assert store.delete_collection("gone", force=True) == 3
    with pytest.raises(CollectionNotFoundError):
        store.get_collection("gone")
    again = reopen()
    assert [u.record.id for batch in again.export_users(10) for u in batch] == [kept.id]
    assert again.count() == 1
    if "://" in location:  # provably gone from every table
        import psycopg

        with psycopg.connect(location) as conn:
            ids = [d.id for d in doomed]
            for table, column in (("face_users", "id"), ("face_descriptors", "user_id")):
                n = conn.execute(f"SELECT count(*) FROM {table} WHERE {column} = ANY(%s)", (ids,)).fetchone()[0]
                assert n == 0, table
            for table in ("face_descriptors", "face_gallery_counts"):
                n = conn.execute(f"SELECT count(*) FROM {table} WHERE collection = 'gone'").fetchone()[0]
                assert n == 0, table
    else:
        with np.load(location, allow_pickle=False) as npz:
            text = npz["meta"].tobytes().decode("utf-8")
            rows = npz["emb_0"]
        assert "gone" not in text and all(d.id not in text for d in doomed)
        assert rows.shape[0] == 2  # only the kept user's faces
    # An empty collection goes without force; a new one of the same name starts empty.
    store.create_collection("gone")
    assert store.delete_collection("gone") == 0


def test_a_copy_keeps_collections(store: FaceStore, other_store: FaceStore) -> None:
    """``store copy`` between the backends: every user stays in their collection, empty collections come along."""
    from api.store.copy import copy_store

    rng = np.random.default_rng(4)
    store.create_collection("site-1")
    store.create_collection("empty-one")
    store.add_user("a", unit(rng, 2), "m")
    store.add_user("b", unit(rng, 1), "m", collection="site-1")
    report = copy_store(store, other_store, batch_size=1)
    assert (report.copied, report.skipped) == (2, 0)
    assert snapshot(other_store) == snapshot(store)
    counts = {c.name: (c.users, c.faces) for c in other_store.list_collections()}
    assert counts == {"default": (1, 2), "empty-one": (0, 0), "site-1": (1, 1)}
    assert copy_store(store, other_store).copied == 0  # re-run: nothing new


def test_import_refuses_a_bad_collection_name(store: FaceStore) -> None:
    rng = np.random.default_rng(5)
    user = store.add_user("a", unit(rng, 1), "m")
    exported = next(store.export_users(10))[0]
    from dataclasses import replace

    bad = StoredUser(replace(exported.record, id="other", collection="Bad Name"), exported.embeddings)
    with pytest.raises(InvalidCollectionNameError):
        store.import_users([bad])
    assert store.count() == 1 and store.get(user.id) == user


# --- format and schema migration ---------------------------------------------------------------------------


def test_a_version_1_npz_file_is_read_into_default_and_stays_version_1_until_collections_are_used(
    tmp_path: Path,
) -> None:
    from api.store.npz import NpzFaceStore

    path = tmp_path / "face_database.npz"
    rng = np.random.default_rng(6)
    # A version 1 file as the documented format describes it (written by hand, not by this code).
    meta = {
        "models": [{"id": "m", "dim": 16}],
        "users": [
            {
                "id": "0" * 32,
                "name": "Old",
                "model_id": "m",
                "created_at": "2025-01-02T03:04:05+00:00",
                "updated_at": "2025-01-02T03:04:05+00:00",
                "faces": 2,
            }
        ],
    }
    faces = unit(rng, 2)
    np.savez(
        path,
        format_version=np.array(1, np.int64),
        version=np.array(7, np.int64),
        meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
        emb_0=faces,
    )
    store = NpzFaceStore(path)
    (old,) = store.list_users()[0]
    assert (old.name, old.collection, old.faces) == ("Old", DEFAULT_COLLECTION, 2)
    np.testing.assert_array_equal(store.embeddings_of(old.id), faces)
    assert [c.name for c in store.list_collections()] == [DEFAULT_COLLECTION]

    store.rename(old.id, "Older")
    with np.load(path, allow_pickle=False) as npz:
        assert int(npz["format_version"]) == 1, "nothing a version 1 reader cannot hold: stay version 1"
    store.create_collection("new-site")
    store.add_user("n", unit(rng, 1), "m", collection="new-site")
    with np.load(path, allow_pickle=False) as npz:
        assert int(npz["format_version"]) == 2
        written = json.loads(npz["meta"].tobytes().decode("utf-8"))
    assert [c["name"] for c in written["collections"]] == ["default", "new-site"]
    assert [u["collection"] for u in written["users"]] == ["default", "new-site"]
    again = NpzFaceStore(path)
    assert again.get(old.id).name == "Older" and again.count("new-site") == 1
    assert again.version == 10


def test_a_version_1_postgres_schema_migrates_forward(postgres_url: str) -> None:
    """A database written by schema version 1 (the store before collections): its users land in ``default``,
    counts gain faces, and everything keeps working."""
    import psycopg
    from pgvector.psycopg import register_vector

    from api.store.postgres import _MIGRATIONS, PostgresFaceStore

    rng = np.random.default_rng(7)
    faces = unit(rng, 3)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        register_vector(conn)
        conn.execute(
            "CREATE TABLE face_store_schema (singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton), "
            "version integer NOT NULL, migrated_at timestamptz NOT NULL DEFAULT now())"
        )
        for statement in _MIGRATIONS[1]:
            conn.execute(statement)
        conn.execute("INSERT INTO face_store_schema (version) VALUES (1)")
        conn.execute("INSERT INTO face_models VALUES ('m', 16, 'face_descriptors_hnsw_x', now())")
        conn.execute(
            "INSERT INTO face_users VALUES ('u1', 'default', %s, 'm', 3, '2025-01-01Z', '2025-01-01Z')", (b"Old",)
        )
        for position, face in enumerate(faces):
            conn.execute("INSERT INTO face_descriptors VALUES ('u1', %s, 'default', 'm', %s)", (position, face))
        conn.execute("INSERT INTO face_gallery_counts VALUES ('default', 'm', 1)")

    store = PostgresFaceStore(postgres_url)
    try:
        assert store.get("u1").name == "Old" and store.get("u1").collection == DEFAULT_COLLECTION
        (default,) = store.list_collections()
        assert (default.name, default.users, default.faces) == (DEFAULT_COLLECTION, 1, 3)
        found = store.search("m", faces[1], 3)
        assert found.faces == 3 and found.matches[0][0].user_id == "u1"
        store.create_collection("later")
        store.add_user("n", unit(rng, 1), "m", collection="later")
        assert store.count() == 2
    finally:
        store.close()
    with psycopg.connect(postgres_url) as conn:
        from api.store.postgres import SCHEMA_VERSION

        assert conn.execute("SELECT version FROM face_store_schema").fetchone()[0] == SCHEMA_VERSION
