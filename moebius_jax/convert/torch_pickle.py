"""Read and write `torch.save` files without torch and without running pickled code.

Reading: a restricted unpickler resolves only the few globals a state dict of CPU tensors
needs, each to a local stand-in, so a hostile file cannot execute anything. Both the zip
layout (torch >= 1.6) and the legacy single-stream layout (older torch; e.g. pytorch-fid's
Inception weights) are understood. Tensors come back as C-contiguous numpy arrays.

Writing: the zip layout with a hand-emitted protocol-2 pickle that names the same globals
torch writes, so `torch.load(path, weights_only=True)` reads it back.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from moebius_jax.convert.errors import CheckpointError, UnsafePickleError
from moebius_jax.io_safety import atomic_output

PathLike = str | os.PathLike

# Element type of each typed storage class torch names in its pickles.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(dtype)
    for name, dtype in {
        "FloatStorage": np.float32,
        "HalfStorage": np.float16,
        "BFloat16Storage": ml_dtypes.bfloat16,
        "DoubleStorage": np.float64,
        "LongStorage": np.int64,
        "IntStorage": np.int32,
        "ShortStorage": np.int16,
        "CharStorage": np.int8,
        "ByteStorage": np.uint8,
        "BoolStorage": np.bool_,
    }.items()
}
_STORAGE_NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in _STORAGE_DTYPES.items()}

# The legacy stream starts with this pickled integer, then the protocol version below.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_ALIGNMENT = 64  # data records start on 64-byte boundaries, as torch writes them (mmap-able)


# --------------------------------------------------------------------------------------------
# Stand-ins for the whitelisted globals. They only record what the pickle describes; tensors
# are materialised after the whole pickle is read, because legacy files store the bytes after it.


class _Sealed:
    """Base of every stand-in a pickle can reach. BUILD would otherwise let a file rewrite
    fields after they were validated (e.g. a negative stride) or alter a shared stand-in."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise ValueError(f"a pickle may not set the state of {type(self).__name__}")


@dataclass(frozen=True)
class _StorageType(_Sealed):
    """Stand-in for a typed storage class such as `torch.FloatStorage`."""

    name: str
    dtype: np.dtype


@dataclass(frozen=True)
class _Storage(_Sealed):
    """A storage reference: `numel` elements starting `offset` elements into record `key`."""

    key: str
    dtype: np.dtype
    numel: int
    offset: int = 0


@dataclass(frozen=True)
class _TensorRef(_Sealed):
    """A tensor as the pickle describes it; turned into an array once the storages are read."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _PickledOrderedDict(dict):
    """Stand-in for `collections.OrderedDict`; becomes a plain dict once loading is done."""

    def __setstate__(self, state: Any) -> None:
        # torch attaches the module's `_metadata` (version numbers) as instance state;
        # a state dict's content does not depend on it.
        pass


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ValueError(f"tensor {what} must be a tuple of non-negative ints, got {value!r}")
    return tuple(value)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise ValueError(f"tensor storage must be a storage reference, got {type(storage).__name__}")
    if not isinstance(storage_offset, int) or isinstance(storage_offset, bool) or storage_offset < 0:
        raise ValueError(f"tensor storage_offset must be a non-negative int, got {storage_offset!r}")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise ValueError(f"tensor size {size} and stride {stride} differ in length")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _TensorRef:
    # Hooks would be pickled functions (already refused by find_class); metadata carries
    # per-tensor flags that plain CPU tensors do not have.
    if backward_hooks:
        raise ValueError("tensor has backward hooks, which a state dict never holds")
    if metadata:
        raise ValueError(f"tensor metadata {metadata!r} is not supported")
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> _TensorRef:
    if not isinstance(data, _TensorRef):
        raise ValueError(f"parameter data must be a tensor, got {type(data).__name__}")
    if backward_hooks:
        raise ValueError("parameter has backward hooks, which a state dict never holds")
    return data


class _Rebuild(_Sealed):
    """Stand-in for a torch rebuild function (a plain function would accept BUILD state)."""

    __slots__ = ("_func",)

    def __init__(self, func: Callable[..., _TensorRef]):
        self._func = func

    def __call__(self, *args: Any) -> _TensorRef:
        return self._func(*args)


_WHITELIST: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _PickledOrderedDict,
    ("torch._utils", "_rebuild_tensor"): _Rebuild(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Rebuild(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _Rebuild(_rebuild_parameter),
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only whitelisted globals and records storage references."""

    def __init__(self, file: BinaryIO, path: str, legacy: bool):
        super().__init__(file)
        self._path = path
        self._legacy = legacy
        self.storages: dict[str, _Storage] = {}  # root storages by record key

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _WHITELIST[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._path}: refusing to load global '{module}.{name}' (only tensors, storages "
                "and OrderedDict are allowed); nothing was executed"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        # zip: ('storage', type, key, location, numel)
        # legacy: ('storage', type, root key, location, root numel, view or None)
        arity = 6 if self._legacy else 5
        if not (isinstance(pid, tuple) and len(pid) == arity and pid[0] == "storage"):
            raise ValueError(f"unsupported persistent id {pid!r}; expected a {arity}-tuple ('storage', ...)")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise ValueError(f"persistent id {pid!r} does not name a storage type")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise ValueError(f"malformed persistent id {pid!r}")
        root = self.storages.setdefault(key, _Storage(key, storage_type.dtype, numel))
        if root.dtype != storage_type.dtype or root.numel != numel:
            raise ValueError(
                f"storage '{key}' is referenced as {storage_type.dtype}[{numel}] and as {root.dtype}[{root.numel}]"
            )
        view = pid[5] if self._legacy else None
        if view is None:
            return root
        # Very old files address a slice of a root storage: (view key, element offset, size).
        if not (isinstance(view, tuple) and len(view) == 3):
            raise ValueError(f"malformed storage view {view!r} in persistent id")
        _view_key, offset, view_numel = view
        valid = isinstance(offset, int) and isinstance(view_numel, int) and 0 <= offset <= offset + view_numel <= numel
        if not valid:
            raise ValueError(f"storage view {view!r} does not fit in storage '{key}' of {numel} elements")
        return _Storage(key, root.dtype, view_numel, offset)


# --------------------------------------------------------------------------------------------
# Reading


class _Records:
    """Raw storage bytes by key, plus the byte order they were written in."""

    def __init__(self, path: str, byteorder: str, roots: dict[str, _Storage], read: Callable[[str], bytes]):
        self.path = path
        self.byteorder = byteorder
        self._roots = roots
        self._read = read  # key -> bytes, raising CheckpointError when absent
        self._cache: dict[str, np.ndarray] = {}

    def elements(self, key: str) -> np.ndarray:
        """Root storage `key` as unsigned ints of the element width, in file byte order."""
        if key not in self._cache:
            root = self._roots[key]
            itemsize = root.dtype.itemsize
            data = self._read(key)
            if len(data) < root.numel * itemsize:
                raise CheckpointError(
                    f"{self.path}: storage '{key}' holds {len(data)} bytes, expected "
                    f"{root.numel * itemsize} ({root.numel} x {root.dtype})"
                )
            order = "<" if self.byteorder == "little" else ">"
            self._cache[key] = np.frombuffer(data, dtype=f"{order}u{itemsize}", count=root.numel)
        return self._cache[key]

    def tensor(self, ref: _TensorRef) -> np.ndarray:
        storage, dtype = ref.storage, ref.storage.dtype
        if 0 in ref.size:
            return np.zeros(ref.size, dtype)
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
        if last >= storage.numel:
            raise CheckpointError(
                f"{self.path}: tensor of size {ref.size}, stride {ref.stride}, offset {ref.offset} "
                f"needs {last + 1} elements but storage '{storage.key}' has {storage.numel}"
            )
        elements = self.elements(storage.key)[storage.offset + ref.offset :]
        view = np.lib.stride_tricks.as_strided(
            elements,
            shape=ref.size,
            strides=tuple(s * dtype.itemsize for s in ref.stride),
            writeable=False,
        )
        # Copy into a C-contiguous native-order buffer, then reinterpret the bits.
        return view.astype(f"=u{dtype.itemsize}", order="C").view(dtype)


def _finalize(obj: Any, records: _Records) -> Any:
    """Replace stand-ins by their values: tensor refs -> arrays, OrderedDict -> dict."""
    done: dict[int, Any] = {}

    def walk(x: Any) -> Any:
        if id(x) in done:
            return done[id(x)]
        if isinstance(x, _TensorRef):
            out = done[id(x)] = records.tensor(x)
        elif isinstance(x, dict):
            out = done[id(x)] = {}
            for k, v in x.items():
                out[walk(k)] = walk(v)
        elif isinstance(x, list):
            out = done[id(x)] = []
            out.extend(walk(v) for v in x)
        elif isinstance(x, tuple):
            out = done[id(x)] = tuple(walk(v) for v in x)
        elif isinstance(x, (_Storage, _StorageType)):
            raise CheckpointError(f"{records.path}: a bare storage was saved; only tensors are supported")
        else:
            out = x
        return out

    return walk(obj)


def _zip_root(path: str, zf: zipfile.ZipFile) -> str:
    # The top folder is named after the file that torch.save wrote, so it is found, not assumed.
    roots = [n[: -len("/data.pkl")] for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(roots) != 1:
        raise CheckpointError(
            f"{path}: expected exactly one '<root>/data.pkl' in the zip archive, found {len(roots)}"
        )
    return roots[0]


def _load_zip(path: str, fh: BinaryIO) -> Any:
    try:
        zf = zipfile.ZipFile(fh)
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path}: not a readable zip archive (truncated or corrupt?): {e}") from None
    with zf:
        root = _zip_root(path, zf)
        names = set(zf.namelist())
        byteorder = zf.read(f"{root}/byteorder").decode() if f"{root}/byteorder" in names else "little"
        if byteorder not in ("little", "big"):
            raise CheckpointError(f"{path}: byteorder record says {byteorder!r}, expected 'little' or 'big'")

        def read(key: str) -> bytes:
            name = f"{root}/data/{key}"
            if name not in names:
                raise CheckpointError(f"{path}: storage record '{name}' is missing from the archive")
            return zf.read(name)

        unpickler = _RestrictedUnpickler(io.BytesIO(zf.read(f"{root}/data.pkl")), path, legacy=False)
        obj = unpickler.load()
        return _finalize(obj, _Records(path, byteorder, unpickler.storages, read))


def _load_legacy(path: str, fh: BinaryIO) -> Any:
    def header(what: str) -> Any:
        try:
            return _RestrictedUnpickler(fh, path, legacy=True).load()
        except EOFError:
            raise CheckpointError(f"{path}: stream ends before the {what} pickle") from None

    try:
        magic = header("magic number")
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: not a torch.save file (neither a zip archive nor a pickle stream: {e})"
        ) from None
    if magic != _LEGACY_MAGIC:
        raise CheckpointError(f"{path}: not a torch.save file (neither a zip archive nor the legacy magic number)")
    protocol = header("protocol version")
    if protocol != _LEGACY_PROTOCOL:
        raise CheckpointError(f"{path}: legacy protocol version {protocol!r}, expected {_LEGACY_PROTOCOL}")
    sys_info = header("sys_info")
    if not isinstance(sys_info, dict):
        raise CheckpointError(f"{path}: legacy sys_info is {type(sys_info).__name__}, expected a dict")
    byteorder = "little" if sys_info.get("little_endian", True) else "big"

    unpickler = _RestrictedUnpickler(fh, path, legacy=True)
    obj = unpickler.load()
    keys = header("storage keys")
    if not isinstance(keys, list) or set(keys) != set(unpickler.storages):
        raise CheckpointError(
            f"{path}: legacy storage key list {keys!r} does not match the storages the pickle "
            f"references {sorted(unpickler.storages)}"
        )
    # Each storage follows as an 8-byte element count and the raw elements, in key-list order.
    data: dict[str, bytes] = {}
    for key in keys:
        root = unpickler.storages[key]
        count_bytes = fh.read(8)
        if len(count_bytes) < 8:
            raise CheckpointError(f"{path}: stream ends before the size header of storage '{key}'")
        count = int.from_bytes(count_bytes, byteorder)
        if count != root.numel:  # checked before reading, so a corrupt count cannot demand huge reads
            raise CheckpointError(
                f"{path}: storage '{key}' size header says {count} elements, the pickle {root.numel}"
            )
        nbytes = count * root.dtype.itemsize
        data[key] = fh.read(nbytes)
        if len(data[key]) < nbytes:
            raise CheckpointError(f"{path}: stream ends inside storage '{key}': {len(data[key])} of {nbytes} bytes")
    return _finalize(obj, _Records(path, byteorder, unpickler.storages, data.__getitem__))


def load_torch_file(path: PathLike) -> Any:
    """Load a `torch.save` file (zip or legacy layout) as dicts/lists of numpy arrays.

    Only tensors, storages and OrderedDict are accepted; any other global raises
    UnsafePickleError before anything runs. Damaged files raise CheckpointError.
    """
    path_str = os.fspath(path)
    with open(path_str, "rb") as fh:  # FileNotFoundError names the path
        magic = fh.read(4)
        fh.seek(0)
        try:
            if magic in (b"PK\x03\x04", b"PK\x05\x06"):
                return _load_zip(path_str, fh)
            return _load_legacy(path_str, fh)
        except CheckpointError:
            raise
        except RecursionError:
            raise CheckpointError(f"{path_str}: object nesting too deep to load") from None
        except Exception as e:  # malformed pickle or zip content
            raise CheckpointError(f"{path_str}: corrupt checkpoint: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------------------------
# Writing


class _PickleWriter:
    """Emits a protocol-2 pickle of containers and arrays in the form torch itself writes.

    Python's Pickler cannot be used: it would import `torch` to verify the global names.
    """

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.arrays: list[np.ndarray] = []  # storage i = arrays[i], flattened, native order
        self._memo: dict[tuple[str, str], int] = {}

    def dump(self, obj: Any) -> bytes:
        self.out.write(pickle.PROTO + b"\x02")
        self._save(obj, "<top>")
        self.out.write(pickle.STOP)
        return self.out.getvalue()

    def _global(self, module: str, name: str) -> None:
        # Each global is written once and fetched from the memo afterwards, as pickle does.
        # There are at most 12 of them, so one-byte memo indices suffice.
        index = self._memo.get((module, name))
        if index is not None:
            self.out.write(pickle.BINGET + bytes([index]))
            return
        index = self._memo[(module, name)] = len(self._memo)
        self.out.write(pickle.GLOBAL + f"{module}\n{name}\n".encode() + pickle.BINPUT + bytes([index]))

    def _int(self, value: int) -> None:
        if 0 <= value < 256:
            self.out.write(pickle.BININT1 + bytes([value]))
        elif 0 <= value < 65536:
            self.out.write(pickle.BININT2 + struct.pack("<H", value))
        elif -(2**31) <= value < 2**31:
            self.out.write(pickle.BININT + struct.pack("<i", value))
        else:
            encoded = pickle.encode_long(value)
            self.out.write(pickle.LONG1 + bytes([len(encoded)]) + encoded)

    def _tuple(self, items: tuple, where: str) -> None:
        self.out.write(pickle.MARK)
        for item in items:
            self._save(item, where)
        self.out.write(pickle.TUPLE)

    def _save(self, obj: Any, where: str) -> None:
        write = self.out.write
        if obj is None:
            write(pickle.NONE)
        elif isinstance(obj, bool):
            write(pickle.NEWTRUE if obj else pickle.NEWFALSE)
        elif isinstance(obj, int):
            self._int(obj)
        elif isinstance(obj, float):
            write(pickle.BINFLOAT + struct.pack(">d", obj))
        elif isinstance(obj, str):
            encoded = obj.encode("utf-8")
            write(pickle.BINUNICODE + struct.pack("<I", len(encoded)) + encoded)
        elif isinstance(obj, np.ndarray):
            self._tensor(obj, where)
        elif isinstance(obj, Mapping):
            if isinstance(obj, collections.OrderedDict):
                self._global("collections", "OrderedDict")
                write(pickle.EMPTY_TUPLE + pickle.REDUCE)
            else:
                write(pickle.EMPTY_DICT)
            if obj:
                write(pickle.MARK)
                for key, value in obj.items():
                    self._save(key, where)
                    self._save(value, f"{where}[{key!r}]")
                write(pickle.SETITEMS)
        elif isinstance(obj, list):
            write(pickle.EMPTY_LIST)
            if obj:
                write(pickle.MARK)
                for i, item in enumerate(obj):
                    self._save(item, f"{where}[{i}]")
                write(pickle.APPENDS)
        elif isinstance(obj, tuple):
            self._tuple(obj, where)
        else:
            raise TypeError(
                f"{where}: cannot save a {type(obj).__name__}; supported are dicts, lists, tuples, "
                "numpy arrays, str, int, float, bool and None"
            )

    def _tensor(self, array: np.ndarray, where: str) -> None:
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("="))
        name = _STORAGE_NAMES.get(array.dtype)
        if name is None:
            supported = ", ".join(sorted(map(str, _STORAGE_NAMES)))
            raise TypeError(f"{where}: dtype {array.dtype} has no torch storage; supported are {supported}")
        key = str(len(self.arrays))
        self.arrays.append(array.reshape(-1))  # C order; copies only if not contiguous
        # Contiguous strides as torch computes them (a zero-length dim counts as 1).
        strides, step = [], 1
        for n in reversed(array.shape):
            strides.append(step)
            step *= max(n, 1)
        self._global("torch._utils", "_rebuild_tensor_v2")
        self.out.write(pickle.MARK + pickle.MARK)
        # persistent id ('storage', storage class, key, location, numel)
        self._save("storage", where)
        self._global("torch", name)
        self._save(key, where)
        self._save("cpu", where)
        self._int(array.size)
        self.out.write(pickle.TUPLE + pickle.BINPERSID)
        self._int(0)  # storage offset
        self._tuple(tuple(array.shape), where)
        self._tuple(tuple(reversed(strides)), where)
        self.out.write(pickle.NEWFALSE)  # requires_grad
        self._global("collections", "OrderedDict")  # backward hooks: empty
        self.out.write(pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.TUPLE + pickle.REDUCE)


def _write_record(zf: zipfile.ZipFile, fh: BinaryIO, name: str, data: memoryview | bytes) -> None:
    """Store one uncompressed zip entry whose data starts on an _ALIGNMENT boundary."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.file_size = len(data) if isinstance(data, bytes) else data.nbytes
    # Past 1 GiB zipfile may add a 20-byte zip64 field to the local header; decide it here.
    zip64 = info.file_size > 2**30
    header = 30 + len(name.encode()) + (20 if zip64 else 0) + 4  # +4: our padding field's own header
    pad = -(fh.tell() + header) % _ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", pad) + b"\0" * pad
    with zf.open(info, "w", force_zip64=zip64) as out:
        out.write(data)


def save_torch_file(path: PathLike, obj: Any) -> None:
    """Write `obj` (nested dicts/OrderedDicts/lists of numpy arrays and scalars) as torch's zip format.

    The result loads with `torch.load(path, weights_only=True)`. The write is atomic.
    """
    writer = _PickleWriter()
    pickled = writer.dump(obj)
    root = os.path.splitext(os.path.basename(os.fspath(path)))[0] or "archive"
    with atomic_output(path) as tmp, open(tmp, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
        _write_record(zf, fh, f"{root}/data.pkl", pickled)
        _write_record(zf, fh, f"{root}/.format_version", b"1")
        _write_record(zf, fh, f"{root}/.storage_alignment", str(_ALIGNMENT).encode())
        _write_record(zf, fh, f"{root}/byteorder", b"little")
        for key, flat in enumerate(writer.arrays):
            itemsize = flat.dtype.itemsize
            little = flat.view(f"u{itemsize}").astype(f"<u{itemsize}", copy=False)
            _write_record(zf, fh, f"{root}/data/{key}", memoryview(little).cast("B"))
        _write_record(zf, fh, f"{root}/version", b"3\n")
