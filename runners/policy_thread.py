"""The one thread every call into an evaluation's policy runs on.

The evaluation loop (runners/loop.py) keeps the simulators stepping while the policy thinks, so the
policy must run beside the loop's main thread, not on it. All of its work runs on this one thread:
preparation (compilation, CUDA graph capture), resets and every call, so a policy never sees two
threads (CUDA's current device and stream, autograd's mode and torch.compile's caches are
per-thread state, and a graph captured on one thread is replayed on the same one). The GPU work and
the network wait of a remote policy release the GIL, so the loop goes on meanwhile.

A finished call makes the thread's connection readable, so the loop can wait on the simulators'
replies and the policy at once (`EnvPool.collect(wake=[thread.ready])`).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class PolicyThread:
    def __init__(self):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy")
        self.ready, self._signal = mp.Pipe(duplex=False)  # readable once a submitted call has finished

    def call(self, fn: Callable, *args) -> Any:
        """Run fn(*args) on the policy's thread and wait for it (preparation, resets)."""
        return self._executor.submit(fn, *args).result()

    def submit(self, fn: Callable, *args) -> Future:
        """Start fn(*args) on the policy's thread; the future's result is (value, seconds it ran), so
        the time spent queued behind nothing is never counted as the policy's."""

        def timed():
            t0 = time.perf_counter()
            value = fn(*args)
            return value, time.perf_counter() - t0

        future = self._executor.submit(timed)
        future.add_done_callback(self._wake)
        return future

    def _wake(self, _future: Future) -> None:
        try:
            self._signal.send_bytes(b"1")
        except OSError:  # closed: nobody waits any more
            pass

    def drain(self) -> None:
        """Read the finished-call signals that arrived (call once a finished future is consumed)."""
        while self.ready.poll():
            self.ready.recv_bytes()

    def close(self, wait: bool = True) -> None:
        """Stop the thread; `wait=False` (the loop is unwinding from an error or Ctrl-C) does not wait
        for a call in progress, which finishes on its own."""
        self._executor.shutdown(wait=wait, cancel_futures=True)
        if wait:
            self.ready.close()
            self._signal.close()

    def __enter__(self) -> "PolicyThread":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(wait=exc_type is None)
