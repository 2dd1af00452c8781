"""Decoding what clients send: openpi's msgpack-numpy format, checked before numpy sees it.

openpi: openpi_client/msgpack_numpy.py (`pack_array` / `unpack_array`). Its decoder builds arrays
with whatever dtype the sender names (`np.ndarray(buffer=data, dtype=np.dtype(...))`): an object
dtype turns 64 bytes of the client's choosing into pointers and the first read crashes the process
(SIGSEGV). This decoder reads the same format and refuses anything else:

- arrays only of bool, int, uint or float dtypes (no object, void/structured, strings, datetimes,
  complex), named as numpy's `dtype.str` spells them ('<f4', '|u1', '|b1');
- `prod(shape) * itemsize == len(data)` exactly, at most MAX_NDIM dims, none negative;
- numpy scalars (`__npgeneric__`) of the same dtypes, holding a value that fits;
- msgpack's own limits (`max_*_len`, extension types off) plus a cap on how many lists and maps
  one message may hold, so a small message cannot expand into gigabytes of Python objects (a
  million empty lists take a megabyte on the wire and ~60 MB in memory).

What openpi-client's `packb` makes of a real observation decodes to the same arrays as openpi's
own `unpackb` gives (read-only views on the message bytes, as there). Anything refused raises
`WireError`, a ValueError naming what was wrong.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgpack
import numpy as np
from openpi_client.msgpack_numpy import packb  # noqa: F401  (replies: what we send is ours to trust)

MAX_NDIM = 4  # images are (H, W, 3) or (3, H, W); a batch of them would be 4
MAX_ELEMENTS = 1 << 26  # 64 Mi elements: above any image a 32 MiB message can carry at 1 byte each
MAX_CONTAINERS = 1024  # lists + maps in one message; an observation has 3 or 4 maps and 3 lists
MAX_ARRAY_LEN = 1024  # items in one msgpack list (the state as a plain list has 8; images come as arrays)
MAX_MAP_LEN = 64  # entries in one map (an observation has 4, an array 4)
MAX_STR_LEN = 1 << 20  # bytes in one string (prompts, keys, dtype names)

# numpy's dtype.str for bool / signed / unsigned / float, any byte order: what pack_array sends.
_DTYPE = re.compile(r"[<>=|]?[biuf](1|2|4|8)")
_ARRAY_KEYS = {"__ndarray__", "data", "dtype", "shape"}
_GENERIC_KEYS = {"__npgeneric__", "data", "dtype"}


class WireError(ValueError):
    """A message that is not a well-formed, safe msgpack-numpy value."""


def _str_keys(obj: dict) -> dict:
    # pack_array writes bytes keys (b"__ndarray__"); accept str keys too and check them the same way.
    return {(k.decode("ascii", "replace") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _dtype(name: Any) -> np.dtype:
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    if not isinstance(name, str) or not _DTYPE.fullmatch(name):
        raise WireError(f"array dtype {name!r} is not allowed; send bool, int, uint or float arrays "
                        f"(numpy dtype.str such as '<f4' or '|u1')")
    dtype = np.dtype(name)
    if dtype.kind not in "biuf":  # the pattern already implies this; keep numpy's word for it too
        raise WireError(f"array dtype {name!r} is not allowed")
    return dtype


def _array(fields: dict) -> np.ndarray:
    if set(fields) != _ARRAY_KEYS:
        raise WireError(f"an __ndarray__ map must have exactly the keys {sorted(_ARRAY_KEYS)}, got {sorted(map(str, fields))}")
    dtype, shape, data = _dtype(fields["dtype"]), fields["shape"], fields["data"]
    if not isinstance(shape, (list, tuple)) or not all(type(d) is int for d in shape):
        raise WireError(f"array shape must be a list of integers, got {shape!r:.80}")
    if len(shape) > MAX_NDIM or any(d < 0 for d in shape):
        raise WireError(f"array shape {shape!r:.80} is not allowed (at most {MAX_NDIM} dims, none negative)")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise WireError(f"array shape {shape!r:.80} has {count} elements, more than {MAX_ELEMENTS}")
    if not isinstance(data, bytes):
        raise WireError(f"array data must be bytes, got {type(data).__name__}")
    if count * dtype.itemsize != len(data):
        raise WireError(f"array of shape {shape} and dtype {dtype.str} needs {count * dtype.itemsize} bytes, "
                        f"got {len(data)}")
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape)


def _generic(fields: dict) -> np.generic:
    if set(fields) != _GENERIC_KEYS:
        raise WireError(f"an __npgeneric__ map must have exactly the keys {sorted(_GENERIC_KEYS)}, got {sorted(map(str, fields))}")
    dtype, value = _dtype(fields["dtype"]), fields["data"]
    if type(value) not in (bool, int, float):
        raise WireError(f"numpy scalar data must be a bool or a number, got {type(value).__name__}")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if type(value) is not int or not info.min <= value <= info.max:
            raise WireError(f"numpy scalar {value!r} does not fit dtype {dtype.str}")
    return dtype.type(value)


class _Decoder:
    """One message's hooks: they count containers, and turn array maps into checked arrays."""

    def __init__(self):
        self.containers = 0

    def _count(self) -> None:
        self.containers += 1
        if self.containers > MAX_CONTAINERS:
            raise WireError(f"message holds more than {MAX_CONTAINERS} lists and maps; send images and "
                            f"state as numpy arrays (openpi-client's msgpack-numpy)")

    def list_hook(self, items: list) -> list:
        self._count()
        return items

    def object_hook(self, obj: dict) -> Any:
        self._count()
        if b"__ndarray__" in obj or "__ndarray__" in obj:
            return _array(_str_keys(obj))
        if b"__npgeneric__" in obj or "__npgeneric__" in obj:
            return _generic(_str_keys(obj))
        return obj

    @staticmethod
    def ext_hook(code: int, data: bytes):
        raise WireError(f"msgpack extension type {code} is not part of the protocol")


def unpackb(message: bytes) -> Any:
    """Decode one client message; raises WireError (a ValueError) on anything not allowed."""
    if not isinstance(message, (bytes, bytearray, memoryview)):
        raise WireError(f"expected a binary message, got {type(message).__name__}")
    hooks = _Decoder()
    try:
        return msgpack.unpackb(
            message, raw=False, strict_map_key=True, use_list=True, timestamp=0,
            object_hook=hooks.object_hook, list_hook=hooks.list_hook, ext_hook=hooks.ext_hook,
            max_bin_len=len(message), max_str_len=MAX_STR_LEN,
            max_array_len=MAX_ARRAY_LEN, max_map_len=MAX_MAP_LEN, max_ext_len=0)
    except WireError:
        raise
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        # msgpack's own: truncated (OutOfData), ExtraData, FormatError, StackError (nesting past its
        # fixed depth), limits exceeded, invalid UTF-8 in a str, non-str/bytes map keys.
        detail = "nested too deeply" if isinstance(exc, msgpack.StackError) else str(exc)[:200]
        raise WireError(f"could not decode the message as msgpack ({type(exc).__name__}: {detail})") from None
