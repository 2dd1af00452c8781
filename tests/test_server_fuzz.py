"""Fuzzing a real `python -m runners.serve policy=zero` with hostile and mutated messages (issue #14).

Seeded (FUZZ_SEED, default 0; a failure prints the case number, its kind and its bytes' start), so a
failure reproduces. Each case goes out on a fresh connection; its outcome must be one of:
  - an actions reply (the message happened to be a valid observation),
  - a text reply starting with "bad request" and then the connection closes,
  - a close by websockets itself for a protocol-level fault (1009 too big, 1007 bad UTF-8 text),
and never a hang, a "policy error", an internal error (1011) or a dead server. After every group of
cases a healthy openpi-client gets actions, and the server's RSS stays under its warm RSS plus
RSS_SLACK_MB: every case but one is under 1 MiB on the wire, the decoder caps what a message may
expand into, and the one oversize case is refused from its frame header, unread; growth past the
slack would be a leak or an unbounded buffer.
"""

import math
import os
import random
import struct
import time

import msgpack
import numpy as np
import pytest
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from serving import ServeProcess, observation

pytestmark = pytest.mark.timeout(180)

CASES = 2000
GROUP = 50
RSS_SLACK_MB = 64
SEED = int(os.environ.get("FUZZ_SEED", "0"))

DTYPES = ["|u1", "<f4", "<f8", "|b1", "<i8", ">f4", "<f2", "|O", "|V8", "<U4", "|S3", "<M8[s]", "<c16", "(2,)<f4",
          "<f16", "O", "V", "", "garbage", "|u1|u1", "<i4,<f4", "f4" * 100]


def _valid(rng):
    side = rng.choice([16, 64, 224])
    return {"observation/image": np.full((side, side, 3), rng.randrange(256), np.uint8),
            "observation/wrist_image": np.zeros((224, 224, 3), np.uint8),
            "observation/state": np.array([rng.uniform(-1, 1) for _ in range(8)], np.float32),
            "prompt": "pick up the bowl"}


def _hostile_array(rng):
    dtype = rng.choice(DTYPES)
    if rng.random() < 0.5:  # sizes consistent with the dtype: past numpy's own buffer-size check
        shape = [rng.choice([1, 3, 8]) for _ in range(rng.choice([1, 1, 2, 3]))]
        try:
            itemsize = np.dtype(dtype).itemsize
        except Exception:  # noqa: BLE001 (not a dtype numpy knows: any size will do)
            itemsize = 4
        n = math.prod(shape) * itemsize
    else:
        ndim = rng.choice([0, 1, 2, 3, 4, 5, 9])
        shape = [rng.choice([0, 1, 3, 8, 224, -1, -2**63, 2**31, 2**63 - 1, 2**64 - 1]) for _ in range(ndim)]
        try:
            size = math.prod(shape) * max(1, np.dtype(dtype).itemsize) if all(0 <= d < 4096 for d in shape) else 0
        except TypeError:
            size = 0
        n = rng.choice([size, max(0, size - 1), size + 1, 0, 64, 1000]) if size < 2**20 else 64
    arr = {b"__ndarray__": True, b"data": bytes(rng.getrandbits(8) for _ in range(min(n, 4096))) + b"\0" * max(0, n - 4096),
           b"dtype": dtype, b"shape": shape}
    mutate = rng.random()
    if mutate < 0.1:
        arr[b"data"] = "not bytes"
    elif mutate < 0.2:
        arr[b"shape"] = rng.choice([None, "3", 3.5, [True, 2], [[1]], {"a": 1}])
    elif mutate < 0.25:
        del arr[b"dtype"]
    elif mutate < 0.3:
        arr = {"__ndarray__": True, "data": arr[b"data"], "dtype": dtype, "shape": shape}  # str keys
    elif mutate < 0.4:
        arr = {b"__npgeneric__": True, b"data": rng.choice([1, -1, 2**64 - 1, -2**63, 1e308, float("nan"), "x", None,
                                                             b"\x00", True]), b"dtype": dtype}
    return arr


def _odd_value(rng):
    return rng.choice([None, True, 0, -1, 2**64 - 1, -2**63, 1e308, float("nan"), float("inf"), "", "x" * 20000,
                       b"\xff\xfe", [], [1] * 8, [float("nan")] * 8, ["a"] * 8, [[1, 2]] * 8, {}, {"a": 1},
                       [None] * 8, _hostile_array(rng)])


def _structured(rng):
    obs = _valid(rng)
    kind = rng.random()
    keys = list(obs)
    if kind < 0.45:  # the state most often: it is the array the server reads element by element
        obs[rng.choice(keys + ["observation/state"] * 3)] = _hostile_array(rng)
    elif kind < 0.7:
        obs[rng.choice(keys)] = _odd_value(rng)
    elif kind < 0.78:
        del obs[rng.choice(keys)]
    elif kind < 0.86:  # images of odd shapes and dtypes, state of odd values: checks after decoding
        which = rng.choice(["observation/image", "observation/wrist_image"])
        obs[which] = rng.choice([np.zeros((1, 5000, 3), np.uint8), np.zeros((0, 0, 3), np.uint8),
                                 np.zeros((3, 20, 20), np.float32), np.full((8, 8, 3), np.nan, np.float32),
                                 np.full((8, 8, 3), 1e30, np.float64), np.zeros((8, 8, 3), np.bool_),
                                 np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.int64),
                                 np.zeros((2, 8, 8, 3), np.uint8), np.zeros(3, np.uint8)])
    elif kind < 0.94:
        obs["observation/state"] = rng.choice([np.full(8, np.nan, np.float32), np.full(8, 1e300), np.zeros(7),
                                               np.zeros((8, 1)), np.full(8, np.inf, np.float32), np.zeros(8, bool),
                                               np.arange(8, dtype=np.uint64) * (2**63)])
    else:
        obs["prompt"] = rng.choice([b"\xff\xfe\xfd", b"ok bytes", "\ud800".encode("utf-8", "surrogatepass"),
                                    "x" * 10_001, 17, ["a"], "\u00e9\u4e2d" * 50])
    return msgpack_numpy.packb(obs)


def _mutated(rng):
    data = bytearray(msgpack_numpy.packb(_valid(rng)))
    for _ in range(rng.choice([1, 2, 5, 20])):
        op, i = rng.random(), rng.randrange(len(data))
        if op < 0.4:
            data[i] = rng.randrange(256)
        elif op < 0.6:
            del data[i:i + rng.randrange(1, 64)]
        elif op < 0.8:
            data[i:i] = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 16)))
        else:
            data = data[:i]  # truncated
            break
    return bytes(data)


def _structural(rng):
    depth = rng.choice([10, 500, 1023, 1024, 5000, 100_000])
    return rng.choice([
        b"\x91" * depth + b"\xc0",  # nested lists
        b"\x81\xa1a" * min(depth, 20000) + b"\xc0",  # nested maps
        b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 G items
        b"\xdf\xff\xff\xff\xff",  # map32 claiming 4 G entries
        b"\xc6\xff\xff\xff\xff" + b"A" * 100,  # bin32 claiming 4 GiB
        b"\xdb\xff\xff\xff\xff" + b"A" * 100,  # str32 claiming 4 GiB
        b"\xc9\x7f\xff\xff\xff\x01" + b"A" * 10,  # ext32
        b"\xd7\xff" + b"\0" * 8,  # timestamp ext
        b"\xcf" + struct.pack(">Q", 2**64 - 1),  # a lone huge int
        msgpack.packb([[]] * 1000 + [[]] * 24 + [{}]),  # many containers
        msgpack.packb({str(i): i for i in range(200)}),  # a wide map
        msgpack.packb([0] * 100_000),  # a long array
        msgpack.packb({"observation/state": [1.0] * 8}) + b"\x00",  # trailing bytes
        msgpack_numpy.packb({**_valid(rng), "prompt": "\0\0\0"}).replace(b"\xa3\0\0\0", b"\xa3\xff\xfe\xfd"),  # bad UTF-8 str
        bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 2000))),  # random bytes
    ])


def _case(rng):
    """(kind, list of frames to send); a frame is bytes (binary) or str (text) or ("text-bytes", b)."""
    r = rng.random()
    if r < 0.05:
        return "valid", [msgpack_numpy.packb(_valid(rng))]
    if r < 0.35:
        return "structured", [_structured(rng)]
    if r < 0.6:
        return "mutated", [_mutated(rng)]
    if r < 0.8:
        return "structural", [_structural(rng)]
    if r < 0.85:
        return "text", [rng.choice(["", "hello", "{}", "\u0000" * 100, "x" * 70000])]
    if r < 0.88:
        return "empty", [b""]
    if r < 0.9:
        return "bad-utf8-text", [("text-bytes", b"\xff\xfe" * rng.randrange(1, 100))]
    if r < 0.95:
        return "pipelined", [msgpack_numpy.packb(_valid(rng)), _mutated(rng)]
    return "leaves", [msgpack_numpy.packb(_valid(rng))]  # sends and disconnects without reading


def _run_case(port, kind, frames):
    """Sends the frames on a fresh connection and checks what comes back; returns a short outcome."""
    ws = connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None, open_timeout=10, close_timeout=2)
    try:
        msgpack_numpy.unpackb(ws.recv(timeout=10))  # metadata
        for f in frames:
            if isinstance(f, tuple):
                ws.send(f[1], text=True)
            else:
                ws.send(f)
        if kind == "leaves":
            return "left"
        for _ in frames:
            try:
                reply = ws.recv(timeout=10)
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                assert code in (1007, 1009, 1003), f"closed with {code} ({exc})"
                return f"closed {code}"
            if isinstance(reply, str):
                assert reply.startswith("bad request"), reply
                return "refused"
            assert msgpack_numpy.unpackb(reply)["actions"].shape == (10, 7)
        return "served"
    finally:
        ws.close()


def test_fuzz_a_real_server_with_hostile_messages():
    rng = random.Random(SEED)
    t_start = time.monotonic()
    with ServeProcess() as srv:
        healthy = WebsocketClientPolicy("127.0.0.1", srv.port)
        for k in range(20):  # warm up: code paths, allocator arenas, resize of a few image sizes
            healthy.infer(observation(k))
            _run_case(srv.port, "valid", [msgpack_numpy.packb(_valid(rng))])
        # one message over max_message_mb (32 MiB): refused from its header with 1009
        over = bytes(33 * 2**20)
        assert _run_case(srv.port, "oversize", [over]) == "closed 1009"
        del over
        warm_kb = srv.rss_kb()
        outcomes, peak_kb = {}, warm_kb
        for k in range(CASES):
            kind, frames = _case(rng)
            try:
                outcome = _run_case(srv.port, kind, frames)
            except Exception as exc:
                head = frames[0][:60] if not isinstance(frames[0], tuple) else frames[0][1][:60]
                raise AssertionError(f"FUZZ_SEED={SEED} case {k} ({kind}, starts {head!r}): {exc}\n"
                                     f"server alive: {srv.alive()}") from exc
            outcomes[(kind, outcome)] = outcomes.get((kind, outcome), 0) + 1
            if (k + 1) % GROUP == 0:
                assert srv.alive(), f"server died by case {k}:\n{srv.output()}"
                assert healthy.infer(observation(k))["actions"].shape == (10, 7)
                peak_kb = max(peak_kb, srv.rss_kb())
                assert peak_kb < warm_kb + RSS_SLACK_MB * 1024, \
                    f"RSS grew from {warm_kb // 1024} to {peak_kb // 1024} MiB by case {k}"
        assert srv.terminate(30) == 0
    took = time.monotonic() - t_start
    print(f"\n{CASES} cases in {took:.1f} s; RSS warm {warm_kb / 1024:.0f} MiB, peak {peak_kb / 1024:.0f} MiB; outcomes:")
    for key in sorted(outcomes):
        print(f"  {key}: {outcomes[key]}")
    # the cases must exercise every outcome, or the fuzzer is not fuzzing what it claims
    kinds = {o for _, o in outcomes}
    assert {"served", "refused", "left"} <= kinds and any(o.startswith("closed") for o in kinds)
    assert sum(outcomes.values()) == CASES
