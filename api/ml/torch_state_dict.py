"""Read a PyTorch state dict (``torch.save(model.state_dict(), path)``) without PyTorch.

Two on-disk layouts exist and both are read:

* the zip layout (PyTorch >= 1.6): ``<prefix>/data.pkl`` holds the pickled dict, each tensor storage is a
  raw little-endian record ``<prefix>/data/<key>``;
* the legacy layout (older PyTorch, also what the MiniFASNet files use): five pickles in a row (magic
  number, protocol version, system info, the dict, the list of storage keys) followed by each storage as
  an 8-byte element count and its raw bytes.

Unpickling is restricted: the only globals resolved are the tensor rebuild functions, the storage classes
and ``collections.OrderedDict``; anything else raises, so a hostile file cannot run code. Rebuild
functions do not execute torch code either: they return placeholders that are turned into numpy arrays
after the storages were read, with their size, stride and offset checked against the storage length.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Written by ``torch.save`` at the head of the legacy layout.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# numpy has no bfloat16; its 16 bits are the upper half of a float32 and are widened on read.
_BFLOAT16 = "bfloat16"

_STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "f4",
    "DoubleStorage": "f8",
    "HalfStorage": "f2",
    "BFloat16Storage": _BFLOAT16,
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class TorchStateDictError(ValueError):
    """The file is not a PyTorch state dict this reader accepts (or tries to call a forbidden global)."""


@dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: str

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == _BFLOAT16 else np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class _StorageRef:
    """A storage named in the pickle: its bytes are looked up by ``key`` once they are available."""

    key: str
    storage_type: _StorageType
    numel: int
    # Legacy files may reference a slice of a larger storage: (element offset, element count).
    view: tuple[int, int] | None = None


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_ignored: Any) -> _TensorRef:
    # Shared by _rebuild_tensor and _rebuild_tensor_v2: requires_grad, backward hooks and metadata that
    # follow the stride do not change the values.
    if not isinstance(storage, _StorageRef):
        raise TorchStateDictError(f"tensor rebuilt from {type(storage).__name__}, expected a storage")
    try:
        shape, strides = tuple(int(v) for v in size), tuple(int(v) for v in stride)
        return _TensorRef(storage, int(storage_offset), shape, strides)
    except (TypeError, ValueError) as err:
        raise TorchStateDictError(f"malformed tensor metadata: {err}") from err


def _rebuild_parameter(data: Any, requires_grad: Any = None, backward_hooks: Any = None, *_: Any) -> Any:
    # A saved nn.Parameter wraps a tensor; the values are the tensor's.
    if not isinstance(data, _TensorRef):
        raise TorchStateDictError("parameter rebuilt from something that is not a tensor")
    return data


_ALLOWED_FUNCTIONS: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a state dict needs; storages come back as ``_StorageRef``."""

    def __init__(self, file: io.BufferedIOBase | io.BytesIO, legacy: bool) -> None:
        super().__init__(file)
        self._legacy = legacy
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_FUNCTIONS:
            return _ALLOWED_FUNCTIONS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        raise TorchStateDictError(f"refusing to load global {module}.{name}: not part of a plain state dict")

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise TorchStateDictError(f"unsupported persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise TorchStateDictError(f"unsupported storage type {storage_type!r}")
        key = str(key)
        view = None
        if self._legacy and len(pid) > 5 and pid[5] is not None:
            _view_key, view_offset, view_size = pid[5]
            view = (int(view_offset), int(view_size))
        ref = _StorageRef(key, storage_type, int(numel), view)
        known = self.storages.get(key)
        if known is not None and (known.storage_type != storage_type or known.numel != ref.numel):
            raise TorchStateDictError(f"storage {key} is referenced with two different types or sizes")
        self.storages[key] = _StorageRef(key, storage_type, int(numel))
        return ref


class _PlainUnpickler(pickle.Unpickler):
    """For the legacy header pickles, which hold only ints, strings, bools, lists and dicts."""

    def find_class(self, module: str, name: str) -> Any:
        raise TorchStateDictError(f"refusing to load global {module}.{name} in a header record")

    def persistent_load(self, pid: Any) -> Any:
        raise TorchStateDictError("unexpected persistent id in a header record")


def _decode(raw: bytes, storage_type: _StorageType, big_endian: bool) -> np.ndarray:
    order = ">" if big_endian else "<"
    if storage_type.dtype == _BFLOAT16:
        halves = np.frombuffer(raw, dtype=f"{order}u2").astype(np.uint32)
        return (halves << 16).view(np.float32)
    dtype = np.dtype(storage_type.dtype).newbyteorder(order)
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)


def _materialize(ref: _TensorRef, storages: Mapping[str, np.ndarray]) -> np.ndarray:
    data = storages[ref.storage.key]
    if ref.storage.view is not None:
        view_offset, view_size = ref.storage.view
        if view_offset < 0 or view_offset + view_size > data.size:
            raise TorchStateDictError(f"storage view outside storage {ref.storage.key}")
        data = data[view_offset : view_offset + view_size]
    if len(ref.size) != len(ref.stride):
        raise TorchStateDictError(f"size {ref.size} and stride {ref.stride} differ in length")
    if any(n < 0 for n in ref.size) or any(s < 0 for s in ref.stride) or ref.offset < 0:
        raise TorchStateDictError(f"negative size, stride or offset in a tensor of storage {ref.storage.key}")
    if 0 in ref.size:
        return np.zeros(ref.size, dtype=data.dtype)
    # Parameters never overlap themselves; refusing more elements than stored (stride-0 tricks) bounds
    # the memory a crafted file can make us allocate by the file's own size.
    if math.prod(ref.size) > data.size:
        raise TorchStateDictError(f"tensor of shape {ref.size} is larger than its storage {ref.storage.key}")
    # The bounds check is what makes as_strided safe: a crafted stride must not read past the buffer.
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if last >= data.size:
        raise TorchStateDictError(
            f"tensor reaches element {last} of storage {ref.storage.key}, which holds {data.size}"
        )
    strides = tuple(s * data.itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(data[ref.offset :], shape=ref.size, strides=strides, writeable=False)
    return np.array(view, order="C")  # always a copy: callers may write to it


def _to_arrays(obj: Any, storages: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(obj, Mapping):
        raise TorchStateDictError(f"the file holds a {type(obj).__name__}, not a state dict")
    result: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, _TensorRef):
            raise TorchStateDictError(f"entry {key!r} is not a named tensor")
        result[key] = _materialize(value, storages)
    return result


def _read_zip(archive: zipfile.ZipFile) -> dict[str, np.ndarray]:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise TorchStateDictError(f"expected one <prefix>/data.pkl in the archive, found {len(pickles)}")
    prefix = pickles[0][: -len("data.pkl")]
    big_endian = False
    if f"{prefix}byteorder" in archive.namelist():
        big_endian = archive.read(f"{prefix}byteorder").strip() == b"big"
    unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), legacy=False)
    obj = unpickler.load()
    storages: dict[str, np.ndarray] = {}
    for key, ref in unpickler.storages.items():
        try:
            raw = archive.read(f"{prefix}data/{key}")
        except KeyError as err:
            raise TorchStateDictError(f"storage record data/{key} is missing from the archive") from err
        if len(raw) < ref.numel * ref.storage_type.itemsize:
            raise TorchStateDictError(f"storage data/{key} is shorter than its {ref.numel} elements")
        storages[key] = _decode(raw[: ref.numel * ref.storage_type.itemsize], ref.storage_type, big_endian)
    return _to_arrays(obj, storages)


def _read_legacy(buffer: io.BytesIO) -> dict[str, np.ndarray]:
    try:
        magic = _PlainUnpickler(buffer).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise TorchStateDictError(f"not a PyTorch file: {err}") from err
    if magic != _LEGACY_MAGIC:
        raise TorchStateDictError("not a PyTorch file: wrong magic number")
    protocol = _PlainUnpickler(buffer).load()
    if protocol != _LEGACY_PROTOCOL:
        raise TorchStateDictError(f"unsupported legacy protocol version {protocol}")
    sys_info = _PlainUnpickler(buffer).load()
    big_endian = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
    byteorder: Any = "big" if big_endian else "little"
    unpickler = _RestrictedUnpickler(buffer, legacy=True)
    obj = unpickler.load()
    keys = _PlainUnpickler(buffer).load()
    if not isinstance(keys, list):
        raise TorchStateDictError("malformed storage key list")
    storages: dict[str, np.ndarray] = {}
    for key in keys:
        ref = unpickler.storages.get(str(key))
        if ref is None:
            raise TorchStateDictError(f"storage {key} is written but never referenced")
        count = int.from_bytes(buffer.read(8), byteorder, signed=True)
        nbytes = count * ref.storage_type.itemsize
        raw = buffer.read(nbytes)
        if count != ref.numel or len(raw) != nbytes:
            raise TorchStateDictError(f"storage {key}: truncated or of unexpected length")
        storages[ref.key] = _decode(raw, ref.storage_type, big_endian)
    missing = set(unpickler.storages) - set(storages)
    if missing:
        raise TorchStateDictError(f"storages {sorted(missing)} are referenced but not in the file")
    return _to_arrays(obj, storages)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a saved state dict as numpy arrays (C-contiguous copies), keys in file order."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return _read_zip(archive)
        return _read_legacy(io.BytesIO(path.read_bytes()))
    except TorchStateDictError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, TypeError, ValueError, KeyError) as err:
        # A corrupt or hand-made pickle fails in the unpickler or in our rebuild functions.
        raise TorchStateDictError(f"{path.name}: damaged PyTorch file ({err})") from err
