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
    from serving import wait_healthy

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "runners.serve", "policy=zero", "+policy.delay_s=1.0",
                             "host=127.0.0.1", f"port={port}"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_healthy(port, proc), "server did not come up"
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


# ----- issue #14: hardening ------------------------------------------------------------------------

def _raw_recv_reply(ws, payload, timeout=10):
    ws.send(payload)
    return ws.recv(timeout=timeout)


def test_object_dtype_in_a_message_is_refused_and_the_served_process_lives():
    """A ~600-byte message naming dtype '|O' used to make openpi's decoder build an object array from
    the client's bytes; reading it crashed `python -m runners.serve` with SIGSEGV."""
    import msgpack
    from serving import ServeProcess

    image = {b"__ndarray__": True, b"data": b"\0" * 3, b"dtype": "|u1", b"shape": [1, 1, 3]}
    hostile = msgpack.packb({
        "observation/image": image, "observation/wrist_image": image,
        "observation/state": {b"__ndarray__": True, b"data": b"A" * 64, b"dtype": "|O", b"shape": [8]},
        "prompt": "x" * 400})
    assert len(hostile) < 700
    with ServeProcess() as srv:
        ws = _raw(srv.port)
        reply = _raw_recv_reply(ws, hostile)
        assert isinstance(reply, str) and "dtype '|O' is not allowed" in reply
        time.sleep(0.2)
        assert srv.alive(), srv.output()
        assert WebsocketClientPolicy("127.0.0.1", srv.port).infer(observation())["actions"].shape == (10, 7)


def test_message_over_max_message_mb_gets_1009_and_a_log_line_and_others_are_served(caplog):
    from websockets.exceptions import ConnectionClosedError

    big = {**observation(), "observation/image": np.zeros((1000, 1000, 3), np.uint8)}  # 3 MB > 1 MiB
    with Running(ZeroPolicy(), max_message_mb=1) as server:
        client = WebsocketClientPolicy("127.0.0.1", server.port)
        with pytest.raises(ConnectionClosedError) as info:
            client.infer(big)
        assert info.value.rcvd.code == 1009 and "exceeds limit of 1048576 bytes" in info.value.rcvd.reason
        assert WebsocketClientPolicy("127.0.0.1", server.port).infer(observation())["actions"].shape == (10, 7)
        deadline = time.monotonic() + 5
        while "max_message_mb is 1" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
    assert "max_message_mb is 1" in caplog.text


def test_max_message_mb_must_be_positive():
    with pytest.raises(ValueError, match="max_message_mb"):
        PolicyServer(ZeroPolicy(), max_message_mb=0)


def test_decoding_runs_off_the_event_loop():
    """While one client's observation is being parsed (made slow here, deterministically: it waits for
    an event), another client's request is answered. Parsing on the event loop would block it."""
    import runners.server as server_mod

    release, entered = threading.Event(), threading.Event()
    real = server_mod.parse_observation

    def slow_for_big(obs, image_size=224):
        if obs["observation/image"].shape[0] == 800:  # only the big client's observation waits
            entered.set()
            release.wait(20)
        return real(obs, image_size)

    server_mod.parse_observation = slow_for_big
    try:
        with Running(ZeroPolicy()) as server:
            big_client = WebsocketClientPolicy("127.0.0.1", server.port)
            small_client = WebsocketClientPolicy("127.0.0.1", server.port)
            out = {}
            t = threading.Thread(target=lambda: out.setdefault("big", big_client.infer(
                {**observation(), "observation/image": np.zeros((800, 800, 3), np.uint8)})))
            t.start()
            assert entered.wait(10)
            got = {}
            s = threading.Thread(target=lambda: got.setdefault("small", small_client.infer(observation(1))))
            s.start()
            s.join(5)
            answered_while_parsing = "small" in got
            release.set()
            t.join(10)
            s.join(10)
    finally:
        server_mod.parse_observation = real
        release.set()
    assert answered_while_parsing, "the small client waited for the big client's parsing"
    assert out["big"]["actions"].shape == (10, 7)


def _listening_addresses(port):
    """The IPv4 addresses a socket LISTENs on at `port`, from /proc/net/tcp (hex, little-endian)."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        ip_hex, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            found.append(socket.inet_ntoa(bytes.fromhex(ip_hex)[::-1]))
    return found


def test_binds_loopback_by_default():
    server = PolicyServer(ZeroPolicy(), port=0)
    thread = threading.Thread(target=lambda: asyncio.run(server.run()), daemon=True)
    thread.start()
    try:
        assert server.started.wait(30)
        assert _listening_addresses(server.port) == ["127.0.0.1"]  # was 0.0.0.0: every interface
    finally:
        server.stop()
        thread.join(30)


def test_serve_config_binds_loopback_and_has_the_new_settings():
    import helpers

    cfg = helpers.config(name="serve")
    assert cfg.host == "127.0.0.1" and cfg.api_key is None and cfg.max_message_mb == 32
    remote = helpers.config("policy=remote")
    assert remote.policy.api_key is None and remote.policy.timeout_s == 60


def test_api_key_is_required_when_set_and_healthz_stays_open():
    from websockets.exceptions import InvalidStatus

    with Running(ZeroPolicy(), api_key="s3cret") as server:
        for key in (None, "wrong", "s3cre", "S3cret"):
            with pytest.raises(InvalidStatus) as info:
                WebsocketClientPolicy("127.0.0.1", server.port, api_key=key)
            assert info.value.response.status_code == 401
            assert b"Api-Key" in info.value.response.body
        ok = WebsocketClientPolicy("127.0.0.1", server.port, api_key="s3cret")
        assert ok.infer(observation())["actions"].shape == (10, 7)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as r:
            assert r.status == 200


def test_serve_passes_api_key_and_keeps_it_out_of_the_metadata():
    from websockets.exceptions import InvalidStatus
    from serving import ServeProcess

    with ServeProcess("api_key=s3cret") as srv:
        with pytest.raises(InvalidStatus):
            WebsocketClientPolicy("127.0.0.1", srv.port)
        client = WebsocketClientPolicy("127.0.0.1", srv.port, api_key="s3cret")
        assert "s3cret" not in repr(client.get_server_metadata())
        assert client.infer(observation())["actions"].shape == (10, 7)


def test_serve_prepares_the_policy_for_its_max_batch_before_it_listens(tmp_path):
    """A compiled Pi0.5 compiles one graph per batch bucket: serve prepares them all up to max_batch
    before the port opens, so the first clients do not wait for compilation."""
    from serving import ServeProcess

    record = tmp_path / "calls.txt"
    with ServeProcess("policy._target_=serving.PreparingPolicy", f"+policy.record={record}", "max_batch=6") as srv:
        assert record.read_text().splitlines() == ["prepare 6"]  # done once the server answers /healthz
        WebsocketClientPolicy("127.0.0.1", srv.port).infer(observation())
    assert record.read_text().splitlines() == ["prepare 6", "infer 1"]


class _Misbehaving(ZeroPolicy):
    """Misbehaves on prompts starting with 'bad:' (how, after the colon); serves the rest."""

    def infer(self, batch):
        how = batch["prompt"][0].removeprefix("bad:") if batch["prompt"][0].startswith("bad:") else None
        good = super().infer(batch)
        if how is None:
            return good
        if how == "raise":
            raise RuntimeError("boom")
        if how == "string":
            return "not a dict"
        if how == "none":
            return None
        if how == "no-actions":
            return {"action": good["actions"]}
        if how == "wrong-shape":
            return {"actions": np.zeros((5, 3))}
        if how == "strings":
            return {"actions": np.full(good["actions"].shape, "x")}
        if how == "nan-row":  # as policy=remote does when a row timed out behind this server
            return {**good, "actions": np.full(good["actions"].shape, np.nan),
                    "errors": ["TimeoutError: no reply from ws://upstream:8000"] * len(batch["prompt"])}
        if how == "bad-timing":
            return {**good, "policy_timing": "junk"}
        if how == "odd-timing":
            return {**good, "policy_timing": {"infer_ms": object(), "x": 1.5}}
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["raise", "string", "none", "no-actions", "wrong-shape", "strings"])
def test_a_misbehaving_policy_fails_that_request_and_the_batcher_goes_on(how):
    with Running(_Misbehaving()) as server:
        ws = _raw(server.port)
        reply = _raw_recv_reply(ws, msgpack_numpy.packb(observation(prompt=f"bad:{how}")))
        assert isinstance(reply, str) and reply.startswith("policy error")
        for k in range(2):  # later requests, on a new connection, are served
            client = WebsocketClientPolicy("127.0.0.1", server.port)
            ws2 = client._ws
            ws2.send(msgpack_numpy.packb(observation(k)))
            assert msgpack_numpy.unpackb(ws2.recv(timeout=10))["actions"].shape == (10, 7)


@pytest.mark.parametrize("how", ["bad-timing", "odd-timing"])
def test_unusable_policy_timing_is_replaced_not_fatal(how):
    with Running(_Misbehaving()) as server:
        ws = _raw(server.port)
        reply = msgpack_numpy.unpackb(_raw_recv_reply(ws, msgpack_numpy.packb(observation(prompt=f"bad:{how}"))))
        assert reply["actions"].shape == (10, 7)
        assert all(isinstance(v, float) for v in reply["policy_timing"].values())


def test_a_row_the_policy_failed_is_sent_with_its_error_and_remote_policy_reports_it():
    """A row with NaN actions is sent as it is (openpi's way), but the server dropped the policy's own
    message for it: a client of a chained server saw 'NaN actions' instead of the upstream timeout."""
    from policy.remote import RemotePolicy

    with Running(_Misbehaving(), max_batch=1) as server:  # _Misbehaving fails a whole batch: one row each
        ws = _raw(server.port)
        reply = msgpack_numpy.unpackb(_raw_recv_reply(ws, msgpack_numpy.packb(observation(prompt="bad:nan-row"))))
        assert np.isnan(reply["actions"]).all() and reply["error"] == "TimeoutError: no reply from ws://upstream:8000"
        ok = msgpack_numpy.unpackb(_raw_recv_reply(ws, msgpack_numpy.packb(observation())))
        assert "error" not in ok and np.isfinite(ok["actions"]).all()
        remote = RemotePolicy("127.0.0.1", server.port, timeout_s=30)
        rng = np.random.default_rng(0)
        two = {"image": rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8),
               "wrist_image": rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8),
               "state": np.zeros((2, 8), np.float32), "prompt": ["bad:nan-row", "pick up the bowl"]}
        out = remote.infer(two)
        assert np.isnan(out["actions"][0]).all() and np.isfinite(out["actions"][1]).all()
        assert "upstream:8000" in out["errors"][0] and out["errors"][1] is None


def test_sigterm_still_exits_after_a_policy_returned_a_non_dict():
    from serving import ServeProcess

    with ServeProcess("policy._target_=serving.NonDictPolicy") as srv:
        ws = _raw(srv.port)
        reply = _raw_recv_reply(ws, msgpack_numpy.packb(observation()))
        assert isinstance(reply, str) and "without an 'actions' entry" in reply
        assert srv.terminate(timeout=30) == 0


def test_a_client_that_left_while_queued_is_not_computed():
    """The leaver's request waits behind a slow call; it leaves; its request must not reach the policy."""
    seen = []

    class Recording(ZeroPolicy):
        def infer(self, batch):
            seen.extend(batch["prompt"])
            return super().infer(batch)

    policy = Recording(delay_s=0.6)
    with Running(policy, window_ms=1) as server:
        first = WebsocketClientPolicy("127.0.0.1", server.port)
        t = threading.Thread(target=lambda: first.infer(observation(prompt="first")))
        t.start()
        time.sleep(0.2)  # "first" is inside its 0.6 s policy call
        leaver = _raw(server.port)
        leaver.send(msgpack_numpy.packb(observation(prompt="leaver")))
        time.sleep(0.1)
        leaver.close()
        t.join(10)
        time.sleep(0.3)  # the batcher has had its chance to pick "leaver"
        assert WebsocketClientPolicy("127.0.0.1", server.port).infer(observation(prompt="after"))["actions"].shape == (10, 7)
    assert "leaver" not in seen and seen == ["first", "after"]


def test_the_episode_step_extension_is_optional_and_checked():
    from runners.server import BadRequest, parse_observation

    obs = {"observation/image": np.zeros((224, 224, 3), np.uint8), "observation/wrist_image": np.zeros((224, 224, 3), np.uint8),
           "observation/state": np.zeros(8, np.float32), "prompt": "put the bowl on the plate"}
    assert "episode" not in parse_observation(obs)  # openpi's clients never send it
    row = parse_observation({**obs, "harness/episode": ["libero_spatial", 3, 7, 7], "harness/step": 15})
    assert row["episode"] == ("libero_spatial", 3, 7, 7) and row["step"] == 15
    for bad in ({"harness/episode": "x" * 10, "harness/step": 1}, {"harness/episode": [[1]], "harness/step": 1},
                {"harness/episode": ["a"], "harness/step": -1}, {"harness/episode": ["a"], "harness/step": True},
                {"harness/episode": list(range(9)), "harness/step": 0}, {"harness/step": 3}):
        with pytest.raises(BadRequest, match="harness/"):
            parse_observation({**obs, **bad})


def test_connections_past_max_connections_are_refused_and_memory_stays_bounded():
    """Each connection may hold ~2 messages of max_message_mb: without a cap, a few hundred idle
    connections with queued messages took the server's memory (and every client) down."""
    from websockets.exceptions import InvalidStatus

    with Running(ZeroPolicy(), max_connections=2) as server:
        first, second = (connect(f"ws://127.0.0.1:{server.port}", max_size=None) for _ in range(2))
        for c in (first, second):
            c.recv(timeout=10)  # the metadata: both are in
        with pytest.raises(InvalidStatus) as info:
            connect(f"ws://127.0.0.1:{server.port}", open_timeout=10)
        assert info.value.response.status_code == 503 and b"max_connections" in info.value.response.body
        first.close()
        deadline = time.monotonic() + 10
        while len(server._clients) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        client = WebsocketClientPolicy("127.0.0.1", server.port)  # room again
        assert client.infer(observation())["actions"].shape == (10, 7)
        second.close()
    with pytest.raises(ValueError, match="max_connections must be >= 1"):
        PolicyServer(ZeroPolicy(), max_connections=0)


def test_a_taken_or_bad_port_fails_before_the_policy_is_built(tmp_path):
    """runners.serve bound its port only after loading and compiling the policy (minutes with real weights),
    then died with an OSError traceback."""
    from runners.server import bound_socket
    from serving import free_port

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"port {port} on 127.0.0.1 is in use"):
            bound_socket("127.0.0.1", port)
        record = tmp_path / "calls.txt"
        proc = subprocess.run([sys.executable, "-m", "runners.serve", "policy._target_=serving.PreparingPolicy",
                               f"+policy.record={record}", "host=127.0.0.1", f"port={port}"], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])},
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and f"port {port} on 127.0.0.1 is in use" in proc.stderr
    assert not record.exists()  # no policy was built (nor prepared)
    with pytest.raises(ValueError, match="port must be 0..65535, got 70000"):
        bound_socket("127.0.0.1", 70000)
    # bound and not yet listening (the policy loading): a client is refused at once, not left hanging
    sock = bound_socket("127.0.0.1", free_port())
    with sock, pytest.raises(ConnectionRefusedError):
        socket.create_connection(sock.getsockname(), timeout=5)
