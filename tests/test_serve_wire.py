"""msgpack-numpy wire format: byte for byte against openpi's documented encoding, and round trips.

Expected bytes are written out by hand from the msgpack spec: 0x8N fixmap, 0xaN / 0xbN fixstr,
0xc4 bin8 (openpi's marker keys and array data are bin), 0xc3 true, 0x9N fixarray, 0xcb float64.
"""

import subprocess
import sys
import textwrap
import threading

import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
import websockets.sync.server as ws_server

from eqx_energy.serve import wire
from eqx_energy.serve.client import PolicyClient


def _ndarray_map(data: bytes, dtype: bytes, shape: bytes) -> bytes:
    """openpi's array map, keys in its insertion order: __ndarray__, data, dtype, shape."""
    return (
        b"\x84"
        + b"\xc4\x0b__ndarray__" + b"\xc3"
        + b"\xc4\x04data" + b"\xc4" + bytes([len(data)]) + data
        + b"\xc4\x05dtype" + bytes([0xA0 + len(dtype)]) + dtype
        + b"\xc4\x05shape" + shape
    )  # fmt: skip


def test_observation_bytes_match_openpi_encoding():
    obs = {
        "observation/state": np.array([1.0, -2.0]),
        "observation/image": np.array([[[1, 2, 3]]], dtype=np.uint8),
        "prompt": "pick",
    }
    expected = (
        b"\x83"
        + b"\xb1observation/state"
        + _ndarray_map(bytes.fromhex("000000000000f03f00000000000000c0"), b"<f8", b"\x91\x02")
        + b"\xb1observation/image"
        + _ndarray_map(b"\x01\x02\x03", b"|u1", b"\x93\x01\x01\x03")
        + b"\xa6prompt\xa4pick"
    )
    assert wire.packb(obs) == expected
    assert wire.packer().pack(obs) == expected


def test_scalars_and_metadata_bytes_match_openpi_encoding():
    # np.float32 / np.bool_ are numpy generics -> marker map; np.float64 subclasses float -> plain float64.
    f32 = b"\x83\xc4\x0d__npgeneric__\xc3\xc4\x04data\xcb" + bytes.fromhex("3ff8000000000000") + b"\xc4\x05dtype\xa3<f4"
    assert wire.packb(np.float32(1.5)) == f32
    assert wire.packb(np.bool_(True)) == b"\x83\xc4\x0d__npgeneric__\xc3\xc4\x04data\xc3\xc4\x05dtype\xa3|b1"
    assert wire.packb(np.float64(1.5)) == b"\xcb" + bytes.fromhex("3ff8000000000000")
    assert wire.packb({}) == b"\x80"  # LIBERO's metadata
    assert wire.packb({"reset_pose": [0, 1]}) == b"\x81\xaareset_pose\x92\x00\x01"


def test_array_layouts():
    # Non-contiguous arrays go out in C order; big-endian dtypes keep their byte order; jax arrays
    # encode as the numpy array they hold.
    a = np.arange(6, dtype=np.int16).reshape(2, 3)
    assert wire.packb(a.T) == wire.packb(np.ascontiguousarray(a.T))
    assert wire.packb(a.T) == _ndarray_map(np.ascontiguousarray(a.T).tobytes(), b"<i2", b"\x92\x03\x02")
    big = np.array([1, 258], dtype=">i4")
    assert wire.packb(big) == _ndarray_map(b"\x00\x00\x00\x01\x00\x00\x01\x02", b">i4", b"\x91\x02")
    assert wire.packb(jnp.arange(3.0)) == wire.packb(np.arange(3.0, dtype=np.float32))


@pytest.mark.parametrize(
    "value",
    [
        1,
        1.0,
        "hello",
        [1, 2, 3],
        {"key": [1, 2, 3]},
        np.bool_(True),
        np.int64(7),
        np.float32(0.25),
        np.array(1.0),
        np.array([1, 2, 3], dtype=np.int32),
        np.array(["asdf", "qwer"]),
        np.array([True, False]),
        np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32),
        np.array([np.nan, np.inf, -np.inf]),
        np.zeros((2, 0, 3), dtype=np.uint8),
        {"arr": np.array([1, 2, 3]), "nested": {"arr": np.array([4, 5, 6], dtype=">u2")}},
        [np.array([1, 2]), np.array([3.0, 4.0])],
    ],
)
def test_round_trip(value):
    def check(expected, got):
        if isinstance(expected, dict):
            assert list(expected) == list(got)
            for k in expected:
                check(expected[k], got[k])
        elif isinstance(expected, list):
            assert len(expected) == len(got)
            for e, g in zip(expected, got):
                check(e, g)
        elif isinstance(expected, (np.ndarray, np.generic)):
            assert type(got) is type(expected)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            np.testing.assert_array_equal(got, expected)
        else:
            assert type(got) is type(expected) and got == expected

    check(value, wire.unpackb(wire.packb(value)))


def test_str_and_float64_scalars_decode_as_python_values():
    # They subclass str / float, so msgpack packs them natively, as with openpi's encoder.
    got = wire.unpackb(wire.packb([np.str_("asdf"), np.float64(0.5)]))
    assert got == ["asdf", 0.5] and type(got[0]) is str and type(got[1]) is float


def test_decoded_arrays_are_read_only_views():
    got = wire.unpackb(wire.packb({"a": np.arange(4.0)}))["a"]
    assert not got.flags.writeable
    with pytest.raises(ValueError):
        got[0] = 1.0


@pytest.mark.parametrize("value", [np.array([1 + 2j]), np.array([object()]), np.zeros(2, dtype="V4"), np.complex64(1)])
def test_unsupported_dtypes_raise(value):
    with pytest.raises(ValueError, match="cannot encode an array of dtype"):
        wire.packb({"x": value})


def test_unknown_type_raises():
    with pytest.raises(TypeError, match="cannot encode an object of type set"):
        wire.packb({"x": {1, 2}})


def _frame(**fields) -> bytes:
    """An __ndarray__ map with the given fields (bytes keys), packed by plain msgpack as a hostile sender would."""
    return msgpack.packb({k.encode(): v for k, v in fields.items()})


_OBJECT_FRAME = _frame(__ndarray__=True, data=b"A" * 8, dtype="|O", shape=[])  # 8 bytes read back as a PyObject*


def test_object_dtype_frame_is_refused_and_the_process_survives():
    """Before: numpy built an object array whose pointer was the sender's 8 bytes; printing it segfaulted."""
    code = textwrap.dedent(f"""
        from eqx_energy.serve import wire
        try:
            print(repr(wire.unpackb({_OBJECT_FRAME!r})))
        except wire.WireError as e:
            print("refused:", e)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "refused: dtype '|O' is not allowed" in done.stdout


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (_frame(__ndarray__=True, data=b"\0" * 7, dtype="<f4", shape=[2]),
         "has 7 bytes but shape \\[2\\] of dtype <f4 needs 2 x 4 = 8"),
        (_frame(__ndarray__=True, data=b"\0" * 9, dtype="<f4", shape=[2]), "has 9 bytes"),
        (_frame(__ndarray__=True, data=b"\0" * 8, dtype="<c8", shape=[1]), "dtype '<c8' is not allowed"),
        (_frame(__ndarray__=True, data=b"\0" * 8, dtype="V8", shape=[1]), "dtype 'V8' is not allowed"),
        (_frame(__ndarray__=True, data=b"\0" * 8, dtype="f4,f4", shape=[1]), "dtype 'f4,f4' is not allowed"),
        (_frame(__ndarray__=True, data=b"\0" * 8, dtype="(2,)f4", shape=[1]), "is not allowed"),
        (_frame(__ndarray__=True, data=b"\0" * 8, dtype="<M8", shape=[1]), "is not allowed"),
        (_frame(__ndarray__=True, data=b"\0" * 4, dtype="|S4", shape=[1]), "is not allowed"),
        (_frame(__ndarray__=True, data=b"\0" * 4, dtype="<f3", shape=[1]), "is not allowed"),
        (_frame(__ndarray__=True, data=b"\0" * 4, dtype=4, shape=[1]), "dtype 4 is not allowed"),
        (_frame(__ndarray__=True, data=b"\0" * 4, dtype="<f4", shape=[-1]), "shape must be a list of non-negative"),
        (_frame(__ndarray__=True, data=b"\0" * 4, dtype="<f4", shape=[True]), "non-negative ints"),
        (_frame(__ndarray__=True, data=b"\0" * 4, dtype="<f4", shape=[1.0]), "non-negative ints"),
        (_frame(__ndarray__=True, data=b"\0" * 4, dtype="<f4", shape=1), "non-negative ints"),
        (_frame(__ndarray__=True, data=b"", dtype="<f4", shape=[1] * 8 + [0]), "rank 9 exceeds the limit of 8"),
        (_frame(__ndarray__=True, data=b"", dtype="|u1", shape=[2**40, 2**40, 0]), "exceeds the limit of 67108864"),
        (_frame(__ndarray__=True, data="abcd", dtype="|u1", shape=[4]), "data must be msgpack bin"),
        (_frame(__ndarray__=False, data=b"\0", dtype="|u1", shape=[1]), "b'__ndarray__' False"),
        (_frame(__ndarray__=True, data=b"\0", dtype="|u1"), "must have exactly the fields"),
        (_frame(__ndarray__=True, data=b"\0", dtype="|u1", shape=[1], extra=1), "b'extra'"),
        (_frame(__ndarray__=True, data=b"\xff\xff\xff\xff", dtype="<U1", shape=[1]), "code point 0xffffffff"),
        (_frame(__npgeneric__=True, data=1, dtype="|O"), "dtype '|O' is not allowed"),
        (_frame(__npgeneric__=True, data=300, dtype="|u1"), "300 does not fit dtype |u1"),
        (_frame(__npgeneric__=True, data="1.0", dtype="<f4"), "must be a float; got str"),
        (_frame(__npgeneric__=True, data=1, dtype="|b1"), "must be a bool; got int"),
        (_frame(__npgeneric__=True, data=1, dtype="<i4", shape=[]), "must have exactly the fields"),
        (wire.packb({"a": np.arange(3.0)})[:-3], "malformed msgpack frame"),
        (wire.packb({"a": 1}) + b"\x00", "malformed msgpack frame \\(ExtraData"),
        (b"\xa1\xff", "malformed msgpack frame \\(UnicodeDecodeError"),
        (b"\x81\x01\x00", "malformed msgpack frame"),  # int map key
        (b"\x91" * 5000, "malformed msgpack frame"),  # nesting past msgpack's stack
        ("text", "a frame must be bytes; got str"),
    ],
)
def test_invalid_frames_raise_wire_error(frame, match):
    with pytest.raises(wire.WireError, match=match):
        wire.unpackb(frame)


def test_valid_edge_frames_decode():
    assert wire.unpackb(_frame(__ndarray__=True, data=b"", dtype="<f4", shape=[2, 0, 3])).shape == (2, 0, 3)
    assert wire.unpackb(_frame(__ndarray__=True, data=b"\x01", dtype="|b1", shape=[1] * 8)).ndim == 8
    got = wire.unpackb(_frame(__ndarray__=True, data="hé".encode("utf-32-be"), dtype=">U2", shape=[]))
    assert got.item() == "hé"
    assert wire.unpackb(_frame(__npgeneric__=True, data=-3, dtype="<i2")) == np.int16(-3)


def test_frames_of_many_small_containers_are_refused_within_the_item_budget():
    """16 MiB of one-byte maps would decode to ~10^7 dicts: one long list or many nested ones both stop."""
    with pytest.raises(wire.WireError, match="max_array_len"):
        wire.unpackb(msgpack.packb([{}] * (wire.MAX_ITEMS + 1)))
    with pytest.raises(wire.WireError, match=f"more than {wire.MAX_ITEMS}"):
        wire.unpackb(msgpack.packb([[{"a": 1}] * 1000] * 100))
    within = [[{"a": 1}] * 100] * 100  # 100 + 100 * 100 + 100 * 100 items
    assert wire.unpackb(msgpack.packb(within)) == within


def test_encoder_refuses_what_the_decoder_refuses():
    for value in (np.array([b"ab"]), np.array(["2020-01-01"], dtype="M8[D]")):
        with pytest.raises(ValueError, match="cannot encode an array of dtype"):
            wire.packb(value)


def test_client_refuses_a_hostile_servers_frame():
    """A server whose metadata frame is the object-dtype map: the client raises WireError instead of crashing."""
    with ws_server.serve(lambda ws: ws.send(_OBJECT_FRAME), "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        with pytest.raises(wire.WireError, match="dtype '\\|O' is not allowed"):
            PolicyClient("127.0.0.1", server.socket.getsockname()[1], wait_s=5.0)
        server.shutdown()
