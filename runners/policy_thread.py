"""The one thread every call into an evaluation's policy runs on.

The evaluation loop (runners/loop.py) keeps the simulators stepping while the policy thinks, so the
policy must run beside the loop's main thread, not on it. All of its work runs on this one thread:
preparation (compilation, CUDA graph capture), resets and every call, so a policy never sees two
threads (CUDA's current device and stream, autograd's mode and torch.compile's caches are
per-thread state, and a graph captured on one thread is replayed on the same one). The GPU work and
the network wait of a remote policy release the GIL, so the loop goes on meanwhile.

A finished call makes the thread's connection readable, so the loop can wait on the simulators'
replies and the policy at once (`EnvPool.collect(wake=[thread.ready])`). The byte is written before
the call's future completes, so whoever sees the future done finds exactly one byte to read (a byte
written after, as a done-callback would, could be left over and wake the loop's next waits at once,
spinning it for a whole call).

A plain daemon thread, not concurrent.futures' executor: the executor's threads are joined when the
interpreter exits, so Ctrl-C or SIGTERM during a long call (a hung GPU call, a remote policy waiting
out its timeout) would hold the process until the call ends.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable


class PolicyThread:
    def __init__(self):
        self.ready, self._signal = mp.Pipe(duplex=False)  # one byte per finished submitted call
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="policy", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args, signal = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                value = fn(*args)
            except BaseException as exc:  # handed to whoever waits on the future
                self._wake(signal)
                future.set_exception(exc)
            else:
                self._wake(signal)
                future.set_result(value)

    def _wake(self, signal: bool) -> None:
        if not signal:
            return
        try:
            self._signal.send_bytes(b"1")
        except OSError:  # closed: nobody waits any more
            pass

    def _put(self, fn: Callable, args: tuple, signal: bool) -> Future:
        if not self._thread.is_alive():
            raise RuntimeError("the policy thread has been closed")
        future: Future = Future()
        self._jobs.put((future, fn, args, signal))
        return future

    def call(self, fn: Callable, *args) -> Any:
        """Run fn(*args) on the policy's thread and wait for it (preparation, resets)."""
        return self._put(fn, args, signal=False).result()

    def submit(self, fn: Callable, *args) -> Future:
        """Start fn(*args) on the policy's thread; the future's result is (value, seconds it ran), so
        the time a request spent queued is never counted as the policy's."""

        def timed():
            t0 = time.perf_counter()
            value = fn(*args)
            return value, time.perf_counter() - t0

        return self._put(timed, (), signal=True)

    def drain(self) -> None:
        """Read the finished-call signals that arrived (call once a finished future is consumed)."""
        while self.ready.poll():
            self.ready.recv_bytes()

    def close(self, wait: bool = True) -> None:
        """Stop the thread once its queued work is done; `wait=False` (the loop is unwinding from an
        error or Ctrl-C) returns at once, and a call in progress no longer holds the process's exit."""
        self._jobs.put(None)
        if wait:
            self._thread.join()
        self.ready.close()
        self._signal.close()

    def __enter__(self) -> "PolicyThread":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(wait=exc_type is None)
