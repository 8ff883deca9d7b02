"""Read ``torch.save`` checkpoints into NumPy arrays without importing torch.

Both formats ``torch.save`` writes are read: the zip archive (the default since torch 1.6:
``<name>/data.pkl`` plus one ``<name>/data/<key>`` member per storage) and the legacy stream
(``_use_new_zipfile_serialization=False``: pickles of the magic number, protocol version, system
info, the object and its storage keys, then each storage as an int64 element count and raw bytes).

The pickle is read by an unpickler that admits only the globals tensors are built from, each mapped
to a local stand-in, so a checkpoint cannot run code. Storage bytes are read once, straight into
NumPy buffers, after the pickle has named the tensors that are needed.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

import ml_dtypes
import numpy as np

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001

# torch's storage classes (torch.FloatStorage, ...), by name.
_STORAGE_DTYPES: dict[str, Any] = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}
# Dtypes without a storage class: torch pickles their tensors as an untyped storage plus a torch
# dtype global (torch.uint16, ...), rebuilt by _rebuild_tensor_v3.
_TENSOR_DTYPES: dict[str, Any] = {
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
}
_DTYPES = {**_STORAGE_DTYPES, **_TENSOR_DTYPES}


class UnsafeCheckpointError(ValueError):
    """A checkpoint's pickle asks for a global that a file of weights has no need for."""


class CheckpointFormatError(ValueError):
    """The file is not a ``torch.save`` checkpoint, or holds no state dict."""


def _not_checkpoint(path: str, found: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{path} is not a PyTorch checkpoint ({' '.join(found.split())[:200]})")


# The stand-ins hold dtype *names*, looked up in _DTYPES only when arrays are built: a pickle's BUILD
# opcode can rewrite these objects' fields, so nothing in them is trusted before it is checked.
@dataclass
class _StorageType:
    name: str


@dataclass
class _DType:
    name: str


@dataclass
class _Storage:
    key: str
    dtype: str
    numel: int
    byte_offset: int = 0  # legacy storage views only


@dataclass
class _Tensor:
    storage: _Storage
    dtype: str
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise ValueError("a tensor without a storage")
    return _Tensor(storage, storage.dtype, offset, tuple(size), tuple(stride))


def _rebuild_tensor_v3(storage: _Storage, offset: int, size: tuple, stride: tuple, requires_grad: bool,
                       hooks: Any, dtype: _DType, *_: Any) -> _Tensor:
    tensor = _rebuild_tensor(storage, offset, size, stride)
    tensor.dtype = dtype.name if isinstance(dtype, _DType) else ""
    return tensor


def _rebuild_parameter(data: _Tensor, *_: Any) -> _Tensor:
    return data


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "collections.OrderedDict": collections.OrderedDict,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,  # requires_grad, hooks, metadata: unused
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
}


def _numpy_dtype(name: str) -> np.dtype:
    if not isinstance(name, str) or name not in _DTYPES:
        raise ValueError(f"unknown tensor type {name!r}")
    return np.dtype(_DTYPES[name])


class _Unpickler(pickle.Unpickler):
    """Unpickles a checkpoint with `_Tensor` stand-ins for tensors, refusing every other global."""

    def __init__(self, file: BinaryIO, path: str) -> None:
        super().__init__(file, encoding="utf-8")
        self.path = path
        self.storages: dict[str, _Storage] = {}  # by key, as first named

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in _FUNCTIONS:
            return _FUNCTIONS[full]
        # Fresh objects per load: a BUILD opcode may alter them, and must not alter the next load.
        # torch.cuda.FloatStorage & co. come from files that old torch versions saved on a GPU.
        storage_module = module in ("torch", "torch.cuda") or full == "torch.storage.UntypedStorage"
        if storage_module and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name in _TENSOR_DTYPES:
            return _DType(name)
        raise UnsafeCheckpointError(
            f"refusing to load {full!r} from {self.path}: only tensors and dicts are allowed in a weights file")

    def persistent_load(self, pid: Any) -> _Storage:
        """A storage from its id: ("storage", type, key, location, numel[, legacy view])."""
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] in ("storage", b"storage")
                and isinstance(pid[1], _StorageType) and isinstance(pid[4], int)):
            raise ValueError(f"unexpected persistent id {str(pid)[:80]!r}")
        key = pid[2].decode("ascii") if isinstance(pid[2], bytes) else str(pid[2])
        storage = self.storages.setdefault(key, _Storage(key, pid[1].name, pid[4]))
        if len(pid) == 6 and pid[5] is not None:  # a view into storage `key` (torch < 0.4 wrote these)
            _, offset, size = pid[5]
            return _Storage(key, storage.dtype, int(size), int(offset) * _numpy_dtype(storage.dtype).itemsize)
        return storage


def _state_dict(obj: Any, path: str) -> dict[str, _Tensor]:
    """The flat dict of tensors in the unpickled object: itself, or its "state_dict" or "model" entry."""
    def is_tensor_dict(d: Any) -> bool:
        return isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, _Tensor) for k, v in d.items())

    if is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if is_tensor_dict(obj.get(key)):
                return dict(obj[key])
        found = f"a dict with keys {list(obj)[:8]} and no 'state_dict' or 'model' entry of tensors"
    else:
        found = f"a {type(obj).__name__}"
    found = " ".join(found.split())[:200]
    raise CheckpointFormatError(f"{path} holds no state dict (a flat dict of tensors): it holds {found}")


def _array(tensor: _Tensor, buffers: dict[str, np.ndarray]) -> np.ndarray:
    """The tensor's values: a view of its storage buffer when contiguous, else a C-contiguous copy."""
    storage = tensor.storage
    storage_bytes = storage.numel * _numpy_dtype(storage.dtype).itemsize
    raw = buffers[storage.key][storage.byte_offset:storage.byte_offset + storage_bytes]
    dtype = _numpy_dtype(tensor.dtype)
    flat = raw[:len(raw) // dtype.itemsize * dtype.itemsize].view(dtype)
    shape, strides, offset = tensor.shape, tensor.strides, tensor.offset
    if not all(type(n) is int and n >= 0 for n in (*shape, *strides, offset)) or len(shape) != len(strides):
        raise ValueError(f"bad tensor geometry {str(shape)[:40]}, {str(strides)[:40]}, {offset!r}")
    if 0 in shape:
        return np.zeros(shape, dtype)
    # Bounds-check before as_strided, which would otherwise read whatever memory the file points at.
    if offset + sum((n - 1) * s for n, s in zip(shape, strides)) >= flat.size:
        raise ValueError(f"a tensor reaches past the end of its storage {storage.key!r}")
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape, [s * dtype.itemsize for s in strides])
    return view if view.flags.c_contiguous else view.copy()  # not ascontiguousarray: it makes 0-d 1-d


def _read_exact(f: BinaryIO, size: int) -> np.ndarray:
    """The next `size` bytes of `f`, read into a new writable buffer."""
    if size > os.fstat(f.fileno()).st_size - f.tell():
        raise ValueError("the file is truncated")
    buffer = np.empty(size, np.uint8)
    if f.readinto(memoryview(buffer)) != size:
        raise ValueError("the file is truncated")
    return buffer


def _read_zip(f: BinaryIO, path: str) -> dict[str, np.ndarray]:
    try:
        archive = zipfile.ZipFile(f)
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise _not_checkpoint(path, f"a truncated or corrupt zip archive: {e}") from None
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if not pickles:
        raise _not_checkpoint(path, f"a zip archive without <name>/data.pkl: {names[:5]}")
    prefix = pickles[0].removesuffix("data.pkl")
    if prefix + "constants.pkl" in names:
        raise _not_checkpoint(path, "a TorchScript archive from torch.jit.save; torch.save the state_dict")
    with archive.open(pickles[0]) as pkl:
        tensors = _state_dict(_Unpickler(pkl, path).load(), path)
    big_endian = prefix + "byteorder" in names and archive.read(prefix + "byteorder") == b"big"
    buffers: dict[str, np.ndarray] = {}
    for storage in (t.storage for t in tensors.values()):
        if storage.key in buffers:
            continue
        info = archive.getinfo(f"{prefix}data/{storage.key}")
        if info.compress_type == zipfile.ZIP_STORED:  # as torch writes them: read the bytes in place
            f.seek(info.header_offset)
            header = f.read(30)
            if header[:4] != b"PK\x03\x04":
                raise ValueError(f"a corrupt zip entry {info.filename}")
            name_size, extra_size = struct.unpack("<HH", header[26:30])
            f.seek(info.header_offset + 30 + name_size + extra_size)
            buffers[storage.key] = _read_exact(f, info.file_size)
        else:
            buffers[storage.key] = np.frombuffer(bytearray(archive.read(info)), np.uint8)
        if big_endian:
            dtype = _numpy_dtype(storage.dtype)
            size = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize  # complex: per component
            if size > 1:
                buffers[storage.key].view(f"u{size}").byteswap(inplace=True)
    return {name: _array(t, buffers) for name, t in tensors.items()}


def _read_legacy(f: BinaryIO, path: str) -> dict[str, np.ndarray]:
    for expected in (_MAGIC_NUMBER, _PROTOCOL_VERSION):
        found = _Unpickler(f, path).load()
        if found != expected:
            raise _not_checkpoint(path, f"a pickle without torch.save's header: found {str(found)[:40]!r}")
    _Unpickler(f, path).load()  # system information (byte order, C type sizes), which torch ignores too
    unpickler = _Unpickler(f, path)
    tensors = _state_dict(unpickler.load(), path)
    keys = _Unpickler(f, path).load()
    needed = {t.storage.key for t in tensors.values()}
    buffers: dict[str, np.ndarray] = {}
    for key in keys:  # each storage: its int64 element count, then its bytes (always little-endian)
        numel = int(_read_exact(f, 8).view("<i8")[0])
        size = numel * _numpy_dtype(unpickler.storages[key].dtype).itemsize
        if key in needed:
            buffers[key] = _read_exact(f, size)
        else:
            f.seek(size, os.SEEK_CUR)
    return {name: _array(t, buffers) for name, t in tensors.items()}


def read_torch_checkpoint(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Reads a ``torch.save`` file's state dict as NumPy arrays, without importing torch.

    Returns the flat ``{name: array}`` dict the file holds, or the one under its "state_dict" or
    "model" key (so ``{"state_dict": sd, "epoch": 3}`` gives ``sd``), in the zip format or the
    legacy one. Arrays keep the tensors' shapes and dtypes and are C-contiguous and writable;
    contiguous tensors are views of the storage bytes (so they share memory where the tensors
    did), others are copies. bfloat16 (and float8) tensors come back bit for bit as ``ml_dtypes``
    arrays, the types JAX uses for them (``jnp.bfloat16 is ml_dtypes.bfloat16``).

    Raises FileNotFoundError for a missing path; `UnsafeCheckpointError` for a pickle naming any
    global besides tensors, parameters, storages and OrderedDict (a pickled ``nn.Module`` too);
    `CheckpointFormatError` for a file that is not a checkpoint (text, empty, truncated, a
    directory, a TorchScript archive) or holds no state dict. Both errors are ValueErrors.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise _not_checkpoint(path, "a directory, not a file: an Orbax checkpoint?")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    with open(path, "rb") as f:
        start = f.read(4)
        f.seek(0)
        if not start:
            raise _not_checkpoint(path, "an empty file")
        try:
            if start == b"PK\x03\x04":
                return _read_zip(f, path)
            if start[:1] == pickle.PROTO:
                return _read_legacy(f, path)
        except (UnsafeCheckpointError, CheckpointFormatError):
            raise
        except Exception as e:  # any other failure to decode the untrusted pickle or archive: corrupt
            raise _not_checkpoint(path, str(e) if type(e) is ValueError else f"{type(e).__name__}: {e}") from e
    raise _not_checkpoint(path, f"it starts with {start!r}")
