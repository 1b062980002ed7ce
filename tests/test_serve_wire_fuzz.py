"""Property-based fuzzing of the msgpack-numpy decoder: random bytes, random msgpack values, hostile
marker maps and mutated valid frames either decode to safe values or raise WireError, nothing else.

"Safe" is checked by using every decoded array the way a policy would (repr, tolist, float/str
conversion): an accepted object array or an out-of-range unicode array would crash or raise here.
"""

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eqx_energy.serve import wire

FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

_DTYPES = ["<f4", "<f8", ">f4", "<f2", "|u1", "<i2", ">i4", "<u8", "|b1", "<U3", ">U1",  # allowed
           "|O", "O", "<c8", "<c16", "V8", "|V4", "<M8", "<m8[s]", "|S4", "f4,f4", "(2,)f4", "<f3", "U0", "", "x"]
_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8) \
    | st.binary(max_size=16)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6) | st.binary(max_size=13), inner, max_size=4),
    max_leaves=10,
)
_shapes = st.lists(st.integers(-2, 6) | st.sampled_from([2**31, 2**63, 0]), max_size=10) | _scalars
_markers = st.fixed_dictionaries(
    {b"__ndarray__": st.just(True) | _scalars, b"data": st.binary(max_size=64) | _scalars,
     b"dtype": st.sampled_from(_DTYPES) | _scalars, b"shape": _shapes},
    optional={b"extra": _scalars},
) | st.fixed_dictionaries(
    {b"__npgeneric__": st.just(True), b"data": _scalars, b"dtype": st.sampled_from(_DTYPES) | _scalars},
    optional={b"shape": _shapes},
)


def _use(value) -> None:
    """Read every decoded value as a policy would; an unsafe array would crash or raise here."""
    if isinstance(value, dict):
        for v in value.values():
            _use(v)
    elif isinstance(value, list):
        for v in value:
            _use(v)
    elif isinstance(value, (np.ndarray, np.generic)):
        assert value.dtype.kind in "biufU", value.dtype
        repr(value)
        flat = np.asarray(value).ravel().tolist()
        for x in flat:
            (str(x).encode("utf-8", "surrogatepass") if value.dtype.kind == "U" else float(x))


def _decode(frame: bytes) -> None:
    try:
        value = wire.unpackb(frame)
    except wire.WireError:
        return
    _use(value)


@FUZZ
@given(st.binary(max_size=128))
def test_random_bytes(frame):
    _decode(frame)


@settings(FUZZ, max_examples=100)  # generating nested values is the slow part
@given(_values)
def test_random_msgpack_values(value):
    _decode(msgpack.packb(value))


@FUZZ
@given(st.lists(_markers, min_size=1, max_size=3))
def test_hostile_marker_maps(maps):
    _decode(msgpack.packb({"obs": maps}))


def _valid_frame() -> bytes:
    rng = np.random.default_rng(0)
    return wire.packb({"image": rng.integers(0, 256, (2, 2, 3), dtype=np.uint8),
                       "state": np.arange(3.0, dtype=np.float32), "prompt": "pick", "flags": np.array([True]),
                       "names": np.array(["ab"]), "n": np.int16(3)})


_VALID = _valid_frame()


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, len(_VALID)))
def test_mutated_valid_frames(flips, cut):
    frame = bytearray(_VALID)
    for i, byte in flips:
        frame[i] = byte
    _decode(bytes(frame[:cut]))


@FUZZ
@given(st.sampled_from(_DTYPES), st.lists(st.integers(0, 5), max_size=4), st.integers(-2, 2))
def test_valid_frame_with_changed_dtype_and_shape(dtype, shape, extra_bytes):
    """The state array's dtype string and shape swapped for others, its data kept, grown or cut."""
    data = np.arange(3.0, dtype=np.float32).tobytes()
    data = data + b"\x01" * extra_bytes if extra_bytes >= 0 else data[:extra_bytes]
    _decode(msgpack.packb({"state": {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}}))
