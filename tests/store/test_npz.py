"""Tests of the embedding store against real files, real locks and real processes (no mocks)."""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest

from api.errors import ModelMismatchError, StoreCorruptError, StoreLockTimeoutError, UserNotFoundError
from api.store import FaceStore, UserRecord
from api.store.npz import NpzFaceStore, _Entry, _serialize, _State

REPO_ROOT = Path(__file__).resolve().parents[2]
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONIOENCODING": "utf-8"}


def vectors(seed: int, n: int = 2, d: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "face_database.npz"


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def read_line(stream: IO[bytes]) -> str:
    line = stream.readline()
    assert line, "child process ended early"
    return line.decode("utf-8").rstrip("\n")


# --- basic behaviour -----------------------------------------------------------------------------------


def test_implements_protocol(path: Path) -> None:
    store: FaceStore = NpzFaceStore(path)  # checked statically; at run time it must simply construct
    assert store.count() == 0


def test_missing_file_is_an_empty_store_created_on_first_write(path: Path) -> None:
    store = NpzFaceStore(path)
    assert store.count() == 0
    assert store.list_users() == ([], 0)
    empty = store.search("m", vectors(9, 1), top_k=5)
    assert empty.users == 0 and empty.matches == [[]]
    assert not path.exists(), "reads must not create the file"
    store.add_user("a", vectors(1), "m")
    assert path.exists()


def test_missing_folder_is_created_on_first_write(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "face_database.npz"
    store = NpzFaceStore(path)
    assert store.count() == 0
    store.add_user("a", vectors(1), "m")
    assert NpzFaceStore(path).count() == 1


def test_round_trip_through_a_new_instance(path: Path) -> None:
    store = NpzFaceStore(path)
    alice = store.add_user("Alice", vectors(1, 3), "m1")
    bob = store.add_user("Bob", vectors(2, 1), "m1")
    carol = store.add_user("Carol", vectors(3, 2, 8), "m2")
    alice = store.add_faces(alice.id, vectors(4, 2), "m1")
    bob = store.rename(bob.id, "Robert")

    again = NpzFaceStore(path)
    assert again.list_users() == ([alice, bob, carol], 3)
    assert again.get(alice.id).faces == 5
    np.testing.assert_array_equal(again.embeddings_of(alice.id), np.concatenate([vectors(1, 3), vectors(4, 2)]))
    np.testing.assert_array_equal(again.embeddings_of(carol.id), vectors(3, 2, 8))
    assert again.embeddings_of(carol.id).dtype == np.float32
    for record in (alice, bob, carol):
        assert record.created_at.tzinfo == UTC and record.updated_at >= record.created_at
    assert bob.updated_at > bob.created_at
    assert len(alice.id) == 32 and len({alice.id, bob.id, carol.id}) == 3

    # The file is an ordinary .npz that needs no pickle, with the documented arrays.
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["emb_0", "emb_1", "format_version", "meta", "version"]
        assert int(npz["format_version"]) == 1  # only the default collection: written as version 1
        assert int(npz["version"]) == 5
        meta = json.loads(npz["meta"].tobytes().decode("utf-8"))
        assert [u["name"] for u in meta["users"]] == ["Alice", "Robert", "Carol"]


def test_version_counts_every_write_and_persists(path: Path) -> None:
    store = NpzFaceStore(path)
    user = store.add_user("a", vectors(1), "m")
    store.rename(user.id, "b")
    store.add_faces(user.id, vectors(2), "m")
    store.delete(user.id)
    assert store.version == 4
    assert NpzFaceStore(path).version == 4
    NpzFaceStore(path).add_user("c", vectors(3), "m")
    assert store.version == 5


def test_ordering_and_paging(path: Path) -> None:
    store = NpzFaceStore(path)
    created = [store.add_user(f"user {i}", vectors(i), "m") for i in range(7)]
    users, total = store.list_users()
    assert total == 7 and users == sorted(created, key=lambda r: (r.created_at, r.id))
    pages = [store.list_users(offset, 3) for offset in (0, 3, 6, 9)]
    assert [len(page) for page, _ in pages] == [3, 3, 1, 0]
    assert all(total == 7 for _, total in pages)
    assert [r for page, _ in pages for r in page] == users
    assert store.list_users(2, 0) == ([], 7)
    # Renaming and adding faces change updated_at only: the order stays.
    store.rename(created[0].id, "renamed")
    store.add_faces(created[1].id, vectors(99), "m")
    assert [r.id for r in store.list_users()[0]] == [r.id for r in users]
    with pytest.raises(ValueError):
        store.list_users(-1, 3)
    with pytest.raises(ValueError):
        store.list_users(0, -1)


def test_equal_creation_times_are_ordered_by_id(path: Path) -> None:
    # Two users created in the same microsecond (possible with several workers): a file with such ties,
    # written by the store's own serialiser, must list them by id.
    moment = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    ids = ["c" * 32, "a" * 32, "b" * 32]
    entries = [_Entry(UserRecord(i, f"n{i[0]}", "m", moment, moment, 1), vectors(n, 1)) for n, i in enumerate(ids)]
    path.write_bytes(_serialize(_State.build(1, entries)))
    assert [r.id for r in NpzFaceStore(path).list_users()[0]] == sorted(ids)


def test_unknown_ids_raise_user_not_found(path: Path) -> None:
    store = NpzFaceStore(path)
    user = store.add_user("a", vectors(1), "m")
    store.delete(user.id)
    calls: list[Callable[[], Any]] = [
        lambda: store.get(user.id),
        lambda: store.embeddings_of(user.id),
        lambda: store.rename(user.id, "b"),
        lambda: store.add_faces(user.id, vectors(2), "m"),
        lambda: store.delete(user.id),
        lambda: store.get("no-such-id"),
    ]
    for call in calls:
        with pytest.raises(UserNotFoundError) as info:
            call()
        assert info.value.code == "USER_NOT_FOUND" and info.value.status == 404
    assert store.version == 2, "failed operations must not write"


def test_invalid_input_is_rejected_before_writing(path: Path) -> None:
    store = NpzFaceStore(path)
    bad_embeddings: list[Any] = [
        np.ones(16, dtype=np.float32),  # 1-D
        np.ones((0, 16), dtype=np.float32),
        np.ones((2, 0), dtype=np.float32),
        np.array([[1.0, np.nan]], dtype=np.float32),
        np.array([[1.0, np.inf]]),
        np.array([[1e39, 0.0]]),  # finite float64, infinite as float32
        np.array([["a", "b"]]),
        np.ones((1, 2), dtype=bool),
    ]
    for embeddings in bad_embeddings:
        with pytest.raises(ValueError):
            store.add_user("a", embeddings, "m")
    with pytest.raises(ValueError):
        store.add_user("a", vectors(1), "")
    with pytest.raises(ValueError):
        store.add_user("bad \ud800 surrogate", vectors(1), "m")
    with pytest.raises(ValueError):
        store.add_user(42, vectors(1), "m")  # type: ignore[arg-type]
    assert not path.exists()


def test_stored_descriptors_are_private_and_read_only(path: Path) -> None:
    store = NpzFaceStore(path)
    source = vectors(1).astype(np.float64)
    user = store.add_user("a", source, "m")
    source[:] = 0  # the caller reusing its buffer must not change the store
    np.testing.assert_array_equal(store.embeddings_of(user.id), vectors(1))
    with pytest.raises(ValueError):
        store.embeddings_of(user.id)[0, 0] = 1.0


def test_model_mismatch(path: Path) -> None:
    store = NpzFaceStore(path)
    user = store.add_user("a", vectors(1, 2, 16), "m")
    before = path.read_bytes()
    with pytest.raises(ModelMismatchError) as info:
        store.add_faces(user.id, vectors(2, 1, 16), "other-model")
    assert info.value.code == "MODEL_MISMATCH"
    with pytest.raises(ModelMismatchError):
        store.add_faces(user.id, vectors(2, 1, 32), "m")  # same model, other dimension
    with pytest.raises(ModelMismatchError):
        store.add_user("b", vectors(3, 1, 32), "m")  # a model's gallery has one dimension
    assert path.read_bytes() == before and store.count() == 1
    # Another model with another dimension is fine.
    store.add_user("c", vectors(4, 1, 32), "m2")
    assert store.count() == 2


# --- durable delete ------------------------------------------------------------------------------------


def test_delete_leaves_no_trace_in_the_file(path: Path) -> None:
    store = NpzFaceStore(path)
    keep = store.add_user("Keeper Ödön", vectors(1, 2), "m")
    victim = store.add_user("Victim Ünïcødé 秘密", vectors(2, 2), "m")
    victim = store.add_faces(victim.id, vectors(3, 1), "m")
    victim_rows = store.embeddings_of(victim.id).copy()
    raw = path.read_bytes()
    # The search below must be able to see a user at all, or its absence would prove nothing.
    assert victim.id.encode() in raw and victim.name.encode() in raw
    assert all(row.tobytes() in raw for row in victim_rows)

    store.delete(victim.id)

    raw = path.read_bytes()
    assert victim.id.encode() not in raw
    assert victim.name.encode("utf-8") not in raw
    assert not any(row.tobytes() in raw for row in victim_rows)
    assert keep.id.encode() in raw and all(row.tobytes() in raw for row in vectors(1, 2))
    with np.load(path, allow_pickle=False) as npz:
        assert victim.id not in npz["meta"].tobytes().decode("utf-8")
        stored = npz["emb_0"]
        assert not any((stored == row).all(axis=1).any() for row in victim_rows)
    assert temp_files(path.parent) == []
    assert NpzFaceStore(path).list_users() == ([keep], 1)


def test_deleting_the_last_user_keeps_an_empty_valid_file(path: Path) -> None:
    store = NpzFaceStore(path)
    user = store.add_user("only", vectors(1), "m")
    store.delete(user.id)
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["format_version", "meta", "version"]
    assert NpzFaceStore(path).count() == 0


# --- corrupt files -------------------------------------------------------------------------------------


def _valid_arrays(path: Path) -> dict[str, np.ndarray]:
    store = NpzFaceStore(path)
    store.add_user("a", vectors(1, 2), "m")
    store.add_user("b", vectors(2, 1), "m")
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _with_meta(arrays: dict[str, np.ndarray], edit: Callable[[dict[str, Any]], None]) -> bytes:
    meta = json.loads(arrays["meta"].tobytes().decode("utf-8"))
    edit(meta)
    text = json.dumps(meta).encode("utf-8")
    return _npz({**arrays, "meta": np.frombuffer(text, dtype=np.uint8)})


def _zip_without_npy() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("hello.txt", "not an array")
    return buffer.getvalue()


def _npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.arange(3))
    return buffer.getvalue()


CORRUPTIONS: dict[str, Callable[[dict[str, np.ndarray], bytes], bytes]] = {
    "empty file": lambda arrays, valid: b"",
    "random bytes": lambda arrays, valid: random.Random(0).randbytes(4096),
    "truncated": lambda arrays, valid: valid[: len(valid) // 2],
    "flipped byte in data": lambda arrays, valid: valid[:-300] + bytes([valid[-300] ^ 0xFF]) + valid[-299:],
    "zip without arrays": lambda arrays, valid: _zip_without_npy(),
    "single .npy": lambda arrays, valid: _npy(),
    "missing meta": lambda arrays, valid: _npz({k: v for k, v in arrays.items() if k != "meta"}),
    "missing embeddings": lambda arrays, valid: _npz({k: v for k, v in arrays.items() if k != "emb_0"}),
    "extra array": lambda arrays, valid: _npz({**arrays, "emb_7": arrays["emb_0"]}),
    "newer format version": lambda arrays, valid: _npz({**arrays, "format_version": np.array(2)}),
    "no format version": lambda arrays, valid: _npz({k: v for k, v in arrays.items() if k != "format_version"}),
    "face count vs rows": lambda arrays, valid: _with_meta(arrays, lambda m: m["users"][0].update(faces=3)),
    "dimension vs model": lambda arrays, valid: _with_meta(arrays, lambda m: m["models"][0].update(dim=8)),
    "duplicate id": lambda arrays, valid: _with_meta(arrays, lambda m: m["users"][1].update(id=m["users"][0]["id"])),
    "naive timestamp": lambda arrays, valid: _with_meta(
        arrays, lambda m: m["users"][0].update(created_at="2024-01-01T00:00:00")
    ),
    "meta not JSON": lambda arrays, valid: _npz({**arrays, "meta": np.frombuffer(b"{nope", dtype=np.uint8)}),
    "pickled object array": lambda arrays, valid: _npz({**arrays, "meta": np.array([{"users": []}], dtype=object)}),
    "float64 embeddings": lambda arrays, valid: _npz({**arrays, "emb_0": arrays["emb_0"].astype(np.float64)}),
    "NaN embedding": lambda arrays, valid: _npz({**arrays, "emb_0": np.full_like(arrays["emb_0"], np.nan)}),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_file_stops_start_up_and_is_left_untouched(path: Path, kind: str) -> None:
    arrays = _valid_arrays(path)
    data = CORRUPTIONS[kind](arrays, path.read_bytes())
    path.write_bytes(data)
    mtime = path.stat().st_mtime_ns
    with pytest.raises(StoreCorruptError) as info:
        NpzFaceStore(path)
    assert str(path) in info.value.message and info.value.code == "STORE_CORRUPT"
    assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime
    assert temp_files(path.parent) == []


def test_running_store_refuses_to_overwrite_a_file_that_became_corrupt(path: Path) -> None:
    store = NpzFaceStore(path)
    user = store.add_user("a", vectors(1), "m")
    garbage = b"PK\x03\x04 this is no longer a store"
    path.write_bytes(garbage)
    with pytest.raises(StoreCorruptError):
        store.add_user("b", vectors(2), "m")
    with pytest.raises(StoreCorruptError):
        store.delete(user.id)
    with pytest.raises(StoreCorruptError):
        store.get(user.id)  # reads notice the replacement too
    assert path.read_bytes() == garbage
    assert temp_files(path.parent) == []


def test_leftover_temporary_files_are_removed_at_start(path: Path) -> None:
    NpzFaceStore(path).add_user("a", vectors(1), "m")
    leftover = path.parent / f".{path.name}.k1ll3d_x.tmp"
    leftover.write_bytes(b"half a file")
    unrelated = path.parent / ".other.npz.abc.tmp"
    unrelated.write_bytes(b"someone else's")
    store = NpzFaceStore(path)
    assert store.count() == 1
    assert not leftover.exists() and unrelated.exists()


# --- search --------------------------------------------------------------------------------------------


def unit(seed: int, n: int = 2, d: int = 16) -> np.ndarray:
    v = vectors(seed, n, d)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_search_is_exact_best_of_faces_per_model(path: Path) -> None:
    store = NpzFaceStore(path)
    a = store.add_user("Anna", unit(1, 2), "m")
    other = store.add_user("Other model", unit(2, 3, 8), "m2")
    b = store.add_user("Béla", unit(3, 1), "m")
    a = store.add_faces(a.id, unit(4, 1), "m")
    probe = unit(5, 1)[0]

    result = store.search("m", probe, top_k=5)
    gallery = {a.id: np.concatenate([unit(1, 2), unit(4, 1)]), b.id: unit(3, 1)}
    expected = sorted(((float((gallery[u] @ probe).max()), u) for u in gallery), reverse=True)
    assert result.users == 2
    names = {a.id: "Anna", b.id: "Béla"}
    assert [(m.user_id, m.name) for m in result.matches[0]] == [(u, names[u]) for _, u in expected]
    np.testing.assert_allclose([m.cosine for m in result.matches[0]], [c for c, _ in expected], rtol=1e-6)
    assert [m.user_id for m in store.search("m2", unit(6, 1, 8), top_k=5).matches[0]] == [other.id]


def test_search_is_cached_until_the_store_changes(path: Path) -> None:
    store = NpzFaceStore(path)
    user = store.add_user("a", unit(1, 2), "m")
    probe = unit(2, 1)
    first = store.search("m", probe, top_k=1).matches[0][0]

    store.add_faces(user.id, probe, "m")  # the probe itself: now a perfect match
    assert store.search("m", probe, top_k=1).matches[0][0].cosine == pytest.approx(1.0)
    assert first.cosine < 0.99

    # A write by another instance (as by another worker process) is seen at once too.
    NpzFaceStore(path).rename(user.id, "renamed")
    assert store.search("m", probe, top_k=1).matches[0][0].name == "renamed"


def test_search_of_a_large_store_does_not_rebuild_the_matrix_when_unchanged(path: Path) -> None:
    store = NpzFaceStore(path)
    entries = [
        _Entry(UserRecord(f"{i:032x}", f"u{i}", "m", datetime.now(UTC), datetime.now(UTC), 4), vectors(i, 4, 128))
        for i in range(5000)
    ]
    path.write_bytes(_serialize(_State.build(1, entries)))
    probe = unit(1, 1, 128)
    started = time.perf_counter()
    first = store.search("m", probe, top_k=5)
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(20):
        assert store.search("m", probe, top_k=5) == first
    cached_s = (time.perf_counter() - started) / 20
    assert first.users == 5000
    assert cached_s < build_s / 2, (cached_s, build_s)


# --- threads and processes -----------------------------------------------------------------------------


def test_changes_from_another_instance_are_seen_at_once(path: Path) -> None:
    # Same-size rewrites in quick succession: the stat-based check must still notice every one.
    reader, writer = NpzFaceStore(path), NpzFaceStore(path)
    user = writer.add_user("name-000", vectors(1), "m")
    assert reader.get(user.id).name == "name-000"
    for i in range(1, 60):
        writer.rename(user.id, f"name-{i:03d}")
        assert reader.get(user.id).name == f"name-{i:03d}"
    # Two writes between reads: the file the reader cached is gone, its inode number free for reuse.
    for i in range(60, 200, 2):
        writer.rename(user.id, f"name-{i:03d}")
        writer.rename(user.id, f"name-{i + 1:03d}")
        assert reader.get(user.id).name == f"name-{i + 1:03d}"


def test_threads_of_one_process(path: Path) -> None:
    stores = [NpzFaceStore(path), NpzFaceStore(path)]  # two instances contend through the file lock
    ids: list[str] = []
    errors: list[BaseException] = []
    guard = threading.Lock()

    def work(worker: int) -> None:
        try:
            store = stores[worker % 2]
            for i in range(12):
                record = store.add_user(f"t{worker}-{i}", vectors(worker * 100 + i), "m")
                store.search("m", vectors(0, 1), top_k=3)
                store.list_users(0, 5)
                with guard:
                    ids.append(record.id)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(ids) == len(set(ids)) == 72
    for store in stores:
        assert store.count() == 72 and {r.id for r in store.list_users()[0]} == set(ids)
        assert store.version == 72  # every write read the one before it: none lost
    for i, user_id in enumerate(sorted(ids)):
        assert stores[i % 2].get(user_id).name.startswith("t")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_store_built_before_a_fork_works_in_the_child(path: Path) -> None:
    # Pre-forking servers may build the store in the parent and fork workers afterwards.
    store = NpzFaceStore(path)
    store.add_user("parent", vectors(1), "m")
    pid = os.fork()
    if pid == 0:  # child: report success through the exit status only
        try:
            store.add_user("child", vectors(2), "m")
            os._exit(0 if store.count() == 2 else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [r.name for r in store.list_users()[0]] == ["parent", "child"]
    store.add_user("parent again", vectors(3), "m")
    assert store.count() == 3


def test_lock_timeout_while_another_process_holds_the_lock(path: Path) -> None:
    NpzFaceStore(path).add_user("a", vectors(1), "m")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import filelock, sys, time\n"
            "lock = filelock.FileLock(sys.argv[1]); lock.acquire()\n"
            "print('HELD', flush=True); time.sleep(60)",
            f"{path}.lock",
        ],
        stdout=subprocess.PIPE,
        env=SUBPROCESS_ENV,
    )
    try:
        assert holder.stdout is not None and read_line(holder.stdout) == "HELD"
        store = NpzFaceStore(path, lock_timeout_s=0.3)  # start-up does not need the lock
        started = time.monotonic()
        with pytest.raises(StoreLockTimeoutError) as info:
            store.add_user("b", vectors(2), "m")
        assert 0.25 < time.monotonic() - started < 5
        assert info.value.code == "STORE_BUSY"
        assert store.count() == 1  # reads are served meanwhile
    finally:
        holder.kill()
        holder.wait()
    store.add_user("b", vectors(2), "m")  # the kernel released the dead holder's lock
    assert NpzFaceStore(path).count() == 2


TWO_PROCESS_WORKER = r"""
import json, sys, time
from pathlib import Path
import numpy as np
from api.store.npz import NpzFaceStore

path, tag, operations = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
store = NpzFaceStore(path)
rng = np.random.default_rng(int(sys.argv[4]))
print("READY", flush=True)
assert sys.stdin.readline().strip() == "GO"
own = []
for i in range(operations):
    step = i % 5
    if step == 2 and own:
        store.add_faces(own[-1], rng.standard_normal((1, 16)).astype(np.float32), "m")
        print("FACES", own[-1], flush=True)
    elif step == 4 and own:
        victim = own.pop(0)
        store.delete(victim)
        print("DELETE", victim, flush=True)
    else:
        record = store.add_user(f"{tag}-{i} 名前", rng.standard_normal((2, 16)).astype(np.float32), "m")
        own.append(record.id)
        print("ADD", record.id, flush=True)
    store.list_users(0, 10)  # reads between writes, as a server would do
    time.sleep(rng.uniform(0.0, 0.004))  # servers do other work between writes; lets the two interleave
print("DONE", flush=True)
assert sys.stdin.readline().strip() == "REPORT"
users, total = store.list_users()
print(json.dumps({"faces": {u.id: u.faces for u in users}, "total": total, "version": store.version,
                  "gallery_rows": sum(store.embeddings_of(u.id).shape[0] for u in users)}), flush=True)
"""


def test_two_processes_writing_the_same_file(path: Path) -> None:
    operations = 25
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TWO_PROCESS_WORKER, str(path), tag, str(operations), str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO_ROOT,
            env=SUBPROCESS_ENV,
        )
        for seed, tag in enumerate(("p", "q"))
    ]
    try:
        pipes = [(p.stdin, p.stdout) for p in procs]
        for _, out in pipes:
            assert out is not None and read_line(out) == "READY"
        for stdin, _ in pipes:  # both start together so that their writes interleave
            assert stdin is not None
            stdin.write(b"GO\n")
            stdin.flush()
        acked: list[list[tuple[str, str]]] = [[], []]
        for n, (_, out) in enumerate(pipes):
            assert out is not None
            while (line := read_line(out)) != "DONE":
                kind, user_id = line.split(" ")
                acked[n].append((kind, user_id))
        for stdin, _ in pipes:
            assert stdin is not None
            stdin.write(b"REPORT\n")
            stdin.flush()
        views = []
        for _, out in pipes:
            assert out is not None
            views.append(json.loads(read_line(out)))
        for proc in procs:
            assert proc.wait(timeout=30) == 0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()

    expected: dict[str, int] = {}
    for ops in acked:
        assert len(ops) == operations
        for kind, user_id in ops:
            if kind == "ADD":
                expected[user_id] = 2
            elif kind == "FACES":
                expected[user_id] += 1
            else:
                del expected[user_id]
    on_disk = NpzFaceStore(path)
    users, total = on_disk.list_users()
    assert {u.id: u.faces for u in users} == expected
    assert total == len(users) == len({u.id for u in users})
    # Each write started from the one before it, whichever process made it: the counter saw all 50.
    assert on_disk.version == 2 * operations
    # The writes really interleaved: in creation order, the surviving users switch owner several times.
    owners = [u.name[0] for u in users]
    assert sum(a != b for a, b in itertools.pairwise(owners)) >= 3, owners
    for view in views:  # each process's cached view includes the other's writes
        assert view["faces"] == expected and view["total"] == len(expected)
        assert view["version"] == 2 * operations and view["gallery_rows"] == sum(expected.values())


# --- crash safety ---------------------------------------------------------------------------------------


def _crash_rounds(path: Path, kills: int, seed: int) -> tuple[int, int]:
    """SIGKILL the crash tool's writer ``kills`` times; after each kill the store must load and hold
    exactly the acknowledged users (the one operation in flight may or may not have landed).
    Returns (acknowledged writes, kills that hit a write in progress)."""
    from_seed = random.Random(seed)
    expected: dict[str, tuple[str, list[tuple[int, int]]]] = {}
    acknowledged = mid_write = 0
    for round_no in range(kills):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tools.store_crash_test", "writer", str(path), f"t{round_no}"],
            stdout=subprocess.PIPE,
            cwd=REPO_ROOT,
            env=SUBPROCESS_ENV,
        )
        assert proc.stdout is not None
        assert read_line(proc.stdout) == "READY"
        time.sleep(from_seed.uniform(0.0, 0.25))
        os.kill(proc.pid, signal.SIGKILL)
        lines = proc.stdout.read().decode("utf-8").splitlines()
        assert proc.wait() == -signal.SIGKILL

        pending: list[str] | None = None
        for line in lines:
            words = line.split(" ")
            if words[0] == "BEGIN":
                pending = words[1:]
                continue
            assert words[0] == "ACK" and pending is not None
            acknowledged += 1
            if pending[0] == "add":
                expected[words[1]] = (" ".join(pending[3:]), [(int(pending[1]), int(pending[2]))])
            elif pending[0] == "faces":
                expected[pending[1]][1].append((int(pending[2]), int(pending[3])))
            else:
                del expected[pending[1]]
            pending = None

        mid_write += bool(temp_files(path.parent))
        store = NpzFaceStore(path)  # must load: a kill never leaves a partial file behind
        assert temp_files(path.parent) == []
        found = {r.id: r for r in store.list_users()[0]}
        # Settle the operation that was in flight, whichever way it went.
        if pending is not None and pending[0] == "add":
            landed = [i for i, r in found.items() if i not in expected and r.name == " ".join(pending[3:])]
            if landed:
                expected[landed[0]] = (" ".join(pending[3:]), [(int(pending[1]), int(pending[2]))])
        elif pending is not None and pending[0] == "faces":
            if found[pending[1]].faces > sum(n for _, n in expected[pending[1]][1]):
                expected[pending[1]][1].append((int(pending[2]), int(pending[3])))
        elif pending is not None and pending[1] not in found:
            del expected[pending[1]]

        assert set(found) == set(expected), f"round {round_no}: users differ from acknowledged writes"
        for user_id, (name, blocks) in expected.items():
            assert found[user_id].name == name
            want = np.concatenate([_crash_faces(s, n) for s, n in blocks])
            np.testing.assert_array_equal(store.embeddings_of(user_id), want)
    return acknowledged, mid_write


def _crash_faces(seed: int, count: int) -> np.ndarray:
    # Must match tools/store_crash_test.py:faces_for (kept separate so the test checks the tool's output).
    return np.random.default_rng(seed).standard_normal((count, 128)).astype(np.float32)


def test_killed_writer_never_loses_acknowledged_writes(path: Path) -> None:
    acknowledged, _ = _crash_rounds(path, kills=10, seed=1)
    assert acknowledged > 10


@pytest.mark.slow
def test_killed_writer_never_loses_acknowledged_writes_long(path: Path) -> None:
    acknowledged, mid_write = _crash_rounds(path, kills=60, seed=2)
    assert acknowledged > 60
    assert mid_write > 0, "no kill landed inside a write; the test did not exercise the crash window"
