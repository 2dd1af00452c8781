"""policy/wire.py: openpi-client's messages decode as openpi's decoder decodes them; hostile ones
are refused with a WireError that names the problem (and never reach numpy's unchecked paths)."""

import msgpack
import numpy as np
import pytest
from openpi_client import msgpack_numpy

from policy import wire


def _arr(dtype, shape, data):
    return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}


def test_openpi_packb_of_real_observations_decodes_identically():
    rng = np.random.default_rng(0)
    obs = {
        "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image": rng.random((3, 224, 224), dtype=np.float32),
        "observation/state": rng.normal(size=8).astype(np.float32),
        "prompt": "put both the alphabet soup and the tomato sauce in the basket",
        "extras": [np.arange(6, dtype=">i2").reshape(2, 3), np.zeros((0, 4)), np.array(True), np.float64(2.5),
                   np.int8(-3), np.uint64(2**64 - 1), np.bool_(False), np.float16(1.5), {"nested": np.ones(2, "<u4")}],
    }
    packed = msgpack_numpy.packb(obs)
    ours, theirs = wire.unpackb(packed), msgpack_numpy.unpackb(packed)

    def same(a, b):
        assert type(a) is type(b)
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            for k in a:
                same(a[k], b[k])
        elif isinstance(a, list):
            assert len(a) == len(b)
            for x, y in zip(a, b):
                same(x, y)
        elif isinstance(a, (np.ndarray, np.generic)):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        else:
            assert a == b

    same(ours, theirs)


@pytest.mark.parametrize("value, message", [
    (_arr("|O", [8], b"A" * 64), "'|O' is not allowed"),
    (_arr("|V8", [1], b"A" * 8), "'|V8' is not allowed"),
    (_arr([["a", "<f4"]], [1], b"A" * 4), "is not allowed"),  # structured, as numpy's list form
    (_arr("|S4", [1], b"AAAA"), "'|S4' is not allowed"),
    (_arr("<U1", [1], b"AAAA"), "'<U1' is not allowed"),
    (_arr("<M8[s]", [1], b"A" * 8), "is not allowed"),
    (_arr("<c8", [1], b"A" * 8), "'<c8' is not allowed"),
    (_arr("(2,)<f4", [1], b"A" * 8), "is not allowed"),  # subarray dtype
    (_arr("<f16", [1], b"A" * 16), "is not allowed"),
    (_arr(7, [1], b"A"), "is not allowed"),
    (_arr("<f8", [9], b"A" * 64), "needs 72 bytes, got 64"),
    (_arr("<f8", [2**62, 2**62], b""), "elements, more than"),
    (_arr("|u1", [-1], b""), "none negative"),
    (_arr("|u1", [1, 1, 1, 1, 1], b"A"), "at most 4 dims"),
    (_arr("|u1", [True], b"A"), "list of integers"),
    (_arr("|u1", 3, b"AAA"), "list of integers"),
    (_arr("|u1", [1.0], b"A"), "list of integers"),
    (_arr("|u1", [1], "A"), "data must be bytes"),
    ({**_arr("|u1", [1], b"A"), b"extra": 1}, "exactly the keys"),
    ({"__ndarray__": True, "data": b"A" * 8, "dtype": "|O", "shape": [1]}, "'|O' is not allowed"),  # str keys
    ({b"__npgeneric__": True, b"data": 1, b"dtype": "|O"}, "'|O' is not allowed"),
    ({b"__npgeneric__": True, b"data": 300, b"dtype": "|i1"}, "does not fit"),
    ({b"__npgeneric__": True, b"data": 1e300, b"dtype": "<i8"}, "does not fit"),
    ({b"__npgeneric__": True, b"data": "x", b"dtype": "<f8"}, "bool or a number"),
    ({b"__npgeneric__": True, b"data": 1}, "exactly the keys"),
])
def test_hostile_arrays_are_refused(value, message):
    with pytest.raises(wire.WireError) as info:
        wire.unpackb(msgpack.packb({"observation/state": value}))
    assert message in str(info.value)


@pytest.mark.parametrize("payload, message", [
    (b"", "incomplete"),
    (msgpack.packb({"a": b"x" * 100})[:-10], "incomplete"),  # truncated
    (b"\xc1", "FormatError"),  # a byte msgpack never uses
    (b"\x91" * 5000, "nested too deeply"),
    (b"\xdd\xff\xff\xff\xff", "exceeds max_array_len"),  # an array header claiming 4 G items
    (b"\xdf\xff\xff\xff\xff", "exceeds max_map_len"),
    (msgpack.packb([[[]] * 1000, [[]] * 1000]), "more than 1024 lists and maps"),
    (msgpack.packb(msgpack.ExtType(3, b"x")), "max_ext_len"),
    (msgpack.packb({1: 2}), "not allowed for map key"),
    (b"\xa3\xff\xfe\xfd", "UnicodeDecodeError"),
    (msgpack.packb("x" * (2 << 20)), "exceeds max_str_len"),
    (msgpack.packb({"a": 1}) + b"\x00", "ExtraData"),
])
def test_malformed_msgpack_is_refused(payload, message):
    with pytest.raises(wire.WireError) as info:
        wire.unpackb(payload)
    assert message in str(info.value)


def test_text_is_not_a_message():
    with pytest.raises(wire.WireError, match="binary"):
        wire.unpackb("hello")
