"""Encryption at rest of the store: unreadable without the key, refused with a wrong key, migrated from plain."""

from pathlib import Path

import numpy as np
import pytest
from cryptography.fernet import Fernet

from api.errors import StoreKeyError
from api.store.npz import ENCRYPTED_MAGIC, NpzFaceStore

MODEL = "test-model"


def _vectors(seed: int, rows: int = 2) -> np.ndarray:
    values = np.random.default_rng(seed).normal(size=(rows, 128)).astype(np.float32)
    return values / np.linalg.norm(values, axis=1, keepdims=True)


def test_encrypted_store_round_trips_and_hides_its_contents(tmp_path: Path) -> None:
    key = Fernet.generate_key().decode()
    path = tmp_path / "store.npz"
    vectors = _vectors(1)
    user = NpzFaceStore(path, encryption_key=key).add_user("Grace Hopper", vectors, MODEL)

    raw = path.read_bytes()
    assert raw.startswith(ENCRYPTED_MAGIC)
    assert b"Grace Hopper" not in raw and user.id.encode() not in raw
    assert vectors.tobytes()[:64] not in raw

    reopened = NpzFaceStore(path, encryption_key=key)
    assert reopened.get(user.id).name == "Grace Hopper"
    np.testing.assert_array_equal(reopened.embeddings_of(user.id), vectors)


def test_encrypted_store_without_key_refuses_to_load(tmp_path: Path) -> None:
    path = tmp_path / "store.npz"
    NpzFaceStore(path, encryption_key=Fernet.generate_key().decode()).add_user("A", _vectors(2), MODEL)
    before = path.read_bytes()
    with pytest.raises(StoreKeyError, match="FACE_STORE_ENCRYPTION_KEY"):
        NpzFaceStore(path)
    assert path.read_bytes() == before


def test_wrong_key_is_refused_and_file_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "store.npz"
    NpzFaceStore(path, encryption_key=Fernet.generate_key().decode()).add_user("A", _vectors(3), MODEL)
    before = path.read_bytes()
    with pytest.raises(StoreKeyError, match="cannot be decrypted"):
        NpzFaceStore(path, encryption_key=Fernet.generate_key().decode())
    assert path.read_bytes() == before


def test_invalid_key_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreKeyError, match=r"api\.keys store-key"):
        NpzFaceStore(tmp_path / "store.npz", encryption_key="not-a-fernet-key")


def test_plain_store_is_encrypted_by_the_next_write(tmp_path: Path) -> None:
    path = tmp_path / "store.npz"
    first = NpzFaceStore(path).add_user("Plain", _vectors(4), MODEL)
    key = Fernet.generate_key().decode()
    store = NpzFaceStore(path, encryption_key=key)
    assert store.get(first.id).name == "Plain"
    second = store.add_user("Secret", _vectors(5), MODEL)
    assert path.read_bytes().startswith(ENCRYPTED_MAGIC)
    reopened = NpzFaceStore(path, encryption_key=key)
    assert {u.id for u in reopened.list_users()[0]} == {first.id, second.id}


def test_delete_leaves_no_trace_in_an_encrypted_store(tmp_path: Path) -> None:
    key = Fernet.generate_key().decode()
    path = tmp_path / "store.npz"
    store = NpzFaceStore(path, encryption_key=key)
    kept = store.add_user("Kept", _vectors(6), MODEL)
    gone = store.add_user("Gone", _vectors(7), MODEL)
    store.delete(gone.id)
    plain = Fernet(key.encode()).decrypt(path.read_bytes()[len(ENCRYPTED_MAGIC) :])
    assert gone.id.encode() not in plain and b"Gone" not in plain
    assert kept.id.encode() in plain
