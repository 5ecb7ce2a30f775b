"""The :class:`~api.store.base.FaceStore` contract, one suite run against every backend (no mocks).

Each test runs twice: ``[npz]`` on a real ``.npz`` file in the test's temp folder, ``[postgres]`` on a fresh
database of the real PostgreSQL + pgvector server from ``tests/store/conftest.py``. A behaviour the service
relies on belongs here, so that both backends are held to it; what only one backend has (file format,
schema, reconnection, ...) is tested in ``test_npz*.py`` and ``test_postgres.py``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest

from api.errors import ModelMismatchError, UserNotFoundError
from api.store import FaceStore, SearchResult, StoredUser, UserRecord
from tests.store.helpers import COSINE_TOLERANCE, normalized, snapshot, unit

# --- helpers --------------------------------------------------------------------------------------------


def exact_search(
    gallery: dict[str, np.ndarray], probe: np.ndarray, top_k: int, exclude_user: str | None = None
) -> list[tuple[str, float]]:
    """The reference: each user's best cosine over their faces, best first, computed with numpy."""
    scores = [(user_id, float(np.max(faces @ probe))) for user_id, faces in gallery.items() if user_id != exclude_user]
    scores.sort(key=lambda s: -s[1])
    return scores[:top_k]


def assert_matches_exact(result: list[Any], expected: list[tuple[str, float]]) -> None:
    assert [m.user_id for m in result] == [user_id for user_id, _ in expected]
    np.testing.assert_allclose([m.cosine for m in result], [c for _, c in expected], atol=COSINE_TOLERANCE)


def is_utc(moment: datetime) -> bool:
    return moment.tzinfo is not None and moment.utcoffset() == timedelta(0)


# --- basics ---------------------------------------------------------------------------------------------


def test_empty_store(store: FaceStore) -> None:
    """A new store holds nothing, answers every read without error, and is ready."""
    store.check()
    assert store.backend in ("npz", "postgresql")
    assert store.count() == 0
    assert store.list_users() == ([], 0)
    assert store.list_users(5, 10) == ([], 0)
    empty = store.search("m", unit(np.random.default_rng(0), 2), top_k=5)
    assert empty == SearchResult(users=0, faces=0, matches=[[], []])
    assert list(store.export_users(10)) == []
    assert store.import_users([]) == 0
    with pytest.raises(UserNotFoundError):
        store.get("0" * 32)


def test_add_get_list_order_and_paging(store: FaceStore) -> None:
    """Users are listed in (created_at, id) order, equal timestamps by id; pages cut that order; ``total``
    is always every user; ``get`` returns what ``add_user`` returned."""
    rng = np.random.default_rng(1)
    created = [store.add_user(f"user {i}", unit(rng, 1 + i % 3), "m") for i in range(6)]
    # Three users created in the same microsecond (several nodes can do that): the id breaks the tie.
    moment = datetime(2020, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    tied = [UserRecord(i * 32, f"tied {i}", "m", moment, moment, 1) for i in "cab"]
    assert store.import_users([StoredUser(r, unit(rng, 1)) for r in tied]) == 3

    expected = sorted([*created, *tied], key=lambda r: (r.created_at, r.id))
    assert [r.id for r in expected[:3]] == ["a" * 32, "b" * 32, "c" * 32]
    assert store.list_users() == (expected, 9)
    assert store.count() == 9
    for record in created:
        assert store.get(record.id) == record
        assert record.faces == store.embeddings_of(record.id).shape[0]
        assert record.model_id == "m" and record.created_at == record.updated_at
    assert len({r.id for r in created}) == 6

    pages = [store.list_users(offset, 4) for offset in (0, 4, 8, 12)]
    assert [len(page) for page, _ in pages] == [4, 4, 1, 0]
    assert {total for _, total in pages} == {9}
    assert [r for page, _ in pages for r in page] == expected
    assert store.list_users(3, 0) == ([], 9)
    assert store.list_users(7) == (expected[7:], 9)
    for offset, limit in ((-1, 3), (0, -1)):
        with pytest.raises(ValueError):
            store.list_users(offset, limit)


def test_rename(store: FaceStore) -> None:
    """Renaming changes the name and ``updated_at`` only: id, model, faces, descriptors, creation time and
    the user's place in the list stay."""
    rng = np.random.default_rng(2)
    first = store.add_user("Alice", unit(rng, 2), "m")
    second = store.add_user("Bob", unit(rng, 1), "m")
    before = store.embeddings_of(first.id).copy()
    time.sleep(0.002)

    renamed = store.rename(first.id, "Alicia")
    assert renamed.name == "Alicia" and renamed.updated_at > first.updated_at
    assert (renamed.id, renamed.model_id, renamed.faces, renamed.created_at) == (
        first.id,
        first.model_id,
        first.faces,
        first.created_at,
    )
    assert store.get(first.id) == renamed
    np.testing.assert_array_equal(store.embeddings_of(first.id), before)
    assert store.list_users() == ([renamed, second], 2)
    assert store.search("m", before[0], 1).matches[0][0].name == "Alicia"


def test_add_faces(store: FaceStore) -> None:
    """Adding faces appends them after the existing ones (order kept), counts them and updates ``updated_at``;
    descriptors of another model or dimension are refused and change nothing."""
    rng = np.random.default_rng(3)
    first, added, more = unit(rng, 2), unit(rng, 3), unit(rng, 1)
    user = store.add_user("a", first, "m")
    other = store.add_user("b", unit(rng, 1), "m")
    time.sleep(0.002)

    grown = store.add_faces(user.id, added, "m")
    assert grown.faces == 5 and grown.updated_at > user.updated_at and grown.created_at == user.created_at
    grown = store.add_faces(grown.id, more, "m")
    assert grown.faces == 6 and store.get(user.id) == grown
    np.testing.assert_array_equal(store.embeddings_of(user.id), np.concatenate([first, added, more]))
    assert store.embeddings_of(user.id).dtype == np.float32
    assert store.get(other.id) == other and store.count() == 2

    before = snapshot(store)
    with pytest.raises(ModelMismatchError):
        store.add_faces(user.id, unit(rng, 1), "another-model")  # the user's model is "m"
    with pytest.raises(ModelMismatchError):
        store.add_faces(user.id, unit(rng, 1, d=8), "m")  # "m" has 16 dimensions
    with pytest.raises(ModelMismatchError):
        store.add_user("c", unit(rng, 1, d=8), "m")
    assert snapshot(store) == before
    # Another model may have its own dimension.
    assert store.add_user("d", unit(rng, 2, d=8), "m8").faces == 2


def test_delete_removes_the_user_and_all_descriptors(store: FaceStore, location: str) -> None:
    """After delete the user is gone from every read and search, other users are untouched, and (PostgreSQL)
    no row of theirs remains in any table."""
    rng = np.random.default_rng(4)
    gone_faces = unit(rng, 3)
    gone = store.add_user("gone", gone_faces, "m")
    kept = store.add_user("kept", unit(rng, 2), "m")
    kept_before = snapshot(store)[1:]

    store.delete(gone.id)
    assert store.count() == 1 and store.list_users() == ([kept], 1)
    assert snapshot(store) == kept_before
    for call in (store.get, store.embeddings_of, store.delete):
        with pytest.raises(UserNotFoundError):
            call(gone.id)
    found = store.search("m", gone_faces, 5)
    assert found.users == 1
    assert all(m.user_id != gone.id for matches in found.matches for m in matches)

    if "://" in location:
        import psycopg

        with psycopg.connect(location) as conn:
            tables = [
                row[0]
                for row in conn.execute(
                    "SELECT table_name FROM information_schema.columns "
                    "WHERE table_schema = 'public' AND column_name IN ('id', 'user_id') ORDER BY table_name"
                )
            ]
            assert {"face_users", "face_descriptors"} <= set(tables)
            for table in tables:
                column = "id" if table == "face_users" else "user_id"
                query = f"SELECT count(*) FROM {table} WHERE {column} = %s"  # names from the catalogue
                assert conn.execute(query, (gone.id,)).fetchone() == (0,), table
            assert conn.execute("SELECT count(*) FROM face_descriptors").fetchone() == (2,)
            assert conn.execute("SELECT users FROM face_gallery_counts WHERE model_id = 'm'").fetchone() == (1,)


def test_unknown_ids_raise_user_not_found_and_change_nothing(store: FaceStore) -> None:
    """Every method taking a user id raises ``UserNotFoundError`` (404) for an id never seen and for a deleted
    one, never calls the guard, and leaves the store as it was."""
    rng = np.random.default_rng(5)
    store.add_user("stays", unit(rng, 2), "m")
    deleted = store.add_user("deleted", unit(rng, 1), "m")
    store.delete(deleted.id)
    before = snapshot(store)
    guard_calls: list[SearchResult] = []

    def calls_with(user_id: str) -> list[Callable[[], Any]]:
        return [
            lambda: store.get(user_id),
            lambda: store.embeddings_of(user_id),
            lambda: store.rename(user_id, "new name"),
            lambda: store.add_faces(user_id, unit(rng, 1), "m"),
            lambda: store.add_faces(user_id, unit(rng, 1), "m", guard=guard_calls.append),
            lambda: store.delete(user_id),
        ]

    for user_id in (deleted.id, "no-such-id", "", "x" * 300):
        for call in calls_with(user_id):
            with pytest.raises(UserNotFoundError) as info:
                call()
            assert info.value.code == "USER_NOT_FOUND" and info.value.status == 404
    assert guard_calls == []
    assert snapshot(store) == before and store.count() == 1
    # Excluding an unknown user from a search is not an error: there is simply nobody to leave out.
    assert store.search("m", unit(rng, 1), 5, exclude_user="no-such-id").users == 1


NAMES = [
    "Zoë Ångström",
    "李小龙",
    "محمد عبد الله",  # right-to-left
    "e\u0301 combining accent",  # not normalised: stored as given
    "emoji 👩‍👩‍👧 family",
    "NUL\x00inside and trailing\x00",  # PostgreSQL text cannot hold NUL
    "",
    "quotes \" ' \\ and\nnewline\ttab",
    "x" * 5000,
]


def test_names_round_trip_exactly(store: FaceStore, reopen: Callable[[], FaceStore]) -> None:
    """Names are free text, kept byte for byte: unicode, NUL, empty, 5000 characters, through add, rename,
    get, list, search and export, also in a new instance; text that is not valid Unicode is refused."""
    rng = np.random.default_rng(6)
    faces = unit(rng, len(NAMES))
    ids = [store.add_user(name, faces[i : i + 1], "m").id for i, name in enumerate(NAMES)]
    again = reopen()
    assert [again.get(i).name for i in ids] == NAMES
    assert [r.name for r in again.list_users()[0]] == NAMES
    assert [u.record.name for batch in again.export_users(4) for u in batch] == NAMES
    assert [again.search("m", face, 1).matches[0][0].name for face in faces] == NAMES

    for user_id, name in zip(ids, reversed(NAMES), strict=True):
        assert store.rename(user_id, name).name == name
    again = reopen()
    assert [again.get(i).name for i in ids] == list(reversed(NAMES))

    before = snapshot(store)
    for bad in ("lone surrogate \ud800", b"bytes"):
        with pytest.raises(ValueError):
            store.add_user(bad, unit(rng, 1), "m")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            store.rename(ids[0], bad)  # type: ignore[arg-type]
    assert snapshot(store) == before


def test_timestamps_are_utc_and_survive_a_new_instance(store: FaceStore, reopen: Callable[[], FaceStore]) -> None:
    """``created_at`` / ``updated_at`` are timezone-aware UTC, taken at the write (to the microsecond), and a
    new instance reads the very same values; imported times in another zone are the same instant in UTC."""
    rng = np.random.default_rng(7)
    start = datetime.now(UTC)
    user = store.add_user("a", unit(rng, 1), "m")
    user = store.rename(user.id, "b")
    end = datetime.now(UTC)
    assert is_utc(user.created_at) and is_utc(user.updated_at)
    assert start <= user.created_at <= user.updated_at <= end

    elsewhere = timezone(timedelta(hours=5, minutes=30))
    moment = datetime(2021, 3, 4, 5, 6, 7, 891011, tzinfo=elsewhere)
    store.import_users(
        [StoredUser(UserRecord("imported", "i", "m", moment, moment + timedelta(days=1), 1), unit(rng, 1))]
    )

    again = reopen()
    assert again.get(user.id) == user
    imported = again.get("imported")
    assert is_utc(imported.created_at) and imported.created_at == moment
    assert imported.updated_at - imported.created_at == timedelta(days=1)
    assert imported.created_at.replace(tzinfo=None) == datetime(2021, 3, 3, 23, 36, 7, 891011)


# --- search ---------------------------------------------------------------------------------------------


def test_search_scores_each_user_by_their_best_face(store: FaceStore) -> None:
    """A user's score is the best cosine over their faces, users are ranked best first, ``top_k`` caps the
    list, ``exclude_user`` leaves one out, ``users`` counts the model's users, other models are invisible to
    the search but counted in ``other_models``."""
    probe = np.zeros(4, np.float32)
    probe[0] = 1.0
    # Cosines to the probe: "near" has one face at 0.9 among poor ones, "mid" one at 0.6, "far" all below.
    near = store.add_user("near", normalized(np.array([[0.1, 1, 0, 0], [0.9, 0.436, 0, 0], [-1, 0, 0.1, 0]])), "m")
    mid = store.add_user("mid", normalized(np.array([[0.6, 0, 0.8, 0]])), "m")
    far = store.add_user("far", normalized(np.array([[0.2, 0, 0, 0.98], [-0.5, 0.866, 0, 0]])), "m")
    other = store.add_user("other model", probe[None, :], "m-other")  # a perfect match, but of another model
    store.add_user("other dim", normalized(np.ones((1, 8))), "m8")

    result = store.search("m", probe, top_k=5)
    assert result.users == 3  # users of model "m" only
    assert result.other_models == {"m-other": 1, "m8": 1}
    assert [(m.user_id, m.name) for m in result.matches[0]] == [(near.id, "near"), (mid.id, "mid"), (far.id, "far")]
    np.testing.assert_allclose([m.cosine for m in result.matches[0]], [0.9, 0.6, 0.2], atol=1e-3)

    assert [m.user_id for m in store.search("m", probe, top_k=2).matches[0]] == [near.id, mid.id]
    others = {"m-other": 1, "m8": 1}
    assert store.search("m", probe, top_k=0) == SearchResult(users=3, faces=6, matches=[[]], other_models=others)
    excluded = store.search("m", probe, top_k=5, exclude_user=near.id)
    assert excluded.users == 3 and [m.user_id for m in excluded.matches[0]] == [mid.id, far.id]
    assert store.search("m-other", probe, top_k=5).users == 1
    assert store.search("m-other", probe, top_k=5, exclude_user=other.id).matches == [[]]
    everyone = {"m": 3, "m-other": 1, "m8": 1}
    assert store.search("unknown model", probe, top_k=5) == SearchResult(0, 0, [[]], other_models=everyone)

    # Several probes at once: one list per probe, in probe order; a 1-D probe is one probe.
    both = store.search("m", np.stack([probe, normalized(np.array([0.6, 0, 0.8, 0]))]), top_k=1)
    assert [[m.user_id for m in matches] for matches in both.matches] == [[near.id], [mid.id]]
    with pytest.raises(ModelMismatchError):
        store.search("m", np.ones((1, 5), np.float32), top_k=1)
    with pytest.raises(ValueError):
        store.search("m", probe, top_k=-1)


def test_search_equals_exact_numpy(store: FaceStore) -> None:
    """On random unit vectors the result is the exact best-of-faces ranking computed with numpy: same users
    in the same order, same cosines, with and without an excluded user."""
    rng = np.random.default_rng(8)
    gallery: dict[str, np.ndarray] = {}
    for i in range(60):
        faces = unit(rng, 1 + i % 4, d=32)
        gallery[store.add_user(f"u{i}", faces, "m").id] = faces
    probes = unit(rng, 12, d=32)
    ids = list(gallery)
    result = store.search("m", probes, top_k=7)
    assert result.users == 60
    for probe, matches in zip(probes, result.matches, strict=True):
        assert_matches_exact(matches, exact_search(gallery, probe, 7))
    for n, probe in enumerate(probes):
        excluded = ids[n * 3]
        matches = store.search("m", probe, top_k=4, exclude_user=excluded).matches[0]
        assert_matches_exact(matches, exact_search(gallery, probe, 4, excluded))
    everyone = store.search("m", probes[0], top_k=100).matches[0]
    assert_matches_exact(everyone, exact_search(gallery, probes[0], 100))


def test_top_k_counts_users_not_faces(store: FaceStore) -> None:
    """``top_k`` users come back whenever the gallery holds that many, even when each user has many faces
    close together (the nearest descriptors then belong to very few users)."""
    rng = np.random.default_rng(9)
    centre = unit(rng, 1)[0]
    gallery: dict[str, np.ndarray] = {}
    for i in range(8):
        person = normalized(centre + 0.3 * rng.standard_normal(16))
        faces = normalized(person + 0.01 * rng.standard_normal((15, 16)))  # 15 near-identical faces
        gallery[store.add_user(f"p{i}", faces, "m").id] = faces
    for top_k in (1, 5, 7, 8, 20):
        matches = store.search("m", centre, top_k).matches[0]
        assert len(matches) == min(top_k, 8)
        assert_matches_exact(matches, exact_search(gallery, centre, top_k))
    first = next(iter(gallery))
    matches = store.search("m", centre, 8, exclude_user=first).matches[0]
    assert_matches_exact(matches, exact_search(gallery, centre, 8, first))


def test_search_recall_at_scale(store: FaceStore) -> None:
    """2,000 users x 3 faces of 128-d random unit vectors, probes = noisy copies of stored faces: the best
    user agrees with the exact numpy answer for >= 99% of probes (PostgreSQL's HNSW is approximate; the
    file store is exact), and the reported cosine is always the exact one of the user returned."""
    rng = np.random.default_rng(10)
    users, faces_per_user, dim = 2000, 3, 128
    embeddings = unit(rng, users * faces_per_user, dim)
    start_time = datetime(2024, 1, 1, tzinfo=UTC)
    moments = [start_time + timedelta(seconds=i) for i in range(users)]
    records = [UserRecord(f"{i:032x}", f"u{i}", "m", t, t, faces_per_user) for i, t in enumerate(moments)]
    for start in range(0, users, 500):
        batch = [
            StoredUser(r, embeddings[i * faces_per_user : (i + 1) * faces_per_user])
            for i, r in enumerate(records[start : start + 500], start)
        ]
        assert store.import_users(batch) == len(batch)

    n_probes = 300
    sources = rng.choice(len(embeddings), n_probes, replace=False)
    probes = normalized(embeddings[sources] + 0.08 * rng.standard_normal((n_probes, dim)))
    # Exact answer: best cosine per user (faces are stored user after user), then the best user.
    per_user = (probes @ embeddings.T).reshape(n_probes, users, faces_per_user).max(axis=2)
    exact_best = per_user.argmax(axis=1)

    result = store.search("m", probes, top_k=1)
    assert result.users == users
    found = np.array([int(matches[0].user_id, 16) for matches in result.matches])
    recall = float(np.mean(found == exact_best))
    assert recall >= (1.0 if store.backend == "npz" else 0.99), recall
    cosines = np.array([matches[0].cosine for matches in result.matches])
    np.testing.assert_allclose(cosines, per_user[np.arange(n_probes), found], atol=COSINE_TOLERANCE)


# --- the write guard ------------------------------------------------------------------------------------


class Refused(Exception):
    """Raised by the guards below; the store must let it through unchanged."""


def test_guard_of_add_user_sees_the_search_of_the_new_faces(store: FaceStore) -> None:
    """``add_user``'s guard is called once, inside the write, with exactly what ``search(model, new faces,
    top_k=1)`` answers (the users count included); when it raises, the exception propagates and nothing is
    stored, also not a new model."""
    rng = np.random.default_rng(11)
    calls: list[SearchResult] = []
    first = store.add_user("first", unit(rng, 2), "m", guard=calls.append)
    assert calls == [SearchResult(users=0, faces=0, matches=[[], []])]  # nobody to compare with yet
    store.add_user("second", unit(rng, 1), "m")

    new_faces = normalized(store.embeddings_of(first.id) + 0.05 * rng.standard_normal((2, 16)))
    expected = store.search("m", new_faces, 1)
    assert expected.users == 2 and [m[0].user_id for m in expected.matches] == [first.id, first.id]
    calls.clear()
    third = store.add_user("third", new_faces, "m", guard=calls.append)
    assert len(calls) == 1
    assert calls[0].users == 2 and [[m.user_id for m in ms] for ms in calls[0].matches] == [[first.id]] * 2
    np.testing.assert_allclose(
        [m[0].cosine for m in calls[0].matches], [m[0].cosine for m in expected.matches], atol=COSINE_TOLERANCE
    )
    assert store.get(third.id).faces == 2

    before = snapshot(store)
    error = Refused("duplicate")

    def refuse(found: SearchResult) -> None:
        assert found.users == 3
        raise error

    def refuse_new_model(found: SearchResult) -> None:
        assert found == SearchResult(users=0, faces=0, matches=[[]], other_models={"m": 3})
        raise error

    with pytest.raises(Refused) as info:
        store.add_user("refused", new_faces, "m", guard=refuse)
    assert info.value is error
    with pytest.raises(Refused):
        store.add_user("refused, new model", unit(rng, 1, d=8), "m-new", guard=refuse_new_model)
    assert snapshot(store) == before and store.count() == 3
    assert store.search("m-new", unit(rng, 1, d=8), 1).users == 0
    assert store.add_user("dimension still free", unit(rng, 1, d=4), "m-new").faces == 1


def test_guard_of_add_faces_excludes_the_user_itself(store: FaceStore) -> None:
    """``add_faces``' guard searches the new faces against everyone *but* the user (their own faces would
    always match), still counting them among the model's users; when it raises, the user is unchanged."""
    rng = np.random.default_rng(12)
    own = unit(rng, 1)
    user = store.add_user("user", own, "m")
    lookalike_faces = normalized(own + 0.3 * rng.standard_normal((1, 16)))
    lookalike = store.add_user("lookalike", lookalike_faces, "m")
    store.add_user("another model", own, "m-other")

    calls: list[SearchResult] = []
    new_faces = normalized(np.concatenate([own, own]) + 0.01 * rng.standard_normal((2, 16)))
    grown = store.add_faces(user.id, new_faces, "m", guard=calls.append)
    assert grown.faces == 3 and len(calls) == 1
    assert calls[0].users == 2
    assert [[m.user_id for m in ms] for ms in calls[0].matches] == [[lookalike.id], [lookalike.id]]
    expected = store.search("m", new_faces, 1, exclude_user=user.id)
    np.testing.assert_allclose(
        [m[0].cosine for m in calls[0].matches], [m[0].cosine for m in expected.matches], atol=COSINE_TOLERANCE
    )

    before = snapshot(store)

    def refuse(found: SearchResult) -> None:
        raise Refused(f"{found.users} users")

    with pytest.raises(Refused, match="2 users"):
        store.add_faces(user.id, unit(rng, 2), "m", guard=refuse)
    assert snapshot(store) == before and store.get(user.id) == grown

    # Alone in the model: the guard is still called, with nobody else to match.
    alone = store.add_user("alone", unit(rng, 1, d=8), "m8")
    calls.clear()
    store.add_faces(alone.id, unit(rng, 1, d=8), "m8", guard=calls.append)
    assert calls == [SearchResult(users=1, faces=1, matches=[[]], other_models={"m": 2, "m-other": 1})]


# --- copies between backends, persistence ---------------------------------------------------------------


def fill(store: FaceStore, rng: np.random.Generator) -> None:
    """A varied store: two models of different dimensions, several faces, edited users, odd names."""
    for i, name in enumerate(NAMES):
        user = store.add_user(name, unit(rng, 1 + i % 3), "m")
        if i % 3 == 0:
            store.add_faces(user.id, unit(rng, 2), "m")
        if i % 4 == 0:
            store.rename(user.id, name + " (renamed)")
    for i in range(3):
        store.add_user(f"m8 user {i}", unit(rng, 2, d=8), "m8")
    store.delete(store.list_users(2, 1)[0][0].id)


def test_export_import_round_trip_between_backends(store: FaceStore, other_store: FaceStore) -> None:
    """Exporting every user and importing them into the other backend (both directions: npz -> PostgreSQL in
    the ``[npz]`` run, PostgreSQL -> npz in the ``[postgres]`` one) keeps ids, names, model ids, timestamps,
    face order and descriptor values exactly; importing again adds nothing (0) and changes nothing."""
    fill(store, np.random.default_rng(13))
    source = snapshot(store)
    assert len(source) == len(NAMES) - 1 + 3

    batches = list(store.export_users(4))
    assert [len(b) for b in batches] == [4, 4, 3]
    exported = [u.record for batch in batches for u in batch]
    assert exported == store.list_users()[0]  # (created_at, id) order
    assert sum(other_store.import_users(batch) for batch in batches) == len(source)

    copied = snapshot(other_store)
    assert copied == source
    assert other_store.list_users() == store.list_users()
    for record, _ in source:
        np.testing.assert_array_equal(other_store.embeddings_of(record.id), store.embeddings_of(record.id))
    probes = unit(np.random.default_rng(14), 3)
    for model, probe_set in (("m", probes), ("m8", probes[:, :8])):
        ours, theirs = store.search(model, probe_set, 4), other_store.search(model, probe_set, 4)
        assert ours.users == theirs.users
        for a, b in zip(ours.matches, theirs.matches, strict=True):
            assert [m.user_id for m in a] == [m.user_id for m in b]

    # Re-running the copy (e.g. after an interruption) adds nothing and changes nothing.
    assert sum(other_store.import_users(batch) for batch in store.export_users(5)) == 0
    assert snapshot(other_store) == source and other_store.count() == len(source)
    # ... also when a batch mixes known and new users: only the new one is added.
    extra = StoredUser(
        UserRecord("extra", "extra", "m", datetime.now(UTC), datetime.now(UTC), 1), unit(np.random.default_rng(15), 1)
    )
    assert other_store.import_users([*batches[0], extra]) == 1
    assert other_store.count() == len(source) + 1


def test_import_refuses_inconsistent_users_and_stores_nothing(store: FaceStore) -> None:
    """A batch with a user whose face count does not match its descriptors, or of a dimension other than the
    model's, is refused as a whole."""
    rng = np.random.default_rng(16)
    store.add_user("existing", unit(rng, 1), "m")
    before = snapshot(store)
    now = datetime.now(UTC)
    good = StoredUser(UserRecord("good", "good", "m", now, now, 1), unit(rng, 1))
    miscounted = StoredUser(UserRecord("miscounted", "x", "m", now, now, 3), unit(rng, 2))
    wrong_dim = StoredUser(UserRecord("wrong-dim", "x", "m", now, now, 1), unit(rng, 1, d=8))
    with pytest.raises(ValueError):
        store.import_users([good, miscounted])
    with pytest.raises(ModelMismatchError):
        store.import_users([good, wrong_dim])
    assert snapshot(store) == before


def test_data_survives_reopening_and_instances_share_it(store: FaceStore, reopen: Callable[[], FaceStore]) -> None:
    """A new instance on the same file or database sees every write, and writes through either instance are
    seen by the other at once (as on another process or service node)."""
    rng = np.random.default_rng(17)
    fill(store, rng)
    before = snapshot(store)
    probe = unit(rng, 1)

    again = reopen()
    assert snapshot(again) == before
    assert again.list_users() == store.list_users() and again.count() == store.count()
    assert again.search("m", probe, 5) == store.search("m", probe, 5)

    for writer, reader in itertools.permutations((store, again)):
        user = writer.add_user("shared", unit(rng, 1), "m")
        assert reader.get(user.id) == user
        renamed = writer.rename(user.id, "shared, renamed")
        assert reader.get(user.id) == renamed
        writer.delete(user.id)
        with pytest.raises(UserNotFoundError):
            reader.get(user.id)
    store.close()
    assert snapshot(reopen()) == before
