"""Read PyTorch state dicts into NumPy without importing torch.

Supports the legacy (pre-1.6, non-zip) serialization format used by many
published checkpoints, and the zip format written by ``torch.save`` since 1.6.
Unpickling goes through a restricted ``pickle.Unpickler`` that resolves only
the handful of globals a state dict needs, so a malicious file cannot run code.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile

import numpy as np

__all__ = ["UnsafePickleError", "load_state_dict"]

# Pickled as the first object of a legacy file; see torch/serialization.py.
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# Storage class name -> NumPy dtype (little endian; byte-swapped if needed).
_STORAGE_DTYPES = {
    "DoubleStorage": "<f8",
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "BFloat16Storage": "<u2",  # no NumPy bfloat16: widened in _to_array
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class UnsafePickleError(pickle.UnpicklingError):
    """Raised when a checkpoint references a global outside the allow-list."""


class _StorageType:
    """Stand-in for a ``torch.*Storage`` class: only remembers its dtype."""

    def __init__(self, name):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """A storage whose bytes are filled in after unpickling (legacy) or lazily (zip)."""

    def __init__(self, key, storage_type, numel):
        self.key, self.storage_type, self.numel = key, storage_type, numel
        self.data = None  # flat 1-D ndarray once read


class _StorageView:
    """Legacy storage view: ``numel`` elements of ``base`` from ``offset``."""

    def __init__(self, base, offset, numel):
        self.base, self.offset, self.numel = base, offset, numel


class _Tensor:
    """Tensor metadata recorded while unpickling; materialised afterwards."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    # Same signature as torch._utils._rebuild_tensor_v2; grads/hooks are irrelevant here.
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, *args):
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and torch storages."""

    def __init__(self, file, storages, source):
        super().__init__(file)
        self._storages = storages  # key -> _Storage, shared across the file
        self._source = source

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        # GPU checkpoints name torch.cuda.*Storage; the bytes on disk are the same.
        if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
            return _StorageType(name)
        # Anything else (os.system, builtins.eval, nn.Module classes, ...) could
        # execute code or needs torch: refuse instead of importing it.
        raise UnsafePickleError(
            f"{self._source}: refusing to load global '{module}.{name}'; only "
            "plain tensor state dicts are supported"
        )

    def persistent_load(self, pid):
        # Legacy: ('storage', type, key, location, numel, view_metadata)
        # Zip:    ('storage', type, key, location, numel)
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise UnsafePickleError(f"{self._source}: unsupported persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"{self._source}: bad storage type {storage_type!r}")
        key = str(key)
        if key not in self._storages:
            self._storages[key] = _Storage(key, storage_type, int(numel))
        storage = self._storages[key]
        view = pid[5] if len(pid) > 5 else None
        if view is not None:
            _view_key, offset, view_numel = view
            return _StorageView(storage, int(offset), int(view_numel))
        return storage


def _to_array(tensor, dtype):
    """Materialise ``tensor`` as an owned, C-contiguous ndarray."""
    storage, offset, numel = tensor.storage, 0, None
    if isinstance(storage, _StorageView):
        storage, offset, numel = storage.base, storage.offset, storage.numel
    flat = storage.data
    if flat is None:
        raise ValueError(f"no data was stored for storage {storage.key}")
    if numel is None:
        numel = flat.size - offset
    offset += tensor.offset
    size, stride = tensor.size, tensor.stride
    if len(size) != len(stride) or any(s < 0 for s in size + stride):
        raise ValueError(f"invalid tensor geometry size={size} stride={stride}")
    # as_strided does no bounds checking, so check the last element ourselves.
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if offset < 0 or last >= min(flat.size, offset - tensor.offset + numel):
            raise ValueError(f"tensor of size {size} overruns its storage of {flat.size}")
    base = flat[offset:] if 0 not in size else flat[:0]
    arr = np.lib.stride_tricks.as_strided(
        base, shape=size, strides=tuple(s * flat.itemsize for s in stride), writeable=False
    )
    if storage.storage_type.name == "BFloat16Storage":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    # Copy to detach from the storage buffer (not ascontiguousarray: it turns 0-d into 1-d).
    arr = np.array(arr, order="C", copy=True)
    return arr.astype(dtype, copy=False) if dtype is not None else arr.astype(arr.dtype.newbyteorder("="))


def _materialise(obj, dtype):
    if isinstance(obj, _Tensor):
        return _to_array(obj, dtype)
    if isinstance(obj, dict):
        return {k: _materialise(v, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v, dtype) for v in obj)
    return obj


def _dtype_for(storage, little_endian):
    dt = storage.storage_type.dtype
    return dt if little_endian or dt.itemsize == 1 else dt.newbyteorder(">")


def _load_legacy(f, source):
    storages = {}

    def load():
        return _RestrictedUnpickler(f, storages, source).load()

    if load() != LEGACY_MAGIC_NUMBER:
        raise ValueError(f"{source}: not a PyTorch checkpoint (bad magic number)")
    protocol = load()
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise ValueError(f"{source}: unsupported legacy protocol version {protocol}")
    sys_info = load()
    little_endian = bool(sys_info.get("little_endian", True))
    obj = load()
    keys = load()
    # Storage records follow in the order of `keys`: int64 count, then raw bytes.
    for key in keys:
        if str(key) not in storages:
            raise ValueError(f"{source}: data for unknown storage {key}")
        storage = storages[str(key)]
        dt = _dtype_for(storage, little_endian)
        header = f.read(8)
        if len(header) != 8:
            raise ValueError(f"{source}: truncated before storage {key}")
        numel = int(np.frombuffer(header, dtype="<i8" if little_endian else ">i8")[0])
        raw = f.read(numel * dt.itemsize)
        if len(raw) != numel * dt.itemsize:
            raise ValueError(f"{source}: truncated data for storage {key}")
        storage.data = np.frombuffer(raw, dtype=dt)
    return obj, storages


def _load_zip(f, source):
    storages = {}
    with zipfile.ZipFile(f) as zf:
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise ValueError(f"{source}: zip file without data.pkl is not a torch checkpoint")
        prefix = pkl[: -len("data.pkl")]
        little_endian = True
        if prefix + "byteorder" in names:
            little_endian = zf.read(prefix + "byteorder").strip() == b"little"
        obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkl)), storages, source).load()
        # Zip storages are raw bytes in <prefix>data/<key>, without a count header.
        for key, storage in storages.items():
            dt = _dtype_for(storage, little_endian)
            storage.data = np.frombuffer(zf.read(f"{prefix}data/{key}"), dtype=dt)
    return obj, storages


def load_state_dict(path, dtype=np.float32):
    """Load a PyTorch state dict as NumPy arrays, without torch.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.pth``/``.pt`` file written by ``torch.save(model.state_dict())``,
        in the legacy (pre-1.6) or zip format.
    dtype : numpy dtype or None, optional
        Every tensor is cast to this dtype (default float32, including integer
        buffers such as ``num_batches_tracked``); ``None`` keeps stored dtypes.

    Returns
    -------
    dict of str to numpy.ndarray
        Tensor name to C-contiguous array. A checkpoint wrapping the weights as
        ``{"state_dict": ...}`` is unwrapped.

    Raises
    ------
    UnsafePickleError
        If the pickle names any global beyond tensors, storages and OrderedDict.
    ValueError
        If the file is not a supported checkpoint or its data are inconsistent.
    """
    source = os.fspath(path)
    with open(source, "rb") as f:
        if zipfile.is_zipfile(f):
            f.seek(0)
            obj, _ = _load_zip(f, source)
        else:
            f.seek(0)
            try:
                obj, _ = _load_legacy(f, source)
            except UnsafePickleError:
                raise
            except (pickle.UnpicklingError, EOFError) as exc:
                raise ValueError(
                    f"{source}: neither a zip nor a legacy (pre-1.6) PyTorch checkpoint"
                ) from exc
    obj = _materialise(obj, dtype)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise ValueError(f"{source}: checkpoint is not a flat state dict of tensors")
    return dict(obj)
