"""msgpack with numpy arrays, encoded exactly as openpi's `openpi_client.msgpack_numpy` does.

An `np.ndarray` becomes the map (marker keys are msgpack *bin*, ordinary keys stay str)

    {b"__ndarray__": True, b"data": arr.tobytes(), b"dtype": arr.dtype.str, b"shape": arr.shape}

with the data in C order, e.g. dtype strings "<f4", "|u1", "<f8", "|b1". A numpy scalar that msgpack
cannot pack natively becomes {b"__npgeneric__": True, b"data": x.item(), b"dtype": x.dtype.str};
`np.float64` and `np.str_` subclass Python's float and str, so msgpack packs them as plain values
(as openpi's encoder does). Only bool, integer, float and unicode dtypes (kinds b, i, u, f, U) are
carried, both ways. A `jax.Array` is packed as the numpy array it holds, so a policy may return
device arrays.

Decoding turns the marker maps back into read-only numpy arrays (views of the received bytes)
and numpy scalars; everything else decodes as msgpack's defaults (str keys, lists). The bytes come
from the other end of a socket, so decoding trusts nothing: a marker map must have exactly its
fields with their types, a dtype string of an allowed kind, a shape of at most `MAX_RANK`
non-negative ints and `MAX_ELEMENTS` elements, data of exactly prod(shape) * itemsize bytes, and
unicode arrays only valid code points; maps and lists hold at most `MAX_ITEMS` entries in all. Anything else, malformed msgpack included, raises
`WireError` naming the problem, with the sender's values shortened by reprlib (the message goes
back to the sender). Unchecked, numpy would build object arrays of raw pointers from the sender's
bytes, and the first read of one crashes the process.
"""

import math
import re
import reprlib
from typing import Any

import jax
import msgpack
import numpy as np

MAX_RANK = 8
MAX_ELEMENTS = 64 * 2**20
MAX_ITEMS = 2**16
"""Map entries plus list elements in one frame: an observation has a few keys, its arrays travel as bin. Without
a cap, 16 MiB of one-byte maps decode to ~10^7 Python dicts (about 70x the frame in memory)."""
_KINDS = "biufU"  # bool, signed and unsigned integer, float, unicode
_DTYPE_STR = re.compile(r"[<>|=]?[biufU][1-9][0-9]{0,8}")  # dtype.str forms: "<f4", "|u1", ">i2", "<U5"
_SCALAR_TYPES = {"b": bool, "i": int, "u": int, "f": float, "U": str}  # what msgpack decodes x.item() to
_ARRAY_FIELDS = {b"__ndarray__", b"data", b"dtype", b"shape"}
_GENERIC_FIELDS = {b"__npgeneric__", b"data", b"dtype"}
_MAX_CODE_POINT = 0x10FFFF


class WireError(ValueError):
    """Bytes that are not a frame of openpi's msgpack-numpy format within this decoder's limits."""


def pack_array(obj: Any) -> Any:
    """msgpack `default` hook: numpy/jax arrays and numpy scalars -> openpi's marker maps."""
    if isinstance(obj, jax.Array):
        obj = np.asarray(obj)
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind not in _KINDS:
        raise ValueError(
            f"cannot encode an array of dtype {obj.dtype} (kind {obj.dtype.kind!r}): openpi's wire format as "
            f"this package speaks it carries only the kinds {list(_KINDS)} (bool, integer, float, unicode); "
            "convert it first, e.g. split complex values into real and imaginary arrays"
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


def _check_fields(obj: dict, marker: bytes, fields: set[bytes]) -> None:
    if set(obj) != fields or obj[marker] is not True:
        raise WireError(
            f"a {marker.decode()} map must have exactly the fields {sorted(fields)} with {marker!r} True; "
            f"got the fields {reprlib.repr(list(obj))} and {marker!r} {reprlib.repr(obj[marker])}"
        )


def _dtype(name: Any) -> np.dtype:
    """The numpy dtype a dtype string names, when it is of an allowed kind."""
    try:
        dtype = np.dtype(name) if isinstance(name, str) and _DTYPE_STR.fullmatch(name) else None
    except TypeError:  # well-formed but unknown, e.g. "<f3"
        dtype = None
    if dtype is None or dtype.kind not in _KINDS:
        raise WireError(
            f"dtype {reprlib.repr(name)} is not allowed: send a numpy dtype string of kind {list(_KINDS)} "
            "(bool, integer, float, unicode) such as '<f4', '|u1' or '<U8'"
        )
    return dtype


def _array(obj: dict) -> np.ndarray:
    _check_fields(obj, b"__ndarray__", _ARRAY_FIELDS)
    data, shape = obj[b"data"], obj[b"shape"]
    if not isinstance(data, bytes):
        raise WireError(f"__ndarray__ data must be msgpack bin (bytes); got {type(data).__name__}")
    if not (isinstance(shape, (list, tuple)) and all(type(d) is int and d >= 0 for d in shape)):
        raise WireError(f"__ndarray__ shape must be a list of non-negative ints; got {reprlib.repr(shape)}")
    if len(shape) > MAX_RANK:
        raise WireError(f"__ndarray__ rank {len(shape)} exceeds the limit of {MAX_RANK} dims")
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:  # a 0 dim counts as 1: numpy still sizes the rest
        raise WireError(f"__ndarray__ shape {shape} exceeds the limit of {MAX_ELEMENTS} elements")
    size = math.prod(shape)
    dtype = _dtype(obj[b"dtype"])
    if len(data) != size * dtype.itemsize:
        raise WireError(
            f"__ndarray__ data has {len(data)} bytes but shape {shape} of dtype {dtype.str} needs "
            f"{size} x {dtype.itemsize} = {size * dtype.itemsize}"
        )
    if dtype.kind == "U":  # numpy turns any 32-bit word into a str, even past U+10FFFF (an invalid str)
        codes = np.frombuffer(data, np.dtype("u4").newbyteorder(dtype.byteorder))
        if codes.size and codes.max() > _MAX_CODE_POINT:
            raise WireError(f"__ndarray__ of dtype {dtype.str} holds code point {int(codes.max()):#x} > U+10FFFF")
    return np.ndarray(buffer=data, dtype=dtype, shape=shape)


def _generic(obj: dict) -> np.generic:
    _check_fields(obj, b"__npgeneric__", _GENERIC_FIELDS)
    dtype, data = _dtype(obj[b"dtype"]), obj[b"data"]
    if type(data) is not _SCALAR_TYPES[dtype.kind]:
        raise WireError(f"__npgeneric__ data of dtype {dtype.str} must be a {_SCALAR_TYPES[dtype.kind].__name__}; "
                        f"got {type(data).__name__}")
    try:
        return dtype.type(data)
    except OverflowError:
        raise WireError(f"__npgeneric__ data {data!r} does not fit dtype {dtype.str}") from None


def unpack_array(obj: dict) -> Any:
    """msgpack `object_hook`: openpi's marker maps -> numpy arrays and scalars; other maps unchanged."""
    if b"__ndarray__" in obj:
        return _array(obj)
    if b"__npgeneric__" in obj:
        return _generic(obj)
    return obj


class _ItemBudget:
    """msgpack hooks that count every decoded map entry and list element against `MAX_ITEMS`; the count
    grows as each container completes, so a frame of many small containers stops after ~MAX_ITEMS objects."""

    def __init__(self):
        self.items = 0

    def _spend(self, n: int) -> None:
        self.items += n
        if self.items > MAX_ITEMS:
            raise WireError(f"frame holds more than {MAX_ITEMS} map entries and list elements in all")

    def map(self, obj: dict) -> Any:
        self._spend(len(obj))
        return unpack_array(obj)

    def list(self, obj: list) -> list:
        self._spend(len(obj))
        return obj


def packer() -> msgpack.Packer:
    """A reusable packer (`packer().pack(obj) -> bytes`), as a connection keeps one."""
    return msgpack.Packer(default=pack_array)


def packb(obj: Any) -> bytes:
    """Encode `obj` (dicts, lists, scalars, str, numpy/jax arrays) as openpi's msgpack bytes."""
    return msgpack.packb(obj, default=pack_array)


def unpackb(data: Any) -> Any:
    """Decode openpi msgpack bytes; arrays come back as read-only numpy views of `data`.
    Raises WireError for anything that is not a valid frame (a text frame included; see the module docstring)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"a frame must be bytes; got {type(data).__name__}")
    budget = _ItemBudget()
    try:
        return msgpack.unpackb(data, object_hook=budget.map, list_hook=budget.list,
                               max_map_len=MAX_ITEMS, max_array_len=MAX_ITEMS)
    except WireError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as e:  # msgpack's: truncated, extra data, bad utf-8, ...
        raise WireError(f"malformed msgpack frame ({type(e).__name__}: {e})") from e
