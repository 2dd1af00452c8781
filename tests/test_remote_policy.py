"""policy=remote (policy/remote.py) against real servers that misbehave: timeouts, API keys, refusals."""

import asyncio
import socket
import threading
import time

import numpy as np
import pytest
from openpi_client import msgpack_numpy
from websockets.asyncio.server import serve

from policy.remote import RemotePolicy
from policy.simple import ZeroPolicy
from serving import free_port

pytestmark = pytest.mark.timeout(120)


def batch(n, prompts=None):
    rng = np.random.default_rng(0)
    return {"image": rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8),
            "wrist_image": rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8),
            "state": rng.normal(size=(n, 8)).astype(np.float32),
            "prompt": prompts or [f"task {i}" for i in range(n)]}


class SlowServer:
    """An openpi-protocol websocket server on 127.0.0.1 that sends its metadata, then answers only
    observations whose prompt does not start with 'hang' (those it never answers), unless `mute`."""

    def __init__(self, mute=False, metadata=None):
        self.mute = mute
        self.metadata = {"chunk_size": 10} if metadata is None else metadata
        self.connections = 0
        self.port = None
        self._ready = threading.Event()
        self._stop = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _handle(self, ws):
        self.connections += 1
        await ws.send(msgpack_numpy.packb(self.metadata))
        async for message in ws:
            obs = msgpack_numpy.unpackb(message)
            if self.mute or obs["prompt"].startswith("hang"):
                continue  # never answer
            await ws.send(msgpack_numpy.packb({"actions": np.zeros((10, 7), np.float32)}))

    async def _main(self):
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        async with serve(self._handle, "127.0.0.1", 0, compression=None, max_size=None) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    def __enter__(self):
        self.thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)


def _within(seconds, fn):
    """fn() run in a thread; (returned, raised) if it finished within `seconds`, else a failed test."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as exc:  # noqa: BLE001 (the test looks at it)
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still blocked after {seconds} s"
    return out.get("value"), out.get("error"), time.monotonic() - t0


def test_infer_against_a_server_that_never_answers_raises_within_the_timeout():
    with SlowServer(mute=True) as srv:
        policy = RemotePolicy("127.0.0.1", srv.port, timeout_s=0.5)
        _, error, took = _within(15, lambda: policy.infer(batch(3)))
        assert isinstance(error, TimeoutError) and "timeout_s=0.5" in str(error)
        assert took < 3.0
        # the run goes on: the next call reconnects (new connections) and times out the same way
        before = srv.connections
        _, error, _ = _within(15, lambda: policy.infer(batch(3)))
        assert isinstance(error, TimeoutError) and srv.connections == before + 3


def test_a_timed_out_row_is_an_error_row_and_the_rest_are_served():
    with SlowServer() as srv:
        policy = RemotePolicy("127.0.0.1", srv.port, timeout_s=0.5)
        out, error, took = _within(15, lambda: policy.infer(batch(3, ["task 0", "hang 1", "task 2"])))
        assert error is None and took < 3.0
        assert out["actions"].shape == (3, 10, 7)
        assert np.isnan(out["actions"][1]).all() and not np.isnan(out["actions"][[0, 2]]).any()
        assert out["errors"][0] is None and out["errors"][2] is None and "TimeoutError" in out["errors"][1]
        again = policy.infer(batch(3))  # row 1 reconnected; its late reply cannot be mistaken for this one
        assert not np.isnan(again["actions"]).any() and again["errors"] == [None] * 3


def test_connecting_to_a_server_that_never_handshakes_times_out():
    with socket.socket() as listener:  # accepts TCP, says nothing
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        _, error, took = _within(15, lambda: RemotePolicy("127.0.0.1", port, timeout_s=0.5))
    assert isinstance(error, ConnectionError) and "runners.serve" in str(error)
    assert took < 3.0  # not websockets' own 10 s open_timeout


def test_timeouts_become_error_episodes_not_a_hang(tmp_path):
    """The evaluation loop with a server that never answers: every episode ends as an error that
    names the timeout, and the loop returns."""
    from runners.loop import EvaluationLoop, LoopSettings
    from runners.pool import Episode, Reply
    from runners.rundir import ResultsLog

    class Pool:  # two slots that never end on their own, answering at once (runners/pool.py's interface)
        num_envs = 2

        def __init__(self):
            self.replies, self.steps = [], {}

        @staticmethod
        def _obs():
            return {"image": np.zeros((224, 224, 3), np.uint8), "wrist_image": np.zeros((224, 224, 3), np.uint8),
                    "state": np.zeros(8, np.float32)}

        def send_start(self, slot, episode, **_):
            self.steps[slot] = 0
            self.replies.append(Reply(slot, "start", self._obs(), info={"task": "put the bowl on the plate", "step": 0,
                                                                       "error": ""}))

        def send_step(self, slot, action, **_):
            self.steps[slot] += 1
            self.replies.append(Reply(slot, "step", self._obs(), info={"step": self.steps[slot], "error": ""}))

        busy = frozenset()  # every command is answered at once

        def collect(self, wait_for=None, timeout=0.0, wake=None):
            out, self.replies = self.replies, []
            return out

    with SlowServer(mute=True) as srv:
        policy = RemotePolicy("127.0.0.1", srv.port, timeout_s=0.3)
        results = ResultsLog(tmp_path, "test")
        loop = EvaluationLoop(policy, Pool(), results, LoopSettings(max_steps=20))
        episodes = [Episode("libero_spatial", 0, k, 0) for k in range(4)]
        _, error, took = _within(20, lambda: loop.run(episodes))
    assert error is None and took < 5
    assert len(results.records) == 4
    assert all("TimeoutError" in r["error"] and "timeout_s=0.3" in r["error"] for r in results.records.values())


def test_wrong_api_key_is_a_clear_error():
    from test_server import Running

    with Running(ZeroPolicy(), api_key="s3cret") as server:
        with pytest.raises(ConnectionError, match="HTTP 401.*policy.api_key"):
            RemotePolicy("127.0.0.1", server.port, api_key="nope")
        ok = RemotePolicy("127.0.0.1", server.port, api_key="s3cret")
        assert ok.infer(batch(2))["actions"].shape == (2, 10, 7)


def test_an_observation_over_the_servers_limit_is_a_clear_row_error():
    from test_server import Running

    with Running(ZeroPolicy(), max_message_mb=0.2) as server:  # 2 images of 224x224x3 take 0.29 MiB
        policy = RemotePolicy("127.0.0.1", server.port, timeout_s=10)
        with pytest.raises(RuntimeError, match="too big.*max_message_mb"):
            policy.infer(batch(2))


def test_timeout_s_must_be_positive():
    with pytest.raises(ValueError, match="timeout_s"):
        RemotePolicy("127.0.0.1", free_port(), timeout_s=0)


@pytest.mark.parametrize("metadata", [{"identity": "pi05", "extensions": 5, "chunk_size": True},
                                      {"identity": ["a"], "extensions": "episode_step", "chunk_size": -3},
                                      ["not", "a", "dict"]])
def test_a_servers_odd_metadata_does_not_break_the_client(metadata):
    """A server whose metadata said identity='pi05' or extensions=5 crashed the client (AttributeError,
    TypeError) before its first call; it is now identified by its whole metadata and spoken to plainly."""
    with SlowServer(metadata=metadata) as srv:
        policy = RemotePolicy("127.0.0.1", srv.port, timeout_s=5)
        assert "server_metadata" in policy.identity and policy.extensions == set() and policy.chunk_size is None
        out = policy.infer(batch(2))
        assert out["actions"].shape == (2, 10, 7) and out["errors"] == [None, None]
