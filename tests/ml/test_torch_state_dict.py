"""The stdlib reader of PyTorch state dicts, on torch-written files and on hand-made hostile ones."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from api.ml.torch_state_dict import TorchStateDictError, load_state_dict

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SHARED_WEIGHTS = Path(__file__).resolve().parents[2] / ".." / "shared" / "models" / "anti_spoof"


def _expected() -> dict[str, np.ndarray]:
    """What tools/record_minifasnet_reference.py saved with torch (same formulas, in numpy)."""
    base = np.arange(24, dtype=np.float32).reshape(2, 3, 4) * 0.5
    return {
        "layer.weight": base,
        "layer.weight_t": base.transpose(2, 1, 0),
        "slice": np.arange(10, dtype=np.float64)[3:7],
        "half": np.array([1.5, -2.0, 65504.0], dtype=np.float16),
        "bf16": np.array([1.0, -3.5, 0.15625], dtype=np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "ints": np.arange(-3, 3, dtype=np.int32),
        "bytes": np.arange(250, 256, dtype=np.uint8),
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 5), dtype=np.float32),
        "param": np.full((2,), 0.25, dtype=np.float32),
    }


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_reads_torch_written_file(layout: str) -> None:
    loaded = load_state_dict(FIXTURES / f"torch_state_dict_{layout}.pt")
    expected = _expected()
    assert list(loaded) == list(expected)
    for key, want in expected.items():
        got = loaded[key]
        assert got.dtype == want.dtype, key
        assert got.shape == want.shape, key
        np.testing.assert_array_equal(got, want, err_msg=key)
        assert got.flags.c_contiguous


def test_arrays_are_independent_copies() -> None:
    # Two tensors of the file share one storage; writing to one must not change the other.
    loaded = load_state_dict(FIXTURES / "torch_state_dict_zip.pt")
    loaded["layer.weight"][:] = -1
    np.testing.assert_array_equal(loaded["layer.weight_t"], _expected()["layer.weight_t"])


@pytest.mark.shared
def test_reads_minifasnet_weights() -> None:
    path = SHARED_WEIGHTS / "4_0_0_80x80_MiniFASNetV1SE.pth"
    if not path.is_file():
        pytest.skip(f"{path} absent (../shared is a development-only folder)")
    state = load_state_dict(path)
    assert state["module.conv1.conv.weight"].shape == (32, 3, 3, 3)
    assert state["module.conv_3.model.3.se_module.fc1.weight"].shape == (16, 64, 1, 1)
    assert state["module.prob.weight"].shape == (3, 128)
    assert all(np.isfinite(v).all() for v in state.values())


# --- hand-made files -----------------------------------------------------------------------------------
# A protocol-2 pickle names globals as text lines ("c<module>\n<name>\n"), so stand-ins defined here can
# be renamed to the torch globals after pickling, without torch being installed.


class FloatStorage:
    """Stand-in pickled in place of torch.FloatStorage."""


def _rebuild(*args: Any) -> None:
    """Stand-in pickled in place of torch._utils._rebuild_tensor_v2."""


class _Tensor:
    def __init__(self, key: str, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.key, self.offset, self.size, self.stride = key, offset, size, stride

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (_StorageId(self.key), self.offset, self.size, self.stride, False, None))


class _StorageId:
    def __init__(self, key: str) -> None:
        self.key = key


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, numel: dict[str, int]) -> None:
        super().__init__(file, protocol=2)
        self.numel = numel

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageId):
            return ("storage", FloatStorage, obj.key, "cpu", self.numel[obj.key])
        return None


def _torch_pickle(obj: Any, numel: dict[str, int]) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, numel).dump(obj)
    here = __name__.encode()
    return (
        buffer.getvalue()
        .replace(b"c" + here + b"\n_rebuild\n", b"ctorch._utils\n_rebuild_tensor_v2\n")
        .replace(b"c" + here + b"\nFloatStorage\n", b"ctorch\nFloatStorage\n")
    )


def _write_zip(path: Path, data_pkl: bytes, storages: dict[str, np.ndarray]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        for key, values in storages.items():
            archive.writestr(f"archive/data/{key}", values.astype("<f4").tobytes())
    return path


def test_hand_made_zip_with_strides(tmp_path: Path) -> None:
    storage = np.arange(12, dtype=np.float32)
    tensors = {"a": _Tensor("0", 2, (2, 3), (1, 2))}
    path = _write_zip(tmp_path / "ok.pth", _torch_pickle(tensors, {"0": 12}), {"0": storage})
    np.testing.assert_array_equal(load_state_dict(path)["a"], [[2, 4, 6], [3, 5, 7]])


def test_refuses_arbitrary_global_and_does_not_run_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.mkdir, (str(marker),))

    path = _write_zip(tmp_path / "evil.pth", pickle.dumps({"w": Evil()}, protocol=2), {})
    with pytest.raises(TorchStateDictError, match=r"refusing to load global (posix|nt)\.mkdir"):
        load_state_dict(path)
    assert not marker.exists()


def test_refuses_global_in_legacy_layout(tmp_path: Path) -> None:
    header = pickle.dumps(0x1950A86A20F9469CFC6C) + pickle.dumps(1001) + pickle.dumps({"little_endian": True})
    evil = b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R."
    path = tmp_path / "legacy_evil.pth"
    path.write_bytes(header + evil)
    with pytest.raises(TorchStateDictError, match=r"builtins\.eval"):
        load_state_dict(path)


def test_rejects_stride_past_the_storage(tmp_path: Path) -> None:
    # A crafted stride must not make the reader return memory outside the storage.
    tensors = {"a": _Tensor("0", 0, (2, 4), (8, 1))}
    path = _write_zip(tmp_path / "oob.pth", _torch_pickle(tensors, {"0": 8}), {"0": np.zeros(8, np.float32)})
    with pytest.raises(TorchStateDictError, match="reaches element 11"):
        load_state_dict(path)


def test_rejects_tensor_larger_than_its_storage(tmp_path: Path) -> None:
    # Stride 0 stays inside the buffer but would let a tiny file allocate an arbitrarily large array.
    tensors = {"a": _Tensor("0", 0, (100_000, 100_000), (0, 0))}
    path = _write_zip(tmp_path / "huge.pth", _torch_pickle(tensors, {"0": 1}), {"0": np.zeros(1, np.float32)})
    with pytest.raises(TorchStateDictError, match="larger than its storage"):
        load_state_dict(path)


def test_rejects_missing_storage_record(tmp_path: Path) -> None:
    tensors = {"a": _Tensor("7", 0, (2,), (1,))}
    path = _write_zip(tmp_path / "missing.pth", _torch_pickle(tensors, {"7": 2}), {})
    with pytest.raises(TorchStateDictError, match="data/7 is missing"):
        load_state_dict(path)


def test_rejects_non_tensor_entries_and_non_torch_files(tmp_path: Path) -> None:
    path = _write_zip(tmp_path / "list.pth", pickle.dumps({"a": [1, 2]}, protocol=2), {})
    with pytest.raises(TorchStateDictError, match="not a named tensor"):
        load_state_dict(path)
    text = tmp_path / "notes.pth"
    text.write_bytes(b"hello, not a model")
    with pytest.raises(TorchStateDictError):
        load_state_dict(text)
