"""The policy's thread (runners/policy_thread.py): one byte per finished call, present by the time the
call is seen finished, and a call in progress never holds the process's exit."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from runners.policy_thread import PolicyThread

REPO = Path(__file__).resolve().parents[1]


def test_a_finished_call_has_signalled_exactly_once_when_it_is_seen_finished():
    # A byte written after the future completes (a done-callback) is sometimes still unwritten when the
    # loop drains, and then wakes every later wait at once: the loop spins through the next call.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so a late byte shows within a few hundred calls
    try:
        _signal_per_call(3000)
    finally:
        sys.setswitchinterval(switch)


def _signal_per_call(calls: int) -> None:
    with PolicyThread() as thread:
        for k in range(calls):
            future = thread.submit(int, k)
            while not future.done():  # as the loop sees it: done() between its other work
                pass
            assert future.result()[0] == k
            assert thread.ready.poll(), f"call {k}: finished but its signal is not there yet"
            thread.drain()
            assert not thread.ready.poll()


def test_errors_reach_the_caller_and_still_signal():
    with PolicyThread() as thread:
        future = thread.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            future.result()
        assert thread.ready.poll()
        assert thread.call(sum, [1, 2]) == 3  # a plain call: no signal, the thread goes on
        thread.drain()
        assert not thread.ready.poll()


def test_a_call_in_progress_does_not_hold_the_exit_after_close_without_waiting():
    code = ("import time\nfrom runners.policy_thread import PolicyThread\nt = PolicyThread()\n"
            "t.submit(time.sleep, 30)\ntime.sleep(0.2)\nt.close(wait=False)\n")
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
    assert time.monotonic() - t0 < 10  # an executor's thread would be joined at exit: 30 s
