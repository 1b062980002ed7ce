"""msgpack with numpy arrays, encoded exactly as openpi's `openpi_client.msgpack_numpy` does.

An `np.ndarray` becomes the map (marker keys are msgpack *bin*, ordinary keys stay str)

    {b"__ndarray__": True, b"data": arr.tobytes(), b"dtype": arr.dtype.str, b"shape": arr.shape}

with the data in C order, e.g. dtype strings "<f4", "|u1", "<f8", "|b1". A numpy scalar that msgpack
cannot pack natively becomes {b"__npgeneric__": True, b"data": x.item(), b"dtype": x.dtype.str};
`np.float64` and `np.str_` subclass Python's float and str, so msgpack packs them as plain values
(as openpi's encoder does). Complex, object and void dtypes are refused. A `jax.Array` is packed
as the numpy array it holds, so a policy may return device arrays.

Decoding turns the marker maps back into read-only numpy arrays (views of the received bytes)
and numpy scalars; everything else decodes as msgpack's defaults (str keys, lists).
"""

from typing import Any

import jax
import msgpack
import numpy as np

_UNSUPPORTED_KINDS = {"V": "void", "O": "object", "c": "complex"}


def pack_array(obj: Any) -> Any:
    """msgpack `default` hook: numpy/jax arrays and numpy scalars -> openpi's marker maps."""
    if isinstance(obj, jax.Array):
        obj = np.asarray(obj)
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in _UNSUPPORTED_KINDS:
        raise ValueError(
            f"cannot encode an array of dtype {obj.dtype} ({_UNSUPPORTED_KINDS[obj.dtype.kind]}): openpi's "
            "wire format carries only bool, integer, float and string dtypes; convert it first, e.g. "
            "split complex values into real and imaginary arrays"
        )
    if isinstance(obj, np.ndarray):
        return {
            b"__ndarray__": True,
            b"data": obj.tobytes(),
            b"dtype": obj.dtype.str,
            b"shape": obj.shape,
        }
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(
        f"cannot encode an object of type {type(obj).__name__}: the wire format carries msgpack "
        "values (None, bool, int, float, str, bytes, list, dict) and numpy/jax arrays"
    )


def unpack_array(obj: dict) -> Any:
    """msgpack `object_hook`: openpi's marker maps -> numpy arrays and scalars; other maps unchanged."""
    if b"__ndarray__" in obj:
        return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"dtype"]), shape=obj[b"shape"])
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


def packer() -> msgpack.Packer:
    """A reusable packer (`packer().pack(obj) -> bytes`), as a connection keeps one."""
    return msgpack.Packer(default=pack_array)


def packb(obj: Any) -> bytes:
    """Encode `obj` (dicts, lists, scalars, str, numpy/jax arrays) as openpi's msgpack bytes."""
    return msgpack.packb(obj, default=pack_array)


def unpackb(data: bytes) -> Any:
    """Decode openpi msgpack bytes; arrays come back as read-only numpy views of `data`."""
    return msgpack.unpackb(data, object_hook=unpack_array)
