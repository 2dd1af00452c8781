"""The policy server against the real openpi-client, on loopback only, bounded in time."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.sync.client import connect

from policy.simple import ZeroPolicy
from runners.server import PolicyServer

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


class Running:
    """A PolicyServer on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, policy, **kw):
        self.server = PolicyServer(policy, host="127.0.0.1", port=0, **kw)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.run()), daemon=True)

    def __enter__(self):
        self.thread.start()
        assert self.server.started.wait(30), "server did not start"
        return self.server

    def __exit__(self, *exc):
        self.server.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()


def observation(seed=0, prompt="pick up the black bowl and place it on the plate"):
    rng = np.random.default_rng(seed)
    return {"observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "observation/state": rng.normal(size=8).astype(np.float32), "prompt": prompt}


def test_openpi_client_gets_well_formed_actions():
    with Running(ZeroPolicy()) as server:
        client = WebsocketClientPolicy("127.0.0.1", server.port)
        meta = client.get_server_metadata()
        assert meta["chunk_size"] == 10 and meta["action_dim"] == 7
        first = client.infer(observation())
        assert first["actions"].shape == (10, 7) and first["actions"].dtype == np.float32
        assert (first["actions"][:, -1] == -1).all() and (first["actions"][:, :6] == 0).all()
        assert "infer_ms" in first["server_timing"] and "infer_ms" in first["policy_timing"]
        second = client.infer(observation(1))
        assert "prev_total_ms" in second["server_timing"]
        assert list(server.batch_sizes) == [1, 1]
        assert list(server.close_reasons) == ["everyone-in"] * 2  # a lone client never waits for the window


def test_eight_concurrent_clients_are_all_served_and_batched():
    with Running(ZeroPolicy(delay_s=0.05), window_ms=50) as server:
        clients = [WebsocketClientPolicy("127.0.0.1", server.port) for _ in range(8)]
        results = {}

        def work(k):
            results[k] = [clients[k].infer(observation(k, prompt=f"task {k}"))["actions"] for _ in range(3)]

        threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(results) == list(range(8)) and all(len(v) == 3 for v in results.values())
        assert sum(server.batch_sizes) == 24 and max(server.batch_sizes) > 1


def test_each_client_gets_its_own_rows_back():
    class EchoPolicy(ZeroPolicy):  # actions carry the prompt's number, so a mix-up would show
        def infer(self, batch):
            time.sleep(0.02)
            out = super().infer(batch)
            out["actions"][..., 0] = np.array([float(p.split()[-1]) / 100 for p in batch["prompt"]])[:, None]
            return out

    with Running(EchoPolicy(), window_ms=100) as server:
        clients = [WebsocketClientPolicy("127.0.0.1", server.port) for _ in range(6)]
        got = {}
        threads = [threading.Thread(target=lambda k=k: got.__setitem__(k, clients[k].infer(
            observation(k, prompt=f"task {k}"))["actions"])) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for k in range(6):
            assert np.allclose(got[k][:, 0], k / 100)


def _raw(port):
    ws = connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None)
    msgpack_numpy.unpackb(ws.recv())  # metadata
    return ws


@pytest.mark.parametrize("payload, message", [
    (b"\x00garbage", "could not decode"),
    (msgpack_numpy.packb({"observation/image": np.zeros((224, 224, 3), np.uint8)}), "missing"),
    (msgpack_numpy.packb({**observation(), "observation/state": np.zeros(3, np.float32)}), "observation/state"),
    (msgpack_numpy.packb({**observation(), "observation/image": np.zeros((224, 224), np.uint8)}), "(H, W, 3)"),
])
def test_malformed_messages_get_an_error_and_the_server_goes_on(payload, message):
    from websockets.exceptions import ConnectionClosed

    with Running(ZeroPolicy()) as server:
        ws = _raw(server.port)
        ws.send(payload)
        reply = ws.recv(timeout=10)
        assert isinstance(reply, str) and message in reply
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        # the server still serves others
        assert WebsocketClientPolicy("127.0.0.1", server.port).infer(observation())["actions"].shape == (10, 7)


def test_openpi_client_raises_the_servers_error_text():
    with Running(ZeroPolicy()) as server:
        client = WebsocketClientPolicy("127.0.0.1", server.port)
        with pytest.raises(RuntimeError, match="observation/state"):
            client.infer({**observation(), "observation/state": np.zeros(2, np.float32)})


def test_a_client_leaving_mid_request_does_not_disturb_others():
    with Running(ZeroPolicy(delay_s=0.3), window_ms=100) as server:
        leaver = _raw(server.port)
        stayer = WebsocketClientPolicy("127.0.0.1", server.port)
        leaver.send(msgpack_numpy.packb(observation(0)))
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("a", stayer.infer(observation(1))))
        t.start()
        time.sleep(0.05)
        leaver.close()
        t.join(30)
        assert out["a"]["actions"].shape == (10, 7)
        assert stayer.infer(observation(2))["actions"].shape == (10, 7)


def test_health_check():
    with Running(ZeroPolicy()) as server:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as r:
            assert r.status == 200 and r.read() == b"OK\n"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_answers_requests_in_flight_then_exits():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "runners.serve", "policy=zero", "+policy.delay_s=1.0",
                             "host=127.0.0.1", f"port={port}"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "server did not come up"
                time.sleep(0.2)
        client = WebsocketClientPolicy("127.0.0.1", port)
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("reply", client.infer(observation())))
        t.start()
        time.sleep(0.3)  # the request is inside the 1 s policy call
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert out["reply"]["actions"].shape == (10, 7)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_remote_policy_refuses_early_when_no_server_listens():
    from policy.remote import RemotePolicy

    with pytest.raises(ConnectionError, match="runners.serve"):
        RemotePolicy("127.0.0.1", _free_port())


def test_remote_evaluation_equals_the_in_process_one(tmp_path, tiny_checkpoint, spm_tokenizer):
    """The same Pi0.5 (tiny, seeded noise) in-process and behind the server: identical actions reach
    the environment and the results agree."""
    import helpers
    from helpers import config
    from policy.libero_policy import Pi05Policy
    from runners.evaluate import evaluate

    fast = ["tasks=[0]", "init_states=[0]", "max_steps=10", "vectorization=sync", "videos=none",
            "env.camera_size=128", "env.image_size=128"]
    make = lambda: Pi05Policy(tiny_checkpoint, spm_tokenizer, num_steps=2, device="cpu", dtype="float32",  # noqa: E731
                              config="tiny", seed=3)
    helpers.LOGS.clear()
    evaluate(config(*fast), tmp_path / "local", policy=make(), make_env=helpers.make_logged_env)
    local = [a for *_, a in helpers.LOGS[0].actions]
    with Running(make()) as server:
        helpers.LOGS.clear()
        evaluate(config("policy=remote", "host=127.0.0.1", f"port={server.port}", *fast), tmp_path / "remote",
                 make_env=helpers.make_logged_env)
        remote = [a for *_, a in helpers.LOGS[0].actions]
    assert len(local) == len(remote) == 10
    assert all(np.array_equal(a, b) for a, b in zip(local, remote))
    read = lambda d: [{k: r[k] for k in ("success", "env_steps", "error")}  # noqa: E731
                      for r in map(json.loads, (tmp_path / d / "results.jsonl").read_text().splitlines())]
    assert read("local") == read("remote")
