"""How much one client sending large images slows another client's requests (issue #14, item 2).

Not a test (pytest does not collect it): a measurement, run by hand:

    python tests/server_latency.py                    # this checkout's server
    python tests/server_latency.py --repo /tmp/old    # another checkout's (e.g. df32a67)

It starts `python -m runners.serve policy=zero` from --repo, then measures a normal client (224x224
images, openpi-client) for --seconds alone, and again while a second process sends observations with
one --big-side x --big-side image as fast as the server takes them (reconnecting when refused).
Prints the normal client's latency percentiles in both phases.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

BIG_CLIENT = r"""
import sys, numpy as np
from openpi_client.websocket_client_policy import WebsocketClientPolicy
port, side = int(sys.argv[1]), int(sys.argv[2])
obs = {"observation/image": np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8),
       "observation/wrist_image": np.zeros((224, 224, 3), np.uint8), "observation/state": np.zeros(8, np.float32),
       "prompt": "big"}
sent = refused = 0
while True:
    try:
        c = WebsocketClientPolicy("127.0.0.1", port)
        while True:
            c.infer(obs); sent += 1
    except Exception as exc:
        refused += 1
        if refused == 1:
            print("big client:", type(exc).__name__, str(exc)[:160], flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure(port: int, seconds: float) -> np.ndarray:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    rng = np.random.default_rng(1)
    obs = {"observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
           "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
           "observation/state": np.zeros(8, np.float32), "prompt": "normal"}
    client = WebsocketClientPolicy("127.0.0.1", port)
    lat, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        client.infer(obs)
        lat.append(1000 * (time.perf_counter() - t0))
    return np.asarray(lat)


def _report(name: str, lat: np.ndarray) -> None:
    p50, p95 = np.percentile(lat, [50, 95])
    print(f"{name:>28}: n={len(lat):4d}  p50={p50:7.1f} ms  p95={p95:7.1f} ms  max={lat.max():7.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--big-side", type=int, default=3000, help="side of the big client's square image")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--server-args", nargs="*", default=[])
    args = ap.parse_args()
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": args.repo}
    server = subprocess.Popen([sys.executable, "-m", "runners.serve", "policy=zero", "host=127.0.0.1",
                               f"port={port}", *args.server_args], cwd=args.repo, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    big = None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "server did not come up"
                time.sleep(0.2)
        print(f"server from {args.repo}; big image {args.big_side}x{args.big_side}x3 uint8 "
              f"({args.big_side ** 2 * 3 / 2**20:.1f} MiB)")
        _report("normal client alone", _measure(port, args.seconds))
        big = subprocess.Popen([sys.executable, "-c", BIG_CLIENT, str(port), str(args.big_side)], env=env)
        time.sleep(2.0)  # let it connect and get going
        _report("with the big client", _measure(port, args.seconds))
    finally:
        for p in (big, server):
            if p is not None:
                p.kill()
                p.wait()


if __name__ == "__main__":
    main()
