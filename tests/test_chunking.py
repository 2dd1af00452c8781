"""Action-chunk bookkeeping: replanning and ACT temporal ensembling."""

import numpy as np
import pytest

from runners.chunking import ChunkExecutor, ensemble_action


def chunk(start, n=10):
    c = np.zeros((n, 7))
    c[:, 0] = start + np.arange(n)  # value = the step it was predicted for, if started at `start`
    return c


def test_replan_executes_the_first_replan_steps_of_each_chunk():
    ex = ChunkExecutor(replan=3)
    executed, asked = [], []
    for t in range(8):
        if ex.needs_chunk():
            asked.append(t)
            ex.add_chunk(chunk(100 * len(asked)))
        executed.append(ex.next_action()[0][0])
    assert asked == [0, 3, 6]
    assert executed == [100, 101, 102, 200, 201, 202, 300, 301]


def test_replan_longer_than_the_chunk_is_an_error():
    ex = ChunkExecutor(replan=6)
    with pytest.raises(ValueError, match="replan <= 5"):
        ex.add_chunk(chunk(0, n=5))


def test_a_step_waiting_for_its_synchronous_chunk_raises_and_an_uncovered_step_holds():
    ex = ChunkExecutor(replan=2)
    ex.request_sent(delay=0)
    assert ex.blocked()
    with pytest.raises(RuntimeError, match="not been added"):
        ex.next_action()
    ex.add_chunk(chunk(0, n=3), start=0, delay=0)
    assert not ex.blocked() and ex.next_action()[0][0] == 0
    # with latency the step goes on: no chunk covers it yet, so the robot holds (gripper as last sent)
    ex = ChunkExecutor(replan=2)
    ex.request_sent(delay=3)
    action, held = ex.next_action()
    assert held and np.array_equal(action, [0, 0, 0, 0, 0, 0, -1]) and ex.stats.held_steps == 1
    # ... until the simulated latency has passed: step 3 cannot execute before the chunk is in, however
    # long the real call takes (the loop steps other slots meanwhile)
    ex.next_action(), ex.next_action()
    assert ex.t == 3 and ex.blocked()
    ex.add_chunk(chunk(0, n=5), start=0, delay=3)
    action, held = ex.next_action()
    assert not held and np.array_equal(action, chunk(0, n=5)[3])


def test_unknown_mode_lists_the_choices():
    with pytest.raises(ValueError, match="replan, ensemble"):
        ChunkExecutor(chunking="average")


def test_ensemble_weights_on_a_known_sequence():
    m = 0.5
    # chunk A from step 0 predicts 10+t, chunk B from step 2 predicts 20+t, chunk C from step 4 predicts 30+t
    chunks = [(0, np.array([[10.0 + t] for t in range(6)])), (2, np.array([[20.0 + t] for t in range(2, 8)])),
              (4, np.array([[30.0 + t] for t in range(4, 10)]))]
    # step 5: A says 15, B says 25, C says 35; weights 1, e^-0.5, e^-1 (oldest first)
    w = np.exp(-m * np.arange(3))
    assert ensemble_action(chunks, 5, m)[0] == pytest.approx((w @ [15, 25, 35]) / w.sum())
    # step 1: only A covers it
    assert ensemble_action(chunks, 1, m)[0] == pytest.approx(11.0)
    # step 7: A has ended; B (older) then C
    w2 = np.exp(-m * np.arange(2))
    assert ensemble_action(chunks, 7, m)[0] == pytest.approx((w2 @ [27, 37]) / w2.sum())


def test_ensemble_executor_averages_overlapping_chunks():
    ex = ChunkExecutor(replan=2, chunking="ensemble", ensemble_m=0.0)  # m = 0: plain mean
    out = []
    for t in range(6):
        if ex.needs_chunk():
            ex.add_chunk(chunk(0, n=4) + 1000 * (t // 2))  # chunk k adds 1000 k to the step's value
        out.append(ex.next_action()[0][0])
    # step t is covered by chunks started at t-3..t (every 2 steps, length 4)
    assert out[0] == 0 and out[1] == 1
    assert out[2] == pytest.approx(np.mean([2, 1000 + 0]))
    assert out[5] == pytest.approx(np.mean([3 + 1000, 1 + 2000]))


def test_ensemble_with_replan_one_is_acts_scheme():
    ex = ChunkExecutor(replan=1, chunking="ensemble", ensemble_m=0.01)
    for t in range(5):
        assert ex.needs_chunk()
        ex.add_chunk(np.full((3, 7), float(t)))
        a = ex.next_action()[0][0]
        preds = [s for s in range(max(0, t - 2), t + 1)]
        w = np.exp(-0.01 * np.arange(len(preds)))
        assert a == pytest.approx((w @ preds) / w.sum())


def run_schedule(replan, delay, steps, horizon=10):
    """Drive an executor as the runner does; chunk j's actions encode (j, index)."""
    ex = ChunkExecutor(replan=replan)
    executed, requests, held = [], [], []
    for t in range(steps):
        if ex.wants_request():
            start = ex.request_sent(delay)
            c = np.zeros((horizon, 7))
            c[:, 0] = 100 * (len(requests) + 1) + np.arange(horizon)
            c[:, 6] = 1.0
            requests.append(start)
            ex.add_chunk(c, start=start, delay=delay)
        a, h = ex.next_action()
        executed.append(int(a[0]))
        held.append(h)
    return executed, requests, held, ex


def test_async_execution_timing_is_exact():
    # requests every `replan` steps; the chunk asked at k is used from k + d on, its first d actions skipped
    executed, requests, held, ex = run_schedule(replan=3, delay=2, steps=11)
    assert requests == [0, 3, 6, 9]
    assert held == [True, True] + [False] * 9  # nothing to execute before the first chunk arrives
    assert executed == [0, 0, 102, 103, 104, 202, 203, 204, 302, 303, 304]
    m = ex.metrics()
    assert m["held_steps"] == 2 and m["delay_steps"] == 2 and m["delay_steps_max"] == 2
    # boundary jump: the new chunk's action vs what the old one would have executed (motion dims)
    assert m["chunk_boundary_jump"] == pytest.approx(np.linalg.norm([202 - 105]))


def test_zero_delay_is_synchronous_replanning():
    executed, requests, held, _ = run_schedule(replan=3, delay=0, steps=8)
    assert requests == [0, 3, 6] and not any(held)
    assert executed == [100, 101, 102, 200, 201, 202, 300, 301]


def test_delay_longer_than_replan_keeps_several_requests_in_flight():
    executed, requests, held, _ = run_schedule(replan=2, delay=5, steps=9, horizon=10)
    assert requests == [0, 2, 4, 6, 8]
    assert held == [True] * 5 + [False] * 4
    assert executed[5:] == [105, 106, 205, 206]


def test_latency_in_steps_and_the_early_check():
    from runners.chunking import check_chunking, delay_steps

    assert [delay_steps(ms) for ms in (0, 1, 50, 50.0001, 100, 120, 400)] == [0, 1, 1, 2, 2, 3, 8]
    check_chunking(5, "replan", 10, delay_steps=5)
    with pytest.raises(ValueError, match="replan=5 \\+ the latency's 6 steps exceeds the policy's chunk length 10"):
        check_chunking(5, "replan", 10, delay_steps=6)
    with pytest.raises(ValueError, match="latency"):
        delay_steps(-1)
    with pytest.raises(ValueError, match="the policy's chunk size must be >= 1 actions, got 0"):
        check_chunking(5, "replan", 0)  # said "Use latency_ms <= -250 with replan=5"


def test_jerk_is_the_mean_second_difference_of_the_executed_motion():
    ex = ChunkExecutor(replan=4)
    c = np.zeros((4, 7))
    c[:, 0] = [0.0, 1.0, 4.0, 9.0]  # second differences 2, 2
    c[:, 6] = 1.0  # gripper flips are not motion
    ex.add_chunk(c)
    for _ in range(4):
        ex.next_action()
    assert ex.metrics()["action_jerk"] == pytest.approx(2.0)
    assert ex.metrics()["chunk_boundary_jump"] is None and ex.metrics()["held_steps"] == 0
