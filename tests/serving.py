"""Test helpers for the policy server: a real `python -m runners.serve` subprocess, and misbehaving
policies it can be told to serve (`policy._target_=serving.NonDictPolicy`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from policy.simple import ZeroPolicy

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, timeout_s: float = 60.0) -> bool:
    """Wait until the server on `port` answers /healthz; False if `proc` exits or time runs out first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return True
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.1)


def observation(seed=0, prompt="pick up the black bowl and place it on the plate"):
    rng = np.random.default_rng(seed)
    return {"observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "observation/state": rng.normal(size=8).astype(np.float32), "prompt": prompt}


class ServeProcess:
    """`python -m runners.serve policy=zero host=127.0.0.1 port=<free> *overrides` in a subprocess,
    ready (its /healthz answers) on entering; killed on leaving if it is still running."""

    def __init__(self, *overrides: str):
        self.port = free_port()
        self.args = [sys.executable, "-m", "runners.serve", "policy=zero", "host=127.0.0.1", f"port={self.port}",
                     *overrides]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServeProcess":
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
        # its log goes to a file: an unread pipe fills up and the server then blocks on logging
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(self.args, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        if wait_healthy(self.port, self.proc):
            return self
        self.kill()
        log = self.output()
        self.log.close()
        raise RuntimeError(f"server did not come up:\n{log}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS line")

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def output(self) -> str:
        """The server's log so far (its last 20,000 characters)."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-20_000:]

    def __exit__(self, *exc):
        self.kill()
        self.log.close()


class NonDictPolicy(ZeroPolicy):
    """Returns a string instead of {"actions": ...} (the batcher used to die on `out.get`)."""

    def infer(self, batch):
        return "not a dict"


class PreparingPolicy(ZeroPolicy):
    """Records the batch size `prepare` was asked for, and every call's batch size, in `record` (a file:
    it lives in the server process)."""

    def __init__(self, record: str, **kw):
        super().__init__(**kw)
        self.record = record

    def _log(self, line: str) -> None:
        with open(self.record, "a") as f:
            f.write(line + "\n")

    def prepare(self, max_batch: int) -> dict[int, float]:
        self._log(f"prepare {max_batch}")
        return {max_batch: 0.0}

    def infer(self, batch):
        self._log(f"infer {len(batch['prompt'])}")
        return super().infer(batch)
